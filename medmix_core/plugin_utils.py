"""What plugins may import from the core, in one place (as llm documents its plugin
utilities): atomic writes, file hashing and medmix's cache folder, payload and option
checks. Everything else in ``medmix_core`` is the framework's own business; a plugin that
needs more is telling us the public API is missing something.

    from medmix_core.plugin_utils import atomic_write_text, check_options

Each helper raises :class:`~medmix_core.errors.DataError` (or writes nothing) on bad input,
with a message that names the plugin, what was expected and what was found.
"""

from __future__ import annotations

from typing import Any

from medmix_core.errors import DataError
from medmix_core.experts import check_payload_types
from medmix_core.files import cache_dir, cached_sha256, jsonable, sha256_file
from medmix_core.store import atomic_save_tensors, atomic_write_bytes, atomic_write_text

__all__ = ["atomic_write_text", "atomic_write_bytes", "atomic_save_tensors", "sha256_file",
           "cached_sha256", "cache_dir", "check_payload_types", "check_options", "jsonable"]


def check_options(name: str, options: dict[str, Any], allowed: dict[str, Any],
                  what: str = "Expert") -> dict[str, Any]:
    """Check a plugin's constructor options; return them with defaults filled in.

    Args:
        name: the plugin's registered name, for messages.
        options: what the user passed.
        allowed: option -> type (or tuple of types), or option -> (type, default). None is
            always accepted as a value.
        what: the kind of plugin, for messages ("Expert", "Bridge", ...).
    Returns:
        The options: every key the user gave, plus the defaults of the (type, default) ones.
    Raises:
        DataError: an unknown option (the accepted ones are listed) or a value of the wrong
            type.
    """
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise DataError(f"{what} {name!r}: unknown option(s) {unknown}; it takes "
                        f"{sorted(allowed)}.")
    out = dict(options)
    for key, rule in allowed.items():
        typ, has_default, default = rule, False, None
        if isinstance(rule, tuple) and len(rule) == 2 and not isinstance(rule[1], type) \
                and (isinstance(rule[0], type) or isinstance(rule[0], tuple)):
            typ, has_default, default = rule[0], True, rule[1]
        if key not in options and has_default:
            out[key] = default
        val = out.get(key)
        if val is not None and not isinstance(val, typ):
            want = " or ".join(t.__name__ for t in (typ if isinstance(typ, tuple) else (typ,)))
            raise DataError(f"{what} {name!r}: option {key!r} must be {want}, got "
                            f"{type(val).__name__} ({val!r}).")
    return out
