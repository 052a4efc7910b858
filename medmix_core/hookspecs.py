"""Hook specifications for medmix plugins (pluggy project name ``"medmix"``).

Every hook receives a ``register`` callback, so a plugin registers as many names as it
likes and the hook is safe to call twice::

    from medmix_core import hookimpl

    @hookimpl
    def register_experts(register):
        register("my-expert", MyExpert)
"""

from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("medmix")
hookimpl = pluggy.HookimplMarker("medmix")


@hookspec
def register_experts(register):
    """Register ExpertEncoder classes: ``register(name, expert_class)``."""


@hookspec
def register_teachers(register):
    """Register Teacher classes (training-only experts): ``register(name, teacher_class)``."""


@hookspec
def register_fusers(register):
    """Register fuser factories: ``register(name, factory)``; factory(spec, **options) -> Fuser."""


@hookspec
def register_losses(register):
    """Register DistillLoss classes: ``register(name, loss_class)``."""


@hookspec
def register_datasets(register):
    """Register Dataset classes: ``register(name, dataset_class)``."""


@hookspec
def register_bridges(register):
    """Register Bridge classes (a modality's input -> generated text, e.g. a chest X-ray ->
    a draft report): ``register(name, bridge_class)``."""


@hookspec
def register_commands(app):
    """Add sub-commands to the ``medmix`` Typer app."""
