"""``medmix new-plugin``: write a working skeleton of a third-party plugin distribution.

The skeleton is a complete, installable distribution whose tests pass as generated::

    <name>/
        pyproject.toml        [project.entry-points.medmix] <short> = "<package>"
        README.md
        .gitignore
        <package>/__init__.py the hook implementations
        <package>/expert.py   a real minimal expert (kind "expert" or "both")
        <package>/fuser.py    a real minimal fuser (kind "fuser" or "both")
        tests/conftest.py     registers the plugin when it is not installed
        tests/test_plugin.py  tests parametrized over every name the plugin registers

``<package>`` is the name with ``-`` replaced by ``_``; ``<short>`` (the entry-point name
and the registered expert/fuser name) is the name without a leading ``medmix-``.
"""

from __future__ import annotations

import importlib.util
import keyword
import re
from pathlib import Path
from string import Template

from medmix_core.errors import MedmixError
from medmix_core.store import atomic_write_text

PLUGIN_KINDS = ("expert", "fuser", "both")
_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")


class ScaffoldError(MedmixError):
    """A plugin skeleton that cannot be written as asked."""


def plugin_names(name: str) -> dict[str, str]:
    """The names derived from a distribution name.

    Args:
        name: distribution name, e.g. ``"medmix-pca"`` or ``"pca"``.
    Returns:
        {"distribution", "package", "short"}: e.g. ``medmix-pca``, ``medmix_pca``, ``pca``.
    Raises:
        ScaffoldError: a name that is not lowercase letters, digits and single ``-``/``_``.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        raise ScaffoldError(f"Plugin name {name!r} is not valid: expected lowercase letters and "
                            f"digits, starting with a letter, words joined by single '-' or "
                            f"'_' (e.g. 'medmix-pca').")
    short = re.sub(r"^medmix[-_]", "", name)
    if short == name and name == "medmix":
        raise ScaffoldError("Plugin name 'medmix' is medmix itself; pick another, e.g. "
                            "'medmix-pca'.")
    package = name.replace("-", "_")
    if keyword.iskeyword(package):
        raise ScaffoldError(f"Plugin name {name!r} gives the package name {package!r}, a Python "
                            f"keyword; pick another name.")
    return {"distribution": name, "package": package, "short": short}


def _check_free(names: dict[str, str], kind: str) -> None:
    """Refuse names an installed plugin or module already uses."""
    from medmix_core.plugins import registry

    if importlib.util.find_spec(names["package"]) is not None:
        raise ScaffoldError(f"A module named {names['package']!r} is already importable here, so "
                            f"the new package would be shadowed or shadow it. Pick another "
                            f"plugin name.")
    reg = registry()
    wanted = {"expert": ["experts"], "fuser": ["fusers"], "both": ["experts", "fusers"]}[kind]
    for table in wanted:
        if names["short"] in reg.entries[table]:
            owner = reg.entries[table][names["short"]].plugin
            raise ScaffoldError(f"The {table[:-1]} name {names['short']!r} is already registered "
                                f"by plugin {owner!r}; two plugins cannot register the same "
                                f"name. Pick another plugin name, e.g. "
                                f"'medmix-my-{names['short']}'.")


def new_plugin(name: str, dest: str | Path = ".", kind: str = "both") -> Path:
    """Write a plugin skeleton into ``dest/name`` and return that folder.

    Args:
        name: distribution name (``medmix-foo`` or ``foo``); the registered expert and fuser
            names are the name without the ``medmix-`` prefix.
        dest: parent folder; the distribution is written to ``dest / name``.
        kind: ``"expert"``, ``"fuser"`` or ``"both"``: what the skeleton registers.
    Returns:
        the new distribution's folder.
    Raises:
        ScaffoldError: an invalid name or kind, a name already in use, or a target folder that
            exists and is not empty (nothing is ever overwritten).
    """
    if kind not in PLUGIN_KINDS:
        raise ScaffoldError(f"Plugin kind {kind!r} is not one of {list(PLUGIN_KINDS)}.")
    names = plugin_names(name)
    target = Path(dest) / names["distribution"]
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ScaffoldError(f"{target} already exists and is not an empty folder; refusing to "
                            f"overwrite it. Choose another --dest or remove it first.")
    _check_free(names, kind)
    for rel, text in render(names, kind).items():
        atomic_write_text(target / rel, text)
    return target


def render(names: dict[str, str], kind: str) -> dict[str, str]:
    """Relative path -> text of every file of the skeleton."""
    has_expert, has_fuser = kind in ("expert", "both"), kind in ("fuser", "both")
    pkg = names["package"]
    subst = dict(names)
    hooks, imports, what = [], [], []
    if has_expert:
        imports.append(f"from {pkg}.expert import SummaryExpert")
        hooks.append(f'@hookimpl\ndef register_experts(register):\n'
                     f'    register("{names["short"]}", SummaryExpert)\n')
        what.append(f"an expert `{names['short']}`")
    if has_fuser:
        imports.append(f"from {pkg}.fuser import build_fuser")
        hooks.append(f'@hookimpl\ndef register_fusers(register):\n'
                     f'    register("{names["short"]}", build_fuser)\n')
        what.append(f"a fuser `{names['short']}`")
    subst["imports"] = "\n".join(imports)
    subst["hooks"] = "\n\n".join(hooks)
    subst["what"] = " and ".join(what)
    subst["expert_names"] = f'["{names["short"]}"]' if has_expert else "[]"
    subst["fuser_names"] = f'["{names["short"]}"]' if has_fuser else "[]"
    files = {
        "pyproject.toml": _PYPROJECT,
        "README.md": _README,
        ".gitignore": _GITIGNORE,
        f"{pkg}/__init__.py": _INIT,
        "tests/conftest.py": _CONFTEST,
        "tests/test_plugin.py": _TESTS,
    }
    if has_expert:
        files[f"{pkg}/expert.py"] = _EXPERT
    if has_fuser:
        files[f"{pkg}/fuser.py"] = _FUSER
    return {rel: Template(text).substitute(subst) for rel, text in files.items()}


_PYPROJECT = '''\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "$distribution"
version = "0.1.0"
description = "A medmix plugin."
readme = "README.md"
requires-python = ">=3.10"
dependencies = ["medmix>=0.1"]

[project.optional-dependencies]
test = ["pytest>=7"]

# medmix imports this module at start-up and calls the hooks it implements
[project.entry-points.medmix]
$short = "$package"

[tool.setuptools]
packages = ["$package"]

[tool.pytest.ini_options]
testpaths = ["tests"]
'''

_README = '''\
# $distribution

A [medmix](https://pypi.org/project/medmix/) plugin registering $what.

```bash
pip install -e ".[test]"
medmix plugins            # lists "$short"
pytest                    # the plugin's tests
```

Without installing, from this folder: `PYTHONPATH=. pytest`.
'''

_GITIGNORE = '''\
__pycache__/
*.egg-info/
build/
dist/
.pytest_cache/
'''

_INIT = '''\
"""$distribution: medmix finds this module through its entry point and calls these hooks."""

from medmix_core import hookimpl

$imports


$hooks'''

_EXPERT = '''\
"""A weight-free expert for tabular and time-series modalities.

Per variable of the modality: the mean of its observations (time series) or its value
(tabular), z-scored with statistics fitted on the training split, then a 0/1 observed
indicator, so an unmeasured variable (set to the training mean, 0) never looks like a
measurement. Replace ``_summary`` with your own model's forward pass to wrap a real encoder.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from medmix_core import ExpertEncoder, ModalitySpec, TabularData, TimeSeriesData
from medmix_core.errors import DataError


class SummaryExpert(ExpertEncoder):
    """z-scored per-variable summary plus observed indicators (dim = 2 x variables)."""

    name = "$short"
    kinds = ("tabular", "timeseries")
    version = "1"
    family = "domain"

    def __init__(self, **options: Any) -> None:
        if options:
            raise DataError(f"Expert {self.name!r}: unknown option(s) {sorted(options)}; it "
                            f"takes none.")
        super().__init__(**options)
        self._state: dict[str, dict[str, np.ndarray]] = {}

    def dim(self, modality: ModalitySpec) -> int:
        if modality.kind not in self.kinds or not modality.variables:
            raise DataError(f"Expert {self.name!r} needs a tabular or timeseries modality with "
                            f"declared variables; {modality.name!r} is {modality.kind!r} with "
                            f"{len(modality.variables)} variables.")
        return 2 * len(modality.variables)

    def _summary(self, modality: ModalitySpec, payloads: Sequence[Any]) -> np.ndarray:
        """[N, V] float64: value or mean of observations per variable, NaN = unmeasured."""
        col = {v: j for j, v in enumerate(modality.variables)}
        out = np.full((len(payloads), len(col)), np.nan)
        for r, p in enumerate(payloads):
            if isinstance(p, TabularData):
                vals = zip(p.variables, np.asarray(p.values, dtype=np.float64).ravel())
            elif isinstance(p, TimeSeriesData):
                vals = []
                for v, x in zip(p.variables, p.values):
                    x = np.asarray(x, dtype=np.float64).ravel()
                    x = x[np.isfinite(x)]
                    vals.append((v, x.mean() if len(x) else np.nan))
            else:
                raise DataError(f"Payload {r} of {modality.name!r} is {type(p).__name__}; "
                                f"expected TabularData or TimeSeriesData.")
            for v, x in vals:
                if v not in col:
                    raise DataError(f"Payload {r} of {modality.name!r} has variable {v!r} that "
                                    f"the modality does not declare.")
                out[r, col[v]] = x
        out[~np.isfinite(out)] = np.nan
        return out

    def fit(self, modality: ModalitySpec, payloads: Sequence[Any]) -> None:
        x = self._summary(modality, payloads)
        seen = ~np.isnan(x)
        n = seen.sum(axis=0)
        mean = np.divide(np.where(seen, x, 0.0).sum(0), n, out=np.zeros(x.shape[1]), where=n > 0)
        var = np.divide((np.where(seen, x - mean, 0.0) ** 2).sum(0), n,
                        out=np.zeros(x.shape[1]), where=n > 0)
        std = np.sqrt(var)
        std[~(std > 1e-8)] = 1.0
        self._state[modality.name] = {"mean": mean, "std": std}

    def get_state(self, modality: ModalitySpec) -> dict[str, np.ndarray]:
        return {k: v.copy() for k, v in self._fitted(modality).items()}

    def set_state(self, modality: ModalitySpec, state: dict[str, np.ndarray]) -> None:
        v = len(modality.variables)
        if set(state) != {"mean", "std"} or any(np.shape(state[k]) != (v,) for k in state):
            raise DataError(f"State for {modality.name!r} must hold 'mean' and 'std' of shape "
                            f"[{v}]; found { {k: np.shape(x) for k, x in state.items()} }.")
        self._state[modality.name] = {k: np.asarray(x, dtype=np.float64).copy()
                                      for k, x in state.items()}

    def _fitted(self, modality: ModalitySpec) -> dict[str, np.ndarray]:
        if modality.name not in self._state:
            raise DataError(f"Expert {self.name!r} is not fitted for modality "
                            f"{modality.name!r}: call fit() or set_state() first.")
        return self._state[modality.name]

    def encode(self, modality: ModalitySpec, payloads: Sequence[Any]) -> np.ndarray:
        st = self._fitted(modality)
        x = self._summary(modality, payloads)  # [N, V]
        seen = ~np.isnan(x)
        z = np.clip(np.where(seen, (np.where(seen, x, 0.0) - st["mean"]) / st["std"], 0.0),
                    -10.0, 10.0)
        return np.concatenate([z, seen.astype(np.float64)], axis=1).astype(np.float32)
'''

_FUSER = '''\
"""A fuser: mean of each modality's available experts, then a learned, mask-aware score
per modality weighting the per-modality classifier logits.

Built from medmix's FusionModel, which adds the per-expert adapters and projections, one
head per modality, and a learned prior for samples with no modality at all.
"""

from __future__ import annotations

import torch
from medmix_core import FusionModel, FusionSpec, InterFuser, IntraFuser, masked_softmax
from torch import nn


class MeanOfExperts(IntraFuser):
    """Uniform mean over the available experts; 0 when none is present."""

    def __init__(self, d: int, n_experts: int) -> None:
        super().__init__()

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        m = mask.to(z.dtype)  # [B, K]
        g = m / m.sum(dim=1, keepdim=True).clamp_min(1.0)
        return torch.einsum("bk,bkd->bd", g, z), g


class ScoredModalities(InterFuser):
    """w = softmax over available modalities of a linear score of each representation."""

    def __init__(self, n_modalities: int, d: int, n_outputs: int) -> None:
        super().__init__()
        self.score = nn.Linear(d, 1)

    def forward(self, logits: torch.Tensor, reps: torch.Tensor,
                mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        w = masked_softmax(self.score(reps).squeeze(-1), mask)  # [B, M]
        return torch.einsum("bm,bmc->bc", w, logits), w


def build_fuser(spec: FusionSpec, d: int = 128, dropout: float = 0.1, **_: object) -> FusionModel:
    """Factory medmix calls with the run's FusionSpec and fuser options."""
    return FusionModel(spec, intra=MeanOfExperts, inter=ScoredModalities, d=d, dropout=dropout)
'''

_CONFTEST = '''\
"""Register the plugin by hand when it is not installed (``PYTHONPATH=. pytest``)."""

from medmix_core.plugins import get_plugin_manager

import $package

pm = get_plugin_manager()
if not pm.is_registered($package):
    pm.register($package, name="$short")
'''

_TESTS = '''\
"""Tests parametrized over every name this plugin registers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from medmix_core import (
    Batch,
    Fuser,
    FusionSpec,
    ModalitySpec,
    TabularData,
    TimeSeriesData,
)
from medmix_core.errors import MedmixError
from medmix_core.plugins import get_expert, get_fuser, get_plugin_manager, registry

import $package


def names(kind: str) -> list[str]:
    plugin = get_plugin_manager().get_name($package)
    return sorted(e.name for e in registry().entries[kind].values() if e.plugin == plugin)


EXPERTS = names("experts")
FUSERS = names("fusers")
VARS = ["a", "b", "c", "d"]


def test_registers_its_names():
    assert EXPERTS == $expert_names
    assert FUSERS == $fuser_names


def payloads(kind: str, n: int = 30):
    rng = np.random.default_rng(0)
    if kind == "tabular":
        x = rng.normal(size=(n, len(VARS)))
        x[rng.random(x.shape) < 0.2] = np.nan
        return ModalitySpec("tab", "tabular", VARS), [TabularData(VARS, r) for r in x]
    series = []
    for _ in range(n):
        k = [int(rng.integers(0, 4)) for _ in VARS]
        series.append(TimeSeriesData(VARS, [np.sort(rng.uniform(0, 48, j)) for j in k],
                                     [rng.normal(size=j) for j in k]))
    return ModalitySpec("ts", "timeseries", VARS), series


CASES = [(n, k) for n in EXPERTS for k in get_expert(n).kinds if k in ("tabular", "timeseries")]


@pytest.mark.parametrize("name,kind", CASES)
def test_expert_output_and_state(name, kind):
    modality, items = payloads(kind)
    expert = get_expert(name)()
    with pytest.raises(MedmixError):
        expert.encode(modality, items)  # not fitted yet
    expert.fit(modality, items[:20])
    out = expert.encode(modality, items)
    assert out.shape == (len(items), expert.dim(modality))
    assert out.dtype == np.float32 and np.isfinite(out).all()
    fresh = get_expert(name)()
    fresh.set_state(modality, expert.get_state(modality))
    np.testing.assert_array_equal(fresh.encode(modality, items), out)


def batch_and_spec(b: int = 32):
    g = torch.Generator().manual_seed(0)
    dims = {"m0": [6, 4], "m1": [5], "m2": [3, 7, 2]}
    spec = FusionSpec(modalities=list(dims), experts={m: [f"e{k}" for k in range(len(d))]
                                                      for m, d in dims.items()},
                      dims=dims, n_outputs=1)
    experts = {m: [torch.randn(b, k, generator=g) for k in d] for m, d in dims.items()}
    mask = {m: torch.rand(b, len(d), generator=g) > 0.3 for m, d in dims.items()}
    for m_mask in mask.values():
        m_mask[:2] = False  # two samples with nothing available
    mm = torch.stack([mask[m].any(1) for m in dims], 1)  # [B, M]
    labels = (torch.rand(b, 1, generator=g) > 0.5).float()
    return spec, Batch(experts=experts, expert_mask=mask, modality_mask=mm, labels=labels,
                       label_mask=torch.ones(b, dtype=torch.bool), modalities=list(dims))


@pytest.mark.parametrize("name", FUSERS)
def test_fuser_shapes_masks_and_training(name):
    spec, batch = batch_and_spec()
    torch.manual_seed(0)
    model = get_fuser(name)(spec, d=16, dropout=0.0)
    assert isinstance(model, Fuser)
    out = model.eval()(batch)
    assert out.logits.shape == (batch.size, 1) and torch.isfinite(out.logits).all()
    if out.modality_weights is not None:
        assert (out.modality_weights[~batch.modality_mask] == 0).all()
    # garbage in masked slots must not reach the output
    batch.experts = {m: [torch.where(batch.expert_mask[m][:, k:k + 1], x,
                                     torch.full_like(x, math.nan)) for k, x in enumerate(xs)]
                     for m, xs in batch.experts.items()}
    torch.testing.assert_close(model(batch).logits, out.logits)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    first = None
    for _ in range(30):
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch).logits,
                                                                    batch.labels)
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first
'''
