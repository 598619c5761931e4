"""A prompt-injection and jailbreak detector: normalise, chunk, featurise, classify, take the max.

:class:`PromptInjectionDetector` follows the Bastion detector contract: ``fit(texts, y)``,
``score(texts)`` (probability of an attack, higher is more suspicious), ``calibrate(benign,
fpr=0.01)`` sets ``threshold_``, ``predict(texts)`` returns a boolean array.

Pipeline for one text: :func:`~bastion.llm.normalize.normalize` (undo obfuscation) ->
:func:`~bastion.llm.embed.chunk_text` (overlapping windows of about 500 characters) ->
features -> a logistic-regression head -> maximum over chunks. The features of a chunk are
its MiniLM sentence embedding (meaning) and, side by side, hashed TF-IDF character 3-5-grams
and word 1-2-grams (exact wording that embeddings blur: "ignore previous instructions",
"system prompt", "DAN", markup of planted instructions) and four text statistics
(:mod:`bastion.llm.textstats`: how much of the chunk is gibberish, as optimised adversarial
suffixes are). Every chunk of a text is scored, however long the text (an injection in
the middle of a long document counts as much as one at its start); the chunks of all
texts of one call go through the embedder together, in batches. The n-grams are hashed with
scikit-learn's ``HashingVectorizer`` (murmurhash3, stateless), so only their IDF weights and
coefficients are stored, as plain arrays.

Training is chunk-level with ``mil_rounds`` (default one) rounds of multiple-instance
refinement: first every chunk of an attack counts as an attack; then, for attacks with
several chunks, only the chunks the previous head finds suspicious (or the most suspicious
one) stay positive, so benign text around a planted injection (an e-mail, a document) is
not learned as "attack". Classes are balanced; per-text ``sample_weight`` multiplies that
(the shipped detector weighs injections 4x, so that the rarer planted-instruction attacks
are not drowned by jailbreaks, and plain harmful requests, a negative class, 0.3x).

Persistence (never pickle): ``head.safetensors`` (``coef``, ``intercept``, ``coef_stats``
with the statistics and, with n-gram features,
``coef_char``/``idf_char``/``coef_word``/``idf_word``) and
``detector.json`` (threshold, chunking, versions, training summary). A detector trained on
the shared corpus ships inside the package (:meth:`PromptInjectionDetector.load_default`)
with a ``NOTICE`` listing its training data and licences.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from bastion._util import atomic_path, write_json_atomic
from bastion.errors import DataError, ModelError
from bastion.llm.embed import Embedder, chunk_text, get_embedder, layers_of
from bastion.llm.normalize import NORMALIZER_VERSION, normalize
from bastion.llm.textstats import STATS_NAMES, STATS_VERSION, text_stats

__all__ = ["PromptInjectionDetector", "DEFAULT_DETECTOR_DIR", "sentence_windows"]

FORMAT_VERSION = 2

# the hashed n-gram blocks: name -> HashingVectorizer settings (lowercase: texts are
# already case-folded by the normaliser)
NGRAM_BLOCKS: dict[str, dict[str, Any]] = {
    "char": {"analyzer": "char_wb", "ngram_range": (3, 5)},
    "word": {"analyzer": "word", "ngram_range": (1, 2), "token_pattern": r"(?u)\b\w+\b"},
}


_SENTENCE_END = re.compile(r"(?<=[.!?。！？\n])\s+|\n+")


def sentence_windows(text: str, max_chars: int) -> list[str]:
    """``text`` cut at sentence ends and line breaks into windows of consecutive sentences
    of at most ``max_chars`` characters (a longer sentence is one window of its own, cut
    by :func:`~bastion.llm.embed.chunk_text`)."""
    out: list[str] = []
    cur = ""
    for sent in (x.strip() for x in _SENTENCE_END.split(text)):
        if not sent:
            continue
        if cur and len(cur) + 1 + len(sent) > max_chars:
            out.append(cur)
            cur = ""
        if len(sent) > max_chars:
            out.extend(chunk_text(sent, chunk_chars=max_chars, overlap=max_chars // 5))
            continue
        cur = f"{cur} {sent}" if cur else sent
    if cur:
        out.append(cur)
    return out


class _Ngrams:
    """Hashed TF-IDF n-gram blocks: sublinear term frequency times IDF, unit length per
    block. Stateless hashing; :meth:`fit` learns only the IDF vector of each block."""

    def __init__(self, n_features: int, blocks: Sequence[str] = tuple(NGRAM_BLOCKS)) -> None:
        from sklearn.feature_extraction.text import HashingVectorizer

        self.n_features = n_features
        self.vec = {
            k: HashingVectorizer(
                n_features=n_features,
                alternate_sign=False,
                norm=None,
                lowercase=True,
                dtype=np.float32,
                **spec,
            )
            for k, spec in NGRAM_BLOCKS.items()
            if k in blocks
        }
        self.idf: dict[str, np.ndarray] = {}

    def _tf(self, name: str, texts: list[str]) -> Any:
        x = self.vec[name].transform(texts).tocsr()
        x.data = np.log1p(x.data).astype(np.float32)
        return x

    def fit(self, texts: list[str]) -> _Ngrams:
        for k in self.vec:
            x = self._tf(k, texts)
            df = np.bincount(x.indices, minlength=self.n_features).astype(np.float64)
            n = x.shape[0]
            self.idf[k] = (np.log((1.0 + n) / (1.0 + df)) + 1.0).astype(np.float32)
        return self

    def logit(self, texts: list[str], coef: np.ndarray) -> np.ndarray:
        """``transform(texts) @ coef`` without building the stacked matrix (scoring path)."""
        out = np.zeros(len(texts), dtype=np.float64)
        for b, k in enumerate(self.vec):
            x = self._tf(k, texts)
            cb = coef[b * self.n_features : (b + 1) * self.n_features]
            vals = x.data.astype(np.float64) * self.idf[k][x.indices]
            rows = np.repeat(np.arange(x.shape[0]), np.diff(x.indptr))
            norm = np.sqrt(np.bincount(rows, weights=vals * vals, minlength=x.shape[0]))
            dot = np.bincount(rows, weights=vals * cb[x.indices], minlength=x.shape[0])
            out += np.divide(dot, norm, out=np.zeros_like(dot), where=norm > 0)
        return out

    def transform(self, texts: list[str]) -> Any:
        """``(len(texts), n_blocks * n_features)`` sparse features."""
        from scipy import sparse
        from sklearn.preprocessing import normalize as l2

        blocks = []
        for k in self.vec:
            x = self._tf(k, texts)
            x = x.multiply(self.idf[k][None, :]).tocsr()
            blocks.append(l2(x, norm="l2", copy=False))
        return sparse.hstack(blocks, format="csr", dtype=np.float32)


DEFAULT_DETECTOR_DIR = "detector"


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))


def _as_texts(texts: Sequence[str | bytes] | str) -> list[str]:
    if isinstance(texts, str | bytes):
        texts = [texts]
    out = []
    for t in texts:
        if isinstance(t, bytes | bytearray):
            t = bytes(t).decode("utf-8", errors="replace")
        if not isinstance(t, str):
            raise DataError(f"expected text, got {type(t).__name__}")
        out.append(t)
    return out


class PromptInjectionDetector:
    """Embedding + n-gram logistic-regression prompt-injection detector (see module doc).

    Args:
        C: inverse L2 regularisation of the logistic-regression head.
        ngram_features: hashed features per n-gram block (character 3-5-grams, word
            1-2-grams); ``0`` uses the embedding alone.
        emb_scale: weight of the (unit-length) embedding next to the (unit-length) n-gram
            blocks during training; folded into the stored coefficients. The default 2
            was chosen by 5-fold cross-validation on the shared corpus's train split with
            the 3-layer embedder (mean TPR at 1% FPR: 0.5 → 0.899, 1 → 0.915, 2 → 0.925,
            3 → 0.922, 4 → 0.910).
        stats_scale: weight of the text statistics block during training (``0``: no
            statistics); folded into the stored coefficients.
        ngram_blocks: which n-gram blocks to use (``"char"``: character 3-5-grams,
            ``"word"``: word 1-2-grams).
        doc_windows: when above 0, :meth:`score` also scores the sentence windows (up to
            this many characters, :func:`sentence_windows`) of texts longer than one
            chunk and takes the maximum over all, so that one planted sentence in a long
            document is scored without the benign text around it (training is unchanged).
        proto_scale: when above 0, two intent-prototype features join the head (weight
            ``proto_scale``): a chunk's largest cosine similarity to ``n_protos`` k-means
            centroids of the training attack chunks' embeddings, and to ``n_protos`` of
            the benign chunks' (a max over prototypes: not a linear function of the
            embedding); the centroids are saved with the head.
        n_protos: centroids per class for ``proto_scale``.
        stats_version: definition of the text statistics
            (:data:`~bastion.llm.textstats.STATS_VERSION`; detectors saved without one
            load with version 1).
        mil_rounds: rounds of multiple-instance refinement (see module doc).
        chunk_chars: characters per chunk; ``overlap``: characters shared by neighbours.
        max_chunks: chunks per text at most (None: no limit); a longer text is refused
            with a :class:`~bastion.errors.DataError`, never scored in part.
        use_normalizer: undo obfuscation before scoring (on by default).
        embedder: an :class:`~bastion.llm.embed.Embedder` (default: the shared one, the
            first 3 MiniLM layers); :meth:`save` records its name and :meth:`load`
            refuses an embedder with another.
        seed: seed of the head's solver.
    """

    def __init__(
        self,
        *,
        C: float = 16.0,
        chunk_chars: int = 500,
        overlap: int = 100,
        max_chunks: int | None = None,
        use_normalizer: bool = True,
        embedder: Embedder | None = None,
        seed: int = 0,
        ngram_features: int = 2**17,
        emb_scale: float = 2.0,
        mil_rounds: int = 1,
        stats_scale: float = 3.0,
        ngram_blocks: Sequence[str] = ("char", "word"),
        stats_version: int = STATS_VERSION,
        doc_windows: int = 0,
        proto_scale: float = 0.0,
        n_protos: int = 32,
    ) -> None:
        if ngram_features < 0:
            raise DataError(f"ngram_features must be >= 0, got {ngram_features}")
        unknown = set(ngram_blocks) - set(NGRAM_BLOCKS)
        if unknown or not ngram_blocks:
            raise DataError(f"unknown n-gram blocks {sorted(unknown) or '(none)'}",
                            hint=f"choose from {', '.join(NGRAM_BLOCKS)}")
        self.ngram_blocks = tuple(k for k in NGRAM_BLOCKS if k in ngram_blocks)
        self.stats_version = int(stats_version)
        if doc_windows < 0:
            raise DataError(f"doc_windows must be >= 0, got {doc_windows}")
        self.doc_windows = int(doc_windows)
        self.C = C
        self.ngram_features = int(ngram_features)
        self.emb_scale = float(emb_scale)
        self.mil_rounds = int(mil_rounds)
        if stats_scale < 0:
            raise DataError(f"stats_scale must be >= 0, got {stats_scale}")
        self.stats_scale = float(stats_scale)
        if proto_scale < 0 or n_protos < 1:
            raise DataError(f"proto_scale must be >= 0 and n_protos >= 1, got {proto_scale}"
                            f" and {n_protos}")
        self.proto_scale = float(proto_scale)
        self.n_protos = int(n_protos)
        self.protos_: tuple[np.ndarray, np.ndarray] | None = None
        self.coef_proto_: np.ndarray | None = None
        self.coef_stats_: np.ndarray | None = None
        self._ngrams: _Ngrams | None = None
        self.coef_ngram_: np.ndarray | None = None
        self.chunk_chars = chunk_chars
        self.overlap = overlap
        self.max_chunks = max_chunks
        self.use_normalizer = use_normalizer
        self.embedder = embedder
        self.seed = seed
        self.coef_: np.ndarray | None = None
        self.intercept_: float | None = None
        self.threshold_: float = 0.5
        self.calibration_: dict[str, Any] = {}
        self.meta_: dict[str, Any] = {}

    # -- pieces ---------------------------------------------------------------------
    @property
    def _emb(self) -> Embedder:
        return self.embedder if self.embedder is not None else get_embedder()

    def chunks(self, text: str | bytes, *, windows: bool = False) -> list[str]:
        """The (normalised) chunks of one text that are scored; with ``windows`` (what
        :meth:`score` uses) and ``doc_windows`` set, a text longer than one chunk also
        gets its sentence windows (:func:`sentence_windows`)."""
        t = normalize(text) if self.use_normalizer else _as_texts([text])[0]
        ch = chunk_text(t, chunk_chars=self.chunk_chars, overlap=self.overlap)
        if self.max_chunks is not None and len(ch) > self.max_chunks:
            raise DataError(
                f"a text of {len(t)} characters makes {len(ch)} chunks, over max_chunks="
                f"{self.max_chunks}; it is not scored in part",
                hint="shorten the text or raise max_chunks")
        if windows and self.doc_windows and len(t) > self.chunk_chars:
            extra = [w for w in sentence_windows(t, self.doc_windows) if w not in ch]
            ch = ch + extra[: self.max_chunks]
        return ch

    def _chunked(self, texts: list[str], *, windows: bool = False
                 ) -> tuple[list[str], np.ndarray]:
        all_chunks: list[str] = []
        owner: list[int] = []
        for i, t in enumerate(texts):
            ch = self.chunks(t, windows=windows)
            all_chunks.extend(ch)
            owner.extend([i] * len(ch))
        return all_chunks, np.asarray(owner, dtype=np.int64)

    def _check_fitted(self) -> None:
        if self.coef_ is None or self.intercept_ is None:
            raise ModelError(
                "the detector is not fitted",
                hint="call fit(texts, labels) or PromptInjectionDetector.load_default()",
            )

    def _chunk_scores(self, chunks: list[str], emb: np.ndarray) -> np.ndarray:
        self._check_fitted()
        assert self.coef_ is not None and self.intercept_ is not None
        z = emb @ self.coef_ + self.intercept_
        if self.protos_ is not None and self.coef_proto_ is not None:
            z = z + self._proto_feats(emb) @ self.coef_proto_
        if self.coef_stats_ is not None:
            z = z + text_stats(chunks, version=self.stats_version) @ self.coef_stats_
        if self._ngrams is not None and self.coef_ngram_ is not None:
            z = z + self._ngrams.logit(chunks, self.coef_ngram_)
        return _sigmoid(z)

    def _proto_feats(self, emb: np.ndarray) -> np.ndarray:
        """``(n, 2)``: largest cosine to the attack and to the benign prototypes."""
        assert self.protos_ is not None
        e = emb / np.maximum(np.linalg.norm(emb, axis=1, keepdims=True), 1e-9)
        return np.stack([(e @ self.protos_[0].T).max(1), (e @ self.protos_[1].T).max(1)],
                        1).astype(np.float32)

    def logit_parts(self, chunks: Sequence[str]) -> dict[str, np.ndarray]:
        """Each feature block's share of the head's logit for already-normalised
        ``chunks`` (``embedding``, ``stats``, one per n-gram block, ``intercept``): what
        a score rests on, e.g. to check that no block keys on a script."""
        self._check_fitted()
        assert self.coef_ is not None and self.intercept_ is not None
        ch = list(chunks)
        e = self._emb.encode(ch)
        out = {"embedding": e @ self.coef_, "intercept": np.full(len(ch), self.intercept_)}
        if self.protos_ is not None and self.coef_proto_ is not None:
            out["prototypes"] = self._proto_feats(e) @ self.coef_proto_
        if self.coef_stats_ is not None:
            out["stats"] = text_stats(ch, version=self.stats_version) @ self.coef_stats_
        if self._ngrams is not None and self.coef_ngram_ is not None:
            n = self._ngrams.n_features
            for b, k in enumerate(self._ngrams.vec):
                one = _Ngrams(n, (k,))
                one.idf = {k: self._ngrams.idf[k]}
                out[k] = one.logit(ch, self.coef_ngram_[b * n : (b + 1) * n])
        return out

    # -- contract -------------------------------------------------------------------
    def fit(
        self,
        texts: Sequence[str],
        y: Sequence[int] | np.ndarray,
        *,
        sample_weight: Sequence[float] | np.ndarray | None = None,
    ) -> PromptInjectionDetector:
        """Train the head on ``texts`` with labels ``y`` (1 = injection/jailbreak).

        Classes are balanced; ``sample_weight`` (one per text, e.g. more weight for hard
        negatives) multiplies that balance."""
        from scipy import sparse
        from sklearn.linear_model import LogisticRegression

        tx = _as_texts(texts)
        yy = np.asarray(y, dtype=np.int64).ravel()
        if len(tx) != len(yy):
            raise DataError(f"{len(tx)} texts but {len(yy)} labels")
        if len(set(yy.tolist())) != 2 or not set(yy.tolist()) <= {0, 1}:
            raise DataError("labels must be 0 (benign) and 1 (attack), with both present")
        sw = (
            np.ones(len(tx))
            if sample_weight is None
            else np.asarray(sample_weight, dtype=np.float64).ravel()
        )
        if len(sw) != len(tx) or not np.all(np.isfinite(sw)) or np.any(sw < 0):
            raise DataError("sample_weight needs one finite, non-negative weight per text")
        chunks, owner = self._chunked(tx)
        emb = self._emb.encode(chunks)
        yc = yy[owner]
        wc = sw[owner]
        dense = [emb * self.emb_scale]
        if self.stats_scale:
            dense.append(text_stats(chunks, version=self.stats_version) * self.stats_scale)
        self.protos_ = None
        if self.proto_scale:
            from sklearn.cluster import KMeans

            def centres(x: np.ndarray) -> np.ndarray:
                k = min(self.n_protos, len(x))
                c = KMeans(k, n_init=1, random_state=self.seed).fit(x).cluster_centers_
                return (c / np.linalg.norm(c, axis=1, keepdims=True)).astype(np.float32)

            self.protos_ = (centres(emb[yc == 1]), centres(emb[yc == 0]))
            dense.append(self._proto_feats(emb) * self.proto_scale)
        dense_feats = np.hstack(dense) if len(dense) > 1 else dense[0]
        if self.ngram_features:
            self._ngrams = _Ngrams(self.ngram_features, self.ngram_blocks).fit(chunks)
            feats: Any = sparse.hstack(
                [sparse.csr_matrix(dense_feats), self._ngrams.transform(chunks)],
                format="csr",
            )
        else:
            self._ngrams = None
            feats = dense_feats
        d = emb.shape[1]
        dp = d + (len(STATS_NAMES) if self.stats_scale else 0)
        ds = dp + (2 if self.protos_ is not None else 0)

        # one solver for all rounds: a refinement round starts from the previous head
        # (the same convex problem's optimum, reached in fewer iterations)
        clf = LogisticRegression(C=self.C, max_iter=3000, random_state=self.seed,
                                 warm_start=True)

        def train(mask: np.ndarray) -> None:
            # class balance by hand so that sample weights multiply it
            w = wc[mask].copy()
            ym = yc[mask]
            for c in (0, 1):
                tot = w[ym == c].sum()
                if tot > 0:
                    w[ym == c] *= len(ym) / (2.0 * tot)
            clf.fit(feats[mask], ym, sample_weight=w)
            coef = clf.coef_[0]
            self.coef_ = (coef[:d] * self.emb_scale).astype(np.float32)
            self.coef_stats_ = (
                (coef[d:dp] * self.stats_scale).astype(np.float32) if self.stats_scale else None
            )
            self.coef_proto_ = ((coef[dp:ds] * self.proto_scale).astype(np.float32)
                                if self.protos_ is not None else None)
            self.coef_ngram_ = coef[ds:].astype(np.float32) if self.ngram_features else None
            self.intercept_ = float(clf.intercept_[0])

        train(np.ones(len(chunks), dtype=bool))
        # multiple-instance refinement: keep suspicious chunks of multi-chunk attacks
        counts = np.bincount(owner, minlength=len(tx))
        multi = np.flatnonzero((yy == 1) & (counts > 1))
        keep = np.ones(len(chunks), dtype=bool)
        for _ in range(self.mil_rounds if len(multi) else 0):
            s = self._chunk_scores(chunks, emb)
            keep = np.ones(len(chunks), dtype=bool)
            for i in multi:
                idx = np.flatnonzero(owner == i)
                k = s[idx] >= 0.5
                k[np.argmax(s[idx])] = True
                keep[idx[~k]] = False
            train(keep)
        self.meta_ = {
            "n_texts": int(len(tx)),
            "n_attacks": int(yy.sum()),
            "n_chunks": int(len(chunks)),
            "n_chunks_dropped_mil": int((~keep).sum()),
        }
        return self

    def score(self, texts: Sequence[str | bytes] | str) -> np.ndarray:
        """Attack probability per text: the maximum over its chunks."""
        tx = _as_texts(texts)
        self._check_fitted()
        if not tx:
            return np.zeros(0, dtype=np.float64)
        chunks, owner = self._chunked(tx, windows=True)
        s = self._chunk_scores(chunks, self._emb.encode(chunks))
        out = np.full(len(tx), -np.inf)
        np.maximum.at(out, owner, s)
        return out.astype(np.float64)

    def score_chunks(self, text: str | bytes) -> list[tuple[str, float]]:
        """``(chunk, score)`` for every scored chunk of one text."""
        ch = self.chunks(text, windows=True)
        s = self._chunk_scores(ch, self._emb.encode(ch))
        return list(zip(ch, s.astype(float).tolist(), strict=True))

    def calibrate(
        self, x_benign: Sequence[str] | np.ndarray, *, fpr: float = 0.01
    ) -> PromptInjectionDetector:
        """Set ``threshold_`` so that at most ``fpr`` of ``x_benign`` is flagged.

        ``x_benign`` is a list of texts or an array of their precomputed scores.
        """
        if not 0 < fpr < 1:
            raise DataError(f"fpr must be in (0, 1), got {fpr}")
        if isinstance(x_benign, np.ndarray) and x_benign.dtype.kind == "f":
            s = x_benign.astype(np.float64)
        else:
            s = self.score(list(x_benign))
        if len(s) == 0:
            raise DataError("calibration needs at least one benign text")
        # the smallest threshold whose flagged share (score > t) is at most fpr
        srt = np.sort(s)[::-1]
        k = int(np.floor(fpr * len(s)))
        self.threshold_ = float(np.nextafter(srt[min(k, len(srt) - 1)], np.inf))
        self.calibration_ = {
            "target_fpr": fpr,
            "n_benign": int(len(s)),
            "achieved_fpr": float(np.mean(s >= self.threshold_)),
        }
        return self

    def predict(self, texts: Sequence[str | bytes] | str) -> np.ndarray:
        """``True`` where the text is flagged (score at or above ``threshold_``)."""
        return self.score(texts) >= self.threshold_

    # -- persistence ----------------------------------------------------------------
    def save(self, directory: str | os.PathLike[str]) -> Path:
        """Write ``head.safetensors`` and ``detector.json`` into ``directory``."""
        from safetensors.numpy import save_file

        self._check_fitted()
        assert self.coef_ is not None
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        tensors = {
            "coef": np.ascontiguousarray(self.coef_, dtype=np.float32),
            "intercept": np.asarray([self.intercept_], dtype=np.float32),
        }
        if self.coef_stats_ is not None:
            tensors["coef_stats"] = np.ascontiguousarray(self.coef_stats_, dtype=np.float32)
        if self.protos_ is not None and self.coef_proto_ is not None:
            tensors["protos_attack"] = np.ascontiguousarray(self.protos_[0], dtype=np.float32)
            tensors["protos_benign"] = np.ascontiguousarray(self.protos_[1], dtype=np.float32)
            tensors["coef_proto"] = np.ascontiguousarray(self.coef_proto_, dtype=np.float32)
        if self._ngrams is not None and self.coef_ngram_ is not None:
            n = self._ngrams.n_features
            for i, k in enumerate(self._ngrams.vec):
                tensors[f"coef_{k}"] = np.ascontiguousarray(
                    self.coef_ngram_[i * n : (i + 1) * n], dtype=np.float32
                )
                tensors[f"idf_{k}"] = np.ascontiguousarray(self._ngrams.idf[k], dtype=np.float32)
        with atomic_path(d / "head.safetensors") as tmp:
            save_file(tensors, str(tmp))
        write_json_atomic(
            d / "detector.json",
            {
                "format_version": FORMAT_VERSION,
                "kind": "bastion.llm.PromptInjectionDetector",
                "embedder": str(getattr(self._emb, "name", "unknown")),
                "normalizer_version": NORMALIZER_VERSION,
                "head": "logistic_regression",
                "text_stats": list(STATS_NAMES) if self.coef_stats_ is not None else None,
                "ngrams": (
                    {
                        "hashing": "sklearn HashingVectorizer (murmurhash3), alternate_sign=False",
                        "n_features": self._ngrams.n_features,
                        "blocks": {
                            k: {kk: list(v) if isinstance(v, tuple) else v for kk, v in b.items()}
                            for k, b in NGRAM_BLOCKS.items()
                            if k in self._ngrams.vec
                        },
                        "tf": "log1p",
                    }
                    if self._ngrams is not None
                    else None
                ),
                "threshold": self.threshold_,
                "calibration": self.calibration_,
                "params": {
                    "C": self.C,
                    "chunk_chars": self.chunk_chars,
                    "overlap": self.overlap,
                    "max_chunks": self.max_chunks,
                    "use_normalizer": self.use_normalizer,
                    "seed": self.seed,
                    "ngram_features": self.ngram_features if self._ngrams is not None else 0,
                    "emb_scale": self.emb_scale,
                    "mil_rounds": self.mil_rounds,
                    "stats_scale": self.stats_scale if self.coef_stats_ is not None else 0.0,
                    "ngram_blocks": list(self.ngram_blocks),
                    "stats_version": self.stats_version,
                    "doc_windows": self.doc_windows,
                    "proto_scale": self.proto_scale if self.protos_ is not None else 0.0,
                    "n_protos": self.n_protos,
                },
                "meta": self.meta_,
            },
        )
        return d

    @classmethod
    def load(
        cls, directory: str | os.PathLike[str], *, embedder: Embedder | None = None
    ) -> PromptInjectionDetector:
        """Load a detector written by :meth:`save`."""
        from safetensors.numpy import load_file

        d = Path(directory)
        meta_path, head_path = d / "detector.json", d / "head.safetensors"
        if not meta_path.exists() or not head_path.exists():
            raise ModelError(
                f"no detector in {d}", hint="expected detector.json and head.safetensors"
            )
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            tensors = load_file(str(head_path))
        except Exception as exc:
            raise ModelError(f"cannot read the detector in {d}: {exc}") from exc
        # the vectors the head was trained on: the given embedder must make the same ones
        trained_on = str(meta.get("embedder"))
        if embedder is None:
            try:
                embedder = get_embedder(layers_of(trained_on))
            except ModelError:
                raise ModelError(
                    f"detector in {d} was trained on embedder {trained_on!r}, which Bastion "
                    "cannot build", hint="pass that embedder: load(..., embedder=...)",
                ) from None
        elif getattr(embedder, "name", None) != trained_on:
            raise ModelError(
                f"detector in {d} was trained on embedder {trained_on!r}, not "
                f"{getattr(embedder, 'name', None)!r}",
                hint="load it with the embedder it was trained with (or with none)",
            )
        p = meta.get("params", {})
        det = cls(
            C=p.get("C", 16.0),
            chunk_chars=p.get("chunk_chars", 500),
            overlap=p.get("overlap", 100),
            # detectors saved before every chunk was scored stored a scoring cap here
            # (200: the first and last 100 chunks); it is not a limit to keep
            max_chunks=None,
            use_normalizer=p.get("use_normalizer", True),
            seed=p.get("seed", 0),
            embedder=embedder,
            ngram_features=int(p.get("ngram_features", 0)),
            emb_scale=float(p.get("emb_scale", 1.0)),
            mil_rounds=int(p.get("mil_rounds", 1)),
            stats_scale=float(p.get("stats_scale", 0.0)),
            ngram_blocks=tuple(p.get("ngram_blocks", ("char", "word"))),
            stats_version=int(p.get("stats_version", 1)),
            doc_windows=int(p.get("doc_windows", 0)),
            proto_scale=float(p.get("proto_scale", 0.0)),
            n_protos=int(p.get("n_protos", 32)),
        )
        if int(meta.get("format_version", 1)) > FORMAT_VERSION:
            raise ModelError(
                f"detector in {d} has format {meta.get('format_version')}",
                hint="it was written by a newer Bastion; upgrade",
            )
        coef = tensors["coef"].astype(np.float32).ravel()
        if coef.shape != (det._emb.dim,):
            raise ModelError(f"detector head in {d} has shape {coef.shape}")
        if det.ngram_features:
            ng = _Ngrams(det.ngram_features, det.ngram_blocks)
            parts = []
            for k in ng.vec:
                ck, ik = tensors.get(f"coef_{k}"), tensors.get(f"idf_{k}")
                if ck is None or ik is None:
                    raise ModelError(f"detector head in {d} lacks the {k} n-gram weights")
                ck, ik = ck.astype(np.float32).ravel(), ik.astype(np.float32).ravel()
                if ck.shape != (det.ngram_features,) or ik.shape != (det.ngram_features,):
                    raise ModelError(f"{k} n-gram weights in {d} have the wrong shape")
                ng.idf[k] = ik
                parts.append(ck)
            det._ngrams = ng
            det.coef_ngram_ = np.concatenate(parts)
        cs = tensors.get("coef_stats")
        if det.stats_scale:
            if cs is None or cs.ravel().shape != (len(STATS_NAMES),):
                raise ModelError(f"detector head in {d} lacks the text-statistics weights")
            det.coef_stats_ = cs.astype(np.float32).ravel()
        if det.proto_scale:
            pa, pb, cp = (tensors.get(k) for k in ("protos_attack", "protos_benign",
                                                    "coef_proto"))
            dim = det._emb.dim
            if (pa is None or pb is None or cp is None or pa.ndim != 2 or pb.ndim != 2
                    or pa.shape[1] != dim or pb.shape[1] != dim or cp.ravel().shape != (2,)):
                raise ModelError(f"detector head in {d} lacks valid intent prototypes",
                                 hint="retrain it, or set params.proto_scale to 0")
            det.protos_ = (pa.astype(np.float32), pb.astype(np.float32))
            det.coef_proto_ = cp.astype(np.float32).ravel()
        if meta.get("normalizer_version", NORMALIZER_VERSION) != NORMALIZER_VERSION:
            warnings.warn(
                f"the detector in {d} was trained with normalizer version "
                f"{meta.get('normalizer_version')}, this is {NORMALIZER_VERSION}: scores may "
                "shift; retrain it (bastion llm train-detector)",
                stacklevel=2,
            )
        det.coef_ = coef
        det.intercept_ = float(tensors["intercept"].ravel()[0])
        det.threshold_ = float(meta.get("threshold", 0.5))
        det.calibration_ = dict(meta.get("calibration", {}))
        det.meta_ = dict(meta.get("meta", {}))
        return det

    @classmethod
    def load_default(cls, *, embedder: Embedder | None = None) -> PromptInjectionDetector:
        """The detector shipped with Bastion (trained on the shared corpus, see NOTICE)."""
        path = resources.files("bastion.llm") / "data" / DEFAULT_DETECTOR_DIR
        with resources.as_file(path) as p:
            return cls.load(p, embedder=embedder)
