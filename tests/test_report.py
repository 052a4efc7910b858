"""medmix report: run and sweep folders become a markdown page with plots."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from medmix_core.cli import app
from medmix_core.report import expected_calibration_error

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


def test_report_of_a_run_has_tables_ci_and_plots(tmp_path, synth_store_path):
    out = tmp_path / "r"
    res = runner.invoke(app, ["run", "--store", str(synth_store_path), "--epochs", "3",
                              "--d", "16", "--out", str(out), "--bootstrap", "50"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["report", str(out)])
    assert res.exit_code == 0, res.output
    text = (out / "report.md").read_text()
    assert "95% bootstrap CI" in text and "Expected calibration error" in text
    for png in ("reliability.png", "modality_weights.png", "router_weights.png"):
        assert (out / png).stat().st_size > 1000


def test_report_of_something_else_is_a_clear_error(tmp_path):
    res = runner.invoke(app, ["report", str(tmp_path)])
    assert res.exit_code == 2 and "neither a run folder" in res.output
