"""Bridge: a frozen generative model that turns one modality's input into text.

A bridge is what lets a text-only expert see an image, a slide or a CT volume: a chest
X-ray becomes a draft radiology report (MAIRA-2), a slide a pathology report (HistGen), a
CT volume a CT report (Merlin). Bridges are plugins of their own kind, registered with the
``register_bridges`` hook and looked up with :func:`medmix_core.plugins.get_bridge`.

Like an :class:`~medmix_core.experts.ExpertEncoder`, a bridge is constructed with keyword
options, loads its weights from a local path (never downloading silently; absent weights
raise :class:`~medmix_core.errors.WeightsNotFoundError` at construction, saying where it
looked and what to do) and is deterministic: the same input gives the same text, so the
text can stand in for the input in a cache key.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

from medmix_core.errors import DataError
from medmix_core.types import ModalitySpec, Payload


class Bridge(ABC):
    """A frozen generator: raw modality payloads -> one text per payload.

    Class attributes:
        name: registry name.
        kinds: modality kinds it reads ("image", "slide", "volume", ...).
        version: bumps when the text for the same input changes (prompt, decoding rule).
    """

    name: ClassVar[str] = ""
    kinds: ClassVar[tuple[str, ...]] = ()
    version: ClassVar[str] = "1"

    def __init__(self, **options: Any) -> None:
        self.options = options

    def accepts(self, modality: ModalitySpec) -> bool:
        return modality.kind in self.kinds

    @abstractmethod
    def generate(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> list[str]:
        """Generate one text per present payload.

        Args:
            modality: the modality being bridged.
            payloads: N present payloads (never None).
        Returns:
            N strings, in payload order.
        """

    def texts(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> list[str]:
        """:meth:`generate`, checked: one non-empty string per payload.

        Raises:
            DataError: the modality is of a kind the bridge does not read, or the bridge
                returned the wrong number of texts, or an empty one.
        """
        if not self.accepts(modality):
            raise DataError(
                f"Bridge {self.name!r} reads modality kinds {list(self.kinds)}; modality "
                f"{modality.name!r} is of kind {modality.kind!r}. Pick a bridge for that kind "
                f"(`medmix plugins` lists the installed bridges)."
            )
        if not payloads:
            return []
        out = self.generate(modality, payloads)
        if not isinstance(out, list) or len(out) != len(payloads):
            n = len(out) if isinstance(out, list) else type(out).__name__
            raise DataError(
                f"Bridge {self.name!r} returned {n} texts for {len(payloads)} payloads of "
                f"modality {modality.name!r}; expected one string per payload."
            )
        for i, t in enumerate(out):
            if not isinstance(t, str) or not t.strip():
                raise DataError(
                    f"Bridge {self.name!r} generated an empty text for payload {i} of modality "
                    f"{modality.name!r}; the model produced only special tokens. Check its "
                    f"prompt options, or raise max_new_tokens."
                )
        return out

    def check_weights(self) -> None:
        """Raise :class:`~medmix_core.errors.WeightsNotFoundError` when this machine lacks
        the weights, cheaply (without loading the model). Default: nothing to check."""

    def provenance(self) -> dict[str, Any]:
        """What produced the texts: plugin, version, options, weights if known."""
        return {"bridge": self.name, "version": self.version, "options": dict(self.options)}

    def n_parameters(self) -> int:
        """Parameters of the generative model (0 when it has none)."""
        return 0

    def to(self, device: str) -> Bridge:
        return self
