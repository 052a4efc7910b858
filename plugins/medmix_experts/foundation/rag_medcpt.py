"""``rag-medcpt``: the retrieval-augmented expert of MedMIX Appendix B.

Composed from the ``medcpt`` and ``qwen2`` experts, in two stages.

Stage 1, bridging: each present payload becomes one text.
    * ``text`` (a report, a note): used as it is.
    * ``tabular``: every variable of the modality, in its fixed order (``ModalitySpec.
      variables``), as ``"name: value unit; ..."``; an unmeasured value reads
      ``"name: not measured"`` (missing is said, never written as 0).
    * ``timeseries``: the numeric serialisation of :mod:`medmix_experts.serialize`
      (``"heart rate: 112 bpm (first 88, min 80, max 140, n=24, over 47 h)"``, measured
      variables in the modality's order).
    * ``image`` / ``volume`` / ``slide``: a *bridge* plugin (``medmix_core.bridges.Bridge``)
      generates a report; the ``bridges`` option maps a kind to a bridge name (default
      ``{"image": "maira2"}``). A kind with no bridge is not accepted.

Stage 2, retrieval and soft prompt:
    1. MedCPT's query encoder embeds the text (``q``, [CLS], 768-d); MedCPT's article
       encoder embeds every knowledge-base document (``A``, [M, 768]), once.
    2. The ``k`` documents with the highest cosine to ``q`` are mean-pooled: ``r = mean
       A[top-k]``.
    3. A linear map ``p = r W + b`` takes ``r`` into Qwen2's input-embedding space (896-d
       for Qwen2-0.5B); ``p`` is given to Qwen2 as one soft-prompt token before the text's
       tokens, and the expert's embedding is the mean of Qwen2's last hidden states over
       the valid positions (the soft token included).

The projection (the paper: "learned", embeddings precomputed offline). It is fitted without
labels and without patient data, on the knowledge base itself: for every document j, the
target is ``t_j``, the mean of Qwen2's input embeddings of that document's tokens; ``W, b``
solve the ridge least-squares problem ``min ||(A - mean A) W - (T - mean T)||^2 + lam ||W||^2``
(``b`` from the means; ``lam = ridge * trace(Ac^T Ac) / 768``, so ``ridge`` is scale-free).
The soft token therefore reads as "the average word of the retrieved documents" in Qwen2's
own vocabulary space, the closest label-free stand-in for a learned projection.

The knowledge base (:mod:`.knowledge`): the MedlinePlus health-topics XML, or a folder of
documents (option ``kb``, else ``$MEDMIX_KB``, else ``$MEDMIX_MODEL_DIR/medlineplus``). It is
never built from the payloads: ``fit`` reads the documents only, so no record, no label and
no validation or test row can be retrieved. The document embeddings, their text hashes and
the projection are saved by ``get_state``, so an external cohort is encoded against the
same knowledge base.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from medmix_core.errors import DataError
from medmix_core.experts import ExpertEncoder
from medmix_core.types import ModalitySpec, Payload, TabularData, TextData, TimeSeriesData

from .base import ExpertOptionError
from .knowledge import Document, find_kb, load_kb
from .text_experts import MedCPTExpert, Qwen2Expert

TEXT_KINDS = ("tabular", "timeseries", "text")
BRIDGE_KINDS = ("image", "volume", "slide")
DEFAULT_BRIDGES = {"image": "maira2"}
_STATE_KEYS = ("kb_emb", "kb_hash", "proj_w", "proj_b")

OPTIONS: dict[str, Any] = {
    "k": 5,
    "kb": None,
    "kb_language": "English",
    "ridge": 1e-2,
    "bridges": None,
    "bridge_options": None,
    "query_path": None,
    "article_path": None,
    "qwen2_path": None,
    "max_length": 512,
    "query_max_length": 64,
    "article_max_length": 512,
    "allow_download": False,
    "cache_dir": None,
    "device": "cpu",
    "dtype": "float32",
    "batch_size": 16,
}


def text_hash(text: str) -> int:
    """A stable signed 64-bit id of a text (first 8 bytes of its sha256)."""
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "little",
                          signed=True)


def _number(v: float) -> str:
    a = abs(v)
    s = f"{v:.{0 if a >= 100 else 1 if a >= 10 else 2}f}"
    s = s.rstrip("0").rstrip(".") if "." in s else s
    return "0" if s in ("-0", "") else s


def serialise_row(payload: TabularData, modality: ModalitySpec) -> str:
    """Appendix B's form: ``"name: value unit; ..."`` over all variables, in the modality's
    fixed order; NaN reads "not measured".

    Raises:
        DataError: values and variables differ in length, a value is infinite, or the
            payload names a variable the modality does not declare.
    """
    values = np.asarray(payload.values, dtype=np.float64).ravel()
    if values.size != len(payload.variables):
        raise DataError(f"rag-medcpt: a tabular payload of {modality.name!r} has "
                        f"{len(payload.variables)} variables but {values.size} values.")
    if np.isinf(values).any():
        raise DataError(f"rag-medcpt: a tabular payload of {modality.name!r} holds Inf; a "
                        f"missing value must be NaN.")
    order = list(modality.variables) or list(payload.variables)
    index = {v: i for i, v in enumerate(payload.variables)}
    extra = sorted(set(index) - set(order))
    if extra:
        raise DataError(f"rag-medcpt: payload variables {extra[:5]} are not declared by modality "
                        f"{modality.name!r} (declared: {order[:8]}...).")
    parts = []
    for name in order:
        i = index.get(name)
        if i is None or np.isnan(values[i]):
            parts.append(f"{name}: not measured")
        else:
            unit = modality.units.get(name, "")
            parts.append(f"{name}: {_number(float(values[i]))}" + (f" {unit}" if unit else ""))
    return "; ".join(parts)


def fit_projection(article: np.ndarray, target: np.ndarray, ridge: float
                   ) -> tuple[np.ndarray, np.ndarray]:
    """Ridge least squares from article embeddings to mean input embeddings.

    Args:
        article: ``[M, d_a]`` MedCPT article embeddings of the documents.
        target: ``[M, d_h]`` Qwen2 mean input embeddings of the same documents.
        ridge: scale-free penalty (``lam = ridge * trace(Ac^T Ac) / d_a``).
    Returns:
        ``W [d_a, d_h]`` and ``b [d_h]`` (float32).
    """
    a = article.astype(np.float64)
    t = target.astype(np.float64)
    am, tm = a.mean(axis=0), t.mean(axis=0)
    ac, tc = a - am, t - tm
    gram = ac.T @ ac  # [d_a, d_a]
    lam = float(ridge) * max(float(np.trace(gram)) / a.shape[1], 1e-12)
    w = np.linalg.solve(gram + lam * np.eye(a.shape[1]), ac.T @ tc)  # [d_a, d_h]
    b = tm - am @ w  # [d_h]
    return w.astype(np.float32), b.astype(np.float32)


class RAGMedCPTExpert(ExpertEncoder):
    """MedCPT retrieval over a public knowledge base, one soft-prompt token into Qwen2."""

    name: ClassVar[str] = "rag-medcpt"
    family: ClassVar[str] = "rag"
    kinds: ClassVar[tuple[str, ...]] = TEXT_KINDS + BRIDGE_KINDS
    version: ClassVar[str] = "1"
    batch_size: ClassVar[int] = 32

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise ExpertOptionError(
                f"Unknown option(s) {unknown} for expert 'rag-medcpt'. Known options: "
                f"{', '.join(sorted(OPTIONS))}. Fix the spelling or drop them.")
        self.opts: dict[str, Any] = {**OPTIONS, **options}
        k = self.opts["k"]
        if not isinstance(k, int) or isinstance(k, bool) or k < 1:
            raise ExpertOptionError(f"Option k={k!r} of 'rag-medcpt' must be an integer >= 1.")
        if not float(self.opts["ridge"]) > 0:
            raise ExpertOptionError(f"Option ridge={self.opts['ridge']!r} of 'rag-medcpt' must "
                                    f"be > 0.")
        bridges = DEFAULT_BRIDGES if self.opts["bridges"] is None else self.opts["bridges"]
        if not isinstance(bridges, dict) or not set(bridges) <= set(BRIDGE_KINDS):
            raise ExpertOptionError(
                f"Option bridges={bridges!r} of 'rag-medcpt' must map modality kinds among "
                f"{list(BRIDGE_KINDS)} to bridge names, e.g. {{'image': 'maira2'}}.")
        self.bridge_names: dict[str, str] = dict(bridges)
        common = {key: self.opts[key] for key in ("allow_download", "cache_dir", "device",
                                                  "dtype", "batch_size")}
        # weights are resolved here (file-system checks): absent ones fail at once
        self.query = MedCPTExpert(encoder="query", model_path=self.opts["query_path"],
                                  max_length=self.opts["query_max_length"], **common)
        self.article = MedCPTExpert(encoder="article", model_path=self.opts["article_path"],
                                    max_length=self.opts["article_max_length"], **common)
        self.llm = Qwen2Expert(model_path=self.opts["qwen2_path"],
                               max_length=self.opts["max_length"], **common)
        self.kb_path: Path = find_kb(self.opts["kb"])
        self._docs: list[Document] | None = None
        self._kb: dict[str, np.ndarray] | None = None  # built from the documents, once
        self._state: dict[str, dict[str, np.ndarray]] = {}  # modality -> state
        self._bridges: dict[str, Any] = {}

    # ------------------------------------------------------------------ basics
    def accepts(self, modality: ModalitySpec) -> bool:
        return modality.kind in TEXT_KINDS or modality.kind in self.bridge_names

    def dim(self, modality: ModalitySpec) -> int:
        return self.llm.dim(modality)

    def n_parameters(self) -> int:
        return self.query.n_parameters() + self.article.n_parameters() + self.llm.n_parameters()

    def to(self, device: str) -> RAGMedCPTExpert:
        for enc in (self.query, self.article, self.llm, *self._bridges.values()):
            enc.to(device)
        return self

    def provenance(self) -> dict[str, Any]:
        out = {"expert": self.name, "version": self.version, "family": self.family,
               "options": {k: (str(v) if isinstance(v, os.PathLike) else v)
                           for k, v in self.options.items()},
               "query_encoder": self.query.provenance(),
               "article_encoder": self.article.provenance(),
               "llm": self.llm.provenance(),
               "knowledge_base": str(self.kb_path), "k": self.opts["k"],
               "projection": f"ridge least squares (ridge={self.opts['ridge']}) from article "
                             f"embeddings to mean input embeddings of the documents",
               "bridges": {kind: b.provenance() for kind, b in self._bridges.items()}}
        if self._kb is not None:
            out["kb_documents"] = int(self._kb["kb_emb"].shape[0])
            out["kb_sha256"] = hashlib.sha256(self._kb["kb_hash"].tobytes()).hexdigest()
        return out

    # ------------------------------------------------------------------ stage 1
    def bridge(self, kind: str):
        """The bridge that turns payloads of ``kind`` into text (built on first use)."""
        if kind not in self._bridges:
            from medmix_core.plugins import get_bridge

            name = self.bridge_names.get(kind)
            if name is None:
                raise DataError(
                    f"rag-medcpt has no bridge for modality kind {kind!r}; pass the option "
                    f"bridges={{'{kind}': '<bridge name>'}} (`medmix plugins` lists bridges).")
            per_bridge = self.opts["bridge_options"] or {}
            self._bridges[kind] = get_bridge(name)(**dict(per_bridge.get(name, {})))
        return self._bridges[kind]

    def texts(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> list[str]:
        """Stage 1: one text per present payload (see the module docstring)."""
        if not self.accepts(modality):
            raise DataError(
                f"Expert 'rag-medcpt' reads kinds {list(TEXT_KINDS)} and, through a bridge, "
                f"{sorted(self.bridge_names)}; modality {modality.name!r} is of kind "
                f"{modality.kind!r}. Add a bridge for it with the option bridges.")
        if modality.kind in self.bridge_names:
            return self.bridge(modality.kind).texts(modality, payloads)
        want = {"text": TextData, "tabular": TabularData, "timeseries": TimeSeriesData}
        out = []
        for i, p in enumerate(payloads):
            if not isinstance(p, want[modality.kind]):
                found = "None (missing)" if p is None else type(p).__name__
                raise DataError(f"rag-medcpt, modality {modality.name!r}: payload {i} is "
                                f"{found}, expected {want[modality.kind].__name__}. Pass only "
                                f"present payloads; missing ones are carried by the mask.")
            if modality.kind == "text":
                if not isinstance(p.text, str) or not p.text.strip():
                    raise DataError(f"rag-medcpt: modality {modality.name!r} payload {i} is an "
                                    f"empty text; an absent note is a missing modality (None).")
                out.append(p.text)
            elif modality.kind == "tabular":
                out.append(serialise_row(p, modality))
            else:
                from medmix_experts.serialize import serialize

                out.append(serialize(p, modality, style="numeric"))
        return out

    # ------------------------------------------------------------------ knowledge base
    def documents(self) -> list[Document]:
        if self._docs is None:
            self._docs = load_kb(self.kb_path, self.opts["kb_language"])
        return self._docs

    def _mean_input_embeddings(self, texts: list[str]) -> np.ndarray:
        """``[M, h]``: per text, the mean of Qwen2's input embeddings of its tokens."""
        import torch

        tok, model = self.llm.tokenizer, self.llm.model
        table = model.get_input_embeddings()
        bs = int(self.opts["batch_size"])
        out = []
        for s in range(0, len(texts), bs):
            enc = tok(texts[s:s + bs], padding=True, truncation=True,
                      max_length=int(self.opts["max_length"]) - 1, return_tensors="pt")
            with torch.no_grad():
                e = table(enc["input_ids"].to(self.llm._device)).float()  # [b, T, h]
                m = enc["attention_mask"].to(e.device).unsqueeze(-1).float()  # [b, T, 1]
                out.append(((e * m).sum(1) / m.sum(1).clamp_min(1.0)).cpu().numpy())
        return np.concatenate(out, axis=0)

    def build_kb(self) -> dict[str, np.ndarray]:
        """Embed the documents and fit the projection (once; no payload is read)."""
        if self._kb is None:
            docs = self.documents()
            texts = [d.text for d in docs]
            note = ModalitySpec("knowledge_base", "text")
            emb = self.article.encode(note, [TextData(t) for t in texts])  # [M, 768]
            target = self._mean_input_embeddings(texts)  # [M, h]
            w, b = fit_projection(emb, target, float(self.opts["ridge"]))
            self._kb = {"kb_emb": emb.astype(np.float32),
                        "kb_hash": np.array([text_hash(t) for t in texts], dtype=np.int64),
                        "proj_w": w, "proj_b": b}
        return self._kb

    def fit(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> None:
        """Build the knowledge-base index and the projection.

        The payloads are not read: the index holds the knowledge-base documents only, so
        no record of any split (and no label) can be retrieved.
        """
        self._state[modality.name] = self.build_kb()

    def get_state(self, modality: ModalitySpec) -> dict[str, np.ndarray]:
        return dict(self._state.get(modality.name, {}))

    def set_state(self, modality: ModalitySpec, state: dict[str, np.ndarray]) -> None:
        if not state:
            self._state.pop(modality.name, None)
            return
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise DataError(f"rag-medcpt: state for modality {modality.name!r} lacks {missing}; "
                            f"it was not written by this expert.")
        emb = np.asarray(state["kb_emb"], dtype=np.float32)
        w = np.asarray(state["proj_w"], dtype=np.float32)
        b = np.asarray(state["proj_b"], dtype=np.float32)
        h = self.dim(modality)
        hashes = np.asarray(state["kb_hash"], dtype=np.int64)
        if (emb.ndim != 2 or w.shape != (emb.shape[1], h) or b.shape != (h,)
                or hashes.shape != (emb.shape[0],)):
            raise DataError(f"rag-medcpt: state of modality {modality.name!r} has index "
                            f"{emb.shape}, hashes {hashes.shape}, projection {w.shape} + "
                            f"{b.shape}; expected [M, d], [M], [d, {h}] + [{h}] for this Qwen2.")
        self._state[modality.name] = {"kb_emb": emb, "kb_hash": hashes, "proj_w": w,
                                      "proj_b": b}

    # ------------------------------------------------------------------ stage 2
    def retrieve(self, modality: ModalitySpec, texts: list[str]
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Query embeddings ``[N, 768]``, top-k document rows ``[N, k]`` (most similar
        first, ties by row) and their cosines ``[N, k]``."""
        state = self._state.get(modality.name) or self.build_kb()
        q = self.query.encode(modality if modality.kind == "text" else
                              ModalitySpec(modality.name, "text"),
                              [TextData(t) for t in texts])  # [N, 768]
        index = state["kb_emb"]
        qn = q / np.maximum(np.linalg.norm(q, axis=1, keepdims=True), 1e-12)
        an = index / np.maximum(np.linalg.norm(index, axis=1, keepdims=True), 1e-12)
        sims = qn @ an.T  # [N, M]
        k = min(int(self.opts["k"]), index.shape[0])
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]  # [N, k]
        return q, top.astype(np.int64), np.take_along_axis(sims, top, axis=1)

    def soft_tokens(self, modality: ModalitySpec, top: np.ndarray) -> np.ndarray:
        """``[N, h]``: the projected mean of the retrieved documents' embeddings."""
        state = self._state.get(modality.name) or self.build_kb()
        pooled = state["kb_emb"][top].astype(np.float64).mean(axis=1)  # [N, 768]
        # float64: a row's soft token must not depend on the batch it is computed in
        soft = pooled @ state["proj_w"].astype(np.float64) + state["proj_b"]  # [N, h]
        return soft.astype(np.float32)

    def _qwen2(self, texts: list[str], soft: np.ndarray) -> np.ndarray:
        """Qwen2 on [soft token; text tokens], mean of last hidden states: ``[N, h]``."""
        import torch

        tok, model = self.llm.tokenizer, self.llm.model
        dtype = self.llm.torch_dtype()
        bs = int(self.opts["batch_size"])
        out = []
        for s in range(0, len(texts), bs):
            enc = tok(texts[s:s + bs], padding=True, truncation=True,
                      max_length=int(self.opts["max_length"]) - 1, return_tensors="pt")
            ids = enc["input_ids"].to(self.llm._device)  # [b, T]
            mask = enc["attention_mask"].to(self.llm._device)  # [b, T]
            with torch.no_grad():
                emb = model.get_input_embeddings()(ids)  # [b, T, h]
                p = torch.from_numpy(soft[s:s + bs]).to(emb.device, dtype=dtype)[:, None]
                x = torch.cat([p, emb], dim=1)  # [b, 1 + T, h]
                m = torch.cat([torch.ones_like(mask[:, :1]), mask], dim=1)  # [b, 1 + T]
                h = model(inputs_embeds=x, attention_mask=m).last_hidden_state.float()
                w = m.unsqueeze(-1).to(h.dtype)  # [b, 1 + T, 1]
                out.append(((h * w).sum(1) / w.sum(1)).cpu().numpy())  # [b, h]
        return np.concatenate(out, axis=0)

    def encode(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> np.ndarray:
        """Embed payloads: bridge to text, retrieve, soft-prompt Qwen2.

        Args:
            modality: a modality this expert accepts.
            payloads: N present payloads.
        Returns:
            ``[N, h]`` float32 (h = Qwen2's hidden size, 896 for Qwen2-0.5B).
        """
        texts = self.texts(modality, payloads)
        if not texts:
            return np.zeros((0, self.dim(modality)), dtype=np.float32)
        _, top, _ = self.retrieve(modality, texts)
        out = self._qwen2(texts, self.soft_tokens(modality, top))
        if not np.isfinite(out).all():
            raise DataError(f"rag-medcpt produced non-finite embeddings for modality "
                            f"{modality.name!r}; try dtype='float32', or re-fit the index.")
        return out.astype(np.float32)
