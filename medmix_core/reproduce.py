"""``medmix reproduce``: the paper's whole protocol on one store, in one command, one report.

Stages (each writes ordinary run / sweep folders under ``out``, so ``medmix report``,
``predict`` and ``export`` work on them):

* ``main`` (Table 1): MedMIX and every baseline fuser that can run on the store
  (``out/main/<fuser>``), the seeds of the config, bootstrap CIs of the seed ensemble. A
  fuser that cannot run here (e.g. ``adacomed`` without a teacher for every row, ``onellm``
  without OneLLM embeddings) is skipped with its reason when the list is the default, and
  is an error when it was asked for. Every other stage builds on these runs.
* ``train-one`` (Table 2): protocol ``train-one`` at p = 0.3, 0.5, 0.7 for each modality
  (``out/train-one/<fuser>/<cell>``, a sweep folder); p = 0 is the main run.
* ``test-random`` (Table 3): protocol ``test-random`` at r = 0.1 ... 1.0, evaluated on the
  saved models of the main runs (no training; ``out/test-random``, a sweep folder).
* ``ablations`` (Table 4): MedMIX without distillation, with a uniform mean, with the best
  single expert, with each expert family dropped, with each modality alone
  (``out/ablations/<variant>``); a variant the store cannot express is skipped with why.
* ``external`` (Table 5): the main runs evaluated on ``base.external_test``.
* ``efficiency`` (Table 6): parameters, MACs, peak memory and latency of every main fuser
  (:func:`medmix_core.profile.profile_fuser`) and the efficiency table
  (:func:`medmix_core.efficiency.efficiency_table`), in ``out/efficiency``.

``out`` is a results folder of kind ``reproduce`` (:mod:`medmix_core.runs`): refused when
occupied unless ``overwrite`` (cleared first) or ``resume`` (same configuration only:
finished sub-runs are kept, unfinished ones continued). The report is ``out/report.md``
with ``out/report.json`` (the same tables as data) and the figures.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as dt
import difflib
import io
import json
import math
import shlex
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from medmix_core.config import RunConfig
from medmix_core.errors import MedmixError
from medmix_core.metrics import METRICS, bootstrap_ci
from medmix_core.runs import RUN_FILE, RunFolder, read_info
from medmix_core.store import atomic_write_bytes, atomic_write_text

#: the stages, in the order they run (``main`` always runs: every other stage needs it)
STAGES = ("main", "train-one", "test-random", "ablations", "external", "efficiency")
#: train-time missing rates of Table 2 (p of ``train-one``)
TRAIN_RATES = (0.3, 0.5, 0.7)
#: test-time missing rates of Table 3 (r of ``test-random``)
TEST_RATES = tuple(round(0.1 * i, 1) for i in range(1, 11))
#: expert families an ablation drops one at a time
FAMILIES = ("general", "domain", "rag")
#: the method every table is read against
REFERENCE = "medmix"
#: default bootstrap resamples of ``medmix reproduce`` (``medmix run`` defaults to 200)
DEFAULT_BOOTSTRAP = 1000
#: timed batches per fuser in the efficiency stage (after PROFILE_WARMUP untimed ones)
PROFILE_REPEATS = 20
PROFILE_WARMUP = 5


class ReproduceError(MedmixError):
    """A reproduction that cannot run as asked (bad stages, fusers, or resume mismatch)."""


# ------------------------------------------------------------------------------ the plan
@dataclass
class SubRun:
    """One training sub-run: an ordinary ``medmix run`` folder under ``out``.

    Attributes:
        stage: the stage it belongs to.
        name: its label in the tables (fuser, protocol cell or ablation variant).
        rel: its folder relative to ``out``.
        cfg: its configuration (``out`` set to the folder).
        fuser: the fuser trained.
        change: for ablations, what differs from the main MedMIX run.
        protocol: for train-one cells, the protocol as a dict.
    """

    stage: str
    name: str
    rel: str
    cfg: RunConfig
    fuser: str
    change: str = ""
    protocol: dict[str, Any] | None = None

    @property
    def jobs(self) -> int:
        """Training jobs: one per seed."""
        return len(self.cfg.seeds)


@dataclass
class Plan:
    """What a reproduction will do: stages, sub-runs, skips, evaluations.

    Attributes:
        base: the resolved base config (store and committee pinned).
        out: the reproduction folder.
        stages: the stages that run, in order.
        fusers: the main fusers (MedMIX first).
        train_one_fusers: the fusers of the train-one stage.
        modalities: the store's modalities used by the runs.
        runs: every training sub-run, in execution order.
        skipped: (stage, name, reason) of what was left out.
        notes: lines said with the plan (e.g. the store is not extracted yet).
    """

    base: RunConfig
    out: Path
    stages: list[str]
    fusers: list[str]
    train_one_fusers: list[str]
    modalities: list[str]
    runs: list[SubRun] = field(default_factory=list)
    skipped: list[tuple[str, str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def stage_runs(self, stage: str) -> list[SubRun]:
        return [r for r in self.runs if r.stage == stage]

    def jobs(self, stage: str | None = None) -> int:
        """Planned training jobs (fuser x seed x cell), of one stage or in all."""
        return sum(r.jobs for r in self.runs if stage is None or r.stage == stage)

    def describe(self) -> str:
        """The plan as lines of text: store, stages with their job counts, skips."""
        b = self.base
        seeds = list(b.seeds)
        lines = [f"Reproduce plan -> {self.out}",
                 f"  store {b.store}; experts {', '.join(b.experts or ['all in the store'])}; "
                 f"teacher {b.teacher or 'none'}; seeds {seeds}; bootstrap {b.bootstrap}; "
                 f"epochs <= {b.epochs}, patience {b.patience}"]
        lines += [f"  note: {n}" for n in self.notes]
        s, m = len(seeds), len(self.modalities)
        for stage in STAGES:
            if stage not in self.stages:
                lines.append(f"  {stage:<12} not selected")
                continue
            if stage == "main":
                detail = (f"{len(self.fusers)} fusers x {s} seeds = {self.jobs(stage)} "
                          f"training jobs ({', '.join(self.fusers)})")
            elif stage == "train-one":
                detail = (f"{len(self.train_one_fusers)} fusers x {m} modalities x "
                          f"{len(TRAIN_RATES)} rates x {s} seeds = {self.jobs(stage)} training "
                          f"jobs ({', '.join(self.train_one_fusers)}; p = "
                          f"{', '.join(f'{p:g}' for p in TRAIN_RATES)})")
            elif stage == "test-random":
                detail = (f"no training: {len(self.fusers)} fusers x {s} saved seeds x "
                          f"{len(TEST_RATES)} rates evaluated (r = {TEST_RATES[0]:g} .. "
                          f"{TEST_RATES[-1]:g})")
            elif stage == "ablations":
                runs = self.stage_runs(stage)
                detail = (f"{len(runs)} variants x {s} seeds = {self.jobs(stage)} training "
                          f"jobs ({', '.join(r.name for r in runs) or 'none'})")
            elif stage == "external":
                detail = (f"no training: the main runs evaluated on {b.external_test}"
                          if b.external_test else "not run: no external cohort given")
            else:
                detail = (f"no training: {len(self.fusers)} fusers profiled (params, MACs, "
                          f"peak memory, latency)")
            lines.append(f"  {stage:<12} {detail}")
            for st, name, why in self.skipped:
                if st == stage:
                    lines.append(f"  {'':<12}   skipped {name}: {why}")
        lines.append(f"  {'total':<12} {self.jobs()} training jobs")
        return "\n".join(lines)

    def to_json(self) -> dict[str, Any]:
        return {"stages": self.stages, "fusers": self.fusers,
                "train_one_fusers": self.train_one_fusers, "modalities": self.modalities,
                "jobs": {st: self.jobs(st) for st in self.stages}, "total_jobs": self.jobs(),
                "runs": [r.rel for r in self.runs],
                "skipped": [list(s) for s in self.skipped], "notes": self.notes}


def _parse_stages(stages: list[str] | None) -> list[str]:
    if not stages:
        return list(STAGES)
    for s in stages:
        if s not in STAGES:
            close = difflib.get_close_matches(s, STAGES, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else ""
            raise ReproduceError(f"Unknown stage {s!r}; the stages are {', '.join(STAGES)}."
                                 f"{hint}")
    # main is the reference of every other stage
    return [s for s in STAGES if s in stages or s == "main"]


def default_fusers() -> list[str]:
    """MedMIX and every registered baseline: the registered fusers not named ``medmix*``
    (those are MedMIX's own variants, which the ablation stage covers)."""
    from medmix_core.plugins import registry

    names = list(registry().entries["fusers"])
    return [REFERENCE] + [n for n in names if not n.startswith("medmix")]


def _pin(base: RunConfig, seeds: list[int] | None, log) -> tuple[RunConfig, Any]:
    """The base config with seeds, store and committee fixed once for every sub-run."""
    from medmix_core import runner
    from medmix_core.plugins import get_fuser

    if seeds is not None:
        base = base.model_copy(update={"seeds": list(seeds)})
    existing = runner.existing_store(base)
    base = runner.choose_experts(base, get_fuser(REFERENCE), existing, log)
    store = runner.ensure_store(base, log, existing)
    experts = list(base.experts) if base.experts else store.expert_names()
    return base.model_copy(update={"store": str(store.path.resolve()), "experts": experts,
                                   "out": None}), store


def _modalities(base: RunConfig, store) -> list[str]:
    """The store's modalities that hold a chosen expert (after --keep-modalities)."""
    from medmix_core.runner import select_experts

    used = set(select_experts(base, store))
    keep = base.keep_modalities
    return [m.name for m in store.modalities
            if (not keep or m.name in keep)
            and any(e.name in used for e in store.experts.get(m.name, []))]


def _check(cfg: RunConfig, where: Path) -> str | None:
    """None when ``cfg`` passes ``medmix run``'s checks (nothing is written), else why not."""
    from medmix_core import runner

    try:
        with contextlib.redirect_stdout(io.StringIO()):
            runner.run(cfg.model_copy(update={"out": str(where)}), log=lambda *a: None,
                       check_only=True)
    except MedmixError as exc:
        return str(exc).split("\n")[0]
    return None


def _ablation_variants(base: RunConfig, store, modalities: list[str]
                       ) -> tuple[list[tuple[str, dict[str, Any], str]], list[tuple[str, str]]]:
    """(name, config update, what changed) of every structural ablation, and the skipped
    ones with their reason."""
    from medmix_core.runner import select_experts

    variants: list[tuple[str, dict[str, Any], str]] = []
    skipped: list[tuple[str, str]] = []
    if base.distill_on:
        variants.append(("no-distill", {"distill": False},
                         f"--no-distill (teacher {base.teacher} not used)"))
    else:
        skipped.append(("no-distill", "MedMIX trains without distillation here (no teacher "
                                      "given), so the main run is already that ablation"))
    variants.append(("medmix-uniform", {"fuser": "medmix-uniform"},
                     "uniform mean over experts and modalities (no router, no scorer)"))
    variants.append(("medmix-best-expert", {"fuser": "medmix-best-expert"},
                     "one expert per modality, chosen on validation"))
    used = select_experts(base, store)
    fam = {e.name: e.family for es in store.experts.values() for e in es}
    present = {fam.get(n) for n in used}
    for f in FAMILIES:
        name = f"drop-{f}"
        if f not in present:
            skipped.append((name, f"no expert of family {f!r} in the committee "
                                  f"({', '.join(f'{n}: {fam.get(n)}' for n in used)})"))
        elif all(fam.get(n) == f for n in used):
            skipped.append((name, f"every expert of the committee is of family {f!r}; "
                                  f"dropping it leaves none"))
        else:
            gone = [n for n in used if fam.get(n) == f]
            variants.append((name, {"drop_experts": [*base.drop_experts, f]},
                             f"--drop-experts {f} ({', '.join(gone)})"))
    if len(modalities) > 1:
        for m in modalities:
            variants.append((f"keep-{m}", {"keep_modalities": [m]}, f"--keep-modalities {m}"))
    else:
        skipped.append(("keep-<modality>", "the runs have a single modality"))
    return variants, skipped


def make_plan(base: RunConfig, out: str | Path, fusers: list[str] | None = None,
              seeds: list[int] | None = None, stages: list[str] | None = None,
              train_one_fusers: list[str] | None = None, log=print,
              extract: bool = True) -> tuple[Plan, Any]:
    """Resolve the store and committee, check every sub-run, and list the jobs.

    Nothing is written into ``out``. With ``extract=False`` (a dry run) a store that is
    absent or lacks the committee is not extracted: the plan is built from the dataset's
    declared modalities and says that the fusers are checked when the run starts.

    Args:
        base: the run configuration every sub-run starts from.
        out: the reproduction folder.
        fusers: the main fusers; None = MedMIX and every registered baseline that can run on
            the store (the others are skipped with their reason). MedMIX is always included.
        seeds: seeds of every training (default ``base.seeds``).
        stages: stages to run (default all); ``main`` always runs.
        train_one_fusers: fusers of the train-one stage (default: the main fusers, as in
            the paper); each must be a main fuser.
        log: where messages go.
        extract: extract what the store lacks (False: plan without extracting).
    Returns:
        (the plan, the opened store or None when not extracted).
    Raises:
        ReproduceError: an unknown stage or fuser, a requested fuser that cannot run here.
    """
    from medmix_core import runner
    from medmix_core.plugins import get_fuser

    out = Path(out)
    stage_list = _parse_stages(stages)
    asked = fusers is not None
    names = list(dict.fromkeys(fusers)) if asked else default_fusers()
    for f in names:
        get_fuser(f)  # unknown names fail first, with close matches
    notes: list[str] = []
    if REFERENCE not in names:
        names.insert(0, REFERENCE)
        notes.append(f"{REFERENCE} added to the fusers: every table is read against it")
    names = [REFERENCE] + [f for f in names if f != REFERENCE]
    t1 = names if train_one_fusers is None else list(dict.fromkeys(train_one_fusers))
    bad = [f for f in t1 if f not in names]
    if bad:
        raise ReproduceError(f"train-one fusers {bad} are not among the main fusers {names}; "
                             f"add them to --fusers (train-one reads its p = 0 row from the "
                             f"main run).")
    if base.bootstrap == 0:
        notes.append("bootstrap 0: no confidence intervals")
    if not extract:
        store = runner.existing_store(base.model_copy(update={"seeds": list(seeds or base.seeds)}))
        complete = store is not None and (not base.experts or set(base.experts)
                                          <= set(store.expert_names())) \
            and (not base.teacher or base.teacher in store.teacher_names())
        if not complete:
            return _light_plan(base, out, names, t1, seeds, stage_list, notes, asked), None
    pinned, store = _pin(base, seeds, log)
    modalities = _modalities(pinned, store)
    plan = Plan(pinned, out, stage_list, [], [], modalities, notes=notes)
    check_dir = out / ".check-not-written"
    main_cfg = {}
    for f in names:
        cfg = pinned.model_copy(update={"fuser": f})
        why = _check(cfg, check_dir / f)
        if why is None:
            main_cfg[f] = cfg
        elif asked or f == REFERENCE:
            raise ReproduceError(f"Fuser {f!r} cannot run on store {pinned.store}: {why}")
        else:
            plan.skipped.append(("main", f, why))
    plan.fusers = list(main_cfg)
    plan.train_one_fusers = [f for f in t1 if f in main_cfg]
    for f, cfg in main_cfg.items():
        plan.runs.append(SubRun("main", f, f"main/{f}", cfg.model_copy(
            update={"out": str(out / "main" / f)}), f))
    if "train-one" in stage_list:
        from medmix_core.protocols import describe, parse_protocols
        from medmix_core.sweep import _slug

        protos = parse_protocols("train-one", list(TRAIN_RATES), modalities)
        for f in plan.train_one_fusers:
            for p in protos:
                label = describe(p)
                rel = f"train-one/{f}/{_slug(label)}"
                plan.runs.append(SubRun("train-one", label, rel, main_cfg[f].model_copy(
                    update={"protocol": p.model_dump(), "out": str(out / rel),
                            "external_test": None, "bootstrap": 0}), f,
                    protocol=p.model_dump()))
    if "ablations" in stage_list:
        variants, skipped = _ablation_variants(pinned, store, modalities)
        plan.skipped += [("ablations", n, why) for n, why in skipped]
        for name, update, change in variants:
            cfg = main_cfg[REFERENCE].model_copy(update={**update, "external_test": None})
            why = _check(cfg, check_dir / name)
            if why is not None:
                plan.skipped.append(("ablations", name, why))
                continue
            rel = f"ablations/{name}"
            plan.runs.append(SubRun("ablations", name, rel, cfg.model_copy(
                update={"out": str(out / rel)}), cfg.fuser, change=change))
    return plan, store


def _light_plan(base: RunConfig, out: Path, names: list[str], t1: list[str],
                seeds: list[int] | None, stage_list: list[str], notes: list[str],
                asked: bool) -> Plan:
    """A dry-run plan without a store: modalities from the dataset plugin, fusers unchecked."""
    from medmix_core.plugins import get_dataset

    b = base.model_copy(update={"seeds": list(seeds or base.seeds)})
    try:
        ds = get_dataset(b.dataset)(b.source, **(b.dataset_options or {}))
        mods = [m.name for m in ds.modalities()]
    except (MedmixError, OSError) as exc:
        raise ReproduceError(f"Dry run: no store yet and the dataset {b.dataset!r} cannot list "
                             f"its modalities ({exc}).") from exc
    if b.keep_modalities:
        mods = [m for m in mods if m in b.keep_modalities]
    notes = notes + [f"no complete store at {b.store or 'the default path'} yet: it is "
                     f"extracted first, and each fuser is checked then"
                     + ("" if asked else " (baselines that cannot run are skipped)")]
    plan = Plan(b, out, stage_list, names, t1, mods, notes=notes)
    for f in names:
        plan.runs.append(SubRun("main", f, f"main/{f}", b.model_copy(update={"fuser": f}), f))
    if "train-one" in stage_list:
        for f in t1:
            for m in mods:
                for p in TRAIN_RATES:
                    plan.runs.append(SubRun("train-one", f"train-one({m}, p={p:g})",
                                            f"train-one/{f}/{m}-{p:g}", b, f))
    if "ablations" in stage_list:
        n = 2 + (1 if b.distill_on else 0) + (len(mods) if len(mods) > 1 else 0)
        for i in range(n):
            plan.runs.append(SubRun("ablations", f"variant {i + 1}", f"ablations/{i}", b,
                                    REFERENCE))
        plan.notes.append("ablations: the expert-family variants depend on the store's "
                          "families and are counted when it exists")
    return plan


# ----------------------------------------------------------------------------- progress
class _Progress:
    """One rich bar over the planned training jobs, on stderr, with an ETA."""

    def __init__(self, total: int, enabled: bool) -> None:
        self.total = total
        self.done = 0
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import (
                BarColumn,
                MofNCompleteColumn,
                Progress,
                TextColumn,
                TimeElapsedColumn,
                TimeRemainingColumn,
            )

            # jobs take tens of seconds: estimate the speed over a long window
            self._bar = Progress(TextColumn("{task.description}"), BarColumn(),
                                 MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("ETA"), TimeRemainingColumn(),
                                 console=Console(stderr=True), speed_estimate_period=3600)
            self._task = self._bar.add_task("reproduce", total=max(total, 1))
            self._bar.start()

    def describe(self, text: str) -> None:
        if self._bar is not None:
            self._bar.update(self._task, description=text)

    def set(self, done: int) -> None:
        self.done = min(done, self.total)
        if self._bar is not None:
            self._bar.update(self._task, completed=self.done)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def _seed_tracker(bar: _Progress, label: str, start: int, jobs: int):
    """A tracker that moves the bar one job per finished seed of a sub-run."""
    from medmix_core.tracking import Tracker

    class SeedCounter(Tracker):
        name = "progress"

        def __init__(self) -> None:
            self.seeds: set[int] = set()

        def open(self, run_dir, config) -> None:
            pass

        def log_epoch(self, seed, record) -> None:
            if seed not in self.seeds:  # a new seed: the ones before it are done
                self.seeds.add(seed)
                bar.set(start + min(len(self.seeds) - 1, jobs))
            bar.describe(f"{label} seed {seed} epoch {record.get('epoch', '?')}")

        def log_final(self, metrics, files=()) -> None:
            bar.set(start + jobs)

        def close(self, status: str = "FINISHED") -> None:
            pass

    return SeedCounter()


# ------------------------------------------------------------------------------ running
def _run_sub(sub: SubRun, resume: bool, log, tracker) -> tuple[dict[str, Any], bool]:
    """Train one sub-run; when resuming, a finished one is reused and an unfinished one
    continues from its checkpoints (:func:`medmix_core.runner.run`). (metrics, trained)."""
    from medmix_core import runner

    path = Path(sub.cfg.out)
    finished = resume and (path / RUN_FILE).is_file() \
        and read_info(path).get("status") == "complete"
    metrics = runner.run(sub.cfg, log, tracker=tracker, resume=resume)
    return metrics, not finished


def _stage_header(log, stage: str, plan: Plan) -> None:
    log(f"== stage {stage}: {plan.jobs(stage)} training jobs")


def request(base: RunConfig, fusers: list[str] | None, seeds: list[int] | None,
            stages: list[str] | None, train_one_fusers: list[str] | None) -> dict[str, Any]:
    """What a reproduction was asked, as given: a resumed one must have been asked the same."""
    from medmix_core.runs import request_of

    return {"base": request_of(base), "fusers": fusers, "seeds": seeds,
            "stages": _parse_stages(stages), "train_one_fusers": train_one_fusers}


def reproduce(base: RunConfig, out: Path, fusers: list[str] | None = None,
              seeds: list[int] | None = None, stages: list[str] | None = None,
              resume: bool = False, overwrite: bool = False, log=print,
              progress: bool = True, train_one_fusers: list[str] | None = None) -> dict:
    """Run the paper's protocol on ``base``'s store and write ``out/report.md``.

    Args:
        base: the configuration every sub-run starts from (store, experts, teacher,
            training settings, ``bootstrap``, ``external_test``).
        out: the reproduction folder (kind ``reproduce``).
        fusers: main fusers (default: MedMIX and every baseline that can run here).
        seeds: seeds of every training (default ``base.seeds``).
        stages: stages to run (default all of :data:`STAGES`; ``main`` always runs).
        resume: continue a reproduction of the same settings in ``out``: finished sub-runs
            are reused, unfinished ones continued.
        overwrite: delete what ``out`` holds first.
        log: where messages go (the plan first).
        progress: one progress bar over the planned training jobs, on stderr.
        train_one_fusers: fusers of the train-one stage (default: the main fusers).
    Returns:
        ``{"out", "report", "plan", "trained", "reused", "stage_seconds", "tables"}``.
    Raises:
        ReproduceError: bad stages or fusers, a resume of other settings.
        RunFolderError: ``out`` occupied without ``resume`` or ``overwrite``.
    """
    out = Path(out)
    if overwrite and resume:
        raise ReproduceError("--overwrite and --resume contradict each other: --resume keeps "
                             "the finished sub-runs, --overwrite deletes them. Pass one.")
    asked = request(base, fusers, seeds, stages, train_one_fusers)
    folder = RunFolder.prepare(out, "reproduce", overwrite, resume=resume, request=asked)
    plan, store = make_plan(base, out, fusers, seeds, stages, train_one_fusers, log)
    log(plan.describe())
    folder.start(seeds=list(plan.base.seeds), plan=plan.to_json())
    resume = folder.resuming
    info = folder.info()
    seconds: dict[str, float] = dict(info.get("stage_seconds", {}))
    trained: list[str] = []
    reused: list[str] = []
    results: dict[str, dict[str, Any]] = {}
    bar = _Progress(plan.jobs(), progress)
    t_start = time.perf_counter()
    total_before = seconds.get("total", 0.0)

    def clock(stage: str, before: float, t0: float) -> None:
        # recorded after every sub-run, so an interrupted invocation's time is counted too
        seconds[stage] = round(before + time.perf_counter() - t0, 1)
        seconds["total"] = round(total_before + time.perf_counter() - t_start, 1)
        folder.update(stage_seconds=seconds)

    try:
        done = 0
        for stage in plan.stages:
            t0, before = time.perf_counter(), seconds.get(stage, 0.0)
            _stage_header(log, stage, plan)
            for sub in plan.stage_runs(stage):
                bar.describe(f"{stage} {sub.name}")
                tracker = _seed_tracker(bar, f"{stage} {sub.name}", done, sub.jobs)
                metrics, was_trained = _run_sub(sub, resume, log, tracker)
                results[sub.rel] = metrics
                (trained if was_trained else reused).append(sub.rel)
                done += sub.jobs
                bar.set(done)
                clock(stage, before, t0)
            if stage == "train-one":
                _write_train_one(plan, results)
            elif stage == "test-random":
                _write_test_random(plan, store)
            elif stage == "efficiency":
                _efficiency(plan, resume, log)
            clock(stage, before, t0)
            finished = [*dict.fromkeys([*folder.info().get("finished_stages", []), stage])]
            folder.update(finished_stages=finished)
            log(f"== stage {stage}: done in {time.perf_counter() - t0:.1f} s")
        bar.close()
        tables = build_tables(plan, results)
        report = write_report(plan, tables, folder.info(), seconds)
        folder.finish()
    except BaseException as exc:
        bar.close()
        if isinstance(exc, KeyboardInterrupt) or trained or reused or folder.resuming:
            # finished sub-runs are kept for --resume
            folder.update(status="interrupted" if isinstance(exc, KeyboardInterrupt)
                          else "failed", error=str(exc)[:500])
            folder.release()
        else:
            folder.abort(exc)
        raise
    return {"out": str(out), "report": str(report), "plan": plan.to_json(),
            "trained": trained, "reused": reused, "stage_seconds": seconds, "tables": tables}


# ------------------------------------------------------------------- stage outputs
def _main_dir(plan: Plan, fuser: str) -> Path:
    return plan.out / "main" / fuser


def _row(fuser: str, label: str, rate: float, modality: str | None,
         per_seed: list[dict[str, Any]], split: str = "test") -> dict[str, Any]:
    from medmix_core.sweep import _row as sweep_row

    return sweep_row(fuser, label, rate, modality, per_seed, split)


def _write_train_one(plan: Plan, results: dict[str, dict[str, Any]]) -> None:
    """``out/train-one`` as a sweep folder: sweep.json/md/csv and the curves."""
    from medmix_core.sweep import write_sweep

    rows = []
    for f in plan.train_one_fusers:
        rows.append(_row(f, "natural", 0.0, None, results[f"main/{f}"]["per_seed"]))
        for sub in plan.stage_runs("train-one"):
            if sub.fuser == f:
                p = sub.protocol or {}
                rows.append(_row(f, sub.name, p.get("rate", 0.0), p.get("modality"),
                                 results[sub.rel]["per_seed"]))
    with contextlib.redirect_stdout(io.StringIO()):
        write_sweep(rows, plan.out / "train-one", "train-one")


def _write_test_random(plan: Plan, store) -> None:
    """``out/test-random``: the saved main models under every rate (no training)."""
    import torch

    from medmix_core.protocols import describe, parse_protocols
    from medmix_core.runner import cohort_tensors, is_store, load_model, load_tensors
    from medmix_core.store import EmbeddingStore
    from medmix_core.sweep import _evaluate_saved, write_sweep
    from medmix_core.training import resolve_device

    device = resolve_device(plan.base.device)
    rows = []
    for f in plan.fusers:
        run_dir = _main_dir(plan, f)
        cfg = RunConfig(**json.loads((run_dir / "config.json").read_text("utf-8")))
        metrics = json.loads((run_dir / "metrics.json").read_text("utf-8"))
        from medmix_core.plugins import get_fuser

        tensors = load_tensors(cfg, store, teacher_needed=get_fuser(f).reads_teacher)
        protos = parse_protocols("test-random", list(TEST_RATES), tensors.modalities)
        test_rows = torch.as_tensor(store.splits["test"], dtype=torch.long)
        rows.append(_row(f, "natural", 0.0, None, metrics["per_seed"]))
        for label, per_seed in _evaluate_saved(run_dir, tensors, test_rows, protos,
                                               device).items():
            p = next(q for q in protos if describe(q) == label)
            rows.append(_row(f, label, p.rate, None, per_seed))
        ext = plan.base.external_test
        if ext and is_store(ext) and "external" in plan.stages:
            spec = load_model(RunFolder(run_dir).finished_seeds()[0])[0].spec
            teacher = cfg.teacher if get_fuser(f).reads_teacher else None
            et = cohort_tensors(EmbeddingStore.open(ext), spec, cfg.task, teacher)
            if "external_per_seed" in metrics:
                rows.append(_row(f, "natural", 0.0, None, metrics["external_per_seed"],
                                 split="external"))
            for label, per_seed in _evaluate_saved(run_dir, et, torch.arange(et.n), protos,
                                                   device).items():
                p = next(q for q in protos if describe(q) == label)
                rows.append(_row(f, label, p.rate, None, per_seed, split="external"))
    with contextlib.redirect_stdout(io.StringIO()):
        write_sweep(rows, plan.out / "test-random", "test-random")


def _efficiency(plan: Plan, resume: bool, log) -> None:
    """``out/efficiency``: profiles of the main fusers and the efficiency table."""
    from medmix_core.efficiency import efficiency_table, write_efficiency
    from medmix_core.profile import load_profiles, prepare_tensors, profile_fuser, write_profile

    folder = plan.out / "efficiency"
    profiles: dict[str, dict[str, Any]] = {}
    if resume and (folder / "profile.json").is_file():
        profiles = load_profiles(folder)
        if sorted(profiles) != sorted(plan.fusers):
            profiles = {}  # another fuser list: measure again
    if not profiles:
        ref_cfg = RunConfig(**json.loads((_main_dir(plan, REFERENCE) / "config.json")
                                         .read_text("utf-8")))
        with contextlib.redirect_stdout(io.StringIO()):
            tensors = prepare_tensors(ref_cfg, log)
        for f in plan.fusers:
            run_dir = _main_dir(plan, f)
            cfg = RunConfig(**json.loads((run_dir / "config.json").read_text("utf-8")))
            meta = json.loads((RunFolder(run_dir).finished_seeds()[0] / "model.json")
                              .read_text("utf-8"))
            # the options the run trained with (e.g. the expert chosen on validation)
            opts = {k: v for k, v in meta["fuser_options"].items() if k not in ("d", "dropout")}
            log(f"profiling {f}")
            profiles[f] = profile_fuser(f, tensors, cfg.model_copy(update={"fuser_options":
                                                                           opts}),
                                        device=plan.base.device, repeats=PROFILE_REPEATS,
                                        warmup=PROFILE_WARMUP)
        write_profile([profiles[f] for f in plan.fusers], folder)
    rows = efficiency_table({f: _main_dir(plan, f) for f in plan.fusers}, profiles, REFERENCE)
    write_efficiency(rows, folder, REFERENCE)


# ------------------------------------------------------------------------------ tables
def _ms(d: dict[str, Any] | None) -> str:
    if not d or d.get("mean") is None or (isinstance(d["mean"], float) and math.isnan(d["mean"])):
        return "undefined"
    return f"{d['mean']:.3f} ± {d['std']:.3f}"


def _num(v: Any, digits: int = 3) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "undefined"
    return f"{v:.{digits}f}"


def _ci(point: Any, ci: list[float] | None) -> str:
    if ci is None:
        return _num(point)
    return f"{_num(point)} [{_num(ci[0])}, {_num(ci[1])}]"


def _read_metrics(path: Path) -> dict[str, Any]:
    return json.loads((path / "metrics.json").read_text("utf-8"))


def _external_ci(run_dir: Path, metrics: dict[str, Any], n_boot: int
                 ) -> dict[str, list[float]] | None:
    """95% bootstrap CIs of the seed ensemble on the external cohort (from its predictions)."""
    import torch

    path = run_dir / "external_predictions.csv"
    if not n_boot or not path.is_file():
        return None
    with path.open(newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    if not rows:
        return None
    pcols = ["prob"] if "prob" in rows[0] else sorted(
        (c for c in rows[0] if c.startswith("prob_") and not c.startswith("prob_seed")),
        key=lambda c: int(c[5:]))
    lcols = ["label"] if "label" in rows[0] else sorted(
        (c for c in rows[0] if c.startswith("label_")), key=lambda c: int(c[6:]))
    probs = torch.tensor([[float(r[c]) for c in pcols] for r in rows])  # [N, C]
    lab = [[float(r[c]) if r[c] != "" else math.nan for c in lcols] for r in rows]
    labels = torch.tensor(lab)  # [N, L], NaN = unknown
    task = metrics.get("task_type", "binary")
    if task == "multiclass":
        labels = labels[:, 0]
        known = ~torch.isnan(labels)
    else:
        known = ~torch.isnan(labels).all(dim=1)
    info = metrics.get("seed_info") or []
    thr = sum(s["threshold"] for s in info) / len(info) if info else 0.5
    return bootstrap_ci(probs[known], labels[known], task, thr, n_boot, 0)


def build_tables(plan: Plan, results: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The report's tables as data, read from the sub-runs' files (metrics.json, sweep.json,
    efficiency.csv): what report.md renders and report.json holds."""
    tables: dict[str, Any] = {"skipped": [list(s) for s in plan.skipped]}
    main = []
    for f in plan.fusers:
        m = _read_metrics(_main_dir(plan, f))
        main.append({"method": f, "folder": f"main/{f}", "test": m["test"],
                     "ensemble": {k: m.get("test_ensemble", {}).get(k) for k in METRICS},
                     "ci95": m.get("test_ci95"), "n_test": m.get("n_test"),
                     "selected": (m.get("selected_on_validation") or {}).get("chosen")})
    tables["main"] = main
    if "train-one" in plan.stages and (plan.out / "train-one" / "sweep.json").is_file():
        tables["train_one"] = json.loads((plan.out / "train-one" / "sweep.json").read_text())
    if "test-random" in plan.stages and (plan.out / "test-random" / "sweep.json").is_file():
        tables["test_random"] = json.loads((plan.out / "test-random" / "sweep.json")
                                           .read_text())
    if "ablations" in plan.stages:
        ref = main[0]
        abl = [{"variant": "MedMIX (main run)", "change": "none", "folder": ref["folder"],
                "test": ref["test"], "ensemble": ref["ensemble"], "ci95": ref["ci95"]}]
        for sub in plan.stage_runs("ablations"):
            m = _read_metrics(plan.out / sub.rel)
            change = sub.change
            chosen = (m.get("selected_on_validation") or {}).get("chosen")
            if chosen:
                change += f" (chosen: {json.dumps(chosen, sort_keys=True)})"
            abl.append({"variant": sub.name, "change": change, "folder": sub.rel,
                        "test": m["test"],
                        "ensemble": {k: m.get("test_ensemble", {}).get(k) for k in METRICS},
                        "ci95": m.get("test_ci95")})
        tables["ablations"] = abl
    if "external" in plan.stages and plan.base.external_test:
        ext = []
        for f in plan.fusers:
            m = _read_metrics(_main_dir(plan, f))
            if "external" not in m:
                continue
            ext.append({"method": f, "external": m["external"],
                        "ensemble": {k: m.get("external_ensemble", {}).get(k) for k in METRICS},
                        "ci95": _external_ci(_main_dir(plan, f), m, plan.base.bootstrap),
                        "n": (m.get("external_per_seed") or [{}])[0].get("n")})
        tables["external"] = ext
    if "efficiency" in plan.stages and (plan.out / "efficiency" / "profile.json").is_file():
        from medmix_core.profile import load_profiles

        profiles = load_profiles(plan.out / "efficiency")
        with (plan.out / "efficiency" / "efficiency.csv").open(newline="") as fh:
            eff = {r["method"]: r for r in csv.DictReader(fh)}
        rows = []
        for f in plan.fusers:
            p, e = profiles[f], eff[f]
            rows.append({
                "method": f, "params": int(p["params"]["deployed"]),
                "macs_per_sample": float(p["macs"]["per_sample"]),
                "peak_memory_bytes": int(p["memory"]["inference"]["peak_bytes"]),
                "infer_ms": float(p["latency"]["inference"]["median_ms"]),
                "train_step_ms": float(p["latency"]["train_step"]["median_ms"]),
                "batch_size": int(p["batch_size"]),
                "auroc": next(r["test"]["auroc"] for r in main if r["method"] == f),
                "perf": float(e["perf"]), "cost": float(e["cost"]),
                "eff_score": float(e["eff_score"]), "pareto": e["pareto"] == "True"})
        tables["efficiency"] = rows
        tables["efficiency_machine"] = profiles[plan.fusers[0]].get("machine", {})
    return tables


def _metric_header(label: str = "Method") -> list[str]:
    from medmix_core.report import LABELS

    return [f"| {label} | " + " | ".join(LABELS[k] for k in METRICS) + " |",
            "|---|" + "---|" * len(METRICS)]


def _bold_best(rows: list[dict[str, Any]], key: str) -> dict[str, float | None]:
    best = {}
    for k in METRICS:
        vals = [r[key][k]["mean"] for r in rows if r[key][k]["mean"] is not None
                and not math.isnan(r[key][k]["mean"])]
        best[k] = max(vals) if vals else None
    return best


def _pivot(rows: list[dict[str, Any]], metric: str, split: str = "test",
           by_modality: bool = False) -> list[str]:
    """A method x rate table of one metric from sweep rows (mean ± std over seeds)."""
    from medmix_core.report import LABELS

    rows = [r for r in rows if r["split"] == split]
    rates = sorted({r["rate"] for r in rows if r["protocol"] != "natural"})
    natural = {r["fuser"]: r for r in rows if r["protocol"] == "natural"}
    keys = list(dict.fromkeys((r["fuser"], r["modality"] if by_modality else None)
                              for r in rows if r["protocol"] != "natural"))
    sym = "p" if by_modality else "r"
    head = (["Method"] + (["dropped modality"] if by_modality else []) + ["natural"]
            + [f"{sym} = {x:g}" for x in rates])
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for fuser, mod in keys:
        cells = [fuser] + ([str(mod)] if by_modality else [])
        cells.append(_ms(natural[fuser][metric]) if fuser in natural else "")
        for x in rates:
            hit = next((r for r in rows if r["protocol"] != "natural" and r["fuser"] == fuser
                        and r["rate"] == x and (not by_modality or r["modality"] == mod)),
                       None)
            cells.append(_ms(hit[metric]) if hit else "")
        lines.append("| " + " | ".join(cells) + " |")
    return [f"{LABELS[metric]}, mean ± std over seeds:", ""] + lines


def render_tables(plan: Plan, tables: dict[str, Any]) -> list[str]:
    """Tables 1-6 as markdown lines (Table 6's latency is measured, the rest is read)."""
    from medmix_core.report import LABELS
    from medmix_core.units import format_bytes, format_count, format_macs

    b = plan.base
    s = len(b.seeds)
    md: list[str] = []
    main = tables["main"]
    md += ["## Table 1: main comparison", "",
           f"Test split (n = {main[0]['n_test']}), mean ± sample std over {s} seed(s). Best "
           f"mean per column in bold. Folders `main/<method>`.", ""]
    best = _bold_best(main, "test")
    md += _metric_header()
    for r in main:
        cells = []
        for k in METRICS:
            c = _ms(r["test"][k])
            cells.append(f"**{c}**" if best[k] is not None and r["test"][k]["mean"] == best[k]
                         else c)
        name = r["method"]
        if r.get("selected"):
            name += f" (chosen on validation: `{json.dumps(r['selected'], sort_keys=True)}`)"
        md.append(f"| {name} | " + " | ".join(cells) + " |")
    md.append("")
    if b.bootstrap:
        md += [f"Table 1b: the seed ensemble (mean probability over the seeds, the deployed "
               f"model) with 95% percentile bootstrap intervals ({b.bootstrap} resamples of "
               f"the test patients, seed 0):", ""]
        md += _metric_header()
        for r in main:
            ci = r["ci95"] or {}
            md.append(f"| {r['method']} | " + " | ".join(
                _ci(r["ensemble"][k], ci.get(k)) for k in METRICS) + " |")
        md.append("")
    sk = [x for x in tables["skipped"] if x[0] == "main"]
    if sk:
        md += ["Not run here:", ""] + [f"- `{n}`: {why}" for _, n, why in sk] + [""]

    md += ["## Table 2: missing modalities at training time", ""]
    if "train_one" in tables:
        md += [f"Protocol `train-one`: each modality in turn is dropped from a share p of the "
               f"training samples where it is present (never a sample's last modality); "
               f"validation and test keep their own missingness. Natural = the main run. "
               f"Fusers: {', '.join(plan.train_one_fusers)}. Folder `train-one` (a sweep "
               f"folder: `sweep.md` has all four metrics).", ""]
        for metric in ("auroc", "auprc"):
            md += _pivot(tables["train_one"], metric, by_modality=True) + [""]
        md += ["![AUROC against the training-time missing rate](train-one/sweep_auroc.png)", ""]
    else:
        md += ["Not selected.", ""]

    md += ["## Table 3: missing modalities at test time", ""]
    if "test_random" in tables:
        md += ["Protocol `test-random`: with probability r a test sample loses one of its "
               "available modalities, chosen uniformly (never its last); the main runs' saved "
               "models, no retraining; common random numbers across r. Folder `test-random`.",
               ""]
        for metric in ("auroc", "auprc"):
            md += _pivot(tables["test_random"], metric) + [""]
        if any(r["split"] == "external" for r in tables["test_random"]):
            md += ["External cohort:", ""] + _pivot(tables["test_random"], "auroc",
                                                    split="external") + [""]
        md += ["![AUROC against the test-time missing rate](test-random/sweep_auroc.png)", ""]
    else:
        md += ["Not selected.", ""]

    md += ["## Table 4: structural ablations of MedMIX", ""]
    if "ablations" in tables:
        abl = tables["ablations"]
        ref = abl[0]["test"]["auroc"]["mean"]
        md += [f"Test split, mean ± std over {s} seed(s); Δ AUROC against the main MedMIX "
               f"run; the last column is the seed ensemble's AUROC with its 95% bootstrap "
               f"interval. Folders `ablations/<variant>`.", "",
               "| Variant | Change | " + " | ".join(LABELS[k] for k in METRICS)
               + " | Δ AUROC | AUROC, ensemble [95% CI] |",
               "|---|---|" + "---|" * len(METRICS) + "---|---|"]
        for r in abl:
            a = r["test"]["auroc"]["mean"]
            delta = "" if r is abl[0] or a is None or ref is None else f"{a - ref:+.3f}"
            ens = _ci(r["ensemble"]["auroc"], (r["ci95"] or {}).get("auroc"))
            md.append(f"| {r['variant']} | {r['change']} | "
                      + " | ".join(_ms(r["test"][k]) for k in METRICS)
                      + f" | {delta} | {ens} |")
        md.append("")
        sk = [x for x in tables["skipped"] if x[0] == "ablations"]
        if sk:
            md += ["Not run here:", ""] + [f"- `{n}`: {why}" for _, n, why in sk] + [""]
        md += ["![Ablations: AUROC of the seed ensemble with 95% bootstrap intervals]"
               "(figures/ablations_auroc.png)", ""]
    else:
        md += ["Not selected.", ""]

    md += ["## Table 5: external cohort", ""]
    if "external" in tables and tables["external"]:
        ext = tables["external"]
        md += [f"The main runs' models on `{b.external_test}` (n = {ext[0]['n']}), mean ± std "
               f"over seeds:", ""]
        md += _metric_header()
        for r in ext:
            md.append(f"| {r['method']} | " + " | ".join(_ms(r["external"][k])
                                                        for k in METRICS) + " |")
        md += ["", "The seed ensemble with 95% bootstrap intervals:", ""] + _metric_header()
        for r in ext:
            ci = r["ci95"] or {}
            md.append(f"| {r['method']} | " + " | ".join(
                _ci(r["ensemble"][k], ci.get(k)) for k in METRICS) + " |")
        md.append("")
    else:
        md += ["Not run: no external cohort was given (`--external-test`)." if
               not b.external_test else "Not selected.", ""]

    md += ["## Table 6: efficiency", ""]
    if "efficiency" in tables:
        eff = tables["efficiency"]
        mach = tables.get("efficiency_machine", {})
        md += [f"Deployed parameters, MACs per sample (fvcore, one per multiply-add), peak "
               f"memory of one inference batch, median latency per batch of "
               f"{eff[0]['batch_size']} ({PROFILE_REPEATS} timed after {PROFILE_WARMUP} "
               f"warm-up; device {mach.get('device', '?')}, {mach.get('torch_threads', '?')} "
               f"torch threads, load average {mach.get('loadavg', '?')}). Perf = mean of the "
               f"four test metrics; Cost = geometric mean of the parameter, MAC and memory "
               f"ratios to {REFERENCE}; EffScore = (Perf / Perf_{REFERENCE}) / Cost. Folder "
               f"`efficiency`.", "",
               "| Method | params | MACs / sample | peak memory | infer ms | train step ms "
               "| AUROC | Perf | Cost | EffScore | Pareto |",
               "|---|---:|---:|---:|---:|---:|---|---:|---:|---:|:-:|"]
        for r in eff:
            md.append(f"| {r['method']} | {format_count(r['params'])} | "
                      f"{format_macs(r['macs_per_sample'])} | "
                      f"{format_bytes(r['peak_memory_bytes'])} | {r['infer_ms']:.2f} | "
                      f"{r['train_step_ms']:.2f} | {_ms(r['auroc'])} | {r['perf']:.4f} | "
                      f"{r['cost']:.3f} | {r['eff_score']:.3f} | {'*' if r['pareto'] else ''} |")
        md += ["", "![AUROC against MACs and latency, Pareto front]"
                   "(figures/efficiency_pareto.png)", ""]
    else:
        md += ["Not selected.", ""]
    return md


# ------------------------------------------------------------------------------ figures
def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _savefig(fig, path: Path) -> Path:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    atomic_write_bytes(path, buf.getvalue())
    return path


def plot_ablations(rows: list[dict[str, Any]], path: Path) -> Path:
    """Bars of the seed ensemble's AUROC per ablation with 95% bootstrap intervals."""
    plt = _plt()
    names = [r["variant"] for r in rows]
    vals = [r["ensemble"]["auroc"] if r["ensemble"]["auroc"] is not None else math.nan
            for r in rows]
    lo, hi = [], []
    for r, v in zip(rows, vals):
        ci = (r["ci95"] or {}).get("auroc")
        lo.append(max(v - ci[0], 0.0) if ci else 0.0)
        hi.append(max(ci[1] - v, 0.0) if ci else 0.0)
    fig, ax = plt.subplots(figsize=(6.4, 0.45 * len(rows) + 1.4), dpi=120)
    y = list(range(len(rows)))[::-1]
    colors = ["tab:orange"] + ["tab:blue"] * (len(rows) - 1)
    ax.barh(y, vals, xerr=[lo, hi], color=colors, alpha=0.8, capsize=3)
    if rows and not math.isnan(vals[0]):
        ax.axvline(vals[0], color="tab:orange", lw=1, ls="--")
    ax.set_yticks(y)
    ax.set_yticklabels(names, fontsize=8)
    ends = [e for v, a, b in zip(vals, lo, hi) if not math.isnan(v) for e in (v - a, v + b)]
    if ends:  # the whole interval of every bar in view
        ax.set_xlim(max(0.0, min(ends) - 0.03), min(1.0, max(ends) + 0.03))
    ax.set_xlabel("test AUROC of the seed ensemble (95% bootstrap interval)")
    ax.set_title("Ablations of MedMIX", fontsize=10)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)
    return path


def plot_efficiency(rows: list[dict[str, Any]], path: Path) -> Path:
    """AUROC against MACs per sample and against inference latency, Pareto fronts marked."""
    from medmix_core.efficiency import pareto_front

    plt = _plt()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2), dpi=120)
    auroc = [r["auroc"]["mean"] if r["auroc"]["mean"] is not None else math.nan for r in rows]
    std = [r["auroc"]["std"] or 0.0 for r in rows]
    for ax, key, label in ((axes[0], "macs_per_sample", "MACs per sample"),
                           (axes[1], "infer_ms", "inference latency per batch (ms)")):
        x = [r[key] for r in rows]
        front = pareto_front(x, auroc)
        pts = sorted((xi, yi) for xi, yi, f in zip(x, auroc, front) if f)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], "-", color="tab:orange", lw=1.2)
        for r, xi, yi, si, f in zip(rows, x, auroc, std, front):
            ax.errorbar(xi, yi, yerr=si, fmt="*" if r["method"] == REFERENCE else "o",
                        color="tab:orange" if f else "tab:blue", ms=9 if
                        r["method"] == REFERENCE else 5, capsize=2)
            ax.annotate(r["method"], (xi, yi), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
        if min(x) > 0 and max(x) / min(x) > 20:
            ax.set_xscale("log")
        ax.set_xlabel(label)
        ax.set_ylabel("test AUROC (mean ± std over seeds)")
        ax.grid(alpha=0.3)
    fig.suptitle("AUROC against cost; orange: the Pareto front (no method cheaper and "
                 "better)", fontsize=9)
    fig.tight_layout()
    _savefig(fig, path)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------ report
def _command() -> str:
    argv = list(sys.argv)
    if argv:
        argv[0] = Path(argv[0]).name
    return shlex.join(argv)


def write_report(plan: Plan, tables: dict[str, Any], info: dict[str, Any],
                 seconds: dict[str, float]) -> Path:
    """``out/report.md``, ``out/report.json`` and the figures of ``out/figures``."""
    from medmix_core.machine import machine_info
    from medmix_core.training import resolve_device

    out = plan.out
    b = plan.base
    figures = []
    try:
        if "ablations" in tables:
            figures.append(plot_ablations(tables["ablations"], out / "figures"
                                          / "ablations_auroc.png"))
        if "efficiency" in tables:
            figures.append(plot_efficiency(tables["efficiency"], out / "figures"
                                           / "efficiency_pareto.png"))
    except ImportError:
        figures = []  # matplotlib absent: tables only (pip install 'medmix[plots]')
    mach = machine_info(resolve_device(b.device))
    now = dt.datetime.now().astimezone().isoformat(timespec="seconds")
    first = info.get("command") or _command()
    md = ["# MedMIX protocol, reproduced", "",
          f"- date: started {info.get('started')}, report written {now}",
          f"- machine: {mach.get('cpu_model')}, {mach.get('cpu_cores')} cores "
          f"({mach.get('usable_cores')} usable), device {mach.get('device')}"
          + ("" if mach.get("device") == "cpu" else f" ({mach.get('device_name')})")
          + f", torch {mach.get('torch')}, load average "
          f"{mach.get('loadavg')} when the report was written",
          f"- command: `{first}`"]
    if info.get("resumed"):
        md.append(f"- resumed {info.get('resumes', 1)} time(s), last at {info['resumed']}: "
                  f"`{_command()}`")
    md += [f"- store: `{b.store}`; experts {', '.join(b.experts or [])}; teacher "
           f"{b.teacher or 'none'} (distillation {'on' if b.distill_on else 'off'}); task "
           f"{b.task or 'the first of the store'}",
           f"- training: seeds {list(b.seeds)}, up to {b.epochs} epochs, patience "
           f"{b.patience}, lr {b.lr:g}, d {b.d}, batch {b.batch_size}, expert dropout "
           f"{b.expert_dropout}, modality dropout {b.modality_dropout}, threshold "
           f"{b.threshold}; bootstrap {b.bootstrap} resamples", ""]
    md += render_tables(plan, tables)
    md += ["## Wall time", "",
           "Seconds per stage on this machine (summed over invocations when resumed; other "
           "work sharing the machine slows them):", "",
           "| stage | training jobs | seconds |", "|---|---:|---:|"]
    for st in plan.stages:
        md.append(f"| {st} | {plan.jobs(st)} | {seconds.get(st, 0.0):.1f} |")
    md += [f"| total | {plan.jobs()} | {seconds.get('total', 0.0):.1f} |", "",
           "## Folders", ""]
    md += [f"- `{r.rel}` ({r.stage}: {r.name})" for r in plan.runs]
    sweeps = [f"`{st}`" for st in ("train-one", "test-random") if st in plan.stages]
    md += [f"- {', '.join(sweeps)}: sweep folders (`medmix report` renders them)"
           if sweeps else "",
           "- `efficiency`: `profile.json`, `profile.md`, `efficiency.md/.csv/.png`"
           if "efficiency" in plan.stages else "", ""]
    path = out / "report.md"
    atomic_write_text(path, "\n".join(line for line in md) + "\n")
    from medmix_core.runner import clean_json

    data = {"plan": plan.to_json(), "tables": tables, "stage_seconds": seconds,
            "machine": mach, "command": first, "written": now,
            "figures": [str(p.relative_to(out)) for p in figures]}
    atomic_write_text(out / "report.json", json.dumps(clean_json(data), indent=1, default=str))
    return path


# ------------------------------------------------------------------------------ the CLI
def reproduce_command(
    dataset: str | None = None, store: str | None = None, experts: str | None = None,
    teacher: str | None = None, seeds: int = 5, fusers: str | None = None,
    train_one_fusers: str | None = None, stages: str | None = None, out: Path = Path(
        "runs/reproduce"), resume: bool = False, overwrite: bool = False,
    external_test: str | None = None, device: str | None = None, threads: int | None = None,
    epochs: int | None = None, dry_run: bool = False, bootstrap: int = DEFAULT_BOOTSTRAP,
    config: Path | None = None, progress: bool = True,
) -> None:
    """Run the paper's whole protocol on one store and write one report (``OUT/report.md``).

    The typer options are declared by :func:`typer_command`; this body is the command.
    """
    import typer

    from medmix_core.cli import _csv, _fail, build_config

    try:
        base = build_config(config, dict(dataset=dataset, store=store, experts=_csv(experts),
                                         teacher=teacher, seeds=seeds, device=device,
                                         threads=threads, epochs=epochs,
                                         external_test=external_test, bootstrap=bootstrap,
                                         progress=progress))
        stage_list = _csv(stages)
        if dry_run:
            plan, _ = make_plan(base, out, _csv(fusers), None, stage_list,
                                _csv(train_one_fusers), typer.echo, extract=False)
            typer.echo(plan.describe())
            return
        res = reproduce(base, out, _csv(fusers), None, stage_list, resume=resume,
                        overwrite=overwrite, log=typer.echo, progress=progress,
                        train_one_fusers=_csv(train_one_fusers))
        typer.echo(f"Wrote {res['report']} ({len(res['trained'])} sub-runs trained, "
                   f"{len(res['reused'])} reused; {res['stage_seconds'].get('total', 0):.0f} s)")
    except (MedmixError, OSError) as exc:
        _fail(exc)


#: help of the command's options
_HELP = {
    "dataset": "Dataset plugin (default physionet2012, bundled).",
    "store": "Embedding store folder (default stores/<dataset>; extracted when absent).",
    "experts": "Comma-separated experts (default: all in the store).",
    "teacher": "Teacher for distillation (training only); adds the no-distill ablation.",
    "seeds": "Seeds of every training (0..N-1).",
    "fusers": "Main fusers, comma-separated (default: medmix and every baseline that can "
              "run on the store; the others are skipped with their reason).",
    "train_one_fusers": "Fusers of the train-one stage (default: the main fusers, as in "
                        "the paper).",
    "stages": "Stages, comma-separated: main, train-one, test-random, ablations, external, "
              "efficiency (default all; main always runs).",
    "out": "Reproduction folder; an occupied one is refused without --resume or "
           "--overwrite.",
    "resume": "Continue the reproduction in --out (same settings): finished sub-runs are "
              "kept, unfinished ones continued.",
    "overwrite": "Delete what --out holds, then start.",
    "external_test": "External cohort (store, or raw source) for Table 5.",
    "device": "auto (default) | cpu | cuda | cuda:N.",
    "threads": "CPU threads for training (default 1).",
    "epochs": "Maximum epochs per training (default 200).",
    "dry_run": "Print the plan (stages, job counts, skips) and exit; nothing is trained.",
    "bootstrap": "Bootstrap resamples for the 95% CIs (0 = off).",
    "config": "JSON or YAML config file; flags override it.",
    "progress": "One progress bar over the training jobs, with an ETA (stderr).",
}


def typer_command():
    """:func:`reproduce_command` with its typer options, ready for ``app.command``."""
    import typer

    opt = typer.Option
    h = _HELP

    def command(
        dataset: str | None = opt(None, help=h["dataset"]),
        store: str | None = opt(None, help=h["store"]),
        experts: str | None = opt(None, help=h["experts"]),
        teacher: str | None = opt(None, help=h["teacher"]),
        seeds: int = opt(5, help=h["seeds"]),
        fusers: str | None = opt(None, help=h["fusers"]),
        train_one_fusers: str | None = opt(None, help=h["train_one_fusers"]),
        stages: str | None = opt(None, help=h["stages"]),
        out: Path = opt(Path("runs/reproduce"), help=h["out"]),
        resume: bool = opt(False, "--resume", help=h["resume"]),
        overwrite: bool = opt(False, "--overwrite", help=h["overwrite"]),
        external_test: str | None = opt(None, help=h["external_test"]),
        device: str | None = opt(None, help=h["device"]),
        threads: int | None = opt(None, help=h["threads"]),
        epochs: int | None = opt(None, help=h["epochs"]),
        dry_run: bool = opt(False, "--dry-run", help=h["dry_run"]),
        bootstrap: int = opt(DEFAULT_BOOTSTRAP, help=h["bootstrap"]),
        config: Path | None = opt(None, help=h["config"]),
        progress: bool = opt(True, "--progress/--no-progress", help=h["progress"]),
    ) -> None:
        """Run the paper's whole protocol (Tables 1-6) on one store and write OUT/report.md."""
        reproduce_command(dataset, store, experts, teacher, seeds, fusers, train_one_fusers,
                          stages, out, resume, overwrite, external_test, device, threads,
                          epochs, dry_run, bootstrap, config, progress)

    command.__name__ = "reproduce"
    return command
