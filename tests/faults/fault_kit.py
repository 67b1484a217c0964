"""Helpers of the fault-injection suite: the options of a fast run (ViT-tiny at 32×32, a
second or two on CPU), a driver that runs ``dtl-train`` in a child process with a fault
installed (for kills), adapter comparison and temporary-file listing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
from safetensors.torch import load_file

VIT = "vit_tiny_patch16_224"


def options(toy: Path, out: Path, **kw) -> dict:
    base = dict(
        model=VIT, pretrained="none", method="dtl+", dataset="folder", data_root=str(toy),
        img_size=32, epochs=3, batch_size=4, lr=1e-2, warmup_epochs=1, output=str(out),
        progress=False, cache_trunk="ram",
    )  # fmt: skip
    base.update(kw)
    return base


def flags(opts: dict) -> list[str]:
    out = []
    for k, v in opts.items():
        flag = "--" + k.replace("_", "-")
        if isinstance(v, bool):
            out.append(flag if v else "--no-" + k.replace("_", "-"))
        else:
            out += [flag, str(v)]
    return out


def _child_command(fault: str, opts: dict) -> tuple[list[str], dict]:
    code = textwrap.dedent(fault) + textwrap.dedent(
        """
        import sys
        from dtl_kernels.train.cli import main
        sys.exit(main(sys.argv[1:]))
        """
    )
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    return [sys.executable, "-c", code, *flags(opts)], env


def run_child(fault: str, opts: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    """``dtl-train`` with ``opts`` in a child process after running the Python ``fault``
    (which patches the package to fail, e.g. to SIGKILL itself mid-write)."""
    cmd, env = _child_command(fault, opts)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def start_child(fault: str, opts: dict) -> subprocess.Popen:
    """:func:`run_child` without waiting: the child runs beside the test."""
    cmd, env = _child_command(fault, opts)
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_for(path: Path, child: subprocess.Popen, timeout: float = 120) -> None:
    """Wait until ``path`` exists (the child's signal), failing if the child ends first."""
    import time

    deadline = time.monotonic() + timeout
    while not Path(path).exists():
        if child.poll() is not None:
            raise AssertionError(f"the child ended first: {child.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            child.kill()
            raise AssertionError(f"no {path} after {timeout} s")
        time.sleep(0.05)


def adapter(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "adapter.safetensors"))


def assert_same_adapter(a: Path, b: Path) -> None:
    x, y = adapter(a), adapter(b)
    assert x.keys() == y.keys()
    for k in x:
        assert torch.equal(x[k], y[k]), k


def temp_files(folder: Path) -> list[str]:
    return sorted(p.name for p in Path(folder).rglob("*.tmp"))


def strict_json(text: str):
    """``json.loads`` that rejects ``NaN`` / ``Infinity`` (not JSON)."""

    def refuse(token):
        raise ValueError(f"not valid JSON: {token}")

    return json.loads(text, parse_constant=refuse)


def metric_rows(out: Path) -> list[dict]:
    """``metrics.jsonl`` (strict JSON) without the timing columns."""
    lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
    return [
        {k: v for k, v in strict_json(x).items() if k not in ("images_per_s", "epoch_time_s")}
        for x in lines
    ]
