"""Writing the accuracy study's results: CSV and Markdown files (atomically: a crash leaves
the previous file whole) and the one colour each method has in every plot."""

from __future__ import annotations

import csv
from pathlib import Path

from dtl_kernels._io import atomic_write

COLORS = {
    "linear": "C0", "lora": "C1", "dtl": "C2", "dtl+": "C3", "full": "C4", "dtl+k5": "C5",
    "lora-r1": "C6", "lora-tail": "C7",
}  # fmt: skip


def write_csv(path: Path, fields: list[str], rows: list[dict], env: dict) -> None:
    """``rows`` with the ``env`` columns appended (a row's own column wins)."""
    fields = list(dict.fromkeys(fields + list(env)))

    def write(tmp):
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows({**env, **r} for r in rows)

    atomic_write(path, write)


def write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))
