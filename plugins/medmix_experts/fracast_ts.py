"""``fracast``: the Fracast-0 time-series foundation model as a frozen time-series expert.

Fracast-0 (PyPI ``fracast``, Apache-2.0, weights inside the wheel) is a compact,
attention-free forecaster: one causal dilated-convolution block reused over dilations
1, 2, ..., 512 on a single context of exactly 2,048 steps, with an observation mask and a
coverage channel as inputs. Only its encoder (``FracastCore``, 25,536 parameters) is run
here; the forecast head is not used.

What the model sees, per stay and per selected variable:

- **Time grid**: the window ``[0, horizon]`` (48 h for PhysioNet) cut into bins of
  ``step_hours`` (default 1 h, so 48 steps); a bin holds the mean of the observations in
  it, and a bin without one is *unobserved* (mask 0), never zero-filled. The stay sits at
  the right end of the 2,048-step context; the steps before it are unobserved.
- **Normalisation**: the model was trained on contexts scaled to [0, 1] by their own
  min and max. Scaling each series by itself would erase its level (a heart rate of 120
  would look like one of 60), so values are scaled with a fixed per-variable range
  instead: the 5th-95th percentile of the training values (fitted), else the clinical
  reference range of :data:`medmix_experts.serialize.PHYSIONET2012`, else the series' own
  min-max. Scaled values are clipped to [-2, 3]; implausible values are dropped first.
- **Per-variable embedding** (128): the mean of the encoder's hidden states over the stay's
  steps (64) and the state at the last step (64).
- **Pooling** (observation-aware): variables with no observation in the stay do not count.
  ``pool="mean"``: the mean over observed variables (128-d). ``pool="slots"`` (default):
  that mean, then one 128-d slot per selected variable in a fixed order (zeros when the
  variable is absent) and one presence flag per variable (128 + 129 V dims), so the fuser
  sees which variable said what. A stay where none of the selected variables was measured
  gets the zero vector with every flag 0.

Cost: the context length is fixed, so every series costs the same however short the stay
(about 8 series/s eager on two CPU cores shared with other work; ``compile=True`` runs
``torch.compile`` once per process, seconds with a warm inductor cache and minutes without,
then needs about half the CPU time per series). The expert therefore encodes only
``max_variables`` variables per modality (default 4): those present (>= 3 observations) in
the most training stays, chosen in ``fit`` and saved in the state; or exactly the
``variables`` option.

Options: ``variables`` (list or comma-separated names), ``max_variables`` (4),
``modalities`` (names of the modalities to encode; default every time-series one),
``step_hours`` (1.0), ``pool`` ("slots" | "mean"), ``weights`` ("fp32" | "w8": the
release's int8 weights, dequantised), ``series_batch`` (series per forward pass, 32),
``compile`` (False), ``model_dir`` (a local Fracast release folder instead of the packaged
one).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from medmix_core import ExpertEncoder, ModalitySpec, TimeSeriesData, hookimpl
from medmix_core.errors import DataError, WeightsNotFoundError
from medmix_core.experts import check_payload_types
from medmix_core.plugin_utils import check_options
from medmix_core.types import Payload
from medmix_experts import serialize as ser
from medmix_experts.textmodel import (
    as_bool,
    autocast_for,
    package_version,
    precision_entry,
    weights_sha256,
)

PACKAGE = "fracast"
CONTEXT = 2048
HIDDEN = 64
PER_VARIABLE = 2 * HIDDEN  # mean over the stay's steps + last step
CLIP = (-2.0, 3.0)
_WEIGHT_FILES = {"fp32": "model.safetensors", "w8": "model.int8.safetensors"}
_INSTALL = f"pip install {PACKAGE}"


def fracast_dir(model_dir: str | os.PathLike | None = None, weights: str = "fp32") -> Path:
    """The Fracast release folder (``model_dir``, else the one inside the package).

    Raises:
        WeightsNotFoundError: naming the missing package or file and the install command.
    """
    if model_dir is None:
        spec = importlib.util.find_spec(PACKAGE)
        if spec is None or not spec.submodule_search_locations:
            raise WeightsNotFoundError(
                f"fracast needs the package {PACKAGE!r}, which carries the Fracast-0 weights, "
                f"and it is not installed. Run `{_INSTALL}` (or `pip install "
                f"'medmix[timeseries]'`), or pass model_dir=<Fracast release folder>.")
        folder = Path(next(iter(spec.submodule_search_locations))) / "weights"
    else:
        folder = Path(model_dir).expanduser()
    need = ["config.json", _WEIGHT_FILES[weights]] + (["w8_manifest.json"] if weights == "w8"
                                                       else [])
    missing = [f for f in need if not (folder / f).is_file()]
    if missing:
        where = "does not exist" if not folder.exists() else f"lacks {missing}"
        raise WeightsNotFoundError(
            f"fracast: the weights folder {str(folder)!r} {where}. Reinstall the package with "
            f"`pip install --force-reinstall {PACKAGE}`, or point model_dir at a folder "
            f"holding config.json and {_WEIGHT_FILES[weights]}.")
    return folder


@functools.lru_cache(maxsize=4)
def load_core(folder: str, weights: str, device: str = "cpu"):
    """The Fracast encoder in eval mode, loaded once per (folder, weights, device)."""
    try:
        from fracast.inference import load_fracast
    except ImportError as exc:
        raise WeightsNotFoundError(f"fracast: cannot import the package ({exc}). Run "
                                   f"`{_INSTALL}`.") from exc
    core, _head = load_fracast(folder, weights=weights, device=device)
    core.eval()
    if getattr(core, "W", CONTEXT) != CONTEXT or getattr(core, "d", HIDDEN) != HIDDEN:
        raise WeightsNotFoundError(
            f"fracast: the checkpoint in {folder} has context {core.W} and width {core.d}; "
            f"this expert expects the Fracast-0 release ({CONTEXT} steps, width {HIDDEN}).")
    return core


class FracastExpert(ExpertEncoder):
    """Fracast-0 encoder over the densest variables of a time-series modality."""

    name = "fracast"
    kinds: ClassVar[tuple[str, ...]] = ("timeseries",)
    family = "general"
    version = "1"
    batch_size: ClassVar[int] = 64

    def __init__(self, **options: Any) -> None:
        super().__init__(**options)
        opts = check_options(self.name, options, {
            "variables": ((list, tuple, str), None), "max_variables": (int, 4),
            "modalities": ((list, tuple, str), None),
            "step_hours": ((int, float), 1.0), "pool": (str, "slots"),
            "weights": (str, "fp32"), "series_batch": (int, 32),
            "compile": ((bool, str), False), "model_dir": ((str, os.PathLike), None)})
        opts["compile"] = as_bool(self.name, "compile", opts["compile"])
        for key in ("variables", "modalities"):
            if isinstance(opts[key], str):
                opts[key] = [v.strip() for v in opts[key].split(",") if v.strip()]
        if opts["variables"] is not None and not opts["variables"]:
            raise DataError("Expert 'fracast': option 'variables' is empty; give names such "
                            "as variables='HR,Temp' or leave it out to pick the densest.")
        if opts["pool"] not in ("slots", "mean"):
            raise DataError(f"Expert 'fracast': pool must be 'slots' or 'mean', got "
                            f"{opts['pool']!r}.")
        if opts["weights"] not in _WEIGHT_FILES:
            raise DataError(f"Expert 'fracast': weights must be one of {list(_WEIGHT_FILES)}, "
                            f"got {opts['weights']!r}.")
        if opts["max_variables"] < 1 or opts["series_batch"] < 1 or opts["step_hours"] <= 0:
            raise DataError("Expert 'fracast': max_variables and series_batch must be >= 1 "
                            "and step_hours > 0.")
        self.opts = opts
        self._compiled = None
        self._device = "cpu"
        self._selected: dict[str, list[str]] = {}
        self._range: dict[str, dict[str, tuple[float, float]]] = {}

    # ------------------------------------------------------------------ model
    @property
    def folder(self) -> Path:
        return fracast_dir(self.opts["model_dir"], self.opts["weights"])

    def check_weights(self) -> None:
        self.folder  # noqa: B018 (the property raises when the weights are absent)

    @property
    def core(self):
        return load_core(str(self.folder), self.opts["weights"], self._device)

    def to(self, device: str) -> FracastExpert:
        self._device = str(device)
        self._compiled = None
        return self

    def _forward(self, values, mask):
        """Encoder pass ``[b, 1, W] -> [b, W, 64]``, compiled once when ``compile`` is on.

        Every compiled pass has the same shape (short batches are padded), so the graph is
        built once. Compilation needs a C++ compiler; if it fails the eager encoder is used
        from then on and a warning says so.
        """
        if not self.opts["compile"]:
            return self.core(values, mask, mask.float())
        import torch

        if self._compiled is None:
            self._compiled = torch.compile(self.core, dynamic=False)
        try:
            return self._compiled(values, mask, mask.float())
        except Exception as exc:
            if self._compiled is self.core:
                raise
            warnings.warn(f"fracast: torch.compile failed ({type(exc).__name__}: {exc}); "
                          f"encoding in eager mode.", stacklevel=2)
            self._compiled = self.core
            return self.core(values, mask, mask.float())

    def n_parameters(self) -> int:
        return int(sum(p.numel() for p in self.core.parameters()))

    def provenance(self) -> dict[str, Any]:
        wfile = self.folder / _WEIGHT_FILES[self.opts["weights"]]
        return {"expert": self.name, "version": self.version, "family": self.family,
                "options": {k: (str(v) if isinstance(v, os.PathLike) else v)
                            for k, v in self.options.items()},
                "package": PACKAGE, "package_version": package_version(PACKAGE),
                "weights": str(wfile), "weights_sha256": weights_sha256(wfile),
                "context": CONTEXT, "step_hours": float(self.opts["step_hours"]),
                "pool": self.opts["pool"], "compiled": self.opts["compile"],
                **precision_entry(self._device)}

    # ------------------------------------------------------------------ variables
    def accepts(self, modality: ModalitySpec) -> bool:
        if modality.kind not in self.kinds:
            return False
        if self.opts["modalities"] is not None and modality.name not in self.opts["modalities"]:
            return False
        want = self.opts["variables"]
        return want is None or any(v in modality.variables for v in want)

    def _n_slots(self, modality: ModalitySpec) -> int:
        want = self.opts["variables"]
        if want is not None:
            return len([v for v in modality.variables if v in want])
        return min(self.opts["max_variables"], len(modality.variables))

    def dim(self, modality: ModalitySpec) -> int:
        if self.opts["pool"] == "mean":
            return PER_VARIABLE
        return PER_VARIABLE + self._n_slots(modality) * (PER_VARIABLE + 1)

    def selected(self, modality: ModalitySpec) -> list[str]:
        """The variables this expert encodes for ``modality``, in a fixed order."""
        if modality.name in self._selected:
            return self._selected[modality.name]
        want = self.opts["variables"]
        if want is not None:
            chosen = [v for v in modality.variables if v in want]
            if not chosen:
                raise DataError(f"Expert 'fracast': none of variables={want} is in modality "
                                f"{modality.name!r} ({modality.variables}).")
            return chosen
        # not fitted: the first max_variables in the modality's own order
        return list(modality.variables[:self.opts["max_variables"]])

    # ------------------------------------------------------------------ fit / state
    def _check(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> None:
        if modality.kind != "timeseries":
            raise DataError(f"Expert 'fracast' encodes time series; modality "
                            f"{modality.name!r} is {modality.kind!r}.")
        check_payload_types(self.name, modality, payloads, TimeSeriesData)
        for i, p in enumerate(payloads):
            if len(p.times) != len(p.variables) or len(p.values) != len(p.variables):
                raise DataError(f"Expert 'fracast', modality {modality.name!r}: payload {i} has "
                                f"{len(p.variables)} variables but {len(p.times)} time arrays "
                                f"and {len(p.values)} value arrays.")
            extra = set(p.variables) - set(modality.variables)
            if extra:
                raise DataError(f"Expert 'fracast': payload {i} has variables {sorted(extra)} "
                                f"that modality {modality.name!r} does not declare.")

    def _infos(self, modality: ModalitySpec) -> dict[str, ser.Field]:
        return {f.name: f for f in ser.resolve_fields(modality)}

    def fit(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> None:
        """Pick the variables (unless given) and fit their scaling on training payloads."""
        self._check(modality, payloads)
        fields = self._infos(modality)
        present = dict.fromkeys(modality.variables, 0)
        values: dict[str, list[np.ndarray]] = {v: [] for v in modality.variables}
        for p in payloads:
            for name, t, v in zip(p.variables, p.times, p.values):
                if len(v) == 0:
                    continue
                _, vv = ser._check_series(name, t, v)
                vv = vv[ser.plausible_mask(fields[name].info, vv)]
                present[name] += int(vv.size >= 3)
                values[name].append(vv)
        if self.opts["variables"] is not None:
            chosen = self.selected(modality)
        else:
            rank = sorted(modality.variables, key=lambda v: (-present[v],
                                                            modality.variables.index(v)))
            top = set(rank[:self.opts["max_variables"]])
            chosen = [v for v in modality.variables if v in top]
        self._selected[modality.name] = chosen
        ranges = {}
        for v in chosen:
            allv = np.concatenate(values[v]) if values[v] else np.zeros(0)
            if allv.size >= 10:
                lo, hi = np.quantile(allv, [0.05, 0.95])
                if hi > lo:
                    ranges[v] = (float(lo), float(hi))
        self._range[modality.name] = ranges

    def get_state(self, modality: ModalitySpec) -> dict[str, np.ndarray]:
        if modality.name not in self._selected:
            return {}
        chosen = self._selected[modality.name]
        rng = self._range.get(modality.name, {})
        return {
            "selected": np.array([modality.variables.index(v) for v in chosen], dtype=np.int64),
            "scale_low": np.array([rng.get(v, (np.nan, np.nan))[0] for v in chosen]),
            "scale_high": np.array([rng.get(v, (np.nan, np.nan))[1] for v in chosen]),
        }

    def set_state(self, modality: ModalitySpec, state: dict[str, np.ndarray]) -> None:
        if not state:
            self._selected.pop(modality.name, None)
            self._range.pop(modality.name, None)
            return
        idx = np.asarray(state["selected"], dtype=np.int64)
        if idx.size != self._n_slots(modality) or (idx.size and (idx.min() < 0 or idx.max()
                                                                  >= len(modality.variables))):
            raise DataError(f"Expert 'fracast': state for modality {modality.name!r} selects "
                            f"variables {idx.tolist()}, which does not fit the modality's "
                            f"{len(modality.variables)} variables and this expert's "
                            f"{self._n_slots(modality)} slots; it was saved with other options.")
        chosen = [modality.variables[i] for i in idx]
        low, high = np.asarray(state["scale_low"]), np.asarray(state["scale_high"])
        self._selected[modality.name] = chosen
        self._range[modality.name] = {v: (float(a), float(b)) for v, a, b in
                                      zip(chosen, low, high) if np.isfinite(a) and np.isfinite(b)}

    # ------------------------------------------------------------------ encoding
    def _scale(self, modality: ModalitySpec, name: str, field: ser.Field,
               v: np.ndarray) -> np.ndarray:
        rng = self._range.get(modality.name, {}).get(name)
        if rng is None and field.clinical and field.normal[1] > field.normal[0]:
            rng = field.normal
        if rng is None:
            lo, hi = float(v.min()), float(v.max())
            rng = (lo, hi if hi > lo else lo + 1.0)
        return np.clip((v - rng[0]) / (rng[1] - rng[0]), *CLIP)

    def grid(self, modality: ModalitySpec, payload: TimeSeriesData, name: str,
             fields: dict[str, ser.Field] | None = None
             ) -> tuple[np.ndarray, np.ndarray] | None:
        """One variable on the time grid: scaled bin means ``[T]`` and observed mask ``[T]``;
        None when the variable has no plausible observation."""
        if name not in payload.variables:
            return None
        i = payload.variables.index(name)
        if len(payload.values[i]) == 0:
            return None
        t, v = ser._check_series(name, payload.times[i], payload.values[i])
        field = (fields or self._infos(modality))[name]
        keep = ser.plausible_mask(field.info, v)
        t, v = t[keep], v[keep]
        if v.size == 0:
            return None
        horizon = float(payload.horizon)
        steps = int(np.ceil(horizon / float(self.opts["step_hours"]) - 1e-9))
        if not 1 <= steps <= CONTEXT:
            raise DataError(f"Expert 'fracast': a {horizon} h window at step_hours="
                            f"{self.opts['step_hours']} gives {steps} steps; the model holds "
                            f"1..{CONTEXT}. Choose another step_hours.")
        if t.min() < 0 or t.max() > horizon + 1e-6:
            raise DataError(f"Expert 'fracast': variable {name!r} has times outside "
                            f"[0, {horizon}] h ({t.min():.2f}..{t.max():.2f}); the dataset "
                            f"must clip series to their horizon.")
        b = np.minimum((t / float(self.opts["step_hours"])).astype(np.int64), steps - 1)
        s = self._scale(modality, name, field, v)
        total = np.bincount(b, weights=s, minlength=steps)
        count = np.bincount(b, minlength=steps)
        observed = count > 0  # [T]
        series = np.where(observed, total / np.maximum(count, 1), 0.0)  # [T]
        return series.astype(np.float32), observed

    def _embed_series(self, grids: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
        """[S, 128] per-series embeddings (mean over the stay's steps, last step)."""
        import torch

        out = np.zeros((len(grids), PER_VARIABLE), dtype=np.float32)  # [S, 128]
        bs = self.opts["series_batch"]
        with torch.inference_mode(), warnings.catch_warnings(), autocast_for(self._device):
            warnings.simplefilter("ignore")  # inductor notes about the periodogram's FFT
            for s in range(0, len(grids), bs):
                chunk = grids[s:s + bs]
                # compiled: pad to a full batch (unobserved rows) so the shape never changes
                rows = bs if self.opts["compile"] else len(chunk)
                values = torch.zeros(rows, 1, CONTEXT)  # [b, 1, W]
                mask = torch.zeros(rows, 1, CONTEXT, dtype=torch.bool)
                for j, (series, observed) in enumerate(chunk):
                    values[j, 0, -len(series):] = torch.from_numpy(series)
                    mask[j, 0, -len(series):] = torch.from_numpy(observed)
                values, mask = values.to(self._device), mask.to(self._device)
                hidden = self._forward(values, mask)  # [b, W, 64]
                rows_out = []
                for j, (series, _) in enumerate(chunk):
                    stay = hidden[j, -len(series):]  # [T, 64]: the stay's own steps
                    rows_out.append(torch.cat([stay.mean(dim=0), hidden[j, -1]]))  # [128]
                out[s:s + len(chunk)] = torch.stack(rows_out).float().cpu().numpy()
        return out

    def encode(self, modality: ModalitySpec, payloads: Sequence[Payload]) -> np.ndarray:
        """Encode present payloads; returns float32 ``[N, dim]`` (see module docstring)."""
        self._check(modality, payloads)
        chosen = self.selected(modality)
        n, nv = len(payloads), len(chosen)
        fields = self._infos(modality)
        grids, where = [], []
        for i, p in enumerate(payloads):
            for j, name in enumerate(chosen):
                g = self.grid(modality, p, name, fields)
                if g is not None:
                    grids.append(g)
                    where.append((i, j))
        per_var = np.zeros((n, nv, PER_VARIABLE), dtype=np.float32)  # [N, V, 128]
        present = np.zeros((n, nv), dtype=np.float32)  # [N, V]
        if grids:
            emb = self._embed_series(grids)
            for (i, j), e in zip(where, emb):
                per_var[i, j] = e
                present[i, j] = 1.0
        count = present.sum(axis=1, keepdims=True)  # [N, 1]
        mean = per_var.sum(axis=1) / np.maximum(count, 1.0)  # [N, 128]; absent do not count
        if self.opts["pool"] == "mean":
            out = mean
        else:
            out = np.concatenate([mean, per_var.reshape(n, -1), present], axis=1)
        out = out.astype(np.float32)
        if out.shape[1] != self.dim(modality):
            raise DataError(f"Expert 'fracast': produced {out.shape[1]} dims for modality "
                            f"{modality.name!r}, expected {self.dim(modality)}; the fitted "
                            f"state and the options disagree.")
        if not np.isfinite(out).all():
            raise DataError(f"Expert 'fracast' produced non-finite embeddings for modality "
                            f"{modality.name!r}; check the weights at {self.folder}.")
        return out


@hookimpl
def register_experts(register):
    register("fracast", FracastExpert)
