"""Text evasion attacks under a query budget and meaning-keeping constraints.

- ``char``: DeepWordBug-style character edits (:class:`~.charlevel.CharEdit`);
- ``word``: TextFooler-style word substitution (:class:`~.wordlevel.WordSubstitution`);
- ``hotflip``: HotFlip-style gradient-guided substitution for white-box text models
  (:class:`~.hotflip.HotFlip`).

``get_text_attack(name, **options)`` builds one; every attack's ``run(model, texts,
labels)`` returns a :class:`~.base.TextAttackReport`.
"""

from __future__ import annotations

from typing import Any

from bastion.attacks.text.base import (
    TextAdversarial,
    TextAttack,
    TextAttackReport,
    TextConstraints,
)
from bastion.errors import BastionError

TEXT_ATTACKS = ("char", "word", "hotflip")

__all__ = ["TEXT_ATTACKS", "TextAdversarial", "TextAttack", "TextAttackReport",
           "TextConstraints", "get_text_attack"]


def get_text_attack(name: str, **options: Any) -> TextAttack:
    """Build the text attack ``name`` (one of :data:`TEXT_ATTACKS`)."""
    if name == "char":
        from bastion.attacks.text.charlevel import CharEdit as cls
    elif name == "word":
        from bastion.attacks.text.wordlevel import WordSubstitution as cls  # type: ignore
    elif name == "hotflip":
        from bastion.attacks.text.hotflip import HotFlip as cls  # type: ignore
    else:
        raise BastionError(f"unknown text attack {name!r}",
                           hint=f"valid: {', '.join(TEXT_ATTACKS)}")
    constraint_keys = {"min_similarity", "max_word_share", "protect_stopwords",
                       "protect_entities"}
    cons = {k: options.pop(k) for k in list(options) if k in constraint_keys}
    try:
        return cls(constraints=TextConstraints(**cons), **options)
    except TypeError as exc:
        raise BastionError(f"bad option for the {name} attack: {exc}",
                           hint="options: max_queries, seed, min_similarity, max_word_share, "
                           "protect_stopwords, protect_entities, and the attack's own") from None
