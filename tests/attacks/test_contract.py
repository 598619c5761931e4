"""The attack contract: FixedEpsilonAttack.run owns the epsilon loop, the one clean pass,
projection onto the budget and the re-check; an attack only implements attack_epsilon."""

from __future__ import annotations

import numpy as np
import torch

from bastion.attacks.base import FixedEpsilonAttack
from bastion.evaluate import scan


class Overshoot(FixedEpsilonAttack):
    """Claims success everywhere and returns inputs far outside the budget (a buggy hook):
    the base class must project them back and believe only a fresh check."""

    name = "overshoot"

    def __init__(self) -> None:
        self.norm = "linf"
        self.calls: list[tuple[float, int]] = []

    def attack_epsilon(self, ctx, x, y, target, eps):
        self.calls.append((eps, len(x)))
        g = torch.Generator().manual_seed(len(self.calls))
        return x + 5 * (2 * torch.rand(x.shape, generator=g) - 1), torch.ones(len(x), dtype=bool)


def test_base_projects_clips_and_rechecks_a_lying_hook(digits_cnn, digits_eval):
    x, y = digits_eval[0][:30], digits_eval[1][:30]
    atk = Overshoot()
    r = atk.run(digits_cnn, x, y, epsilons=[0.0, 0.05, 0.3])
    d = np.abs(r.x_adv - x[None]).reshape(3, len(x), -1).max(axis=2)
    assert np.all(d <= np.array([0.0, 0.05, 0.3])[:, None] + 1e-6)
    assert r.x_adv.min() >= 0.0 and r.x_adv.max() <= 1.0
    for i in range(3):  # success flags are the truth about the projected inputs
        pred = digits_cnn.predict_proba(r.x_adv[i]).argmax(1)
        np.testing.assert_array_equal(r.success[i], pred != y)
    assert r.extra["rechecked_after_projection"] > 0
    # eps 0 is never handed to the hook; later epsilons see only the points still standing
    assert [e for e, _ in atk.calls] == [0.05, 0.3]
    assert atk.calls[1][1] == int((~r.success[1]).sum())
    per_eps = np.asarray(r.extra["queries_per_epsilon"])
    assert np.array_equal(per_eps.sum(axis=0), r.queries)


class Counting(FixedEpsilonAttack):
    """Counts how often ``run`` and the clean pass happen (via the hook's context)."""

    name = "counting"

    def __init__(self) -> None:
        self.norm = "linf"
        self.runs = 0
        self.hooks: list[float] = []

    def run(self, model, x, y, *, epsilons, target=None):
        self.runs += 1
        return super().run(model, x, y, epsilons=epsilons, target=target)

    def attack_epsilon(self, ctx, x, y, target, eps):
        self.hooks.append(eps)
        return x, torch.zeros(len(x), dtype=bool)


def test_scan_passes_every_epsilon_in_one_call(digits_cnn, digits_eval):
    x, y = digits_eval[0][:20], digits_eval[1][:20]
    atk = Counting()
    scan(digits_cnn, x, y, epsilons=[0.0, 0.01, 0.05, 0.1], attacks=[atk],
         sanity_checks=False, batch_size=500)
    assert atk.runs == 1  # one call (one clean gradient pass) for all three epsilons
    assert atk.hooks == [0.01, 0.05, 0.1]
