"""What a run reports: per-epoch rows (JSONL + CSV), peak memory, the curves PNG.

Peak memory (``peak_memory_bytes`` in ``summary.json``):

* CUDA: ``torch.cuda.max_memory_allocated()`` over the training loop (stats reset at its
  start) — tensor memory of the caching allocator, the number papers report.
* CPU: the growth of the process's resident set during the training loop, from Linux
  ``/proc/self/status``: ``VmHWM`` (peak RSS) at the end minus ``VmRSS`` at the start, after
  resetting ``VmHWM`` by writing ``5`` to ``/proc/self/clear_refs`` at the start. It counts
  everything the loop allocates (activations saved for backward, gradients, optimizer
  state, allocator slack), not the model or the dataset already in memory. Where the reset
  is not allowed the peak covers the whole process so far (``peak_memory_method`` says
  which). Under ``torchrun`` it is rank 0's process.
"""

from __future__ import annotations

import csv
from pathlib import Path

import torch


class PeakMemory:
    """Measure the peak memory of a code region (see the module docstring)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.baseline = 0
        self.method = ""

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = 0
            self.method = "cuda.max_memory_allocated"
            return
        reset = _reset_hwm()
        self.baseline = _proc_status_bytes("VmRSS")
        self.method = "rss_growth(/proc VmHWM-VmRSS)" + ("" if reset else ", no HWM reset")

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_allocated(self.device))
        return max(0, _proc_status_bytes("VmHWM") - self.baseline)


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _proc_status_bytes(field: str) -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class MetricsLog:
    """Append-only per-epoch rows in ``metrics.jsonl`` and ``metrics.csv``."""

    FIELDS = (
        "epoch", "lr", "train_loss", "train_acc", "test_loss", "test_acc",
        "images_per_s", "epoch_time_s", "skipped_steps",
    )  # fmt: skip

    def __init__(self, folder: Path, rows: list[dict] | None = None):
        self.folder = Path(folder)
        self.rows = list(rows or [])

    def append(self, row: dict) -> None:
        self.rows.append(row)

    def paths(self) -> tuple[Path, Path]:
        """The two files :meth:`write` writes."""
        return self.folder / "metrics.jsonl", self.folder / "metrics.csv"

    def write(self) -> None:
        """Rewrite both files from ``rows`` (so a resumed run never duplicates epochs);
        strict JSON lines (a non-finite number is written as ``null``)."""
        from .._io import atomic_write, json_text

        def jsonl(tmp):
            with open(tmp, "w") as f:
                for r in self.rows:
                    f.write(json_text(r, indent=None) + "\n")

        def csv_file(tmp):
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.FIELDS, extrasaction="ignore")
                w.writeheader()
                w.writerows(self.rows)

        atomic_write(self.folder / "metrics.jsonl", jsonl)
        atomic_write(self.folder / "metrics.csv", csv_file)

    def plot(self, path: Path, title: str) -> Path | None:
        """Loss and accuracy curves as a PNG (matplotlib, Agg backend)."""
        if not self.rows:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        def value(r, key, scale=1.0):
            v = r.get(key)
            return float("nan") if v is None else scale * v

        ep = [r["epoch"] for r in self.rows]
        fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
        ax1.plot(ep, [value(r, "train_loss") for r in self.rows], "o-", label="train")
        ax2.plot(ep, [value(r, "train_acc", 100) for r in self.rows], "o-", label="train")
        test = [r for r in self.rows if r.get("test_acc") is not None]
        if test:
            ax1.plot([r["epoch"] for r in test], [value(r, "test_loss") for r in test], "s-",
                     label="test")  # fmt: skip
            ax2.plot(
                [r["epoch"] for r in test], [100 * r["test_acc"] for r in test], "s-", label="test"
            )
        ax1.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
        ax2.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
        for ax in (ax1, ax2):
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(title)
        fig.tight_layout()
        from .._io import atomic_write

        try:
            atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=100, format="png"))
        finally:
            plt.close(fig)
        return Path(path)
