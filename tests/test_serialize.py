"""EHR serialisation: fixed field order, level and trend words, units, data errors."""

from __future__ import annotations

import numpy as np
import pytest
from _shared import real_stays
from medmix_experts import serialize as ser

from medmix_core.errors import DataError
from medmix_core.types import ModalitySpec, TabularData, TextData, TimeSeriesData


@pytest.fixture(scope="module")
def stays(tmp_path_factory):
    return real_stays(str(tmp_path_factory.mktemp("pn")))


def _ts(spec: ModalitySpec, series: dict[str, tuple[list[float], list[float]]]):
    return TimeSeriesData(list(spec.variables),
                          [np.asarray(series.get(v, ([], []))[0], float) for v in spec.variables],
                          [np.asarray(series.get(v, ([], []))[1], float) for v in spec.variables],
                          48.0)


VITALS = ModalitySpec("vitals", "timeseries", ["HR", "Temp", "GCS", "Urine"],
                      {"HR": "beats/min", "Temp": "degC", "GCS": "points (3-15)", "Urine": "mL"})


def test_level_trend_and_numbers_only_when_abnormal():
    p = _ts(VITALS, {"HR": ([0, 10, 20, 30, 40], [80, 90, 100, 108, 112]),
                     "Temp": ([1, 30], [37.0, 37.2]),
                     "GCS": ([2], [6]),
                     "Urine": ([1, 2, 3], [10, 20, 30])})
    text = ser.serialize(p, VITALS)
    parts = text.split("; ")
    assert parts[0] == "heart rate high (112 bpm), rising"
    assert parts[1] == "temperature normal"
    assert parts[2] == "GCS very low (6)"  # "points (3-15)" is the unitless GCS scale
    assert parts[3].startswith("urine output very low (1 mL/h)")  # 60 mL over 48 h


def test_fixed_field_order_whatever_the_payload_order():
    series = {"HR": ([0, 1], [70, 72]), "Temp": ([0], [39.9]), "Urine": ([5], [100])}
    a = _ts(VITALS, series)
    order = [3, 0, 2, 1]  # the same stay with the variables listed in another order
    b = TimeSeriesData([a.variables[i] for i in order], [a.times[i] for i in order],
                       [a.values[i] for i in order], 48.0)
    ta, tb = ser.serialize(a, VITALS), ser.serialize(b, VITALS)
    assert ta == tb
    pos = [ta.index(w) for w in ("heart rate", "temperature", "urine output")]
    assert pos == sorted(pos)
    assert "GCS" not in ta  # unmeasured variables are left out


def test_unit_handling():
    assert ser.same_unit("bpm", "beats/min") and ser.same_unit("mEq/L", "mmol/L")
    assert ser.same_unit("points (3-15)", "") and ser.same_unit("degC", "°C")
    assert not ser.same_unit("degF", "°C") and not ser.same_unit("mmol/L", "mg/dL")
    p = {"Temp": ([0, 40], [99.5, 101.3])}
    celsius = ModalitySpec("v", "timeseries", ["Temp"], {"Temp": "degC"})
    fahrenheit = ModalitySpec("v", "timeseries", ["Temp"], {"Temp": "degF"})
    # 101.3 read as Celsius is implausible (dropped); in Fahrenheit the clinical range in
    # Celsius must not be applied: the value is printed with the declared unit, no level
    assert ser.serialize(_ts(celsius, p), celsius) == "no measurements"
    assert ser.serialize(_ts(fahrenheit, p), fahrenheit) == "temperature 101.3 degF"
    # with fitted cohort ranges the words become cohort-relative
    cohort = {"Temp": (97.0, 100.0)}
    assert ser.serialize(_ts(fahrenheit, p), fahrenheit, cohort=cohort) == \
        "temperature high (101.3 degF), rising"


def test_implausible_values_are_dropped_not_printed():
    spec = ModalitySpec("bg", "timeseries", ["pH", "HR"], {})
    p = _ts(spec, {"pH": ([1, 2], [7.31, 735.0]), "HR": ([1], [0.0])})
    text = ser.serialize(p, spec)
    assert text == "pH low (7.31)"  # pH 735 (typing error) and HR 0 are data errors


def test_bad_payloads_raise():
    spec = ModalitySpec("v", "timeseries", ["HR"], {})
    nan = TimeSeriesData(["HR"], [np.array([1.0])], [np.array([np.nan])])
    with pytest.raises(DataError, match="NaN"):
        ser.serialize(nan, spec)
    ragged = TimeSeriesData(["HR"], [np.array([1.0, 2.0])], [np.array([80.0])])
    with pytest.raises(DataError, match="2 times but 1 values"):
        ser.serialize(ragged, spec)
    other = TimeSeriesData(["Pulse"], [np.array([1.0])], [np.array([80.0])])
    with pytest.raises(DataError, match="does not declare"):
        ser.serialize(other, spec)
    with pytest.raises(DataError, match="style"):
        ser.serialize(TimeSeriesData(["HR"], [np.zeros(1)], [np.ones(1) * 80]), spec,
                      style="prose")


def test_text_is_never_serialised():
    """A note goes to the text experts as is; the serialiser is for measurements only."""
    note = ModalitySpec("note", "text")
    with pytest.raises(DataError, match="expected TimeSeriesData or TabularData"):
        ser.serialize(TextData("FINDINGS: Lungs are clear."), note)
    with pytest.raises(DataError, match="Cannot fit ranges on a TextData"):
        ser.fit_cohort_ranges(note, [TextData("IMPRESSION: Normal chest.")])


def test_tabular_categories_bands_and_missing():
    spec = ModalitySpec("static", "tabular", ["Age", "Gender", "Height", "ICUType", "Weight"],
                        {"Age": "years", "Height": "cm", "Weight": "kg"})
    row = TabularData(list(spec.variables), np.array([71, 1, np.nan, 3, 310.0]))
    assert ser.serialize(row, spec) == "age 71 years (older adult); male; medical ICU"
    numeric = ser.serialize(row, spec, style="numeric")
    assert numeric == "age: 71 years; male; medical ICU"


def test_numeric_style_summarises_time():
    p = _ts(VITALS, {"HR": ([0.5, 10, 47.5], [88, 140, 112])})
    assert ser.serialize(p, VITALS, style="numeric") == \
        "heart rate: 112 bpm (first 88, min 88, max 140, n=3, over 47 h)"
    full = ser.serialize(p, VITALS, detail="full")
    assert full.startswith("heart rate high (112 bpm)") and "range 88-140, n=3" in full


def test_real_stays_every_modality(stays):
    ds, samples = stays
    specs = {m.name: m for m in ds.modalities()}
    seen = set()
    for s in samples:
        for name, payload in s.modalities.items():
            if payload is None:
                continue
            text = ser.serialize(payload, specs[name])
            assert text and text != "no measurements"
            assert len(text.split()) < 120  # short enough for a sentence encoder
            assert ser.serialize(payload, specs[name]) == text  # deterministic
            seen.add(name)
    assert {"static", "vitals", "labs"} <= seen


def test_cohort_ranges_from_given_payloads_only(stays):
    ds, samples = stays
    spec = next(m for m in ds.modalities() if m.name == "vitals")
    pays = [s.modalities["vitals"] for s in samples if s.modalities["vitals"] is not None]
    ranges = ser.fit_cohort_ranges(spec, pays)
    last_hr = [p.values[p.variables.index("HR")][-1] for p in pays]
    assert ranges["HR"] == pytest.approx(tuple(np.quantile(last_hr, [0.1, 0.9])))
    assert ser.fit_cohort_ranges(spec, pays[:4]) == {}  # too few stays: no ranges
