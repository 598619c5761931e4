"""``--help`` a person reads: full option names at 80 columns, INTEGER/FLOAT/TEXT/PATH/A,B,C
metavars, flags without one (issue 15, section 5)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from bastion.cli.main import get_command, run


def _commands(cmd, path=()):
    subs = getattr(cmd, "commands", None) or {}
    if not subs:
        yield path, cmd
    for name, sub in subs.items():
        yield from _commands(sub, (*path, name))


def test_guard_llm_help_at_80_columns_in_a_real_process():
    p = subprocess.run([sys.executable, "-m", "bastion.cli", "guard-llm", "--help"],
                       capture_output=True, text=True, timeout=60,
                       env={**os.environ, "COLUMNS": "80", "TERMINAL_WIDTH": "80"})
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for name in ("--system-prompt-overlap", "--events-url", "--torch-threads",
                 "--api-key-env", "--tracking-uri"):
        assert name in out
    assert "--system-prompt-overlap FLOAT" in out and "--torch-threads INTEGER" in out
    assert "--detector PATH" in out and "--upstream TEXT" in out
    assert "…" not in out and "<bool>" not in out and "<str>" not in out
    assert max(len(line) for line in out.splitlines()) <= 80


def test_every_command_help_names_every_option_in_full(monkeypatch, capsys):
    monkeypatch.setenv("COLUMNS", "80")
    root = get_command()
    seen = 0
    for path, cmd in _commands(root):
        assert run([*path, "--help"]) == 0
        out = capsys.readouterr().out
        for param in cmd.params:
            for opt in (*param.opts, *param.secondary_opts):
                assert opt in out, f"{' '.join(path)}: {opt} missing from --help"
            mv = param.metavar
            if getattr(param, "is_flag", False):
                assert mv == "", (path, param.name)
        for bad in ("<bool>", "<list[", "range>", "<str>", "<int>", "<float>", "…"):
            assert bad not in out, f"{' '.join(path)} --help shows {bad}"
        seen += 1
    assert seen >= 15


@pytest.mark.parametrize("path,opt,metavar", [
    (["scan"], "--eps", "A,B,C"), (["scan"], "--limit", "INTEGER"),
    (["scan"], "--out", "PATH"), (["audit", "data"], "--budget", "FLOAT"),
])
def test_metavars(path, opt, metavar, capsys):
    assert run([*path, "--help"]) == 0
    assert f"{opt} {metavar}" in capsys.readouterr().out


def test_arguments_show_their_name_not_a_type():
    """Positional arguments read as their name (PREFIX, CLIENT), never as ``<str>``."""
    for argv, name in ((["keys", "revoke", "--help"], "PREFIX"),
                       (["quarantine", "lift", "--help"], "CLIENT")):
        p = subprocess.run([sys.executable, "-m", "bastion.cli", *argv], capture_output=True,
                           text=True, timeout=60, env={**os.environ, "COLUMNS": "80"})
        assert p.returncode == 0, p.stderr
        assert name in p.stdout and "<str>" not in p.stdout, p.stdout
