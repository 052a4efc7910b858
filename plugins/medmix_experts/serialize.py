"""EHR serialisation: one modality's measurements -> one short clinical text.

MedMIX (Appendix B) feeds structured EHR to text encoders by serialising each modality
in a fixed field order, ``"variable: value; ..."`` with units and a summary over time.
Raw decimals carry little signal for a sentence model, so the default style ("words")
says where a value lies relative to a clinical reference range, which way it moved and,
only when it matters, the number itself::

    heart rate high (112 bpm), rising; temperature normal; GCS very low (6)

The paper-literal numeric form is kept as style "numeric"::

    heart rate: 112 bpm (first 88, min 80, max 140, n=24, over 47 h)

Fields follow ``ModalitySpec.variables`` (the dataset's fixed order); unmeasured variables
are left out. Values outside a variable's plausible range are data errors and are dropped
before summarising. Reference ranges apply only when the modality's declared unit matches
the table's unit; otherwise (and for variables the table does not know) the words are
relative to cohort ranges fitted on the training split (:func:`fit_cohort_ranges`).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from medmix_core.errors import DataError
from medmix_core.types import ModalitySpec, TabularData, TimeSeriesData

#: bumps whenever the text produced for the same payload changes
SERIALISER_VERSION = "1"

STYLES = ("words", "numeric")
DETAILS = ("brief", "full")

#: a change over the stay of at least this share of the reference width is a trend
TREND_THRESHOLD = 0.3


@dataclass(frozen=True)
class VariableInfo:
    """What the serialiser knows about one variable.

    Attributes:
        label: the words used in the text ("heart rate").
        unit: the unit the ranges below are expressed in ("" for unitless).
        normal: clinical reference range (low, high); inside is "normal".
        critical: thresholds below / above which a value is "very low" / "very high".
        plausible: values outside are data errors and are dropped.
        decimals: digits after the point when printed (None: by magnitude).
        categories: code -> words, for categorical variables ("female", "medical ICU").
        bands: (upper bound, word) pairs for banded variables such as age.
        summary: which value of a series is described: "last", "rate" (sum per hour of
            the window, for outputs such as urine) or "max" (e.g. ventilation 0/1).
    """

    label: str
    unit: str = ""
    normal: tuple[float, float] | None = None
    critical: tuple[float | None, float | None] = (None, None)
    plausible: tuple[float, float] | None = None
    decimals: int | None = None
    categories: Mapping[float, str] | None = None
    bands: tuple[tuple[float, str], ...] | None = None
    summary: str = "last"


_V = VariableInfo
_MMHG = "mmHg"
#: PhysioNet/CinC 2012 variables (adult reference ranges; units as in the challenge data,
#: where Mg is in mg/dL in practice although the challenge page lists mmol/L).
PHYSIONET2012: dict[str, VariableInfo] = {
    # static descriptors
    "Age": _V("age", "years", plausible=(15, 120), decimals=0,
              bands=((45, "younger adult"), (65, "middle-aged"), (80, "older adult"),
                     (math.inf, "elderly"))),
    "Gender": _V("sex", categories={0.0: "female", 1.0: "male"}),
    "Height": _V("height", "cm", plausible=(100, 230), decimals=0),
    "ICUType": _V("ICU type", categories={1.0: "coronary care unit",
                                          2.0: "cardiac surgery recovery unit",
                                          3.0: "medical ICU", 4.0: "surgical ICU"}),
    "Weight": _V("weight", "kg", plausible=(25, 300), decimals=0),
    # vital signs
    "HR": _V("heart rate", "bpm", (60, 100), (40, 130), (20, 300), decimals=0),
    "NISysABP": _V("systolic BP", _MMHG, (90, 140), (70, 180), (30, 300), decimals=0),
    "NIDiasABP": _V("diastolic BP", _MMHG, (60, 90), (40, 110), (10, 200), decimals=0),
    "NIMAP": _V("mean BP", _MMHG, (65, 100), (55, 130), (20, 250), decimals=0),
    "SysABP": _V("arterial systolic BP", _MMHG, (90, 140), (70, 180), (30, 300), decimals=0),
    "DiasABP": _V("arterial diastolic BP", _MMHG, (60, 90), (40, 110), (10, 200), decimals=0),
    "MAP": _V("arterial mean BP", _MMHG, (65, 100), (55, 130), (20, 250), decimals=0),
    "RespRate": _V("respiratory rate", "/min", (12, 20), (8, 30), (1, 80), decimals=0),
    "Temp": _V("temperature", "°C", (36.0, 38.0), (35.0, 39.5), (25, 45), decimals=1),
    "GCS": _V("GCS", "", (15, 15), (9, None), (3, 15), decimals=0),
    "Urine": _V("urine output", "mL", (30, 250), (15, None), (0, 5000), decimals=0,
                summary="rate"),
    # blood gases and ventilation
    "SaO2": _V("oxygen saturation", "%", (94, 100), (88, None), (20, 100), decimals=0),
    "FiO2": _V("FiO2", "", (0.21, 0.4), (None, 0.6), (0.21, 1.0), decimals=2),
    "MechVent": _V("ventilation", categories={0.0: "not ventilated",
                                               1.0: "mechanically ventilated"},
                   summary="max"),
    "pH": _V("pH", "", (7.35, 7.45), (7.2, 7.55), (6.5, 8.0), decimals=2),
    "PaCO2": _V("PaCO2", _MMHG, (35, 45), (25, 60), (5, 150), decimals=0),
    "PaO2": _V("PaO2", _MMHG, (75, 100), (55, None), (20, 700), decimals=0),
    # laboratory values
    "Albumin": _V("albumin", "g/dL", (3.5, 5.0), (2.5, None), (0.5, 7), decimals=1),
    "ALP": _V("alkaline phosphatase", "IU/L", (40, 130), (None, 400), (5, 5000), decimals=0),
    "ALT": _V("ALT", "IU/L", (7, 56), (None, 500), (1, 20000), decimals=0),
    "AST": _V("AST", "IU/L", (10, 40), (None, 500), (1, 30000), decimals=0),
    "Bilirubin": _V("bilirubin", "mg/dL", (0.1, 1.2), (None, 5.0), (0, 80), decimals=1),
    "BUN": _V("BUN", "mg/dL", (7, 20), (None, 60), (0.5, 300), decimals=0),
    "Cholesterol": _V("cholesterol", "mg/dL", (100, 200), (None, 300), (20, 700),
                      decimals=0),
    "Creatinine": _V("creatinine", "mg/dL", (0.6, 1.3), (None, 3.5), (0.1, 25), decimals=1),
    "Glucose": _V("glucose", "mg/dL", (70, 140), (50, 300), (10, 2000), decimals=0),
    "HCO3": _V("bicarbonate", "mmol/L", (22, 28), (15, 35), (2, 60), decimals=0),
    "HCT": _V("hematocrit", "%", (36, 50), (25, None), (5, 75), decimals=0),
    "K": _V("potassium", "mmol/L", (3.5, 5.0), (3.0, 6.0), (1, 12), decimals=1),
    "Lactate": _V("lactate", "mmol/L", (0.5, 2.0), (None, 4.0), (0.1, 35), decimals=1),
    "Mg": _V("magnesium", "mg/dL", (1.7, 2.4), (1.2, 3.5), (0.3, 10), decimals=1),
    "Na": _V("sodium", "mmol/L", (135, 145), (125, 155), (90, 190), decimals=0),
    "Platelets": _V("platelets", "10^9/L", (150, 400), (50, 700), (1, 2000), decimals=0),
    "TroponinI": _V("troponin I", "ug/L", (0, 0.04), (None, 2.0), (0, 100), decimals=2),
    "TroponinT": _V("troponin T", "ug/L", (0, 0.01), (None, 0.1), (0, 50), decimals=2),
    "WBC": _V("white cell count", "10^9/L", (4, 11), (2, 25), (0.1, 200), decimals=1),
}

# Spellings of one unit; compared after lower-casing and dropping spaces.
_UNIT_ALIASES = [
    {"bpm", "beats/min", "/min", "min^-1", "1/min", "breaths/min", "bpm(beats)"},
    {"°c", "c", "degc", "deg c", "celsius", "degreescelsius"},
    {"mmol/l", "meq/l", "mm"},
    {"ug/l", "µg/l", "μg/l", "ng/ml"},
    {"iu/l", "u/l"},
    {"10^9/l", "cells/nl", "10^3/ul", "10^3/µl", "k/ul", "x10^9/l", "x10^3/ul", "g/l"},
    {"", "-", "none", "unitless", "[0-1]", "0-1", "fraction", "score", "points", "0/1",
     "ratio", "ph", "phunits", "units"},
    {"ml", "cc"},
    {"years", "year", "yr", "yrs", "y"},
]


def _canon_unit(u: str) -> str:
    u = re.sub(r"\(.*?\)", "", str(u))  # "points (3-15)" -> "points"
    u = re.sub(r"\s+", "", u.strip().lower())
    u = u.replace("μ", "µ")
    for group in _UNIT_ALIASES:
        if u in {g.replace(" ", "") for g in group}:
            return min(group)
    return u


def same_unit(a: str, b: str) -> bool:
    """Whether two unit strings name the same unit (``"bpm"`` == ``"beats/min"``)."""
    return _canon_unit(a) == _canon_unit(b)


def format_number(v: float, decimals: int | None = None) -> str:
    """A value as a short decimal: fixed ``decimals``, else by magnitude (112, 37.2, 1.25)."""
    if decimals is None:
        a = abs(v)
        decimals = 0 if a >= 100 else 1 if a >= 10 else 2
    s = f"{v:.{decimals}f}"
    if "." in s:
        s = s.rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s


@dataclass
class Field:
    """One variable's resolved serialisation rules within a modality."""

    name: str
    info: VariableInfo
    unit: str  # the unit shown
    normal: tuple[float, float] | None  # clinical when units agree, else cohort
    critical: tuple[float | None, float | None]
    clinical: bool  # whether ``normal`` is the clinical reference (not the cohort)


def resolve_fields(modality: ModalitySpec,
                   cohort: Mapping[str, tuple[float, float]] | None = None,
                   table: Mapping[str, VariableInfo] | None = None) -> list[Field]:
    """The modality's fields in fixed order, with the ranges that apply to each.

    Args:
        modality: the modality (its ``variables`` fix the order; ``units`` override).
        cohort: fitted ``name -> (low, high)`` used where no clinical range applies.
        table: variable knowledge (default :data:`PHYSIONET2012`).
    Returns:
        One :class:`Field` per variable, in ``modality.variables`` order.
    """
    table = PHYSIONET2012 if table is None else table
    cohort = cohort or {}
    out = []
    for name in modality.variables:
        info = table.get(name) or VariableInfo(label=name)
        declared = modality.units.get(name)
        unit_ok = declared is None or same_unit(declared, info.unit)
        # the table's short spelling when the units agree, else the declared one
        unit = info.unit if unit_ok else re.sub(r"\s*\(.*?\)", "", declared).strip()
        if info.normal is not None and unit_ok:
            out.append(Field(name, info, unit, info.normal, info.critical, True))
            continue
        if not unit_ok:  # the table's ranges and plausible bounds are in another unit
            info = VariableInfo(label=info.label, unit=unit, decimals=info.decimals,
                                categories=info.categories, summary=info.summary)
        rng = cohort.get(name)
        ok = rng is not None and all(np.isfinite(rng)) and rng[1] > rng[0]
        out.append(Field(name, info, unit, tuple(rng) if ok else None, (None, None), False))
    return out


# ---------------------------------------------------------------------------- summaries
@dataclass
class SeriesSummary:
    """What is said about one variable's observations within the window."""

    n: int
    first: float
    last: float
    min: float
    max: float
    value: float  # the described value (last / rate / max, per VariableInfo.summary)
    change: float | None  # fitted change over the observed span (None for n < 2)
    span_h: float


def _check_series(name: str, t: np.ndarray, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    t = np.asarray(t, dtype=np.float64).ravel()
    v = np.asarray(v, dtype=np.float64).ravel()
    if t.shape != v.shape:
        raise DataError(f"Variable {name!r}: {t.size} times but {v.size} values; each "
                        f"observation needs one time and one value. Fix the dataset loader.")
    if not (np.isfinite(t).all() and np.isfinite(v).all()):
        raise DataError(f"Variable {name!r} holds NaN or Inf in its times or values; an "
                        f"unmeasured value must be left out of the arrays, not stored as NaN.")
    order = np.argsort(t, kind="stable")
    return t[order], v[order]


def plausible_mask(info: VariableInfo, v: np.ndarray) -> np.ndarray:
    """[n] bool: which values are physiologically possible (others are data errors)."""
    if info.plausible is None:
        return np.ones(v.shape, dtype=bool)
    lo, hi = info.plausible
    return (v >= lo) & (v <= hi)


def summarize_series(t: np.ndarray, v: np.ndarray, info: VariableInfo,
                     horizon: float) -> SeriesSummary | None:
    """Summary of one variable's plausible observations; None when none remain."""
    keep = plausible_mask(info, v)
    t, v = t[keep], v[keep]
    if v.size == 0:
        return None
    if info.summary == "rate":
        value = float(v.sum() / max(horizon, 1e-9))
    elif info.summary == "max":
        value = float(v.max())
    else:
        value = float(v[-1])
    change = None
    span = float(t[-1] - t[0])
    if v.size >= 3 and span > 0:
        slope = np.polyfit(t - t[0], v, 1)[0]  # least squares: robust to one noisy end
        change = float(slope * span)
    elif v.size == 2:
        change = float(v[-1] - v[0])
    return SeriesSummary(int(v.size), float(v[0]), float(v[-1]), float(v.min()),
                         float(v.max()), value, change, span)


def level_word(value: float, f: Field) -> str | None:
    """"very low" / "low" / "normal" / "high" / "very high", or None without a range."""
    if f.normal is None:
        return None
    lo, hi = f.normal
    clo, chi = f.critical
    if clo is not None and value < clo:
        return "very low"
    if value < lo:
        return "low"
    if chi is not None and value > chi:
        return "very high"
    if value > hi:
        return "high"
    return "normal"


def trend_word(s: SeriesSummary, f: Field) -> str | None:
    """"rising" / "falling" / "stable" relative to the range width; None if unknown."""
    if s.change is None or f.normal is None or f.info.summary != "last":
        return None
    width = f.normal[1] - f.normal[0]
    if width <= 0:  # a point range (GCS 15): use the distance to the critical bound
        clo = f.critical[0]
        width = (f.normal[0] - clo) if clo is not None else 1.0
    rel = s.change / max(width, 1e-9)
    if rel >= TREND_THRESHOLD:
        return "rising"
    if rel <= -TREND_THRESHOLD:
        return "falling"
    return "stable"


def _with_unit(x: float, f: Field) -> str:
    unit = f"{f.unit}/h" if f.info.summary == "rate" and f.unit else f.unit
    num = format_number(x, f.info.decimals)
    if not unit:
        return num
    return f"{num}{unit}" if unit in ("%", "°C") else f"{num} {unit}"


def _category(value: float, info: VariableInfo) -> str | None:
    for code, word in info.categories.items():
        if abs(value - code) < 1e-6:
            return word
    return None


def _band(value: float, info: VariableInfo) -> str:
    for upper, word in info.bands:
        if value < upper:
            return word
    return info.bands[-1][1]


def _series_text(f: Field, s: SeriesSummary, style: str, detail: str) -> str:
    info = f.info
    if info.categories is not None:
        word = _category(s.value, info)
        return word if word is not None else f"{info.label} {format_number(s.value)}"
    if style == "numeric":
        text = (f"{info.label}: {_with_unit(s.value, f)} (first "
                f"{format_number(s.first, info.decimals)}, min "
                f"{format_number(s.min, info.decimals)}, max "
                f"{format_number(s.max, info.decimals)}, n={s.n}, over "
                f"{format_number(s.span_h, 0)} h)")
        return text
    level = level_word(s.value, f)
    trend = trend_word(s, f)
    if level is None:
        text = f"{info.label} {_with_unit(s.value, f)}"
    elif level == "normal" and f.clinical:
        text = f"{info.label} normal"
    else:
        text = f"{info.label} {level} ({_with_unit(s.value, f)})"
    if trend in ("rising", "falling"):
        text += f", {trend}"
    if detail == "full":
        extra = f"n={s.n}"
        if s.n > 1 and info.summary == "last":
            extra = (f"range {format_number(s.min, info.decimals)}-"
                     f"{format_number(s.max, info.decimals)}, {extra}")
        text += f" [{extra}]"
    return text


def _tabular_text(f: Field, value: float, style: str) -> str | None:
    info = f.info
    if info.categories is not None:
        return _category(value, info)
    shown = _with_unit(value, f)
    if style == "numeric":
        return f"{info.label}: {shown}"
    if info.bands is not None:
        return f"{info.label} {shown} ({_band(value, info)})"
    level = level_word(value, f)
    if level in (None, "normal"):
        return f"{info.label} {shown}"
    return f"{info.label} {level} ({shown})"


def _check_style(style: str, detail: str) -> None:
    if style not in STYLES:
        raise DataError(f"Unknown serialisation style {style!r}; expected one of {STYLES}.")
    if detail not in DETAILS:
        raise DataError(f"Unknown serialisation detail {detail!r}; expected one of {DETAILS}.")


def _lookup(payload_vars: Sequence[str], modality: ModalitySpec) -> dict[str, int]:
    index = {n: i for i, n in enumerate(payload_vars)}
    extra = set(index) - set(modality.variables)
    if extra:
        raise DataError(f"Payload of modality {modality.name!r} has variables "
                        f"{sorted(extra)} that the modality does not declare "
                        f"({modality.variables}). The dataset's ModalitySpec and its "
                        f"payloads must agree.")
    return index


def serialize(payload: TimeSeriesData | TabularData, modality: ModalitySpec, *,
              style: str = "words", detail: str = "brief",
              cohort: Mapping[str, tuple[float, float]] | None = None,
              table: Mapping[str, VariableInfo] | None = None,
              fields: list[Field] | None = None) -> str:
    """One payload as text, fields in ``modality.variables`` order, separated by "; ".

    Args:
        payload: a present time-series or tabular payload of ``modality``.
        modality: its spec (field order; declared units).
        style: "words" (levels and trends, numbers only when abnormal) or "numeric".
        detail: "brief", or "full" to add ranges and counts.
        cohort: fitted cohort ranges, used where no clinical range applies.
        table: variable knowledge (default :data:`PHYSIONET2012`).
        fields: pre-resolved fields (speeds up serialising many payloads).
    Returns:
        The text; "no measurements" when nothing plausible was measured.
    Raises:
        DataError: wrong payload kind, undeclared variables, NaN values, unknown style.
    """
    _check_style(style, detail)
    fields = fields if fields is not None else resolve_fields(modality, cohort, table)
    parts: list[str] = []
    if isinstance(payload, TimeSeriesData):
        if modality.kind != "timeseries":
            raise DataError(f"Modality {modality.name!r} is {modality.kind!r} but its payload "
                            f"is a time series.")
        index = _lookup(payload.variables, modality)
        for f in fields:
            i = index.get(f.name)
            if i is None or len(payload.values[i]) == 0:
                continue
            t, v = _check_series(f.name, payload.times[i], payload.values[i])
            s = summarize_series(t, v, f.info, float(payload.horizon))
            if s is not None:
                parts.append(_series_text(f, s, style, detail))
    elif isinstance(payload, TabularData):
        if modality.kind != "tabular":
            raise DataError(f"Modality {modality.name!r} is {modality.kind!r} but its payload "
                            f"is a table row.")
        values = np.asarray(payload.values, dtype=np.float64).ravel()
        if values.size != len(payload.variables):
            raise DataError(f"Tabular payload has {len(payload.variables)} variables but "
                            f"{values.size} values.")
        if np.isinf(values).any():
            raise DataError("Tabular payload holds Inf; a missing value must be NaN.")
        index = _lookup(payload.variables, modality)
        for f in fields:
            i = index.get(f.name)
            if i is None or np.isnan(values[i]):
                continue
            x = float(values[i])
            if not plausible_mask(f.info, np.array([x]))[0]:
                continue
            text = _tabular_text(f, x, style)
            if text is not None:
                parts.append(text)
    else:
        raise DataError(f"Cannot serialise a {type(payload).__name__} payload; expected "
                        f"TimeSeriesData or TabularData.")
    return "; ".join(parts) if parts else "no measurements"


def serialize_many(payloads: Sequence[TimeSeriesData | TabularData], modality: ModalitySpec,
                   **kw) -> list[str]:
    """:func:`serialize` for each payload (fields are resolved once)."""
    kw = dict(kw)
    fields = resolve_fields(modality, kw.pop("cohort", None), kw.pop("table", None))
    return [serialize(p, modality, fields=fields, **kw) for p in payloads]


def fit_cohort_ranges(modality: ModalitySpec,
                      payloads: Sequence[TimeSeriesData | TabularData],
                      table: Mapping[str, VariableInfo] | None = None,
                      quantiles: tuple[float, float] = (0.1, 0.9),
                      ) -> dict[str, tuple[float, float]]:
    """Cohort ranges: per variable, quantiles of the described value over training stays.

    Args:
        modality: the modality.
        payloads: training-split payloads only.
        table: variable knowledge (plausibility filters, summary kinds).
        quantiles: lower and upper quantile (default 10th and 90th percentile).
    Returns:
        ``name -> (low, high)`` for variables measured in at least 5 payloads.
    """
    infos = {f.name: f.info for f in resolve_fields(modality, None, table)}
    per_var: dict[str, list[float]] = {n: [] for n in modality.variables}
    for p in payloads:
        if isinstance(p, TimeSeriesData):
            for name, t, v in zip(p.variables, p.times, p.values):
                if name not in per_var or len(v) == 0:
                    continue
                tt, vv = _check_series(name, t, v)
                s = summarize_series(tt, vv, infos[name], float(p.horizon))
                if s is not None:
                    per_var[name].append(s.value)
        elif isinstance(p, TabularData):
            for name, x in zip(p.variables, np.asarray(p.values, dtype=np.float64)):
                if (name in per_var and np.isfinite(x)
                        and plausible_mask(infos[name], np.array([x]))[0]):
                    per_var[name].append(float(x))
        else:
            raise DataError(f"Cannot fit ranges on a {type(p).__name__} payload.")
    out = {}
    for name, vals in per_var.items():
        if len(vals) >= 5:
            lo, hi = np.quantile(np.asarray(vals), quantiles)
            out[name] = (float(lo), float(hi))
    return out
