"""The documentation stays honest: every hook and every built-in plugin name has an entry,
the code it shows is the code that runs, the errors it quotes are the errors medmix
raises, and the site builds with ``mkdocs build --strict``.
"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from medmix_core import hookspecs
from medmix_core.plugins import KINDS, get_plugin_manager, load_errors, registry

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
#: the page that documents each registry kind; one "### `name`" heading per name
KIND_PAGES = {
    "experts": "plugins/experts.md",
    "teachers": "plugins/experts.md",
    "fusers": "plugins/fusers.md",
    "losses": "plugins/losses.md",
    "datasets": "plugins/datasets.md",
    "bridges": "plugins/experts.md",
}
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*(?:\{#([\w-]+)\})?\s*$", re.MULTILINE)
_NAME_HEADING = re.compile(r"^###\s+`([^`]+)`\s*(?:\{#[\w-]+\})?\s*$", re.MULTILINE)
_SNIPPET = re.compile(r'^\s*--8<--\s+"([^"]+)"\s*$', re.MULTILINE)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("MEDMIX_PLUGINS", "MEDMIX_TRACE_HOOKS")}
    env["OMP_NUM_THREADS"] = "1"  # tiny models: one thread is faster on a shared machine
    env.update(extra)
    return env


def _page(rel: str) -> str:
    return (DOCS / rel).read_text("utf-8")


def _headings(text: str) -> list[tuple[str, str | None]]:
    """(heading text, explicit anchor) of every Markdown heading outside code fences."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.MULTILINE | re.DOTALL)
    return [(m.group(2), m.group(3)) for m in _HEADING.finditer(text)]


def _documents(text: str, name: str) -> bool:
    """A heading naming ``name`` in backticks, or an explicit ``{#name}`` anchor."""
    return any(f"`{name}`" in h or anchor == name for h, anchor in _headings(text))


def _builtin_plugins() -> set[str]:
    """Entry-point names of the plugins that ship with medmix (not third-party ones)."""
    pm = get_plugin_manager()
    return {pm.get_name(plugin) for plugin, dist in pm.list_plugin_distinfo()
            if dist.project_name == "medmix"}


# ----------------------------------------------------------------------------- coverage
def test_every_hook_is_documented():
    hooks = sorted(n for n in dir(hookspecs)
                   if getattr(getattr(hookspecs, n), "medmix_spec", None) is not None)
    assert {"register_experts", "register_fusers", "register_commands"} <= set(hooks)
    page = _page("plugins/hooks.md")
    missing = [h for h in hooks if not _documents(page, h)]
    assert not missing, (f"hooks without a '## `name`' section in docs/plugins/hooks.md: "
                         f"{missing}")


@pytest.mark.parametrize("kind", KINDS)
def test_every_builtin_plugin_name_is_documented(kind):
    builtin = _builtin_plugins()
    entries = [e for e in registry().entries[kind].values() if e.plugin in builtin]
    page = _page(KIND_PAGES[kind])
    missing = sorted(e.name for e in entries if not _documents(page, e.name))
    assert not missing, (f"{kind} registered by built-in plugins but without a "
                         f"'### `name`' section in docs/{KIND_PAGES[kind]}: {missing}")


def test_documented_plugin_names_are_registered():
    errors = load_errors()
    if errors:
        pytest.skip(f"plugins failed to load here ({sorted(errors)}), so their names "
                    f"cannot be checked")
    reg = registry()
    stale = []
    for page in sorted(set(KIND_PAGES.values())):
        kinds = [k for k, p in KIND_PAGES.items() if p == page]
        known = {n for k in kinds for n in reg.names(k)}
        text = re.sub(r"^```.*?^```", "", _page(page), flags=re.MULTILINE | re.DOTALL)
        stale += [f"{page}: {n}" for n in _NAME_HEADING.findall(text) if n not in known]
    assert not stale, f"documented plugin names that nothing registers: {stale}"


def test_snippet_includes_point_at_existing_files():
    includes = []
    for md in DOCS.rglob("*.md"):
        for rel in _SNIPPET.findall(md.read_text("utf-8")):
            includes.append(rel)
            assert (ROOT / rel).is_file(), f"{md.relative_to(ROOT)} includes missing {rel}"
    # the tutorial shows exactly the tested example plugin, file for file
    plugin = ROOT / "examples" / "medmix-example-plugin"
    for f in [plugin / "pyproject.toml", *plugin.glob("medmix_example_plugin/*.py"),
              *plugin.glob("tests/*.py")]:
        assert str(f.relative_to(ROOT)) in includes, f"the tutorial does not include {f}"
    assert "examples/quickstart_synthetic.py" in includes
    assert "examples/read_results.py" in includes


def _load_docs_hooks():
    spec = importlib.util.spec_from_file_location("medmix_docs", DOCS / "hooks" / "medmix_docs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cli_reference_is_generated_from_every_command():
    import typer

    from medmix_core.cli import app

    text = _load_docs_hooks().render_cli()
    group = typer.main.get_command(app)
    root = group.context_class(group, info_name="medmix")
    for name in group.list_commands(root):
        cmd = group.get_command(root, name)
        assert f"## `medmix {name}` {{#medmix-{name}}}" in text
        ctx = cmd.context_class(cmd, info_name=name, parent=root)
        for param in cmd.get_params(ctx):
            record = param.get_help_record(ctx)
            if record:
                assert f"`{' '.join(record[0].split())}`" in text, (name, record[0])
    assert "<!-- medmix:cli -->" in _page("cli.md")


def test_math_is_rendered_to_mathml():
    hooks = _load_docs_hooks()
    html = ('<p>a <span class="arithmatex">\\(z_k &lt; 1\\)</span></p>'
            '<div class="arithmatex">\\[\\sum_m w^{(m)}\\]</div>')
    out = hooks.tex_to_mathml(html)
    assert "arithmatex" not in out
    assert out.count("<math") == 2 and 'display="block"' in out
    assert "&#x0003C;" in out or "&lt;" in out  # the escaped '<' survived as a character


def test_sphinx_roles_in_docstrings_render_as_code():
    out = _load_docs_hooks().strip_sphinx_roles(
        "a :class:<code>~medmix_core.batch.Batch</code> and :meth:<code>fit</code>")
    assert out == "a <code>Batch</code> and <code>fit</code>"


# ----------------------------------------------------------------------------- quoted errors
def _broken_dist(folder: Path) -> Path:
    """A distribution ``broken-plugin`` whose entry point ``broken`` cannot be imported."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "broken_plugin.py").write_text(
        "import libfoo  # a dependency that is not installed\n")
    info = folder / "broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[medmix]\nbroken = broken_plugin\n")
    return folder


def test_faq_failed_plugin_output_is_what_medmix_prints(tmp_path):
    site = _broken_dist(tmp_path / "site")
    env = _env(PYTHONPATH=str(site), MEDMIX_PLUGINS="stats,synthetic,broken")
    res = subprocess.run([sys.executable, "-m", "medmix_core.cli", "plugins"], cwd=tmp_path,
                         env=env, capture_output=True, text=True, check=False, timeout=120)
    assert res.returncode == 0, res.stderr
    faq = _page("faq.md")
    lines = [ln for ln in res.stdout.splitlines() if ln.strip()]
    assert any("FAILED TO LOAD" in ln for ln in lines)
    for line in lines:
        assert line in faq, f"docs/faq.md no longer matches `medmix plugins`: {line!r}"
    res = subprocess.run([sys.executable, "-m", "medmix_core.cli", "plugins", "--json"],
                         cwd=tmp_path, env=env, capture_output=True, text=True, check=False,
                         timeout=120)
    err = json.loads(res.stdout)["errors"]["broken"]
    assert f'"broken": "{err}"' in faq


def test_faq_store_and_name_errors_are_what_medmix_raises(tmp_path, monkeypatch):
    from medmix_core import EmbeddingStore
    from medmix_core.config import make_config
    from medmix_core.errors import MedmixError, StoreError, UnknownPluginError
    from medmix_core.plugins import get_fuser

    faq = _page("faq.md")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(StoreError) as err:
        EmbeddingStore.open("stores/synthetic-typo")
    assert str(err.value) in faq
    (tmp_path / "stores" / "synth").mkdir(parents=True)
    with pytest.raises(StoreError) as err:
        EmbeddingStore.open("stores/synth")
    assert str(err.value) in faq
    with pytest.raises(UnknownPluginError) as err:
        get_fuser("medmixx")
    assert str(err.value).split(" Known fusers:")[0] in faq
    with pytest.raises(MedmixError) as err:
        make_config(fuser="medmix", epoch=5, lr=-1)  # the FAQ's bad.yaml
    head, _, listed = str(err.value).partition("allowed settings: ")
    assert f"Error: {head}allowed settings: " in faq
    # the quoted list may lag behind new settings, but must not name settings that left
    quoted = faq.split("allowed settings: ", 1)[1].split("\n", 1)[0].split(", ")
    assert set(quoted) <= set(listed.split(", ")), set(quoted) - set(listed.split(", "))


# ----------------------------------------------------------------------------- examples
@pytest.mark.slow
def test_quickstart_and_read_results_examples_run(tmp_path):
    out = tmp_path / "quickstart"
    res = subprocess.run([sys.executable, str(ROOT / "examples" / "quickstart_synthetic.py"),
                          str(out)], cwd=tmp_path, env=_env(), capture_output=True, text=True,
                         check=False, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "test AUROC" in res.stdout
    run_dir = out / "run"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["fuser"] == "medmix" and metrics["seeds"] == [0, 1]
    assert metrics["distill"] is True and metrics["teacher"] == "teacher"
    assert 0.0 <= metrics["test"]["auroc"]["mean"] <= 1.0
    with open(run_dir / "predictions.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == metrics["n_test"]
    assert {"prob_seed0", "prob_seed1", "weight_mod0"} <= set(rows[0])
    for s in (0, 1):
        assert (run_dir / f"seed_{s}" / "model.safetensors").is_file()

    res = subprocess.run([sys.executable, str(ROOT / "examples" / "read_results.py"),
                          str(run_dir)], cwd=tmp_path, env=_env(), capture_output=True,
                         text=True, check=False, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    auroc = metrics["test"]["auroc"]
    assert f"auroc     {auroc['mean']:.3f} ± {auroc['std']:.3f}" in res.stdout
    assert "highest predicted risk:" in res.stdout
    assert re.search(r"seed 0: FusionModel with [\d,]+ parameters", res.stdout)


# ----------------------------------------------------------------------------- the site
@pytest.mark.slow
def test_mkdocs_build_strict(tmp_path):
    missing = [m for m in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python",
                           "pymdownx", "latex2mathml") if importlib.util.find_spec(m) is None]
    if missing:
        pytest.skip(f"docs tooling not installed ({', '.join(missing)}): "
                    f"pip install -e '.[docs]'")
    assert (DOCS / "performance.md").is_file(), (
        "docs/performance.md is missing: mkdocs.yml's nav and several pages link it")
    site = tmp_path / "site"
    res = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(site)],
                         cwd=ROOT, env=_env(NO_MKDOCS_2_WARNING="1"), capture_output=True,
                         text=True, check=False, timeout=600)
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-4000:]
    cli = (site / "cli" / "index.html").read_text("utf-8")
    assert 'id="medmix-run"' in cli and "--fuser" in cli
    plugins = re.sub(r"<[^>]+>", "", (site / "plugins" / "index.html").read_text("utf-8"))
    assert "medmix plugins" in plugins and "register_fusers" in plugins
    data = (site / "data" / "physionet2012" / "index.html").read_text("utf-8")
    assert "<td><code>cardiac</code></td>" in data
    for html in site.rglob("*.html"):
        text = html.read_text("utf-8")
        assert "<!-- medmix:" not in text, f"unreplaced marker in {html}"
        assert 'class="arithmatex"' not in text, f"unrendered maths in {html}"
        assert ":class:<code>" not in text, f"raw Sphinx role in {html}"
