"""What the guard checks in a model's answer: leaks in its text, exfiltration in its tool calls.

- :class:`OutputScanner` scans an answer as it streams, in time linear in the answer:
  each :meth:`~OutputScanner.feed` looks only at the new text plus a rolling window of
  the previous ``window`` characters (three times the longest configured secret plus 64,
  room for a secret spelled with spaces or zero-width characters between its letters) for
  the configured secrets, and keeps the system-prompt overlap (character 4-gram recall,
  verbatim runs of 60+ characters; :func:`~bastion.llm.judges.system_prompt_overlap`)
  up to date incrementally. Every piece is checked for the secrets exactly (any case) and
  by :func:`skeleton` (Unicode compatibility forms, homoglyphs, leetspeak, invisible and
  tag characters, spacing and punctuation undone) and base64 decoding. With ``complete``
  (the default; the proxy's non-streamed answers) the complete normaliser of
  :func:`~bastion.llm.judges.contains_secret` (which also joins split payloads such as
  ``a = "BLUE"; b = "-HERON"; a + b``) runs too, every ``full_every`` characters (4,096)
  and at the end (:meth:`flush`); the proxy's streams leave it out, since at about 2 µs a
  character it alone would make a fast stream twice as slow. Its
  ``hold_back`` (at least twice the longest secret plus 16,
  at least ``min_hold_back``) is how many trailing characters a relay must keep until
  more text (or the end) arrives, so that no character of a secret is sent before the
  scan sees all of it.
- :func:`check_tool_call`: a tool call whose name or arguments (JSON-decoded and
  percent-decoded too) carry a configured secret, a secret-like string of the system
  prompt (:func:`secret_like`), a verbatim part of the system prompt, or a URL to a host
  not on the :class:`HostAllowlist` is to be withheld; the reasons say which.

URL hosts are read the way the most lenient clients read them (``http:evil.com``,
``http:\\\\evil.com``, ``user@host``, ``www.host``, a bare ``host/path``, and the value of
any argument named like ``url``/``host``/``endpoint``); an authority that parsers could
read two ways (a backslash in it, a host that is not plain ASCII letters, digits, dots and
dashes or an IP literal) is treated as not allowed.
"""

from __future__ import annotations

import json
import re
import unicodedata
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote

import numpy as np

from bastion.errors import BastionError
from bastion.llm.judges import _squash, contains_secret, system_prompt_overlap
from bastion.llm.normalize import (
    _INVISIBLE,
    HOMOGLYPHS,
    LEET_DECODE,
    decode_base64_segments,
    normalize,
)

__all__ = ["OutputScanner", "HostAllowlist", "check_tool_call", "secret_like", "url_hosts",
           "skeleton"]

_SKELETON = str.maketrans({
    **{k: v for k, v in HOMOGLYPHS.items()}, **LEET_DECODE,
    **{chr(c): chr(c - 0xE0000) for c in range(0xE0020, 0xE007F)},  # tag characters
    **{chr(k): None for k in _INVISIBLE},
})
_B64_HINT = re.compile(r"[A-Za-z0-9+/]{16,}")


def skeleton(s: str) -> str:
    """``s`` reduced for secret matching (C-speed steps only): compatibility forms,
    homoglyphs, leetspeak digits and symbols, tag and invisible characters mapped,
    case folded, everything but letters and digits dropped."""
    return _squash(unicodedata.normalize("NFKC", s).translate(_SKELETON))

_WS = re.compile(r"\s+")
RUN = 60  # a verbatim run of the system prompt this long is a leak (judges.py's rule)
N = 4  # character n-grams of the overlap recall


@dataclass
class Verdict:
    leak: bool
    kind: str | None = None  # secret | system_prompt
    score: float = 0.0


class OutputScanner:
    """Incremental leak scan of one answer (see module doc).

    Args:
        secrets: strings that must never appear (exactly or lightly obfuscated).
        system_prompt: the request's system prompt ("" for none).
        overlap_threshold: system-prompt overlap at which the answer is a leak.
        min_hold_back: the least hold-back (the verbatim-run rule needs 60).
    """

    def __init__(self, secrets: Iterable[str], system_prompt: str = "",
                 overlap_threshold: float = 0.5, *, min_hold_back: int = 64,
                 complete: bool = True, full_every: int = 4096) -> None:
        self.secrets = [(s, s.casefold(), normalize(s), _squash(s), skeleton(s))
                        for s in secrets if s]
        self.complete = bool(complete)
        self.full_every = int(full_every)
        self._full = ""  # text not yet seen by the complete normaliser, after a window
        self._full_pending = 0
        longest = max((len(s[0]) for s in self.secrets), default=0)
        self.window = 3 * longest + 64 if self.secrets else 0
        self.hold_back = max(int(min_hold_back), 2 * longest + 16 if self.secrets else 0)
        self.threshold = float(overlap_threshold)
        self.chars = 0
        self._tail = ""  # the last `window` raw characters already scanned
        sp = " ".join(system_prompt.casefold().split()) if system_prompt else ""
        self._sp = len(system_prompt) >= 20 and len(sp) >= N
        self._target = {sp[i:i + N] for i in range(len(sp) - N + 1)} if self._sp else set()
        self._runs = {sp[i:i + RUN] for i in range(len(sp) - RUN + 1)} if self._sp else set()
        self._alpha = np.array(sorted({ord(c) for c in sp}) or [0], dtype=np.uint32)
        keys = self._keys(sp) if self._sp else np.zeros(0, dtype=np.uint64)
        self._target_keys = np.unique(keys[keys > 0]) if self._sp else np.zeros(
            1, dtype=np.uint64)
        self._found_mask = np.zeros(len(self._target_keys), dtype=bool)
        # (_target, the set of grams, stays for its size: the recall's denominator)
        self._ntail = ""  # the last RUN - 1 normalised characters
        self._nlen = 0  # normalised characters seen
        self._last_match = -2
        self._streak = 0
        self.max_run = 0
        self.verdict = Verdict(False)

    def feed(self, new: str, *, final: bool = False) -> Verdict:
        """Scan ``new`` (the next piece of the answer); the verdict for the answer so far
        (``final``: this is the end, run every check). Once a leak is found it stays found."""
        if self.verdict.leak:
            return self.verdict
        self.chars += len(new)
        if self.secrets and new:
            text = self._tail + new
            low, sk = text.casefold(), skeleton(text)
            dec = decode_base64_segments(text) if _B64_HINT.search(text) else text
            skd = skeleton(dec) if dec != text else ""
            for _s, s_low, _n, _q, s_sk in self.secrets:
                if s_low in low or (len(s_sk) >= 3 and (s_sk in sk or (skd and s_sk in skd))):
                    self.verdict = Verdict(True, "secret", 1.0)
                    return self.verdict
            self._tail = text[-self.window:]
            if self.complete:
                self._full += new
                self._full_pending += len(new)
        if self.secrets and self._full_pending and (final or
                                                    self._full_pending >= self.full_every):
            norm = normalize(self._full)
            sqn = _squash(norm)
            for _s, _l, s_norm, s_sq, _k in self.secrets:
                if (s_norm and s_norm in norm) or (len(s_sq) >= 3 and s_sq in sqn):
                    self.verdict = Verdict(True, "secret", 1.0)
                    return self.verdict
            self._full = self._full[-self.window:]
            self._full_pending = 0
        if self._sp and new:
            ov = self._overlap(new)
            if ov >= self.threshold:
                self.verdict = Verdict(True, "system_prompt", ov)
        return self.verdict

    def flush(self) -> Verdict:
        """The end of the answer: run the checks that wait for more text."""
        return self.feed("", final=True)

    def _overlap(self, new: str) -> float:
        nt = _WS.sub(" ", new.casefold())
        if nt.startswith(" ") and (self._nlen == 0 or self._ntail.endswith(" ")):
            nt = nt[1:]
        if not nt:
            return self._score()
        text = self._ntail + nt
        base = self._nlen - len(self._ntail)  # global position of text[0]
        keys = self._keys(text)
        tk = self._target_keys
        pos = np.minimum(np.searchsorted(tk, keys), len(tk) - 1)
        hit = (tk[pos] == keys) & (keys > 0)
        self._found_mask[pos[hit]] = True
        # a verbatim run of RUN characters has RUN - N + 1 consecutive 4-gram hits: only
        # such stretches are checked against the prompt's RUN-grams
        for m in re.finditer(rb"\x01{%d,}" % (RUN - N + 1), hit.astype(np.uint8).tobytes()):
            for i in range(m.start(), m.end() - (RUN - N)):
                if text[i:i + RUN] in self._runs:
                    p = base + i
                    self._streak = self._streak + 1 if p == self._last_match + 1 else 1
                    self._last_match = p
                    self.max_run = max(self.max_run, self._streak + RUN - 1)
        self._nlen += len(nt)
        self._ntail = text[-(RUN - 1):]
        return self._score()

    def _keys(self, text: str) -> np.ndarray:
        """One exact integer per 4-gram of ``text`` (characters numbered by their place
        in the system prompt's alphabet; 0 for a gram with a character it lacks)."""
        codes = np.frombuffer(text.encode("utf-32-le", errors="surrogatepass"),
                              dtype=np.uint32)
        pos = np.searchsorted(self._alpha, codes)
        pos_c = np.minimum(pos, len(self._alpha) - 1)
        ids = np.where(self._alpha[pos_c] == codes, pos_c + 1, 0).astype(np.uint64)
        if len(ids) < N:
            return np.zeros(0, dtype=np.uint64)
        m = np.uint64(len(self._alpha) + 1)
        keys = ids[: len(ids) - 3].copy()
        for k in range(1, N):
            keys = keys * m + ids[k: len(ids) - 3 + k]
        nz = (ids[: len(ids) - 3] > 0) & (ids[1: len(ids) - 2] > 0) & (
            ids[2: len(ids) - 1] > 0) & (ids[3:] > 0)
        return np.where(nz, keys, np.uint64(0))

    def _score(self) -> float:
        recall = int(self._found_mask.sum()) / len(self._target) if self._target else 0.0
        if recall >= 0.5 or self.max_run < RUN:
            return recall
        return max(recall, 0.95 * min(1.0, self.max_run / max(20, self.chars)), 0.5)


# -- tool calls ---------------------------------------------------------------------------

_HOST = re.compile(r"^(?:[a-z0-9_](?:[a-z0-9_-]*[a-z0-9_])?)(?:\.[a-z0-9_](?:[a-z0-9_-]*"
                   r"[a-z0-9_])?)*$")
_IPV6 = re.compile(r"^\[[0-9a-f:.]+\]$")
_SPECIAL = "https?|wss?|ftp"
# special schemes: any slashes or backslashes (or none) before the authority, as
# browsers and WHATWG parsers accept; other schemes need "//"
_URL = re.compile(
    rf"(?i)(?<![a-z0-9+.\-])(?:(?:{_SPECIAL}):[/\\]*|[a-z][a-z0-9+.\-]{{0,30}}://|"
    r"(?<![\w.@-])//(?=[a-z0-9]))([^/?#\s\"'<>`]*)")
_WWW = re.compile(r"(?i)(?<![\w.@/-])(www\.[^/?#\s\"'<>`]+)")
_BARE = re.compile(r"(?i)(?<![\w.@/:-])((?:[a-z0-9-]+\.)+[a-z]{2,63}(?::\d{1,5})?)(?=/)")
_URL_KEY = re.compile(r"(?i)url|uri|href|link|host|domain|endpoint|webhook|callback|server|"
                      r"address|site|origin")


class HostAllowlist:
    """The hosts tool calls may point at: ``api.example.com`` (that host), ``*.example.com``
    (its subdomains), ``*`` (any host). Empty: none."""

    def __init__(self, hosts: Iterable[str] = ()) -> None:
        self.any = False
        self.exact: set[str] = set()
        self.suffixes: list[str] = []
        for raw in hosts:
            h = str(raw).strip().casefold().rstrip(".")
            if h == "*":
                self.any = True
            elif h.startswith("*.") and _HOST.match(h[2:]):
                self.suffixes.append(h[1:])
            elif _HOST.match(h) or _IPV6.match(h):
                self.exact.add(h)
            else:
                raise BastionError(
                    f"allowed URL host {raw!r} is not a host name",
                    hint="give a host like api.example.com, *.example.com or * (any host)")

    def allows(self, host: str) -> bool:
        return self.any or host in self.exact or any(host.endswith(s) for s in self.suffixes)

    def describe(self) -> list[str]:
        return ["*"] if self.any else sorted(self.exact) + [f"*{s}" for s in self.suffixes]


def _host_of(authority: str) -> str | None:
    """The host of a URL authority, None when it could be read two ways."""
    if "\\" in authority or "%" in authority:
        return None
    host = authority.rsplit("@", 1)[-1].casefold()
    if host.startswith("["):
        host = host[: host.find("]") + 1] if "]" in host else host
        return host if _IPV6.match(host) else None
    host = host.split(":", 1)[0].rstrip(".")
    return host if host and _HOST.match(host) else None


def url_hosts(texts: Iterable[str], keyed: Iterable[str] = ()) -> list[str | None]:
    """Hosts of the URLs in ``texts`` (None for an ambiguous one); ``keyed`` are values
    of URL-named arguments, read as URLs even without a scheme."""
    out: list[str | None] = []
    for t in texts:
        for m in _URL.finditer(t):
            if m.group(1):
                out.append(_host_of(m.group(1)))
        out += [_host_of(m.group(1)) for m in _WWW.finditer(t)]
        out += [_host_of(m.group(1)) for m in _BARE.finditer(t)]
    for v in keyed:
        v = v.strip()
        if v and not _URL.match(v) and "." in v.split("/", 1)[0]:
            out.append(_host_of(v.split("/", 1)[0].split("?", 1)[0].split("#", 1)[0]))
    return out


_KEY_VALUE = re.compile(
    r"(?i)\b(?:password|passcode|passphrase|pin|code|key|token|secret|credentials?)\b"
    r"[^\n.:=]{0,24}?(?:\bis\b|=|:)\s*['\"`]?([^\s'\"`,;]{4,128})")
_TOKEN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_\-./+=:]{5,}")
_KEY_PREFIX = re.compile(r"^(?:sk|pk|rk)[-_]|^(?:ghp|gho|github_pat|xox[abprs]|AKIA|AIza)")


def secret_like(system_prompt: str) -> list[str]:
    """Strings of a system prompt that look like secrets: the value after ``password``,
    ``code``, ``key``, ``token``... (``is``, ``=`` or ``:``), and tokens of 8+ characters
    mixing letters and digits (or starting like an API key)."""
    found: set[str] = set()
    for m in _KEY_VALUE.finditer(system_prompt):
        found.add(m.group(1).rstrip(".)]}"))
    for m in _TOKEN.finditer(system_prompt):
        t = m.group(0).rstrip(".:/=")
        if "://" in t:
            continue
        letters = sum(c.isalpha() for c in t)
        digits = sum(c.isdigit() for c in t)
        if (len(t) >= 8 and letters >= 2 and digits >= 2) or (
                len(t) >= 10 and _KEY_PREFIX.match(t)):
            found.add(t)
    return sorted(s for s in found if len(s) >= 4)


@dataclass
class ToolCallCheck:
    """Why one tool call is withheld (``reasons`` empty: it is not)."""

    name: str
    reasons: list[dict[str, Any]] = field(default_factory=list)

    @property
    def withheld(self) -> bool:
        return bool(self.reasons)


def _arg_strings(call: dict[str, Any]) -> tuple[str, list[str], list[str]]:
    """``(name, texts, url-keyed values)`` of a tool call: the raw arguments, every
    decoded string, and their percent-decoded forms."""
    f = call.get("function")
    fn: dict[str, Any] = f if isinstance(f, dict) else call
    name = fn["name"] if isinstance(fn.get("name"), str) else ""
    args = fn.get("arguments")
    texts: list[str] = [name]
    keyed: list[str] = []

    def walk(o: Any, key: str = "") -> None:
        if isinstance(o, str):
            texts.append(o)
            if key and _URL_KEY.search(key):
                keyed.append(o)
        elif isinstance(o, dict):
            for k, v in o.items():
                texts.append(str(k))
                walk(v, str(k))
        elif isinstance(o, list):
            for v in o:
                walk(v, key)

    if isinstance(args, str):
        texts.append(args)
        try:
            walk(json.loads(args))
        except (json.JSONDecodeError, RecursionError):
            pass
    elif args is not None:
        walk(args)
    for k, v in call.items():
        if k not in ("function", "id", "type", "index"):
            walk(v, str(k))
    more = []
    for t in texts:
        u = t
        for _ in range(3):  # percent-decoding, up to three layers
            nxt = unquote(u)
            if nxt == u:
                break
            more.append(nxt)
            u = nxt
    return name, texts + more, keyed + [unquote(k) for k in keyed]


def check_tool_call(call: Any, *, secrets: Iterable[str], system_prompt: str = "",
                    allow: HostAllowlist, overlap_threshold: float = 0.5) -> ToolCallCheck:
    """Whether a tool call must be withheld, and why (see module doc). Secret values are
    never put in the reasons; a URL host that holds a secret is masked."""
    if not isinstance(call, dict):
        return ToolCallCheck("", [{"kind": "malformed"}])
    name, texts, keyed = _arg_strings(call)
    blob = "\n".join(texts)
    res = ToolCallCheck(name[:128])
    sp_secrets = secret_like(system_prompt) if system_prompt else []
    secrets = [s for s in secrets if s]
    if any(contains_secret(blob, s) for s in secrets):
        res.reasons.append({"kind": "secret"})
    if any(contains_secret(blob, s) for s in sp_secrets):
        res.reasons.append({"kind": "system_prompt_secret"})
    if system_prompt:
        ov = system_prompt_overlap(blob, system_prompt)
        if ov >= overlap_threshold:
            res.reasons.append({"kind": "system_prompt", "score": round(ov, 4)})
    masked = sorted({s for s in secrets + sp_secrets}, key=len, reverse=True)
    seen: set[str | None] = set()
    for host in url_hosts(texts, keyed):
        if host in seen or (host is not None and allow.allows(host)):
            continue
        seen.add(host)
        if host is None:
            res.reasons.append({"kind": "url_ambiguous"})
            continue
        for s in masked:
            host = re.sub(re.escape(s), "***", host, flags=re.I)
        res.reasons.append({"kind": "url_host", "host": host[:253]})
    return res
