"""Helpers several test modules use: real PhysioNet stays, toy time-series payloads and the
benchmark scripts as modules."""

from __future__ import annotations

import contextlib
import functools
import importlib
import sys
from pathlib import Path

import numpy as np

from medmix_core.types import ModalitySpec, TimeSeriesData

#: a two-variable time-series modality for hand-made payloads (see :func:`toy_ts`)
TOY = ModalitySpec("toy", "timeseries", ["a", "b"])


@functools.lru_cache(maxsize=4)
def real_stays(tmp_root: str, n: int = 5):
    """The first ``n`` real PhysioNet stays (smallest RecordIDs), through the dataset plugin."""
    from medmix_datasets.physionet2012 import PhysioNet2012, write_subset

    ds = PhysioNet2012(str(write_subset(Path(tmp_root) / "stays", n)))
    return ds, ds.samples()


def toy_ts(a=None, b=None, horizon=48.0) -> TimeSeriesData:
    """Payload of :data:`TOY`: a/b are lists of (time, value), or None (not measured)."""
    times, values = [], []
    for obs in (a, b):
        obs = obs or []
        times.append(np.array([t for t, _ in obs], dtype=float))
        values.append(np.array([v for _, v in obs], dtype=float))
    return TimeSeriesData(["a", "b"], times, values, horizon)


#: the benchmark scripts' folder (not a package: its scripts import each other by name)
BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


@contextlib.contextmanager
def bench_module(name: str):
    """The benchmark script ``benchmarks/<name>.py`` imported as a module, with the folder
    on ``sys.path`` only while it is in use."""
    sys.path.insert(0, str(BENCH))
    try:
        yield importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))
