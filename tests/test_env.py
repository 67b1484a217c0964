"""dtl_kernels._env.get: os.environ.get without the exception, the same answers."""

import os

from dtl_kernels import _env


def test_get_follows_os_environ(monkeypatch):
    name = "DTL_KERNELS_TEST_ENV_NAME"
    monkeypatch.delenv(name, raising=False)
    assert _env.get(name) is None and _env.get(name, "d") == "d"
    monkeypatch.setenv(name, "triton")
    assert _env.get(name) == os.environ.get(name) == "triton"
    monkeypatch.setenv(name, "")
    assert _env.get(name, "d") == ""
    monkeypatch.setenv(name, "caf\u00e9")
    assert _env.get(name) == "caf\u00e9"
    monkeypatch.delenv(name)
    assert _env.get(name, "auto") == "auto"


def test_get_follows_a_rebound_os_environ(monkeypatch):
    """``os.environ`` replaced by a plain dict (no ``_data``): its answers, not the old one's."""
    name = "DTL_KERNELS_TEST_ENV_NAME"
    monkeypatch.setenv(name, "x")
    monkeypatch.setattr(os, "environ", {name: "y"})
    assert _env.get(name) == "y" and _env.get("DTL_KERNELS_TEST_UNSET", "d") == "d"
