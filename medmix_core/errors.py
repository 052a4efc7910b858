"""Errors raised by medmix. Each message says what was expected, what was found, what to do."""

from __future__ import annotations


class MedmixError(Exception):
    """Base class of every error medmix raises on purpose."""


class UnknownPluginError(MedmixError, KeyError):
    """A plugin name that no installed plugin registered."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0])


class DuplicatePluginError(MedmixError):
    """Two plugins registered the same name for the same kind."""


class StoreError(MedmixError):
    """An EmbeddingStore that is missing, corrupt or inconsistent."""


class DataError(MedmixError):
    """Input data with the wrong shape, NaN, mismatched ids or a missing file."""


class WeightsNotFoundError(MedmixError):
    """A model whose weights are not on this machine."""
