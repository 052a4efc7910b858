"""Register the plugin by hand when it is not installed (``PYTHONPATH=. pytest``)."""

from medmix_core.plugins import get_plugin_manager

import medmix_plugin_template

pm = get_plugin_manager()
if not pm.is_registered(medmix_plugin_template):
    pm.register(medmix_plugin_template, name="plugin-template")
