"""The weight-free experts ``stats`` and ``grid`` on real PhysioNet stays and on toy series."""

from __future__ import annotations

import time

import numpy as np
import pytest
from _shared import TOY
from _shared import toy_ts as ts
from medmix_datasets.physionet2012 import PhysioNet2012, write_subset
from medmix_experts.grid import GridExpert
from medmix_experts.stats import StatsExpert, ts_summary

from medmix_core import ModalitySpec, TabularData, TimeSeriesData
from medmix_core.errors import DataError
from medmix_core.plugins import get_expert


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    d = PhysioNet2012(str(write_subset(tmp_path_factory.mktemp("p12") / "c", 24)))
    samples = d.samples()
    mods = {m.name: m for m in d.modalities()}
    return samples, mods


def present(samples, m):
    return [s.modalities[m] for s in samples if s.modalities[m] is not None]


def test_registered_and_weight_free():
    for name, cls in (("stats", StatsExpert), ("grid", GridExpert)):
        assert get_expert(name) is cls
        e = cls()
        assert e.family == "domain" and e.n_parameters() == 0
    assert StatsExpert.kinds == ("timeseries", "tabular") and GridExpert.kinds == ("timeseries",)


@pytest.mark.parametrize("cls", [StatsExpert, GridExpert])
def test_shapes_determinism_finite(cohort, cls):
    samples, mods = cohort
    for m in mods.values():
        e = cls()
        if not e.accepts(m):
            assert m.kind == "tabular" and cls is GridExpert
            continue
        pays = present(samples, m.name)
        e.fit(m, pays)
        x = e.encode(m, pays)
        assert x.dtype == np.float32 and x.shape == (len(pays), e.dim(m))
        assert np.isfinite(x).all()
        e2 = cls()
        e2.fit(m, pays)
        np.testing.assert_array_equal(x, e2.encode(m, pays))
        # a payload's encoding does not depend on the others in the batch
        np.testing.assert_array_equal(x[3:4], e.encode(m, pays[3:4]))


def test_dims():
    vit = ModalitySpec("v", "timeseries", [f"x{i}" for i in range(9)])
    tab = ModalitySpec("s", "tabular", ["p", "q", "r"])
    assert StatsExpert().dim(vit) == 63 and StatsExpert().dim(tab) == 6
    assert GridExpert().dim(vit) == 2 * 9 * 48  # hourly fits under 1024
    wide = ModalitySpec("w", "timeseries", [f"x{i}" for i in range(36)])
    g = GridExpert()
    assert g.bins(wide) == (4.0, 12) and g.dim(wide) == 864  # 2-hourly would be 1728 > 1024
    assert GridExpert(bin_hours=6).dim(vit) == 2 * 9 * 8


def test_fit_uses_only_the_given_payloads(cohort):
    samples, mods = cohort
    m = mods["vitals"]
    pays = present(samples, "vitals")
    a, b = pays[:10], pays[10:]
    hr = m.variables.index("HR")
    for cls in (StatsExpert, GridExpert):
        ea, eb = cls(), cls()
        ea.fit(m, a)
        eb.fit(m, b)
        assert not np.allclose(ea.get_state(m)["mean"], eb.get_state(m)["mean"])
    # grid: the mean of HR is the mean over every HR value of the fitting payloads
    g = GridExpert()
    g.fit(m, a)
    all_hr = np.concatenate([p.values[hr] for p in a])
    assert g.get_state(m)["mean"][hr] == pytest.approx(all_hr.mean())
    # stats: the mean of HR's "last" feature is the mean of the last HR of each payload
    s = StatsExpert()
    s.fit(m, a)
    lasts = [p.values[hr][-1] for p in a if len(p.values[hr])]
    assert s.get_state(m)["mean"][hr * 6] == pytest.approx(np.mean(lasts))


@pytest.mark.parametrize("cls", [StatsExpert, GridExpert])
def test_state_round_trip(cohort, cls):
    samples, mods = cohort
    m = mods["labs"]
    pays = present(samples, "labs")
    e = cls()
    e.fit(m, pays[:12])
    fresh = cls()
    with pytest.raises(DataError, match="not fitted"):
        fresh.encode(m, pays)
    fresh.set_state(m, e.get_state(m))
    np.testing.assert_array_equal(fresh.encode(m, pays[12:]), e.encode(m, pays[12:]))
    other = ModalitySpec("labs", "timeseries", list(reversed(m.variables)))
    with pytest.raises(DataError, match="fitted on variables"):
        cls().set_state(other, e.get_state(m))


def test_absent_is_not_a_measured_zero_nor_the_mean():
    train = [ts(a=[(1, 10.0), (2, 12.0)], b=[(1, 5.0)]), ts(a=[(3, 14.0)], b=[(2, 7.0), (9, 9.0)])]
    for cls in (StatsExpert, GridExpert):
        e = cls()
        e.fit(TOY, train)
        mean_a = e.get_state(TOY)["mean"][0]
        absent = e.encode(TOY, [ts(b=[(1, 6.0)])])
        zero = e.encode(TOY, [ts(a=[(1, 0.0)], b=[(1, 6.0)])])
        at_mean = e.encode(TOY, [ts(a=[(1, float(mean_a))], b=[(1, 6.0)])])
        assert not np.array_equal(absent, zero)
        assert not np.array_equal(absent, at_mean)
    # stats layout: per variable 6 z-features then the observed flag
    s = StatsExpert()
    s.fit(TOY, train)
    x = s.encode(TOY, [ts(b=[(1, 6.0)])])[0]
    assert x[6] == 0.0 and x[13] == 1.0 and np.all(x[:6] == 0.0)


def test_stats_features_on_a_line():
    # v = 2 t + 1 at t = 0, 1, 3: last 7, mean 11/3, min 1, max 7, count 3, slope 2
    feats, valid = ts_summary(TOY, [ts(a=[(0, 1.0), (1, 3.0), (3, 7.0)], b=[(4, 2.0)])])
    np.testing.assert_allclose(feats[0, 0], [7, 11 / 3, 1, 7, np.log1p(3), 2.0])
    assert valid[0, 0].all()
    assert valid[0, 1, :5].all() and not valid[0, 1, 5]  # one observation: no slope


def test_tabular_stats():
    spec = ModalitySpec("s", "tabular", ["p", "q"])
    rows = [TabularData(["p", "q"], np.array([1.0, np.nan])),
            TabularData(["p", "q"], np.array([3.0, 4.0]))]
    e = StatsExpert()
    e.fit(spec, rows)
    x = e.encode(spec, rows + [TabularData(["q", "p"], np.array([4.0, 3.0]))])
    np.testing.assert_allclose(x[0], [-1, 1, 0, 0])
    np.testing.assert_allclose(x[1], [1, 1, 0, 1])
    np.testing.assert_array_equal(x[2], x[1])  # variables matched by name
    with pytest.raises(DataError, match="does not declare"):
        e.encode(spec, [TabularData(["p", "zz"], np.array([1.0, 2.0]))])


def test_grid_last_value_forward_fill_and_mask():
    g = GridExpert(bin_hours=12)  # 4 bins
    g.fit(TOY, [ts(a=[(0, 0.0), (1, 2.0)], b=[(0, 1.0)])])  # a: mean 1, std 1
    x = g.encode(TOY, [ts(a=[(0.5, 1.0), (5, 3.0), (30, 0.0), (48, 2.0)])])[0]
    vals, mask = x[:8].reshape(2, 4), x[8:].reshape(2, 4)
    np.testing.assert_allclose(vals[0], [2, 2, -1, 1])  # last of bin 0 is 3 -> z 2; carried
    np.testing.assert_array_equal(mask[0], [1, 0, 1, 1])
    np.testing.assert_array_equal(vals[1], 0)
    np.testing.assert_array_equal(mask[1], 0)


def test_bad_input_is_refused():
    with pytest.raises(DataError, match="unknown option"):
        StatsExpert(window=3)
    with pytest.raises(DataError, match="must be"):
        GridExpert(bin_hours="1h")
    e = StatsExpert()
    with pytest.raises(DataError, match="expected TimeSeriesData"):
        e.fit(TOY, [TabularData(["a"], np.array([1.0]))])
    with pytest.raises(DataError, match="times but"):
        e.fit(TOY, [TimeSeriesData(["a", "b"], [np.array([1.0]), np.array([])],
                                   [np.array([1.0, 2.0]), np.array([])])])
    with pytest.raises(DataError, match="time series only"):
        GridExpert().dim(ModalitySpec("s", "tabular", ["p"]))


def test_fit_on_nothing_is_identity_normalisation():
    for cls in (StatsExpert, GridExpert):
        e = cls()
        e.fit(TOY, [])
        x = e.encode(TOY, [ts(a=[(1, 3.0)])])
        assert np.isfinite(x).all()


def test_vectorised_speed(cohort):
    samples, mods = cohort
    m = mods["vitals"]
    pays = present(samples, "vitals")
    many = (pays * (4000 // len(pays) + 1))[:4000]
    for cls in (StatsExpert, GridExpert):
        e = cls()
        e.fit(m, pays)
        t0 = time.perf_counter()
        x = e.encode(m, many)
        assert x.shape[0] == 4000
        assert time.perf_counter() - t0 < 10.0  # about 0.3 s on a laptop core
