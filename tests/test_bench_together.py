"""The together-vs-sequential benchmark on the small synthetic store: it runs, its seeds
agree, and the figures it derives (stacking ceiling, matrix products' share, the CLI modes'
agreement) are consistent. Times themselves are not asserted (benchmarks measure them)."""

from __future__ import annotations

import pytest
from _shared import bench_module


@pytest.fixture(scope="module")
def bench():
    with bench_module("bench_together") as module:
        yield module


def test_bench_together_runs_and_agrees(bench, synth_store_path, tmp_path):
    out = tmp_path / "together.json"
    res = bench.main([str(synth_store_path), "--seeds", "2", "--fusers", "medmix,m3care",
                      "--epochs", "2", "--thread-counts", "1", "--cli", "--json", str(out)])
    assert out.is_file()
    medmix, m3care = [r for r in res["runs"] if r["fuser"] == "medmix"][0], \
        [r for r in res["runs"] if r["fuser"] == "m3care"][0]
    assert "blocker" in m3care and "m3care" in m3care["blocker"]
    assert medmix["best_epochs_equal"] and medmix["max_history_difference"] <= 1e-5
    assert medmix["epochs_run"] == [2, 2] and medmix["work_macs"] > 0
    assert medmix["speedup"] == pytest.approx(medmix["sequential_s"] / medmix["together_s"])
    assert medmix["marginal_s_per_seed_epoch"] > 0
    assert medmix["stacking_ceiling_speedup"] == pytest.approx(
        medmix["sequential_s_per_seed_epoch"] / medmix["marginal_s_per_seed_epoch"])
    products = medmix["matrix_products"]
    assert 0 < products["seconds"] <= products["profiled_wall_s"]
    assert 0 < products["share_of_time"] <= 1 and products["fraction_of_matmul"] > 0
    cli = {r["mode"]: r for r in res["cli"] if r["fuser"] == "medmix"}
    assert set(cli) == {"sequential", "together"}
    assert cli["sequential"]["max_metric_difference"] is None
    assert cli["together"]["max_metric_difference"] <= 1e-4
    assert cli["together"]["speedup"] > 0
