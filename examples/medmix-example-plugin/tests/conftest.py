"""Make sure the plugin is registered, installed or not.

Installed (``pip install -e .``), medmix loads it through its entry point. Run from a
checkout without installing (``PYTHONPATH=. pytest``), it is registered here by hand, the
way medmix's own tests register throwaway plugins.
"""

from __future__ import annotations

import medmix_example_plugin

from medmix_core.plugins import get_plugin_manager

pm = get_plugin_manager()
if not pm.is_registered(medmix_example_plugin):
    pm.register(medmix_example_plugin, name="example")
