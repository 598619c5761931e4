"""The demo report leads with the story in plain words and the plots, links the scan
reports and keeps the raw outcome table last (issue 15, section 5)."""

from __future__ import annotations

import re

from bastion.demo import DemoReport, PhaseResult, _render_html


def _report() -> DemoReport:
    phase = PhaseResult(name="poisoned_feedback", description="feedback", requests=10,
                        inputs=100,
                        verdicts={"allow": 98, "flag": 2}, answered_by={"champion": 100},
                        by_client={"alice": {"allow": 98, "flag": 2}})
    outcomes = {
        "evasion_client_quarantined": True, "extraction_client_quarantined": False,
        "benign_clients_quarantined": [], "evasion_flagged_share": 0.9,
        "extraction_flagged_share": 0.2, "clean_flagged_share": 0.02, "drift_alerted": True,
        "fallback_switches": 1, "retrains_attempted": 2, "retrains_promoted": 1,
        "retrains_refused": 1, "poisoned_labels": 120, "poison_agreement_before": 0.05,
        "poison_agreement_after": 0.06, "final_champion": 3,
        "final_aliases": {"champion": 3}, "holdout_accuracy_initial_champion": 0.97,
        "holdout_accuracy_final_champion": 0.96,
    }
    scans = {"baseline": {"clean_accuracy": 0.97, "robust_accuracy": {"0.1": 0.1}},
             "hardened": {"clean_accuracy": 0.95, "robust_accuracy": {"0.1": 0.7}}}
    return DemoReport(seed=0, fast=True, model_name="bastion-demo",
                      versions={"baseline": 1, "hardened": 2, "fallback": 1}, scans=scans,
                      phases=[phase], alias_history=[], timeline=[], outcomes=outcomes,
                      files={"json": "report.json"}, time_s=12.0)


def test_story_first_raw_table_last():
    html = _render_html(_report(), {})
    story = html[html.index("What happened"):html.index("<h2>", html.index("What happened"))]
    text = re.sub(r"<[^>]+>", " ", story)
    # plain words: no snake_case keys, no Python literals
    assert not re.search(r"\b[a-z]+_[a-z_]+\b", text), text
    assert "True" not in text and "[]" not in text and "{" not in text
    assert "(mallory) was quarantined" in text and "(eve) was NOT quarantined" in text
    assert "No honest client was quarantined" in text
    assert "at eps=0.1 it classified 10% of the attacked inputs" in text and "70%" in text
    assert "poisoned feedback" in text
    assert "the poison did not get in" in text
    # order: story, plots, scans (linked), ..., raw table last
    i_story, i_plot = html.index("What happened"), html.index("data:image/png;base64,")
    i_scan, i_raw = html.index("Red team and hardening"), html.index("All numbers")
    assert i_story < i_plot < i_scan < i_raw
    assert 'href="scans/baseline/report.html"' in html
    assert 'href="scans/hardened/report.html"' in html
    assert html.index("evasion_client_quarantined") > i_raw
