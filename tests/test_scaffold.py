"""``medmix_core.scaffold.new_plugin``: the skeleton is complete and its own tests pass."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

try:
    import tomllib
except ImportError:  # Python 3.10
    tomllib = pytest.importorskip("tomli")

from medmix_core.errors import MedmixError
from medmix_core.scaffold import (
    TEMPLATE_DIR,
    TEMPLATE_NAMES,
    ScaffoldError,
    new_plugin,
    plugin_names,
    render,
)

_MARKER_LINE = re.compile(r"^[ \t]*# template: \w+\n", re.MULTILINE)
_MARKER_TAIL = re.compile(r"[ \t]*(?:# template: \w+|<!-- template: \w+ -->)$", re.MULTILINE)


def _run(args: list[str], cwd: Path, pythonpath: Path | str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": "1",
           "PYTHONDONTWRITEBYTECODE": "1"}  # no __pycache__ left in the template folder
    env.pop("MEDMIX_PLUGINS", None)
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True,
                          text=True, check=False, timeout=300)


def _template_files() -> dict[str, str]:
    """Relative path -> text of every file of the template folder (caches left out)."""
    return {p.relative_to(TEMPLATE_DIR).as_posix(): p.read_text("utf-8")
            for p in sorted(TEMPLATE_DIR.rglob("*"))
            if p.is_file() and not {"__pycache__", ".pytest_cache", ".ruff_cache"}
            & set(p.relative_to(TEMPLATE_DIR).parts)}


def _copy_template(dest: Path) -> Path:
    shutil.copytree(TEMPLATE_DIR, dest, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


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
    assert "4 passed" in res.stdout, res.stdout


@pytest.mark.slow
def test_single_part_skeletons_pass_their_tests(tmp_path):
    # one process for both (torch loads once); importlib mode keeps the two same-named
    # test modules apart
    roots = [new_plugin(f"medmix-skel-{kind}", tmp_path, kind=kind) for kind in ("expert", "fuser")]
    res = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "--import-mode=importlib",
                "--rootdir", str(tmp_path), *(str(r / "tests") for r in roots)], cwd=tmp_path,
               pythonpath=os.pathsep.join(str(r) for r in roots))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "5 passed" in res.stdout, res.stdout  # expert: 3 tests, fuser: 2


@pytest.mark.slow
def test_editable_install_registers_the_skeleton_through_its_entry_point(tmp_path):
    root = new_plugin("medmix-skel", tmp_path / "src", kind="expert")
    target = tmp_path / "site"
    cmd = ["-m", "pip", "install", "-q", "--no-deps", "--target", str(target), "-e", str(root)]
    try:
        import setuptools  # noqa: F401  (build in this environment: no download needed)
        cmd.insert(4, "--no-build-isolation")
    except ImportError:
        pass
    res = _run(cmd, cwd=tmp_path, pythonpath=tmp_path)
    if res.returncode != 0:
        pytest.skip(f"pip could not build the skeleton here: {res.stderr[-500:]}")
    # an editable install hooks in through a .pth file, which only a site directory runs
    boot = ("import site, sys; site.addsitedir(sys.argv.pop(1)); import medmix_skel; "
            "print(medmix_skel.__file__); from medmix_core.cli import main; main()")
    res = _run(["-c", boot, str(target), "plugins", "--json"], cwd=tmp_path,
               pythonpath=tmp_path)
    assert res.returncode == 0, res.stderr
    where, listing = res.stdout.split("\n", 1)
    assert Path(where) == root / "medmix_skel" / "__init__.py"  # the source, not a copy
    info = {p["name"]: p for p in json.loads(listing)["plugins"]}
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


# ----------------------------------------------------------------------------- the template
def test_template_is_the_plugin_its_names_describe():
    assert TEMPLATE_NAMES == plugin_names("medmix-plugin-template")
    meta = tomllib.loads((TEMPLATE_DIR / "pyproject.toml").read_text("utf-8"))
    assert meta["project"]["name"] == "medmix-plugin-template"
    assert meta["project"]["entry-points"]["medmix"] == {
        "plugin-template": "medmix_plugin_template"}
    for rel, text in _template_files().items():
        if rel.endswith(".py"):
            compile(text, rel, "exec")  # valid Python as it stands, markers included


def test_every_template_file_ships_as_package_data():
    # setuptools' package-data globs skip names starting with a dot
    files = _template_files()
    assert not [rel for rel in files if any(p.startswith(".") for p in rel.split("/"))]
    assert {"pyproject.toml", "README.md", "gitignore"} <= set(files)


@pytest.mark.parametrize("kind", ["both", "expert", "fuser"])
def test_render_is_the_template_with_names_replaced_and_markers_resolved(kind):
    files = render(plugin_names("medmix-skel"), kind)
    template = _template_files()
    unused = {"expert": "fuser", "fuser": "expert"}.get(kind)
    expected = {rel.replace("medmix_plugin_template", "medmix_skel").replace(
        "gitignore", ".gitignore") for rel in template if unused is None
        or rel != f"medmix_plugin_template/{unused}.py"}
    assert set(files) == expected
    for rel, text in files.items():
        for leftover in ("plugin-template", "plugin_template", "template:"):
            assert leftover not in text, f"{leftover!r} left in {rel}"
    if kind == "both":  # every line kept, markers stripped, names replaced
        for rel, text in template.items():
            stripped = _MARKER_TAIL.sub("", _MARKER_LINE.sub("", text))
            stripped = stripped.replace("medmix-plugin-template", "medmix-skel").replace(
                "medmix_plugin_template", "medmix_skel").replace("plugin-template", "skel")
            assert files[rel.replace("medmix_plugin_template", "medmix_skel").replace(
                "gitignore", ".gitignore")] == stripped
    else:  # the unused part is gone from every file, with no blank lines left behind
        init = files["medmix_skel/__init__.py"]
        assert unused not in init and init.endswith(")\n") and "\n\n\n\n" not in init
        assert f"{unused}s\"] = " not in files["tests/test_plugin.py"]
        assert f"`medmix_skel/{unused}.py`" not in files["README.md"]


def test_names_are_replaced_in_one_pass():
    # the new names contain the template's: a second pass would rename them again
    names = plugin_names("medmix-plugin-template-x")
    files = render(names, "both")
    meta = tomllib.loads(files["pyproject.toml"])
    assert meta["project"]["name"] == "medmix-plugin-template-x"
    assert meta["project"]["entry-points"]["medmix"] == {
        "plugin-template-x": "medmix_plugin_template_x"}
    assert 'register("plugin-template-x", SummaryExpert)' in files[
        "medmix_plugin_template_x/__init__.py"]


def test_caches_in_the_template_folder_are_left_out(tmp_path):
    template = _copy_template(tmp_path / "t")
    for junk in ("medmix_plugin_template/__pycache__/expert.cpython-311.pyc",
                 ".pytest_cache/v/cache/nodeids", "medmix_plugin_template.egg-info/PKG-INFO"):
        (template / junk).parent.mkdir(parents=True, exist_ok=True)
        (template / junk).write_text("x")
    assert set(render(plugin_names("medmix-skel"), "both", template)) == set(
        render(plugin_names("medmix-skel"), "both"))


@pytest.mark.parametrize("edit,match", [
    ("# template: expret\n", "'template: expret' is not one of"),
    ("x = 1  # template: end\n", "'template: end' is not one of"),
    ("# template: end\n", "closes no block"),
    ("# template: fuser\n# template: expert\n# template: end\n", "opens inside block"),
    ("# template: fuser\nx = 1\n", "is never closed"),
])
def test_a_broken_template_marker_is_refused_before_writing(tmp_path, edit, match):
    template = _copy_template(tmp_path / "t")
    init = template / "medmix_plugin_template" / "__init__.py"
    init.write_text(init.read_text("utf-8") + edit, "utf-8")
    with pytest.raises(ScaffoldError, match=match) as err:
        render(plugin_names("medmix-skel"), "both", template)
    assert "medmix_plugin_template/__init__.py" in str(err.value)


def test_a_template_folder_without_its_files_is_refused(tmp_path, monkeypatch):
    template = _copy_template(tmp_path / "t")
    (template / "medmix_plugin_template" / "fuser.py").unlink()
    with pytest.raises(ScaffoldError, match=r"lacks \['medmix_plugin_template/fuser.py'\]"):
        render(plugin_names("medmix-skel"), "expert", template)
    monkeypatch.setattr("medmix_core.scaffold.TEMPLATE_DIR", tmp_path / "nowhere")
    with pytest.raises(ScaffoldError, match="reinstall it"):
        new_plugin("medmix-skel", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # refused before the first byte


@pytest.mark.slow
def test_template_tests_pass_in_place_and_leave_it_clean():
    before = _template_files(), sorted(TEMPLATE_DIR.rglob("*"))
    res = _run(["-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=TEMPLATE_DIR,
               pythonpath=TEMPLATE_DIR)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "4 passed" in res.stdout, res.stdout
    assert (_template_files(), sorted(TEMPLATE_DIR.rglob("*"))) == before  # no cache written


def test_template_is_ruff_clean():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    if ruff is None:
        pytest.skip("ruff is not installed")
    res = subprocess.run([ruff, "check", "--no-cache", str(TEMPLATE_DIR)], capture_output=True,
                         text=True, check=False, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
