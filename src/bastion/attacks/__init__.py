"""Attacks, and a registry that builds them by name.

``ATTACKS`` maps a short name to a factory ``(norm, seed, **overrides) -> Attack``;
:func:`get_attack` is the checked front door::

    from bastion.attacks import get_attack
    apgd = get_attack("apgd-ce", norm="linf", seed=0, steps=20)

Attack modules are imported lazily, inside each factory, so importing this package never
fails because one attack module is missing or broken; the error appears (as a
:class:`~bastion.errors.BastionError`) only when that attack is asked for.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from bastion.attacks.base import (
    Attack,
    AttackResult,
    FixedEpsilonAttack,
    MinimalAttack,
    check_epsilons,
    check_norm,
)
from bastion.errors import BastionError

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackResult",
    "FixedEpsilonAttack",
    "MinimalAttack",
    "attack_names",
    "check_epsilons",
    "check_norm",
    "get_attack",
]

AttackFactory = Callable[..., Attack]


def _load(module: str, cls: str) -> type:
    try:
        mod = importlib.import_module(f"bastion.attacks.evasion.{module}")
    except ImportError as exc:
        raise BastionError(
            f"the attack module bastion.attacks.evasion.{module} could not be imported: {exc}",
            hint="check the installation, or pick another attack",
        ) from exc
    try:
        return getattr(mod, cls)
    except AttributeError as exc:
        raise BastionError(
            f"bastion.attacks.evasion.{module} has no attack class {cls}",
            hint="check the installation, or pick another attack",
        ) from exc


def _build(module: str, cls: str, defaults: dict[str, Any], overrides: dict[str, Any]) -> Attack:
    klass = _load(module, cls)
    kwargs = {**defaults, **overrides}
    try:
        return klass(**kwargs)
    except TypeError as exc:
        raise BastionError(
            f"bad options for attack {cls}: {exc}",
            hint="see the attack's docstring for the options it takes",
        ) from exc


def _fgsm(norm: str, seed: int, **kw: Any) -> Attack:
    return _build("fgsm", "FGSM", {"norm": norm, "seed": seed}, kw)


def _pgd(norm: str, seed: int, **kw: Any) -> Attack:
    return _build("pgd", "PGD", {"norm": norm, "seed": seed}, kw)


def _apgd_ce(norm: str, seed: int, **kw: Any) -> Attack:
    return _build("apgd", "APGD", {"norm": norm, "seed": seed, "loss": "ce"}, kw)


def _apgd_dlr(norm: str, seed: int, **kw: Any) -> Attack:
    return _build("apgd", "APGD", {"norm": norm, "seed": seed, "loss": "dlr"}, kw)


def _apgd_t(norm: str, seed: int, **kw: Any) -> Attack:
    return _build("apgd", "APGDT", {"norm": norm, "seed": seed}, kw)


def _fab_t(norm: str, seed: int, **kw: Any) -> Attack:
    return _build("fab", "FAB", {"norm": norm, "seed": seed, "targeted": True}, kw)


def _fab(norm: str, seed: int, **kw: Any) -> Attack:
    return _build("fab", "FAB", {"norm": norm, "seed": seed, "targeted": False}, kw)


def _deepfool(norm: str, seed: int, **kw: Any) -> Attack:
    # deterministic: takes no seed
    return _build("deepfool", "DeepFool", {"norm": norm}, kw)


def _cw(norm: str, seed: int, **kw: Any) -> Attack:
    if norm != "l2":
        raise BastionError(
            f"cw (Carlini-Wagner) is an L2 attack and cannot be used with norm={norm!r}",
            hint="use norm='l2', or drop cw from the attack list",
        )
    return _build("cw", "CarliniWagnerL2", {}, kw)


def _square(norm: str, seed: int, **kw: Any) -> Attack:
    return _build("square", "Square", {"norm": norm, "seed": seed}, kw)


def _hsj(norm: str, seed: int, **kw: Any) -> Attack:
    return _build("hopskipjump", "HopSkipJump", {"norm": norm, "seed": seed}, kw)


ATTACKS: dict[str, AttackFactory] = {
    "fgsm": _fgsm,
    "pgd": _pgd,
    "apgd-ce": _apgd_ce,
    "apgd-dlr": _apgd_dlr,
    "apgd-t": _apgd_t,
    "fab-t": _fab_t,
    "fab": _fab,
    "deepfool": _deepfool,
    "cw": _cw,
    "square": _square,
    "hsj": _hsj,
}


def attack_names() -> list[str]:
    """The registered attack names, in registry order."""
    return list(ATTACKS)


def get_attack(name: str, *, norm: str = "linf", seed: int = 0, **kw: Any) -> Attack:
    """Build the attack registered as ``name`` for ``norm``.

    Args:
        name: one of :data:`ATTACKS` (case-insensitive; ``_`` is read as ``-``).
        norm: ``"linf"`` or ``"l2"``.
        seed: the attack's random seed (ignored by deterministic attacks).
        **kw: options passed to the attack's constructor (e.g. ``steps=20``).

    Raises:
        BastionError: unknown name, a norm the attack does not support, bad options, or
            an attack module that cannot be imported.
    """
    key = str(name).strip().lower().replace("_", "-")
    if key not in ATTACKS:
        raise BastionError(
            f"unknown attack {name!r}",
            hint=f"valid names: {', '.join(ATTACKS)}",
        )
    return ATTACKS[key](check_norm(norm), int(seed), **kw)
