"""medmix-example-plugin: a ``pca`` expert and a ``logit-average`` fuser.

medmix finds this module through the entry point in ``pyproject.toml``::

    [project.entry-points.medmix]
    example = "medmix_example_plugin"

and calls the hooks below, each with a ``register(name, obj)`` callback.
"""

from medmix_core import hookimpl
from medmix_example_plugin.logit_average import build_logit_average
from medmix_example_plugin.pca import PCAExpert

__version__ = "0.1.0"


@hookimpl
def register_experts(register):
    register("pca", PCAExpert)


@hookimpl
def register_fusers(register):
    register("logit-average", build_logit_average)
