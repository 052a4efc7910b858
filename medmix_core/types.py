"""Raw-sample data types that flow from dataset plugins into expert encoders.

A missing modality is ``None`` in ``Sample.modalities``; a missing value inside a
modality is NaN (tabular) or simply absent (time series). Nothing is zero-filled here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Union

import numpy as np

ModalityKind = Literal["tabular", "timeseries", "text", "image", "volume", "slide"]
TaskType = Literal["binary", "multilabel", "multiclass"]


@dataclass
class TabularData:
    """One row of named values; NaN marks an unmeasured variable."""

    variables: list[str]
    values: np.ndarray  # [V] float, NaN = missing

    kind: str = field(default="tabular", init=False)


@dataclass
class TimeSeriesData:
    """Irregularly sampled variables: per variable, times (hours) and values.

    A variable with no observation has empty arrays. ``horizon`` is the window length in
    hours (48 for PhysioNet 2012).
    """

    variables: list[str]
    times: list[np.ndarray]  # per variable: [n_v] float hours since start
    values: list[np.ndarray]  # per variable: [n_v] float
    horizon: float = 48.0

    kind: str = field(default="timeseries", init=False)

    def observed(self) -> np.ndarray:
        """[V] bool: which variables have at least one observation."""
        return np.array([len(v) > 0 for v in self.values], dtype=bool)


@dataclass
class TextData:
    """Free text (a note, a report, a serialised record)."""

    text: str

    kind: str = field(default="text", init=False)


@dataclass
class ImageData:
    """One or more image views: file paths or HxWxC uint8 arrays."""

    views: list[Any]

    kind: str = field(default="image", init=False)


@dataclass
class VolumeData:
    """A 3-D volume (CT): path to .npy/.npz/.nii.gz or a [D, H, W] array in HU."""

    volume: Any

    kind: str = field(default="volume", init=False)


@dataclass
class SlideData:
    """Whole-slide images of one sample: paths of pyramidal slide files (.svs, .tiff, ...).

    A kind of its own, so that image experts, which load a picture whole, never open a
    gigapixel slide; slide experts tile it.
    """

    paths: list[str]

    kind: str = field(default="slide", init=False)


Payload = Union[TabularData, TimeSeriesData, TextData, ImageData, VolumeData, SlideData]


@dataclass
class ModalitySpec:
    """A modality of a dataset: its name, kind and (for tabular/timeseries) variables."""

    name: str
    kind: str
    variables: list[str] = field(default_factory=list)
    units: dict[str, str] = field(default_factory=dict)


@dataclass
class TaskSpec:
    """A prediction task. ``classes`` names the C outputs (multi-label/multi-class)."""

    name: str
    type: str  # "binary" | "multilabel" | "multiclass"
    classes: list[str] = field(default_factory=list)

    @property
    def n_outputs(self) -> int:
        return 1 if self.type == "binary" else len(self.classes)


@dataclass
class Sample:
    """One patient (stay): id, per-modality payload (None = missing), labels per task.

    Labels: binary -> 0/1 float; multilabel -> list of 0/1; multiclass -> class index.
    NaN (or None) marks an unknown label.
    """

    id: str
    modalities: dict[str, Payload | None]
    labels: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)
