"""The bundled PhysioNet 2012 dataset plugin, on a few real stays and on the whole set."""

from __future__ import annotations

import hashlib
import tarfile

import numpy as np
import pytest
from medmix_datasets import physionet2012 as p12
from medmix_datasets.physionet2012 import PhysioNet2012, write_subset

from medmix_core.datasets import missing_rates
from medmix_core.errors import DataError
from medmix_core.plugins import get_dataset

BUNDLED_SHA = "669ca5c6ed9e33c553d748fae3245c74470797a10f30f97239b8dc836c3e3c0f"
# the 20 smallest RecordIDs, plus 132744 whose length of stay is unknown (-1)
IDS = [132539, 132540, 132541, 132543, 132545, 132547, 132548, 132551, 132554, 132555,
       132556, 132567, 132568, 132570, 132573, 132575, 132577, 132582, 132584, 132585, 132744]


@pytest.fixture(scope="module")
def subset_dir(tmp_path_factory):
    return write_subset(tmp_path_factory.mktemp("p12") / "cohort", IDS)


@pytest.fixture(scope="module")
def ds(subset_dir):
    d = PhysioNet2012(str(subset_dir))
    d.samples()
    return d


def by_id(ds, rid):
    return next(s for s in ds.samples() if s.id == str(rid))


def test_registered_under_its_name():
    assert get_dataset("physionet2012") is PhysioNet2012


def test_modalities_cover_every_variable_once():
    specs = {m.name: m for m in PhysioNet2012().modalities()}
    assert list(specs) == ["static", "vitals", "labs", "arterial", "bloodgas", "hepatic", "cardiac"]
    assert specs["static"].kind == "tabular"
    assert specs["static"].variables == ["Age", "Gender", "Height", "ICUType", "Weight"]
    series = [v for m in specs.values() if m.kind == "timeseries" for v in m.variables]
    assert len(series) == len(set(series)) == 37  # 36 series variables + repeated Weight
    for m in specs.values():
        assert set(m.units) == set(m.variables)
        assert all(v in p12.PLAUSIBLE for v in m.variables)


def test_known_values_of_a_real_stay(ds):
    s = by_id(ds, 132539)  # set-a/132539.txt
    st = s.modalities["static"]
    assert st.values[0] == 54 and st.values[1] == 0 and st.values[3] == 4
    assert np.isnan(st.values[2]) and np.isnan(st.values[4])  # Height, Weight were -1
    vit = s.modalities["vitals"]
    hr = vit.variables.index("HR")
    assert vit.values[hr][:3].tolist() == [73, 77, 60]
    np.testing.assert_allclose(vit.times[hr][:3], [7 / 60, 37 / 60, 97 / 60])
    assert len(vit.values[hr]) == 36
    assert all(np.all(np.diff(t) >= 0) for t in vit.times)
    assert vit.horizon == 48.0
    # no invasive line, no liver panel, no cardiac markers in this stay
    assert s.modalities["arterial"] is None
    assert s.modalities["hepatic"] is None and s.modalities["cardiac"] is None
    assert s.labels == {"mortality": 0.0, "los7": 0.0}
    assert s.meta["saps1"] == 6 and s.meta["set"] == "set-a"


def test_impossible_values_are_dropped_and_counted(ds):
    # 132584 charts DiasABP 0 three times; 132570 charts NISysABP 0 once
    art = by_id(ds, 132584).modalities["arterial"]
    dias = art.values[art.variables.index("DiasABP")]
    assert len(dias) > 0 and dias.min() > 0
    nis = by_id(ds, 132570).modalities["vitals"]
    assert nis.values[nis.variables.index("NISysABP")].min() > 0
    dropped = ds.report()["dropped_values"]
    assert dropped["DiasABP"]["implausible"] >= 3
    assert dropped["NISysABP"]["implausible"] >= 1
    assert dropped["Height"]["missing_code"] >= 1


def test_labels_and_unknown_length_of_stay(ds):
    assert by_id(ds, 132551).labels["mortality"] == 1.0
    assert by_id(ds, 132541).labels["los7"] == 1.0  # 19 days
    assert np.isnan(by_id(ds, 132744).labels["los7"])
    rep = ds.report()
    assert rep["n_stays"] == len(IDS)
    assert rep["labels"]["los7"]["unknown"] == 1


def test_missing_rates_match_the_payloads(ds):
    samples = ds.samples()
    rates = ds.missing_rates()
    for m in ds.modalities():
        expect = np.mean([s.modalities[m.name] is None for s in samples])
        assert rates[m.name] == pytest.approx(expect)
    assert rates == missing_rates(samples, ds.modalities())
    assert rates["arterial"] > 0 and rates["static"] == 0


def test_tarball_source_and_identity(tmp_path):
    tar = write_subset(tmp_path / "c.tar.gz", IDS[:5], as_tar=True)
    d = PhysioNet2012(str(tar))
    assert [s.id for s in d.samples()] == [str(i) for i in IDS[:5]]
    ident = d.identity()
    assert ident["sha256"] == hashlib.sha256(tar.read_bytes()).hexdigest()
    assert ident["name"] == "physionet2012" and ident["parser_version"] == p12.PARSER_VERSION


def test_bundled_identity_is_the_published_sha():
    assert PhysioNet2012().identity()["sha256"] == BUNDLED_SHA


def test_directory_identity_changes_with_content(subset_dir, tmp_path):
    other = write_subset(tmp_path / "c", IDS[:-1])
    assert PhysioNet2012(str(subset_dir)).identity()["sha256"] != \
        PhysioNet2012(str(other)).identity()["sha256"]


def test_vectorised_parser_matches_line_by_line(ds):
    records, _ = ds._read()
    files = [(str(r), records[r][2]) for r in sorted(records)]
    fast = p12._parse_stays(files, p12._Counts())
    slow = {"stay": [], "code": [], "time": [], "value": []}
    for f, (name, data) in enumerate(files):
        body = data.replace(b"\r", b"").partition(b"\n")[2]
        _, t, c, v = p12._slow_rows(name, body, p12._Counts())
        slow["stay"] += [f] * len(t)
        slow["time"] += t
        slow["code"] += c
        slow["value"] += v
    assert len(fast["stay"]) > 5000
    for k, v in slow.items():
        np.testing.assert_array_equal(fast[k], np.asarray(v))


def test_odd_lines_never_crash(tmp_path):
    write_subset(tmp_path / "c", [132539, 132540])
    f = tmp_path / "c" / "set-a" / "132540.txt"
    f.write_bytes(f.read_bytes() + b"12:00,HR,fast\r\n12:30,Foo,3\ngarbage\n13:00,HR,-1\n"
                  b"14:00,Temp,-17.8\n49:30,HR,80\n")
    d = PhysioNet2012(str(tmp_path / "c"))
    rep = d.report()
    assert rep["malformed_lines"] == 1
    assert rep["unknown_parameters"] == {"Foo": 1}
    assert rep["dropped_values"]["HR"]["non_numeric"] == 1
    assert rep["dropped_values"]["HR"]["missing_code"] == 1
    assert rep["dropped_values"]["HR"]["after_horizon"] == 1
    assert rep["dropped_values"]["Temp"]["implausible"] == 1
    vit = by_id(d, 132540).modalities["vitals"]
    hr = vit.values[vit.variables.index("HR")]
    assert np.isfinite(hr).all() and hr.min() > 0
    # the other, regular file is parsed as before
    ref = PhysioNet2012(str(write_subset(tmp_path / "r", [132539])))
    a, b = by_id(d, 132539).modalities["vitals"], by_id(ref, 132539).modalities["vitals"]
    for x, y in zip(a.values, b.values):
        np.testing.assert_array_equal(x, y)


def test_errors_name_the_problem(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        PhysioNet2012(str(tmp_path / "nowhere")).samples()
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no stay files"):
        PhysioNet2012(str(tmp_path / "empty")).samples()
    with pytest.raises(DataError, match="unknown option"):
        PhysioNet2012(None, horizon=24)


@pytest.mark.parametrize("outcomes", ["absent", "header only"])
def test_new_patients_need_no_outcomes(tmp_path, outcomes):
    d = write_subset(tmp_path / "a", IDS[:3])
    if outcomes == "absent":
        (d / "Outcomes-a.txt").unlink()
    else:
        header = (d / "Outcomes-a.txt").read_text().splitlines()[0]
        (d / "Outcomes-a.txt").write_text(header + "\n")
    ds = PhysioNet2012(str(d))
    samples = ds.samples()
    assert len(samples) == 3 and all(s.modalities["static"] is not None for s in samples)
    assert all(np.isnan(s.labels["mortality"]) and np.isnan(s.labels["los7"]) for s in samples)
    rep = ds.report()
    assert rep["labels"]["mortality"] == {"positive": 0, "unknown": 3}
    assert "every label is unknown" in rep["outcomes"]


def test_ids_that_do_not_match_outcomes(tmp_path):
    d = write_subset(tmp_path / "b", IDS[:4])
    out = d / "Outcomes-a.txt"
    lines = out.read_text().splitlines()
    out.write_text("\n".join(lines[:-1]) + "\n")  # drop the last stay's outcome
    with pytest.raises(DataError, match=str(IDS[3])):
        PhysioNet2012(str(d)).samples()
    # and a tarball whose stay file claims another RecordID
    src = write_subset(tmp_path / "c", IDS[:2])
    f = src / "set-a" / f"{IDS[1]}.txt"
    f.write_text(f.read_text().replace(f"RecordID,{IDS[1]}", "RecordID,999999"))
    tar = tmp_path / "c.tar.gz"
    with tarfile.open(tar, "w:gz") as tf:
        tf.add(src, arcname=".")
    with pytest.raises(DataError, match="999999"):
        PhysioNet2012(str(tar)).samples()


def test_wrong_layout(tmp_path):
    bad = tmp_path / "x.tar.gz"
    bad.write_bytes(b"not a tarball")
    with pytest.raises(DataError, match="tar"):
        PhysioNet2012(str(bad)).samples()
    d = write_subset(tmp_path / "h", IDS[:2])
    f = d / "set-a" / f"{IDS[0]}.txt"
    f.write_text("when,what,how much\n" + f.read_text())
    with pytest.raises(DataError, match="Time,Parameter,Value"):
        PhysioNet2012(str(d)).samples()


@pytest.mark.slow
def test_whole_bundled_set():
    d = PhysioNet2012()
    samples = d.samples()
    rep = d.report()
    assert len(samples) == 4000
    assert rep["labels"]["mortality"] == {"positive": 554, "unknown": 0}
    assert rep["labels"]["los7"]["positive"] == 2572
    rates = rep["missing_rates"]
    assert rates["static"] == 0 and rates["vitals"] < 0.05 and rates["labs"] < 0.05
    assert 0.2 < rates["arterial"] < 0.4 and 0.4 < rates["hepatic"] < 0.65
    assert rep["dropped_values"]["pH"]["implausible"] > 0  # pH x 100 typos
    splits = d.splits(samples)
    assert sorted(i for rows in splits.values() for i in rows) == list(range(4000))
    assert abs(len(splits["train"]) - 2800) <= 2
