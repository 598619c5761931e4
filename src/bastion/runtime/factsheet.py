"""Model factsheets: one JSON and one HTML document per model version, built from what the
registry (MLflow) and the event store recorded, never typed by hand.

:func:`build_factsheet` gathers, for one registered version:

- **model**: name, version, aliases, registration time, the MLflow run, the folder's
  SHA-256 (``model_sha256``, the fingerprint scans and audits are matched by);
- **lineage**: the training data (name and ``data_sha256`` when the folder's metadata
  has them), the parent version, the training or hardening method and its settings (or
  the retrain trigger), and every alias move of this version (who or what moved it, why);
- **scan**: the latest ``bastion scan`` of this exact model (MLflow runs tagged with its
  SHA-256): preset, clean accuracy, robust accuracy by epsilon with the report's 95%
  intervals, and its warnings;
- **data_audit** and **privacy_audit**: the latest ``bastion audit data`` run on the
  version's training data, and ``bastion audit privacy`` of this model;
- **calibration**: the detectors' thresholds, target and observed false-positive rates
  (recorded by the service when it builds the guard for this version), and the flag rate
  on the traffic it served;
- **gates**: the gates a healing retrain checked before registering it;
- **healing**: the alerts raised and the healing actions taken while it was the champion;
- **known_limits**: what the evidence does not cover, derived from the above.

A piece that was never recorded is ``{"status": "not recorded"}`` (and says so in the
HTML), never guessed. :func:`write_factsheet` writes ``factsheet.json`` and
``factsheet.html``; :func:`attach_factsheet` logs both as artifacts of the version's
MLflow run (``factsheet/``).
"""

from __future__ import annotations

import html
import json
import shutil
import tempfile
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bastion.errors import BastionError
from bastion.store import events as ev

NOT_RECORDED = "not recorded"
MODEL_SHA_TAG = "bastion.model_sha256"
CALIBRATION_STATE = "calibration"

__all__ = ["NOT_RECORDED", "attach_factsheet", "build_factsheet", "calibration_key",
           "make_factsheet", "render_factsheet_html", "write_factsheet"]


def _missing(why: str = "") -> dict[str, Any]:
    return {"status": NOT_RECORDED, **({"note": why} if why else {})}


def calibration_key(model: str, version: int | str) -> str:
    """The event-store state key of a version's detector calibration."""
    return f"{CALIBRATION_STATE}:{model}:v{int(version)}"


def _wilson(k: int, n: int) -> list[float] | None:
    from bastion.evaluate.presets import wilson_interval

    return None if n == 0 else [round(float(v), 4) for v in wilson_interval(int(k), int(n))]


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(float(ts), UTC).isoformat(timespec="seconds")


# -- pieces --------------------------------------------------------------------------
def _runs(client: Any, command: str, *, tag: tuple[str, str] | None = None,
          param: tuple[str, str] | None = None) -> list[Any]:
    """Finished Bastion runs of ``command``, newest first, across experiments."""
    flt = [f"tags.`bastion.command` = '{command}'", "attributes.status = 'FINISHED'"]
    if tag is not None:
        flt.append(f"tags.`{tag[0]}` = '{tag[1]}'")
    if param is not None:
        flt.append(f"params.`{param[0]}` = '{param[1]}'")
    try:
        exps = [e.experiment_id for e in client.search_experiments()]
        return list(client.search_runs(exps, " and ".join(flt),
                                       order_by=["attributes.start_time DESC"], max_results=5))
    except Exception:
        return []


def _report_json(client: Any, run: Any, folder: str) -> dict[str, Any] | None:
    """The JSON report a run logged under ``folder`` (first ``*.json``), or None."""
    tmp = Path(tempfile.mkdtemp(prefix="bastion-fs-"))
    try:
        local = Path(client.download_artifacts(run.info.run_id, folder, str(tmp)))
        files = sorted(p for p in local.rglob("*.json") if p.is_file())
        for p in files:
            if p.stat().st_size > 20_000_000:
                continue
            doc = json.loads(p.read_text(encoding="utf-8"))
            if isinstance(doc, dict):
                return doc
    except Exception:
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return None


def _scan(client: Any, sha: str) -> dict[str, Any]:
    runs = _runs(client, "scan", tag=(MODEL_SHA_TAG, sha))
    if not runs:
        return _missing("no bastion scan of this exact model (matched by its SHA-256)")
    run = runs[0]
    rep = _report_json(client, run, "report") or {}
    m = run.data.metrics
    robust = rep.get("robust_accuracy") or {
        k[len("robust_accuracy_eps_"):]: v for k, v in m.items()
        if k.startswith("robust_accuracy_eps_")}
    intervals = rep.get("robust_interval") or {}
    return {"status": "recorded", "run_id": run.info.run_id,
            "at": _iso(run.info.start_time / 1000),
            "preset": rep.get("preset", run.data.params.get("preset", NOT_RECORDED)),
            "lower_bound": rep.get("lower_bound"),
            "norm": rep.get("norm", run.data.params.get("norm")),
            "data": run.data.params.get("data"),
            "n_points": rep.get("n_points", run.data.params.get("n_points")),
            "clean_accuracy": rep.get("clean_accuracy", m.get("clean_accuracy")),
            "robust_accuracy": [{"eps": str(k), "accuracy": v,
                                 "interval_95": intervals.get(str(k), NOT_RECORDED)}
                                for k, v in robust.items()],
            "warnings": list(rep.get("warnings") or [])}


def _audit(client: Any, kind: str, *, sha: str | None, data: str | None) -> dict[str, Any]:
    runs: list[Any] = []
    if sha is not None:
        runs = _runs(client, f"audit-{kind}", tag=(MODEL_SHA_TAG, sha))
    if not runs and data:
        runs = _runs(client, f"audit-{kind}", param=("data", data))
    if not runs:
        return _missing(f"no bastion audit {kind} of this model or its training data")
    run = runs[0]
    rep = _report_json(client, run, "audit") or {}
    keep = {k: v for k, v in rep.items() if isinstance(v, int | float | str | bool)
            and k not in ("model_name", "data_name")}
    return {"status": "recorded", "run_id": run.info.run_id,
            "at": _iso(run.info.start_time / 1000), "data": run.data.params.get("data"),
            "metrics": dict(run.data.metrics), "summary": keep,
            "warnings": list(rep.get("warnings") or [])[:20]}


def _lineage(meta: dict[str, Any], tags: dict[str, str], moves: list[Any],
             version: int) -> dict[str, Any]:
    inner = dict(meta.get("meta") or {})
    data = inner.get("data")
    parent = inner.get("parent_version", tags.get("bastion.parent_version"))
    method: dict[str, Any]
    if inner.get("method"):
        method = {"kind": "hardening", "method": inner["method"],
                  "settings": inner.get("settings", {})}
    elif inner.get("trigger") or tags.get("bastion.trigger"):
        method = {"kind": "healing retrain", "trigger": inner.get("trigger",
                                                                  tags.get("bastion.trigger")),
                  "retrain": inner.get("retrain", {})}
    elif inner.get("training"):
        method = {"kind": "training", **dict(inner["training"])}
    else:
        method = _missing("the model folder's metadata names no training or hardening")
    return {
        "arch": meta.get("arch"), "framework": meta.get("framework", meta.get("kind")),
        "data": data if data else NOT_RECORDED,
        "data_sha256": inner.get("data_sha256", NOT_RECORDED),
        "parent_version": parent if parent is not None else NOT_RECORDED,
        "method": method, "source": tags.get("bastion.source", NOT_RECORDED),
        "alias_moves": [{"alias": m.alias, "at": m.at, "from_version": m.from_version,
                         "actor": m.actor, "reason": m.reason}
                        for m in moves if m.version == version],
    }


def _calibration(store: ev.EventStore | None, model: str, version: int) -> dict[str, Any]:
    if store is None:
        return _missing("no event store given")
    cal = store.get_state(calibration_key(model, version))
    out: dict[str, Any] = {"status": "recorded"} if isinstance(cal, dict) and cal else \
        _missing("the service never built a guard for this version")
    if isinstance(cal, dict) and cal:
        out["detectors"] = cal.get("detectors", {})
        out["target_fpr"] = cal.get("target_fpr")
        out["at"] = cal.get("at")
    n = k = 0
    for e in store.query(kinds=ev.PREDICTION, limit=None):
        if e.model_version == str(version) and e.payload.get("answered_by",
                                                               "champion") == "champion":
            n += 1
            k += int(e.payload.get("verdict", "allow") != "allow")
    out["served"] = {"n": n, "flagged": k, "rate": None if n == 0 else round(k / n, 4),
                     "interval_95": _wilson(k, n),
                     "note": "all traffic this version answered, attacks included"}
    return out


def _gates(store: ev.EventStore | None, version: int) -> dict[str, Any]:
    if store is None:
        return _missing("no event store given")
    for e in store.query(kinds=ev.AUDIT, limit=None):
        p = e.payload
        evd = p.get("evidence") or {}
        if p.get("action") in ("retrain", "retrain_strict") and p.get("done") and \
                evd.get("new_version") == version:
            return {"status": "recorded", "at": e.at, "decision": p.get("decision"),
                    "gates": [{"name": g.get("name"), "passed": g.get("passed"),
                               "candidate": g.get("candidate"),
                               "champion": g.get("champion"), "detail": g.get("detail")}
                              for g in evd.get("gates") or []]}
    return _missing("this version was not made by a healing retrain, so no gates were run "
                    "on it by Bastion")


def _healing(store: ev.EventStore | None, moves: list[Any], version: int) -> dict[str, Any]:
    if store is None:
        return _missing("no event store given")
    # the periods in which this version was the champion
    periods: list[tuple[float, float]] = []
    start: float | None = None
    for m in moves:
        if m.alias != "champion":
            continue
        if m.version == version and start is None:
            start = m.ts
        elif m.version != version and start is not None:
            periods.append((start, m.ts))
            start = None
    if start is not None:
        periods.append((start, float("inf")))
    if not periods:
        return _missing("this version was never the champion")

    def inside(ts: float) -> bool:
        return any(a <= ts < b for a, b in periods)

    alerts = [{"at": e.at, "monitor": e.payload.get("monitor"),
               "status": e.payload.get("status", "firing"), "client_id": e.client_id,
               "message": str(e.payload.get("message", ""))[:300]}
              for e in store.query(kinds=ev.ALERT, limit=None) if inside(e.ts)]
    actions = [{"at": e.at, "action": e.payload.get("action"),
                "monitor": e.payload.get("monitor"), "done": e.payload.get("done"),
                "decision": str(e.payload.get("decision", ""))[:300]}
               for e in store.query(kinds=ev.AUDIT, limit=None)
               if inside(e.ts) and e.payload.get("done")
               and e.payload.get("action") not in ("alert", "none")]
    return {"status": "recorded",
            "champion_periods": [{"from": _iso(a), "to": None if b == float("inf")
                                  else _iso(b)} for a, b in periods],
            "alerts": alerts[-50:], "n_alerts": len(alerts), "actions": actions[-50:],
            "n_actions": len(actions)}


def _limits(doc: dict[str, Any]) -> list[str]:
    out: list[str] = []
    for key, what in (("scan", "robustness"), ("data_audit", "training-data integrity"),
                      ("privacy_audit", "membership-inference privacy"),
                      ("calibration", "detector calibration")):
        if doc[key].get("status") == NOT_RECORDED:
            out.append(f"{what} was not measured for this version ({doc[key].get('note')})")
    scan = doc["scan"]
    if scan.get("status") == "recorded":
        if scan.get("lower_bound"):
            out.append(f"the scan used preset {scan.get('preset')}: its robust accuracy is "
                       "an upper bound on true robustness from a weaker attack")
        eps = [r["eps"] for r in scan.get("robust_accuracy", [])]
        if eps:
            out.append(f"robustness is known only for {scan.get('norm')} perturbations up "
                       f"to eps {max(eps, key=float)} on {scan.get('n_points')} points of "
                       f"{scan.get('data')}")
        out += [f"scan: {w}" for w in scan.get("warnings", [])[:10]]
    if doc["lineage"]["data_sha256"] == NOT_RECORDED:
        out.append("the training data has no recorded fingerprint: it cannot be verified "
                   "that the data audited is the data trained on")
    return out


# -- the document ------------------------------------------------------------------------
def build_factsheet(registry: Any, version: int | str, *,
                    store: ev.EventStore | None = None) -> dict[str, Any]:
    """The factsheet of ``version`` (a number, ``v3`` or an alias) of ``registry``'s
    model (a :class:`~bastion.registry.models.ModelRegistry`), with the event store
    ``store`` (the service's) for calibration, gates and healing history.

    Raises:
        BastionError: an unknown version or alias (from the registry).
    """
    from bastion._util import folder_digest
    from bastion.models.persist import read_model_meta
    from bastion.models.text import is_text_folder, read_text_folder_meta

    v = registry.resolve(version)
    info = next((i for i in registry.versions() if i.version == v), None)
    if info is None:
        raise BastionError(f"model {registry.name!r} has no version {v}")
    path = registry.download(v)
    try:
        meta = read_text_folder_meta(path) if is_text_folder(path) else read_model_meta(path)
        sha = folder_digest(path)
    finally:
        shutil.rmtree(path, ignore_errors=True)
    moves = registry.alias_history()
    client = registry.client
    lineage = _lineage(meta, info.tags, moves, v)
    data_spec = (lineage["data"].get("spec") if isinstance(lineage["data"], dict) else None)
    doc: dict[str, Any] = {
        "kind": "bastion-factsheet", "schema": 1,
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {"name": registry.name, "version": v, "aliases": info.aliases,
                  "registered_at": _iso(info.created_at), "run_id": info.run_id,
                  "model_sha256": sha, "tags": info.tags,
                  "input_shape": meta.get("input_shape"), "n_classes": meta.get("n_classes")},
        "lineage": lineage,
        "scan": _scan(client, sha),
        "data_audit": _audit(client, "data", sha=None, data=data_spec),
        "privacy_audit": _audit(client, "privacy", sha=sha, data=None),
        "calibration": _calibration(store, registry.name, v),
        "gates": _gates(store, v),
        "healing": _healing(store, moves, v),
    }
    doc["known_limits"] = _limits(doc)
    return doc


def _cell(v: Any) -> str:
    if isinstance(v, dict | list):
        return f"<code>{html.escape(json.dumps(v, default=str)[:2000])}</code>"
    return html.escape("" if v is None else str(v))


def _section(title: str, body: dict[str, Any]) -> str:
    if body.get("status") == NOT_RECORDED:
        note = f": {html.escape(str(body['note']))}" if body.get("note") else ""
        return (f"<section><h2>{html.escape(title)}</h2><p class=\"missing\">"
                f"{NOT_RECORDED}{note}</p></section>")
    rows = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{_cell(v)}</td></tr>"
                   for k, v in body.items() if k != "status")
    return f"<section><h2>{html.escape(title)}</h2><table>{rows}</table></section>"


def render_factsheet_html(doc: dict[str, Any]) -> str:
    """A self-contained HTML page of ``doc`` (every value escaped; no script)."""
    m = doc["model"]
    scan = doc["scan"]
    robust = ""
    if scan.get("status") == "recorded":
        robust = "".join(
            f"<tr><td>{_cell(r['eps'])}</td><td>{_cell(r['accuracy'])}</td>"
            f"<td>{_cell(r['interval_95'])}</td></tr>" for r in scan["robust_accuracy"])
        robust = ("<table class=\"robust\"><tr><th>epsilon</th><th>robust accuracy</th>"
                  f"<th>95% interval</th></tr>{robust}</table>")
    limits = "".join(f"<li>{html.escape(x)}</li>" for x in doc["known_limits"]) or \
        "<li>none derived from the records</li>"
    title = f"Factsheet: {m['name']} v{m['version']}"
    return "".join([
        "<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\">",
        f"<title>{html.escape(title)}</title><style>",
        "body{font-family:system-ui,sans-serif;max-width:60rem;margin:2rem auto;"
        "padding:0 1rem;color:#222}table{border-collapse:collapse;margin:.5rem 0}"
        "th,td{border:1px solid #ccc;padding:.25rem .5rem;text-align:left;"
        "vertical-align:top}code{white-space:pre-wrap;word-break:break-all}"
        ".missing{color:#a33;font-style:italic}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>Generated {html.escape(doc['generated_at'])} from the MLflow registry and "
        "Bastion's event store; nothing in it is typed by hand.</p>",
        _section("Model", m), _section("Lineage", doc["lineage"]),
        _section("Latest robustness scan", {k: v for k, v in scan.items()
                                            if k != "robust_accuracy"}),
        robust, _section("Data audit", doc["data_audit"]),
        _section("Privacy audit", doc["privacy_audit"]),
        _section("Detector calibration", doc["calibration"]),
        _section("Gates passed", doc["gates"]),
        _section("Healing history", doc["healing"]),
        f"<section><h2>Known limits</h2><ul>{limits}</ul></section>",
        "</body></html>"])


def write_factsheet(doc: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """Write ``factsheet.json`` and ``factsheet.html`` into ``out_dir``."""
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise BastionError(f"--out {out} is a file", hint="give a folder path")
    out.mkdir(parents=True, exist_ok=True)
    pj, ph = out / "factsheet.json", out / "factsheet.html"
    pj.write_text(json.dumps(doc, indent=2, default=str), encoding="utf-8")
    ph.write_text(render_factsheet_html(doc), encoding="utf-8")
    return {"json": pj, "html": ph}


def attach_factsheet(registry: Any, doc: dict[str, Any], paths: dict[str, Path]) -> str:
    """Log the factsheet files as artifacts ``factsheet/`` of the version's MLflow run;
    return the run id."""
    run_id = doc["model"].get("run_id")
    if not run_id:
        raise BastionError(f"version {doc['model']['version']} has no MLflow run to attach "
                           "the factsheet to")
    for p in paths.values():
        registry.client.log_artifact(run_id, str(p), artifact_path="factsheet")
    return str(run_id)


def make_factsheet(model_ref: str, out_dir: str | Path, *, events_url: str | None = None,
                   tracking_uri: str | None = None, attach: bool = True
                   ) -> tuple[dict[str, Any], dict[str, Path], str | None]:
    """``bastion factsheet``: ``model_ref`` is ``NAME`` (its champion) or
    ``NAME@VERSION`` (a number or an alias); build, write into ``out_dir`` and (``attach``)
    log to the version's MLflow run. Returns ``(doc, paths, run_id or None)``.

    Raises:
        BastionError: an empty or unknown model, an unknown version, an --out that is a
            file.
    """
    from bastion.registry.models import ModelRegistry

    name, _, ref = str(model_ref).partition("@")
    name, ref = name.strip(), ref.strip() or "champion"
    if not name:
        raise BastionError("--model is empty", hint="give NAME or NAME@VERSION")
    out = Path(out_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise BastionError(f"--out {out} is a file", hint="give a folder path")
    store = ev.EventStore(events_url) if events_url else None
    try:
        reg = ModelRegistry(name, tracking_uri=tracking_uri, store=store)
        if not reg.versions():
            raise BastionError(f"no registered model {name!r} (or it has no versions)",
                               hint="bastion models list --model NAME shows what is there")
        doc = build_factsheet(reg, ref, store=store)
        paths = write_factsheet(doc, out)
        run_id = attach_factsheet(reg, doc, paths) if attach else None
        return doc, paths, run_id
    finally:
        if store is not None:
            store.close()
