"""The training loop behind ``dtl-train``: data → model → AdamW + warm-up/cosine → epochs
with checkpoints → adapter, metrics, summary. Uses only the models' public API
(:func:`dtl_kernels.create_model`, ``embed`` / ``run_blocks`` / ``forward_head``,
:func:`dtl_kernels.save_adapter` / :func:`dtl_kernels.load_adapter`); it holds no model
logic.

:func:`run` goes through the phases of a run, one function each here; the work of each
phase lives in its own module:

* before any work — option checks (:mod:`~dtl_kernels.train.setup`), the ``--resume``
  point and the output folder (:mod:`~dtl_kernels.train.outputs`);
* the data and the model (:func:`dtl_kernels.train.setup.build`);
* what the epochs feed the model: images, or the trunk cache
  (:mod:`~dtl_kernels.train.cache`), sharded over the processes;
* the optimiser, LR schedule and metrics log, restored from a checkpoint on ``--resume``;
* the epochs (:mod:`~dtl_kernels.train.step`: the step, divergence, evaluation), with a
  checkpoint after each;
* the end: the last evaluation, the summary and the outputs.

Trunk cache (``--cache-trunk off|auto|ram|disk``, SPEC §2 "further levers";
:mod:`dtl_kernels.train.cache`): with a frozen backbone, no augmentation and no random
layers in the trunk, what training needs from blocks ``1 … M`` (the tapped block inputs
and block ``M``'s output, :meth:`DTLModel.trunk_forward`) is computed once per sample
before training and each step runs only :meth:`DTLModel.forward_from_trunk`. With an fp32
cache it is the same computation; the linear probe caches the whole backbone walk.
``full`` fine-tuning never caches. Default ``auto``: RAM when allowed and within
``--cache-max-bytes``, else uncached (one line says why).

Distributed: under ``torchrun`` each process takes ``batch_size / world_size`` images of
every global batch (``DistributedSampler``; gloo on CPU, nccl on CUDA) and DDP averages
the gradients, so the run matches one process with the same global batch. ``--fsdp``
instead shards the frozen backbone's blocks over the processes (FSDP2,
:mod:`~dtl_kernels.train.fsdp`) and averages the replicated trainable gradients once per
step; the trunk cache is then off. Only rank 0
writes files. Collectives have explicit timeouts and a failure of one rank in setup, the
cache build or a save is raised on every rank (:mod:`dtl_kernels.train.dist`).

What the loop guarantees (README, "What the trainer guarantees"):

* Before any work, every option is checked; the output folder is locked for the whole run
  (:mod:`~dtl_kernels.train.output_lock`: one run per folder); an earlier run's outputs
  are moved aside, or under ``--overwrite`` deleted when its manifest records them
  (:mod:`~dtl_kernels.train.manifest`); stale temporary files of killed writes are
  removed; for ``--resume``, the checkpoint's options (:func:`checkpoint.resume_plan`)
  and, once the data is read, its fingerprint (:func:`checkpoint.data_plan`) are compared.
* A step whose loss or gradients are not finite is skipped (no update); more than
  ``--max-nonfinite-steps`` in a row, an epoch without a finite step, exploded or
  non-finite weights and non-finite evaluation outputs stop the run with
  :class:`DivergenceError`, keeping the last good checkpoint and writing no adapter. Every
  JSON file stays strict JSON.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torch.utils.data.distributed import DistributedSampler

from ..models.adapters import load_adapter
from ..optim import adamw
from . import cache as trunk_cache
from . import checkpoint as ckpt
from . import outputs, setup
from .config import TrainConfig
from .data import data_fingerprint
from .dist import Dist, RankFailed
from .log import LOGGER, configure
from .metrics import MetricsLog, PeakMemory
from .output_lock import OutputLock

# Names that lived in this module before it was split by phase; still importable from here.
from .outputs import RUN_OUTPUTS, prepare_output, resume_point
from .setup import (
    autocast_for,
    backbone_family,
    build_model,
    check_pretrained,
    input_size,
    loud_warning,
    offline_weights_of,
    resolve_pretrained,
    seed_everything,
)
from .step import (
    DivergenceError,
    Stepper,
    WarmupCosine,
    check_epoch_had_a_finite_step,
    check_weights_finite,
    divergence_message,
    evaluate,
    lr_schedule,
    micro_batches,
    param_groups,
    to_device,
)

__all__ = [
    "RUN_OUTPUTS", "DivergenceError", "Dist", "RankFailed", "Stepper", "WarmupCosine",
    "autocast_for", "backbone_family", "build_model", "check_pretrained",
    "evaluate", "input_size", "loud_warning", "offline_weights_of", "param_groups",
    "prepare_output", "resolve_pretrained", "resume_point", "run", "seed_everything",
]  # fmt: skip


# -- the run ----------------------------------------------------------------------------------
def run(cfg: TrainConfig) -> dict:
    """Train (or ``--eval-only``) as configured; returns the summary (rank 0 writes it)."""
    t_start = time.time()
    configure(cfg.quiet, cfg.verbose)
    with ExitStack() as held:  # released in reverse on any exit: the lock, then the group
        d = Dist(cfg.ddp_timeout)
        held.callback(d.close)
        return _run(cfg, d, t_start, held)


def _say(d: Dist):
    """Rank 0's messages (``logging``: ``--quiet`` hides them)."""
    return LOGGER.info if d.main else (lambda m: None)


def _run(cfg: TrainConfig, d: Dist, t_start: float, held: ExitStack) -> dict:
    say = _say(d)
    pre, found = _before_any_work(cfg, d, say, held)
    if d.main:
        LOGGER.debug("options: " + ", ".join(f"{k}={v}" for k, v in cfg.to_dict().items()))
    s = setup.build(cfg, d, pre, say)
    if cfg.eval_only:
        return _eval_only(cfg, d, s, t_start)
    backbone = _backbone(cfg, d, s, found, say)
    data = _data(cfg, d, s, found, say)
    feed = _feed(cfg, d, s, say)
    opt = _optimisation(cfg, d, s, len(feed.loader), found, data, backbone, say)
    done = _epochs(cfg, d, s, feed, opt, say)
    if done.stopped_after is not None:  # --stop-after: no final evaluation, no outputs
        return {"stopped_after_epoch": done.stopped_after}
    return _finish(cfg, d, s, feed, opt, done, t_start)


# -- before any work ---------------------------------------------------------------------------
def _before_any_work(
    cfg: TrainConfig, d: Dist, say, held: ExitStack
) -> tuple[setup.Preflight, tuple | None]:
    """Check the options, lock the output folder for this run (rank 0; released when
    ``held`` closes), read the ``--resume`` point, prepare the folder. Returns what the
    checks found (:class:`setup.Preflight`) and the resume point
    (:func:`outputs.resume_point`)."""
    pre = d.run_agreed("checking the options", setup.preflight, cfg)
    lock = d.main_then_agree("locking the output folder", OutputLock.acquire, Path(cfg.output))
    if lock is not None:
        held.callback(lock.release)
    found = d.run_agreed("reading the checkpoint", outputs.resume_point, cfg)
    if cfg.resume and found is None:
        say(f"--resume: no checkpoint in {ckpt.checkpoint_dir(Path(cfg.output))}, starting fresh")
    d.main_then_agree(
        "preparing the output folder", outputs.prepare_output, cfg, found is not None, say
    )
    for note in found[2] if found else ():
        say(note)
    return pre, found


def _eval_only(cfg: TrainConfig, d: Dist, s: setup.Setup, t_start: float) -> dict:
    """``--eval-only``: load the adapter, evaluate, write the summary."""
    mismatch = "warn" if cfg.allow_backbone_mismatch else "error"
    d.run_agreed("loading the adapter", load_adapter, s.model, cfg.adapter, mismatch)
    try:
        test_loss, test_acc = evaluate(
            s.model, s.test_set, s.local_batch, d, s.autocast, s.channels_last, cfg.workers
        )
    except DivergenceError as exc:
        raise DivergenceError(f"--eval-only {cfg.adapter}: {exc}") from None
    n_train = len(s.train_set) if s.train_set is not None else None
    summary = outputs.run_summary(cfg, s.model, d, t_start, s.num_classes, s.size, n_train,
                                  len(s.test_set))  # fmt: skip
    summary.update(eval_only=True, adapter=str(cfg.adapter), test_acc=test_acc, test_loss=test_loss)
    d.main_then_agree("writing the summary", outputs.write_eval_summary, Path(cfg.output), summary)
    return summary


# -- what the epochs run on --------------------------------------------------------------------
@dataclass
class Feed:
    """What the epochs train and evaluate on: images, or the cached trunk outputs."""

    cache: trunk_cache.Prepared | None
    train_net: nn.Module  # the model or the cache's tail; DDP-wrapped with several processes
    sampler: DistributedSampler
    loader: DataLoader
    eval_net: nn.Module
    test_data: Dataset
    eval_workers: int


def _feed(cfg: TrainConfig, d: Dist, s: setup.Setup, say) -> Feed:
    """Prepare the trunk cache when it applies, wrap the net in DDP, shard the train data."""
    # trunk cache (train/cache.py): train and evaluate from the stored trunk outputs
    net: nn.Module = s.model
    eval_net, train_data, test_data = s.model, s.train_set, s.test_set
    cache = None
    if d.lockstep:  # --fsdp: one process cannot run the sharded trunk alone to build it
        if cfg.cache_trunk != "off":
            say("trunk cache: off under --fsdp (the sharded trunk runs on every process)")
    else:
        cache = d.run_agreed(
            "preparing the trunk cache", trunk_cache.prepare,
            cfg, s.model, {"train": s.train_set, "test": s.test_set},
            {sp: trunk_cache.dataset_identity(cfg, sp, s.size, s.prep) for sp in ("train", "test")},
            d, s.autocast, s.channels_last, s.local_batch, say=say,
        )  # fmt: skip
    if cache is not None:
        net = cache.tail
        train_data = cache.view("train")
        if cache.view("test") is not None:
            eval_net, test_data = cache.tail, cache.view("test")
    workers = cfg.workers if cache is None else 0
    eval_workers = cfg.workers if test_data is s.test_set else 0
    train_net = net
    if d.lockstep:  # --fsdp: blocks sharded (setup.build), the rest replicated
        from .fsdp import ReplicatedGradients

        train_net = ReplicatedGradients(net, d)
    elif d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_net = DDP(net, find_unused_parameters=s.model.csn is not None)
    if cfg.compile:  # checkpoints and adapters keep using s.model (the modules themselves)
        train_net, eval_net = torch.compile(train_net), torch.compile(eval_net)

    sampler = DistributedSampler(
        train_data, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed, drop_last=False
    )
    loader = DataLoader(
        train_data,
        batch_size=s.local_batch,
        sampler=sampler,
        num_workers=workers,
        generator=torch.Generator().manual_seed(cfg.seed),
        persistent_workers=False,
        drop_last=bool(cfg.mixup or cfg.cutmix),  # timm's Mixup pairs images: even batches
        pin_memory=d.device.type == "cuda",  # pinned batches: the non-blocking copies overlap
    )
    return Feed(cache, train_net, sampler, loader, eval_net, test_data, eval_workers)


@dataclass
class Optimisation:
    """The optimiser state a checkpoint saves, and the metrics so far."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler | None  # fp16 only
    log: MetricsLog
    start_epoch: int  # epochs already done (--resume)
    data: dict  # split → fingerprint of the data (saved with each checkpoint)
    backbone: str | None  # the frozen backbone's fingerprint (saved with each checkpoint)


def _backbone(cfg: TrainConfig, d: Dist, s: setup.Setup, found, say) -> str | None:
    """The fingerprint of the frozen backbone weights (saved with every checkpoint; ``None``
    when the whole backbone trains); on ``--resume`` compared with the checkpoint's: the
    same ``--pretrained`` may name other weights now (a replaced file)."""
    fingerprint = s.model.backbone_fingerprint()
    if found is not None:
        path, payload, _ = found
        for note in d.run_agreed("comparing the backbone", ckpt.backbone_plan, path,
                                 payload.get("backbone_sha256"), fingerprint,
                                 cfg.force_resume):  # fmt: skip
            say(note)
    return fingerprint


def _data(cfg: TrainConfig, d: Dist, s: setup.Setup, found, say) -> dict:
    """The fingerprint of each split (saved with every checkpoint); on ``--resume``
    compared with the checkpoint's before any work is spent on the data (a change is
    refused unless ``--force-resume``)."""
    data = {"train": data_fingerprint(s.train_set), "test": data_fingerprint(s.test_set)}
    if found is not None:
        path, payload, _ = found
        for note in d.run_agreed("comparing the data", ckpt.data_plan, path,
                                 payload.get("data"), data, cfg.force_resume):  # fmt: skip
            say(note)
    return data


def _optimisation(
    cfg: TrainConfig,
    d: Dist,
    s: setup.Setup,
    steps: int,
    found,
    data: dict,
    backbone: str | None,
    say,
) -> Optimisation:
    """AdamW with the warm-up + cosine schedule over ``steps`` per epoch; on ``--resume``
    the model, optimiser, schedule and metrics are restored from the checkpoint."""
    steps = math.ceil(steps / cfg.grad_accum)  # optimiser steps per epoch
    optimizer = adamw(param_groups(s.model, cfg.weight_decay), lr=cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_schedule(cfg, steps))
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None

    log = MetricsLog(Path(cfg.output))
    start_epoch = 0
    if found is not None:
        path, payload, _ = found
        step, rebuilt = ckpt.schedule_step(payload, steps)
        if rebuilt:
            say(rebuilt)
        d.run_agreed("restoring the checkpoint", ckpt.restore, payload, path, s.model,
                     optimizer, scheduler, step)  # fmt: skip
        start_epoch, log.rows = payload["epoch"], list(payload["metrics"])
        say(f"resumed from {path} (epoch {start_epoch} done)")
    return Optimisation(optimizer, scheduler, scaler, log, start_epoch, data, backbone)


# -- the epochs --------------------------------------------------------------------------------
@dataclass
class Epochs:
    """What the epochs run in this process leave for the summary."""

    speeds: list[float] = field(default_factory=list)  # images/s of each epoch
    test_loss: float | None = None  # of the latest evaluation
    test_acc: float | None = None
    peak_memory: int | None = None
    memory_method: str = ""
    stopped_after: int | None = None  # the epoch after which --stop-after ended the run


def _epochs(
    cfg: TrainConfig, d: Dist, s: setup.Setup, feed: Feed, opt: Optimisation, say
) -> Epochs:
    """Train the remaining epochs; evaluate every ``--eval-every`` epochs and after the
    last; log and checkpoint each. ``--stop-after N`` ends the run after N of them."""
    out = Path(cfg.output)
    memory = PeakMemory(d.device)
    memory.start()
    done = Epochs(memory_method=memory.method)
    mixer = s.augment.batch_mixer(s.num_classes, cfg.label_smoothing)
    step = Stepper(feed.train_net, s.model, opt.optimizer, opt.scheduler, opt.scaler, cfg,
                   s.autocast, d, mixer)  # fmt: skip
    for epoch in range(opt.start_epoch, cfg.epochs):
        row = _train_epoch(cfg, d, s, feed, opt, step, epoch)
        done.speeds.append(row["images_per_s"])
        if row["skipped_steps"]:
            say(f"epoch {epoch + 1}: skipped {row['skipped_steps']} step(s) with a non-finite "
                "loss or gradient")  # fmt: skip
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            done.test_loss, done.test_acc = _evaluate(cfg, d, s, feed, opt.log.rows)
            row.update(test_loss=done.test_loss, test_acc=done.test_acc)
        opt.log.append(row)
        say(_epoch_line(cfg, epoch, row, row["images_per_s"]))
        d.main_then_agree(
            "saving the checkpoint", outputs.save_epoch, out, epoch + 1, s.model, opt.optimizer,
            opt.scheduler, opt.log, cfg, opt.data, opt.backbone,
        )  # fmt: skip
        if (
            cfg.stop_after is not None
            and len(done.speeds) >= cfg.stop_after
            and epoch + 1 < cfg.epochs
        ):
            say(f"stopping after epoch {epoch + 1} (--stop-after); --resume continues")
            done.stopped_after = epoch + 1
            return done
    done.peak_memory = memory.peak()
    return done


def _train_epoch(cfg, d: Dist, s: setup.Setup, feed: Feed, opt: Optimisation, step: Stepper,
                 epoch: int) -> dict:  # fmt: skip
    """One pass over this process's shard of the train data; returns the epoch's metrics
    row (totals over every process; no test metrics yet)."""
    feed.sampler.set_epoch(epoch)
    # the loader's workers draw their seeds from its generator once per epoch: seeded by
    # the epoch, not once per process, or a resumed run's epochs would repeat the first
    # ones' augmentations (a resume was not bit-identical with --workers and random ones)
    feed.loader.generator.manual_seed(epoch_seed(cfg.seed, epoch))
    feed.train_net.train()
    t0 = time.time()
    loss_sum = correct = seen = skipped = 0.0
    bar = _progress(feed.loader, cfg, d, epoch)
    for group in micro_batches(bar, cfg.grad_accum):
        group = [(to_device(x, d.device, s.channels_last), y.to(d.device, non_blocking=True))
                 for x, y in group]  # fmt: skip
        result = step(group)
        if result is None:
            skipped += 1
            if step.bad_streak > cfg.max_nonfinite_steps:
                raise DivergenceError(
                    divergence_message(cfg, epoch, step, Path(cfg.output), opt.log.rows)
                )
            continue
        loss, hits = result
        n = sum(len(y) for _, y in group)
        loss_sum += loss * n
        correct += hits
        seen += n
        if d.main and hasattr(bar, "set_postfix"):
            rate = seen * d.world / max(time.time() - t0, 1e-9)
            bar.set_postfix(
                loss=f"{loss_sum / seen:.4f}",
                acc=f"{100 * correct / seen:.1f}%",
                img_s=f"{rate:.1f}",
            )
    train_time = time.time() - t0
    loss_sum, correct, seen = d.sum(loss_sum, correct, seen)
    check_epoch_had_a_finite_step(cfg, epoch, seen, int(skipped), Path(cfg.output),
                                  opt.log.rows)  # fmt: skip
    check_weights_finite(s.model, cfg, epoch, Path(cfg.output), opt.log.rows)
    return {
        "epoch": epoch + 1,
        "lr": opt.optimizer.param_groups[0]["lr"],
        "train_loss": loss_sum / seen if seen else None,
        "train_acc": correct / seen if seen else None,
        "test_loss": None,
        "test_acc": None,
        "images_per_s": seen / max(train_time, 1e-9),
        "epoch_time_s": train_time,
        "skipped_steps": int(skipped),
    }


def epoch_seed(seed: int, epoch: int) -> int:
    """The train loader's generator seed in ``epoch`` (0-based) of a run with ``seed``:
    distinct for every (seed, epoch) pair of sane sizes."""
    return (seed * 1_000_003 + epoch) % 2**63


def _evaluate(
    cfg: TrainConfig, d: Dist, s: setup.Setup, feed: Feed, rows: list[dict] = ()
) -> tuple[float, float]:
    """The test metrics of the model now; non-finite outputs stop the run (diverged).
    ``rows``: the metrics rows so far (for the note on where to resume)."""
    try:
        return evaluate(feed.eval_net, feed.test_data, s.local_batch, d, s.autocast,
                        s.channels_last, feed.eval_workers)  # fmt: skip
    except DivergenceError as exc:
        raise DivergenceError(
            f"training diverged: {exc}. No adapter was written; "
            f"{outputs.last_checkpoint_note(Path(cfg.output), rows)}. Lower --lr (now {cfg.lr})"
        ) from None


def _epoch_line(cfg: TrainConfig, epoch: int, row: dict, speed: float) -> str:
    def num(v, fmt):
        return format(v, fmt) if v is not None and math.isfinite(v) else "n/a"

    test = (
        f"test loss {num(row['test_loss'], '.4f')} acc {num(100 * row['test_acc'], '.2f')}% | "
        if row["test_acc"] is not None
        else ""
    )
    train_acc = None if row["train_acc"] is None else 100 * row["train_acc"]
    return (
        f"epoch {epoch + 1}/{cfg.epochs}: train loss {num(row['train_loss'], '.4f')} "
        f"acc {num(train_acc, '.2f')}% | {test}{speed:.1f} img/s"
    )


def _progress(loader, cfg, d, epoch):
    """A tqdm bar over the batches: by default only when stderr is a terminal (in a log
    file its carriage-return frames are noise; each epoch prints one line anyway)."""
    wanted = cfg.progress if cfg.progress is not None else sys.stderr.isatty()
    if not (d.main and wanted and not cfg.quiet):
        return loader
    from tqdm import tqdm

    return tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        unit="batch",
        leave=False,
        dynamic_ncols=True,
    )


# -- the end -----------------------------------------------------------------------------------
def _finish(cfg: TrainConfig, d: Dist, s: setup.Setup, feed: Feed, opt: Optimisation,
            done: Epochs, t_start: float) -> dict:  # fmt: skip
    """The final test metrics, the summary and, on rank 0, the outputs."""
    test_loss, test_acc = done.test_loss, done.test_acc
    if test_acc is None:  # resumed after the last epoch: evaluate the restored model
        test_loss, test_acc = _evaluate(cfg, d, s, feed)
    summary = outputs.run_summary(cfg, s.model, d, t_start, s.num_classes, s.size,
                                  len(s.train_set), len(s.test_set))  # fmt: skip
    cache = feed.cache
    summary.update(
        test_acc=test_acc,
        test_loss=test_loss,
        peak_memory_bytes=done.peak_memory,
        peak_memory_method=done.memory_method,
        images_per_s=sum(done.speeds) / len(done.speeds) if done.speeds else None,
        cached_trunk_blocks=cache.trunk_depth if cache is not None else 0,
        trunk_cache=cache.mode if cache is not None else "off",
        epochs_run_here=len(done.speeds),
        skipped_steps=sum(int(r.get("skipped_steps") or 0) for r in opt.log.rows),
    )
    d.main_then_agree(
        "writing the outputs", outputs.write_outputs, Path(cfg.output), s.model, opt.log, cfg,
        summary,
    )  # fmt: skip
    return summary
