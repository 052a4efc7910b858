"""The plugin manager and the name registries built from it.

Plugins are modules named by ``[project.entry-points.medmix]`` entries; each is loaded
with ``load_setuptools_entrypoints("medmix", name=...)`` one at a time, so a plugin that
fails to import is reported by name while the others keep working.

Environment:
    MEDMIX_PLUGINS: comma-separated entry-point names to load (default: all). An empty
        string loads none.
    MEDMIX_TRACE_HOOKS: when set, print every hook call (pluggy tracing).
"""

from __future__ import annotations

import difflib
import importlib.metadata as md
import os
import sys
from dataclasses import dataclass, field
from typing import Any

import pluggy

from medmix_core import hookspecs
from medmix_core.errors import DuplicatePluginError, UnknownPluginError

KINDS = ("experts", "teachers", "fusers", "losses", "datasets", "bridges")
_SINGULAR = {"experts": "expert", "teachers": "teacher", "fusers": "fuser",
             "losses": "distillation loss", "datasets": "dataset", "bridges": "bridge"}

_pm: pluggy.PluginManager | None = None
_load_errors: dict[str, str] = {}
_registry_cache: tuple[tuple, Registry] | None = None


@dataclass
class Entry:
    """One registered name: what it is, and which plugin registered it."""

    kind: str
    name: str
    obj: Any
    plugin: str


@dataclass
class Registry:
    """All names registered by the loaded plugins, per kind."""

    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KINDS})

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def get(self, kind: str, name: str) -> Any:
        table = self.entries[kind]
        if name in table:
            return table[name].obj
        known = sorted(table)
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        failed = ""
        if _load_errors:
            failed = (" Plugins that failed to load: " + ", ".join(sorted(_load_errors))
                      + " (see `medmix plugins`).")
        raise UnknownPluginError(
            f"Unknown {_SINGULAR[kind]} {name!r}.{hint} Known {kind}: "
            f"{', '.join(known) or '(none)'}.{failed} Install the plugin that provides it, "
            f"or pick one of the known names (`medmix plugins` lists them)."
        )


def get_plugin_manager() -> pluggy.PluginManager:
    """The process-wide plugin manager, with every allowed entry-point plugin loaded."""
    global _pm
    if _pm is not None:
        return _pm
    pm = pluggy.PluginManager("medmix")
    pm.add_hookspecs(hookspecs)
    if os.environ.get("MEDMIX_TRACE_HOOKS"):
        pm.trace.root.setwriter(lambda msg: print(msg, end="", file=sys.stderr))
        pm.enable_tracing()
    allowed = os.environ.get("MEDMIX_PLUGINS")
    allow = None if allowed is None else {p.strip() for p in allowed.split(",") if p.strip()}
    for ep in md.entry_points(group="medmix"):
        if allow is not None and ep.name not in allow:
            continue
        if pm.get_plugin(ep.name) is not None:
            continue
        try:
            pm.load_setuptools_entrypoints("medmix", name=ep.name)
        except Exception as exc:  # a broken plugin must not take the others down
            _load_errors[ep.name] = f"{type(exc).__name__}: {exc} (entry point {ep.value})"
    _pm = pm
    return pm


def load_errors() -> dict[str, str]:
    """Plugins whose import failed: entry-point name -> error."""
    get_plugin_manager()
    return dict(_load_errors)


def _collect(pm: pluggy.PluginManager) -> Registry:
    """Call every ``register_<kind>`` hook through pluggy, one plugin at a time (a subset
    hook caller), so tracing sees each call and each name is credited to its plugin."""
    reg = Registry()
    plugins = [(name, p) for name, p in pm.list_name_plugin() if p is not None]
    for kind in KINDS:
        hook_name = f"register_{kind}"
        implementers = {impl.plugin_name for impl in getattr(pm.hook, hook_name).get_hookimpls()}
        for plugin_name, _plugin in plugins:
            if plugin_name not in implementers:
                continue

            def register(name: str, obj: Any, _kind=kind, _plugin=plugin_name) -> None:
                table = reg.entries[_kind]
                if name in table:
                    raise DuplicatePluginError(
                        f"The {_SINGULAR[_kind]} name {name!r} is registered twice: by plugin "
                        f"{table[name].plugin!r} and by plugin {_plugin!r}. Uninstall one of "
                        f"them, or limit loading with MEDMIX_PLUGINS."
                    )
                table[name] = Entry(_kind, name, obj, _plugin)

            others = [p for n, p in plugins if n != plugin_name]
            pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)
    return reg


def registry() -> Registry:
    """The registry of the currently registered plugins (rebuilt when they change)."""
    global _registry_cache
    pm = get_plugin_manager()
    key = tuple((name, id(p)) for name, p in pm.list_name_plugin())
    if _registry_cache is None or _registry_cache[0] != key:
        _registry_cache = (key, _collect(pm))
    return _registry_cache[1]


def get_expert(name: str):
    return registry().get("experts", name)


def get_teacher(name: str):
    return registry().get("teachers", name)


def get_fuser(name: str):
    """The fuser registered as ``name``, as a :class:`~medmix_core.fusion.FuserPlugin`."""
    from medmix_core.fusion import FuserPlugin

    return FuserPlugin.of(registry().get("fusers", name))


def get_loss(name: str):
    return registry().get("losses", name)


def get_dataset(name: str):
    return registry().get("datasets", name)


def get_bridge(name: str):
    return registry().get("bridges", name)


def get_any_encoder(name: str):
    """An expert or a teacher by name (teachers are looked up when no expert matches)."""
    reg = registry()
    if name in reg.entries["experts"]:
        return reg.entries["experts"][name].obj
    return reg.get("teachers", name)


def plugin_info() -> list[dict]:
    """One dict per loaded plugin: name, distribution, module, hooks, registered names."""
    pm = get_plugin_manager()
    reg = registry()
    dists = {id(p): d for p, d in pm.list_plugin_distinfo()}
    out = []
    for name, plugin in pm.list_name_plugin():
        if plugin is None:
            continue
        dist = dists.get(id(plugin))
        hooks = sorted(h.name for h in pm.get_hookcallers(plugin) or [])
        registers = {
            k: [e.name for e in reg.entries[k].values() if e.plugin == name] for k in KINDS
        }
        out.append({
            "name": name,
            "distribution": (
                f"{dist.project_name} {dist.version}" if dist else "(registered in code)"
            ),
            "module": getattr(plugin, "__name__", type(plugin).__name__),
            "hooks": hooks,
            "registers": {k: v for k, v in registers.items() if v},
        })
    return out
