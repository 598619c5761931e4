"""No language as evidence: the shipped detector flags benign text in each of the 17
languages of ``benign-multilingual`` (its test split, never trained on) at no more than
the rate at which it flags the corpus's English benign test rows, plus a tolerance of one
text per language (a language has 23-75 test rows, so one text is 1.3-4.3 points)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from bastion.llm.datasets import load_prompt_jsonl


@pytest.fixture(scope="module")
def benign_sets(pi_dir):  # type: ignore[no-untyped-def]
    ml_path = pi_dir.parent / "benign-multilingual" / "prompts.jsonl"
    if not ml_path.exists():
        raise AssertionError(f"benign-multilingual not found at {ml_path} (set BASTION_SHARED)")
    english = [r for r in load_prompt_jsonl(pi_dir / "prompts.jsonl", split="test") if r.y == 0]
    english = english[::3]  # a third of the 1,135 rows (every third, all sources) for speed
    ml = load_prompt_jsonl(ml_path, split="test")
    return english, ml


def test_benign_text_in_every_language_is_flagged_no_more_than_english(
    minilm_detector, benign_sets
) -> None:
    det = minilm_detector
    english, ml = benign_sets
    en_rate = float(np.mean(det.predict([r.text for r in english])))
    flagged = det.predict([r.text for r in ml])
    langs = sorted({r.lang for r in ml if r.lang})
    assert len(langs) == 17
    over = {}
    for lang in langs:
        m = np.array([r.lang == lang for r in ml])
        n, k = int(m.sum()), int(flagged[m].sum())
        allowed = math.floor(en_rate * n) + 1  # the English rate plus one text
        if k > allowed:
            over[lang] = f"{k}/{n} flagged (allowed {allowed})"
    assert not over, f"English benign flagged {en_rate:.2%}; over it: {over}"


def test_shipped_detector_metadata_records_recipe_and_loso() -> None:
    import json
    from importlib import resources

    base = resources.files("bastion.llm") / "data" / "detector"
    meta = json.loads((base / "detector.json").read_text(encoding="utf-8"))
    p = meta["params"]
    assert p["stats_version"] == 2 and p["ngram_blocks"] == ["word"]
    m = meta["meta"]
    assert m["recipe"].startswith("v2")
    # the leave-one-source-out numbers it was chosen on travel with it
    assert 0.5 < m["loso_macro_auroc"] <= 1 and m["loso_n_sources"] >= 15
    notice = (base / "NOTICE").read_text(encoding="utf-8")
    for src in ("agentdojo", "tau2-bench", "tldr", "Tatoeba", "MGSM", "CC-BY 2.0 FR"):
        assert src in notice
