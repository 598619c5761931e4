"""Undo common text obfuscation before a prompt is scored.

:func:`normalize` maps a text to a canonical, case-folded form meant for *scoring only*
(never shown to a user or forwarded to a model). The steps, in order:

1. bytes are decoded as UTF-8 with replacement characters (non-UTF-8 input never raises);
2. Unicode tag characters (U+E0020..U+E007E, "ASCII smuggling") are decoded to the ASCII
   they hide; other tag characters are dropped;
3. Unicode NFKC (full-width letters, mathematical alphanumerics, ligatures -> ASCII);
4. zero-width and other invisible format characters are removed;
5. homoglyphs (Cyrillic and Greek look-alikes of Latin letters) are mapped to Latin;
6. base64 segments (16+ characters) that decode to mostly printable UTF-8 are replaced by
   their decoded text (twice, for double encoding);
7. runs of single characters separated by single spaces (``i g n o r e``) are joined;
8. payload splitting (``a = "Ignore all"; b = " instructions"; a + b``): the joined string
   of the assigned fragments is appended;
9. leetspeak inside words made of letters and leet digits or symbols (``1gn0r3``) is
   undone, outside e-mail addresses and links;
10. case folding and whitespace collapsing.

Each obfuscation in :mod:`bastion.llm.transforms` is undone by these steps; the tests check
the two modules against each other.
"""

from __future__ import annotations

import base64
import binascii
import re
import unicodedata

__all__ = ["normalize", "NORMALIZER_VERSION", "strip_invisible", "decode_base64_segments"]

NORMALIZER_VERSION = "2"

# zero-width, joiners, bidi marks and other invisible format characters
_INVISIBLE = dict.fromkeys(
    [0x00AD, 0x034F, 0x061C, 0x115F, 0x1160, 0x17B4, 0x17B5, 0x180E, 0x3164, 0xFEFF, 0xFFA0]
    + list(range(0x200B, 0x2010))
    + list(range(0x202A, 0x202F))
    + list(range(0x2060, 0x2070))
    + list(range(0xFE00, 0xFE10)),
    None,
)

# Cyrillic and Greek letters that look like Latin ones (lower and upper case)
HOMOGLYPHS: dict[str, str] = {
    "а": "a", "е": "e", "о": "o", "р": "p", "с": "c", "у": "y", "х": "x", "і": "i",
    "ј": "j", "ѕ": "s", "һ": "h", "ԁ": "d", "ԛ": "q", "ԝ": "w", "ӏ": "l", "ɡ": "g",
    "А": "A", "В": "B", "Е": "E", "К": "K", "М": "M", "Н": "H", "О": "O", "Р": "P",
    "С": "C", "Т": "T", "Х": "X", "У": "Y", "І": "I", "Ј": "J", "Ѕ": "S",
    "α": "a", "ο": "o", "ν": "v", "ι": "i", "κ": "k", "τ": "t", "ρ": "p",
    "Α": "A", "Β": "B", "Ε": "E", "Ζ": "Z", "Η": "H", "Ι": "I", "Κ": "K", "Μ": "M",
    "Ν": "N", "Ο": "O", "Ρ": "P", "Τ": "T", "Υ": "Y", "Χ": "X",
}  # fmt: skip
_HOMOGLYPH_TABLE = str.maketrans(HOMOGLYPHS)

LEET_DECODE: dict[str, str] = {
    "0": "o", "1": "i", "3": "e", "4": "a", "5": "s", "7": "t", "8": "b", "9": "g",
    "@": "a", "$": "s", "!": "i",
}  # fmt: skip
_LEET_CHARS = set(LEET_DECODE)
_WORD = re.compile(r"[A-Za-z0-9@$!]+")
# e-mail addresses and links keep their digits and "@": they are not leetspeak
# (linear time: a match starts only where a run of address characters starts, and the
# run is taken whole, so a long run without "@" is not rescanned from every position)
_PROTECTED = re.compile(
    r"(?<![\w.+-])[\w.+-]++@[\w-]++(?:\.[\w-]++)+|https?://\S+|www\.\S+"
)
_B64 = re.compile(r"(?<![A-Za-z0-9+/=])[A-Za-z0-9+/]{16,}={0,2}(?![A-Za-z0-9+/=])")
_SPACED = re.compile(r"(?<!\S)(?:\S ){3,}\S(?!\S)")
_ASSIGN = re.compile(r"""\b([A-Za-z_]\w{0,15})\s*=\s*(["'])(.*?)\2""", re.S)
_CONCAT = re.compile(r"\b[A-Za-z_]\w{0,15}\s*\+\s*[A-Za-z_]\w{0,15}\b")
_WS = re.compile(r"\s+")


def _decode_tags(text: str) -> str:
    if not any(0xE0000 <= ord(c) <= 0xE007F for c in text):
        return text
    out = []
    for c in text:
        o = ord(c)
        if 0xE0020 <= o <= 0xE007E:
            out.append(chr(o - 0xE0000))
        elif 0xE0000 <= o <= 0xE007F:
            continue
        else:
            out.append(c)
    return "".join(out)


def strip_invisible(text: str) -> str:
    """Remove zero-width and invisible format characters (keeps everything else)."""
    text = text.translate(_INVISIBLE)
    return "".join(c for c in text if unicodedata.category(c) != "Cf" or c in "\n\t")


def _printable_ratio(s: str) -> float:
    if not s:
        return 0.0
    good = sum(1 for c in s if c.isprintable() or c in "\n\t\r")
    return good / len(s)


def _try_b64(segment: str) -> str | None:
    s = segment.rstrip("=")
    if len(s) % 4 == 1:
        return None
    s = s + "=" * (-len(s) % 4)
    try:
        raw = base64.b64decode(s, validate=True)
        txt = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    # a plain long word (e.g. a hash or identifier) seldom decodes to readable text
    letters = sum(c.isalpha() or c.isspace() for c in txt)
    if len(txt) < 4 or _printable_ratio(txt) < 0.95 or letters < 0.6 * len(txt):
        return None
    return txt


def _b64_sub(m: re.Match[str]) -> str:
    dec = _try_b64(m.group(0))
    return m.group(0) if dec is None else f" {dec} "


def decode_base64_segments(text: str, *, rounds: int = 2) -> str:
    """Replace base64 segments that decode to readable UTF-8 text by that text."""
    for _ in range(rounds):
        new = _B64.sub(_b64_sub, text)
        if new == text:
            break
        text = new
    return text


_SPACED_GROUP = re.compile(r"^(?:\S )+\S$")
_GAP = re.compile(r"( {2,}|\t|\n)")
_SPACED_TAIL = re.compile(r"(?<!\S)(?:\S ){1,}\S$")
_SPACED_HEAD = re.compile(r"^(?:\S ){1,}\S(?!\S)")


def _join_spaced(text: str) -> str:
    # character spacing with wider gaps between words: "i g n o r e   a l l"
    pieces = _GAP.split(text)
    full = [i % 2 == 0 and bool(_SPACED_GROUP.match(p)) for i, p in enumerate(pieces)]
    n_full = sum(full)
    if n_full and (n_full >= 2 or max(len(p) for p, f in zip(pieces, full, strict=True) if f) >= 7):
        out = []
        for i, p in enumerate(pieces):
            if full[i]:
                p = p.replace(" ", "")
            elif i % 2 == 0:
                if i + 2 < len(pieces) and full[i + 2]:  # spaced run at the end of a piece
                    p = _SPACED_TAIL.sub(lambda m: m.group(0).replace(" ", ""), p)
                if i >= 2 and full[i - 2]:  # spaced run at the start of a piece
                    p = _SPACED_HEAD.sub(lambda m: m.group(0).replace(" ", ""), p)
            out.append(p)
        text = "".join(out)
    # single gaps everywhere: join runs of 4+ single characters
    return _SPACED.sub(lambda m: m.group(0).replace(" ", ""), text)


def _leet_core(w: str) -> str | None:
    """The decoded word when ``w`` is a leetspeak word, else ``None``.

    A leetspeak word, once symbols at its edges (``"now!"``, ``"@user"``, ``"$5"``) are set
    aside, is made of letters and leet characters only, with at least one of each:
    ``1gn0r3``, ``s3cr3t`` and ``p@ss`` are; ``base64`` is not (``6`` is not a leet
    character). E-mail addresses and links are set aside before words are looked at
    (:func:`_unleet`)."""
    core = w.strip("@$!")
    if not core:
        return None
    lead = w[: len(w) - len(w.lstrip("@$!"))]
    tail = w[len(lead) + len(core) :]
    has_alpha = has_leet = False
    for c in core:
        if c.isalpha():
            has_alpha = True
        elif c in _LEET_CHARS:
            has_leet = True
        else:
            return None
    if not (has_alpha and has_leet):
        return None
    return lead + "".join(LEET_DECODE.get(c, c) for c in core) + tail


def _unleet_word(m: re.Match[str]) -> str:
    w = m.group(0)
    dec = _leet_core(w)
    return w if dec is None else dec


def _unleet_part(text: str) -> str:
    words = _WORD.findall(text)
    mixed = sum(1 for w in words if _leet_core(w) is not None)
    alpha = sum(1 for w in words if any(c.isalpha() for c in w))
    text = _WORD.sub(_unleet_word, text)
    if mixed >= 2 and mixed >= 0.3 * max(alpha, 1):
        # the text is leetspeak as a whole: short all-digit words are words too ("15" = "is")
        text = _WORD.sub(
            lambda m: (
                "".join(LEET_DECODE[c] for c in m.group(0))
                if len(m.group(0)) <= 4 and all(c in _LEET_CHARS for c in m.group(0))
                else m.group(0)
            ),
            text,
        )
    return text


def _unleet(text: str) -> str:
    """Undo leetspeak outside e-mail addresses and links."""
    pieces = _PROTECTED.split(text)
    if len(pieces) == 1:
        return _unleet_part(text)
    kept = _PROTECTED.findall(text)
    out = [_unleet_part(pieces[0])]
    for k, p in zip(kept, pieces[1:], strict=True):
        out.append(k)
        out.append(_unleet_part(p))
    return "".join(out)


def _join_payload_parts(text: str) -> str:
    parts = _ASSIGN.findall(text)
    if len(parts) >= 2 and _CONCAT.search(text):
        joined = "".join(p[2] for p in parts)
        return f"{text} {joined}"
    return text


def normalize(text: str | bytes) -> str:
    """The canonical, case-folded form of ``text`` used for scoring (see module doc)."""
    if isinstance(text, bytes | bytearray):
        text = bytes(text).decode("utf-8", errors="replace")
    text = _decode_tags(text)
    text = unicodedata.normalize("NFKC", text)
    text = strip_invisible(text)
    text = text.translate(_HOMOGLYPH_TABLE)
    text = decode_base64_segments(text)
    text = _join_spaced(text)
    text = _join_payload_parts(text)
    text = _unleet(text)
    text = text.casefold()
    return _WS.sub(" ", text).strip()
