"""MkDocs build hooks: pages that are generated from the code, never written by hand.

Markers replaced in the Markdown of any page:

``<!-- medmix:cli -->``
    the reference of every ``medmix`` command, rendered from the Typer app (including the
    commands plugins add through ``register_commands``): help text, usage, options.
``<!-- medmix:plugins -->``
    the output of ``medmix plugins``, run for real at build time.
``<!-- medmix:physionet2012 -->``
    the bundled PhysioNet 2012 cohort as the dataset plugin loads it: modalities, their
    variables and units, missing rates, labels and splits.

After Markdown: TeX that ``pymdownx.arithmatex`` protected is converted to MathML with
``latex2mathml``, so equations render in the browser without JavaScript or a CDN; and
the Sphinx roles some docstrings use (``:class:`~a.b.C```) are shown as plain code.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
import tempfile

CLI_MARKER = "<!-- medmix:cli -->"
PLUGINS_MARKER = "<!-- medmix:plugins -->"
P12_MARKER = "<!-- medmix:physionet2012 -->"

_cache: dict[str, str] = {}
_commands_registered = False


def on_pre_build(config, **kwargs) -> None:
    _cache.clear()


def on_page_markdown(markdown: str, page, config, files, **kwargs) -> str:
    if CLI_MARKER in markdown:
        markdown = markdown.replace(CLI_MARKER, _cached("cli", render_cli))
    if PLUGINS_MARKER in markdown:
        markdown = markdown.replace(PLUGINS_MARKER, _cached("plugins", render_plugins))
    if P12_MARKER in markdown:
        markdown = markdown.replace(P12_MARKER, _cached("p12", render_physionet2012))
    return markdown


def on_page_content(html_text: str, page, config, files, **kwargs) -> str:
    return strip_sphinx_roles(tex_to_mathml(html_text))


def _cached(key: str, fn) -> str:
    if key not in _cache:
        _cache[key] = fn()
    return _cache[key]


# ----------------------------------------------------------------------------- CLI
def _text(text: str) -> str:
    """Help text as Markdown: ``<dataset>`` must stay text, not become an HTML tag.

    Code spans are left alone (Markdown escapes their content itself).
    """
    parts = re.split(r"(`[^`]*`)", text)
    return "".join(p if p.startswith("`") else html.escape(p, quote=False) for p in parts)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return " ".join(_text(text).split()).replace("|", "\\|")


def render_cli() -> str:
    """Markdown reference of every medmix command, from the Typer app itself."""
    global _commands_registered
    import typer

    from medmix_core import cli
    from medmix_core.plugins import get_plugin_manager

    if not _commands_registered:  # what `medmix` does at start-up, once per process
        get_plugin_manager().hook.register_commands(app=cli.app)
        _commands_registered = True
    group = typer.main.get_command(cli.app)
    root = group.context_class(group, info_name="medmix")
    out = [f"```text\n{group.get_usage(root)}\n```", "", _text((group.help or "").strip()), ""]
    names = [n for n in group.list_commands(root) if not group.get_command(root, n).hidden]
    out.append("| Command | What it does |")
    out.append("|---|---|")
    for name in names:
        cmd = group.get_command(root, name)
        first = (cmd.help or "").strip().split("\n\n")[0]
        out.append(f"| [`medmix {name}`](#medmix-{name}) | {_cell(first)} |")
    out.append("")
    for name in names:
        cmd = group.get_command(root, name)
        ctx = cmd.context_class(cmd, info_name=name, parent=root)
        out.append(f"## `medmix {name}` {{#medmix-{name}}}")
        out.append("")
        out.append(_text((cmd.help or "").replace("\b\n", "").strip()))
        out.append("")
        out.append(f"```text\n{cmd.get_usage(ctx)}\n```")
        out.append("")
        rows = [p.get_help_record(ctx) for p in cmd.get_params(ctx)]
        rows = [r for r in rows if r]
        if rows:
            out.append("| Option | Description |")
            out.append("|---|---|")
            for decl, text in rows:
                decl = " ".join(decl.split()).replace("|", "\\|")
                out.append(f"| `{decl}` | {_cell(text or '')} |")
            out.append("")
    return "\n".join(out)


# ----------------------------------------------------------------------------- plugins
def render_plugins() -> str:
    """``medmix plugins`` as it prints on the machine that builds these docs."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("MEDMIX_PLUGINS", "MEDMIX_TRACE_HOOKS")}
    env["NO_COLOR"] = "1"
    with tempfile.TemporaryDirectory() as tmp:
        res = subprocess.run([sys.executable, "-m", "medmix_core.cli", "plugins"], cwd=tmp,
                             env=env, capture_output=True, text=True, check=False, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"`medmix plugins` failed while building the docs "
                           f"(exit {res.returncode}):\n{res.stdout}\n{res.stderr}")
    text = (res.stdout + res.stderr).rstrip()
    return f"```console\n$ medmix plugins\n{text}\n```"


# ----------------------------------------------------------------------------- data
def render_physionet2012() -> str:
    """Modalities, missing rates, labels and splits of the bundled cohort, from the plugin."""
    from medmix_core.plugins import get_dataset

    ds = get_dataset("physionet2012")()
    samples = ds.samples()
    report = ds.report()
    rates = report["missing_rates"]
    out = ["| modality | kind | variables (unit) | missing in |", "|---|---|---|---:|"]
    for m in ds.modalities():
        variables = ", ".join(f"{v} ({m.units[v]})" if m.units.get(v) else v
                              for v in m.variables)
        out.append(f"| `{m.name}` | {m.kind} | {_cell(variables)} | "
                   f"{100 * rates[m.name]:.1f} % |")
    n = report["n_stays"]
    out += ["", "| task | positive | unknown label |", "|---|---:|---:|"]
    for task, c in report["labels"].items():
        out.append(f"| `{task}` | {c['positive']:,} of {n:,} ({100 * c['positive'] / n:.2f} %) "
                   f"| {c['unknown']:,} |")
    splits = ds.splits(samples)
    out += ["", "Splits: " + ", ".join(f"{k} {len(v):,}" for k, v in splits.items())
            + f" stays (`split_seed` {ds.identity()['options']['split_seed']})."]
    return "\n".join(out)


# ----------------------------------------------------------------------------- maths
_INLINE = re.compile(r'<span class="arithmatex">\\\((.+?)\\\)</span>', re.DOTALL)
_BLOCK = re.compile(r'<div class="arithmatex">\\\[(.+?)\\\]</div>', re.DOTALL)


def tex_to_mathml(text: str) -> str:
    """Replace arithmatex's protected TeX (generic mode) with MathML."""
    if "arithmatex" not in text:
        return text
    from latex2mathml.converter import convert

    def block(m: re.Match) -> str:
        mathml = convert(html.unescape(m.group(1)), display="block")
        return f'<div class="math-block">{mathml}</div>'

    def inline(m: re.Match) -> str:
        return convert(html.unescape(m.group(1)))

    return _INLINE.sub(inline, _BLOCK.sub(block, text))


# ----------------------------------------------------------------------------- docstrings
_ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|exc|obj|const):(?=<code>)")
_TILDE = re.compile(r"<code>~(?:\w+\.)+(\w+)</code>")


def strip_sphinx_roles(text: str) -> str:
    """``:class:<code>~a.b.C</code>`` (a Sphinx role after Markdown) -> ``<code>C</code>``."""
    return _TILDE.sub(r"<code>\1</code>", _ROLE.sub("", text))
