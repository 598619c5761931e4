"""Text data: text-csv, jsonl (columns configurable) and CLINC150; bad files in one line."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bastion.data import load_data
from bastion.errors import DataError

# tests/conftest.py sets BASTION_SHARED (default: ../shared beside the repository)
CLINC = Path(os.environ["BASTION_SHARED"]) / "datasets" / "clinc150" / "data_full.json"

ROWS = [("book a flight to paris", "travel"), ("play some jazz", "music"),
        ("what is the weather", "weather")] * 8


def test_jsonl_with_custom_columns(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"q": t, "intent": lab, "x": 1}) for t, lab in ROWS))
    ds = load_data(f"jsonl:{p}?text=q&label=intent")
    assert ds.kind == "text" and ds.n_classes == 3
    assert ds.class_names == ["music", "travel", "weather"]
    assert len(ds.x_train) + len(ds.x_test) == len(ROWS)
    for t, y in zip(ds.x_train, ds.y_train, strict=True):
        assert dict(ROWS)[t] == ds.class_names[y]


def test_text_csv_and_label_column_option(tmp_path):
    p = tmp_path / "d.csv"
    p.write_text("text,topic\n" + "\n".join(f'"{t}",{lab}' for t, lab in ROWS))
    ds = load_data(f"text-csv:{p}", label_column="topic")
    assert ds.n_classes == 3 and isinstance(ds.x_test[0], str)


@pytest.mark.parametrize("spec_suffix,match", [
    ("?label=intent", "label column 'intent'"),
    ("?text=body", "text column 'body'"),
    ("?colour=red", "unknown option"),
])
def test_missing_columns_are_one_line(tmp_path, spec_suffix, match):
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps({"text": t, "label": lab}) for t, lab in ROWS))
    for scheme, path in (("jsonl", p),):
        with pytest.raises(DataError, match=match) as ei:
            load_data(f"{scheme}:{path}{spec_suffix}")
        assert "\n" not in ei.value.message and ei.value.hint
    c = tmp_path / "d.csv"
    c.write_text("text,label\n" + "\n".join(f"{t},{lab}" for t, lab in ROWS))
    if "label column" in match:
        with pytest.raises(DataError, match=match):
            load_data(f"text-csv:{c}{spec_suffix}")


def test_bad_lines(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"text": "a", "label": "x"}\nnot json\n')
    with pytest.raises(DataError, match="line 2 is not JSON"):
        load_data(f"jsonl:{p}")
    p.write_text('{"text": "", "label": "x"}\n{"text": "b", "label": "y"}\n')
    with pytest.raises(DataError, match="empty or non-text"):
        load_data(f"jsonl:{p}")
    p.write_bytes(b'{"text": "\xff", "label": "x"}\n')
    with pytest.raises(DataError, match="UTF-8"):
        load_data(f"jsonl:{p}")
    with pytest.raises(DataError, match="not found"):
        load_data(f"jsonl:{tmp_path}/none.jsonl")


@pytest.mark.skipif(not CLINC.is_file(), reason="CLINC150 not in shared/datasets")
def test_clinc150():
    ds = load_data(f"clinc150:{CLINC}")
    assert ds.n_classes == 151 and ds.class_names[-1] == "oos"
    assert len(ds.x_train) == 15100 and len(ds.x_test) == 5500
    small = load_data(f"clinc150:{CLINC}?intents=5&oos=0")
    assert small.n_classes == 5 and len(small.x_train) == 500 and len(small.x_test) == 150
    with pytest.raises(DataError, match="not a number"):
        load_data(f"clinc150:{CLINC}?intents=many")


def test_clinc_wrong_file(tmp_path):
    p = tmp_path / "x.json"
    p.write_text('{"rows": []}')
    with pytest.raises(DataError, match="train and test"):
        load_data(f"clinc150:{p}")


def test_own_split_column(tmp_path):
    rows = [{"text": f"{t} {i}", "label": lab, "part": part}
            for i, ((t, lab), part) in enumerate(zip(ROWS, ["train", "test", "validation"] * 8,
                                                     strict=True))]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    ds = load_data(f"jsonl:{p}?split=part")
    want = {r["text"]: r["part"] for r in rows}
    assert sorted(want[t] for t in ds.x_train) == ["train"] * 8
    assert sorted(want[t] for t in ds.x_test) == ["test"] * 8  # validation rows left out
    assert ds.meta["split_column"] == "part"
    c = tmp_path / "d.csv"
    c.write_text("text,label,part\n" + "\n".join(f"{r['text']},{r['label']},{r['part']}"
                                                 for r in rows))
    assert len(load_data(f"text-csv:{c}?split=part").x_test) == 8


@pytest.mark.parametrize("parts,match", [
    (["train"] * 24, "0 test rows"),
    (["test"] * 24, "0 train"),
    (None, "split column 'part' missing"),
])
def test_own_split_column_mistakes_are_one_line(tmp_path, parts, match):
    rows = [{"text": t, "label": lab} | ({"part": parts[i]} if parts else {})
            for i, (t, lab) in enumerate(ROWS)]
    p = tmp_path / "d.jsonl"
    p.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(DataError, match=match) as ei:
        load_data(f"jsonl:{p}?split=part")
    assert "\n" not in ei.value.message and ei.value.hint
    c = tmp_path / "d.csv"
    c.write_text("text,label\n" + "\n".join(f"{t},{lab}" for t, lab in ROWS))
    with pytest.raises(DataError, match="split column 'part' not in"):
        load_data(f"text-csv:{c}?split=part")
