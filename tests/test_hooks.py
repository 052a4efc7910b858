"""The plugin boundary: every hookspec has a test of its own (``test_hook_<name>``, as
datasette checks), hooks are called through pluggy (so tracing sees them), and the core
imports no built-in plugin."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from conftest import registered
from typer.testing import CliRunner

from medmix_core import (
    DistillLoss,
    ExpertEncoder,
    Fuser,
    FuserPlugin,
    FusionOutput,
    ModalitySpec,
    TaskSpec,
    Teacher,
    hookimpl,
    hookspecs,
)
from medmix_core.datasets import Dataset
from medmix_core.errors import DuplicatePluginError
from medmix_core.plugins import (
    get_bridge,
    get_dataset,
    get_expert,
    get_fuser,
    get_loss,
    get_plugin_manager,
    get_teacher,
    registry,
)
from medmix_core.types import Sample, TabularData

ROOT = Path(__file__).resolve().parents[1]
BUILTIN = ("medmix_experts", "medmix_fusers", "medmix_datasets", "medmix_distill",
           "medmix_example_plugin")


def _hookspecs() -> list[str]:
    return sorted(n for n in dir(hookspecs)
                  if getattr(getattr(hookspecs, n), "medmix_spec", None) is not None)


def test_every_hookspec_has_a_test_of_its_own():
    text = "\n".join(p.read_text("utf-8") for p in (ROOT / "tests").glob("test_*.py"))
    missing = [h for h in _hookspecs() if f"def test_hook_{h}(" not in text]
    assert not missing, f"hookspecs without a test named test_hook_<hookname>: {missing}"


def test_the_core_imports_no_builtin_plugin():
    offenders = []
    for path in sorted((ROOT / "medmix_core").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text("utf-8"))):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for n in names:
                if n.split(".")[0] in BUILTIN:
                    offenders.append(f"{path.relative_to(ROOT)}:{node.lineno} imports {n}")
    assert not offenders, offenders


def test_loading_the_core_and_its_cli_loads_no_plugin_when_none_is_allowed():
    code = ("import sys, pkgutil, importlib, medmix_core\n"
            "for m in pkgutil.iter_modules(medmix_core.__path__):\n"
            "    importlib.import_module('medmix_core.' + m.name)\n"
            "from medmix_core.plugins import registry; registry()\n"
            f"bad = [m for m in sys.modules if m.split('.')[0] in {BUILTIN!r}]\n"
            "assert not bad, bad\n")
    env = {**os.environ, "MEDMIX_PLUGINS": "", "OMP_NUM_THREADS": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]


def test_register_hooks_are_called_through_pluggy_and_traced():
    env = {**os.environ, "MEDMIX_TRACE_HOOKS": "1", "MEDMIX_PLUGINS": "stats,medmix"}
    code = "from medmix_core.plugins import registry; registry()"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    for hook in ("register_experts", "register_fusers"):
        assert hook in res.stderr, res.stderr[-2000:]


# ---------------------------------------------------------------------------- one each
class _Echo(ExpertEncoder):
    name = "hook-echo"
    kinds = ("tabular",)

    def dim(self, modality: ModalitySpec) -> int:
        return len(modality.variables)

    def encode(self, modality, payloads):
        return np.stack([np.nan_to_num(p.values) for p in payloads]).astype(np.float32)


class _EchoTeacher(_Echo, Teacher):
    name = "hook-echo-teacher"


def test_hook_register_experts():
    class P:
        @hookimpl
        def register_experts(self, register):
            register("hook-echo", _Echo)

    with registered(P()):
        cls = get_expert("hook-echo")
        assert cls is _Echo and registry().entries["experts"]["hook-echo"].plugin == "throwaway"
        spec = ModalitySpec("s", "tabular", ["a", "b"])
        out = cls().encode(spec, [TabularData(["a", "b"], np.array([1.0, np.nan]))])
        assert out.shape == (1, 2)
    with pytest.raises(KeyError):
        get_expert("hook-echo")


def test_hook_register_teachers():
    class P:
        @hookimpl
        def register_teachers(self, register):
            register("hook-echo-teacher", _EchoTeacher)

    with registered(P()):
        assert get_teacher("hook-echo-teacher") is _EchoTeacher
        assert "hook-echo-teacher" not in registry().names("experts")


def test_hook_register_fusers():
    from medmix_core.fusion import FusionSpec

    class Mean(Fuser):
        def __init__(self, spec, d=8, dropout=0.0, scale: float = 1.0):
            super().__init__(spec)
            self.head = torch.nn.Linear(1, spec.n_outputs)
            self.scale = scale

        def forward(self, batch):
            b = batch.size
            return FusionOutput(logits=self.head(torch.ones(b, 1)) * self.scale)

    class P:
        @hookimpl
        def register_fusers(self, register):
            register("hook-mean", FuserPlugin(Mean, reads_teacher=False))
            register("hook-plain", Mean)  # a plain callable is a FuserPlugin too

    with registered(P()):
        spec = FusionSpec(["m"], {"m": ["e"]}, {"m": [3]}, 1)
        for name in ("hook-mean", "hook-plain"):
            plugin = get_fuser(name)
            assert isinstance(plugin, FuserPlugin) and not plugin.reads_teacher
            assert isinstance(plugin(spec, scale=2.0), Mean)


def test_hook_register_losses():
    class Zero(DistillLoss):
        def forward(self, student, teacher):
            return (student - teacher).pow(2).mean()

    class P:
        @hookimpl
        def register_losses(self, register):
            register("hook-l2", Zero)

    with registered(P()):
        loss = get_loss("hook-l2")()
        assert float(loss(torch.ones(2, 3), torch.ones(2, 3))) == 0.0


def test_hook_register_datasets():
    class Tiny(Dataset):
        name = "hook-tiny"

        def modalities(self):
            return [ModalitySpec("s", "tabular", ["a"])]

        def tasks(self):
            return [TaskSpec("y", "binary")]

        def samples(self):
            return [Sample(str(i), {"s": TabularData(["a"], np.array([float(i)]))},
                           {"y": float(i % 2)}) for i in range(20)]

    class P:
        @hookimpl
        def register_datasets(self, register):
            register("hook-tiny", Tiny)

    with registered(P()):
        ds = get_dataset("hook-tiny")()
        assert len(ds.samples()) == 20 and set(ds.splits(ds.samples())) == {"train", "val",
                                                                            "test"}


def test_hook_register_bridges():
    class Caption:
        """input -> text"""

        def generate(self, payloads):
            return ["a frontal chest radiograph" for _ in payloads]

    class P:
        @hookimpl
        def register_bridges(self, register):
            register("hook-caption", Caption)

    with registered(P()):
        assert get_bridge("hook-caption")().generate([1, 2]) == ["a frontal chest radiograph"] * 2
        assert "hook-caption" in registry().names("bridges")


def test_hook_register_commands():
    app = typer.Typer()

    @app.command()
    def base() -> None:
        """A command the app has anyway."""

    class P:
        @hookimpl
        def register_commands(self, app):
            @app.command("hook-hello")
            def hello(name: str = "world") -> None:
                typer.echo(f"hello {name}")

    with registered(P()):
        get_plugin_manager().hook.register_commands(app=app)
    res = CliRunner().invoke(app, ["hook-hello", "--name", "ward"])
    assert res.exit_code == 0 and "hello ward" in res.output


def test_a_name_registered_twice_names_both_plugins():
    class A:
        @hookimpl
        def register_experts(self, register):
            register("hook-twice", _Echo)

    with registered(A(), "plugin-a"), registered(A(), "plugin-b"):
        with pytest.raises(DuplicatePluginError, match="plugin-a.*plugin-b|plugin-b.*plugin-a"):
            registry()
