"""The dashboard in a real headless Chromium (Debian's chromium, driven by Playwright)
against a real uvicorn server on 127.0.0.1: the page asks for an API key (kept in the
tab's sessionStorage) and shows no data without one, the charts render with the data the
API returns for a reader key, a rollback needs an admin key and moves the champion, and
an admin lifts a quarantine from the page."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import numpy as np
import pytest

CHROMIUM = Path(os.environ.get("BASTION_CHROMIUM", "/usr/bin/chromium"))
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
TOKEN = "dashboard-admin-token-0123456789abcdef"
NAME = "svc-browser"


def clean_batch(digits, n: int, start: int = 0) -> list:
    """n clean test digits as nested lists."""
    return np.asarray(digits.x_test[start:start + n]).tolist()

pytestmark = [
    pytest.mark.skipif(
        not CHROMIUM.exists(),
        reason=f"{CHROMIUM} is absent: install Debian's chromium "
               "(apt-get update && apt-get install -y chromium)"),
    # one tab for the module, in order (a test reuses the key the one before typed in):
    # one xdist worker runs them all (test.sh distributes with --dist loadgroup)
    pytest.mark.xdist_group("browser"),
]


@pytest.fixture(scope="module")
def live(svc_models, svc_mlflow, tmp_path_factory, digits, make_config, make_keys):
    from bastion.registry.models import ModelRegistry
    from bastion.service.app import create_app
    from bastion.service.server import ServiceThread

    m1, m2 = svc_models
    d = tmp_path_factory.mktemp("svc-browser")
    cfg = make_config(m1, d / "events.db", svc_mlflow, model_name=NAME, admin_token=TOKEN)
    keys = make_keys(cfg.events_url, alice="client", mallory="client", viewer="reader",
                     ops="admin")
    app = create_app(cfg)
    svc = app.state.service
    reg = ModelRegistry(NAME, tracking_uri=svc_mlflow)
    v2 = reg.register(m2, tags={"bastion.source": "browser test"})
    saved = os.environ.pop("BASTION_ADMIN_TOKEN", None)
    try:
        with ServiceThread(app) as st, httpx.Client(
                base_url=st.url, timeout=60,
                headers={"Authorization": f"Bearer {keys['ops']}"}) as c:
            # traffic: clean, then noisy inputs from one client (flagged), feedback
            for i in range(6):
                r = c.post("/v1/predict", json={"inputs": clean_batch(digits, 20, 20 * i)},
                           headers={"Authorization": f"Bearer {keys['alice']}"})
                assert r.status_code == 200
                fb = [{"request_id": rid, "label": int(y)} for rid, y in
                      zip(r.json()["request_ids"], digits.y_test[20 * i:20 * i + 20],
                          strict=True)]
                assert c.post("/v1/feedback", json={"feedback": fb}, headers={
                    "Authorization": f"Bearer {keys['alice']}"}).status_code == 200
            rng = np.random.default_rng(0)
            noisy = rng.uniform(0, 1, size=(30, 1, 8, 8)).tolist()
            assert c.post("/v1/predict", json={"inputs": noisy}, headers={
                "Authorization": f"Bearer {keys['mallory']}"}).status_code == 200
            svc.heal_once()
            c.post("/v1/predict", json={"inputs": clean_batch(digits, 10, 200)})
            svc.heal_once()
            auth = {"Authorization": f"Bearer {TOKEN}"}
            assert c.post("/v1/models/promote", json={"version": v2}, headers=auth
                          ).status_code == 200
            svc.guard.quarantine("mallory", reason="browser test")
            yield st.url, c, v2, keys
    finally:
        if saved is not None:
            os.environ["BASTION_ADMIN_TOKEN"] = saved


@pytest.fixture(scope="module")
def page(live):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS, headless=True)
        try:
            pg = browser.new_page()
            errors: list[str] = []
            pg.on("pageerror", lambda e: errors.append(str(e)))
            pg.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            pg.errors = errors  # type: ignore[attr-defined]
            yield pg
        finally:
            browser.close()


def _points(data: dict, key: str) -> int:
    return sum(1 for s in data[key] for p in s["points"] if p["v"] is not None)


def test_page_loads_and_charts_render_the_data(live, page):
    url, c, v2, keys = live
    # without a key the page shows no data and says what it needs
    page.goto(f"{url}/dashboard")
    from playwright.sync_api import expect

    expect(page.locator("#auth-note")).to_be_visible(timeout=20_000)
    expect(page.locator("#status")).to_contain_text("needs an API key", timeout=20_000)
    assert page.get_attribute("body", "data-loaded") is None
    assert page.locator("#versions tr").count() == 0
    # a client key may not read it either
    page.fill("#api-key", keys["alice"])
    page.click("#key-btn")
    expect(page.locator("#status")).to_contain_text("may not read", timeout=20_000)
    # compare the charts with the data the page itself drew (time buckets depend on the
    # moment of the request, so a second fetch may bucket the same events differently)
    page.fill("#api-key", keys["viewer"])
    with page.expect_response(lambda r: "/v1/dashboard/data" in r.url and r.ok) as got:
        page.click("#key-btn")
    page.wait_for_selector("body[data-loaded]", timeout=20_000)
    expect(page.locator("#auth-note")).to_be_hidden()
    assert page.input_value("#api-key") == ""  # not left in the field
    assert page.title() == "Bastion dashboard"
    assert page.text_content("#champion") == f"v{v2}"
    assert page.text_content("#status") == "ok"
    data = got.value.json()
    for chart, key in [("traffic-chart", "traffic"), ("drift-chart", "drift"),
                       ("accuracy-chart", "accuracy")]:
        n = _points(data, key)
        assert n > 0, key
        svg_n = page.locator(f"#{chart} circle.pt").count()
        assert svg_n == n, (chart, svg_n, n)
        assert int(page.get_attribute(f"#{chart}", "data-points")) == n
        series = {s["name"] for s in data[key] if any(p["v"] is not None for p in s["points"])}
        assert page.locator(f"#{chart} path.line").count() == len(series)
        d = page.get_attribute(f"#{chart} path.line", "d")
        assert d and d.startswith("M") and "NaN" not in d
    # the flagged traffic shows up as a non-zero flag series
    flags = page.locator('#traffic-chart circle.pt[data-series="flag"]').count()
    assert flags == len(next(s for s in data["traffic"] if s["name"] == "flag")["points"])
    assert int(page.get_attribute("#versions", "data-rows")) == len(data["models"]["versions"])
    assert int(page.get_attribute("#timeline", "data-rows")) == len(data["healing"]) > 0
    assert "champion" in page.text_content("#versions")
    # the quarantined client is listed with a lift button (the reader's click would be
    # refused: the next tests lift it with an admin key)
    assert page.locator('#quarantined button[data-client="mallory"]').count() == 1
    # only the refused fetches (no key, then a client key) show as failed resources
    errs = [e for e in page.errors  # type: ignore[attr-defined]
            if "status of 401" not in e and "status of 403" not in e]
    assert not errs, errs
    page.errors.clear()  # type: ignore[attr-defined]


def test_rollback_from_the_page(live, page):
    url, c, v2, keys = live
    page.goto(f"{url}/dashboard")  # the reader key is still in this tab's sessionStorage
    page.wait_for_selector("body[data-loaded]", timeout=20_000)
    assert c.get("/v1/models").json()["aliases"]["champion"] == v2
    # a reader key is refused and nothing moves
    page.click("#rollback-btn")
    page.wait_for_selector("#rollback-result.err", timeout=20_000)
    assert "403" in page.text_content("#rollback-result")
    assert c.get("/v1/models").json()["aliases"]["champion"] == v2
    # an admin key rolls back to previous
    page.fill("#api-key", keys["ops"])
    page.click("#key-btn")
    page.click("#rollback-btn")
    page.wait_for_selector("#rollback-result.ok", timeout=30_000)
    assert "champion is now v1" in page.text_content("#rollback-result")
    m = c.get("/v1/models").json()
    assert m["aliases"]["champion"] == 1 and m["aliases"]["previous"] == v2
    assert any(h["reason"].endswith("rolled back from the dashboard") for h in m["history"])
    # a locator assertion, not wait_for_function: the page's CSP forbids eval, which
    # Playwright's string predicates need
    from playwright.sync_api import expect

    expect(page.locator("#champion")).to_have_text("v1", timeout=20_000)
    # only the refused requests may show as failed resources (the browser logs them)
    errs = [e for e in page.errors  # type: ignore[attr-defined]
            if "status of 401" not in e and "status of 403" not in e]
    assert not errs, errs


def test_lift_a_quarantine_from_the_page(live, page):
    url, c, _, keys = live
    page.goto(f"{url}/dashboard")  # the admin key from the test before
    page.wait_for_selector("body[data-loaded]", timeout=20_000)
    from playwright.sync_api import expect

    button = page.locator('#quarantined button[data-client="mallory"]')
    expect(button).to_be_visible(timeout=20_000)
    button.click()
    page.wait_for_selector("#lift-result.ok", timeout=20_000)
    assert "mallory" in page.text_content("#lift-result")
    assert c.get("/v1/clients/quarantined").json()["quarantined"] == []
    expect(page.locator('#quarantined button[data-client="mallory"]')).to_have_count(
        0, timeout=20_000)
    ev = c.get("/v1/events", params={"kind": "audit", "client_id": "mallory"}).json()
    assert any(e["payload"].get("action") == "lift_quarantine" for e in ev["events"])


def test_factsheet_from_the_page(live, page):
    url, c, v2, keys = live
    page.goto(f"{url}/dashboard")
    page.fill("#api-key", keys["viewer"])
    page.click("#key-btn")
    page.wait_for_selector("button.factsheet[data-version='1']", timeout=20_000)
    page.click("button.factsheet[data-version='1']")
    page.wait_for_selector("#factsheet[data-version='1']", timeout=60_000)
    assert page.text_content("#fs-title") == f"Factsheet: {NAME} v1"
    facts = page.text_content("#fs-facts")
    # the service calibrated the detectors for v1; nobody scanned or audited it here
    assert "target FPR 0.01" in facts and "not recorded" in facts
    assert "privacy" in page.text_content("#fs-limits")
    errs = [e for e in page.errors  # type: ignore[attr-defined]
            if "status of 401" not in e and "status of 403" not in e]
    assert not errs, errs


def test_flagged_input_attributions_beside_their_nearest_reference(live, page):
    url, c, v2, keys = live
    noisy = np.random.default_rng(5).uniform(0, 1, size=(2, 1, 8, 8)).tolist()
    r = c.post("/v1/predict", json={"inputs": noisy, "explain": True},
               headers={"Authorization": f"Bearer {keys['alice']}"})
    assert r.status_code == 200, r.text
    assert set(r.json()["verdicts"]) != {"allow"}
    page.goto(f"{url}/dashboard")
    page.fill("#api-key", keys["viewer"])
    page.click("#key-btn")
    page.wait_for_selector("#explanations .explained", timeout=30_000)
    row = page.locator("#explanations .explained").first
    # three heat maps: the flagged input's attribution, the nearest clean reference and
    # the reference's attribution, 8 x 8 cells each
    maps = row.locator("svg.heat")
    assert maps.count() == 3
    assert [maps.nth(i).locator("rect").count() for i in range(3)] == [64, 64, 64]
    caption = row.text_content()
    assert "nearest clean reference" in caption and "integrated_gradients" in caption
    errs = [e for e in page.errors  # type: ignore[attr-defined]
            if "status of 401" not in e and "status of 403" not in e]
    assert not errs, errs


# ---------------------------------------------------------------- a text model's words

TINY_WORDS = ["book", "a", "flight", "to", "paris", "play", "some", "music", "what", "is",
              "the", "weather", "today", "good", "bad"]


@pytest.fixture(scope="module")
def text_live(svc_mlflow, tmp_path_factory, make_config, make_keys):
    """A text service on loopback: a tiny untrained BERT (2 layers, hidden 16, the 15-word
    vocabulary) built from a config, 120 reference sentences, the outlier detector on the
    model's own features."""
    import json
    import random

    import torch

    pytest.importorskip("transformers")
    from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

    from bastion.service.app import create_app
    from bastion.service.server import ServiceThread

    d = tmp_path_factory.mktemp("svc-browser-text")
    folder = d / "tiny-bert"
    folder.mkdir()
    (folder / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + TINY_WORDS) + "\n")
    tok = BertTokenizerFast(vocab=str(folder / "vocab.txt"))
    torch.manual_seed(0)
    labels = ["travel", "music", "weather"]
    cfg = BertConfig(vocab_size=20, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, num_labels=3,
                     id2label=dict(enumerate(labels)),
                     label2id={v: k for k, v in enumerate(labels)})
    BertForSequenceClassification(cfg).save_pretrained(str(folder))
    tok.save_pretrained(str(folder))
    r = random.Random(0)
    topics = {"travel": "book a flight to paris", "music": "play some music",
              "weather": "what is the weather today"}
    rows = []
    for i in range(120):
        label = labels[i % 3]
        words = topics[label].split()
        words.insert(r.randrange(len(words) + 1), r.choice(["good", "bad", "today"]))
        rows.append({"text": " ".join(words), "label": label})
    (d / "ref.jsonl").write_text("\n".join(json.dumps(x) for x in rows))
    cfg = make_config(f"hf:{folder}", d / "events.db", svc_mlflow,
                      reference=f"jsonl:{d / 'ref.jsonl'}", model_name="svc-browser-text",
                      reference_limit=120, text_embedder="model")
    keys = make_keys(cfg.events_url, alice="client", viewer="reader", ops="admin")
    with ServiceThread(create_app(cfg)) as st, httpx.Client(base_url=st.url, timeout=60) as c:
        yield st.url, c, keys


def _rgba(style: str) -> tuple[int, int, int, float]:
    import re

    m = re.search(r"background-color:\s*rgba?\(([^)]*)\)", style or "")
    assert m, style
    parts = [float(v) for v in m.group(1).split(",")]
    return int(parts[0]), int(parts[1]), int(parts[2]), parts[3] if len(parts) > 3 else 1.0


def test_text_explanation_as_coloured_words(text_live, page):
    """A flagged text's explanation: the reference text's words and the flagged text's
    places in word spans coloured by attribution; the client's words only after an admin
    asks for them (a reader's ask is refused)."""
    from playwright.sync_api import expect

    url, c, keys = text_live
    texts = ["zq!x 9#kv ~~ plm", "qqq rrr sss ttt uuu", "book a flight to paris"]
    r = c.post("/v1/predict", json={"inputs": texts, "explain": True},
               headers={"Authorization": f"Bearer {keys['alice']}"})
    assert r.status_code == 200, r.text
    doc = r.json()
    flagged = [i for i, v in enumerate(doc["verdicts"]) if v != "allow"]
    assert flagged, doc["verdicts"]
    i = flagged[0]
    rid = doc["request_ids"][i]
    full = c.get("/v1/events", params={"kind": "explanation", "request_id": rid,
                                       "include_inputs": "true"},
                 headers={"Authorization": f"Bearer {keys['ops']}"}).json()["events"][0]
    p = full["payload"]
    assert p["words"] == texts[i].split()
    page.goto(f"{url}/dashboard")
    page.fill("#api-key", keys["viewer"])
    page.click("#key-btn")
    row = page.locator(f'#explanations .explained[data-request="{rid}"]')
    expect(row).to_have_count(1, timeout=30_000)
    mine = row.locator('figure[data-role="flagged"] span.w')
    ref = row.locator('figure[data-role="reference"] span.w')
    # one span per word, the value in its title, coloured by sign, full strength at the
    # largest |attribution|
    assert mine.count() == len(p["attribution"]) == len(texts[i].split())
    assert ref.count() == len(p["reference"]["reference_words"])
    assert ref.all_text_contents() == p["reference"]["reference_words"]
    for spans, values in ((mine, p["attribution"]), (ref, p["reference"]["attribution"])):
        assert [float(spans.nth(k).get_attribute("title")) for k in range(spans.count())] \
            == pytest.approx(values)
        top = int(np.argmax(np.abs(values)))
        red, green, blue, alpha = _rgba(spans.nth(top).get_attribute("style"))
        assert alpha == pytest.approx(1.0)
        assert (red, green, blue) == ((192, 38, 45) if values[top] > 0 else (59, 111, 216))
    # a reader sees where the words are, not the words
    shown = row.text_content()
    assert not any(w in shown for w in texts[i].split())
    assert "nearest clean reference" in shown and "hidden" in shown
    row.locator("button.reveal").click()
    expect(row.locator(".reveal-result")).to_contain_text("refused (403)", timeout=20_000)
    # an admin who asks sees them
    page.fill("#api-key", keys["ops"])
    page.click("#key-btn")
    row.locator("button.reveal").click()
    expect(row.locator('figure[data-role="flagged"] span.w').first).to_have_text(
        texts[i].split()[0], timeout=20_000)
    assert row.locator('figure[data-role="flagged"] span.w').all_text_contents() == \
        texts[i].split()
    assert row.locator("button.reveal").count() == 0
    errs = [e for e in page.errors  # type: ignore[attr-defined]
            if "status of 401" not in e and "status of 403" not in e]
    assert not errs, errs
