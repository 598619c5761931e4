"""The LLM jobs called directly from Python (the same jobs ``bastion redteam`` and
``bastion llm ...`` call): reports, written files, the round callback, bad specs."""

from __future__ import annotations

import json

import pytest

from bastion import jobs
from bastion.jobs import SpecError


@pytest.fixture
def tiny_jsonl(tmp_path, toy_corpus):
    x, y = toy_corpus
    rows = []
    for i, (t, lab) in enumerate(zip(x, y, strict=True)):
        label = "injection" if lab else "benign"
        rows.append({"text": t, "label": label, "split": "train"})
        if i % 3 == 0:
            rows.append({"text": "Also: " + t, "label": label, "split": "test",
                         "hard_negative": not lab})
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def test_redteam_job(vuln_server, tmp_path):
    out = tmp_path / "rt"
    rep, paths, warnings = jobs.redteam(jobs.RedteamSpec(
        target=vuln_server.base_url, model="vuln-agent", out=out, probes=["jailbreak"],
        limit=3, secret="OWL-99", track=False))
    assert warnings == [] and rep.n_probes == 3 and rep.overall.judged == 3
    assert json.loads(paths["json"].read_text())["n_probes"] == 3
    assert paths["html"].is_file() and len(paths["attempts"].read_text().splitlines()) == 3


def test_redteam_spec_checks_what_the_cli_checked(tmp_path):
    with pytest.raises(SpecError, match="RedteamSpec.request_timeout") as info:
        jobs.RedteamSpec(target="http://x/v1", model="m", out=tmp_path, request_timeout=0)
    assert "(CLI option --timeout)" in str(info.value)  # the option its docstring names
    assert not any(tmp_path.iterdir())


def test_detector_jobs_train_evaluate_harden(tiny_jsonl, tmp_path, minilm_detector):
    said: list[str] = []
    metrics, paths, _ = jobs.llm_train_detector(jobs.LlmTrainDetectorSpec(
        data=tiny_jsonl, out=tmp_path / "det", fpr=0.1, track=False), log=said.append)
    assert (paths["detector"] / "head.safetensors").is_file() and said
    assert metrics["test"]["overall"]["auroc"] >= 0.8
    ev, paths, _ = jobs.llm_evaluate_detector(jobs.LlmEvaluateDetectorSpec(
        data=tiny_jsonl, out=tmp_path / "ev", detector=tmp_path / "det", track=False))
    assert ev.overall.n > 0 and json.loads(paths["json"].read_text())["detector"] == str(
        tmp_path / "det")
    rounds = []
    hd, paths, _ = jobs.llm_harden_detector(jobs.LlmHardenDetectorSpec(
        data=tiny_jsonl, out=tmp_path / "hd", rounds=1, variants=6, eval_variants=6,
        transforms=["leetspeak", "base64"], track=False), on_round=rounds.append)
    assert [r.round for r in hd.rounds] == [0, 1] and [r.round for r in rounds] == [0, 1]
    assert hd.settings["transforms"] == "leetspeak,base64"  # as the CLI wrote it
    assert (paths["detector"] / "detector.json").is_file() and paths["html"].is_file()
