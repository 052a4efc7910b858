"""Dataset plugins: a source of raw samples with modalities, tasks and fixed splits."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from medmix_core.types import ModalitySpec, Sample, TaskSpec


class Dataset(ABC):
    """Reads a cohort and yields :class:`Sample` objects.

    Constructed as ``DatasetClass(source=None, **options)``; ``source=None`` means the
    dataset's bundled default, if it has one.
    """

    name: ClassVar[str] = ""
    #: keys of ``Sample.meta`` worth stratifying results by (sex, age band, ...): stored
    #: per sample in the store (``EmbeddingStore.attributes()``) as strings or None
    attributes: ClassVar[tuple[str, ...]] = ()
    #: experts ``medmix run`` extracts when none are named (cheap ones, ideally)
    default_experts: ClassVar[tuple[str, ...]] = ()
    #: per expert name, options used unless the caller sets them (e.g. which of the
    #: dataset's series a costly expert should see); recorded in each expert's provenance
    default_expert_options: ClassVar[dict[str, dict[str, Any]]] = {}
    #: the full committee, cheapest first: ``medmix run`` with no ``--experts`` takes the
    #: longest prefix whose extraction fits its time budget (see :mod:`medmix_core.plan`)
    committee: ClassVar[tuple[str, ...]] = ()
    #: the teacher that completes the committee (training only)
    committee_teacher: ClassVar[str | None] = None
    #: measured extraction seconds of the bundled data per device kind ("cpu": on 2
    #: cores, "cuda": one GPU) and encoder name; the planner's cost model
    extract_seconds: ClassVar[dict[str, dict[str, float]]] = {}
    #: measured seconds of one default training run per device kind, with the committee
    train_seconds: ClassVar[dict[str, float]] = {}
    #: RunConfig values the CLI uses for this dataset unless the project file, --config or
    #: a flag sets them (e.g. regularisation chosen on this dataset's validation split)
    run_defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, source: str | None = None, **options: Any) -> None:
        self.source = source
        self.options = options

    @abstractmethod
    def modalities(self) -> list[ModalitySpec]:
        """The modalities every sample may carry, in a fixed order."""

    @abstractmethod
    def tasks(self) -> list[TaskSpec]:
        """The prediction tasks, in a fixed order; the first is the default."""

    @abstractmethod
    def samples(self) -> list[Sample]:
        """All samples, in a fixed order."""

    def splits(self, samples: list[Sample]) -> dict[str, list[int]]:
        """Fixed train/val/test row indices. Default: seeded split stratified on task 0."""
        task = self.tasks()[0].name
        y = np.array([_strat_key(s.labels.get(task)) for s in samples])
        return stratified_split(y, seed=int(self.options.get("split_seed", 0)))

    def identity(self) -> dict[str, Any]:
        """What data this is: name, source, and a content hash when known."""
        return {"name": self.name, "source": self.source}

    def report(self) -> dict[str, Any]:
        """Counts worth telling a user after loading (invalid values, missing rates, ...)."""
        return {}


def missing_rates(samples: Sequence[Sample], modalities: Sequence[ModalitySpec]
                  ) -> dict[str, float]:
    """Per modality: the share of ``samples`` whose payload is None (absent).

    The one owner of this figure for raw samples (datasets' reports and the store's
    extraction report use it; :meth:`EmbeddingStore.modality_missing_rates` is the same
    figure on a store's expert masks).

    Args:
        samples: the dataset's samples.
        modalities: its modality specs (order kept).
    Returns:
        {modality: missing rate in [0, 1]}; 0.0 for every modality when there are no samples.
    """
    n = len(samples)
    if n == 0:
        return {m.name: 0.0 for m in modalities}
    return {m.name: sum(s.modalities.get(m.name) is None for s in samples) / n
            for m in modalities}


def _strat_key(label: Any) -> int:
    if label is None:
        return -1
    arr = np.asarray(label, dtype=float).ravel()
    if arr.size == 0 or np.isnan(arr).any():
        return -1
    return int(arr[0]) if arr.size == 1 else int(arr.argmax())


def stratified_split(
    y: np.ndarray, fractions: tuple[float, float, float] = (0.7, 0.15, 0.15), seed: int = 0
) -> dict[str, list[int]]:
    """Seeded stratified split of rows into train/val/test; identical on every machine.

    Args:
        y: [N] integer stratum per row.
        fractions: train, val, test shares (sum to 1).
        seed: numpy seed.
    Returns:
        {"train": [...], "val": [...], "test": [...]} sorted row indices.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, list[int]] = {"train": [], "val": [], "test": []}
    for stratum in np.unique(y):
        rows = np.flatnonzero(y == stratum)
        rng.shuffle(rows)
        n_val = int(round(fractions[1] * len(rows)))
        n_test = int(round(fractions[2] * len(rows)))
        out["val"] += rows[:n_val].tolist()
        out["test"] += rows[n_val:n_val + n_test].tolist()
        out["train"] += rows[n_val + n_test:].tolist()
    return {k: sorted(v) for k, v in out.items()}
