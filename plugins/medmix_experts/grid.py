"""``grid``: weight-free regular-grid expert for time series.

The window ``[0, horizon]`` hours (default 48) is cut into ``B`` bins of ``bin_hours``.
Per variable and bin: the last value measured in the bin, z-scored with the variable's
training mean and standard deviation (over all training observations) and clipped to
``[-clip, clip]``, then carried forward into later empty bins; bins before the first
measurement hold 0 (the training mean). Beside it, a 0/1 mask says whether the variable was
measured in that bin (a carried-forward value has mask 0), so an absent variable (all
zeros, mask all 0) never looks like a measured value.

Output layout: ``[values (V x B, variable-major), masks (V x B)]`` flattened, so
``dim = 2 * V * B``. With ``bin_hours`` unset the bin is the smallest of 1, 2, 3, 4, 6, 8,
12, 16, 24, 48 hours that keeps ``dim <= max_dim`` (default 1024): hourly for every
PhysioNet 2012 group (at most 10 variables -> 960). Observations outside ``[0, horizon]``
are ignored; one at exactly ``horizon`` falls in the last bin.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from medmix_core import ExpertEncoder, ModalitySpec, hookimpl
from medmix_core.errors import DataError
from medmix_core.plugin_utils import check_options
from medmix_experts.stats import (
    _names_array,
    fitted_state,
    flatten_timeseries,
    restore_norm_state,
)

AUTO_BINS = (1, 2, 3, 4, 6, 8, 12, 16, 24, 48)


class GridExpert(ExpertEncoder):
    """Binned, forward-filled, normalised values plus observation masks.

    Options:
        bin_hours (float): bin width; default: chosen from ``AUTO_BINS`` under ``max_dim``.
        horizon (float): window length in hours (default 48).
        max_dim (int): dimension budget for the automatic bin width (default 1024).
        clip (float): bound of the z-scores (default 10).
    """

    name = "grid"
    kinds = ("timeseries",)
    version = "1"
    family = "domain"
    batch_size = 4096

    def __init__(self, **options: Any) -> None:
        check_options(self.name, options, {"bin_hours": (int, float), "horizon": (int, float),
                                           "max_dim": int, "clip": (int, float)})
        super().__init__(**options)

        def opt(key: str, default: float) -> float:
            return float(options[key]) if options.get(key) is not None else default

        self.horizon = opt("horizon", 48.0)
        self.max_dim = int(opt("max_dim", 1024))
        self.clip = opt("clip", 10.0)
        self.bin_hours = options.get("bin_hours")
        for key, val in (("horizon", self.horizon), ("max_dim", self.max_dim),
                         ("clip", self.clip), ("bin_hours", self.bin_hours)):
            if val is not None and not val > 0:
                raise DataError(f"Expert 'grid': {key} must be > 0, got {val}.")
        self._state: dict[str, dict[str, np.ndarray]] = {}

    # ------------------------------------------------------------------ geometry
    def bins(self, modality: ModalitySpec) -> tuple[float, int]:
        """(bin width in hours, number of bins B) for this modality."""
        nv = max(len(modality.variables), 1)
        if self.bin_hours is not None:
            width = float(self.bin_hours)
        else:
            width = self.horizon
            for w in AUTO_BINS:
                if 2 * nv * math.ceil(self.horizon / w) <= self.max_dim:
                    width = float(w)
                    break
        return width, max(1, math.ceil(self.horizon / width - 1e-9))

    def dim(self, modality: ModalitySpec) -> int:
        self._check_kind(modality)
        return 2 * len(modality.variables) * self.bins(modality)[1]

    def _check_kind(self, modality: ModalitySpec) -> None:
        if modality.kind not in self.kinds:
            raise DataError(f"Expert 'grid' encodes time series only; {modality.name!r} is "
                            f"{modality.kind!r}. Use 'stats' for tabular modalities.")

    # ------------------------------------------------------------------ state
    def fit(self, modality: ModalitySpec, payloads: Sequence[Any]) -> None:
        """Per-variable mean/std over every observation of the given (training) payloads."""
        self._check_kind(modality)
        obs = flatten_timeseries(modality, payloads)
        nv = len(modality.variables)
        inside = (obs["time"] >= 0) & (obs["time"] <= self.horizon)
        var, v = obs["var"][inside], obs["value"][inside]
        n = np.bincount(var, minlength=nv).astype(np.float64)
        mean = np.divide(np.bincount(var, weights=v, minlength=nv), n,
                         out=np.zeros(nv), where=n > 0)
        sq = np.bincount(var, weights=(v - mean[var]) ** 2, minlength=nv)
        std = np.sqrt(np.divide(sq, n, out=np.zeros(nv), where=n > 0))
        std[~(std > 1e-8)] = 1.0
        self._state[modality.name] = {"mean": mean, "std": std,
                                      "variables": _names_array(modality.variables)}

    def get_state(self, modality: ModalitySpec) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._fitted(modality).items()}

    def set_state(self, modality: ModalitySpec, state: dict[str, np.ndarray]) -> None:
        self._check_kind(modality)
        self._state[modality.name] = restore_norm_state("grid", modality, state,
                                                        len(modality.variables))

    def _fitted(self, modality: ModalitySpec) -> dict[str, np.ndarray]:
        return fitted_state("grid", self._state, modality)

    # ------------------------------------------------------------------ encoding
    def encode(self, modality: ModalitySpec, payloads: Sequence[Any]) -> np.ndarray:
        """[N, 2 * V * B] float32: forward-filled z-values then observation masks."""
        self._check_kind(modality)
        st = self._fitted(modality)
        width, nb = self.bins(modality)
        n, nv = len(payloads), len(modality.variables)
        obs = flatten_timeseries(modality, payloads)  # sorted by row, variable, time
        t = obs["time"]
        inside = (t >= 0) & (t <= self.horizon)
        row, var, t, v = obs["row"][inside], obs["var"][inside], t[inside], obs["value"][inside]
        b = np.minimum((t / width).astype(np.int64), nb - 1)
        cell = (row * nv + var) * nb + b  # non-decreasing: sorted by row, var, time
        z = np.clip((v - st["mean"][var]) / st["std"][var], -self.clip, self.clip)
        last = np.r_[cell[1:] != cell[:-1], True] if len(cell) else np.zeros(0, dtype=bool)
        vals = np.zeros(n * nv * nb)
        mask = np.zeros(n * nv * nb, dtype=bool)
        vals[cell[last]] = z[last]  # the last measurement of each bin
        mask[cell[last]] = True
        vals, mask = vals.reshape(n * nv, nb), mask.reshape(n * nv, nb)  # [N * V, B]
        src = np.maximum.accumulate(np.where(mask, np.arange(nb), -1), axis=1)
        filled = np.where(src >= 0, np.take_along_axis(vals, np.maximum(src, 0), axis=1), 0.0)
        out = np.concatenate([filled.reshape(n, nv * nb), mask.reshape(n, nv * nb)], axis=1)
        return out.astype(np.float32)  # [N, 2 * V * B]


@hookimpl
def register_experts(register):
    register("grid", GridExpert)
