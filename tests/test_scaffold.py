"""``medmix_core.scaffold.new_plugin``: the skeleton is complete and its own tests pass."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from medmix_core.errors import MedmixError
from medmix_core.scaffold import ScaffoldError, new_plugin, plugin_names


def _run(args: list[str], cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    env.pop("MEDMIX_PLUGINS", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, check=False, timeout=300)


def test_names_derived_from_the_distribution_name():
    assert plugin_names("medmix-pca") == {"distribution": "medmix-pca", "package": "medmix_pca",
                                          "short": "pca"}
    assert plugin_names("my_lab-encoder")["package"] == "my_lab_encoder"
    for bad in ("", "PCA", "1pca", "pca--x", "pca-", "has space", "medmix", "import"):
        with pytest.raises(ScaffoldError):
            plugin_names(bad)


@pytest.mark.parametrize("kind,files,absent", [
    ("both", ["expert.py", "fuser.py"], []),
    ("expert", ["expert.py"], ["fuser.py"]),
    ("fuser", ["fuser.py"], ["expert.py"]),
])
def test_skeleton_files_and_entry_point(tmp_path, kind, files, absent):
    root = new_plugin("medmix-skel", tmp_path, kind=kind)
    assert root == tmp_path / "medmix-skel"
    meta = tomllib.loads((root / "pyproject.toml").read_text())
    assert meta["project"]["name"] == "medmix-skel"
    assert meta["project"]["entry-points"]["medmix"] == {"skel": "medmix_skel"}
    for f in files:
        assert (root / "medmix_skel" / f).is_file()
    for f in absent:
        assert not (root / "medmix_skel" / f).exists()
    init = (root / "medmix_skel" / "__init__.py").read_text()
    assert ("register_experts" in init) == (kind != "fuser")
    assert ("register_fusers" in init) == (kind != "expert")
    for py in root.rglob("*.py"):
        compile(py.read_text(), str(py), "exec")  # every file is valid Python


def test_refuses_a_non_empty_folder_and_accepts_an_empty_one(tmp_path):
    (tmp_path / "medmix-skel").mkdir()
    new_plugin("medmix-skel", tmp_path)  # empty: fine
    before = (tmp_path / "medmix-skel" / "README.md").read_text()
    with pytest.raises(ScaffoldError, match="refusing to overwrite"):
        new_plugin("medmix-skel", tmp_path)
    assert (tmp_path / "medmix-skel" / "README.md").read_text() == before


def test_refuses_names_already_in_use(tmp_path):
    with pytest.raises(ScaffoldError, match="already registered by plugin 'stats'"):
        new_plugin("medmix-stats", tmp_path, kind="expert")
    with pytest.raises(ScaffoldError, match="already registered"):
        new_plugin("medmix-medmix", tmp_path, kind="fuser")
    with pytest.raises(ScaffoldError, match="already importable"):
        new_plugin("medmix-core", tmp_path)
    with pytest.raises(MedmixError, match="not one of"):
        new_plugin("medmix-skel", tmp_path, kind="loss")
    assert list(tmp_path.iterdir()) == []  # nothing written on refusal


@pytest.mark.slow
def test_generated_tests_pass_without_installing(tmp_path):
    root = new_plugin("medmix-skel", tmp_path)
    res = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=root,
               pythonpath=root)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "4 passed" in res.stdout


@pytest.mark.slow
def test_installed_skeleton_is_listed_by_medmix_plugins(tmp_path):
    root = new_plugin("medmix-skel", tmp_path / "src", kind="expert")
    target = tmp_path / "site"
    cmd = ["-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(root)]
    try:
        import setuptools  # noqa: F401  (build in this environment: no download needed)
        cmd.insert(4, "--no-build-isolation")
    except ImportError:
        pass
    res = _run(cmd, cwd=tmp_path, pythonpath=tmp_path)
    if res.returncode != 0:
        pytest.skip(f"pip could not build the skeleton here: {res.stderr[-500:]}")
    res = _run(["-m", "medmix_core.cli", "plugins", "--json"], cwd=tmp_path, pythonpath=target)
    assert res.returncode == 0, res.stderr
    info = {p["name"]: p for p in json.loads(res.stdout)["plugins"]}
    assert info["skel"]["distribution"] == "medmix-skel 0.1.0"
    assert info["skel"]["registers"] == {"experts": ["skel"]}


def test_new_plugin_command(tmp_path):
    import typer
    from typer.testing import CliRunner

    from medmix_core.cli import app

    group = typer.main.get_command(app)
    if "new-plugin" not in group.list_commands(group.context_class(group, info_name="medmix")):
        pytest.skip("`medmix new-plugin` is not wired into medmix_core/cli.py yet")
    runner = CliRunner()
    res = runner.invoke(app, ["new-plugin", "medmix-cli-skel", "--dest", str(tmp_path),
                              "--kind", "fuser"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "medmix-cli-skel" / "medmix_cli_skel" / "fuser.py").is_file()
    res = runner.invoke(app, ["new-plugin", "medmix-cli-skel", "--dest", str(tmp_path)])
    assert res.exit_code == 2 and "refusing to overwrite" in res.output
