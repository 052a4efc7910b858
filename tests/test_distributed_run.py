"""Two real processes (torchrun, gloo on the CPU) against one: job-parallel runs and
sweeps give the same results, data-parallel training gives them within a stated tolerance.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

TRAIN = ["--epochs", "6", "--patience", "6", "--d", "16", "--bootstrap", "0",
         "--device", "cpu", "--threads", "1", "--sequential"]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from medmix_datasets.synthetic import write_synthetic_store

    return write_synthetic_store(tmp_path_factory.mktemp("dist") / "store", n=600,
                                 teacher_dim=24, seed=5).path


def _medmix(*args) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-m", "medmix_core.cli", *map(str, args)], env=env,
                         capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, (res.stdout[-2000:], res.stderr[-4000:])
    return res


def _metrics(folder):
    m = json.loads((folder / "metrics.json").read_text())
    for s in m["seed_info"]:
        s.pop("seconds")
    return m


def test_two_processes_share_the_seeds_and_match_one_process(store, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    _medmix("run", "--store", store, "--seeds", "3", "--out", one, *TRAIN)
    res = _medmix("run", "--store", store, "--seeds", "3", "--out", two, "--nproc", "2",
                  *TRAIN)
    m1, m2 = _metrics(one), _metrics(two)
    assert m2["per_seed"] == m1["per_seed"] and m2["test"] == m1["test"]
    assert m2["seed_info"] == m1["seed_info"]
    assert (two / "predictions.csv").read_text() == (one / "predictions.csv").read_text()
    info = json.loads((two / "run.json").read_text())
    assert info["status"] == "complete" and info["finished_seeds"] == [0, 1, 2]
    assert res.stdout.count("AUROC") >= 1  # rank 0 prints the table once
    assert not list(two.glob(".medmix.lock"))


def test_data_parallel_training_matches_one_process_within_tolerance(store, tmp_path):
    # without in-model dropout the two processes compute the whole batch's gradient, up to
    # the order of float sums: the same model to ~1e-6
    one, two = tmp_path / "one", tmp_path / "dp"
    flags = [*TRAIN, "--dropout", "0", "--modality-dropout", "0.2"]
    _medmix("run", "--store", store, "--seeds", "1", "--out", one, *flags)
    _medmix("run", "--store", store, "--seeds", "1", "--out", two, "--nproc", "2",
            "--data-parallel", *flags)
    m1, m2 = _metrics(one), _metrics(two)
    assert m2["seed_info"][0]["best_epoch"] == m1["seed_info"][0]["best_epoch"]
    for k in ("auroc", "auprc"):
        assert abs(m2["per_seed"][0][k] - m1["per_seed"][0][k]) < 1e-4
    p1 = [float(r.split(",")[2]) for r in (one / "predictions.csv").read_text().splitlines()[1:]]
    p2 = [float(r.split(",")[2]) for r in (two / "predictions.csv").read_text().splitlines()[1:]]
    assert max(abs(a - b) for a, b in zip(p1, p2)) < 1e-4


def test_a_two_process_sweep_matches_one_process(store, tmp_path):
    base = ["sweep", "--store", store, "--protocol", "test-random", "--rates", "0.3,0.7",
            "--fuser", "concat", "--seeds", "2", "--epochs", "4", "--patience", "4",
            "--device", "cpu"]
    _medmix(*base, "--out", tmp_path / "one")
    _medmix(*base, "--out", tmp_path / "two", "--nproc", "2")
    assert json.loads((tmp_path / "two" / "sweep.json").read_text()) == \
        json.loads((tmp_path / "one" / "sweep.json").read_text())


def test_data_parallel_in_one_process_is_refused_before_anything_is_written(store, tmp_path):
    from typer.testing import CliRunner

    from medmix_core.cli import app

    out = tmp_path / "dp"
    res = CliRunner().invoke(app, ["run", "--store", str(store), "--out", str(out),
                                   "--data-parallel", *TRAIN])
    assert res.exit_code == 2
    assert "--nproc" in res.output and "torchrun" in res.output
    assert not out.exists()
