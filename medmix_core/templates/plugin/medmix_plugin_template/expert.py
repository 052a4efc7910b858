"""A weight-free expert for tabular and time-series modalities.

Per variable of the modality: the mean of its observations (time series) or its value
(tabular), z-scored with statistics fitted on the training split, then a 0/1 observed
indicator, so an unmeasured variable (set to the training mean, 0) never looks like a
measurement. Replace ``_summary`` with your own model's forward pass to wrap a real encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from medmix_core import ExpertEncoder, ModalitySpec, TabularData, TimeSeriesData
from medmix_core.errors import DataError


class SummaryExpert(ExpertEncoder):
    """z-scored per-variable summary plus observed indicators (dim = 2 x variables)."""

    name = "plugin-template"
    kinds = ("tabular", "timeseries")
    version = "1"
    family = "domain"

    def __init__(self, **options: Any) -> None:
        if options:
            raise DataError(f"Expert {self.name!r}: unknown option(s) {sorted(options)}; it "
                            f"takes none.")
        super().__init__(**options)
        self._state: dict[str, dict[str, np.ndarray]] = {}

    def dim(self, modality: ModalitySpec) -> int:
        if modality.kind not in self.kinds or not modality.variables:
            raise DataError(f"Expert {self.name!r} needs a tabular or timeseries modality with "
                            f"declared variables; {modality.name!r} is {modality.kind!r} with "
                            f"{len(modality.variables)} variables.")
        return 2 * len(modality.variables)

    def _summary(self, modality: ModalitySpec, payloads: Sequence[Any]) -> np.ndarray:
        """[N, V] float64: value or mean of observations per variable, NaN = unmeasured."""
        col = {v: j for j, v in enumerate(modality.variables)}
        out = np.full((len(payloads), len(col)), np.nan)
        for r, p in enumerate(payloads):
            if isinstance(p, TabularData):
                values = list(np.asarray(p.values, dtype=np.float64).ravel())
            elif isinstance(p, TimeSeriesData):
                values = []
                for x in p.values:
                    x = np.asarray(x, dtype=np.float64).ravel()
                    x = x[np.isfinite(x)]
                    values.append(x.mean() if len(x) else np.nan)
            else:
                raise DataError(f"Payload {r} of {modality.name!r} is {type(p).__name__}; "
                                f"expected TabularData or TimeSeriesData.")
            if len(values) != len(p.variables):
                raise DataError(f"Payload {r} of {modality.name!r} names {len(p.variables)} "
                                f"variables but carries {len(values)} values; expected one "
                                f"value (tabular) or one series (timeseries) per variable.")
            vals = zip(p.variables, values, strict=True)
            for v, x in vals:
                if v not in col:
                    raise DataError(f"Payload {r} of {modality.name!r} has variable {v!r} that "
                                    f"the modality does not declare.")
                out[r, col[v]] = x
        out[~np.isfinite(out)] = np.nan
        return out

    def fit(self, modality: ModalitySpec, payloads: Sequence[Any]) -> None:
        x = self._summary(modality, payloads)
        seen = ~np.isnan(x)
        n = seen.sum(axis=0)
        mean = np.divide(np.where(seen, x, 0.0).sum(0), n, out=np.zeros(x.shape[1]), where=n > 0)
        var = np.divide((np.where(seen, x - mean, 0.0) ** 2).sum(0), n,
                        out=np.zeros(x.shape[1]), where=n > 0)
        std = np.sqrt(var)
        std[~(std > 1e-8)] = 1.0
        self._state[modality.name] = {"mean": mean, "std": std}

    def get_state(self, modality: ModalitySpec) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._fitted(modality).items()}

    def set_state(self, modality: ModalitySpec, state: dict[str, np.ndarray]) -> None:
        v = len(modality.variables)
        if set(state) != {"mean", "std"} or any(np.shape(state[k]) != (v,) for k in state):
            raise DataError(f"State for {modality.name!r} must hold 'mean' and 'std' of shape "
                            f"[{v}]; found { {k: np.shape(x) for k, x in state.items()} }.")
        self._state[modality.name] = {k: np.asarray(x, dtype=np.float64).copy()
                                      for k, x in state.items()}

    def _fitted(self, modality: ModalitySpec) -> dict[str, np.ndarray]:
        if modality.name not in self._state:
            raise DataError(f"Expert {self.name!r} is not fitted for modality "
                            f"{modality.name!r}: call fit() or set_state() first.")
        return self._state[modality.name]

    def encode(self, modality: ModalitySpec, payloads: Sequence[Any]) -> np.ndarray:
        st = self._fitted(modality)
        x = self._summary(modality, payloads)  # [N, V]
        seen = ~np.isnan(x)
        z = np.clip(np.where(seen, (np.where(seen, x, 0.0) - st["mean"]) / st["std"], 0.0),
                    -10.0, 10.0)
        return np.concatenate([z, seen.astype(np.float64)], axis=1).astype(np.float32)
