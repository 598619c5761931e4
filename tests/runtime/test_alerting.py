"""Alerts out: the controller's firing -> resolved lifecycle, de-duplication, and delivery
to real HTTP receivers on loopback (Alertmanager webhook, signed webhook, Slack), with
retries, a dead and a slow receiver, and every attempt in the event store."""

from __future__ import annotations

import json
import time

import pytest

from bastion.errors import BastionError
from bastion.runtime.alerting import (
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    AlertDispatcher,
    AlertingConfig,
    alert_labels,
    fingerprint,
    sign,
    verify_signature,
)
from bastion.runtime.healing import HealingController, HealingPolicy, Rule
from bastion.runtime.monitors import Signal
from bastion.runtime.retrain import RetrainPipeline
from bastion.store import events as ev

SECRET = "s3cret-hmac-key-for-tests"
MODEL = "alerts-model"


class Switch:
    """A monitor whose signals the test sets (the controller under test is real)."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.fire: list[str | None] = []  # client ids (None: the whole service)

    def evaluate(self, store, *, after_id, upto_id):
        if not self.fire:
            return [Signal(monitor=self.name, fired=False, message="quiet")]
        return [Signal(monitor=self.name, fired=True, severity="critical", client_id=c,
                       message=f"{self.name} fired" + (f" for {c}" if c else ""), value=0.9,
                       threshold=0.1) for c in self.fire]


class Reg:
    """The registry as the controller sees it when no retrain is asked for: a name."""

    name = MODEL

    def get_alias(self, alias):
        return None


@pytest.fixture()
def controller(tmp_path, splits):
    store = ev.EventStore(f"sqlite:///{tmp_path / 'events.db'}")
    mon = Switch("alert_rate")
    pol = HealingPolicy(rules=[Rule(monitor="alert_rate", actions=["alert"])])
    ctl = HealingController(pol, store, Reg(), RetrainPipeline(splits[0], splits[1]),
                            monitors=[mon], input_shape=(1, 8, 8))
    yield ctl, mon, store
    store.close()


def config(**receivers) -> AlertingConfig:
    return AlertingConfig.model_validate({"external_url": "http://bastion.local:8000",
                                          "receivers": [{"name": k, **v}
                                                        for k, v in receivers.items()]})


def deliveries(store, outcome=None):
    return [e.payload for e in store.query(kinds=ev.DELIVERY, limit=None)
            if outcome is None or e.payload["outcome"] == outcome]


def test_lifecycle_delivered_once_to_three_receivers(controller, receiver_factory,
                                                     monkeypatch):
    ctl, mon, store = controller
    monkeypatch.setenv("HOOK_SECRET", SECRET)
    am, hook, slack = receiver_factory(), receiver_factory(), receiver_factory()
    cfg = config(am={"kind": "alertmanager", "url": am.url + "/am"},
                 hook={"kind": "webhook", "url": hook.url + "/hook", "secret_env": "HOOK_SECRET"},
                 slack={"kind": "slack", "url": slack.url + "/services/T0/B0/XXXX"})
    disp = AlertDispatcher(store, cfg, model_name=MODEL)
    try:
        mon.fire = [None, "mallory"]
        ctl.step()
        ctl.step()  # still firing: no new alert event
        alerts = store.query(kinds=ev.ALERT, limit=None)
        assert [a.payload["status"] for a in alerts] == ["firing", "firing"]
        assert disp.poll() == 2
        got = am.wait(2)
        assert len(got) == 2 and {a["status"] for a in got} == {"firing"}
        one = next(a for a in got if "client_id" in a["commonLabels"])
        alert = one["alerts"][0]
        assert one["version"] == "4" and one["receiver"] == "am"
        assert alert["labels"] == {"alertname": "Bastion_alert_rate", "monitor": "alert_rate",
                                   "model": MODEL, "client_id": "mallory",
                                   "severity": "critical"}
        assert alert["fingerprint"] == fingerprint(alert_labels("alert_rate", MODEL,
                                                                "mallory"))
        assert alert["endsAt"] == "0001-01-01T00:00:00Z"
        assert alert["generatorURL"] == "http://bastion.local:8000/dashboard"
        assert "mallory" in alert["annotations"]["summary"]
        # the signed webhook verifies; a tampered body or a wrong key does not
        posts = hook.wait(2) and hook.posts
        for p in posts:
            h = {k.lower(): v for k, v in p["headers"].items()}
            sig, ts = h[SIGNATURE_HEADER.lower()], h[TIMESTAMP_HEADER.lower()]
            assert verify_signature(SECRET, p["body"], ts, sig)
            assert not verify_signature(SECRET, p["body"] + b" ", ts, sig)
            assert not verify_signature("other-key", p["body"], ts, sig)
        assert {b["status"] for b in hook.json()} == {"firing"}
        sl = slack.wait(2)
        assert all(b["text"].startswith("[FIRING] Bastion_alert_rate") for b in sl)
        assert {b["attachments"][0]["color"] for b in sl} == {"danger"}

        # one client stops: only its alert resolves; then everything resolves
        mon.fire = [None]
        ctl.step()
        assert disp.poll() == 1
        res = am.wait(3)[2]
        assert res["status"] == "resolved"
        assert res["alerts"][0]["labels"]["client_id"] == "mallory"
        assert res["alerts"][0]["startsAt"] == alert["startsAt"]
        assert res["alerts"][0]["endsAt"] > res["alerts"][0]["startsAt"]
        mon.fire = []
        ctl.step()
        ctl.step()
        assert disp.poll() == 1
        assert len(am.wait(4)) == 4 and len(hook.wait(4)) == 4 and len(slack.wait(4)) == 4
        assert slack.json()[-1]["attachments"][0]["color"] == "good"

        # a firing alert that is already firing (a second controller, a replayed event)
        # and a resolution of an alert that is not firing go nowhere
        fp = fingerprint(alert_labels("alert_rate", MODEL))
        store.append(ev.ALERT, {"monitor": "alert_rate", "status": "resolved",
                                "fingerprint": fp, "model": MODEL})
        assert disp.poll() == 0
        assert disp.poll() == 0
    finally:
        disp.close()
    # a restarted dispatcher sends nothing again
    disp2 = AlertDispatcher(store, cfg, model_name=MODEL)
    try:
        assert disp2.poll() == 0
        time.sleep(0.3)
    finally:
        disp2.close()
    assert len(am.posts) == len(hook.posts) == len(slack.posts) == 4
    ok = deliveries(store, "delivered")
    assert len(ok) == 12 and all(d["attempt"] == 1 and d["http_status"] == 200 for d in ok)
    assert len(deliveries(store, "deduplicated")) == 1
    # the receiver URL (a Slack URL is itself a secret) and the key are never recorded
    text = json.dumps([e.payload for e in store.query(limit=None)])
    assert "XXXX" not in text and SECRET not in text and "127.0.0.1" not in text
    assert SECRET not in repr(cfg) and "XXXX" not in repr(cfg)


def test_a_fresh_dispatcher_sends_only_what_still_fires(tmp_path, receiver_factory):
    store = ev.EventStore(f"sqlite:///{tmp_path / 'e.db'}")
    rec = receiver_factory()
    for mon_, status in [("a", "firing"), ("a", "resolved"), ("b", "firing")]:
        store.append(ev.ALERT, {"monitor": mon_, "status": status, "model": MODEL,
                                "fingerprint": fingerprint(alert_labels(mon_, MODEL))})
    disp = AlertDispatcher(store, config(r={"kind": "alertmanager", "url": rec.url}),
                           model_name=MODEL)
    try:
        assert disp.poll() == 1
        got = rec.wait(1)
        time.sleep(0.2)
        assert len(rec.posts) == 1 and got[0]["commonLabels"]["monitor"] == "b"
    finally:
        disp.close()
        store.close()


def test_retries_with_backoff_then_delivers_and_a_4xx_is_final(tmp_path, receiver_factory):
    store = ev.EventStore(f"sqlite:///{tmp_path / 'e.db'}")
    flaky = receiver_factory(statuses=[503, 500])
    refuses = receiver_factory(statuses=[400])
    disp = AlertDispatcher(store, config(
        flaky={"kind": "alertmanager", "url": flaky.url, "backoff_s": 0.05},
        refuses={"kind": "slack", "url": refuses.url, "backoff_s": 0.05}), model_name=MODEL)
    try:
        store.append(ev.ALERT, {"monitor": "health", "status": "firing", "model": MODEL})
        disp.poll()
        flaky.wait(3)
        refuses.wait(1)
        end = time.monotonic() + 5
        while time.monotonic() < end and len(deliveries(store)) < 4:
            time.sleep(0.02)
        time.sleep(0.2)
    finally:
        disp.close()
    assert len(flaky.posts) == 3 and len(refuses.posts) == 1
    by = [(d["receiver"], d["attempt"], d["outcome"], d["http_status"])
          for d in deliveries(store)]
    assert [b for b in by if b[0] == "flaky"] == [
        ("flaky", 1, "retrying", 503), ("flaky", 2, "retrying", 500),
        ("flaky", 3, "delivered", 200)]
    assert [b for b in by if b[0] == "refuses"] == [("refuses", 1, "failed", 400)]
    store.close()


def test_dead_and_slow_receivers_never_block_the_poll(tmp_path, receiver_factory, dead_url):
    store = ev.EventStore(f"sqlite:///{tmp_path / 'e.db'}")
    slow = receiver_factory(delay_s=3.0)
    disp = AlertDispatcher(store, config(
        dead={"kind": "alertmanager", "url": dead_url, "backoff_s": 0.05, "max_attempts": 3},
        slow={"kind": "webhook", "url": slow.url, "secret": SECRET, "timeout_s": 0.5,
              "max_attempts": 2, "backoff_s": 0.05}), model_name=MODEL)
    try:
        for i in range(20):
            store.append(ev.ALERT, {"monitor": f"m{i}", "status": "firing", "model": MODEL})
            t0 = time.perf_counter()
            disp.poll()
            assert time.perf_counter() - t0 < 0.5
        end = time.monotonic() + 5
        while time.monotonic() < end and not deliveries(store, "failed"):
            time.sleep(0.05)
    finally:
        t0 = time.perf_counter()
        disp.close(timeout_s=2)
        assert time.perf_counter() - t0 < 3.0
    dead = [d for d in deliveries(store) if d["receiver"] == "dead"]
    assert dead[:3] == [{**dead[0], "attempt": 1, "outcome": "retrying"},
                        {**dead[1], "attempt": 2, "outcome": "retrying"},
                        {**dead[2], "attempt": 3, "outcome": "failed"}]
    assert dead[0]["error"] == "ConnectError" and dead[0]["http_status"] is None
    slow_ = [d for d in deliveries(store) if d["receiver"] == "slow"]
    assert slow_ and slow_[0]["error"] == "ReadTimeout"
    store.close()


def test_signature_helpers():
    body, ts = b'{"a":1}', str(int(time.time()))
    s = sign(SECRET.encode(), ts, body)
    assert s.startswith("sha256=") and verify_signature(SECRET, body, ts, s)
    old = str(int(time.time()) - 3600)
    assert not verify_signature(SECRET, body, old, sign(SECRET.encode(), old, body))
    assert not verify_signature(SECRET, body, "not-a-time", s)


@pytest.mark.parametrize("receiver, match", [
    ({"name": "h", "kind": "webhook", "url": "http://x/"}, "set secret_env"),
    ({"name": "h", "kind": "slack", "url": "ftp://x/"}, "http:// or https://"),
    ({"name": "h", "kind": "pager", "url": "http://x/"}, "alerting.receivers.0.kind"),
    ({"name": "a b", "kind": "slack", "url": "http://x/"}, "alerting.receivers.0.name"),
])
def test_bad_receiver_config_is_one_clear_line(receiver, match):
    from bastion.service.config import ServiceConfig

    with pytest.raises(BastionError, match=match) as ei:
        ServiceConfig.build(model="builtin:x", reference="builtin:digits",
                            alerting={"receivers": [receiver]})
    assert "\n" not in str(ei.value)


def test_missing_signing_secret_is_refused(tmp_path, monkeypatch):
    monkeypatch.delenv("NO_SUCH_SECRET", raising=False)
    store = ev.EventStore(f"sqlite:///{tmp_path / 'e.db'}")
    with pytest.raises(BastionError, match="no signing secret"):
        AlertDispatcher(store, config(h={"kind": "webhook", "url": "http://127.0.0.1:9/",
                                         "secret_env": "NO_SUCH_SECRET"}), model_name=MODEL)
    store.close()
