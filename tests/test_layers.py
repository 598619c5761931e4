"""The layer rules of docs/ARCHITECTURE.md, checked on the source: every ``import
bastion.X`` (at the top of a module or inside a function) points down.

A new upward import fails here with the file and the import named, e.g. a ``registry``
module reaching into ``runtime`` for the event store (it lives in ``bastion.store``).
"""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "bastion"

#: The ground floor: what any layer may import.
GROUND = {"errors", "_util", "_ray", "engine", "envinfo", "reporting", "store",
          "__version__", "__init__"}

_BELOW_DEFEND = {"attacks", "evaluate", "models", "data"}
#: package -> the Bastion packages it may import besides itself and :data:`GROUND`.
ALLOWED: dict[str, set[str] | None] = {
    "errors": set(),
    "store": set(),  # imports errors only (checked below)
    "_util": set(),
    "_ray": set(),  # connect to a Ray cluster (one place for every Ray user)
    "engine": set(),  # where parallel work runs (local or Ray): imports errors only
    "reporting": set(),
    "envinfo": set(),  # machine facts for reports (CPU, torch, threads): imports nothing
    "data": set(),
    "models": {"data"},
    "registry": {"models", "data"},
    "attacks": {"models", "data"},
    "detect": {"models", "data"},
    "evaluate": {"attacks", "models", "data"},
    "defend": _BELOW_DEFEND,
    "audit": _BELOW_DEFEND | {"defend", "detect", "registry"},
    "web": set(),
    "llm": {"detect", "registry", "models", "data", "web"},
    "runtime": _BELOW_DEFEND | {"defend", "detect", "registry"},
    "service": _BELOW_DEFEND | {"defend", "detect", "registry", "runtime", "web", "llm"},
    # the job layer: whole jobs from spec to report, for the CLI and Python users
    "jobs": _BELOW_DEFEND | {"defend", "detect", "registry", "runtime", "audit", "llm"},
    "demo": None,  # top: may import anything
    "cli": None,
}


#: The one module a lower layer may import from a higher package: the offline MiniLM
#: sentence encoder is a leaf (it imports only the ground floor, checked below), shared by
#: the text attacks and text models with the prompt-injection detector.
LEAF_MODULES = {"bastion.llm.embed"}


def _modules(path: Path) -> list[tuple[int, str]]:
    """``(line, full module name)`` for every absolute ``bastion.`` import."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.append((node.lineno, node.module))
    return [(ln, n) for ln, n in out if n.startswith("bastion.")]


def _imports(path: Path) -> list[tuple[int, str]]:
    """``(line, top-level bastion package)`` for every absolute ``bastion.`` import."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "bastion":  # from bastion import jobs / __version__
                names = [f"bastion.{a.name}" for a in node.names]
            else:
                names = [node.module]
        out += [(node.lineno, n.split(".")[1]) for n in names
                if n.startswith("bastion.") and n.count(".") >= 1]
    return out


def _package(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def test_every_package_has_a_rule():
    pkgs = {_package(p) for p in SRC.rglob("*.py")} - {"__init__"}
    assert pkgs <= set(ALLOWED), f"add a layer rule for {sorted(pkgs - set(ALLOWED))}"


def test_imports_point_down():
    bad = []
    for path in sorted(SRC.rglob("*.py")):
        pkg = _package(path)
        allowed = ALLOWED.get(pkg)
        if allowed is None:
            continue
        if path.relative_to(SRC).as_posix() == "runtime/events.py":
            continue  # the deprecated alias of bastion.store.events
        leaf_lines = {ln for ln, m in _modules(path) if m in LEAF_MODULES}
        for line, target in _imports(path):
            if line in leaf_lines:
                continue
            ok = target == pkg or target in allowed or (
                target in GROUND and (pkg not in {"store", "errors"} or target == "errors"))
            if not ok:
                bad.append(f"{path.relative_to(SRC)}:{line}: {pkg} imports {target}")
    assert not bad, "upward imports (see docs/ARCHITECTURE.md):\n" + "\n".join(bad)


def test_the_leaf_modules_import_only_the_ground_floor():
    for mod in LEAF_MODULES:
        path = SRC.joinpath(*mod.split(".")[1:]).with_suffix(".py")
        targets = {t for _, t in _imports(path)}
        assert targets <= GROUND - {"store"}, f"{mod} imports {sorted(targets - GROUND)}"


def test_the_checker_sees_an_upward_import(tmp_path):
    """Attack the check itself: a lazy import inside a function is still caught."""
    f = tmp_path / "x.py"
    f.write_text("def f():\n    from bastion.runtime.events import EventStore\n")
    assert _imports(f) == [(2, "runtime")]
    f.write_text("from bastion import jobs\nimport bastion.store.events\n")
    assert _imports(f) == [(1, "jobs"), (2, "store")]


def test_the_old_event_store_path_is_the_same_module():
    import bastion.runtime.events as old
    from bastion.store import events as new

    assert old is new and old.EventStore is new.EventStore
    from bastion.runtime import EventStore

    assert EventStore is new.EventStore
