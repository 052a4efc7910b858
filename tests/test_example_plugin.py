"""The third-party example plugin (examples/medmix-example-plugin), installed for real.

It is pip-installed into a temporary ``--target`` folder and used through PYTHONPATH in
subprocesses, so this environment is left unchanged: medmix must find it through its
entry point exactly as it would after ``pip install medmix-example-plugin``.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from medmix_core.plugins import registry

PLUGIN_SRC = Path(__file__).resolve().parents[1] / "examples" / "medmix-example-plugin"

pytestmark = pytest.mark.slow


def _env(pythonpath: Path) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    env.pop("MEDMIX_PLUGINS", None)
    return env


def _needs_builtins() -> None:
    """The end-to-end run uses the synthetic dataset, the stats expert and extraction."""
    missing = []
    if importlib.util.find_spec("medmix_core.extract") is None:
        missing.append("medmix_core/extract.py (extraction)")
    if "stats" not in registry().names("experts"):
        missing.append("the built-in 'stats' expert (plugins/medmix_experts/stats.py)")
    if "synthetic" not in registry().names("datasets"):
        missing.append("the built-in 'synthetic' dataset")
    if missing:
        pytest.skip("end-to-end run needs " + " and ".join(missing) + ", not present yet")


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The plugin installed (non-editable) into a temporary folder."""
    tmp = tmp_path_factory.mktemp("example_plugin")
    src = tmp / "src"
    # build from a copy, so pip's build folders never land in the repository
    shutil.copytree(PLUGIN_SRC, src, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", "__pycache__", ".pytest_cache"))
    target = tmp / "site"
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target),
           str(src)]
    if importlib.util.find_spec("setuptools") is not None:
        cmd.insert(5, "--no-build-isolation")  # build here, no download
    res = subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, check=False, timeout=300)
    assert res.returncode == 0, f"pip install failed:\n{res.stdout}\n{res.stderr}"
    assert (target / "medmix_example_plugin" / "__init__.py").is_file()
    return target


def test_medmix_plugins_lists_the_example_plugin(site, tmp_path):
    res = subprocess.run([sys.executable, "-m", "medmix_core.cli", "plugins", "--json"],
                         cwd=tmp_path, env=_env(site), capture_output=True, text=True, check=False,
                         timeout=120)
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    info = {p["name"]: p for p in data["plugins"]}
    assert "example" not in data["errors"], data["errors"]
    assert info["example"]["distribution"] == "medmix-example-plugin 0.1.0"
    assert info["example"]["module"] == "medmix_example_plugin"
    assert info["example"]["hooks"] == ["register_experts", "register_fusers"]
    assert info["example"]["registers"] == {"experts": ["pca"], "fusers": ["logit-average"]}
    text = subprocess.run([sys.executable, "-m", "medmix_core.cli", "plugins"], cwd=tmp_path,
                          env=_env(site), capture_output=True, text=True, check=False,
                          timeout=120).stdout
    assert "pca [tabular/timeseries; domain]" in text
    # the docs quote this listing; it must stay what medmix prints
    lines = text.splitlines()
    start = next(i for i, ln in enumerate(lines) if ln.startswith("example  ("))
    block = lines[start:start + 4]
    docs = PLUGIN_SRC.parents[1] / "docs" / "plugins"
    for page in ("tutorial.md", "index.md"):
        assert "\n".join(block) in (docs / page).read_text("utf-8"), page


def test_medmix_run_with_the_plugins_expert_and_fuser(site, tmp_path):
    _needs_builtins()
    out, store = tmp_path / "run", tmp_path / "store"
    res = subprocess.run(
        [sys.executable, "-m", "medmix_core.cli", "run", "--dataset", "synthetic",
         "--fuser", "logit-average", "--experts", "pca,stats", "--epochs", "3",
         "--store", str(store), "--out", str(out), "--device", "cpu"],
        cwd=tmp_path, env=_env(site), capture_output=True, text=True, check=False, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["fuser"] == "logit-average"
    assert set(metrics["experts"]) == {"pca", "stats"}
    auroc = metrics["test"]["auroc"]["mean"]
    assert auroc is not None and 0.0 <= auroc <= 1.0 and not math.isnan(auroc)
    assert (out / "seed_0" / "model.safetensors").is_file()
    config = json.loads((out / "config.json").read_text())
    assert config["fuser"] == "logit-average"
    # the store holds the plugin expert's embeddings, at its declared dim (8 scores + 16 flags)
    manifest = json.loads((store / "manifest.json").read_text())
    pca = [e for e in manifest["experts"]["mod0"] if e["name"] == "pca"]
    assert pca and pca[0]["dim"] == 8 + 16


def test_the_plugins_own_tests_pass_when_installed(site, tmp_path):
    tests = tmp_path / "tests"
    shutil.copytree(PLUGIN_SRC / "tests", tests)
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                          str(tests)], cwd=tmp_path, env=_env(site), capture_output=True,
                         text=True, check=False, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "failed" not in res.stdout
