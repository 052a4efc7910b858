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

The skeleton is the folder ``medmix_core/templates/plugin/``, itself a working plugin named
``medmix-plugin-template`` (package ``medmix_plugin_template``, short name
``plugin-template``) that ruff checks and whose tests run in place
(``PYTHONPATH=. pytest``). Rendering copies it and

- replaces those three names, in paths and contents, with the new plugin's;
- keeps a line ending in ``# template: expert`` (``<!-- template: expert -->`` in Markdown)
  only when the skeleton has an expert, without the marker; likewise ``fuser``;
- keeps the lines between a line ``# template: expert`` and a line ``# template: end`` only
  when the skeleton has an expert (a dropped block takes the blank lines before it along);
- leaves out ``<package>/expert.py`` or ``<package>/fuser.py`` when that part is not wanted;
- renames ``gitignore`` to ``.gitignore`` (a dotfile would not ship as package data).
"""

from __future__ import annotations

import importlib.util
import keyword
import re
from pathlib import Path

from medmix_core.errors import MedmixError
from medmix_core.store import atomic_write_text

PLUGIN_KINDS = ("expert", "fuser", "both")
_NAME = re.compile(r"^[a-z][a-z0-9]*(?:[-_][a-z0-9]+)*$")

#: the skeleton, as real files
TEMPLATE_DIR = Path(__file__).parent / "templates" / "plugin"
#: the names the template is written with; rendering replaces them with the new plugin's
TEMPLATE_NAMES = {"distribution": "medmix-plugin-template",
                  "package": "medmix_plugin_template", "short": "plugin-template"}
#: one alternation, longest first: the short name is a substring of the distribution name
_TEMPLATE_TOKEN = re.compile("|".join(re.escape(TEMPLATE_NAMES[k])
                                      for k in ("distribution", "package", "short")))
_PARTS = {"expert": ("expert",), "fuser": ("fuser",), "both": ("expert", "fuser")}
#: template files that only a skeleton with that part has
_PART_FILES = {"expert": "medmix_plugin_template/expert.py",
               "fuser": "medmix_plugin_template/fuser.py"}
#: template file names that differ from the skeleton's
_RENAMES = {"gitignore": ".gitignore"}
#: by-products of running or building the template in place; never part of a skeleton
_BYPRODUCT_DIRS = {"__pycache__", ".pytest_cache", ".ruff_cache", "build", "dist"}
_BYPRODUCT_SUFFIXES = (".pyc", ".pyo", ".egg-info")
#: "<line>  # template: <part>" (or <!-- ... --> in Markdown); <line> empty opens a block
_MARKER = re.compile(r"^(?P<body>.*?)\s*(?:#|<!--)\s*template:\s*(?P<part>[\w-]*)\s*(?:-->)?\s*$")


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
        ScaffoldError: an invalid name or kind, a name already in use, a target folder that
            exists and is not empty (nothing is ever overwritten), or a missing or broken
            template folder.
    """
    if kind not in PLUGIN_KINDS:
        raise ScaffoldError(f"Plugin kind {kind!r} is not one of {list(PLUGIN_KINDS)}.")
    names = plugin_names(name)
    target = Path(dest) / names["distribution"]
    if target.exists() and (not target.is_dir() or any(target.iterdir())):
        raise ScaffoldError(f"{target} already exists and is not an empty folder; refusing to "
                            f"overwrite it. Choose another --dest or remove it first.")
    _check_free(names, kind)
    files = render(names, kind)  # a broken template fails here, before the first byte
    for rel, text in files.items():
        atomic_write_text(target / rel, text)
    return target


def render(names: dict[str, str], kind: str, template: str | Path | None = None
           ) -> dict[str, str]:
    """Relative path -> text of every file of the skeleton.

    Args:
        names: the new plugin's names, as :func:`plugin_names` returns them.
        kind: ``"expert"``, ``"fuser"`` or ``"both"``.
        template: the template folder (default :data:`TEMPLATE_DIR`).
    Returns:
        the skeleton's files, paths relative to its root with ``/`` separators.
    Raises:
        ScaffoldError: an unknown kind, a template folder that is missing or lacks a file, or
            a template marker that is unknown or unbalanced.
    """
    if kind not in PLUGIN_KINDS:
        raise ScaffoldError(f"Plugin kind {kind!r} is not one of {list(PLUGIN_KINDS)}.")
    root = Path(TEMPLATE_DIR if template is None else template)
    required = ["pyproject.toml", "medmix_plugin_template/__init__.py", *_PART_FILES.values()]
    absent = [rel for rel in required if not (root / rel).is_file()]
    if absent:
        raise ScaffoldError(f"The plugin template {root} lacks {absent}: expected a folder "
                            f"holding the template plugin 'medmix-plugin-template'. If medmix "
                            f"was installed without its package data, reinstall it.")
    parts = _PARTS[kind]
    dropped = {rel for part, rel in _PART_FILES.items() if part not in parts}
    files = {}
    for src in sorted(root.rglob("*")):
        rel = src.relative_to(root)
        if not src.is_file() or _is_byproduct(rel) or rel.as_posix() in dropped:
            continue
        text = _select(src.read_text("utf-8"), parts, rel.as_posix())
        out = "/".join(_RENAMES.get(piece, piece) for piece in rel.parts)
        files[_rename(out, names)] = _rename(text, names)
    return files


def _is_byproduct(rel: Path) -> bool:
    """Caches and build outputs that running the template in place leaves behind."""
    return any(piece in _BYPRODUCT_DIRS or piece.endswith(_BYPRODUCT_SUFFIXES)
               for piece in rel.parts)


def _rename(text: str, names: dict[str, str]) -> str:
    """Replace the template's names with the new plugin's, in one pass."""
    new = {TEMPLATE_NAMES[k]: names[k] for k in TEMPLATE_NAMES}
    return _TEMPLATE_TOKEN.sub(lambda m: new[m.group(0)], text)


def _select(text: str, parts: tuple[str, ...], where: str) -> str:
    """Keep the lines of the wanted parts and strip every template marker.

    Args:
        text: a template file's text.
        parts: the parts the skeleton has (``"expert"``, ``"fuser"``).
        where: the file's path in the template, for error messages.
    """
    out: list[str] = []
    block, opened = None, 0  # the open block's part and its line number
    for i, line in enumerate(text.splitlines(keepends=True), start=1):
        m = _MARKER.match(line.rstrip("\r\n"))
        if m is None:
            if block is None or block in parts:
                out.append(line)
            continue
        part, body = m["part"], m["body"]
        if part not in (*_PART_FILES, "end") or (body.strip() and part == "end"):
            raise ScaffoldError(f"Template {where}, line {i}: marker 'template: {part}' is not "
                                f"one of {[f'template: {p}' for p in _PART_FILES]} (at the end "
                                f"of a line, or alone to open a block) or 'template: end' "
                                f"(alone, to close one).")
        if body.strip():  # a single line that only that part has
            if part in parts and (block is None or block in parts):
                out.append(body.rstrip() + line[len(line.rstrip("\r\n")):])
            continue
        if part == "end":
            if block is None:
                raise ScaffoldError(f"Template {where}, line {i}: 'template: end' closes no "
                                    f"block; open one with a line '# template: expert' or "
                                    f"'# template: fuser'.")
            block = None
        elif block is not None:
            raise ScaffoldError(f"Template {where}, line {i}: block 'template: {part}' opens "
                                f"inside block 'template: {block}' (line {opened}); close that "
                                f"one first with '# template: end'.")
        else:
            block, opened = part, i
            if part not in parts:  # a dropped block takes the blank lines before it along
                while out and not out[-1].strip():
                    out.pop()
    if block is not None:
        raise ScaffoldError(f"Template {where}: block 'template: {block}' opened on line "
                            f"{opened} is never closed; add a line '# template: end'.")
    return "".join(out)


