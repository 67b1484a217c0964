"""The output folder of a ``dtl-train`` run: what a run writes there, the earlier run's
outputs moved aside before any work, the ``--resume`` point, a checkpoint per epoch and,
at the end, the adapter, metrics, curves, config and summary (strict JSON, atomic)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .._io import atomic_write, fsync_dir, json_text, remove_stale_temps, unwritable_kind
from .._version import __version__
from ..models.adapters import save_adapter
from . import cache as trunk_cache
from . import checkpoint as ckpt
from . import manifest
from .config import TrainConfig
from .metrics import MetricsLog
from .output_lock import LOCK_NAME

#: What a run writes in OUTPUT; a fresh run moves an earlier run's aside (never deletes
#: them unless --overwrite).
RUN_OUTPUTS = (
    "adapter.safetensors", "summary.json", "metrics.jsonl", "metrics.csv", "curves.png",
    "config.json",
)  # fmt: skip


# -- before any work ---------------------------------------------------------------------------
def resume_point(cfg: TrainConfig) -> tuple[Path, dict, list[str]] | None:
    """``--resume``: the newest checkpoint, its payload and the lines to print about changed
    options (``CheckpointError`` for a refused change); ``None`` without one."""
    if not cfg.resume or cfg.eval_only:
        return None
    found = ckpt.load_latest(cfg.output)
    if found is None:
        return None
    path, payload = found
    notes = ckpt.resume_plan(payload["config"], cfg.to_dict(), payload["epoch"], cfg.force_resume)
    return path, payload, notes


def check_output_folder(cfg: TrainConfig) -> None:
    """Before any work: ``--output`` is a folder (or not there yet), and nothing in it
    stands under a name the run writes that it could not write (a folder named
    ``adapter.safetensors`` failed the run after its last epoch, a file named
    ``checkpoints`` after its first, a FIFO lock file with "Invalid argument");
    ``ValueError`` naming the path."""
    out = Path(cfg.output)
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"--output {out} exists and is not a folder: remove it or choose "
                         "another --output")  # fmt: skip
    names = ("summary.json",) if cfg.eval_only else RUN_OUTPUTS
    for name in (*names, manifest.MANIFEST_NAME, LOCK_NAME):
        kind = unwritable_kind(out / name)
        if kind is not None:
            raise ValueError(f"--output {out}: {out / name} is {kind}, where dtl-train writes "
                             f"its {name}; remove it or choose another --output")  # fmt: skip
    folder = ckpt.checkpoint_dir(out)
    if not cfg.eval_only and folder.exists() and not folder.is_dir():
        raise ValueError(f"--output {out}: dtl-train keeps its checkpoints in {folder}, which "
                         "is not a folder; remove it or choose another --output")  # fmt: skip


def prepare_output(cfg: TrainConfig, resumed: bool, say) -> None:
    """Rank 0, before any work (the folder is locked): remove stale temporary files; keep
    an earlier run's outputs.

    A fresh run moves the earlier run's checkpoints and outputs (adapter, summary, metrics,
    curves, config) to ``checkpoints.old-<n>``. ``--overwrite`` deletes instead exactly the
    files the earlier run recorded as its own (:mod:`~dtl_kernels.train.manifest`) and
    names them; any other file under an output's name (a user's own ``config.json``) is
    moved aside, never deleted. ``--eval-only`` moves an earlier ``summary.json`` to
    ``summary.old-<n>.json`` (``--overwrite``: replaces it if a run recorded it).
    """
    out = Path(cfg.output)
    folders = [out, ckpt.checkpoint_dir(out), trunk_cache.cache_folder(cfg)]
    for p in remove_stale_temps(*folders, owned=_written_by_runs):
        say(f"removed {p} (left by an interrupted write)")
    if resumed:
        return
    if cfg.eval_only:
        _keep_earlier_summary(out, cfg.overwrite, say)
        return
    earlier = [out / n for n in RUN_OUTPUTS if (out / n).is_file()] + ckpt.list_checkpoints(out)
    if earlier and cfg.overwrite:
        earlier = _delete_recorded(out, earlier, say)
        manifest.forget(out)
    if earlier:
        names = ", ".join(_names(out, earlier))
        moved = ckpt.set_aside(out, also=(*RUN_OUTPUTS, manifest.MANIFEST_NAME))
        say(
            f"--overwrite: kept {names}: no run recorded them as its own; moved them to {moved}"
            if cfg.overwrite
            else f"note: {out} held an earlier run; moved its checkpoints and outputs to "
            f"{moved} (use --resume to continue a run, --overwrite to delete them instead)"
        )
    manifest.forget(out)


def _names(out: Path, paths: list[Path]) -> list[str]:
    return [p.relative_to(out).as_posix() for p in paths]


def _delete_recorded(out: Path, earlier: list[Path], say) -> list[Path]:
    """``--overwrite``: delete the files of ``earlier`` the manifest records; the rest."""
    own = manifest.recorded(out)
    mine = [p for p in earlier if p.relative_to(out).as_posix() in own]
    for path in mine:
        path.unlink()
    if mine:
        fsync_dir(out)
        say(f"--overwrite: deleted {', '.join(_names(out, mine))} in {out} (the earlier run's "
            "own files, as its manifest records)")  # fmt: skip
    return [p for p in earlier if p not in mine]


def _written_by_runs(name: str) -> bool:
    """Whether dtl-train writes files named ``name`` (its outputs, manifest, checkpoints,
    disk trunk cache): only their interrupted writes' temporary files are removed (a
    folder may be shared: ``--output .``, ``--cache-dir ~/.cache``)."""
    return (
        name in RUN_OUTPUTS
        or name == manifest.MANIFEST_NAME
        or ckpt.epoch_of(Path(name)) is not None
        or trunk_cache.TrunkCache.is_file_name(name)
    )


def _keep_earlier_summary(out: Path, overwrite: bool, say) -> None:
    summary = out / "summary.json"
    if not summary.is_file() or (overwrite and "summary.json" in manifest.recorded(out)):
        return
    n = 1
    while (target := out / f"summary.old-{n}.json").exists():
        n += 1
    summary.rename(target)
    say(f"note: moved the earlier {summary} to {target}")


# -- while training ----------------------------------------------------------------------------
def save_epoch(out, epoch, model, optimizer, scheduler, log: MetricsLog, cfg, data=None,
               backbone=None) -> None:  # fmt: skip
    """Rank 0, after each epoch: the checkpoint (the newest ``--keep-checkpoints`` kept,
    with the ``data`` fingerprints and the ``backbone``'s), then the metrics so far."""
    manifest.record(out, ckpt.checkpoint_path(out, epoch), *log.paths())
    ckpt.save_checkpoint(
        out, epoch, model, optimizer, scheduler, log.rows, cfg.to_dict(),
        with_buffers=cfg.method == "full", keep=cfg.keep_checkpoints, data=data,
        backbone=backbone,
    )  # fmt: skip
    log.write()


def last_checkpoint_note(out: Path, rows: list[dict] = ()) -> str:
    """Where a stopped run can ``--resume`` from (for the divergence errors); ``rows``: the
    metrics rows so far (which epochs skipped non-finite steps)."""
    files = ckpt.list_checkpoints(out)
    if not files:
        return "no checkpoint was written before"
    clean, newest = ckpt.newest_clean(files, rows), files[-1]
    if clean is None or clean == newest:
        return f"the last finite checkpoint is {newest} (--resume continues from it)"
    return (
        f"--resume continues from the newest checkpoint, {newest}, but its epoch skipped "
        f"steps with a non-finite loss or gradient: should it diverge again, delete the "
        f"checkpoints after {clean} (the newest of an epoch without skipped steps) to "
        "resume from that one"
    )


# -- at the end --------------------------------------------------------------------------------
def write_outputs(out: Path, model, log: MetricsLog, cfg: TrainConfig, summary: dict) -> None:
    """Rank 0, after training: adapter, metrics, curves, summary (with the adapter's path
    and size added), config."""
    manifest.record(out, *(out / n for n in RUN_OUTPUTS))
    root = str(Path(cfg.data_root).resolve()) if cfg.data_root else None
    training = {"dataset": cfg.dataset, "data_root": root, "test_split": cfg.test_split}
    adapter = save_adapter(model, out / "adapter.safetensors", training=training)
    summary.update(adapter=str(adapter), adapter_bytes=adapter.stat().st_size)
    log.write()
    log.plot(out / "curves.png", f"{cfg.model} {cfg.method} on {cfg.dataset}")
    write_json(out / "summary.json", summary)
    write_json(out / "config.json", cfg.to_dict())


def run_summary(cfg, model, d, t_start, num_classes, size, n_train, n_test) -> dict:
    """The summary's fields shared by training and ``--eval-only`` (results added later)."""
    return {
        "model": cfg.model,
        "method": cfg.method,
        "dataset": cfg.dataset,
        "num_classes": num_classes,
        "img_size": size,
        "train_images": n_train,
        "test_images": n_test,
        "evaluated_on": f"val ({cfg.val_split} held out of train)" if cfg.val_split else "test",
        "trainable_params": model.num_parameters(trainable_only=True),
        "total_params": model.num_parameters(),
        "model_summary": model.summary(),
        "epochs": cfg.epochs,
        "batch_size": cfg.batch_size,
        "lr": cfg.lr,
        "seed": cfg.seed,
        "precision": cfg.precision,
        "world_size": d.world,
        "device": str(d.device),
        "torch_threads": torch.get_num_threads(),
        "wall_time_s": time.time() - t_start,
        "dtl_kernels_version": __version__,
        "torch_version": torch.__version__,
    }


def write_eval_summary(out: Path, summary: dict) -> None:
    """Rank 0, ``--eval-only``: ``summary.json``, recorded as this run's."""
    manifest.record(out, out / "summary.json")
    write_json(out / "summary.json", summary)


def write_json(path: Path, data: dict) -> None:
    """Strict JSON (NaN / inf written as null), atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json_text(data) + "\n"))
