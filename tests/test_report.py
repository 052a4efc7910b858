"""medmix report: run and sweep folders become a markdown page with plots, clinical tables
(calibration, decision curves, subgroups) and a model card."""

from __future__ import annotations

import csv
import json
import shutil

import numpy as np
import pytest
from typer.testing import CliRunner

from medmix_core import clinical as C
from medmix_core.cli import app
from medmix_core.config import RunConfig
from medmix_core.errors import MedmixError
from medmix_core.report import render_report
from medmix_core.run_report import expected_calibration_error, read_run

runner = CliRunner()


def test_ece_matches_hand_computation():
    p = [0.05, 0.15, 0.85, 0.95]
    y = [0, 1, 1, 1]
    ece, bins = expected_calibration_error(p, y, n_bins=10)
    # bins: 0.05 -> y 0, 0.15 -> y 1, 0.85 -> 1, 0.95 -> 1
    expect = 0.25 * (0.05 + 0.85 + 0.15 + 0.05)
    assert ece == pytest.approx(expect)
    assert [b[2] for b in bins] == [1, 1, 1, 1]
    assert expected_calibration_error(np.full(100, 0.3), (np.arange(100) < 30))[0] == \
        pytest.approx(0.0)
    assert C.calibration_stats(p, y)["ece"] == pytest.approx(expect)


def test_report_of_a_run_has_tables_ci_and_plots(tmp_path, synth_store_path):
    out = tmp_path / "r"
    res = runner.invoke(app, ["run", "--store", str(synth_store_path), "--epochs", "3",
                              "--d", "16", "--out", str(out), "--bootstrap", "50"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    text = (out / "report.md").read_text()
    assert "95% bootstrap CI" in text and "| raw model |" in text and "ECE" in text
    assert "## Decision curve" in text and "## Subgroups" in text and "model_card.md" in text
    for png in ("reliability.png", "decision_curve.png", "subgroups.png",
                "modality_weights.png", "router_weights.png"):
        assert (out / png).stat().st_size > 1000


def test_report_of_something_else_is_a_clear_error(tmp_path):
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "neither a run folder" in res.output


@pytest.fixture(scope="module")
def attr_run(tmp_path_factory, synth_store_path):
    """A short real run on a copy of the synthetic store that declares two attributes."""
    from medmix_core.runner import run

    root = tmp_path_factory.mktemp("attr")
    store = root / "store"
    shutil.copytree(synth_store_path, store)
    manifest = json.loads((store / "manifest.json").read_text())
    n = len(manifest["sample_ids"])
    manifest["attributes"] = {
        "sex": [None if i % 40 == 0 else ("female" if i % 2 else "male") for i in range(n)],
        "site": ["tiny" if i % 25 == 0 else ("north" if i % 3 else "south") for i in range(n)]}
    (store / "manifest.json").write_text(json.dumps(manifest))
    out = root / "run"
    run(RunConfig(store=str(store), epochs=4, patience=10, d=16, seeds=[0, 1], bootstrap=20,
                  out=str(out), progress=False), log=lambda *_: None)
    return out


@pytest.mark.slow
def test_run_report_recalibrates_and_tabulates_from_the_run_files(attr_run):
    path = render_report(attr_run, recalibrate="temperature", thresholds="0.2,0.4", n_boot=30)
    text = path.read_text()
    clin = json.loads((attr_run / "clinical.json").read_text())
    run = read_run(attr_run)
    # the table's numbers are those of the test predictions the run wrote
    before = C.calibration_stats(run.probs[:, 0], run.labels[:, 0])
    assert clin["calibration"]["before"]["brier"] == pytest.approx(before["brier"])
    calib = C.load_calibration(attr_run)
    assert calib["method"] == "temperature" and calib["fitted_on"]["split"] == "val"
    assert calib["columns"][0]["n"] == len(run.store.splits["val"])
    after = C.calibration_stats(C.apply_calibration(run.probs[:, 0], calib), run.labels[:, 0])
    assert clin["calibration"]["after"]["ece"] == pytest.approx(after["ece"])
    assert "| after temperature (fitted on validation) |" in text
    # stated thresholds, with counts that add up
    assert [r["threshold"] for r in clin["thresholds"]] == [0.2, 0.4]
    t = clin["thresholds"][0]
    assert t["tp"] + t["fp"] + t["tn"] + t["fn"] == before["n"]
    assert "| 0.20 |" in text and "| 0.40 |" in text
    with open(attr_run / "decision_curve.csv") as fh:
        dca = list(csv.DictReader(fh))
    assert len(dca) == 99 and float(dca[0]["threshold"]) == 0.01
    # subgroups: declared attributes, unknown values, missingness patterns, small flags
    rows = {(r["attribute"], r["value"]): r for r in clin["subgroups"]["rows"]}
    assert {("sex", "female"), ("sex", "male"), ("sex", "unknown"), ("site", "tiny")} <= \
        set(rows)
    assert rows[("site", "tiny")]["small"] and "tiny **small**" in text
    assert any(a == "missing modalities" for a, _ in rows)
    assert sum(r["n"] for (a, _), r in rows.items() if a == "sex") == before["n"]
    assert all(g["better"] != "tiny" and g["worse"] != "tiny"
               for g in clin["subgroups"]["gaps"])
    # the model card is filled from the files
    card = (attr_run / "model_card.md").read_text()
    for head in ("## Source of data", "## Participants", "## Missing data", "## Outcome",
                 "## Predictors", "## Model and training", "## Performance",
                 "## Subgroups (fairness)", "## Limitations", "## Intended use"):
        assert head in card
    assert f"{run.store.n_samples} samples" in card and "recalibrated by `temperature`" in card
    n_female = sum(v == "female" for v in run.store.attributes()["sex"])
    assert f"female {n_female}" in card
    assert f"{run.metrics['test']['auroc']['mean']:.3f}" in card


@pytest.mark.slow
def test_recalibrate_none_removes_it_and_bad_options_fail_first(attr_run):
    quick = {"n_boot": 5, "model_card": False}
    render_report(attr_run, recalibrate="platt", **quick)
    assert C.load_calibration(attr_run)["method"] == "platt"
    render_report(attr_run, **quick)  # None keeps what the run holds
    assert C.load_calibration(attr_run)["method"] == "platt"
    render_report(attr_run, recalibrate="none", subgroups=False, model_card=False)
    assert C.load_calibration(attr_run) is None
    assert "## Subgroups" not in (attr_run / "report.md").read_text()
    with pytest.raises(MedmixError, match="--recalibrate 'beta'"):
        render_report(attr_run, recalibrate="beta")
    with pytest.raises(MedmixError, match="--thresholds"):
        render_report(attr_run, thresholds="0.2,2")


def test_report_without_the_store_keeps_what_the_csv_supports(attr_run, tmp_path):
    moved = tmp_path / "moved"
    shutil.copytree(attr_run, moved)
    cfg = json.loads((moved / "config.json").read_text())
    cfg["store"] = str(tmp_path / "gone")
    (moved / "config.json").write_text(json.dumps(cfg))
    text = render_report(moved, n_boot=5, model_card=False).read_text()
    assert "## Calibration" in text and "## Decision curve" in text
    assert "Subgroups skipped: the run's store is unavailable" in text
    with pytest.raises(MedmixError, match="unavailable"):
        render_report(moved, recalibrate="platt")
