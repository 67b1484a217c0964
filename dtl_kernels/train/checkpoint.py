"""Training checkpoints: small, atomic, verifiable, resumable bit-for-bit.

A checkpoint holds only what changes during training: the trainable parameters (CSN +
head; everything for ``full``, plus the backbone buffers then, e.g. BatchNorm statistics),
the optimizer and LR-schedule states, every RNG state, the number of finished epochs and
the metric rows so far. The frozen backbone is rebuilt from its pretrained weights.

Files: ``OUTPUT/checkpoints/epoch_<NNNN>.pt``, written with
:func:`dtl_kernels._io.atomic_write` (temporary file, flush, fsync, rename) after being
read back once, so a crash or a full disk never leaves a broken file under a checkpoint
name and never replaces the last good one. The newest ``keep`` files are kept.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write

FORMAT = "dtl_kernels.train-checkpoint/1"
_NAME = re.compile(r"epoch_(\d{4,})\.pt")


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def checkpoint_dir(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def set_aside(output: str | Path) -> Path:
    """Move an earlier run's checkpoint folder to ``checkpoints.old-<n>`` (never delete a
    user's work): a fresh run must not rotate them with its own or resume into them."""
    folder = checkpoint_dir(output)
    n = 1
    while (target := folder.with_name(f"{folder.name}.old-{n}")).exists():
        n += 1
    folder.rename(target)
    return target


def list_checkpoints(output: str | Path) -> list[Path]:
    """Checkpoint files of a run, oldest first."""
    folder = checkpoint_dir(output)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.fullmatch(p.name))]
    return [p for _, p in sorted(found)]


def rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].copy()), *np_state[2:]],
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    kind, key, *rest = state["numpy"]
    np.random.set_state((kind, key.numpy(), *rest))
    random.setstate(_tuples(state["python"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


def trained_state(model: torch.nn.Module, with_buffers: bool) -> dict[str, torch.Tensor]:
    out = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if with_buffers:
        out.update({n: b.detach().clone() for n, b in model.named_buffers()})
    return out


def save_checkpoint(
    output: str | Path,
    epoch: int,
    model: torch.nn.Module,
    optimizer,
    scheduler,
    metrics: list[dict],
    config: dict,
    with_buffers: bool = False,
    keep: int = 2,
) -> Path:
    """Write ``epoch_<epoch>.pt`` atomically (verified by reading it back), then delete
    all but the newest ``keep`` checkpoints."""
    payload = {
        "format": FORMAT,
        "epoch": int(epoch),
        "trained": trained_state(model, with_buffers),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "metrics": metrics,
        "config": config,
    }
    path = checkpoint_dir(output) / f"epoch_{epoch:04d}.pt"

    def write(tmp: str) -> None:
        torch.save(payload, tmp)
        _read(Path(tmp))  # never publish a file that does not read back

    atomic_write(path, write)
    for old in list_checkpoints(output)[:-keep]:
        old.unlink(missing_ok=True)
    return path


def _read(path: Path) -> dict:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dtl-train checkpoint")
    return payload


def load_latest(output: str | Path) -> tuple[Path, dict] | None:
    """The newest checkpoint of a run (``None`` if there is none).

    A newest file that does not read back is an error (it is never skipped silently);
    the message names the previous checkpoint to fall back to by deleting the bad one.
    """
    files = list_checkpoints(output)
    if not files:
        return None
    try:
        return files[-1], _read(files[-1])
    except CheckpointError as exc:
        prev = f"; delete it to resume from {files[-2]}" if len(files) > 1 else ""
        raise CheckpointError(f"{exc}{prev}") from exc


def restore(payload: dict, path: Path, model, optimizer, scheduler) -> None:
    """Load a checkpoint's trained tensors and states; ``CheckpointError`` names any key
    that does not fit the model built from the current configuration."""
    own = dict(model.named_parameters()) | dict(model.named_buffers())
    trained = payload["trained"]
    missing = sorted(n for n, p in model.named_parameters() if p.requires_grad and n not in trained)
    unknown = sorted(set(trained) - set(own))
    misshaped = [n for n, t in trained.items() if n in own and own[n].shape != t.shape]
    if missing or unknown or misshaped:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model (same --model/--method/--dataset?): "
            f"missing {missing[:8]}, unknown {unknown[:8]}, mis-shaped {misshaped[:8]}"
        )
    with torch.no_grad():
        for n, t in trained.items():
            own[n].copy_(t)
    optimizer.load_state_dict(payload["optimizer"])
    scheduler.load_state_dict(payload["scheduler"])
    set_rng_state(payload["rng"])
