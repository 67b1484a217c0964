"""Training checkpoints: small, atomic, verifiable, resumable bit-for-bit.

A checkpoint holds only what changes during training: the trainable parameters (CSN +
head; everything for ``full``, plus the backbone buffers then, e.g. BatchNorm statistics),
the optimizer and LR-schedule states, every RNG state, the number of finished epochs and
the metric rows so far. The frozen backbone is rebuilt from its pretrained weights.

Files: ``OUTPUT/checkpoints/epoch_<NNNN>.pt``, written with
:func:`dtl_kernels._io.atomic_write` (temporary file, flush, fsync, rename) after being
read back once, so a crash or a full disk never leaves a broken file under a checkpoint
name and never replaces the last good one. The newest ``keep`` files are kept; a model
with non-finite weights is never saved (so the rotation never drops the last finite one).

Resuming (:func:`resume_plan`) compares the checkpoint's configuration with the current
one: ``--lr`` / ``--epochs`` may change (the warm-up/cosine schedule is recomputed for
the new values and continues at the checkpoint's step); any other option that defines
the run (:data:`RUN_OPTIONS`) is refused, naming it, unless ``--force-resume``.
"""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import torch

from .._io import atomic_write, fsync_dir, space_note
from .._untrusted import check_torch_archive

FORMAT = "dtl_kernels.train-checkpoint/1"
_NAME = re.compile(r"epoch_(\d{4,})\.pt")
_SHA256 = re.compile(r"[0-9a-f]{64}")
# What a resumed run may not change without --force-resume: everything that changes which
# model is trained, on which data, or how (lr and epochs are applied instead).
RUN_OPTIONS = (
    "model", "pretrained", "method", "rank", "lora_rank", "adapt_from", "tap_from",
    "conv_kernel", "beta", "drop_path", "img_size", "dataset", "data_root", "num_classes",
    "train_split",
    "test_split", "shots", "shot_seed", "max_train", "max_test", "val_split", "normalize",
    "batch_size", "weight_decay", "warmup_epochs", "warmup_lr", "min_lr", "seed", "precision",
    "label_smoothing", "cache_dtype", "interpolation", "crop_pct", "crop_mode", "hflip", "aa",
    "scale", "mixup", "cutmix", "trunk_dtype", "backbone_dtype", "grad_accum",
)  # fmt: skip
SCHEDULE_OPTIONS = ("lr", "epochs", "lr_step")
MAX_EPOCHS = 10**6  # --epochs' limit
_PAYLOAD = {"epoch": int, "trained": dict, "optimizer": dict, "scheduler": dict, "rng": dict,
            "metrics": list, "config": dict}  # fmt: skip


class CheckpointError(ValueError):
    """A checkpoint that cannot be used; the message names the file."""


def checkpoint_dir(output: str | Path) -> Path:
    return Path(output) / "checkpoints"


def checkpoint_path(output: str | Path, epoch: int) -> Path:
    """Where the checkpoint after ``epoch`` epochs is written."""
    return checkpoint_dir(output) / f"epoch_{epoch:04d}.pt"


def set_aside(output: str | Path, also: tuple[str, ...] = ()) -> Path:
    """Move an earlier run's checkpoint folder to ``checkpoints.old-<n>`` (never delete a
    user's work): a fresh run must not rotate them with its own or resume into them.
    Files of ``output`` named in ``also`` (its adapter, summary, metrics…) move into that
    folder too (created when there is no checkpoint folder)."""
    folder = checkpoint_dir(output)
    n = 1
    while (target := folder.with_name(f"{folder.name}.old-{n}")).exists():
        n += 1
    if folder.is_dir():
        folder.rename(target)
    else:
        target.mkdir(parents=True)
    for name in also:
        if (Path(output) / name).is_file():
            (Path(output) / name).rename(target / name)
    fsync_dir(output)
    return target


def list_checkpoints(output: str | Path) -> list[Path]:
    """Checkpoint files of a run, oldest first."""
    folder = checkpoint_dir(output)
    if not folder.is_dir():
        return []
    found = [(n, p) for p in folder.iterdir() if (n := epoch_of(p)) is not None]
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
    data: dict | None = None,
    backbone: str | None = None,
) -> Path:
    """Write ``epoch_<epoch>.pt`` atomically (verified by reading it back), then delete
    all but the newest ``keep`` checkpoints. ``data``: the fingerprint of each split the
    run trains and evaluates on (compared on ``--resume``: :func:`data_plan`);
    ``backbone``: the frozen backbone weights' (:func:`backbone_plan`).
    ``CheckpointError`` (nothing written, nothing deleted) when a trained tensor holds NaN
    or inf."""
    trained = trained_state(model, with_buffers)
    bad = [n for n, t in trained.items() if t.is_floating_point() and not t.isfinite().all()]
    if bad:
        raise CheckpointError(
            f"not saving epoch {epoch}: non-finite values in {bad[:4]}; the last finite "
            f"checkpoint is kept"
        )
    payload = {
        "format": FORMAT,
        "epoch": int(epoch),
        "trained": trained,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "rng": rng_state(),
        "metrics": metrics,
        "config": config,
        **({"data": data} if data is not None else {}),
        **({"backbone_sha256": backbone} if backbone is not None else {}),
    }
    path = checkpoint_path(output, epoch)

    def write(tmp: str) -> None:
        try:
            torch.save(payload, tmp)
        except RuntimeError as exc:  # a short write (full disk, file-size limit): torch's
            first = (str(exc).strip() or "failed").splitlines()[0]
            room = space_note(Path(tmp).parent)
            raise CheckpointError(f"could not write checkpoint {path}: torch.save: {first} "
                                  f"({room}; is the disk full?)") from exc  # fmt: skip
        _read(Path(tmp))  # never publish a file that does not read back

    atomic_write(path, write)
    # the newest checkpoint of an epoch without skipped (non-finite) steps is never rotated
    # out: a later one may hold weights that are finite yet diverge on every batch
    files = list_checkpoints(output)
    vouched = newest_clean(files, metrics)
    for old in files[:-keep]:
        if old != vouched:
            old.unlink(missing_ok=True)
    return path


def newest_clean(files: list[Path], rows: list[dict]) -> Path | None:
    """The newest of ``files`` (checkpoints, oldest first) whose epoch skipped no step as
    non-finite, by the metrics ``rows``; ``None`` if none did."""
    clean = {r.get("epoch") for r in rows if not r.get("skipped_steps")}
    return next((f for f in reversed(files) if epoch_of(f) in clean), None)


def epoch_of(path: Path) -> int | None:
    """The epoch a checkpoint's file name says (``None``: not a checkpoint's name)."""
    m = _NAME.fullmatch(path.name)
    return int(m.group(1)) if m else None


def _read(path: Path) -> dict:
    """The payload of a checkpoint file, every field checked (a checkpoint may come from
    elsewhere: its bytes are untrusted); ``CheckpointError`` naming the file and field."""
    try:
        check_torch_archive(path)  # before torch.load allocates anything the file declares
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(
            f"checkpoint {path} is corrupt or unreadable ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a dtl-train checkpoint")
    for key, kind in _PAYLOAD.items():
        if not isinstance(payload.get(key), kind):
            raise CheckpointError(f"checkpoint {path} is damaged: '{key}' is missing or mistyped")
    problem = _payload_problem(payload)
    if problem:
        raise CheckpointError(f"checkpoint {path} is damaged: {problem}")
    named = epoch_of(path)
    if named is not None and named != payload["epoch"]:  # (a copy renamed: not this run's)
        raise CheckpointError(f"checkpoint {path} holds epoch {payload['epoch']}, not the "
                              f"epoch {named} its name says; remove or rename it")  # fmt: skip
    return payload


def _payload_problem(payload: dict) -> str | None:
    """What is wrong with a loaded payload's fields (``None``: nothing)."""
    epoch = payload["epoch"]
    if isinstance(epoch, bool) or not 1 <= epoch <= MAX_EPOCHS:
        return f"'epoch' is {epoch!r}, expected 1…{MAX_EPOCHS}"
    if not all(isinstance(k, str) and isinstance(t, torch.Tensor) for k, t in
               payload["trained"].items()):  # fmt: skip
        return "'trained' is not a mapping of names to tensors"
    rows = payload["metrics"]
    if len(rows) != epoch or not all(_flat_record(r) for r in rows):
        return f"'metrics' is not {epoch} rows of numbers"
    if not _flat_record(payload["config"]):
        return "'config' is not a mapping of option names to values"
    step = payload["scheduler"].get("last_epoch")
    if isinstance(step, bool) or not isinstance(step, int) or not 0 <= step <= 2**62:
        return f"'scheduler.last_epoch' is {str(step)[:40]}, expected a step count"
    backbone = payload.get("backbone_sha256")
    if backbone is not None and not (isinstance(backbone, str) and _SHA256.fullmatch(backbone)):
        return "'backbone_sha256' is not a SHA-256 in hex"
    data = payload.get("data")
    if data is not None and not (
        isinstance(data, dict) and all(_flat_record(v) for v in data.values())
    ):
        return "'data' is not a mapping of split names to fingerprints"
    return None


def _flat_record(value) -> bool:
    """A mapping of names to plain values (what metrics rows and configurations hold)."""
    plain = (str, int, float, bool, type(None))
    return isinstance(value, dict) and all(
        isinstance(k, str) and isinstance(v, plain) for k, v in value.items()
    )


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


def restore(
    payload: dict, path: Path, model, optimizer, scheduler, step: int | None = None
) -> None:
    """Load a checkpoint's trained tensors, optimizer state, schedule position and RNG
    states; ``CheckpointError`` names any key that does not fit the model built from the
    current configuration.

    The schedule itself (``scheduler``'s lr function and base lr) is the current
    configuration's: only the step count comes from the checkpoint (or ``step``, from
    :func:`schedule_step`), and every parameter group's lr is set to the schedule's value
    at that step (for an unchanged configuration that is the value the uninterrupted run
    had, bit for bit).
    """
    params = dict(model.named_parameters())
    # what save_checkpoint writes: the trained parameters (and, with buffers, the buffers);
    # never a frozen parameter (it would change the backbone the run was fingerprinted on)
    own = {n: p for n, p in params.items() if p.requires_grad} | dict(model.named_buffers())
    trained = payload["trained"]
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in trained)
    unknown = sorted(set(trained) - set(own))
    misshaped = [n for n, t in trained.items() if n in own and own[n].shape != t.shape]
    retyped = [n for n, t in trained.items() if n in own and own[n].dtype != t.dtype]
    if missing or unknown or misshaped or retyped:
        raise CheckpointError(
            f"checkpoint {path} does not fit this model (same --model/--method/--dataset?): "
            f"missing {missing[:8]}, unknown or frozen {unknown[:8]}, mis-shaped "
            f"{misshaped[:8]}, of another dtype {retyped[:8]}"
        )
    # the optimizer's settings are the current configuration's (compared with the saved one
    # by resume_plan); the file gives the per-parameter state only
    raw = _raw_state_misfit(payload["optimizer"])  # load_state_dict casts what it finds
    if raw:
        raise CheckpointError(f"checkpoint {path}: optimizer state does not fit ({raw})")
    try:
        optimizer.load_state_dict(_with_own_settings(payload["optimizer"], optimizer))
        step = int(payload["scheduler"]["last_epoch"]) if step is None else step
    except Exception as exc:  # noqa: BLE001 — any failure on untrusted state: it does not fit
        raise CheckpointError(f"checkpoint {path}: optimizer state does not fit ({exc})") from exc
    misfit = _optimizer_state_misfit(optimizer)
    if misfit:
        raise CheckpointError(f"checkpoint {path}: optimizer state does not fit ({misfit})")
    with torch.no_grad():
        for n, t in trained.items():
            own[n].copy_(t)
    set_schedule_step(scheduler, step)
    try:
        set_rng_state(payload["rng"])
    except Exception as exc:  # noqa: BLE001 — any failure on untrusted state: damaged
        raise CheckpointError(f"checkpoint {path} is damaged: 'rng' ({exc})") from exc


#: AdamW's per-parameter state (amsgrad off, as the optimizer is built): the moments
#: shaped and typed as their parameter, the step a count
_MOMENTS = ("exp_avg", "exp_avg_sq")


def _with_own_settings(state_dict: dict, optimizer) -> dict:
    """The file's optimizer state with the current optimizer's settings in its groups
    (``weight_decay``, ``betas``, ``fused`` …: the configuration's, compared with the
    saved one by :func:`resume_plan`), put there *before* ``load_state_dict``, which
    places each ``step`` by the groups' flags (a non-fused file's CPU steps would reach
    the fused kernel beside CUDA parameters). Each group keeps its own ``params``."""
    groups = state_dict.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        return state_dict  # load_state_dict refuses it, naming the mismatch
    own = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
    merged = [{**g, **o} if isinstance(g, dict) else g for g, o in zip(groups, own, strict=True)]
    return {**state_dict, "param_groups": merged}


def _raw_state_misfit(state_dict: dict) -> str | None:
    """The file's per-parameter state before ``load_state_dict`` casts it to the
    parameters' dtype (an integer moment would become a float one silently): AdamW's
    moments floating-point tensors, its step a number or a floating-point tensor."""
    state = state_dict.get("state")
    if not isinstance(state, dict):
        return "'state' is not a mapping"
    for index, entry in state.items():
        if not isinstance(entry, dict):
            return f"the state of parameter {str(index)[:20]} is not a mapping"
        for key in _MOMENTS:
            value = entry.get(key)
            if value is not None and not (isinstance(value, torch.Tensor)
                                          and value.is_floating_point()):  # fmt: skip
                got = value.dtype if isinstance(value, torch.Tensor) else type(value).__name__
                return f"'{key}' of parameter {str(index)[:20]} is {got}, not a float tensor"
        count = entry.get("step")
        number = isinstance(count, (int, float)) and not isinstance(count, bool)
        if (
            count is not None
            and not number
            and not (isinstance(count, torch.Tensor) and count.is_floating_point())
        ):
            got = count.dtype if isinstance(count, torch.Tensor) else type(count).__name__
            return f"'step' of parameter {str(index)[:20]} is {got}, expected a count"
    return None


def _optimizer_state_misfit(optimizer) -> str | None:
    """What is wrong with the per-parameter optimizer state ``load_state_dict`` took as it
    was (it checks none of it; the fused kernel reads it unchecked, and crashed on a 0-dim
    moment): each parameter's state is AdamW's moments, shaped and typed as the parameter,
    finite (``exp_avg_sq`` ≥ 0), and a whole step count ≥ 0 (the fused kernel adds one
    before its bias correction; a GradScaler that skipped every step leaves 0)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            state = optimizer.state.get(p)
            if not state:
                continue  # no step taken for it yet: the optimizer makes its state
            for key in (*_MOMENTS, "step"):
                if not isinstance(state.get(key), torch.Tensor):
                    return f"no '{key}' tensor for a {tuple(p.shape)} parameter"
            for key in _MOMENTS:
                value = state[key]
                if value.shape != p.shape or value.dtype != p.dtype:
                    return (f"'{key}' of shape {tuple(value.shape)} and {value.dtype} for a "
                            f"{tuple(p.shape)} {p.dtype} parameter")  # fmt: skip
                negative = key == "exp_avg_sq" and bool((value < 0).any())
                if negative or not bool(value.isfinite().all()):
                    return f"'{key}' of a {tuple(p.shape)} parameter holds non-finite or < 0 values"
            count = state["step"]
            if count.numel() != 1 or not count.is_floating_point():
                return f"'step' is a {tuple(count.shape)} {count.dtype} tensor, expected a count"
            n = float(count)
            if not (0 <= n <= 2**53 and n == int(n)):  # 0: fp16 steps all skipped so far
                return f"'step' is {n!r}, expected a whole number of steps >= 0"
    return None


def set_schedule_step(scheduler, step: int) -> None:
    """Put a ``LambdaLR`` at ``step`` of its own schedule (``lr = base_lr · λ(step)`` in
    every parameter group, as ``scheduler.step()`` computes it)."""
    scheduler.last_epoch = step
    scheduler._step_count = step + 1
    lrs = [
        base * fn(step) for fn, base in zip(scheduler.lr_lambdas, scheduler.base_lrs, strict=True)
    ]
    for group, base, lr in zip(
        scheduler.optimizer.param_groups, scheduler.base_lrs, lrs, strict=True
    ):
        group["initial_lr"], group["lr"] = base, lr
    scheduler._last_lr = lrs


def resume_plan(saved: dict, current: dict, done_epochs: int, force: bool) -> list[str]:
    """Compare a checkpoint's configuration (``saved``) with the current one.

    Returns the lines to print: one for a changed ``--lr`` / ``--epochs`` (the schedule
    is recomputed for them), one per overridden option under ``force``. Raises
    ``CheckpointError`` naming every changed option of :data:`RUN_OPTIONS` (unless
    ``force``), or an ``--epochs`` below the epochs already done. Options the saved
    configuration lacks (older versions) are not compared.
    """
    changed = [k for k in RUN_OPTIONS if k in saved and saved[k] != current.get(k)]
    described = [f"{_flag(k)} was {saved[k]!r}, now {current.get(k)!r}" for k in changed]
    if changed and not force:
        raise CheckpointError(
            "--resume: options that define the run differ from the checkpoint's: "
            + "; ".join(described)
            + ". Use the checkpoint's values, start a fresh run (another --output), or pass "
            "--force-resume to continue with the new values"
        )
    if current["epochs"] < done_epochs:
        raise CheckpointError(
            f"--resume: --epochs {current['epochs']} is below the {done_epochs} epochs the "
            "checkpoint has already trained"
        )
    notes = [f"--force-resume: continuing with {d}" for d in described]
    schedule = [k for k in SCHEDULE_OPTIONS if k in saved and saved[k] != current.get(k)]
    if schedule:
        notes.append(
            "--resume: "
            + ", ".join(f"{_flag(k)} {saved[k]} → {current[k]}" for k in schedule)
            + f": the warm-up/cosine schedule is recomputed for {current['epochs']} epochs at "
            f"peak lr {current['lr']} and continues after epoch {done_epochs}"
        )
    return notes


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def data_plan(path: Path, saved: dict | None, current: dict, force: bool) -> list[str]:
    """Compare the data fingerprints a checkpoint stored (``saved``: split → fingerprint,
    ``None`` for checkpoints of older versions) with the current data's.

    Returns the lines to print. Raises ``CheckpointError`` naming each changed split
    (images added, removed or edited since the checkpoint) unless ``force``: resuming would
    otherwise continue on other data with a step count that belongs to the old data.
    """
    if saved is None:
        return [f"--resume: {path} stores no data fingerprint (an older version): the data "
                "is not compared"]  # fmt: skip
    changed = []
    for split in sorted(set(saved) | set(current)):
        was, now = saved.get(split) or {}, current.get(split) or {}
        if was.get("samples") != now.get("samples"):
            changed.append(f"{split}: {was.get('samples')} → {now.get('samples')} samples")
        elif was.get("content_sha256") != now.get("content_sha256"):
            changed.append(f"{split}: the same {now.get('samples')} samples, other content")
    if not changed:
        return []
    described = "; ".join(changed)
    if not force:
        raise CheckpointError(
            f"--resume: the data changed since {path} ({described}): the run would continue "
            "on other data. Start a fresh run (another --output), or pass --force-resume to "
            "continue on the new data (the schedule is then rebuilt for it)"
        )
    return [f"--force-resume: continuing on changed data ({described})"]


def backbone_plan(path: Path, saved: str | None, current: str | None, force: bool) -> list[str]:
    """Compare the frozen backbone weights' fingerprint a checkpoint stored (``saved``;
    ``None``: an older version, or a run whose whole backbone trains) with the model's.
    ``CheckpointError`` when they differ (the same ``--pretrained`` path may hold other
    weights now) unless ``force``; returns the lines to print."""
    if saved is None or current is None or saved == current:
        return []
    if not force:
        raise CheckpointError(
            f"--resume: the frozen backbone weights differ from those {path} was trained on "
            f"(fingerprint {saved[:12]}…, now {current[:12]}…): --pretrained names other "
            "weights than it did. Load the weights the run started with, start a fresh run "
            "(another --output), or pass --force-resume to continue on these"
        )
    return [f"--force-resume: continuing on other backbone weights than {path} was trained on"]


def schedule_step(payload: dict, steps_per_epoch: int) -> tuple[int, str | None]:
    """The step the schedule continues at: the checkpoint's, when it is its epochs times
    the current steps per epoch (always, unless the data or the batch size changed under
    ``--force-resume``); else that product — the schedule is rebuilt for the new steps per
    epoch, after the epochs done — and a line saying so."""
    saved, epoch = int(payload["scheduler"]["last_epoch"]), int(payload["epoch"])
    step = epoch * steps_per_epoch
    if saved == step:
        return saved, None
    was = f"{saved // epoch}" if saved % epoch == 0 else f"{saved / epoch:.1f}"
    return step, (
        f"--resume: the warm-up/cosine schedule is rebuilt for {steps_per_epoch} steps "
        f"per epoch (the checkpoint had {was}) and continues at step {step}, after epoch {epoch}"
    )
