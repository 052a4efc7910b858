"""The committee benchmark's pairing and argument checks (no training runs)."""

from __future__ import annotations

import sys

import pytest
from _shared import bench_module


@pytest.fixture(scope="module")
def bench():
    with bench_module("bench_committee") as module:
        yield module


def _r(split, seed, auroc):
    return {"split": split, "seed": seed, "test_auroc": auroc}


def test_paired_gaps_pair_on_split_and_seed(bench):
    results = {"stats alone": [_r(0, 0, 0.80), _r(1, 0, 0.90)],
               "full committee": [_r(1, 0, 0.85), _r(0, 0, 0.83), _r(2, 0, 0.99)]}
    gaps = bench.paired_gaps(results, "stats alone")
    # order follows the variant's runs; split 2 has no reference run, so it is left out
    assert gaps == {"full committee": pytest.approx([-0.05, 0.03])}


def _main(bench, monkeypatch, *argv):
    monkeypatch.setattr(sys, "argv", ["bench_committee.py", *argv])
    bench.main()


def test_splits_need_a_store_pattern(bench, monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit):
        _main(bench, monkeypatch, "--store", str(tmp_path), "--splits", "0,1")
    assert "{split}" in capsys.readouterr().err


def test_missing_split_store_says_how_to_make_it(bench, monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit):
        _main(bench, monkeypatch, "--store", str(tmp_path / "s{split}"), "--splits", "3")
    err = capsys.readouterr().err
    assert "medmix extract --split-seed 3" in err and str(tmp_path / "s3") in err


def test_unknown_variant_is_named(bench, monkeypatch, capsys, tmp_path):
    with pytest.raises(SystemExit):
        _main(bench, monkeypatch, "--store", str(tmp_path), "--only", "stats alone",
              "--only", "nope")
    err = capsys.readouterr().err
    assert "'nope'" in err and "without rag" in err
