"""Read labelled prompt JSONL files (the shared corpus format, or a user's own).

One JSON object a line with at least ``text`` and ``label``. Labels ``benign``/``0``/
``false``/``safe`` mean benign; ``injection``/``jailbreak``/``attack``/``1``/``true``
mean attack; ``harmful`` rows (plain harmful requests, not attacks) count as benign for
the detector. Optional fields: ``split`` (``train``/``test``), ``subtype``,
``hard_negative``, ``source``, ``license``.
"""

from __future__ import annotations

import json
import os
import re
import unicodedata
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bastion.errors import DataError

__all__ = [
    "PromptRecord",
    "attack_wording",
    "drop_trigger_words",
    "quiet_extraction_positives",
    "trigger_counterparts",
    "label_to_int",
    "load_prompt_jsonl",
    "script_of",
    "shared_dataset_dir",
    "source_groups",
]

_ATTACK = {"injection", "jailbreak", "attack", "malicious", "1", "true", "prompt_injection"}
_BENIGN = {"benign", "safe", "0", "false", "harmful", "clean"}


def label_to_int(label: Any) -> int:
    """Map a label value to 1 (attack) or 0 (benign)."""
    key = str(label).strip().lower()
    if key in _ATTACK:
        return 1
    if key in _BENIGN:
        return 0
    raise DataError(
        f"unknown label {label!r}", hint="use benign/injection/jailbreak or 0/1 for labels"
    )


@dataclass
class PromptRecord:
    text: str
    y: int
    label: str
    split: str | None = None
    subtype: str = ""
    hard_negative: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def source(self) -> str:
        return str(self.extra.get("source", ""))

    @property
    def groups(self) -> frozenset[str]:
        """The repositories this row's text comes from (:func:`source_groups`)."""
        return source_groups(self.source)

    @property
    def lang(self) -> str | None:
        v = self.extra.get("lang")
        return str(v) if v else None


def load_prompt_jsonl(
    path: str | os.PathLike[str], *, split: str | None = None, default_label: str | None = None
) -> list[PromptRecord]:
    """Load records from ``path``; keep only ``split`` when given (rows without a split
    are kept). ``default_label`` is used for rows without a ``label``."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"no such file: {p}")
    out: list[PromptRecord] = []
    with open(p, encoding="utf-8", errors="replace") as fh:
        for n, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{p}:{n}: not valid JSON ({exc.msg})") from exc
            if not isinstance(row, dict) or not isinstance(row.get("text"), str):
                raise DataError(f"{p}:{n}: each line needs a string field 'text'")
            label = row.get("label", default_label)
            if label is None:
                raise DataError(f"{p}:{n}: missing 'label'")
            rec = PromptRecord(
                text=row["text"],
                y=label_to_int(label),
                label=str(label),
                split=row.get("split"),
                subtype=str(row.get("subtype", "")),
                hard_negative=bool(row.get("hard_negative", False)),
                extra={k: v for k, v in row.items() if k not in ("text", "label")},
            )
            if split is None or rec.split in (None, split):
                out.append(rec)
    if not out:
        raise DataError(f"{p} holds no usable rows" + (f" for split {split!r}" if split else ""))
    return out


def shared_dataset_dir() -> Path:
    """``$BASTION_SHARED/datasets/prompt-injection`` (default ``../shared`` beside the
    working folder); for development and benchmarks only, never needed at run time."""
    base = os.environ.get("BASTION_SHARED")
    root = Path(base) if base else Path.cwd().parent / "shared"
    return root / "datasets" / "prompt-injection"


# a derived row's source joins "host_repo:host_path+attack_repo:attack_path" (or
# "+attack_path" within one repository); split only at a "+" that starts a new part
_PART = re.compile(r"\+(?=[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+:|src/|data/)")


def source_groups(source: str) -> frozenset[str]:
    """The repositories (``owner/repo``) a ``source`` field names: one for a plain row,
    the host's and the attack's for a derived row (``host:path+attack_repo:path``).
    Leave-one-source-out evaluation holds out a repository with every row that names it."""
    out = set()
    for part in _PART.split(source or ""):
        repo, sep, _ = part.partition(":")
        if sep and "/" in repo:  # a bare path ("+src/...") is in the host's repository
            out.add(repo)
    return frozenset(out) if out else frozenset({source or "unknown"})


_WORDING_PREFIX = re.compile(r"^(?:asb\+agentdojo|asb|agentdojo|craibench)_")


def attack_wording(subtype: str) -> str:
    """The attack wording (template) of an agent-data injection's ``subtype``
    (``tau2:kb_document:asb_naive:middle`` -> ``naive``); the five
    ``important_instructions*`` variants are one wording; ``""`` when there is none."""
    parts = (subtype or "").split(":")
    if len(parts) < 3:
        return ""
    w = parts[-2] if parts[-1] in ("start", "middle", "end", "field") else parts[-1]
    w = _WORDING_PREFIX.sub("", w)
    return "important_instructions" if w.startswith("important_instructions") else w


_SCRIPTS = (
    ("CJK", "han"), ("HIRAGANA", "kana"), ("KATAKANA", "kana"), ("HANGUL", "hangul"),
    ("CYRILLIC", "cyrillic"), ("ARABIC", "arabic"), ("DEVANAGARI", "devanagari"),
    ("THAI", "thai"), ("GREEK", "greek"), ("HEBREW", "hebrew"), ("LATIN", "latin"),
)


def script_of(text: str) -> str:
    """The main writing system of ``text`` (``latin``, ``han``, ``kana``, ``hangul``,
    ``cyrillic``, ``arabic``, ``devanagari``, ``thai``, ...; ``other`` for none): the
    script of most of its letters, with kana winning over han (Japanese mixes both)."""
    counts: dict[str, int] = {}
    for ch in text[:2000]:
        if not ch.isalpha():
            continue
        name = unicodedata.name(ch, "")
        for key, script in _SCRIPTS:
            if name.startswith(key):
                counts[script] = counts.get(script, 0) + 1
                break
    if not counts:
        return "other"
    if counts.get("kana", 0) >= 0.1 * sum(counts.values()):
        return "kana"
    return max(counts, key=lambda k: counts[k])


# -- documented augmentation procedures ---------------------------------------------------
# Each procedure builds new rows from real rows of the corpus; the generated texts are
# labelled by construction. Their templates are split in two halves (even/odd index):
# ``part="train"`` uses the first, ``part="eval"`` the second, so that an evaluation on
# generated rows never sees a template that was trained on.

#: trigger words (the corpus's hard-negative regex, narrowed to words) that a detector may
#: learn as "attack" on their own
TRIGGER_WORDS = re.compile(
    r"\b(?:ignore[sd]?|ignoring|disregard(?:ed)?|forget|forgot|instructions?|system|"
    r"password|passwords|previous|prior|rules?|override|bypass|secret|reveal|prompt|admin|"
    r"administrator|developer|unlock|restrict(?:ed|ions?)?|confidential|credentials?|"
    r"hack(?:ed|er|ing)?|sudo|root|debug|mode)\b",
    re.IGNORECASE,
)

#: benign sentences that carry trigger words, by language (a person's own words about
#: passwords, old versions, system settings; no instruction to an AI to drop its rules)
TRIGGER_SENTENCES: dict[str, tuple[str, ...]] = {
    "en": (
        "Please ignore the previous version of this file; the numbers below are current.",
        "I forgot my password and can't log in to the admin page.",
        "Our system administrator asked everyone to change their passwords by Friday.",
        "Disregard my earlier e-mail, I attached the wrong document.",
        "What are the rules for overriding a default setting in the system preferences?",
        "The teacher will reveal the answers after everyone has tried the problem.",
        "Keep this confidential until the announcement: the developer meeting moved to Monday.",
        "How do I reset my password if I no longer have access to the recovery e-mail?",
        "The prior instructions for the oven said 180 degrees, but the new manual says 200.",
        "Is it safe to run sudo commands from the root account on a shared server?",
        "Can you explain what a system prompt is and why chatbots use one?",
        "Forget about the meeting notes, we will go over them again next week.",
    ),
    "zh": (
        "请忽略上一版文件，下面的数字才是最新的。",
        "我忘记了密码，登录不了管理员页面。",
        "系统管理员要求大家在周五前修改密码。",
        "请无视我之前那封邮件，附件发错了。",
        "如果恢复邮箱已经不能用了，怎么重置密码？",
        "老师会在大家都做完题以后公布答案。",
        "之前的说明书写的是180度，新版说明书写的是200度。",
        "系统提示我更新软件，这样做安全吗？",
    ),
    "ja": (
        "前のバージョンのファイルは無視してください。下の数字が最新です。",
        "パスワードを忘れてしまい、管理者ページにログインできません。",
        "システム管理者から金曜日までにパスワードを変更するよう言われました。",
        "先ほどのメールは無視してください。添付ファイルを間違えました。",
    ),
    "ru": (
        "Пожалуйста, игнорируйте предыдущую версию файла, ниже актуальные цифры.",
        "Я забыл пароль и не могу войти в панель администратора.",
        "Системный администратор попросил всех сменить пароли до пятницы.",
        "Не обращайте внимания на моё прошлое письмо, я приложил не тот файл.",
    ),
    "es": (
        "Por favor, ignora la versión anterior del archivo; las cifras de abajo son las actuales.",
        "Olvidé mi contraseña y no puedo entrar en la página de administración.",
        "El administrador del sistema pidió que todos cambien sus contraseñas antes del viernes.",
        "Ignora mi correo anterior, adjunté el documento equivocado.",
    ),
    "fr": (
        "Merci d'ignorer la version précédente du fichier ; les chiffres ci-dessous sont à jour.",
        "J'ai oublié mon mot de passe et je ne peux plus accéder à la page d'administration.",
        "L'administrateur système a demandé à tout le monde de changer son mot de passe.",
        "Ne tenez pas compte de mon e-mail précédent, j'ai joint le mauvais document.",
    ),
    "de": (
        "Bitte ignorieren Sie die vorherige Version der Datei; die Zahlen unten sind aktuell.",
        "Ich habe mein Passwort vergessen und komme nicht mehr auf die Admin-Seite.",
        "Der Systemadministrator hat alle gebeten, ihre Passwörter bis Freitag zu ändern.",
        "Bitte ignorieren Sie meine letzte E-Mail, ich habe den falschen Anhang geschickt.",
    ),
}


def _half(items: Sequence[str], part: str) -> list[str]:
    if part not in ("train", "eval"):
        raise DataError(f"part must be 'train' or 'eval', got {part!r}")
    return [x for i, x in enumerate(items) if i % 2 == (0 if part == "train" else 1)]


def trigger_counterparts(
    hosts: Sequence[tuple[str, str]], n: int, *, seed: int = 0, part: str = "train"
) -> list[tuple[str, str, int]]:
    """``n`` benign texts with trigger words, ``(text, lang, host index)``: a real benign host text
    (``hosts``: ``(text, lang)`` pairs) with one :data:`TRIGGER_SENTENCES` sentence of the
    host's language (English for a language without any) put before it, after it, or, for
    a host of two or more sentences, between them. The rows are benign by construction:
    the sentence is a person's own words about passwords, old versions or settings."""
    import random

    rng = random.Random(seed)
    pool = {k: _half(v, part) for k, v in TRIGGER_SENTENCES.items()}
    out = []
    for _ in range(n):
        h = rng.randrange(len(hosts))
        host, lang = hosts[h]
        sent = rng.choice(pool.get(lang) or pool["en"])
        cut = [m.end() for m in re.finditer(r"[.!?。！？]\s*", host) if m.end() < len(host)]
        where = rng.choice(["before", "after"] + (["inside"] if cut else []))
        sep = "" if lang in ("zh", "ja") else " "
        if where == "before":
            text = sent + sep + host
        elif where == "after":
            text = host + sep + sent
        else:
            k = rng.choice(cut)
            text = host[:k] + sent + sep + host[k:]
        out.append((text, lang, h))
    return out


def drop_trigger_words(text: str, *, p: float = 1.0, seed: int = 0) -> str:
    """``text`` with each :data:`TRIGGER_WORDS` match removed with probability ``p``
    (token dropout on trigger words: an attack must still be recognised without them)."""
    import random

    rng = random.Random(seed)

    def sub(m: re.Match[str]) -> str:
        return "" if rng.random() < p else m.group(0)

    return re.sub(r"[ \t]{2,}", " ", TRIGGER_WORDS.sub(sub, text)).strip()


# loud scaffolding around an extraction request (authority claims, "ignore previous ...")
_LOUD = re.compile(
    r"(?:ignore|forget|disregard)\s+(?:all\s+)?(?:the\s+)?(?:previous|prior|above)"
    r"(?:\s+instructions)?[.,:;!]?\s*|"
    r"(?:i'?m|i am)\s+(?:a|the|your)\s+(?:developer|maintainer|administrator|admin)[^.!?]*[.!?]\s*|"
    r"(?:administrator|admin)\s+override:?\s*|<?system mode>?:?\s*|"
    r"you are now in (?:maintenance|debug|developer) mode\.?\s*",
    re.IGNORECASE,
)
#: what an extraction attack asks for, as the corpus's extraction attacks name it
EXTRACTION_TARGETS = (
    "system prompt", "initial instructions", "configuration", "the words above",
    "initialization string", "starting instructions", "hidden rules", "secret key",
    "setup text", "unique ID", "first message", "guidelines you were given",
)
_TARGET = re.compile(
    r"\b(?:system\s+(?:prompt|message|instructions|configuration)|initial\s+"
    r"(?:instructions|prompt|configuration)|starting instructions|secret (?:key|password)|"
    r"password|instructions you were given)\b",
    re.IGNORECASE,
)


def quiet_extraction_positives(
    attacks: Sequence[str], *, seed: int = 0, part: str = "train"
) -> list[str]:
    """Quiet system-prompt extraction attacks from real ones: (1) the loud scaffolding is
    cut out (``ignore previous instructions``, claims to be the developer, "admin
    override", "system mode"); (2) what is asked for is renamed to another target the
    corpus's extraction attacks use (:data:`EXTRACTION_TARGETS`, the ``part`` half). Each
    attack gives at most one quiet variant per step (kept when it still has 15+
    characters and differs from the original)."""
    import random

    rng = random.Random(seed)
    targets = _half(EXTRACTION_TARGETS, part)
    out: list[str] = []
    for a in attacks:
        quiet = _LOUD.sub("", a).strip()
        if len(quiet) >= 15 and quiet != a.strip():
            out.append(quiet[0].upper() + quiet[1:])
        base = quiet if len(quiet) >= 15 else a
        if _TARGET.search(base):
            out.append(_TARGET.sub(lambda _m: rng.choice(targets), base, count=1))
    return list(dict.fromkeys(out))
