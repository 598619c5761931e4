"""The Prometheus alerting rules Bastion ships, checked by Prometheus' own ``promtool``
(Debian's ``prometheus`` package): the file is valid, its unit tests pass, every metric
it uses is one the service exports, and a broken rule or a wrong expectation fails."""

from __future__ import annotations

import re
import shutil
import subprocess
from importlib import resources
from pathlib import Path

import pytest

PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
UNIT_TESTS = Path(__file__).parent / "promtool" / "bastion-rules.test.yml"
pytestmark = pytest.mark.skipif(not Path(PROMTOOL).exists(),
                                reason="promtool not installed (apt-get install prometheus)")


def rules_path() -> Path:
    return Path(str(resources.files("bastion.service") / "alerts" / "bastion-rules.yml"))


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60)


def unit_file(tmp_path: Path, rules: Path, text: str | None = None) -> Path:
    p = tmp_path / "bastion-rules.test.yml"
    p.write_text(f"rule_files:\n  - {rules}\n" + (text or UNIT_TESTS.read_text()))
    return p


def test_rules_file_is_valid_and_its_unit_tests_pass(tmp_path):
    r = promtool("check", "rules", str(rules_path()))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS: 9 rules found" in r.stdout
    r = promtool("test", "rules", str(unit_file(tmp_path, rules_path())))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout


def test_every_metric_in_the_rules_is_exported_by_the_service():
    from bastion.service.metrics import ServiceMetrics

    m = ServiceMetrics()
    m.predictions.labels("allow", "champion").inc()
    m.monitor_fired.labels("input_drift").set(0)
    m.model_changes.labels("quarantine").inc()
    m.deliveries.labels("r", "failed").inc()
    exported = {line.split("{")[0].split(" ")[0]
                for line in m.render().decode().splitlines() if not line.startswith("#")}
    used = set(re.findall(r"\b(bastion_[a-z_]+)", rules_path().read_text()))
    assert used and used <= exported, used - exported


def test_promtool_catches_a_broken_rule_and_a_wrong_expectation(tmp_path):
    bad = tmp_path / "bad.yml"
    bad.write_text(rules_path().read_text().replace("> 0.2", "> > 0.2", 1))
    r = promtool("check", "rules", str(bad))
    assert r.returncode != 0 and "FAILED" in (r.stdout + r.stderr)
    wrong = UNIT_TESTS.read_text().replace("severity: critical, job: bastion, instance: a}",
                                           "severity: info, job: bastion, instance: a}", 1)
    r = promtool("test", "rules", str(unit_file(tmp_path, rules_path(), wrong)))
    assert r.returncode != 0 and "FAILED" in (r.stdout + r.stderr)


def test_cli_prints_the_rules(tmp_path, capsys):
    from bastion.cli.main import run

    assert run(["alert-rules"]) == 0
    out = tmp_path / "bastion.yml"
    out.write_text(capsys.readouterr().out)
    assert out.read_text() == rules_path().read_text()
    r = promtool("check", "rules", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
