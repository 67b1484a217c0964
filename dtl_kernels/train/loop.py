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
writes files.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

from .. import create_model
from .._io import atomic_write
from .._version import __version__
from ..models import read_adapter
from . import cache as trunk_cache
from . import checkpoint as ckpt
from .config import TrainConfig
from .data import build_datasets
from .metrics import MetricsLog, PeakMemory


# -- process setup -------------------------------------------------------------------------
class Dist:
    """Rank / world size / device; ``torchrun`` sets ``WORLD_SIZE`` and friends."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if use_cuda else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


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


def resolve_pretrained(cfg: TrainConfig, family: str):
    """What ``create_model(pretrained=…)`` gets; warns loudly for a random backbone."""
    p = cfg.pretrained
    if p is None and cfg.model == "tf_efficientnet_lite0":
        p = "efficientnet-lite0"
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
    options = {
        k: getattr(cfg, k)
        for k in ("rank", "adapt_from", "tap_from", "conv_kernel", "beta")
        if getattr(cfg, k) is not None
    }
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
def evaluate(net, dataset, batch_size, d: Dist, autocast, channels_last) -> tuple[float, float]:
    """``(loss, accuracy)`` over the whole dataset; each rank takes every world-th sample."""
    was = net.training
    net.eval()
    shard = torch.utils.data.Subset(dataset, range(d.rank, len(dataset), d.world))
    loss_sum, correct = 0.0, 0
    for x, y in DataLoader(shard, batch_size=batch_size, shuffle=False):
        x, y = _to(x, d.device, channels_last), y.to(d.device)
        with autocast():
            logits = net(x)
        loss_sum += F.cross_entropy(logits.float(), y, reduction="sum").item()
        correct += (logits.argmax(-1) == y).sum().item()
    net.train(was)
    loss_sum, correct, n = d.sum(loss_sum, correct, len(shard))
    return loss_sum / max(n, 1), correct / max(n, 1)


# -- the run ----------------------------------------------------------------------------------
def run(cfg: TrainConfig) -> dict:
    """Train (or ``--eval-only``) as configured; returns the summary (rank 0 writes it)."""
    t_start = time.time()
    d = Dist()
    try:
        return _run(cfg, d, t_start)
    finally:
        d.close()


def _run(cfg: TrainConfig, d: Dist, t_start: float) -> dict:
    out = Path(cfg.output)
    family = backbone_family(cfg.model)
    size = input_size(cfg)
    norm = (
        cfg.normalize
        if cfg.normalize != "auto"
        else ("half" if family in ("vit", "swin") else "imagenet")
    )
    if cfg.eval_only:
        _adapter_into_config(cfg)
    if d.world > 1 and cfg.batch_size % d.world:
        raise ValueError(f"--batch-size {cfg.batch_size} is not divisible by {d.world} processes")
    local_batch = cfg.batch_size // d.world

    seed_everything(cfg.seed)
    train_set, test_set, num_classes = build_datasets(cfg, size, norm)
    pretrained = resolve_pretrained(cfg, family) if d.main else _quiet_pretrained(cfg)
    seed_everything(cfg.seed)
    model = build_model(cfg, num_classes, pretrained).to(d.device)
    channels_last = cfg.channels_last == "on" or (
        cfg.channels_last == "auto" and family == "convnet"
    )
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    autocast = autocast_for(cfg.precision, d.device)
    if d.main:
        print(model.summary(), flush=True)
        print(
            f"data: {cfg.dataset}: {len(train_set)} train / {len(test_set)} test images, "
            f"{num_classes} classes, {size}x{size}, normalise={norm}; world={d.world}",
            flush=True,
        )

    if cfg.eval_only:
        model.load_adapter(cfg.adapter)
        test_loss, test_acc = evaluate(model, test_set, local_batch, d, autocast, channels_last)
        summary = _summary(cfg, model, d, t_start, num_classes, size, len(train_set), len(test_set))
        summary.update(
            eval_only=True, adapter=str(cfg.adapter), test_acc=test_acc, test_loss=test_loss
        )
        if d.main:
            _write_json(out / "summary.json", summary)
            print(f"test accuracy {100 * test_acc:.2f}% ({cfg.adapter})", flush=True)
        return summary

    # trunk cache (train/cache.py): train and evaluate from the stored trunk outputs
    net: nn.Module = model
    eval_net, train_data, test_data = model, train_set, test_set
    cache = trunk_cache.prepare(
        cfg, model, {"train": train_set, "test": test_set},
        {s: trunk_cache.dataset_identity(cfg, s, size, norm) for s in ("train", "test")},
        d, autocast, channels_last, local_batch, say=lambda m: print(m, flush=True),
    )  # fmt: skip
    if cache is not None:
        net = cache.tail
        train_data = cache.view("train")
        if cache.view("test") is not None:
            eval_net, test_data = cache.tail, cache.view("test")
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
        num_workers=cfg.workers if cache is None else 0,
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
    if cfg.resume:
        found = ckpt.load_latest(out)
        if found is None:
            if d.main:
                print(f"--resume: no checkpoint in {ckpt.checkpoint_dir(out)}, starting fresh")
        else:
            path, payload = found
            ckpt.restore(payload, path, model, optimizer, scheduler)
            start_epoch, log.rows = payload["epoch"], list(payload["metrics"])
            if d.main:
                print(f"resumed from {path} (epoch {start_epoch} done)", flush=True)
    elif d.main and ckpt.list_checkpoints(out):
        moved = ckpt.set_aside(out)
        print(
            f"note: {ckpt.checkpoint_dir(out)} held checkpoints of an earlier run; moved them to "
            f"{moved} (use --resume to continue a run)",
            flush=True,
        )

    memory = PeakMemory(d.device)
    memory.start()
    speeds = []
    test_loss = test_acc = None
    for epoch in range(start_epoch, cfg.epochs):
        sampler.set_epoch(epoch)
        train_net.train()
        t0 = time.time()
        loss_sum = correct = seen = 0.0
        bar = _progress(loader, cfg, d, epoch)
        for x, y in bar:
            x, y = _to(x, d.device, channels_last), y.to(d.device)
            with autocast():
                logits = train_net(x)
            loss = F.cross_entropy(logits.float(), y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            n = len(y)
            loss_sum += loss.item() * n
            correct += (logits.argmax(-1) == y).sum().item()
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
        speeds.append(seen / max(train_time, 1e-9))
        row = {
            "epoch": epoch + 1,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "test_loss": None,
            "test_acc": None,
            "images_per_s": speeds[-1],
            "epoch_time_s": train_time,
        }
        if (epoch + 1) % cfg.eval_every == 0 or epoch + 1 == cfg.epochs:
            test_loss, test_acc = evaluate(
                eval_net, test_data, local_batch, d, autocast, channels_last
            )
            row.update(test_loss=test_loss, test_acc=test_acc)
        log.append(row)
        if d.main:
            print(
                f"epoch {epoch + 1}/{cfg.epochs}: train loss {row['train_loss']:.4f} "
                f"acc {100 * row['train_acc']:.2f}% | "
                + (
                    f"test loss {test_loss:.4f} acc {100 * test_acc:.2f}% | "
                    if row["test_acc"] is not None
                    else ""
                )
                + f"{speeds[-1]:.1f} img/s",
                flush=True,
            )
            ckpt.save_checkpoint(
                out, epoch + 1, model, optimizer, scheduler, log.rows, cfg.to_dict(),
                with_buffers=cfg.method == "full", keep=cfg.keep_checkpoints,
            )  # fmt: skip
            log.write()
        d.barrier()
        if cfg.stop_after is not None and len(speeds) >= cfg.stop_after and epoch + 1 < cfg.epochs:
            if d.main:
                print(
                    f"stopping after epoch {epoch + 1} (--stop-after); --resume continues",
                    flush=True,
                )
            return {"stopped_after_epoch": epoch + 1}
    peak = memory.peak()

    if test_acc is None:  # resumed after the last epoch: evaluate the restored model
        test_loss, test_acc = evaluate(eval_net, test_data, local_batch, d, autocast, channels_last)
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
    )
    if d.main:
        adapter = model.save_adapter(out / "adapter.safetensors")
        summary.update(adapter=str(adapter), adapter_bytes=adapter.stat().st_size)
        log.write()
        log.plot(out / "curves.png", f"{cfg.model} {cfg.method} on {cfg.dataset}")
        _write_json(out / "summary.json", summary)
        atomic_write(
            out / "config.json",
            lambda tmp: Path(tmp).write_text(json.dumps(cfg.to_dict(), indent=2)),
        )
    d.barrier()
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
    """``--eval-only``: take method, side-network options and class count from the adapter."""
    _, meta = read_adapter(cfg.adapter)
    conf = json.loads(meta["config"])
    cfg.method = conf["method"]
    cfg.num_classes = conf["num_classes"]
    for key in ("rank", "adapt_from", "tap_from", "conv_kernel", "beta"):
        setattr(cfg, key, (conf.get("csn") or {}).get(key))


def _summary(cfg, model, d, t_start, num_classes, size, n_train, n_test) -> dict:
    return {
        "model": cfg.model,
        "method": cfg.method,
        "dataset": cfg.dataset,
        "num_classes": num_classes,
        "img_size": size,
        "train_images": n_train,
        "test_images": n_test,
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
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))
