"""medmix-plugin-template: medmix finds this module through its entry point and calls these
hooks, each with a ``register(name, obj)`` callback."""

from medmix_core import hookimpl

from medmix_plugin_template.expert import SummaryExpert  # template: expert
from medmix_plugin_template.fuser import build_fuser  # template: fuser


# template: expert
@hookimpl
def register_experts(register):
    register("plugin-template", SummaryExpert)
# template: end


# template: fuser
@hookimpl
def register_fusers(register):
    register("plugin-template", build_fuser)
# template: end
