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

_DATA = getattr(os.environ, "_data", None)
_ENCODE = getattr(os.environ, "encodekey", None)
_DECODE = getattr(os.environ, "decodevalue", None)
_KEYS: dict[str, object] = {}  # name → os.environ's key for it (names are few and fixed)


def get(name: str, default: str | None = None) -> str | None:
    """``os.environ.get(name, default)``."""
    if _DATA is None or _ENCODE is None or _DECODE is None:
        return os.environ.get(name, default)
    key = _KEYS.get(name)
    if key is None:
        key = _KEYS[name] = _ENCODE(name)
    value = _DATA.get(key)
    return default if value is None else _DECODE(value)
