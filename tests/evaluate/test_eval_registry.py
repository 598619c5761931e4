"""The attack registry."""

from __future__ import annotations

import pytest

from bastion.attacks import ATTACKS, get_attack
from bastion.attacks.base import FixedEpsilonAttack
from bastion.errors import BastionError


def test_names():
    assert set(ATTACKS) == {"fgsm", "pgd", "apgd-ce", "apgd-dlr", "apgd-t", "fab-t", "fab",
                            "deepfool", "cw",
                            "square", "hsj"}


def test_unknown_name_lists_valid_ones():
    with pytest.raises(BastionError, match="apgd-ce"):
        get_attack("autoattack", norm="linf")


def test_build_with_overrides():
    a = get_attack("PGD", norm="l2", seed=4, steps=7)
    assert isinstance(a, FixedEpsilonAttack)
    assert (a.norm, a.steps, a.seed) == ("l2", 7, 4)
    sq = get_attack("square", norm="linf", max_queries=10)
    assert sq.max_queries == 10 and sq.white_box is False


def test_bad_options_and_norms():
    with pytest.raises(BastionError, match="options"):
        get_attack("pgd", norm="linf", nonsense=1)
    with pytest.raises(BastionError, match="L2 attack"):
        get_attack("cw", norm="linf")
    with pytest.raises(BastionError, match="norm"):
        get_attack("pgd", norm="l1")
