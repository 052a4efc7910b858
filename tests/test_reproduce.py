"""medmix reproduce: every stage's folder, the report's tables against the sub-runs' files,
the dry-run plan, refusal of an occupied folder, and resume after an interruption."""

from __future__ import annotations

import json

import pytest
import typer
from typer.testing import CliRunner

from medmix_core import reproduce as rp
from medmix_core.config import RunConfig
from medmix_core.metrics import METRICS
from medmix_core.runs import RunFolderError, open_run, read_info

runner = CliRunner()
FUSERS = ["medmix", "meanavg"]


def _base(store, **kw) -> RunConfig:
    return RunConfig(store=str(store), dataset="synthetic", teacher="teacher", epochs=2, d=16,
                     bootstrap=30, seeds=[0, 1], progress=False, **kw)


def _quiet(*_a, **_k) -> None:
    pass


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A small store (2 modalities x 2 experts, a teacher): 13 sub-runs per reproduction."""
    from medmix_datasets.synthetic import write_synthetic_store

    return write_synthetic_store(tmp_path_factory.mktemp("rstore") / "s", n=240,
                                 n_modalities=2, dims=(8, 12), teacher_dim=8, seed=1).path


@pytest.fixture(scope="module")
def done(tmp_path_factory, store):
    """One uninterrupted reproduction of every stage, the external cohort included."""
    out = tmp_path_factory.mktemp("repro") / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(rp, "PROFILE_REPEATS", 2)  # latency is not what is tested here
        mp.setattr(rp, "PROFILE_WARMUP", 1)
        res = rp.reproduce(_base(store, external_test=str(store)), out,
                           fusers=FUSERS, train_one_fusers=["medmix"], log=_quiet,
                           progress=False)
    return out, res


def _section(md: str, start: str, end: str) -> str:
    return md[md.index(start):md.index(end)]


def test_every_stage_writes_ordinary_run_and_sweep_folders(done):
    out, res = done
    assert read_info(out)["kind"] == "reproduce" and read_info(out)["status"] == "complete"
    for rel in res["plan"]["runs"]:
        assert read_info(out / rel)["status"] == "complete", rel
        assert (out / rel / "metrics.json").is_file()
    open_run(out / "main" / "medmix")  # what predict / report / export open
    assert [r.split("/")[0] for r in res["plan"]["runs"]].count("train-one") == 6  # 2 x 3
    for sweep in ("train-one", "test-random"):
        rows = json.loads((out / sweep / "sweep.json").read_text())
        assert rows and all(r["n_seeds"] == 2 for r in rows)
        assert (out / sweep / "sweep_auroc.png").is_file()
    rates = sorted({r["rate"] for r in json.loads((out / "test-random" / "sweep.json")
                                                  .read_text()) if r["protocol"] != "natural"})
    assert rates == list(rp.TEST_RATES)
    # test-random reuses the main models: no run folder of its own
    assert not any((out / "test-random").glob("*/run.json"))
    for f in ("figures/ablations_auroc.png", "figures/efficiency_pareto.png",
              "efficiency/profile.json", "efficiency/efficiency.md", "report.json"):
        assert (out / f).is_file(), f
    variants = [r.split("/")[1] for r in res["plan"]["runs"] if r.startswith("ablations/")]
    assert variants == ["no-distill", "medmix-uniform", "medmix-best-expert", "keep-mod0",
                        "keep-mod1"]
    # the synthetic experts belong to no family the ablation drops: said, not failed
    skipped = {n for st, n, _ in res["plan"]["skipped"] if st == "ablations"}
    assert skipped == {"drop-general", "drop-domain", "drop-rag"}


def test_report_tables_hold_the_sub_runs_numbers(done):
    out, _ = done
    md = (out / "report.md").read_text()
    for title in ("## Table 1", "## Table 2", "## Table 3", "## Table 4", "## Table 5",
                  "## Table 6"):
        assert title in md
    t1 = _section(md, "## Table 1", "## Table 2")
    t4 = _section(md, "## Table 4", "## Table 5")
    t5 = _section(md, "## Table 5", "## Table 6")
    for f in FUSERS:
        m = json.loads((out / "main" / f / "metrics.json").read_text())
        row = next(line for line in t1.splitlines() if line.startswith(f"| {f} |"))
        for k in METRICS:
            assert f"{m['test'][k]['mean']:.3f} ± {m['test'][k]['std']:.3f}" in row
        lo, hi = m["test_ci95"]["auroc"]
        assert f"{m['test_ensemble']['auroc']:.3f} [{lo:.3f}, {hi:.3f}]" in t1
        ext = m["external"]["auroc"]
        assert f"| {f} | {ext['mean']:.3f} ± {ext['std']:.3f}" in t5
    for v in ("no-distill", "medmix-uniform", "keep-mod1"):
        m = json.loads((out / "ablations" / v / "metrics.json").read_text())
        row = next(line for line in t4.splitlines() if line.startswith(f"| {v} |"))
        assert f"{m['test']['auroc']['mean']:.3f} ± {m['test']['auroc']['std']:.3f}" in row
    sweep = json.loads((out / "train-one" / "sweep.json").read_text())
    cell = next(r for r in sweep if r["protocol"] == "train-one(mod1, p=0.5)")
    cfg = json.loads((out / "train-one" / "medmix" / "train-one_mod1__p_0.5" / "config.json")
                     .read_text())
    assert cfg["protocol"]["modality"] == "mod1" and cfg["protocol"]["rate"] == 0.5
    t2 = _section(md, "## Table 2", "## Table 3")
    assert f"{cell['auroc']['mean']:.3f} ± {cell['auroc']['std']:.3f}" in t2
    eff = json.loads((out / "report.json").read_text())["tables"]["efficiency"]
    assert [r["method"] for r in eff] == FUSERS and eff[0]["cost"] == pytest.approx(1.0)


def _app() -> typer.Typer:
    app = typer.Typer()
    app.command("reproduce")(rp.typer_command())

    @app.command("other")
    def other() -> None:  # a second command keeps "reproduce" a subcommand
        pass

    return app


def test_dry_run_prints_the_plan_and_writes_nothing(tmp_path, store):
    out = tmp_path / "plan"
    res = runner.invoke(_app(), ["reproduce", "--store", str(store), "--dataset",
                                 "synthetic", "--seeds", "2", "--fusers", "medmix,meanavg",
                                 "--train-one-fusers", "medmix", "--out", str(out),
                                 "--dry-run"])
    assert res.exit_code == 0, res.output
    assert "main         2 fusers x 2 seeds = 4 training jobs" in res.output
    assert "1 fusers x 2 modalities x 3 rates x 2 seeds = 12 training jobs" in res.output
    assert "skipped drop-rag" in res.output and "no-distill" in res.output
    assert not out.exists()


def test_default_fusers_skip_what_cannot_run_and_named_ones_fail(tmp_path, store):
    plan, _ = rp.make_plan(_base(store), tmp_path / "o", stages=["main"],
                           log=_quiet)
    assert plan.fusers[0] == "medmix" and "meanavg" in plan.fusers
    skipped = {n: why for st, n, why in plan.skipped if st == "main"}
    assert "onellm" in skipped and "onellm" in skipped["onellm"]  # no OneLLM embeddings
    assert not any(f.startswith("medmix-") for f in plan.fusers)  # those are ablations
    with pytest.raises(rp.ReproduceError, match="onellm"):
        rp.make_plan(_base(store), tmp_path / "o", fusers=["medmix", "onellm"],
                     stages=["main"], log=_quiet)
    with pytest.raises(rp.ReproduceError, match="Did you mean 'ablations'"):
        rp.make_plan(_base(store), tmp_path / "o", stages=["ablation"], log=_quiet)


def test_an_occupied_folder_is_refused_without_resume_or_overwrite(done, store):
    out, _ = done
    before = (out / "run.json").read_text()
    with pytest.raises(RunFolderError, match="already holds"):
        rp.reproduce(_base(store), out, fusers=FUSERS, log=_quiet, progress=False)
    res = runner.invoke(_app(), ["reproduce", "--store", str(store), "--out",
                                 str(out), "--no-progress"])
    assert res.exit_code == 2 and "--overwrite" in res.output
    with pytest.raises(rp.ReproduceError, match="contradict"):
        rp.reproduce(_base(store), out, resume=True, overwrite=True, log=_quiet)
    assert (out / "run.json").read_text() == before


class Interrupt(Exception):
    pass


def test_resume_keeps_finished_stages_and_ends_with_the_same_tables(done, tmp_path,
                                                                    store):
    ref_out, _ = done
    out = tmp_path / "resumed"
    stages = ["main", "train-one"]
    base = _base(store, external_test=str(store))  # as the reference, so Table 1 matches
    kw = dict(fusers=FUSERS, train_one_fusers=["medmix"], stages=stages, progress=False)

    def stop_after_main(line: str, *_a) -> None:
        if str(line).startswith("== stage train-one"):
            raise Interrupt("stopped after the first stage")

    with pytest.raises(Interrupt):
        rp.reproduce(base, out, log=stop_after_main, **kw)
    assert read_info(out)["status"] == "failed"
    started = {f: read_info(out / "main" / f)["started"] for f in FUSERS}
    with pytest.raises(RunFolderError, match="another configuration"):
        rp.reproduce(base, out, resume=True, log=_quiet, **{**kw, "stages": ["main"]})
    res = rp.reproduce(base, out, resume=True, log=_quiet, **kw)
    assert res["reused"] == [f"main/{f}" for f in FUSERS]
    assert len(res["trained"]) == 6 and all(r.startswith("train-one/") for r in res["trained"])
    assert {f: read_info(out / "main" / f)["started"] for f in FUSERS} == started
    info = read_info(out)
    assert info["status"] == "complete" and info["resumes"] == 1
    md, ref = (out / "report.md").read_text(), (ref_out / "report.md").read_text()
    assert _section(md, "## Table 1", "## Table 3") == _section(ref, "## Table 1", "## Table 3")


def test_the_progress_bar_runs_on_stderr():
    bar = rp._Progress(3, True)
    bar.describe("main medmix")
    bar.set(2)
    bar.set(5)
    assert bar.done == 3
    bar.close()
