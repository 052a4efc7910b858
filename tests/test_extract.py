"""extract(): dataset + experts -> EmbeddingStore; resumable, incremental, clear errors."""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest
from medmix_datasets.physionet2012 import PhysioNet2012, write_subset
from medmix_experts.stats import StatsExpert

from medmix_core import hookimpl
from medmix_core.errors import StoreError, UnknownPluginError
from medmix_core.extract import ExtractError, extract, label_arrays, modality_missing_rates
from medmix_core.plugins import get_plugin_manager
from medmix_core.store import EmbeddingStore

N = 21


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return str(write_subset(tmp_path_factory.mktemp("p12") / "cohort", N))


class Counting(StatsExpert):
    """stats that counts its calls and can be told to fail on its k-th encode call."""

    name = "counting"
    calls: ClassVar[dict[str, int]] = {"fit": 0, "encode": 0}
    fail_at: ClassVar[int | None] = None

    def fit(self, modality, payloads):
        Counting.calls["fit"] += 1
        super().fit(modality, payloads)

    def encode(self, modality, payloads):
        Counting.calls["encode"] += 1
        if Counting.fail_at is not None and Counting.calls["encode"] == Counting.fail_at:
            raise RuntimeError("simulated crash in the middle of an extraction")
        return super().encode(modality, payloads)


class ImageOnly(StatsExpert):
    name = "imageonly"
    kinds = ("image",)


class _Plugin:
    @hookimpl
    def register_experts(self, register):
        register("counting", Counting)
        register("imageonly", ImageOnly)


@contextmanager
def throwaway_plugin():
    pm = get_plugin_manager()
    plugin = _Plugin()
    pm.register(plugin, name="test-extract-throwaway")
    try:
        Counting.calls.update(fit=0, encode=0)
        Counting.fail_at = None
        yield
    finally:
        pm.unregister(plugin)


def shard_bytes(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes()
            for folder in ("shards", "teachers", "state") if (path / folder).exists()
            for p in sorted((path / folder).rglob("*.safetensors"))}


def test_store_matches_the_data(source, tmp_path):
    store = extract("physionet2012", tmp_path / "s", ["stats", "grid"], source=source,
                    shard_size=8, progress=False)
    ds = PhysioNet2012(source)
    samples = ds.samples()
    assert store.sample_ids == [s.id for s in samples]
    assert [m.name for m in store.modalities] == [m.name for m in ds.modalities()]
    assert [e.name for e in store.experts["static"]] == ["stats"]  # grid takes no tabular data
    assert [e.name for e in store.experts["vitals"]] == ["stats", "grid"]
    assert all(len(e.shards) == 3 for e in store.all_entries())  # 21 rows in shards of 8
    rates = store.modality_missing_rates()
    expect = modality_missing_rates(samples, ds.modalities())
    assert rates == pytest.approx(expect, abs=1e-6)
    assert store.manifest["report"]["missing_rates"] == pytest.approx(expect)
    assert store.manifest["report"]["dataset"]["n_stays"] == N
    assert store.manifest["dataset"]["sha256"] == ds.identity()["sha256"]
    for e in store.all_entries():
        emb, mask = store.load(e)
        present = np.array([s.modalities[e.modality] is not None for s in samples])
        np.testing.assert_array_equal(mask.numpy(), present)
        assert np.all(emb.numpy()[~present] == 0)
    mort = store.labels("mortality").numpy()
    np.testing.assert_array_equal(mort, [s.labels["mortality"] for s in samples])
    assert store.splits == {k: sorted(v) for k, v in ds.splits(samples).items()}
    # the fitted state in the store is what fitting on the training rows gives
    e = store.entry("labs", "stats")
    ref = StatsExpert()
    spec = next(m for m in ds.modalities() if m.name == "labs")
    ref.fit(spec, [samples[i].modalities["labs"] for i in store.splits["train"]
                   if samples[i].modalities["labs"] is not None])
    np.testing.assert_array_equal(store.load_state(e)["mean"], ref.get_state(spec)["mean"])


def test_resume_after_interruption_is_byte_identical(source, tmp_path):
    with throwaway_plugin():
        whole = extract("physionet2012", tmp_path / "whole", ["counting"], source=source,
                        shard_size=8, progress=False)
        calls_whole = dict(Counting.calls)
        Counting.calls.update(fit=0, encode=0)
        Counting.fail_at = 9  # static 3 shards, vitals 3, labs 2 done, then a crash
        with pytest.raises(RuntimeError, match="simulated crash"):
            extract("physionet2012", tmp_path / "cut", ["counting"], source=source,
                    shard_size=8, progress=False)
        with pytest.raises(StoreError, match="interrupted"):
            EmbeddingStore.open(tmp_path / "cut")
        Counting.fail_at = None
        Counting.calls.update(fit=0, encode=0)
        resumed = extract("physionet2012", tmp_path / "cut", ["counting"], source=source,
                          shard_size=8, progress=False)
        # finished shards were kept: 8 encode calls fewer, and the saved state was reused
        assert Counting.calls["encode"] == calls_whole["encode"] - 8
        assert Counting.calls["fit"] == calls_whole["fit"] - 3
    a, b = shard_bytes(whole.path), shard_bytes(resumed.path)
    assert a.keys() == b.keys() and len(a) > 20
    assert all(a[k] == b[k] for k in a)


def test_rerun_is_a_no_op(source, tmp_path):
    with throwaway_plugin():
        store = extract("physionet2012", tmp_path / "s", ["counting"], source=source,
                        progress=False)
        files = {p: p.stat().st_mtime_ns for p in store.path.rglob("*") if p.is_file()}
        Counting.calls.update(fit=0, encode=0)
        again = extract("physionet2012", tmp_path / "s", ["counting"], source=source,
                        progress=False)
        assert Counting.calls == {"fit": 0, "encode": 0}
    assert {p: p.stat().st_mtime_ns for p in again.path.rglob("*") if p.is_file()} == files


def test_a_damaged_store_is_repaired_by_a_rerun(source, tmp_path):
    store = extract("physionet2012", tmp_path / "s", ["stats"], source=source, shard_size=8,
                    progress=False)
    before = shard_bytes(store.path)
    (store.path / "shards/labs/stats/00001.safetensors").unlink()
    (store.path / "shards/vitals/stats/00002.safetensors").write_bytes(b"truncated")
    with pytest.raises(StoreError):
        EmbeddingStore.open(store.path)
    again = extract("physionet2012", tmp_path / "s", ["stats"], source=source, shard_size=8,
                    progress=False)
    assert shard_bytes(again.path) == before


def test_adding_an_expert_keeps_the_old_ones(source, tmp_path):
    out = tmp_path / "s"
    extract("physionet2012", out, ["stats"], source=source, progress=False)
    before = shard_bytes(out)
    store = extract("physionet2012", out, ["grid"], source=source, progress=False)
    assert [e.name for e in store.experts["vitals"]] == ["stats", "grid"]
    after = shard_bytes(out)
    assert all(after[k] == v for k, v in before.items())
    # new options for one expert re-extract that expert only
    store = extract("physionet2012", out, ["grid"], source=source, progress=False,
                    expert_options={"grid": {"bin_hours": 6}})
    assert store.entry("vitals", "grid").dim == 2 * 9 * 8
    assert store.entry("vitals", "stats").dim == 63


def test_teachers_train_rows_only_by_default(source, tmp_path):
    store = extract("physionet2012", tmp_path / "s", ["grid"], teachers=["stats"],
                    source=source, progress=False)
    t = store.entry("vitals", "stats", role="teacher")
    assert t.shards[0]["file"].startswith("teachers/")
    _, mask = store.load(t)
    train = set(store.splits["train"])
    assert all(not mask[i] for i in range(N) if i not in train)
    assert mask.any()
    every = extract("physionet2012", tmp_path / "a", ["grid"], teachers=["stats"],
                    source=source, progress=False, teacher_rows="all")
    _, mask_all = every.load(every.entry("vitals", "stats", role="teacher"))
    assert mask_all.sum() > mask.sum()


def test_unknown_names_and_unfit_experts(source, tmp_path):
    with pytest.raises(UnknownPluginError, match="stats"):
        extract("physionet2012", tmp_path / "s", ["stast"], source=source, progress=False)
    with pytest.raises(UnknownPluginError, match="physionet2012"):
        extract("physionet2013", tmp_path / "s", ["stats"], source=source, progress=False)
    with pytest.raises(UnknownPluginError, match="teacher"):
        extract("physionet2012", tmp_path / "s", ["stats"], teachers=["nobody"], source=source,
                progress=False)
    with throwaway_plugin(), pytest.raises(ExtractError) as err:
        extract("physionet2012", tmp_path / "s", ["imageonly"], source=source,
                progress=False)
    msg = str(err.value)
    assert "vitals (timeseries)" in msg and "static (tabular)" in msg and "stats" in msg


def test_other_data_in_out_needs_overwrite(source, tmp_path):
    out = tmp_path / "s"
    extract("physionet2012", out, ["stats"], source=source, progress=False)
    other = str(write_subset(tmp_path / "other", 12))
    with pytest.raises(ExtractError, match="overwrite"):
        extract("physionet2012", out, ["stats"], source=other, progress=False)
    store = extract("physionet2012", out, ["stats"], source=other, progress=False,
                    overwrite=True)
    assert store.n_samples == 12
    state = json.loads((out / "extract_state.json").read_text())
    assert all(k.startswith("expert:") for k in state["encoders"])


def test_label_arrays_refuse_bad_labels():
    from medmix_core import Sample, TaskSpec
    from medmix_core.errors import DataError
    good = [Sample("a", {}, {"y": 1.0}), Sample("b", {}, {"y": None})]
    y = label_arrays(good, [TaskSpec("y", "binary")])["y"]
    assert y[0] == 1.0 and np.isnan(y[1])
    with pytest.raises(DataError, match="binary"):
        label_arrays([Sample("a", {}, {"y": 2.0})], [TaskSpec("y", "binary")])


def test_external_cohort_with_training_statistics(source, tmp_path):
    train_store = extract("physionet2012", tmp_path / "train", ["stats", "grid"],
                          source=source, progress=False)
    ext_src = str(write_subset(tmp_path / "ext", [132592, 132595, 132597, 132598, 132599,
                                                  132601, 132602, 132605]))
    ext = extract("physionet2012", tmp_path / "ext_store", ["stats", "grid"], source=ext_src,
                  fit_from=train_store.path, all_rows_split="test", progress=False)
    assert ext.splits == {"train": [], "val": [], "test": list(range(8))}
    ds = PhysioNet2012(ext_src)
    spec = next(m for m in ds.modalities() if m.name == "vitals")
    ref = StatsExpert()
    ref.set_state(spec, train_store.load_state(train_store.entry("vitals", "stats")))
    own = StatsExpert()  # what fitting on the external cohort itself would give
    own.fit(spec, [s.modalities["vitals"] for s in ds.samples() if s.modalities["vitals"]])
    assert not np.allclose(own.get_state(spec)["mean"], ref.get_state(spec)["mean"])
    emb, mask = ext.load(ext.entry("vitals", "stats"))
    pays = [s.modalities["vitals"] for s in ds.samples()]
    rows = [i for i, p in enumerate(pays) if p is not None]
    assert mask.numpy().tolist() == [p is not None for p in pays]
    np.testing.assert_array_equal(emb.numpy()[rows], ref.encode(spec, [pays[i] for i in rows]))
    trained = train_store.load_state(train_store.entry("vitals", "stats"))
    np.testing.assert_array_equal(ext.load_state(ext.entry("vitals", "stats"))["mean"],
                                  trained["mean"])
    # a run folder (encoders.json + state/) works the same way
    run = tmp_path / "run"
    recs = []
    for e in train_store.experts["vitals"]:
        (run / e.state_file).parent.mkdir(parents=True, exist_ok=True)
        (run / e.state_file).write_bytes((train_store.path / e.state_file).read_bytes())
        recs.append({"modality": "vitals", "name": e.name, "dim": e.dim,
                     "provenance": e.provenance, "state_file": e.state_file})
    (run / "encoders.json").write_text(json.dumps({"encoders": recs}))
    via_run = extract("physionet2012", tmp_path / "ext_run", ["stats"], source=ext_src,
                      fit_from=run, all_rows_split="test", progress=False)
    assert list(via_run.experts) == ["vitals"]  # only the pairs the run holds
    np.testing.assert_array_equal(via_run.load(via_run.entry("vitals", "stats"))[0], emb)


def test_fit_from_refuses_mismatches(source, tmp_path):
    train_store = extract("physionet2012", tmp_path / "train", ["grid"], source=source,
                          progress=False)
    (tmp_path / "nothing").mkdir()
    with pytest.raises(ExtractError, match="neither a store"):
        extract("physionet2012", tmp_path / "a", ["grid"], source=source,
                fit_from=tmp_path / "nothing", progress=False)
    with pytest.raises(ExtractError, match="options"):
        extract("physionet2012", tmp_path / "b", ["grid"], source=source, progress=False,
                fit_from=train_store.path, expert_options={"grid": {"bin_hours": 6}})
    with pytest.raises(ExtractError, match="no fitted state of expert 'stats'"):
        extract("physionet2012", tmp_path / "c", ["stats"], source=source,
                fit_from=train_store.path, progress=False)
    with pytest.raises(ExtractError, match="training-only"):
        extract("physionet2012", tmp_path / "d", ["grid"], teachers=["stats"], source=source,
                fit_from=train_store.path, progress=False)
    from medmix_core.errors import DataError
    with pytest.raises(DataError, match="no training rows"):
        extract("physionet2012", tmp_path / "e", ["grid"], source=source,
                all_rows_split="test", progress=False)


def test_dataset_default_options_apply_unless_the_caller_sets_them(source, tmp_path,
                                                                    monkeypatch):
    monkeypatch.setattr(PhysioNet2012, "default_expert_options", {"grid": {"bin_hours": 12}})
    store = extract("physionet2012", tmp_path / "a", ["grid"], source=source, progress=False)
    vitals = next(m for m in PhysioNet2012(source).modalities() if m.name == "vitals")
    entry = store.entry("vitals", "grid")
    assert entry.dim == 2 * len(vitals.variables) * 4  # 48 h in 12-hour bins
    assert entry.provenance["options"] == {"bin_hours": 12}
    mine = extract("physionet2012", tmp_path / "b", ["grid"], source=source, progress=False,
                   expert_options={"grid": {"bin_hours": 24}})
    assert mine.entry("vitals", "grid").dim == 2 * len(vitals.variables) * 2


def test_fit_from_reuses_the_options_the_state_was_fitted_with(source, tmp_path):
    train = extract("physionet2012", tmp_path / "train", ["grid"], source=source,
                    progress=False, expert_options={"grid": {"bin_hours": 6}})
    ext_src = str(write_subset(tmp_path / "ext", [132592, 132595, 132597]))
    # no options given: those recorded with the fitted state are used, not grid's defaults
    ext = extract("physionet2012", tmp_path / "ext_store", ["grid"], source=ext_src,
                  fit_from=train.path, all_rows_split="test", progress=False)
    assert ext.entry("vitals", "grid").dim == train.entry("vitals", "grid").dim
    with pytest.raises(ExtractError, match="fitted with options"):
        extract("physionet2012", tmp_path / "other", ["grid"], source=ext_src,
                fit_from=train.path, all_rows_split="test", progress=False,
                expert_options={"grid": {"bin_hours": 3}})


def test_provenance_records_what_fitting_learned(source, tmp_path):
    store = extract("physionet2012", tmp_path / "s", ["seqssl"], source=source,
                    progress=False, expert_options={"seqssl": {"epochs": 2}})
    trained = store.entry("vitals", "seqssl").provenance["trained"]["vitals"]
    assert trained["epochs_run"] == 2 and trained["n_train"] > 0


def test_completing_a_store_leaves_its_entries_alone(source, tmp_path, monkeypatch):
    from medmix_core.config import RunConfig
    from medmix_core.runner import ensure_store

    out = tmp_path / "s"
    extract("physionet2012", out, ["stats"], source=source, progress=False)
    shard = next((out / "shards" / "vitals" / "stats").glob("*.safetensors"))
    before = shard.stat().st_mtime_ns
    # a newer stats would key its entries differently; completing the store must not
    # re-extract what is already there
    monkeypatch.setattr(StatsExpert, "version", "changed")
    cfg = RunConfig(store=str(out), source=source, experts=["stats", "grid"], progress=False)
    store = ensure_store(cfg, log=lambda *_: None)
    assert {e.name for e in store.experts["vitals"]} == {"stats", "grid"}
    assert shard.stat().st_mtime_ns == before
