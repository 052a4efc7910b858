"""``rag``: a retrieval-augmented expert over text and serialised EHR (MedMIX Appendix B).

Each present payload is serialised to text (:mod:`medmix_experts.serialize`; a text
modality such as a radiology report is read as its own text) and embedded by the
retriever, all-MiniLM-L6-v2 (the ``minilm`` expert's model and text, so both share one
forward pass per text; long texts are truncated as ``minilm`` truncates them). The ``k``
most similar entries of a knowledge base are found by cosine similarity; their embeddings
are averaged and combined with the query:

- ``combine="concat"`` (default): ``[q ; mean_topk]`` (768-d), so the fuser can weigh what
  the patient looks like and what similar records look like separately;
- ``combine="sum"``: ``normalize(q + mean_topk)`` (384-d).

The knowledge base (index) is one of:

- default: the training split's own records (serialised, or the notes themselves for a
  text modality). ``fit(modality, payloads)`` builds the index from exactly the payloads
  it is given (the extraction pipeline passes only the training split's present payloads;
  experts never receive labels), so no validation or test record and no label can enter
  it;
- ``kb_dir``: a folder of ``.txt`` / ``.md`` documents, split into paragraphs (one entry
  each), e.g. clinical guideline excerpts;
- ``kb_store``: the ``kb_expert`` (default ``minilm``) embeddings of the same modality in an
  existing EmbeddingStore, training split, present rows only.

The index (embeddings and a 64-bit hash of each entry's text) is saved by ``get_state`` so
an external cohort is encoded against the same knowledge base.

Self-match. A training record is in the index, and would retrieve itself with cosine 1.
For every query, train or not, at most one index entry is skipped: the one whose text hash
equals the query's text hash (for a ``kb_store`` index, which has no texts: the first entry
with cosine >= 1 - 1e-5). Every query goes through the same rule, so training and test
embeddings come from one procedure; a test record whose text happens to equal a training
record's loses that one duplicate, which would only have repeated the query. Radiology
reports repeat word for word more often than records do (a normal study's wording); a
held-out note identical to a training note skips that one copy and can still retrieve
its other copies, which are training rows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from medmix_core import ExpertEncoder, ModalitySpec, hookimpl
from medmix_core.errors import DataError, StoreError
from medmix_core.plugin_utils import check_options
from medmix_core.types import Payload
from medmix_experts import serialize as ser
from medmix_experts.sentence import MiniLMExpert
from medmix_experts.textmodel import (
    MINILM_PACKAGE,
    package_version,
    precision_entry,
    text_hash,
    weights_sha256,
)

#: cosine at or above which an entry of a hash-less index counts as the query itself
SELF_COSINE = 1.0 - 1e-5
_RETRIEVER_OPTIONS = ("style", "detail", "quantize", "batch_size", "max_length", "model_dir")
#: prefixes of the retriever's own state keys within a rag state
_RETRIEVER_STATE = ("cohort_", "text_")


def read_kb_dir(folder: str | os.PathLike, max_words: int = 180) -> list[str]:
    """Knowledge-base entries from a folder of ``.txt`` / ``.md`` files.

    Files are read in sorted path order and split at blank lines; paragraphs longer than
    ``max_words`` words are cut into pieces of that size.

    Args:
        folder: the folder (searched recursively).
        max_words: longest entry, in words.
    Returns:
        The entries, in a fixed order.
    Raises:
        DataError: the folder is missing or holds no text.
    """
    root = Path(folder).expanduser()
    if not root.is_dir():
        raise DataError(f"rag: kb_dir {str(root)!r} is not a folder; expected a folder of "
                        f".txt or .md documents.")
    entries: list[str] = []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in (".txt", ".md")
                       and p.is_file()):
        text = path.read_text("utf-8", errors="replace").replace("\r\n", "\n")
        for para in text.split("\n\n"):
            words = para.split()
            for s in range(0, len(words), max_words):
                if words[s:s + max_words]:
                    entries.append(" ".join(words[s:s + max_words]))
    if not entries:
        raise DataError(f"rag: kb_dir {str(root)!r} holds no text in .txt or .md files.")
    return entries


class RAGExpert(ExpertEncoder):
    """Retrieval-augmented expert: query embedding combined with its top-k neighbours."""

    name = "rag"
    kinds: ClassVar[tuple[str, ...]] = ("timeseries", "tabular", "text")
    family = "rag"
    version = "1"
    batch_size: ClassVar[int] = 1024  # payloads per encode call, as the sentence experts

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        own = {k: v for k, v in options.items() if k not in _RETRIEVER_OPTIONS}
        opts = check_options(self.name, own, {
            "k": (int, 5), "combine": (str, "concat"),
            "kb_dir": ((str, os.PathLike), None), "kb_store": ((str, os.PathLike), None),
            "kb_expert": (str, "minilm")})
        if opts["k"] < 1:
            raise DataError(f"Expert 'rag': k must be >= 1, got {opts['k']}.")
        if opts["combine"] not in ("concat", "sum"):
            raise DataError(f"Expert 'rag': combine must be 'concat' or 'sum', got "
                            f"{opts['combine']!r}.")
        if opts["kb_dir"] is not None and opts["kb_store"] is not None:
            raise DataError("Expert 'rag': give kb_dir or kb_store, not both.")
        self.opts = opts
        self.retriever = MiniLMExpert(**{k: v for k, v in options.items()
                                         if k in _RETRIEVER_OPTIONS})
        self._index: dict[str, np.ndarray] = {}  # modality -> [M, 384] unit rows
        self._hash: dict[str, np.ndarray] = {}  # modality -> [M] int64 text hashes
        self._hashed: dict[str, bool] = {}  # whether hashes identify entries

    # ------------------------------------------------------------------ basics
    def dim(self, modality: ModalitySpec) -> int:
        d = self.retriever.dim(modality)
        return 2 * d if self.opts["combine"] == "concat" else d

    def n_parameters(self) -> int:
        return self.retriever.n_parameters()

    def check_weights(self) -> None:
        self.retriever.check_weights()

    def provenance(self) -> dict[str, Any]:
        folder = self.retriever.model_folder()
        return {"expert": self.name, "version": self.version, "family": self.family,
                "options": {k: (str(v) if isinstance(v, os.PathLike) else v)
                            for k, v in self.options.items()},
                **precision_entry(self.retriever._device),
                "retriever": "all-MiniLM-L6-v2", "package": MINILM_PACKAGE,
                "package_version": package_version(MINILM_PACKAGE),
                "weights": str(folder / "model.safetensors"),
                "weights_sha256": weights_sha256(folder / "model.safetensors"),
                "knowledge_base": ("kb_dir:" + str(self.opts["kb_dir"]) if self.opts["kb_dir"]
                                   else "kb_store:" + str(self.opts["kb_store"])
                                   if self.opts["kb_store"] else "training split"),
                "serialiser_version": ser.SERIALISER_VERSION,
                "quantize": "int8-dynamic" if self.retriever.opts["quantize"] else "fp32",
                "k": self.opts["k"], "combine": self.opts["combine"],
                **self.retriever.text_provenance()}

    def to(self, device: str) -> RAGExpert:
        self.retriever.to(device)
        return self

    # ------------------------------------------------------------------ index
    def _store_index(self, modality: ModalitySpec) -> np.ndarray:
        from medmix_core.store import EmbeddingStore

        store = EmbeddingStore.open(self.opts["kb_store"])
        entry = store.entry(modality.name, self.opts["kb_expert"])
        ours = self.retriever.dim(modality)
        if entry.dim != ours:
            raise StoreError(f"rag: kb_store expert {self.opts['kb_expert']!r} of modality "
                             f"{modality.name!r} has {entry.dim} dims; the retriever makes "
                             f"{ours}. Use a store extracted with the minilm expert.")
        prov = entry.provenance or {}
        mine = self.retriever.provenance()
        for key in ("serialiser_version", "weights_sha256", "quantize"):
            if key in prov and prov[key] != mine[key]:
                raise StoreError(f"rag: kb_store embeddings were made with {key}="
                                 f"{prov[key]!r}, the retriever uses {mine[key]!r}; queries "
                                 f"and index would live in different spaces. Re-extract the "
                                 f"store with the same minilm options.")
        emb, mask = store.load(entry)  # [N, d], [N]
        train = np.asarray(store.splits.get("train", []), dtype=np.int64)
        if train.size == 0:
            raise StoreError(f"rag: kb_store {store.path} has no 'train' split to index.")
        rows = train[mask.numpy()[train]]
        out = emb.numpy()[rows].astype(np.float32)
        norms = np.linalg.norm(out, axis=1, keepdims=True)
        return out / np.maximum(norms, 1e-12)

    def fit(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> None:
        """Fit the serialiser's cohort ranges (none for text) and build the index.

        Args:
            modality: the modality.
            payloads: the training split's present payloads (the default index is
                exactly these records, or texts, in this order).
        """
        self.retriever.fit(modality, payloads)
        if self.opts["kb_dir"] is not None:
            texts = read_kb_dir(self.opts["kb_dir"])
            index = self.retriever.model.embed(texts,
                                               batch_size=self.retriever.text_batch_size())
            hashes, hashed = np.array([text_hash(t) for t in texts], dtype=np.int64), True
        elif self.opts["kb_store"] is not None:
            index = self._store_index(modality)
            hashes, hashed = np.zeros(index.shape[0], dtype=np.int64), False
        else:
            texts = self.retriever.texts(modality, payloads)
            index = self.retriever.embed_texts(modality, texts)  # serialised once
            hashes, hashed = np.array([text_hash(t) for t in texts], dtype=np.int64), True
        if index.shape[0] < 2:
            raise DataError(f"rag: the knowledge base of modality {modality.name!r} has "
                            f"{index.shape[0]} entries; retrieval needs at least 2 (one may "
                            f"be the query itself). Fit on more training payloads or give "
                            f"kb_dir=<folder of documents>.")
        self._index[modality.name] = index.astype(np.float32)
        self._hash[modality.name] = hashes
        self._hashed[modality.name] = hashed

    def get_state(self, modality: ModalitySpec) -> dict[str, np.ndarray]:
        if modality.name not in self._index:
            return {}
        state = dict(self.retriever.get_state(modality))
        state.update({"index": self._index[modality.name],
                      "index_hash": self._hash[modality.name],
                      "index_hashed": np.array([int(self._hashed[modality.name])],
                                               dtype=np.int64)})
        return state

    def set_state(self, modality: ModalitySpec, state: dict[str, np.ndarray]) -> None:
        if not state:
            for table in (self._index, self._hash, self._hashed):
                table.pop(modality.name, None)
            self.retriever.set_state(modality, {})
            return
        missing = [k for k in ("index", "index_hash", "index_hashed") if k not in state]
        if missing:
            raise DataError(f"rag: state for modality {modality.name!r} lacks {missing}; it "
                            f"was not written by this expert.")
        index = np.asarray(state["index"], dtype=np.float32)
        hashes = np.asarray(state["index_hash"], dtype=np.int64)
        d = self.retriever.dim(modality)
        if index.ndim != 2 or index.shape[1] != d or hashes.shape != (index.shape[0],):
            raise DataError(f"rag: state index of modality {modality.name!r} is "
                            f"{index.shape} with {hashes.shape} hashes; expected [M, {d}] "
                            f"and [M].")
        self.retriever.set_state(modality, {k: v for k, v in state.items()
                                            if k.startswith(_RETRIEVER_STATE)})
        self._index[modality.name] = index
        self._hash[modality.name] = hashes
        self._hashed[modality.name] = bool(np.asarray(state["index_hashed"]).ravel()[0])

    # ------------------------------------------------------------------ retrieval
    def _ensure_index(self, modality: ModalitySpec) -> None:
        if modality.name in self._index:
            return
        if self.opts["kb_dir"] is not None or self.opts["kb_store"] is not None:
            self.fit(modality, [])  # an external knowledge base needs no training payloads
            return
        raise DataError(f"rag: no index for modality {modality.name!r}. Call fit() with the "
                        f"training split's payloads first (or set_state() with a saved "
                        f"index), or give kb_dir=<folder of documents>.")

    def retrieve(self, modality: ModalitySpec, payloads: Sequence[Payload]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Query embeddings and their neighbours.

        Args:
            modality: the modality.
            payloads: N present payloads.
        Returns:
            ``q`` float32 ``[N, 384]``, neighbour rows ``[N, k]`` (int64, into the index,
            most similar first) and their cosines ``[N, k]``; ``k`` is lowered to the index
            size minus one for a small index (a rare modality in a small cohort).
        """
        self._ensure_index(modality)
        index = self._index[modality.name]  # [M, d]
        k = min(self.opts["k"], index.shape[0] - 1)  # the same k for every query
        texts = self.retriever.texts(modality, payloads)
        q = self.retriever.embed_texts(modality, texts)  # [N, d]; serialised once
        sims = q @ index.T  # [N, M]
        if self._hashed[modality.name]:
            qh = np.array([text_hash(t) for t in texts], dtype=np.int64)
            hashes = self._hash[modality.name]
            order = np.argsort(hashes, kind="stable")
            pos = np.searchsorted(hashes[order], qh)
            pos = np.minimum(pos, len(order) - 1)
            hit = hashes[order][pos] == qh
            rows = np.flatnonzero(hit)
            sims[rows, order[pos[rows]]] = -np.inf  # one self-match per query, at most
        else:
            best = np.argmax(sims, axis=1)
            rows = np.flatnonzero(sims[np.arange(len(q)), best] >= SELF_COSINE)
            sims[rows, best[rows]] = -np.inf
        # top-k, most similar first; ties by index row so results are deterministic
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # [N, k]
        return q, top.astype(np.int64), np.take_along_axis(sims, top, axis=1)

    def encode(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> np.ndarray:
        """Returns float32 ``[N, 768]`` (concat) or ``[N, 384]`` (sum)."""
        if not payloads:
            return np.zeros((0, self.dim(modality)), dtype=np.float32)
        q, top, _ = self.retrieve(modality, payloads)
        neigh = self._index[modality.name][top].mean(axis=1)  # [N, d]
        if self.opts["combine"] == "concat":
            out = np.concatenate([q, neigh], axis=1)
        else:
            out = q + neigh
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        out = out.astype(np.float32)
        if not np.isfinite(out).all():
            raise DataError(f"rag produced non-finite embeddings for modality "
                            f"{modality.name!r}; the index may be damaged (re-fit it).")
        return out


@hookimpl
def register_experts(register):
    register("rag", RAGExpert)
