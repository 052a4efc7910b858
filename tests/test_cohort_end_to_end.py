"""The product card's command on a user's own cohort: tiny same-architecture BiomedCLIP and
DINOv2 models in MEDMIX_MODEL_DIR, real chest X-rays, a manifest, and `medmix run`."""

from __future__ import annotations

import csv
import importlib.util
import shutil
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from medmix_core.cli import app

FIX = Path(__file__).parent / "fixtures"
_spec = importlib.util.spec_from_file_location("medmix_tiny_models", FIX / "tiny_models.py")
tiny = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(tiny)
runner = CliRunner()


def _cohort(folder: Path) -> Path:
    """24 patients: two X-ray views (some absent), age, a binary outcome."""
    folder.mkdir(parents=True)
    imgs = sorted((FIX / "cxr").glob("*.jpeg"))
    for p in imgs:
        shutil.copy(p, folder / p.name)
    with open(folder / "cohort.csv", "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(["pid", "frontal", "lateral", "age", "died"])
        for i in range(24):
            frontal = imgs[i % 3].name if i % 5 else ""
            lateral = imgs[(i + 1) % 3].name if i % 2 else ""
            w.writerow([f"p{i:02d}", frontal, lateral, 40 + i, int(i % 3 == 0)])
    (folder / "cohort.yaml").write_text(
        "manifest: cohort.csv\nid: pid\nmodalities:\n"
        "  cxr: {kind: image, columns: [frontal, lateral]}\n"
        "  demo: {kind: tabular, columns: [age]}\n"
        "tasks:\n  - {name: died, type: binary, column: died}\n")
    return folder / "cohort.yaml"


@pytest.fixture()
def cohort(tmp_path, monkeypatch):
    models = tmp_path / "models"
    tiny.make_biomedclip(models / "biomedclip")
    tiny.make_dinov2(models / "dinov2")
    monkeypatch.setenv("MEDMIX_MODEL_DIR", str(models))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hf"))
    spec = _cohort(tmp_path / "cohort")
    monkeypatch.chdir(spec.parent)
    return spec


def test_card_command_runs_on_own_cohort_with_local_weights(cohort):
    res = runner.invoke(app, ["run", "--fuser", "medmix", "--experts", "biomedclip,dinov2",
                              "--dataset", "manifest", "--spec", str(cohort), "--epochs", "2",
                              "--d", "8", "--out", "run1"])
    assert res.exit_code == 0, res.output
    assert (cohort.parent / "run1" / "metrics.json").is_file()
    # with a project file the card's command works verbatim inside the cohort folder
    (cohort.parent / "medmix.yaml").write_text(
        f"dataset: manifest\nsource: {cohort.name}\nepochs: 2\nd: 8\nout: run2\n")
    res = runner.invoke(app, ["run", "--fuser", "medmix", "--experts", "biomedclip,dinov2"])
    assert res.exit_code == 0, res.output
    assert (cohort.parent / "run2" / "predictions.csv").is_file()


def test_card_command_without_weights_fails_fast_and_says_where_to_put_them(cohort, tmp_path,
                                                                           monkeypatch):
    monkeypatch.setenv("MEDMIX_MODEL_DIR", str(tmp_path / "empty"))
    t0 = time.perf_counter()
    res = runner.invoke(app, ["run", "--fuser", "medmix", "--experts", "biomedclip,dinov2",
                              "--spec", str(cohort), "--store", str(tmp_path / "st")])
    elapsed = time.perf_counter() - t0
    assert res.exit_code == 2
    assert "biomedclip" in res.output.lower() and "MEDMIX_MODEL_DIR" in res.output
    assert elapsed < 5.0  # the weights are checked before any data is read


def test_experts_that_fit_no_modality_fail_with_the_datasets_modalities(cohort):
    res = runner.invoke(app, ["run", "--experts", "grid", "--spec", str(cohort),
                              "--epochs", "1"])
    assert res.exit_code == 2
    assert "cxr (image)" in res.output and "demo (tabular)" in res.output
