"""The default committee planner: budget, cached experts, absent weights, the message."""

from __future__ import annotations

import pytest

from medmix_core.config import RunConfig
from medmix_core.errors import WeightsNotFoundError
from medmix_core.plan import Plan, device_kind, plan_committee
from medmix_core.plugins import get_any_encoder, get_dataset, get_fuser
from medmix_core.runner import default_committee


class _Enc:
    absent: set[str] = set()

    def __init__(self, name: str) -> None:
        self.name = name

    def check_weights(self) -> None:
        if self.name in self.absent:
            raise WeightsNotFoundError(f"{self.name} needs the package 'pkg-{self.name}'. "
                                       f"Run `pip install pkg-{self.name}`.")


def _factory(name: str):
    return lambda: _Enc(name)


class _DS:
    default_experts = ("a",)
    committee = ("a", "b", "c", "d")
    committee_teacher = "t"
    extract_seconds = {"cpu": {"a": 10, "b": 100, "c": 200, "d": 1000, "t": 300},
                       "cuda": {"a": 1, "b": 5, "c": 5, "d": 20, "t": 10}}
    train_seconds = {"cpu": 100, "cuda": 30}


@pytest.fixture(autouse=True)
def _reset():
    _Enc.absent = set()
    yield
    _Enc.absent = set()


def test_cpu_takes_the_prefix_that_fits_and_names_the_rest():
    plan = plan_committee(_DS, set(), set(), "cpu", _factory, cores=2, budget_s=600)
    # 600 s - 100 s training leaves 500 s: a (10) + b (100) + c (200) fit, d (1000) does not;
    # the teacher (300) would overflow what is left
    assert plan.experts == ["a", "b", "c"]
    assert plan.teacher is None
    assert [n for n, _ in plan.left_out] == ["d", "teacher t"]
    text = plan.describe()
    assert "Left out: d (about 17 min more); teacher t (about 5 min more)." in text
    assert "Add them with: medmix run --experts a,b,c,d --teacher t" in text
    assert plan.extract_s == pytest.approx(310)


def test_gpu_takes_the_whole_committee_and_the_teacher():
    plan = plan_committee(_DS, set(), set(), "cuda", _factory, budget_s=600)
    assert plan.experts == ["a", "b", "c", "d"] and plan.teacher == "t"
    assert not plan.left_out
    assert "distillation on" in plan.describe() and "Left out" not in plan.describe()


def test_experts_already_extracted_are_free():
    plan = plan_committee(_DS, {"a", "b", "c", "d", "x"}, {"t"}, "cpu", _factory, cores=2,
                          budget_s=600)
    assert plan.experts == ["a", "b", "c", "d", "x"] and plan.teacher == "t"
    assert plan.extract_s == 0 and "already extracted" in plan.describe()


def test_more_cores_make_cpu_extraction_cheaper():
    slow = plan_committee(_DS, set(), set(), "cpu", _factory, cores=2, budget_s=1000)
    fast = plan_committee(_DS, set(), set(), "cpu", _factory, cores=8, budget_s=1000)
    assert "d" not in slow.experts and "d" in fast.experts


def test_absent_weights_are_left_out_with_the_install_hint():
    _Enc.absent = {"b"}
    plan = plan_committee(_DS, set(), set(), "cuda", _factory, budget_s=600)
    assert "b" not in plan.experts and plan.experts == ["a", "c", "d"]
    why = dict(plan.left_out)["b"]
    assert why.startswith("weights absent") and "pkg-b" in why


def test_a_tiny_budget_keeps_the_default_experts():
    plan = plan_committee(_DS, set(), set(), "cpu", _factory, cores=2, budget_s=1)
    assert plan.experts == ["a"]


def test_device_kind():
    assert device_kind("cpu") == "cpu" and device_kind("cuda:1") == "cuda"
    assert device_kind("auto") in ("cpu", "cuda")


def test_physionet_declares_a_costed_committee():
    ds = get_dataset("physionet2012")
    assert set(ds.default_experts) <= set(ds.committee)
    for kind in ("cpu", "cuda"):
        costs = ds.extract_seconds[kind]
        assert set(ds.committee) | {ds.committee_teacher} <= set(costs)
    for name in ds.committee:
        get_any_encoder(name)  # every member is a registered plugin


def test_default_run_config_follows_the_plan(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no store yet under ./stores
    logged: list[str] = []
    cfg = default_committee(RunConfig(device="cpu"), get_fuser("medmix"), logged.append)
    plan = plan_committee(get_dataset("physionet2012"), set(), set(), "cpu", get_any_encoder)
    assert cfg.experts == plan.experts and cfg.teacher == plan.teacher
    assert logged and logged[0].startswith("Default committee on cpu:")


def test_a_dataset_without_a_committee_keeps_its_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = RunConfig(dataset="synthetic", device="cpu")
    assert default_committee(cfg, get_fuser("medmix"), print) == cfg


def test_plan_describe_without_left_out():
    text = Plan(experts=["a"], teacher=None, extract_s=0).describe()
    assert text == "Default committee on cpu: a; already extracted."


def test_the_first_member_that_does_not_fit_ends_the_committee():
    class Later(_DS):
        committee = ("a", "d", "b")  # b is cheap but may build on d

    plan = plan_committee(Later, set(), set(), "cpu", _factory, cores=2, budget_s=600)
    assert plan.experts == ["a"]
    assert [n for n, _ in plan.left_out] == ["d", "b", "teacher t"]


def test_a_teacher_asked_for_is_used_and_paid_first():
    plan = plan_committee(_DS, set(), set(), "cpu", _factory, cores=2, budget_s=600,
                          teacher="t")
    # 500 s left: the teacher's 300 s first, then a (10) + b (100); c (200) no longer fits
    assert plan.teacher == "t" and plan.experts == ["a", "b"]
    assert "teacher t" not in dict(plan.left_out)
    plan = plan_committee(_DS, set(), set(), "cuda", _factory, budget_s=600, teacher=False)
    assert plan.teacher is None and not plan.left_out


def test_the_weights_check_sees_the_run_options():
    seen = {}

    class Opt(_Enc):
        def __init__(self, **options):
            super().__init__("b")
            seen.update(options)

    def factory(name):
        return Opt if name == "b" else _factory(name)

    plan_committee(_DS, set(), set(), "cuda", factory, budget_s=600,
                   options={"b": {"model_dir": "/m"}})
    assert seen == {"model_dir": "/m"}


def test_a_teacher_reading_fuser_gets_no_planned_teacher(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match="reads teacher embeddings at inference"):
        default_committee(RunConfig(device="cpu", fuser="adacomed"), get_fuser("adacomed"))
