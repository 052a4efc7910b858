"""Shared fixtures: small synthetic stores, and a throwaway-plugin helper."""

from __future__ import annotations

import contextlib

import pytest
import torch

from medmix_core.plugins import get_plugin_manager

# the models under test are tiny: one thread avoids oversubscription on small machines
torch.set_num_threads(1)


@contextlib.contextmanager
def registered(plugin, name: str = "throwaway"):
    """Register a plugin object for the duration of a ``with`` block."""
    pm = get_plugin_manager()
    pm.register(plugin, name=name)
    try:
        yield plugin
    finally:
        pm.unregister(name=name)


@pytest.fixture(scope="session")
def synth_store(tmp_path_factory):
    from medmix_datasets.synthetic import write_synthetic_store

    return write_synthetic_store(tmp_path_factory.mktemp("synth") / "store", n=400,
                                 teacher_dim=24, seed=0)


@pytest.fixture(scope="session")
def synth_store_path(synth_store):
    return synth_store.path
