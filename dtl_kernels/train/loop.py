"""The training loop behind ``dtl-train``: data → model → AdamW + warm-up/cosine → epochs
with checkpoints → adapter, metrics, summary. Uses only the models' public API
(:func:`dtl_kernels.create_model`, ``embed`` / ``run_blocks`` / ``forward_head``,
``save_adapter`` / ``load_adapter``); it holds no model logic.

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
the gradients, so the run matches one process with the same global batch. Only rank 0
writes files. Collectives have explicit timeouts and a failure of one rank in setup, the
cache build or a save is raised on every rank (:mod:`dtl_kernels.train.dist`).

What the loop guarantees (README, "What the trainer guarantees"):

* Before any work, every option is checked, and so are the output folder (an earlier
  run's outputs are moved aside, never replaced without ``--overwrite``; stale temporary
  files of killed writes are removed) and, for ``--resume``, the checkpoint's options
  (:func:`checkpoint.resume_plan`).
* A step whose loss or gradients are not finite is skipped (no update); more than
  ``--max-nonfinite-steps`` in a row stop the run with :class:`DivergenceError`, keeping
  the last finite checkpoint and writing no adapter. Every JSON file stays strict JSON.
"""

from __future__ import annotations

import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from .. import create_model
from .._io import atomic_write, json_text, remove_stale_temps
from .._version import __version__
from ..models import offline_weights
from ..models.base import adapter_info, read_adapter
from . import cache as trunk_cache
from . import checkpoint as ckpt
from .config import TrainConfig
from .data import build_datasets
from .dist import Dist, RankFailed
from .metrics import MetricsLog, PeakMemory

#: What a run writes in OUTPUT; a fresh run moves an earlier run's aside (never deletes
#: them unless --overwrite).
RUN_OUTPUTS = (
    "adapter.safetensors", "summary.json", "metrics.jsonl", "metrics.csv", "curves.png",
    "config.json",
)  # fmt: skip

__all__ = ["DivergenceError", "Dist", "RankFailed", "run"]


class DivergenceError(RuntimeError):
    """Training stopped: too many consecutive steps had a non-finite loss or gradient."""


def loud_warning(message: str) -> None:
    bar = "!" * 78
    print(f"\n{bar}\n!! WARNING: {message}\n{bar}\n", file=sys.stderr, flush=True)
    warnings.warn(message, stacklevel=2)


def seed_everything(seed: int) -> None:
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# -- model and data ----------------------------------------------------------------------------
def backbone_family(model_name: str) -> str:
    """``vit`` / ``swin`` / ``convnet`` / ``other`` from timm's registry (no model built)."""
    import timm

    if not timm.is_model(model_name):
        raise ValueError(
            f"--model {model_name!r} is not a timm model name (see timm.list_models())"
        )
    module = timm.models.model_entrypoint(model_name).__module__
    if module.endswith("vision_transformer"):
        return "vit"
    if module.endswith("swin_transformer"):
        return "swin"
    if module.endswith(("efficientnet", "mobilenetv3")):
        return "convnet"
    return "other"


def input_size(cfg: TrainConfig) -> int:
    if cfg.img_size:
        return int(cfg.img_size)
    import timm

    size = timm.models.get_pretrained_cfg_value(cfg.model, "input_size") or (3, 224, 224)
    return int(size[-1])


def offline_weights_of(cfg: TrainConfig) -> offline_weights.OfflineWeights | None:
    """The offline weights this run loads: named by --pretrained, or the model's default."""
    if cfg.pretrained is None:
        return offline_weights.for_arch(cfg.model)
    return offline_weights.OFFLINE.get(cfg.pretrained)


def auto_normalize(cfg: TrainConfig, family: str) -> str:
    """--normalize auto: what the offline weights were trained with; else what timm's
    pretrained config of the model says (0.5 / 0.5 or ImageNet mean / std); else 0.5 / 0.5
    for ViT and Swin, ImageNet mean / std for CNNs."""
    offline = offline_weights_of(cfg)
    if offline is not None:
        return offline.normalize
    import timm

    try:
        mean = timm.models.get_pretrained_cfg_value(cfg.model, "mean")
    except Exception:  # noqa: BLE001 — an unknown name is reported when the model is built
        mean = None
    if mean is not None and all(abs(m - 0.5) < 1e-6 for m in mean):
        return "half"
    imagenet = (0.485, 0.456, 0.406)
    if (
        mean is not None
        and len(mean) == 3
        and all(abs(a - b) < 1e-3 for a, b in zip(mean, imagenet, strict=True))
    ):
        return "imagenet"
    return "half" if family in ("vit", "swin") else "imagenet"


def resolve_pretrained(cfg: TrainConfig, family: str):
    """What ``create_model(pretrained=…)`` gets; warns loudly for a random backbone."""
    p = cfg.pretrained
    offline = offline_weights_of(cfg)
    if p is None and offline is not None:  # weights that install offline: the default
        p = offline.name
    if p is None or str(p).lower() == "none":
        loud_warning(
            f"{cfg.model} has a RANDOM backbone (no --pretrained PATH, no 'hub'). DTL fine-tunes "
            "a frozen *pretrained* network: with random weights the method is meaningless and "
            "the accuracy says nothing. Pass --pretrained PATH (or 'hub' with a network)."
        )
        return False
    if p == "hub":
        return True
    return p


def build_model(cfg: TrainConfig, num_classes: int, pretrained) -> nn.Module:
    """The model ``cfg`` describes; an option combination timm or the wrapper rejects is a
    ``ValueError`` naming the model."""
    try:
        return _create(cfg, num_classes, pretrained)
    except (TypeError, AssertionError) as exc:
        raise ValueError(f"cannot build --model {cfg.model} with these options: {exc}") from exc


def _create(cfg: TrainConfig, num_classes: int, pretrained) -> nn.Module:
    options = {
        k: getattr(cfg, k)
        for k in ("rank", "adapt_from", "tap_from", "conv_kernel", "beta")
        if getattr(cfg, k) is not None
    }
    if cfg.lora_rank is not None:
        options["lora_rank"] = cfg.lora_rank
    if cfg.drop_path:
        options["drop_path_rate"] = cfg.drop_path
    if cfg.img_size:
        try:
            return create_model(
                cfg.model, cfg.method, num_classes, pretrained, img_size=cfg.img_size, **options
            )
        except TypeError as exc:  # CNNs take any size and have no img_size argument
            if "img_size" not in str(exc):
                raise
    return create_model(cfg.model, cfg.method, num_classes, pretrained, **options)


def _to(x: torch.Tensor, device, channels_last: bool) -> torch.Tensor:
    if isinstance(x, (list, tuple)):  # a cached batch: [z_1 … z_k, y]
        return [_to(t, device, channels_last) for t in x]
    x = x.to(device, non_blocking=True)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x


# -- optimisation ------------------------------------------------------------------------------
def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no weight decay on biases and other 1-D parameters."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


class WarmupCosine:
    """LR factor per step: linear warm-up ``warmup_lr → lr``, then cosine to ``min_lr``."""

    def __init__(self, lr, warmup_lr, min_lr, warmup_steps, total_steps):
        self.lr, self.warmup_lr, self.min_lr = lr, warmup_lr, min_lr
        self.warmup_steps, self.total_steps = int(warmup_steps), int(total_steps)

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            lr = self.warmup_lr + (self.lr - self.warmup_lr) * step / self.warmup_steps
        else:
            t = (step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps)
            lr = self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + math.cos(math.pi * min(t, 1.0)))
        return lr / self.lr


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs CUDA; use bf16 (or fp32) on CPU")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return lambda: torch.autocast(device.type, dtype=dtype)


# -- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    net, dataset, batch_size, d: Dist, autocast, channels_last, workers: int = 0
) -> tuple[float, float]:
    """``(loss, accuracy)`` over the whole dataset; each rank takes every world-th sample."""
    was = net.training
    net.eval()
    shard = torch.utils.data.Subset(dataset, range(d.rank, len(dataset), d.world))
    loss_sum, correct = 0.0, 0
    for x, y in DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers):
        x, y = _to(x, d.device, channels_last), y.to(d.device)
        with autocast():
            logits = net(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    net.train(was)
    loss_sum, correct, n = d.sum(loss_sum, correct, len(shard))
    return loss_sum / max(n, 1), correct / max(n, 1)


# -- before any work ---------------------------------------------------------------------------
def check_pretrained(cfg: TrainConfig) -> None:
    """A ``--pretrained`` path must exist (checked before the data is read)."""
    p = cfg.pretrained
    if offline_weights.is_offline_name(p):
        offline_weights.check_fits(p, cfg.model)
        return
    if p is None or str(p).lower() in ("none", "hub"):
        return
    if not Path(p).is_file():
        raise FileNotFoundError(f"--pretrained: checkpoint not found: {p}")


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


def prepare_output(cfg: TrainConfig, resumed: bool, say) -> None:
    """Rank 0, before any work: remove stale temporary files; keep an earlier run's outputs.

    A fresh run moves the earlier run's checkpoints and outputs (adapter, summary, metrics,
    curves, config) to ``checkpoints.old-<n>`` (``--overwrite``: deletes them instead);
    ``--eval-only`` moves an earlier ``summary.json`` to ``summary.old-<n>.json``.
    """
    out = Path(cfg.output)
    folders = [out, ckpt.checkpoint_dir(out), trunk_cache.cache_folder(cfg)]
    for p in remove_stale_temps(*folders):
        say(f"removed {p} (left by an interrupted write)")
    if resumed:
        return
    if cfg.eval_only:
        _keep_earlier_summary(out, cfg.overwrite, say)
        return
    earlier = [out / n for n in RUN_OUTPUTS if (out / n).is_file()] + ckpt.list_checkpoints(out)
    if earlier and cfg.overwrite:
        for path in earlier:
            path.unlink()
        say(f"--overwrite: deleted the earlier run's outputs and checkpoints in {out}")
    elif earlier:
        moved = ckpt.set_aside(out, also=RUN_OUTPUTS)
        say(
            f"note: {out} held an earlier run; moved its checkpoints and outputs to {moved} "
            "(use --resume to continue a run, --overwrite to delete them instead)"
        )


def _keep_earlier_summary(out: Path, overwrite: bool, say) -> None:
    summary = out / "summary.json"
    if not summary.is_file() or overwrite:
        return
    n = 1
    while (target := out / f"summary.old-{n}.json").exists():
        n += 1
    summary.rename(target)
    say(f"note: moved the earlier {summary} to {target}")


# -- the run ----------------------------------------------------------------------------------
def run(cfg: TrainConfig) -> dict:
    """Train (or ``--eval-only``) as configured; returns the summary (rank 0 writes it)."""
    t_start = time.time()
    d = Dist(cfg.ddp_timeout)
    try:
        return _run(cfg, d, t_start)
    finally:
        d.close()


def _say(d: Dist):
    return (lambda m: print(m, flush=True)) if d.main else (lambda m: None)


def _run(cfg: TrainConfig, d: Dist, t_start: float) -> dict:
    out = Path(cfg.output)
    say = _say(d)
    family = d.run_agreed("checking the options", _preflight, cfg)
    found = d.run_agreed("reading the checkpoint", resume_point, cfg)
    if cfg.resume and found is None:
        say(f"--resume: no checkpoint in {ckpt.checkpoint_dir(out)}, starting fresh")
    d.main_then_agree("preparing the output folder", prepare_output, cfg, found is not None, say)
    for note in found[2] if found else ():
        say(note)
    size = input_size(cfg)
    norm = cfg.normalize if cfg.normalize != "auto" else auto_normalize(cfg, family)
    local_batch = cfg.batch_size // d.world

    seed_everything(cfg.seed)
    train_set, test_set, num_classes = d.run_agreed(
        "reading the data", build_datasets, cfg, size, norm
    )
    pretrained = resolve_pretrained(cfg, family) if d.main else _quiet_pretrained(cfg)
    seed_everything(cfg.seed)
    model = d.run_agreed("building the model", build_model, cfg, num_classes, pretrained)
    model = model.to(d.device)
    channels_last = cfg.channels_last == "on" or (
        cfg.channels_last == "auto" and family == "convnet"
    )
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    autocast = autocast_for(cfg.precision, d.device)
    say(model.summary())
    say(
        f"data: {cfg.dataset}: {len(train_set)} train / {len(test_set)} "
        f"{'validation (held out of train)' if cfg.val_split else 'test'} images, "
        f"{num_classes} classes, {size}x{size}, normalise={norm}; world={d.world}"
    )

    if cfg.eval_only:
        return _eval_only(cfg, d, model, test_set, local_batch, autocast, channels_last,
                          t_start, num_classes, size, len(train_set))  # fmt: skip

    # trunk cache (train/cache.py): train and evaluate from the stored trunk outputs
    net: nn.Module = model
    eval_net, train_data, test_data = model, train_set, test_set
    cache = d.run_agreed(
        "preparing the trunk cache", trunk_cache.prepare,
        cfg, model, {"train": train_set, "test": test_set},
        {s: trunk_cache.dataset_identity(cfg, s, size, norm) for s in ("train", "test")},
        d, autocast, channels_last, local_batch, say=say,
    )  # fmt: skip
    if cache is not None:
        net = cache.tail
        train_data = cache.view("train")
        if cache.view("test") is not None:
            eval_net, test_data = cache.tail, cache.view("test")
    workers = cfg.workers if cache is None else 0
    eval_workers = cfg.workers if test_data is test_set else 0
    train_net = net
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        train_net = DDP(net, find_unused_parameters=model.csn is not None)

    sampler = DistributedSampler(
        train_data, num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed, drop_last=False
    )
    loader = DataLoader(
        train_data,
        batch_size=local_batch,
        sampler=sampler,
        num_workers=workers,
        generator=torch.Generator().manual_seed(cfg.seed),
        persistent_workers=False,
    )
    steps = len(loader)
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.lr)
    schedule = WarmupCosine(
        cfg.lr, cfg.warmup_lr, cfg.min_lr, cfg.warmup_epochs * steps, cfg.epochs * steps
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    scaler = torch.amp.GradScaler("cuda") if cfg.precision == "fp16" else None

    log = MetricsLog(out)
    start_epoch = 0
    if found is not None:
        path, payload, _ = found
        d.run_agreed("restoring the checkpoint", ckpt.restore, payload, path, model, optimizer,
                     scheduler)  # fmt: skip
        start_epoch, log.rows = payload["epoch"], list(payload["metrics"])
        say(f"resumed from {path} (epoch {start_epoch} done)")

    memory = PeakMemory(d.device)
    memory.start()
    speeds = []
    test_loss = test_acc = None
    step = Stepper(train_net, model, optimizer, scheduler, scaler, cfg, autocast, d)
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        train_net.train()
        t0 = time.time()
        loss_sum = correct = seen = skipped = 0.0
        bar = _progress(loader, cfg, d, epoch)
        for x, y in bar:
            x, y = _to(x, d.device, channels_last), y.to(d.device)
            result = step(x, y)
            if result is None:
                skipped += 1
                if step.bad_streak > cfg.max_nonfinite_steps:
                    raise DivergenceError(_divergence_message(cfg, epoch, step, out))
                continue
            loss, hits = result
            n = len(y)
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
        if not _weights_finite(model):
            raise DivergenceError(
                f"the trained weights became non-finite in epoch {epoch + 1} (lower --lr, now "
                f"{cfg.lr}); {_last_checkpoint_note(out)}"
            )
        speeds.append(seen / max(train_time, 1e-9))
        row = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / seen if seen else None,
            "train_acc": correct / seen if seen else None,
            "test_loss": None,
            "test_acc": None,
            "images_per_s": speeds[-1],
            "epoch_time_s": train_time,
            "skipped_steps": int(skipped),
        }
        if skipped:
            say(f"epoch {epoch + 1}: skipped {int(skipped)} step(s) with a non-finite loss "
                "or gradient")  # fmt: skip
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            test_loss, test_acc = evaluate(
                eval_net, test_data, local_batch, d, autocast, channels_last, eval_workers
            )
            row.update(test_loss=test_loss, test_acc=test_acc)
        log.append(row)
        say(_epoch_line(cfg, epoch, row, speeds[-1]))
        d.main_then_agree(
            "saving the checkpoint", _save_epoch, out, epoch + 1, model, optimizer, scheduler,
            log, cfg,
        )  # fmt: skip
        if cfg.stop_after is not None and len(speeds) >= cfg.stop_after and epoch + 1 < cfg.epochs:
            say(f"stopping after epoch {epoch + 1} (--stop-after); --resume continues")
            return {"stopped_after_epoch": epoch + 1}
    peak = memory.peak()

    if test_acc is None:  # resumed after the last epoch: evaluate the restored model
        test_loss, test_acc = evaluate(
            eval_net, test_data, local_batch, d, autocast, channels_last, eval_workers
        )
    summary = _summary(cfg, model, d, t_start, num_classes, size, len(train_set), len(test_set))
    summary.update(
        test_acc=test_acc,
        test_loss=test_loss,
        peak_memory_bytes=peak,
        peak_memory_method=memory.method,
        images_per_s=sum(speeds) / len(speeds) if speeds else None,
        cached_trunk_blocks=cache.trunk_depth if cache is not None else 0,
        trunk_cache=cache.mode if cache is not None else "off",
        epochs_run_here=len(speeds),
        skipped_steps=sum(int(r.get("skipped_steps") or 0) for r in log.rows),
    )
    d.main_then_agree("writing the outputs", _write_outputs, out, model, log, cfg, summary)
    return summary


def _preflight(cfg: TrainConfig) -> str:
    """Checks that need no data: the model name, the pretrained path, the adapter of
    ``--eval-only``, the world size. Returns the backbone family."""
    family = backbone_family(cfg.model)
    check_pretrained(cfg)
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--precision fp16 needs CUDA; use bf16 (or fp32) on CPU")
    if cfg.eval_only:
        _adapter_into_config(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and cfg.batch_size % world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by {world} processes")
    return family


class Stepper:
    """One optimisation step that skips non-finite ones.

    ``step(x, y)`` → ``(loss, correct predictions)``, or ``None`` when the loss or a
    gradient was NaN / inf on any rank (no update; ``bad_streak`` counts such steps in a
    row). The LR schedule advances either way.
    """

    def __init__(self, train_net, model, optimizer, scheduler, scaler, cfg, autocast, d):
        self.train_net, self.optimizer, self.scheduler = train_net, optimizer, scheduler
        self.scaler, self.cfg, self.autocast, self.d = scaler, cfg, autocast, d
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.bad_streak = 0
        self.steps = 0

    def __call__(self, x, y) -> tuple[float, int] | None:
        self.steps += 1
        with self.autocast():
            logits = self.train_net(x)
        loss = F.cross_entropy(logits.float(), y, label_smoothing=self.cfg.label_smoothing)
        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            ok = self._scaled_step(loss)
        else:
            loss.backward()
            ok = self.d.all_true(bool(torch.isfinite(loss)) and self._grads_finite())
            if ok:
                self.optimizer.step()
            else:
                self.optimizer.zero_grad(set_to_none=True)
        self.scheduler.step()
        if not ok:
            self.bad_streak += 1
            return None
        self.bad_streak = 0
        return loss.item(), int((logits.argmax(-1) == y).sum().item())

    def _scaled_step(self, loss) -> bool:
        """fp16: the scaler skips a step with inf/NaN gradients (and lowers its scale)."""
        self.scaler.scale(loss).backward()
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return self.d.all_true(bool(torch.isfinite(loss)) and self.scaler.get_scale() >= scale)

    def _grads_finite(self) -> bool:
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return True
        return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def _weights_finite(model: nn.Module) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in model.parameters() if p.requires_grad)


def _last_checkpoint_note(out: Path) -> str:
    files = ckpt.list_checkpoints(out)
    if not files:
        return "no checkpoint was written before"
    return f"the last finite checkpoint is {files[-1]} (--resume continues from it)"


def _divergence_message(cfg: TrainConfig, epoch: int, step: Stepper, out: Path) -> str:
    return (
        f"training diverged: {step.bad_streak} consecutive steps with a non-finite loss or "
        f"gradient (epoch {epoch + 1}, step {step.steps} of this process; "
        f"--max-nonfinite-steps {cfg.max_nonfinite_steps}). No adapter was written; "
        f"{_last_checkpoint_note(out)}. Lower --lr (now {cfg.lr}) or check the data"
    )


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


def _save_epoch(out, epoch, model, optimizer, scheduler, log: MetricsLog, cfg) -> None:
    ckpt.save_checkpoint(
        out, epoch, model, optimizer, scheduler, log.rows, cfg.to_dict(),
        with_buffers=cfg.method == "full", keep=cfg.keep_checkpoints,
    )  # fmt: skip
    log.write()


def _write_outputs(out: Path, model, log: MetricsLog, cfg: TrainConfig, summary: dict) -> None:
    adapter = model.save_adapter(out / "adapter.safetensors")
    summary.update(adapter=str(adapter), adapter_bytes=adapter.stat().st_size)
    log.write()
    log.plot(out / "curves.png", f"{cfg.model} {cfg.method} on {cfg.dataset}")
    _write_json(out / "summary.json", summary)
    _write_json(out / "config.json", cfg.to_dict())


def _eval_only(cfg, d, model, test_set, local_batch, autocast, channels_last, t_start,
               num_classes, size, n_train) -> dict:  # fmt: skip
    mismatch = "warn" if cfg.allow_backbone_mismatch else "error"
    d.run_agreed("loading the adapter", model.load_adapter, cfg.adapter, mismatch)
    test_loss, test_acc = evaluate(
        model, test_set, local_batch, d, autocast, channels_last, cfg.workers
    )
    summary = _summary(cfg, model, d, t_start, num_classes, size, n_train, len(test_set))
    summary.update(eval_only=True, adapter=str(cfg.adapter), test_acc=test_acc, test_loss=test_loss)
    d.main_then_agree(
        "writing the summary", _write_json, Path(cfg.output) / "summary.json", summary
    )
    if d.main:
        print(f"test accuracy {100 * test_acc:.2f}% ({cfg.adapter})", flush=True)
    return summary


def _quiet_pretrained(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old, sys.stderr = sys.stderr, open(os.devnull, "w")  # noqa: SIM115
        try:
            return resolve_pretrained(cfg, "")
        finally:
            sys.stderr.close()
            sys.stderr = old


def _progress(loader, cfg, d, epoch):
    if not (d.main and cfg.progress):
        return loader
    from tqdm import tqdm

    return tqdm(
        loader,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
        unit="batch",
        leave=False,
        dynamic_ncols=True,
    )


def _adapter_into_config(cfg: TrainConfig) -> None:
    """``--eval-only``: take method, side-network options and class count from the adapter
    (its metadata schema-checked: ``AdapterError`` naming the file and field)."""
    _, meta = read_adapter(cfg.adapter)
    conf = adapter_info(meta, cfg.adapter)["config"]
    cfg.method = conf["method"]
    cfg.num_classes = conf["num_classes"]
    for key in ("rank", "adapt_from", "tap_from", "conv_kernel", "beta"):
        setattr(cfg, key, (conf.get("csn") or {}).get(key))
    cfg.lora_rank = (conf.get("lora") or {}).get("rank")


def _summary(cfg, model, d, t_start, num_classes, size, n_train, n_test) -> dict:
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


def _write_json(path: Path, data: dict) -> None:
    """Strict JSON (NaN / inf written as null), atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(json_text(data) + "\n"))
