"""Environment variables read on the hot path (the side network's backend request at every
forward, Triton's deterministic switch at every backward launch).

``os.environ.get`` of a name that is not set raises and catches a ``KeyError`` inside
``os._Environ.__getitem__``: ~0.6 µs hot and several µs between a backbone's blocks, where
the host time of a small batch is what a GPU waits for. :func:`get` reads the same mapping
(``os.environ``'s own ``_data``, which its ``__setitem__`` / ``__delitem__`` keep current)
without the exception, and falls back to ``os.environ.get`` where that mapping is not there.
"""

from __future__ import annotations

import os

_KEYS: dict[str, object] = {}  # name → os.environ's key for it (names are few and fixed)


def get(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)`` (also after ``os.environ`` is rebound)."""
    environ = os.environ
    data = getattr(environ, "_data", None)
    if data is None or not hasattr(environ, "decodevalue"):
        return environ.get(name, default)
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = environ.encodekey(name)
    value = data.get(key)
    return default if value is None else environ.decodevalue(value)
