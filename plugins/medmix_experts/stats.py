"""``stats``: weight-free summary-statistics expert for time series and tabular modalities.

Time series (per variable of the modality, in the order of ``ModalitySpec.variables``):
``last, mean, min, max, log1p(count), slope`` over the window, each z-scored with the
training statistics, then a 0/1 *observed* indicator; 7 features per variable. The slope
is the least-squares slope of value against time (units per hour).

Tabular: each value z-scored with the training statistics, then a 0/1 observed indicator;
2 features per variable.

Absent values never look like measurements: a feature that cannot be computed (variable
not measured; slope with fewer than two distinct times) is set to the training mean, which
is 0 after z-scoring, and the observed indicator says it was absent. A measured value that
happens to equal the training mean is distinguished by the indicator being 1.

``fit`` computes per-feature mean and standard deviation on the training payloads only,
over the stays where the feature exists; ``get_state``/``set_state`` carry those arrays
(plus the variable names) so an external cohort is encoded with the training statistics.
z-scores are clipped to ``[-clip, clip]`` (option ``clip``, default 10) because laboratory
values are heavy-tailed. Output is deterministic and finite.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medmix_core import ExpertEncoder, ModalitySpec, TabularData, TimeSeriesData, hookimpl
from medmix_core.errors import DataError
from medmix_core.plugin_utils import check_options

TS_FEATURES = ("last", "mean", "min", "max", "log1p_count", "slope")


def _names_array(variables: Sequence[str]) -> np.ndarray:
    """Variable names as uint8 bytes, so they can live in a safetensors state."""
    return np.frombuffer("\n".join(variables).encode("utf-8"), dtype=np.uint8).copy()


def restore_norm_state(expert: str, modality: ModalitySpec, state: dict[str, np.ndarray],
                       n_feat: int) -> dict[str, np.ndarray]:
    """Validate a saved z-score state (mean, std, variables) of ``n_feat`` features.

    Raises:
        DataError: a state of another expert, other variables, or other shapes.
    """
    missing = {"mean", "std", "variables"} - set(state)
    if missing:
        raise DataError(f"{expert} state for {modality.name!r} lacks {sorted(missing)}; it "
                        f"was not written by this expert.")
    names = np.asarray(state["variables"], dtype=np.uint8).tobytes().decode("utf-8")
    if names.split("\n") != list(modality.variables):
        raise DataError(f"{expert} state for {modality.name!r} was fitted on variables "
                        f"{names.split(chr(10))}, but the modality has "
                        f"{modality.variables}; re-fit on this modality.")
    mean, std = np.asarray(state["mean"], np.float64), np.asarray(state["std"], np.float64)
    if mean.shape != (n_feat,) or std.shape != (n_feat,):
        raise DataError(f"{expert} state for {modality.name!r}: expected mean and std of "
                        f"shape [{n_feat}], found {list(mean.shape)} and {list(std.shape)}.")
    return {"mean": mean.copy(), "std": std.copy(),
            "variables": _names_array(modality.variables)}


def fitted_state(expert: str, states: dict[str, dict[str, np.ndarray]],
                 modality: ModalitySpec) -> dict[str, np.ndarray]:
    """The fitted state of one modality, or a DataError saying how to get one."""
    if modality.name not in states:
        raise DataError(f"Expert {expert!r} is not fitted for modality {modality.name!r}: call "
                        f"fit() with training payloads or set_state() with a saved state.")
    return states[modality.name]


def _variable_map(modality: ModalitySpec, payload_vars: list[str], kind: str) -> list[int]:
    """Column of each payload variable in the modality's variable order."""
    if payload_vars == modality.variables:
        return list(range(len(payload_vars)))
    index = {v: i for i, v in enumerate(modality.variables)}
    extra = [v for v in payload_vars if v not in index]
    if extra:
        raise DataError(f"A {kind} payload of modality {modality.name!r} has variables {extra} "
                        f"that the modality does not declare ({modality.variables}). The "
                        f"dataset plugin must list every variable in its ModalitySpec.")
    return [index[v] for v in payload_vars]


def flatten_timeseries(modality: ModalitySpec, payloads: Sequence[Any]) -> dict[str, np.ndarray]:
    """All observations of N time-series payloads as flat arrays.

    Non-finite values or times count as not measured and are dropped.

    Args:
        modality: the modality (its ``variables`` fix the column order).
        payloads: N present :class:`TimeSeriesData`.
    Returns:
        "row" [R] int64 payload index, "var" [R] int64 variable column, "time" [R] and
        "value" [R] float64, ordered by row, variable, time (input order breaks ties).
    """
    ts_list, vs_list, rows, cols = [], [], [], []
    for r, p in enumerate(payloads):
        if not isinstance(p, TimeSeriesData):
            raise DataError(f"Modality {modality.name!r} is a time series, but payload {r} is "
                            f"{type(p).__name__}; expected TimeSeriesData.")
        if not (len(p.variables) == len(p.times) == len(p.values)):
            raise DataError(f"TimeSeriesData {r} of {modality.name!r}: {len(p.variables)} "
                            f"variables but {len(p.times)} time and {len(p.values)} value arrays; "
                            f"expected one of each per variable.")
        for j, t, v in zip(_variable_map(modality, list(p.variables), "timeseries"),
                           p.times, p.values):
            if len(t) != len(v):
                raise DataError(f"TimeSeriesData {r} of {modality.name!r}, variable "
                                f"{modality.variables[j]!r}: {len(t)} times but {len(v)} values.")
            if len(t):
                ts_list.append(np.asarray(t, dtype=np.float64).ravel())
                vs_list.append(np.asarray(v, dtype=np.float64).ravel())
                rows.append(r)
                cols.append(j)
    if not ts_list:
        empty_i, empty_f = np.zeros(0, dtype=np.int64), np.zeros(0, dtype=np.float64)
        return {"row": empty_i, "var": empty_i, "time": empty_f, "value": empty_f}
    lengths = np.array([len(t) for t in ts_list])
    t = np.concatenate(ts_list)  # [R]
    v = np.concatenate(vs_list)  # [R]
    row = np.repeat(np.array(rows, dtype=np.int64), lengths)
    var = np.repeat(np.array(cols, dtype=np.int64), lengths)
    ok = np.isfinite(t) & np.isfinite(v)
    row, var, t, v = row[ok], var[ok], t[ok], v[ok]
    order = np.lexsort((np.arange(len(t)), t, var, row))
    return {"row": row[order], "var": var[order], "time": t[order], "value": v[order]}


def tabular_matrix(modality: ModalitySpec, payloads: Sequence[Any]) -> np.ndarray:
    """[N, V] float64 values of N tabular payloads in the modality's order; NaN = missing."""
    out = np.full((len(payloads), len(modality.variables)), np.nan)
    for r, p in enumerate(payloads):
        if not isinstance(p, TabularData):
            raise DataError(f"Modality {modality.name!r} is tabular, but payload {r} is "
                            f"{type(p).__name__}; expected TabularData.")
        vals = np.asarray(p.values, dtype=np.float64).ravel()
        if len(vals) != len(p.variables):
            raise DataError(f"TabularData {r} of {modality.name!r}: {len(p.variables)} variables "
                            f"but {len(vals)} values.")
        out[r, _variable_map(modality, list(p.variables), "tabular")] = vals
    out[~np.isfinite(out)] = np.nan
    return out


def masked_moments(x: np.ndarray, valid: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column mean and std of ``x`` [N, F] over rows where ``valid`` [N, F].

    Columns with no valid row get mean 0; a std below 1e-8 (or undefined) becomes 1, so
    normalising with them is the identity shift rather than a division by zero.
    """
    n = valid.sum(axis=0)
    xs = np.where(valid, x, 0.0)
    mean = np.divide(xs.sum(axis=0), n, out=np.zeros(x.shape[1]), where=n > 0)
    var = np.divide((np.where(valid, x - mean, 0.0) ** 2).sum(axis=0), n,
                    out=np.zeros(x.shape[1]), where=n > 0)
    std = np.sqrt(var)
    std[~(std > 1e-8)] = 1.0
    return mean, std


def zscore(x: np.ndarray, valid: np.ndarray, mean: np.ndarray, std: np.ndarray,
           clip: float) -> np.ndarray:
    """z-scores clipped to [-clip, clip]; invalid entries are 0 (the training mean)."""
    z = np.where(valid, (np.where(valid, x, 0.0) - mean) / std, 0.0)
    return np.clip(z, -clip, clip)


def ts_summary(modality: ModalitySpec, payloads: Sequence[Any]) -> tuple[np.ndarray, np.ndarray]:
    """Raw summary features of N time series.

    Returns:
        features [N, V, 6] float64 (``TS_FEATURES`` order) and valid [N, V, 6] bool.
    """
    n, nv = len(payloads), len(modality.variables)
    obs = flatten_timeseries(modality, payloads)
    key = obs["row"] * nv + obs["var"]  # sorted; one group per (row, variable)
    t, v = obs["time"], obs["value"]
    g = n * nv
    count = np.bincount(key, minlength=g).astype(np.float64)  # [G]
    has = count > 0
    safe = np.maximum(count, 1.0)
    tm = np.bincount(key, weights=t, minlength=g) / safe
    vm = np.bincount(key, weights=v, minlength=g) / safe
    dt, dv = t - tm[key], v - vm[key]
    sxx = np.bincount(key, weights=dt * dt, minlength=g)
    sxy = np.bincount(key, weights=dt * dv, minlength=g)
    slope_ok = (count >= 2) & (sxx > 1e-9)
    slope = np.divide(sxy, sxx, out=np.zeros(g), where=slope_ok)
    mins, maxs, last = np.zeros(g), np.zeros(g), np.zeros(g)
    if len(key):
        starts = np.flatnonzero(np.r_[True, key[1:] != key[:-1]])
        groups = key[starts]
        mins[groups] = np.minimum.reduceat(v, starts)
        maxs[groups] = np.maximum.reduceat(v, starts)
        ends = np.r_[starts[1:], len(key)] - 1
        last[groups] = v[ends]
    feats = np.stack([last, vm, mins, maxs, np.log1p(count), slope], axis=1)  # [G, 6]
    valid = np.stack([has, has, has, has, has, slope_ok], axis=1)  # [G, 6]
    return feats.reshape(n, nv, 6), valid.reshape(n, nv, 6)


class StatsExpert(ExpertEncoder):
    """Summary statistics + observed indicators; weight-free, fitted normalisation.

    Options:
        clip (float): bound of the z-scores (default 10).
    """

    name = "stats"
    kinds = ("timeseries", "tabular")
    version = "1"
    family = "domain"
    batch_size = 4096

    def __init__(self, **options: Any) -> None:
        check_options(self.name, options, {"clip": (int, float)})
        super().__init__(**options)
        self.clip = float(options["clip"]) if options.get("clip") is not None else 10.0
        if not self.clip > 0:
            raise DataError(f"Expert 'stats': clip must be > 0, got {self.clip}.")
        self._state: dict[str, dict[str, np.ndarray]] = {}

    def dim(self, modality: ModalitySpec) -> int:
        self._check_kind(modality)
        per = len(TS_FEATURES) + 1 if modality.kind == "timeseries" else 2
        return per * len(modality.variables)

    def _check_kind(self, modality: ModalitySpec) -> None:
        if modality.kind not in self.kinds:
            raise DataError(f"Expert 'stats' encodes {list(self.kinds)} modalities; "
                            f"{modality.name!r} is {modality.kind!r}.")

    def _raw(self, modality: ModalitySpec, payloads: Sequence[Any]):
        if modality.kind == "timeseries":
            feats, valid = ts_summary(modality, payloads)  # [N, V, 6]
            f = len(modality.variables) * len(TS_FEATURES)
            return feats.reshape(len(payloads), f), valid.reshape(len(payloads), f)
        x = tabular_matrix(modality, payloads)  # [N, V]
        return x, ~np.isnan(x)

    def fit(self, modality: ModalitySpec, payloads: Sequence[Any]) -> None:
        """Per-feature mean/std over the given (training) payloads only."""
        self._check_kind(modality)
        x, valid = self._raw(modality, payloads)
        mean, std = masked_moments(x, valid)
        self._state[modality.name] = {"mean": mean, "std": std,
                                      "variables": _names_array(modality.variables)}

    def get_state(self, modality: ModalitySpec) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._fitted(modality).items()}

    def set_state(self, modality: ModalitySpec, state: dict[str, np.ndarray]) -> None:
        self._check_kind(modality)
        per = len(TS_FEATURES) if modality.kind == "timeseries" else 1
        n_feat = per * len(modality.variables)
        self._state[modality.name] = restore_norm_state("stats", modality, state, n_feat)

    def _fitted(self, modality: ModalitySpec) -> dict[str, np.ndarray]:
        return fitted_state("stats", self._state, modality)

    def encode(self, modality: ModalitySpec, payloads: Sequence[Any]) -> np.ndarray:
        """[N, dim] float32: per variable the z-scored features then the observed flag."""
        self._check_kind(modality)
        st = self._fitted(modality)
        n, nv = len(payloads), len(modality.variables)
        x, valid = self._raw(modality, payloads)
        z = zscore(x, valid, st["mean"], st["std"], self.clip)
        if modality.kind == "timeseries":
            z = z.reshape(n, nv, len(TS_FEATURES))
            observed = valid.reshape(n, nv, len(TS_FEATURES))[:, :, :1]
        else:
            z, observed = z[:, :, None], valid[:, :, None]
        out = np.concatenate([z, observed.astype(np.float64)], axis=2)  # [N, V, F + 1]
        return out.reshape(n, -1).astype(np.float32)


@hookimpl
def register_experts(register):
    register("stats", StatsExpert)
