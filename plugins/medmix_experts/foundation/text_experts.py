"""Text experts: GatorTron (clinical), Qwen2 (general LLM), MedCPT (biomedical retrieval).

Each uses the model's own tokenizer from the same checkpoint folder, truncates to
``max_length`` tokens and pads on the right; pooling only ever reads valid (non-padding)
positions, so a text's embedding is the same alone or in a padded batch.

Pooling:
    * ``gatortron`` (transformers ``MegatronBertModel``): ``pooling="mean"`` (default), the
      mean of the final hidden states over valid tokens ([CLS] and [SEP] included), or
      ``pooling="cls"``, the final hidden state of [CLS]. GatorTron has no sentence-level
      training objective, so mean pooling is the default.
    * ``qwen2`` (transformers ``Qwen2Model``, causal): mean of the final (normed) hidden
      states over valid tokens. Right padding keeps positions and causal attention of the
      valid tokens identical to the unpadded sequence.
    * ``medcpt`` (BERT): the [CLS] final hidden state, as MedCPT's encoders are trained and
      used. ``encoder="query"`` (``ncbi/MedCPT-Query-Encoder``, max 64 tokens by default) or
      ``encoder="article"`` (``ncbi/MedCPT-Article-Encoder``, max 512); the article encoder is
      given the text as one segment (MedCPT feeds [title, abstract] pairs; a clinical note has
      no title).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from medmix_core.errors import DataError
from medmix_core.types import ModalitySpec, Payload, TextData

from .base import ExpertOptionError, FoundationExpert
from .weights import CheckpointError, WeightsSpec

TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "tokenizer_config.json", "vocab.json")


class TextExpert(FoundationExpert):
    """Shared text logic: tokenise (right padding), run the encoder, pool valid tokens."""

    kinds: ClassVar[tuple[str, ...]] = ("text",)
    batch_size: ClassVar[int] = 32
    model_class: ClassVar[str]
    model_types: ClassVar[tuple[str, ...]] = ()
    #: extra keyword arguments for ``from_pretrained`` (BERTs: no unused pooler)
    model_kwargs: ClassVar[dict[str, Any]] = {}
    poolings: ClassVar[tuple[str, ...]] = ("mean",)
    default_options: ClassVar[dict[str, Any]] = {"max_length": 512, "pooling": "mean"}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        mt = self.config().get("model_type")
        if self.model_types and mt not in self.model_types:
            raise CheckpointError(
                f"{self.weights.config_file} has model_type={mt!r}; expert {self.name!r} loads "
                f"{list(self.model_types)}. The folder holds another model: point "
                f"model_path/MEDMIX_MODEL_DIR at {self.weights.repo_id}."
            )
        self._tokenizer: Any = None

    def _validate_options(self) -> None:
        ml = self.opts["max_length"]
        if not isinstance(ml, int) or isinstance(ml, bool) or ml < 2:
            raise ExpertOptionError(
                f"Option max_length={ml!r} of {self.name!r} must be an integer >= 2."
            )
        if self.opts["pooling"] not in self.poolings:
            raise ExpertOptionError(
                f"Option pooling={self.opts['pooling']!r} of {self.name!r} must be one of "
                f"{list(self.poolings)}."
            )

    def dim(self, modality: ModalitySpec) -> int:
        return int(self.config()["hidden_size"])

    @property
    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(self.weights.path), local_files_only=True)
            tok.padding_side = "right"
            if tok.pad_token is None:
                # decoder tokenizers (Qwen2 base) may lack one; padded positions are masked
                if tok.eos_token is None:
                    raise CheckpointError(
                        f"The tokenizer in {self.weights.path} has neither a pad nor an eos "
                        f"token, so batches cannot be padded."
                    )
                tok.pad_token = tok.eos_token
            self._tokenizer = tok
        return self._tokenizer

    def _load(self):
        import transformers

        cls = getattr(transformers, self.model_class)
        return cls.from_pretrained(str(self.weights.path), local_files_only=True,
                                   dtype=self.torch_dtype(), **self.model_kwargs)

    def _run(self, input_ids, attention_mask):
        """Model forward -> final hidden states [b, T, d]."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    def encode(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> np.ndarray:
        """Embed texts.

        Args:
            modality: a ``text`` modality.
            payloads: N present ``TextData``.
        Returns:
            ``[N, dim]`` float32.
        """
        import torch

        self._check_payloads(modality, payloads, {"text": TextData})
        texts = []
        for i, p in enumerate(payloads):
            if not isinstance(p.text, str) or not p.text.strip():
                raise DataError(
                    f"{self.name}: modality {modality.name!r} payload {i} is an empty text; an "
                    f"absent note is a missing modality (None), not an empty string."
                )
            texts.append(p.text)
        d = self.dim(modality)
        if not texts:
            return np.zeros((0, d), dtype=np.float32)
        tok, model = self.tokenizer, self.model
        model.eval()
        bs = int(self.opts["batch_size"])
        out = []
        for start in range(0, len(texts), bs):
            enc = tok(texts[start:start + bs], padding=True, truncation=True,
                      max_length=int(self.opts["max_length"]), return_tensors="pt")
            ids = enc["input_ids"].to(self._device)  # [b, T]
            mask = enc["attention_mask"].to(self._device)  # [b, T]
            if (mask.sum(dim=1) == 0).any():
                raise DataError(
                    f"{self.name}: a text tokenised to zero tokens; it cannot be embedded."
                )
            with torch.no_grad():
                h = self._run(ids, mask).float()  # [b, T, d]
                if self.opts["pooling"] == "cls":
                    e = h[:, 0]  # [b, d]
                else:
                    m = mask.unsqueeze(-1).to(h.dtype)  # [b, T, 1]
                    e = (h * m).sum(dim=1) / m.sum(dim=1)  # [b, d]
            out.append(e.cpu().numpy())
        return self._finite(np.concatenate(out, axis=0), self.name)  # [N, d]


class GatorTronExpert(TextExpert):
    """GatorTron (UF Health clinical Megatron-BERT)."""

    name: ClassVar[str] = "gatortron"
    family: ClassVar[str] = "domain"
    model_class: ClassVar[str] = "MegatronBertModel"
    model_types: ClassVar[tuple[str, ...]] = ("megatron-bert",)
    model_kwargs: ClassVar[dict[str, Any]] = {"add_pooling_layer": False}
    poolings: ClassVar[tuple[str, ...]] = ("mean", "cls")
    spec: ClassVar[WeightsSpec] = WeightsSpec(
        name="gatortron", repo_id="UFNLP/gatortron-base", local_names=("gatortron",),
        tokenizer_files=TOKENIZER_FILES)


class Qwen2Expert(TextExpert):
    """Qwen2 decoder LLM, mean of final hidden states over valid tokens."""

    name: ClassVar[str] = "qwen2"
    family: ClassVar[str] = "general"
    batch_size: ClassVar[int] = 8
    model_class: ClassVar[str] = "Qwen2Model"
    model_types: ClassVar[tuple[str, ...]] = ("qwen2",)
    spec: ClassVar[WeightsSpec] = WeightsSpec(
        name="qwen2", repo_id="Qwen/Qwen2-0.5B", local_names=("qwen2",),
        tokenizer_files=TOKENIZER_FILES)


_MEDCPT_REPOS = {"query": "ncbi/MedCPT-Query-Encoder", "article": "ncbi/MedCPT-Article-Encoder"}


class MedCPTExpert(TextExpert):
    """MedCPT query or article encoder (BERT), [CLS] embedding."""

    name: ClassVar[str] = "medcpt"
    family: ClassVar[str] = "domain"
    model_class: ClassVar[str] = "BertModel"
    model_types: ClassVar[tuple[str, ...]] = ("bert",)
    model_kwargs: ClassVar[dict[str, Any]] = {"add_pooling_layer": False}
    poolings: ClassVar[tuple[str, ...]] = ("cls",)
    default_options: ClassVar[dict[str, Any]] = {"max_length": None, "pooling": "cls",
                                                 "encoder": "query"}
    spec: ClassVar[WeightsSpec] = WeightsSpec(
        name="medcpt", repo_id=_MEDCPT_REPOS["query"], local_names=("medcpt-query",),
        tokenizer_files=TOKENIZER_FILES)

    def _validate_options(self) -> None:
        enc = self.opts["encoder"]
        if enc not in _MEDCPT_REPOS:
            raise ExpertOptionError(
                f"Option encoder={enc!r} of 'medcpt' must be 'query' or 'article'."
            )
        if self.opts["max_length"] is None:  # MedCPT's own limits
            self.opts["max_length"] = 64 if enc == "query" else 512
        super()._validate_options()

    def weights_spec(self) -> WeightsSpec:
        enc = self.opts["encoder"]
        return WeightsSpec(name=f"medcpt ({enc} encoder)", repo_id=_MEDCPT_REPOS[enc],
                           local_names=(f"medcpt-{enc}",), tokenizer_files=TOKENIZER_FILES)
