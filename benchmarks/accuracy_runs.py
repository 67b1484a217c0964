"""One accuracy-study run: what it is (:class:`Run`), where its folder lives, and running it
as its own ``dtl-train`` process (or reading the result of an earlier, identical run).

A run folder is reused only when its ``config.json`` holds exactly the options this run asks
for, so a changed protocol never silently reuses old results. A run that diverged
(``dtl-train`` exit status 3: too many non-finite steps, e.g. at a grid's largest lr) is a
result too: its folder gets ``diverged.json`` (the options), and it is not tried again.
A run stopped part-way (its checkpoints hold exactly these options) continues from its last
finished epoch with ``dtl-train --resume``.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from accuracy_tables import write_text

BACKBONES = {
    "dinov2": dict(
        model="vit_small_patch14_dinov2", pretrained="dinov2-vits14-imgfocus", img_size=112
    ),
    "lite0": dict(model="tf_efficientnet_lite0", pretrained="efficientnet-lite0", img_size=128),
}
DATASETS = {
    "elpv": dict(dataset="elpv", val_split=400),
    "fashion-mnist": dict(dataset="fashion-mnist", max_train=1000, val_split=200),
}
# The study's rows: a dtl-train method and the options that make the variant what it is.
VARIANTS = {
    "linear": ("linear", {}),
    "lora": ("lora", {"lora_rank": 8}),  # PEFT LoRA r = 8 on q, k, v of every block
    "lora-r1": ("lora", {"lora_rank": 1}),  # parameter-matched (≈ DTL's trainable count)
    "lora-tail": ("lora", {"lora_rank": 8, "lora_blocks": "7-12"}),  # memory-matched
    "dtl": ("dtl", {}),
    "dtl+": ("dtl+", {"conv_kernel": 3}),
    "dtl+k5": ("dtl+", {"conv_kernel": 5}),
    "full": ("full", {}),
}


@dataclass(frozen=True)
class Run:
    """One ``dtl-train`` run of the study (``phase``: select on the validation split, test on
    the test split, or sweep: the epoch sweep, on the test split)."""

    backbone: str
    dataset: str
    variant: str
    phase: str
    lr: float
    seed: int
    epochs: int
    drop_path: float = 0.0
    max_train: int | None = None
    precision: str = "bf16"
    warmup_share: float = 0.1  # warm-up epochs = share × epochs
    extra: dict = field(default_factory=dict, compare=False, hash=False)

    def options(self) -> dict:
        """Every dtl-train option of this run (config names), the protocol's included."""
        method, fixed = VARIANTS[self.variant]
        opts = {**BACKBONES[self.backbone], **DATASETS[self.dataset], **fixed, **self.extra}
        if self.phase != "select":
            opts.pop("val_split")
        if self.max_train:
            opts["max_train"] = min(self.max_train, opts.get("max_train", self.max_train))
            if "val_split" in opts:  # a capped split keeps 4/5 of itself for training
                opts["val_split"] = max(1, min(opts["val_split"], opts["max_train"] // 5))
        opts.update(
            method=method, lr=self.lr, seed=self.seed, epochs=self.epochs, batch_size=32,
            warmup_epochs=round(self.warmup_share * self.epochs, 4), precision=self.precision,
            drop_path=self.drop_path, eval_every=self.epochs, cache_trunk="off",
        )  # fmt: skip
        return opts

    def record_key(self) -> str:
        """A digest of every ``dtl-train`` option of this run (:meth:`options`): what a row
        of the runs CSV records as ``options_sha``, so that a committed row stands for
        exactly this run in a fresh clone (``accuracy_report.recorded_runs``)."""
        text = json.dumps(self.options(), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def folder(self, root: Path) -> Path:
        name = f"{self.phase}-lr{self.lr:g}-s{self.seed}-e{self.epochs}"
        name += f"-dp{self.drop_path:g}" if self.drop_path else ""
        name += f"-n{self.max_train}" if self.max_train else ""
        name += f"-w{self.warmup_share:g}-{self.precision}"
        return root / self.backbone / self.dataset / self.variant.replace("+", "plus") / name


def _same_run(folder: Path, opts: dict) -> bool:
    """An earlier run in ``folder`` finished with exactly these options."""
    try:
        config = json.loads((folder / "config.json").read_text())
        json.loads((folder / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return all(config.get(k) == v for k, v in opts.items())


DIVERGED = {"diverged": True, "test_acc": None, "test_loss": None}  # a diverged run's summary
_EXIT_DIVERGED = 3  # dtl_kernels.train.cli.EXIT_DIVERGED


def _same_divergence(folder: Path, opts: dict) -> bool:
    """An earlier run in ``folder`` with exactly these options diverged."""
    try:
        marker = json.loads((folder / "diverged.json").read_text())
    except (OSError, ValueError):
        return False
    return marker.get("options") == json.loads(json.dumps(opts))


def interrupted(run: Run, root: Path) -> bool:
    """The folder holds an unfinished run with exactly these options: its newest
    checkpoint's configuration matches them, so ``dtl-train --resume`` continues the same
    run (a checkpoint that does not read back, or of other options, is started afresh)."""
    from dtl_kernels.train import checkpoint as ckpt

    folder, opts = run.folder(root), run.options()
    try:
        found = ckpt.load_latest(folder)
    except (ckpt.CheckpointError, OSError):
        return False
    if found is None:
        return False
    config = found[1].get("config")
    return isinstance(config, dict) and all(config.get(k) == v for k, v in opts.items())


#: where, when and at which revision a run trained: a row's own env columns
PROVENANCE = ("device", "torch", "triton", "date", "git_rev")
_PROVENANCE_FILE = "provenance.json"
_PROVENANCE_MAX_BYTES = 4096


def finished(run: Run, root: Path) -> dict | None:
    """The summary of an identical earlier run (:data:`DIVERGED` if it diverged), else
    ``None``, with its provenance as ``"recorded"`` where the folder keeps it. Reads only:
    runs nothing, writes nothing."""
    folder, opts = run.folder(root), run.options()
    if _same_run(folder, opts):
        summary = json.loads((folder / "summary.json").read_text())
    elif _same_divergence(folder, opts):
        summary = dict(DIVERGED)
    else:
        return None
    recorded = read_provenance(folder)
    return summary if recorded is None else {**summary, "recorded": recorded}


def folder_provenance(folder: Path, summary: dict) -> dict[str, str]:
    """What a folder without a provenance file says of its run: the device and torch of
    its summary, the date its summary was written; the revision and triton unknown."""
    done = folder / ("diverged.json" if summary.get("diverged") else "summary.json")
    try:
        date = time.strftime("%Y-%m-%d", time.gmtime(done.stat().st_mtime))
    except OSError:
        date = "unknown"
    return dict(device=str(summary.get("device", "unknown")),
                torch=str(summary.get("torch_version", "unknown")), triton="unknown",
                date=date, git_rev="unknown")  # fmt: skip


def run_provenance(folder: Path, summary: dict) -> dict[str, str]:
    """Where, when and at which revision a finished run trained: the folder's provenance
    file as :func:`finished` / :func:`execute` returned it, else :func:`folder_provenance`."""
    return summary.get("recorded") or folder_provenance(folder, summary)


def launch_provenance() -> dict[str, str]:
    """What is about to train a run: this process's code (revision), torch, triton, date,
    and the device dtl-train will pick (``cuda`` where a GPU is visible, as its ``Dist``)."""
    import torch
    from common import code_columns

    return dict(device="cuda" if torch.cuda.is_available() else "cpu", **code_columns())


def read_provenance(folder: Path) -> dict | None:
    """The folder's provenance, or None where it has none that reads back (untrusted: a
    regular file of at most 4 KiB, exactly the known keys, short strings)."""
    path = folder / _PROVENANCE_FILE
    try:
        if not path.is_file():  # not a FIFO or a device: nothing that blocks or never ends
            return None
        with open(path, "rb") as f:
            raw = f.read(_PROVENANCE_MAX_BYTES + 1)
        data = json.loads(raw) if len(raw) <= _PROVENANCE_MAX_BYTES else None
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict) or set(data) != set(PROVENANCE):
        return None
    if not all(isinstance(v, str) and len(v) <= 200 for v in data.values()):
        return None
    return data


def execute(run: Run, root: Path, reuse_only: bool = False) -> dict | None:
    """The run's summary (its ``summary.json``): read when an identical run finished
    before, else trained now in its own process with one thread. ``None`` when
    ``reuse_only`` and it has not run; :data:`DIVERGED` when it diverged."""
    folder = run.folder(root)
    opts = run.options()
    if (done := finished(run, root)) is not None:
        return done
    if reuse_only:
        return None
    start = "--resume" if interrupted(run, root) else "--overwrite"  # keep finished epochs
    cmd = [sys.executable, "-m", "dtl_kernels.train", "--output", str(folder), start,
           "--no-progress"]  # fmt: skip
    for key, value in opts.items():
        cmd += [f"--{key.replace('_', '-')}", f"{value:g}" if isinstance(value, float)
                else str(value)]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    # what trains it, kept from its start (the tree may move on while it trains): a resumed
    # run keeps the provenance of its first start, a fresh one replaces any older file
    if start == "--overwrite" or read_provenance(folder) is None:
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / _PROVENANCE_FILE, json.dumps(launch_provenance()))
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode == _EXIT_DIVERGED:
        print(f"  diverged: {proc.stderr.strip().splitlines()[-1:]}", flush=True)
        folder.mkdir(parents=True, exist_ok=True)
        write_text(folder / "diverged.json", json.dumps({"options": opts}, indent=1))
        return {**DIVERGED, **_recorded(folder)}
    if proc.returncode != 0:
        print(proc.stdout[-2000:], proc.stderr[-3000:], file=sys.stderr)
        raise RuntimeError(f"run failed ({proc.returncode}): {' '.join(cmd)}")
    return {**json.loads((folder / "summary.json").read_text()), **_recorded(folder)}


def _recorded(folder: Path) -> dict:
    recorded = read_provenance(folder)
    return {} if recorded is None else {"recorded": recorded}
