"""ExpertEncoder and Teacher: frozen models that turn one modality into an embedding.

An expert is constructed with keyword options, optionally fitted on the training split
(normalisation statistics, a retrieval index: never on validation or test data), and then
encodes lists of payloads. It never downloads weights silently: weights come from a local
path or an installed package, and their absence raises
:class:`medmix_core.errors.WeightsNotFoundError` saying where it looked and what to do.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from medmix_core.errors import DataError
from medmix_core.types import ModalitySpec, Payload


class ExpertEncoder(ABC):
    """A frozen encoder: raw modality payloads -> ``[N, dim]`` embeddings.

    Class attributes:
        name: registry name.
        kinds: modality kinds it accepts ("tabular", "timeseries", "text", "image", "volume").
        version: bumps when the output for the same input changes (part of the cache key).
        family: "general", "domain" or "rag" (the paper's committee roles), for ablations.
    """

    name: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ()
    version: ClassVar[str] = "1"
    family: ClassVar[str] = "domain"
    #: rows per encode() call that extraction should use
    batch_size: ClassVar[int] = 256

    def __init__(self, **options: Any) -> None:
        self.options = options

    def accepts(self, modality: ModalitySpec) -> bool:
        return modality.kind in self.kinds

    @abstractmethod
    def dim(self, modality: ModalitySpec) -> int:
        """Output dimension d_k for this modality."""

    def fit(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> None:
        """Fit any state on training-split payloads of one modality (all present). Default: none."""

    def get_state(self, modality: ModalitySpec) -> dict[str, np.ndarray]:
        """Fitted state for this modality, saved in the store (arrays only)."""
        return {}

    def set_state(self, modality: ModalitySpec, state: dict[str, np.ndarray]) -> None:
        """Restore state written by :meth:`get_state` (used to encode an external cohort)."""

    @abstractmethod
    def encode(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> np.ndarray:
        """Encode present payloads of one modality.

        Args:
            modality: the modality being encoded.
            payloads: N present payloads (never None).
        Returns:
            float32 array ``[N, dim]``; must be finite.
        """

    def provenance(self) -> dict[str, Any]:
        """What produced the embeddings: plugin, version, weights and their hash if known."""
        return {"expert": self.name, "version": self.version, "options": dict(self.options)}

    def n_parameters(self) -> int:
        """Parameters of the upstream model (0 for weight-free experts)."""
        return 0

    def check_weights(self) -> None:
        """Raise :class:`~medmix_core.errors.WeightsNotFoundError` when this machine lacks
        the weights, cheaply (without loading the model). Default: nothing to check."""

    def to(self, device: str) -> ExpertEncoder:
        return self


class Teacher(ExpertEncoder):
    """An ExpertEncoder used for distillation only: its embeddings are read in training
    and never by a deployed model."""

    family: ClassVar[str] = "teacher"


def check_payload_types(expert: str, modality: ModalitySpec, payloads: Sequence[Payload],
                        want: type) -> None:
    """Raise :class:`DataError` unless every payload is a ``want`` (absent payloads are left
    out by the caller, never passed as None)."""
    for i, p in enumerate(payloads):
        if not isinstance(p, want):
            raise DataError(f"Expert {expert!r}, modality {modality.name!r}: payload {i} is "
                            f"{type(p).__name__}, expected {want.__name__} (absent payloads "
                            f"must be left out, not passed as None).")
