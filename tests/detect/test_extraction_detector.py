"""PRADA-style query-stream detector: fires on synthetic extraction streams only."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.datasets import load_digits

from bastion.errors import BastionError


@pytest.fixture(scope="module")
def streams():
    d = load_digits()
    x = (d.images / 16.0).astype(np.float32)[:, None]
    y = d.target
    rng = np.random.default_rng(0)
    benign = [x[rng.permutation(len(x))[:300]] for _ in range(3)]
    # a JbDA-like attack: 30 seeds, then growing sign steps around them
    seeds = x[:30]
    syn = np.array([np.clip(seeds[i % 30] + 0.05 * (i // 30) *
                            np.sign(rng.standard_normal(seeds[0].shape)), 0, 1)
                    for i in range(300)], dtype=np.float32)
    # labels stand in for the model's predictions: true labels for natural inputs,
    # the seed's label for its perturbations
    return benign, None, syn, np.array([y[i % 30] for i in range(300)])


def test_prada_fires_on_synthetic_and_not_on_benign(streams):
    from bastion.detect.extraction import PradaDetector

    benign, _, syn, syn_labels = streams
    det = PradaDetector(delta=0.9, min_queries=50)
    det.run(syn, syn_labels)
    assert det.drift_detected and det.detected_at_ is not None and det.detected_at_ < 300
    for b in benign:
        assert not PradaDetector(delta=0.9, min_queries=50).run(b).drift_detected
    assert det.score(syn, syn_labels) > det.score(benign[0])


def test_prada_streaming_shape_and_calibration(streams):
    from bastion.detect.extraction import PradaDetector, QueryStreamMonitor

    benign, _, syn, syn_labels = streams
    det = PradaDetector(min_queries=20)
    for q in benign[0][:10]:
        det.update(q)
    assert not det.drift_detected and det.n_queries_ == 10 and len(det.distances_) == 9
    delta = det.calibrate(benign[:2])
    assert 0 < delta < 1
    assert not PradaDetector(delta=delta, min_queries=20).run(benign[0]).drift_detected
    mon = QueryStreamMonitor(delta=0.9, min_queries=50)
    for q, lab in zip(syn, syn_labels, strict=True):
        mon.update("attacker", q, int(lab))
    for q in benign[2]:
        mon.update("alice", q)
    assert mon.flagged() == ["attacker"]
    with pytest.raises(BastionError):
        PradaDetector(delta=1.5)
    with pytest.raises(BastionError):
        PradaDetector(min_queries=2)


def test_prada_calibration_to_a_false_alarm_rate(streams):
    from bastion.detect.extraction import PradaDetector

    benign, _, _, _ = streams
    det = PradaDetector(min_queries=50)
    mins = sorted(det.min_w(b) for b in benign)
    strict = det.calibrate(benign, fpr=0.0, margin=0.01)
    assert strict == pytest.approx(max(mins[0] - 0.01, 1e-3))
    # allowing a share of the calibration streams to alarm raises delta (more sensitive)
    loose = det.calibrate(benign, fpr=0.5, margin=0.0)
    assert loose == pytest.approx(float(np.quantile(mins, 0.5))) and loose >= strict
    assert PradaDetector().min_queries == 100  # W of a few dozen distances swings widely
    with pytest.raises(BastionError):
        det.calibrate(benign, fpr=1.0)


def test_prada_batched_test_matches_per_query_and_service_watch_batches(streams):
    """Deferring the Shapiro-Wilk test to the end of a batch leaves the statistic of the
    stream unchanged; the service's watch takes a request's queries at once, flags the
    synthetic stream and not a benign one, and rolls its window over inside a batch."""
    from bastion.detect.extraction import PradaDetector
    from bastion.service.core import ExtractionWatch

    benign, _, syn, _ = streams
    one = PradaDetector(delta=0.9, min_queries=50)
    batched = PradaDetector(delta=0.9, min_queries=50)
    for start in range(0, 300, 32):
        for q in syn[start:start + 32]:
            one.update(q)
            batched.update(q, test=False)
        batched.test()
        assert batched.w_ == one.w_ and batched.n_queries_ == one.n_queries_
    assert one.drift_detected and batched.drift_detected
    # detection is found at the end of the batch it happens in
    assert one.detected_at_ <= batched.detected_at_ < one.detected_at_ + 32

    watch = ExtractionWatch(delta=0.9, min_queries=50, window=120)
    for start in range(0, 300, 32):
        res_b = watch.observe_many("alice", benign[0][start:start + 32])
        res_s = watch.observe_many("mallory", syn[start:start + 32])
    assert not res_b["flagged"] and res_s["flagged"] and watch.flagged() == ["mallory"]
    # a window rolls over inside a batch: the client's detector starts afresh
    assert watch._dets["alice"].n_queries_ == 300 - 240


def test_prada_distances_and_thresholds_match_their_definition(streams):
    # the streaming shortcuts (nearest distance from cached norms, running mean and
    # standard deviation) must give PRADA's quantities as defined, recomputed plainly here
    from bastion.detect.extraction import PradaDetector

    benign, _, syn, syn_labels = streams
    stream = np.concatenate([benign[0][:150], syn[:150]]).reshape(300, -1).astype(np.float64)
    labels = np.concatenate([np.zeros(150, dtype=int), syn_labels[:150]])
    det = PradaDetector(delta=0.9, min_queries=20, window=100)
    growing: dict[int, list[np.ndarray]] = {}
    grown: dict[int, list[float]] = {}
    thr: dict[int, float] = {}
    dists = []
    for q, c in zip(stream, labels, strict=True):
        det.update(q, int(c))
        g = growing.setdefault(int(c), [])
        if not g:
            g.append(q)
            grown[int(c)], thr[int(c)] = [], 0.0
            continue
        d = float(np.sqrt(((np.array(g) - q) ** 2).sum(1)).min())
        dists.append(d)
        if d > thr[int(c)]:
            g.append(q)
            grown[int(c)].append(d)
            thr[int(c)] = max(thr[int(c)], float(np.mean(grown[int(c)]) - np.std(grown[int(c)])))
    np.testing.assert_allclose(det.distances_[:], dists, rtol=1e-9, atol=1e-9)
    assert set(det.thresholds_) == set(thr)
    for c, t in thr.items():
        assert det.thresholds_[c] == pytest.approx(t, rel=1e-9, abs=1e-9)
        assert len(det.growing_[c]) == len(growing[c])
    np.testing.assert_allclose(det.distances_.last(100), dists[-100:], rtol=1e-9, atol=1e-9)
