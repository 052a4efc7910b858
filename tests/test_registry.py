"""The plugin registry: loading, failure isolation, unknown and duplicate names."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import registered

from medmix_core import hookimpl
from medmix_core.errors import DuplicatePluginError, UnknownPluginError
from medmix_core.plugins import KINDS, get_fuser, plugin_info, registry


def test_builtin_plugins_register_their_names():
    reg = registry()
    assert {"medmix", "medmix-uniform"} <= set(reg.names("fusers"))
    assert {"cosine", "rkd"} <= set(reg.names("losses"))
    assert {"synthetic"} <= set(reg.names("datasets"))
    # built-ins come through entry points, with their distribution named
    info = {p["name"]: p for p in plugin_info()}
    assert info["medmix"]["distribution"].startswith("medmix ")
    assert "register_fusers" in info["medmix"]["hooks"]


def test_unknown_name_lists_known_names_and_closest_match():
    with pytest.raises(UnknownPluginError) as err:
        get_fuser("medmixx")
    msg = str(err.value)
    assert "Did you mean 'medmix'" in msg
    assert "meanavg" in msg or "medmix-uniform" in msg
    assert "medmix plugins" in msg


def test_throwaway_plugin_registers_for_one_test_only():
    class Plugin:
        @hookimpl
        def register_losses(self, register):
            register("throwaway-loss", object)

    with registered(Plugin()):
        assert "throwaway-loss" in registry().names("losses")
    assert "throwaway-loss" not in registry().names("losses")


def test_duplicate_name_is_an_error_naming_both_plugins():
    class Plugin:
        @hookimpl
        def register_fusers(self, register):
            register("medmix", object)

    with registered(Plugin(), name="impostor"):
        with pytest.raises(DuplicatePluginError) as err:
            registry()
    assert "impostor" in str(err.value) and "'medmix'" in str(err.value)
    registry()  # back to normal after unregistering


def _fake_dist(tmp_path, module_body: str):
    """A distribution on sys.path with one medmix entry point ``broken``."""
    (tmp_path / "broken_plugin.py").write_text(module_body)
    info = tmp_path / "broken_plugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[medmix]\nbroken = broken_plugin\n")
    return tmp_path


def _medmix(args, env_extra, tmp_path):
    env = {**os.environ, **env_extra, "PYTHONPATH": str(tmp_path)}
    return subprocess.run([sys.executable, "-m", "medmix_core.cli", *args], env=env,
                          capture_output=True, text=True, timeout=120)


def test_plugin_that_fails_to_import_is_reported_and_others_keep_working(tmp_path):
    _fake_dist(tmp_path, "raise ImportError('needs libfoo')\n")
    res = _medmix(["plugins"], {}, tmp_path)
    assert res.returncode == 0, res.stderr
    assert "broken  FAILED TO LOAD: ImportError: needs libfoo" in res.stdout
    assert "fusers: medmix" in res.stdout  # the built-ins still load


def test_env_var_restricts_loaded_plugins(tmp_path):
    _fake_dist(tmp_path, "raise ImportError('needs libfoo')\n")
    res = _medmix(["plugins", "--json"], {"MEDMIX_PLUGINS": "medmix,cosine"}, tmp_path)
    import json

    data = json.loads(res.stdout)
    assert sorted(p["name"] for p in data["plugins"]) == ["cosine", "medmix"]
    assert data["errors"] == {}  # the broken one was never imported


def test_every_kind_has_a_registry_table():
    reg = registry()
    assert set(reg.entries) == set(KINDS)
