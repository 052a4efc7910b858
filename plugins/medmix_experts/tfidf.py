"""``tfidf``: a weight-free text expert, TF-IDF over word n-grams reduced by truncated SVD.

Fitted on the training split's texts only (``fit``): the vocabulary, the inverse document
frequencies and the projection all come from them, so no validation or test text shapes
the features. Encoding a text:

1. tokens: the lower-cased text split like scikit-learn's default (``\\b\\w\\w+\\b``:
   words of two or more letters or digits), then word n-grams for n = 1..``ngram``
   joined by a space;
2. term frequencies of the vocabulary's terms, ``1 + log(tf)`` when ``sublinear`` (the
   default), times ``idf = ln((1 + N) / (1 + df)) + 1`` (smoothed, N training texts, df
   of the term among them), and the row scaled to unit L2 norm;
3. projected on the ``dim`` leading right singular vectors of the training TF-IDF matrix
   (latent semantic analysis): ``[N, V] @ [V, dim] -> [N, dim]``.

The vocabulary keeps terms found in at least ``min_df`` training texts, then the
``max_features`` most frequent of those (ties: alphabetical). The SVD is a randomized
range finder with a fixed seed, ``power_iters`` power iterations and an oversampling of
10, followed by an exact SVD of the small projected matrix; each singular vector's sign is
fixed so that its largest-magnitude entry is positive. When the vocabulary (or the number
of training texts) is smaller than ``dim``, the trailing components are zero, so the
output width is always ``dim``. A text that holds no vocabulary term encodes as zeros:
that is its TF-IDF, not a missing value (absent texts never reach an expert).

``get_state``/``set_state`` carry the vocabulary, the IDF and the projection, so an
external cohort is encoded with the training vocabulary. numpy only; deterministic.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

from medmix_core import ExpertEncoder, ModalitySpec, TextData, hookimpl
from medmix_core.errors import DataError
from medmix_core.experts import check_payload_types
from medmix_core.plugin_utils import check_options
from medmix_experts.stats import fitted_state

_TOKEN = re.compile(r"(?u)\b\w\w+\b")
_OVERSAMPLE = 10
#: options that change the features; a saved state must have been fitted with them
_FEATURE_OPTIONS = ("ngram", "min_df", "max_features", "sublinear", "dim")


def tokenize(text: str, ngram: int) -> list[str]:
    """Word n-grams (n = 1..ngram) of a text, in order of appearance."""
    words = _TOKEN.findall(text.lower())
    out = list(words)
    for n in range(2, ngram + 1):
        out += [" ".join(words[i:i + n]) for i in range(len(words) - n + 1)]
    return out


def _bytes(strings: Sequence[str]) -> np.ndarray:
    """Strings joined by newlines as uint8, so they can live in a safetensors state."""
    return np.frombuffer("\n".join(strings).encode("utf-8"), dtype=np.uint8).copy()


def _strings(arr: np.ndarray) -> list[str]:
    text = np.asarray(arr, dtype=np.uint8).tobytes().decode("utf-8")
    return text.split("\n") if text else []


def _segment_sum(values: np.ndarray, keys: np.ndarray, n_out: int) -> np.ndarray:
    """Sum rows of ``values`` [R, k] that share a key; ``keys`` [R] sorted -> [n_out, k]."""
    out = np.zeros((n_out, values.shape[1]))
    if len(keys):
        starts = np.flatnonzero(np.r_[True, keys[1:] != keys[:-1]])
        out[keys[starts]] = np.add.reduceat(values, starts, axis=0)
    return out


class _CSR:
    """A minimal row-compressed sparse matrix: what the TF-IDF products need, numpy only."""

    def __init__(self, indptr: np.ndarray, indices: np.ndarray, data: np.ndarray,
                 n_cols: int) -> None:
        self.indptr, self.indices, self.data, self.n_cols = indptr, indices, data, n_cols
        self.rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))  # [nnz], sorted
        self._by_col = np.argsort(indices, kind="stable")  # [nnz]: entries ordered by column

    @property
    def shape(self) -> tuple[int, int]:
        return len(self.indptr) - 1, self.n_cols

    def _spans(self, k: int) -> list[tuple[int, int]]:
        """Entry ranges whose products ``nnz x k`` stay near 4M floats (bounded memory)."""
        step = max(4_000_000 // max(k, 1), 1)
        return [(a, min(a + step, len(self.data))) for a in range(0, len(self.data), step)]

    def dot(self, dense: np.ndarray) -> np.ndarray:
        """[N, V] @ [V, k] -> [N, k]."""
        out = np.zeros((self.shape[0], dense.shape[1]))
        for a, b in self._spans(dense.shape[1]):
            out += _segment_sum(self.data[a:b, None] * dense[self.indices[a:b]],
                                self.rows[a:b], self.shape[0])
        return out

    def tdot(self, dense: np.ndarray) -> np.ndarray:
        """[N, V]^T @ [N, k] -> [V, k]."""
        out = np.zeros((self.n_cols, dense.shape[1]))
        for a, b in self._spans(dense.shape[1]):
            e = self._by_col[a:b]
            out += _segment_sum(self.data[e, None] * dense[self.rows[e]], self.indices[e],
                                self.n_cols)
        return out


def truncated_svd(x: _CSR, k: int, power_iters: int, seed: int = 0) -> np.ndarray:
    """Leading ``k`` right singular vectors of ``x`` as columns ``[V, k]`` (sign-fixed).

    Randomized range finder (Halko et al. 2011) with a fixed seed; exact when
    ``k + oversampling`` reaches the rank of ``x``.
    """
    n, v = x.shape
    width = min(k + _OVERSAMPLE, n, v)
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(x.dot(rng.standard_normal((v, width))))  # [N, width]
    for _ in range(power_iters):
        q, _ = np.linalg.qr(x.tdot(q))  # [V, width]
        q, _ = np.linalg.qr(x.dot(q))  # [N, width]
    b = x.tdot(q).T  # [width, V] = q^T x
    _, s, vt = np.linalg.svd(b, full_matrices=False)
    keep = min(k, int((s > 1e-10 * max(s[0], 1e-300)).sum()) if s.size else 0)
    comps = vt[:keep].T  # [V, keep]
    if keep:
        big = np.abs(comps).argmax(axis=0)
        comps = comps * np.sign(comps[big, np.arange(keep)])
    out = np.zeros((v, k))
    out[:, :keep] = comps
    return out


class TfidfExpert(ExpertEncoder):
    """TF-IDF of word n-grams, projected by truncated SVD; weight-free, fitted on train.

    Options:
        dim (int): output width (default 256).
        ngram (int): longest word n-gram (default 2).
        min_df (int): fewest training texts a term must appear in (default 2).
        max_features (int): largest vocabulary (default 50000).
        sublinear (bool): ``1 + log(tf)`` instead of raw counts (default true).
        power_iters (int): power iterations of the randomized SVD (default 4).
    """

    name = "tfidf"
    kinds = ("text",)
    version = "1"
    family = "domain"
    batch_size = 4096

    def __init__(self, **options: Any) -> None:
        check_options(self.name, options, {"dim": int, "ngram": int, "min_df": int,
                                           "max_features": int, "sublinear": bool,
                                           "power_iters": int})
        super().__init__(**options)

        def opt(key: str, default: Any) -> Any:
            return default if options.get(key) is None else options[key]

        self.dim_ = int(opt("dim", 256))
        self.ngram = int(opt("ngram", 2))
        self.min_df = int(opt("min_df", 2))
        self.max_features = int(opt("max_features", 50000))
        self.sublinear = bool(opt("sublinear", True))
        self.power_iters = int(opt("power_iters", 4))
        for key, low in (("dim", 1), ("ngram", 1), ("min_df", 1), ("max_features", 1),
                         ("power_iters", 0)):
            value = getattr(self, "dim_" if key == "dim" else key)
            if value < low:
                raise DataError(f"Expert 'tfidf': {key} must be >= {low}, got {value}.")
        self._state: dict[str, dict[str, Any]] = {}

    # ------------------------------------------------------------------ basics
    def dim(self, modality: ModalitySpec) -> int:
        self._check_kind(modality)
        return self.dim_

    def _check_kind(self, modality: ModalitySpec) -> None:
        if modality.kind not in self.kinds:
            raise DataError(f"Expert 'tfidf' encodes text modalities; {modality.name!r} is "
                            f"{modality.kind!r}.")

    def _settings(self) -> np.ndarray:
        return np.array([self.ngram, self.min_df, self.max_features, int(self.sublinear),
                         self.dim_], dtype=np.int64)

    def provenance(self) -> dict[str, Any]:
        return {"expert": self.name, "version": self.version, "family": self.family,
                "options": dict(self.options), "weights": None,
                "method": f"tfidf word 1..{self.ngram}-grams (min_df {self.min_df}, "
                          f"max_features {self.max_features}, sublinear {self.sublinear}) "
                          f"+ truncated SVD to {self.dim_}"}

    # ------------------------------------------------------------------ features
    def _texts(self, modality: ModalitySpec, payloads: Sequence[Any]) -> list[str]:
        self._check_kind(modality)
        check_payload_types(self.name, modality, payloads, TextData)
        return [p.text for p in payloads]

    def _matrix(self, texts: Sequence[str], vocab: dict[str, int], idf: np.ndarray) -> _CSR:
        """Unit-row TF-IDF of ``texts`` over ``vocab``: a sparse ``[N, V]``."""
        indptr, indices, data = [0], [], []
        for text in texts:
            counts = Counter(t for t in tokenize(text, self.ngram) if t in vocab)
            cols = np.array(sorted(vocab[t] for t in counts), dtype=np.int64)
            inv = {vocab[t]: c for t, c in counts.items()}
            tf = np.array([inv[c] for c in cols], dtype=np.float64)
            w = (1.0 + np.log(tf) if self.sublinear else tf) * idf[cols] if len(cols) else tf
            norm = np.sqrt((w * w).sum())
            indices.append(cols)
            data.append(w / norm if norm > 0 else w)
            indptr.append(indptr[-1] + len(cols))
        return _CSR(np.array(indptr, dtype=np.int64),
                    np.concatenate(indices) if indices else np.zeros(0, np.int64),
                    np.concatenate(data) if data else np.zeros(0), len(vocab))

    def fit(self, modality: ModalitySpec, payloads: Sequence[Any]) -> None:
        """Vocabulary, IDF and SVD projection from the given (training) texts only."""
        texts = self._texts(modality, payloads)
        if not texts:
            raise DataError(f"Expert 'tfidf': no training texts for modality "
                            f"{modality.name!r}; it needs at least one to build a vocabulary.")
        df = Counter(t for text in texts for t in set(tokenize(text, self.ngram)))
        terms = sorted((t for t, c in df.items() if c >= self.min_df),
                       key=lambda t: (-df[t], t))[:self.max_features]
        if not terms:
            raise DataError(f"Expert 'tfidf': no term of modality {modality.name!r} appears in "
                            f"{self.min_df} or more of the {len(texts)} training texts; lower "
                            f"min_df or fit on more texts.")
        terms.sort()
        vocab = {t: i for i, t in enumerate(terms)}
        n = len(texts)
        idf = np.log((1.0 + n) / (1.0 + np.array([df[t] for t in terms], float))) + 1.0
        comps = truncated_svd(self._matrix(texts, vocab, idf), self.dim_, self.power_iters)
        self._state[modality.name] = {"vocab": vocab, "terms": terms, "idf": idf,
                                      "components": comps}

    def get_state(self, modality: ModalitySpec) -> dict[str, np.ndarray]:
        st = fitted_state(self.name, self._state, modality)
        return {"vocabulary": _bytes(st["terms"]), "idf": st["idf"].copy(),
                "components": st["components"].copy(), "settings": self._settings()}

    def set_state(self, modality: ModalitySpec, state: dict[str, np.ndarray]) -> None:
        self._check_kind(modality)
        missing = {"vocabulary", "idf", "components", "settings"} - set(state)
        if missing:
            raise DataError(f"tfidf state for {modality.name!r} lacks {sorted(missing)}; it was "
                            f"not written by this expert.")
        settings = np.asarray(state["settings"], dtype=np.int64)
        if not np.array_equal(settings, self._settings()):
            given = dict(zip(_FEATURE_OPTIONS, settings.tolist()))
            mine = dict(zip(_FEATURE_OPTIONS, self._settings().tolist()))
            raise DataError(f"tfidf state for {modality.name!r} was fitted with {given}, but "
                            f"this expert has {mine}; construct it with the same options.")
        terms = _strings(state["vocabulary"])
        idf = np.asarray(state["idf"], dtype=np.float64)
        comps = np.asarray(state["components"], dtype=np.float64)
        if idf.shape != (len(terms),) or comps.shape != (len(terms), self.dim_):
            raise DataError(f"tfidf state for {modality.name!r}: {len(terms)} terms, idf "
                            f"{list(idf.shape)}, components {list(comps.shape)}; expected "
                            f"[{len(terms)}] and [{len(terms)}, {self.dim_}].")
        self._state[modality.name] = {"vocab": {t: i for i, t in enumerate(terms)},
                                      "terms": terms, "idf": idf.copy(),
                                      "components": comps.copy()}

    def encode(self, modality: ModalitySpec, payloads: Sequence[Any]) -> np.ndarray:
        """[N, dim] float32: unit-row TF-IDF projected on the training SVD components."""
        texts = self._texts(modality, payloads)
        st = fitted_state(self.name, self._state, modality)
        x = self._matrix(texts, st["vocab"], st["idf"])
        return x.dot(st["components"]).astype(np.float32)  # [N, dim]


@hookimpl
def register_experts(register):
    register("tfidf", TfidfExpert)
