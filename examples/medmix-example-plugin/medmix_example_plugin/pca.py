"""``pca``: principal components of a modality's per-variable summary, fitted on training data.

Summary vector of one payload, one value per variable of the modality (in the order of
``ModalitySpec.variables``):

* tabular: the value itself;
* time series: the last observation in time (the most recent measurement in the window).

An unmeasured variable is NaN in the summary. ``fit`` (training payloads only) computes per
variable the mean and standard deviation over the payloads where it was measured; a payload
is then z-scored (clipped to ``[-clip, clip]``), unmeasured variables take the training mean
(0 after z-scoring), and the result is projected onto the top ``n_components`` principal
axes of the training matrix. Because mean imputation hides missingness, the output ends with
one 0/1 *observed* indicator per variable (option ``indicators``), so an absent variable
never looks like an average measurement.

Output: ``[scores (k), observed (V)]`` with ``k = min(n_components, V)``.
Principal axes are sign-normalised (largest loading positive), so the same training data
always gives the same embedding.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from medmix_core import ExpertEncoder, ModalitySpec, TabularData, TimeSeriesData
from medmix_core.errors import DataError

#: option name -> (accepted types, default)
OPTIONS: dict[str, tuple[tuple[type, ...], Any]] = {
    "n_components": ((int,), 8),
    "indicators": ((bool,), True),
    "whiten": ((bool,), False),
    "clip": ((int, float), 10.0),
}


def _names(variables: Sequence[str]) -> np.ndarray:
    """Variable names as uint8 bytes, so they fit in a safetensors state."""
    return np.frombuffer("\n".join(variables).encode("utf-8"), dtype=np.uint8).copy()


def summary_matrix(modality: ModalitySpec, payloads: Sequence[Any]) -> np.ndarray:
    """Per-variable summary of N payloads: ``[N, V]`` float64, NaN = not measured.

    Args:
        modality: the modality; its ``variables`` fix the columns.
        payloads: N present :class:`TabularData` or :class:`TimeSeriesData`.
    Returns:
        the value (tabular) or last observation (time series) of every variable.
    """
    column = {v: j for j, v in enumerate(modality.variables)}
    out = np.full((len(payloads), len(column)), np.nan)  # [N, V]
    for r, p in enumerate(payloads):
        unknown = [v for v in getattr(p, "variables", []) if v not in column]
        if unknown:
            raise DataError(f"Payload {r} of modality {modality.name!r} has variables {unknown} "
                            f"that the modality does not declare ({modality.variables}). The "
                            f"dataset plugin must list every variable in its ModalitySpec.")
        if modality.kind == "tabular":
            if not isinstance(p, TabularData):
                raise DataError(f"Modality {modality.name!r} is tabular, but payload {r} is "
                                f"{type(p).__name__}; expected TabularData.")
            values = np.asarray(p.values, dtype=np.float64).ravel()
            if len(values) != len(p.variables):
                raise DataError(f"TabularData {r} of {modality.name!r}: {len(p.variables)} "
                                f"variables but {len(values)} values.")
            for v, x in zip(p.variables, values):
                out[r, column[v]] = x
        else:
            if not isinstance(p, TimeSeriesData):
                raise DataError(f"Modality {modality.name!r} is a time series, but payload {r} "
                                f"is {type(p).__name__}; expected TimeSeriesData.")
            for v, t, x in zip(p.variables, p.times, p.values):
                t = np.asarray(t, dtype=np.float64).ravel()
                x = np.asarray(x, dtype=np.float64).ravel()
                if len(t) != len(x):
                    raise DataError(f"TimeSeriesData {r} of {modality.name!r}, variable {v!r}: "
                                    f"{len(t)} times but {len(x)} values.")
                ok = np.isfinite(t) & np.isfinite(x)
                if ok.any():
                    t, x = t[ok], x[ok]
                    # last in time; among equal times, the last one given
                    out[r, column[v]] = x[np.lexsort((np.arange(len(t)), t))[-1]]
    out[~np.isfinite(out)] = np.nan
    return out


class PCAExpert(ExpertEncoder):
    """Training-fitted PCA of the per-variable summary, plus observed indicators.

    Options:
        n_components (int): principal components kept (default 8; at most V).
        indicators (bool): append one 0/1 observed flag per variable (default True).
        whiten (bool): divide each score by its training standard deviation (default False).
        clip (float): bound of the z-scores before projection (default 10).
    """

    name = "pca"
    kinds = ("tabular", "timeseries")
    version = "1"
    family = "domain"
    batch_size = 4096

    def __init__(self, **options: Any) -> None:
        unknown = sorted(set(options) - set(OPTIONS))
        if unknown:
            raise DataError(f"Expert 'pca': unknown option(s) {unknown}; it takes "
                            f"{sorted(OPTIONS)}.")
        for key, (types, _) in OPTIONS.items():
            value = options.get(key)
            bad_bool = isinstance(value, bool) and bool not in types
            if value is not None and (not isinstance(value, types) or bad_bool):
                want = " or ".join(t.__name__ for t in types)
                raise DataError(f"Expert 'pca': option {key!r} must be {want}, got "
                                f"{type(value).__name__} ({value!r}).")
        super().__init__(**options)
        opts = {k: options[k] if options.get(k) is not None else d
                for k, (_, d) in OPTIONS.items()}
        self.n_components = int(opts["n_components"])
        self.indicators = bool(opts["indicators"])
        self.whiten = bool(opts["whiten"])
        self.clip = float(opts["clip"])
        if self.n_components < 1:
            raise DataError(f"Expert 'pca': n_components must be >= 1, got {self.n_components}.")
        if not self.clip > 0:
            raise DataError(f"Expert 'pca': clip must be > 0, got {self.clip}.")
        self._state: dict[str, dict[str, np.ndarray]] = {}

    # ------------------------------------------------------------------ shape
    def _check(self, modality: ModalitySpec) -> int:
        if modality.kind not in self.kinds:
            raise DataError(f"Expert 'pca' encodes {list(self.kinds)} modalities; "
                            f"{modality.name!r} is {modality.kind!r}.")
        if not modality.variables:
            raise DataError(f"Expert 'pca' needs the variables of modality {modality.name!r}, "
                            f"but its ModalitySpec lists none. The dataset plugin must declare "
                            f"them.")
        return len(modality.variables)

    def _k(self, n_variables: int) -> int:
        return min(self.n_components, n_variables)

    def dim(self, modality: ModalitySpec) -> int:
        v = self._check(modality)
        return self._k(v) + (v if self.indicators else 0)

    # ------------------------------------------------------------------ fitting
    def _zscored(self, x: np.ndarray, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
        valid = ~np.isnan(x)
        z = np.where(valid, (np.where(valid, x, 0.0) - mean) / std, 0.0)
        return np.clip(z, -self.clip, self.clip)  # [N, V], 0 where unmeasured

    def fit(self, modality: ModalitySpec, payloads: Sequence[Any]) -> None:
        """Normalisation and principal axes from the training payloads of one modality."""
        v = self._check(modality)
        k = self._k(v)
        x = summary_matrix(modality, payloads)  # [N, V]
        if len(x) < k + 1:
            raise DataError(f"Expert 'pca' keeps {k} components of modality {modality.name!r} "
                            f"but got {len(x)} training payloads; it needs at least {k + 1}. "
                            f"Lower n_components or use more training data.")
        valid = ~np.isnan(x)
        n_obs = valid.sum(axis=0)
        mean = np.divide(np.where(valid, x, 0.0).sum(axis=0), n_obs,
                         out=np.zeros(v), where=n_obs > 0)
        var = np.divide((np.where(valid, x - mean, 0.0) ** 2).sum(axis=0), n_obs,
                        out=np.zeros(v), where=n_obs > 0)
        std = np.sqrt(var)
        std[~(std > 1e-8)] = 1.0  # constant or never measured: shift only
        z = self._zscored(x, mean, std)
        center = z.mean(axis=0)  # [V]
        _, s, vt = np.linalg.svd(z - center, full_matrices=False)
        axes = vt[:k]  # [k, V]
        flip = np.sign(axes[np.arange(k), np.abs(axes).argmax(axis=1)])
        axes = axes * flip[:, None]
        scale = s[:k] / np.sqrt(max(len(z) - 1, 1))  # training std of each score
        scale[~(scale > 1e-8)] = 1.0
        self._state[modality.name] = {"mean": mean, "std": std, "center": center,
                                      "axes": axes, "scale": scale,
                                      "variables": _names(modality.variables)}

    def get_state(self, modality: ModalitySpec) -> dict[str, np.ndarray]:
        return {key: value.copy() for key, value in self._fitted(modality).items()}

    def set_state(self, modality: ModalitySpec, state: dict[str, np.ndarray]) -> None:
        v = self._check(modality)
        k = self._k(v)
        need = {"mean": (v,), "std": (v,), "center": (v,), "axes": (k, v), "scale": (k,)}
        lacking = sorted((set(need) | {"variables"}) - set(state))
        if lacking:
            raise DataError(f"pca state for {modality.name!r} lacks {lacking}; it was not "
                            f"written by this expert.")
        names = np.asarray(state["variables"], dtype=np.uint8).tobytes().decode("utf-8")
        if names.split("\n") != list(modality.variables):
            raise DataError(f"pca state for {modality.name!r} was fitted on variables "
                            f"{names.split(chr(10))}, but the modality has "
                            f"{modality.variables}; re-fit on this modality.")
        fitted = {}
        for key, shape in need.items():
            arr = np.asarray(state[key], dtype=np.float64)
            if arr.shape != shape:
                raise DataError(f"pca state for {modality.name!r}: {key!r} has shape "
                                f"{list(arr.shape)}, expected {list(shape)} (n_components="
                                f"{self.n_components}, {v} variables).")
            fitted[key] = arr.copy()
        fitted["variables"] = _names(modality.variables)
        self._state[modality.name] = fitted

    def _fitted(self, modality: ModalitySpec) -> dict[str, np.ndarray]:
        if modality.name not in self._state:
            raise DataError(f"Expert 'pca' is not fitted for modality {modality.name!r}: call "
                            f"fit() with training payloads or set_state() with a saved state.")
        return self._state[modality.name]

    # ------------------------------------------------------------------ encoding
    def encode(self, modality: ModalitySpec, payloads: Sequence[Any]) -> np.ndarray:
        """``[N, dim]`` float32: principal-component scores, then observed flags."""
        self._check(modality)
        st = self._fitted(modality)
        x = summary_matrix(modality, payloads)  # [N, V]
        z = self._zscored(x, st["mean"], st["std"])
        scores = (z - st["center"]) @ st["axes"].T  # [N, k]
        if self.whiten:
            scores = scores / st["scale"]
        parts = [scores]
        if self.indicators:
            parts.append((~np.isnan(x)).astype(np.float64))  # [N, V]
        return np.concatenate(parts, axis=1).astype(np.float32)
