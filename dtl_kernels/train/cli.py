"""Command line of ``dtl-train`` (flags and/or ``--config FILE.yaml``; flags win)."""

from __future__ import annotations

import sys

from .config import load_config


def main(argv: list[str] | None = None) -> int:
    from .checkpoint import CheckpointError
    from .data import DataError
    from .loop import run

    try:
        cfg = load_config(argv)
    except (ValueError, FileNotFoundError) as exc:
        print(f"dtl-train: error: {exc}", file=sys.stderr)
        return 2
    try:
        summary = run(cfg)
    except (DataError, CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"dtl-train: error: {exc}", file=sys.stderr)
        return 1
    if summary.get("test_acc") is not None and summary.get("world_size", 1) >= 1:
        _report(summary, cfg.output)
    return 0


def _report(s: dict, output: str) -> None:
    import os

    if int(os.environ.get("RANK", "0")) != 0:
        return
    peak = s.get("peak_memory_bytes")
    lines = [
        f"test accuracy     {100 * s['test_acc']:.2f}%  "
        f"({s['method']}, {s['model']}, {s['dataset']})",
        f"trainable params  {s['trainable_params']:,} of {s['total_params']:,}",
    ]
    if peak is not None:
        lines.append(f"peak memory       {peak / 2**20:.1f} MiB  ({s.get('peak_memory_method')})")
    if s.get("images_per_s"):
        lines.append(f"throughput        {s['images_per_s']:.1f} images/s (training)")
    lines.append(f"wall time         {s['wall_time_s']:.0f} s")
    lines.append(
        f"outputs           {output}/ "
        "(summary.json, metrics.csv/jsonl, curves.png, adapter.safetensors)"
    )
    print("\n".join(lines), flush=True)
