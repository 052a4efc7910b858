"""Shared machinery of the foundation-model experts: options, weights, lazy loading.

An expert resolves its weights when it is constructed (file-system checks only, so an
absent model fails at once with :class:`WeightsNotFoundError`), reads its output dimension
from the checkpoint's config without loading the weights, and loads the model on first
use. Loaded models are put in ``eval()`` mode with gradients off; every ``encode`` runs
under ``torch.no_grad()``.

Options every foundation expert accepts:
    model_path: folder holding the checkpoint (skips every other place).
    model_id: Hugging Face repository id overriding the default (another model size).
    allow_download: fetch from the Hugging Face hub when no local copy exists (False).
    cache_dir: Hugging Face cache folder to search instead of the default one.
    device: torch device for the model ("cpu").
    dtype: "float32" (default), "float16" or "bfloat16"; outputs are always float32.
    batch_size: inputs per forward pass.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from medmix_core.errors import DataError, MedmixError
from medmix_core.experts import ExpertEncoder
from medmix_core.types import ModalitySpec, Payload

from .weights import ResolvedWeights, WeightsSpec, read_json, resolve_weights

COMMON_OPTIONS: dict[str, Any] = {
    "model_path": None,
    "model_id": None,
    "allow_download": False,
    "cache_dir": None,
    "device": "cpu",
    "dtype": "float32",
    "batch_size": 16,
}
_DTYPES = ("float32", "float16", "bfloat16")


class ExpertOptionError(MedmixError, ValueError):
    """An expert option with an unknown name or an invalid value."""


class FoundationExpert(ExpertEncoder):
    """Base of the experts that wrap a pretrained foundation model.

    Subclasses set ``spec`` (what the checkpoint holds and where it comes from),
    ``default_options`` (their own options and defaults), and implement ``_load`` and
    ``encode``.
    """

    spec: ClassVar[WeightsSpec]
    default_options: ClassVar[dict[str, Any]] = {}

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        allowed = {**COMMON_OPTIONS, **self.default_options}
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ExpertOptionError(
                f"Unknown option(s) {unknown} for expert {self.name!r}. Known options: "
                f"{', '.join(sorted(allowed))}. Fix the spelling or drop them."
            )
        self.opts: dict[str, Any] = {**allowed, **options}
        if self.opts["dtype"] not in _DTYPES:
            raise ExpertOptionError(
                f"Option dtype={self.opts['dtype']!r} of expert {self.name!r} is not one of "
                f"{_DTYPES}."
            )
        bs = self.opts["batch_size"]
        if not isinstance(bs, int) or isinstance(bs, bool) or bs < 1:
            raise ExpertOptionError(
                f"Option batch_size={bs!r} of expert {self.name!r} must be a positive integer."
            )
        self._validate_options()
        self.weights: ResolvedWeights = resolve_weights(
            self.weights_spec(),
            model_path=self.opts["model_path"],
            allow_download=bool(self.opts["allow_download"]),
            cache_dir=self.opts["cache_dir"],
            repo_id=self.opts["model_id"],
        )
        self._device = str(self.opts["device"])
        self._model: Any = None
        self._config_cache: dict[str, Any] | None = None
        self._hashes: dict[str, str] | None = None

    # -- hooks for subclasses ---------------------------------------------------------
    def weights_spec(self) -> WeightsSpec:
        """What to look for; subclasses whose files depend on options override this."""
        return self.spec

    def _validate_options(self) -> None:
        """Check subclass options; raise ExpertOptionError on a bad value."""

    def _load(self) -> Any:
        """Build the model from ``self.weights.path`` (weights loaded, on CPU)."""
        raise NotImplementedError

    # -- shared behaviour -------------------------------------------------------------
    @property
    def path(self) -> Path:
        return self.weights.path

    def config(self) -> dict[str, Any]:
        """The checkpoint's config file as a dict (read once, no weights loaded)."""
        if self._config_cache is None:
            self._config_cache = read_json(self.weights.config_file)
        return self._config_cache

    def torch_dtype(self):
        import torch

        return {"float32": torch.float32, "float16": torch.float16,
                "bfloat16": torch.bfloat16}[self.opts["dtype"]]

    @property
    def model(self) -> Any:
        """The loaded model: eval mode, frozen, on the expert's device."""
        if self._model is None:
            model = self._load()
            model.eval()
            for p in model.parameters():
                p.requires_grad_(False)
            self._model = model.to(device=self._device, dtype=self.torch_dtype())
        return self._model

    def to(self, device: str) -> FoundationExpert:
        self._device = str(device)
        if self._model is not None:
            self._model = self._model.to(self._device)
        return self

    def n_parameters(self) -> int:
        """Parameters of the loaded model (loads it when not loaded yet)."""
        return int(sum(p.numel() for p in self.model.parameters()))

    def weight_hashes(self) -> dict[str, str]:
        """sha256 of each weight file of the checkpoint (computed once)."""
        if self._hashes is None:
            from medmix_core.store import sha256_file

            self._hashes = {p.name: sha256_file(p) for p in self.weights.weight_files()}
        return self._hashes

    def provenance(self) -> dict[str, Any]:
        out = super().provenance()
        out.update({
            "model_id": self.weights.repo_id,
            "local_path": str(self.weights.path),
            "weights_source": self.weights.source,
            "weights_sha256": self.weight_hashes(),
            "family": self.family,
        })
        try:
            import transformers

            out["transformers_version"] = transformers.__version__
        except ImportError:  # the BiomedCLIP tower does not need it
            pass
        return out

    def _check_payloads(self, modality: ModalitySpec, payloads: Sequence[Payload],
                        types: dict[str, type]) -> None:
        """Every payload must be present and of the class that ``modality.kind`` implies."""
        if modality.kind not in self.kinds:
            raise DataError(
                f"Expert {self.name!r} encodes modality kinds {list(self.kinds)}; modality "
                f"{modality.name!r} is of kind {modality.kind!r}. Pick an expert for that kind."
            )
        want = types[modality.kind]
        for i, p in enumerate(payloads):
            if not isinstance(p, want):
                found = "None (missing)" if p is None else type(p).__name__
                raise DataError(
                    f"Expert {self.name!r}, modality {modality.name!r}: payload {i} is "
                    f"{found}, expected {want.__name__}. Pass only present payloads of the "
                    f"modality's kind; missing ones are carried by the mask."
                )

    @staticmethod
    def _finite(out: np.ndarray, name: str) -> np.ndarray:
        if not np.isfinite(out).all():
            bad = int((~np.isfinite(out).all(axis=1)).sum())
            raise DataError(
                f"Expert {name!r} produced non-finite embeddings for {bad} input(s); the model "
                f"overflowed (try dtype='float32') or an input holds NaN/inf."
            )
        return out.astype(np.float32, copy=False)
