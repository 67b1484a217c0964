"""Ops of the Compact Side Network: the reference spec and the compiled/Triton backends."""

from . import reference
from ._ext import BackendUnavailable
from .side import resolve_backend, side_add

__all__ = ["BackendUnavailable", "reference", "resolve_backend", "side_add"]
