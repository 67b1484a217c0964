"""Training steps of a ``dtl-train`` run: AdamW's parameter groups and the warm-up +
cosine LR schedule (per step, or per epoch as published), the optimisation step that skips
non-finite ones (:class:`Stepper`), the divergence stop (:class:`DivergenceError`) and the
evaluation pass."""

from __future__ import annotations

import math
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from .config import TrainConfig
from .dist import Dist
from .outputs import last_checkpoint_note


class DivergenceError(RuntimeError):
    """Training stopped: the run diverged (too many consecutive non-finite steps, an epoch
    without a finite step, exploded or non-finite weights, non-finite evaluation outputs)."""


# A trained weight beyond this magnitude means the optimisation exploded (trained models stay
# many orders of magnitude below; products of two such weights still fit float32).
EXPLODED_WEIGHT = 1e8


def to_device(x: torch.Tensor, device, channels_last: bool) -> torch.Tensor:
    """A batch's tensor (or the list of a cached batch) on ``device``, in the model's
    memory format."""
    if isinstance(x, (list, tuple)):  # a cached batch: [z_1 … z_k, y]
        return [to_device(t, device, channels_last) for t in x]
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


class EpochWarmupCosine:
    """LR factor per step, constant within an epoch (``--lr-step epoch``): timm's
    ``CosineLRScheduler(t_initial=epochs, warmup_t=warmup_epochs, warmup_lr_init=warmup_lr,
    lr_min=min_lr)`` stepped once per epoch, as the published loop does. Epoch ``t``
    (0-based) trains at ``warmup_lr + t·(lr − warmup_lr)/warmup_epochs`` while
    ``t < warmup_epochs``, then at ``min_lr + ½(lr − min_lr)(1 + cos(π·t/epochs))``: timm's
    cosine counts the warm-up epochs too (``warmup_prefix=False``), so after the warm-up
    it starts a little below ``lr``."""

    def __init__(self, lr, warmup_lr, min_lr, warmup_epochs, epochs, steps_per_epoch):
        self.lr, self.warmup_lr, self.min_lr = lr, warmup_lr, min_lr
        self.warmup_epochs, self.epochs = warmup_epochs, epochs
        self.steps_per_epoch = max(1, int(steps_per_epoch))

    def epoch_lr(self, t: int) -> float:
        if t < self.warmup_epochs:
            return self.warmup_lr + t * (self.lr - self.warmup_lr) / self.warmup_epochs
        cos = math.cos(math.pi * min(t, self.epochs) / self.epochs)  # past the end: the floor
        return self.min_lr + 0.5 * (self.lr - self.min_lr) * (1 + cos)

    def __call__(self, step: int) -> float:
        return self.epoch_lr(step // self.steps_per_epoch) / self.lr


def lr_schedule(cfg: TrainConfig, steps_per_epoch: int):
    """The LR factor per step that ``cfg`` asks for (``--lr-step``), for a ``LambdaLR``
    stepped after every optimisation step (so a checkpoint's step count places either)."""
    if cfg.lr_step == "epoch":
        return EpochWarmupCosine(cfg.lr, cfg.warmup_lr, cfg.min_lr, cfg.warmup_epochs,
                                 cfg.epochs, steps_per_epoch)  # fmt: skip
    return WarmupCosine(cfg.lr, cfg.warmup_lr, cfg.min_lr, cfg.warmup_epochs * steps_per_epoch,
                        cfg.epochs * steps_per_epoch)  # fmt: skip


# -- the step --------------------------------------------------------------------------------
def micro_batches(loader, n: int):
    """The batches of ``loader`` in groups of ``n`` (``--grad-accum``): the micro-batches of
    one optimiser step each (the last group of an epoch may be shorter)."""
    group = []
    for batch in loader:
        group.append(batch)
        if len(group) == n:
            yield group
            group = []
    if group:
        yield group


class Stepper:
    """One optimisation step over the micro-batches of a batch, skipping non-finite ones.

    ``step(group)`` (``group``: the ``(x, y)`` micro-batches of one step; one without
    ``--grad-accum``) → ``(mean loss, correct predictions)``, or ``None`` when a loss or a
    gradient was NaN / inf on any rank (no update; ``bad_streak`` counts such steps in a
    row). Each micro-batch's loss is weighted by its share of the group's samples, so the
    gradients add up to those of the whole batch in one pass. The LR schedule advances
    either way. ``mixer`` (timm's ``Mixup``) mixes each micro-batch's images and targets;
    the loss is then the soft-target cross-entropy, and accuracy counts the original labels.
    """

    def __init__(self, train_net, model, optimizer, scheduler, scaler, cfg, autocast, d,
                 mixer=None):  # fmt: skip
        self.train_net, self.optimizer, self.scheduler = train_net, optimizer, scheduler
        self.scaler, self.cfg, self.autocast, self.d = scaler, cfg, autocast, d
        self.mixer = mixer
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.bad_streak = 0
        self.steps = 0

    def __call__(self, group) -> tuple[float, int] | None:
        self.steps += 1
        total = sum(len(y) for _, y in group)
        self.optimizer.zero_grad(set_to_none=True)
        loss_sum, hits, finite = 0.0, 0, True
        for k, (x, y) in enumerate(group):
            with self._sync_after(k == len(group) - 1):
                target = y
                if self.mixer is not None:
                    x, target = self.mixer(x, y)
                with self.autocast():
                    logits = self.train_net(x)
                loss = self._loss(logits, target)
                weighted = loss * (len(y) / total)
                if self.scaler is not None:
                    self.scaler.scale(weighted).backward()
                else:
                    weighted.backward()
            # loss and correct predictions read back together: one synchronisation per
            # micro-batch, not three (a GPU step waits on each; float64 holds both exactly)
            hit = (logits.argmax(-1) == y).sum()
            value, n_hit = torch.stack([loss.detach().double(), hit.double()]).tolist()
            finite = finite and math.isfinite(value)
            loss_sum += value * len(y)
            hits += int(n_hit)
        sync = getattr(self.train_net, "sync_gradients", None)  # --fsdp: replicated grads
        if sync is not None:
            sync()
        ok = self._scaled_step(finite) if self.scaler is not None else self._plain_step(finite)
        self.scheduler.step()
        if not ok:
            self.bad_streak += 1
            return None
        self.bad_streak = 0
        return loss_sum / total, hits

    def _loss(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        if self.mixer is not None:  # soft targets (label smoothing is in them)
            from timm.loss import SoftTargetCrossEntropy

            return SoftTargetCrossEntropy()(logits.float(), target)
        return F.cross_entropy(logits.float(), target, label_smoothing=self.cfg.label_smoothing)

    def _sync_after(self, last: bool):
        """DDP averages gradients once per step: not after the group's earlier micro-batches."""
        no_sync = getattr(self.train_net, "no_sync", None)
        return nullcontext() if last or no_sync is None else no_sync()

    def _plain_step(self, finite: bool) -> bool:
        ok = self.d.all_true(finite and self._grads_finite())
        if ok:
            self.optimizer.step()
        else:
            self.optimizer.zero_grad(set_to_none=True)
        return ok

    def _scaled_step(self, finite: bool) -> bool:
        """fp16: the scaler skips a step with inf/NaN gradients (and lowers its scale)."""
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return self.d.all_true(finite and self.scaler.get_scale() >= scale)

    def _grads_finite(self) -> bool:
        """Whether every gradient is finite: one fused check per (device, dtype) (what
        GradScaler runs: a multi-tensor kernel that multiplies by 1.0, bit-identical, and
        flags any inf / NaN) and one read-back per device, instead of two kernels per
        gradient — DTL trains two tensors per adapted block, each a launch of host time on
        a GPU. Gradients that kernel does not take are checked one by one."""
        groups: dict[tuple, list[torch.Tensor]] = {}  # one multi-tensor launch per dtype
        single = []
        for g in (p.grad for p in self.params if p.grad is not None):
            if _fused_checkable(g):
                groups.setdefault((g.device, g.dtype), []).append(g)
            else:
                single.append(g)
        found: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
        for (device, _), group in groups.items():
            if device not in found:  # set to 1 by any group of the device, never reset
                found[device] = (torch.zeros(1, dtype=torch.float32, device=device),
                                 torch.ones(1, dtype=torch.float32, device=device))  # fmt: skip
            torch._amp_foreach_non_finite_check_and_unscale_(group, *found[device])
        ok = not any(flag.item() for flag, _ in found.values())
        return ok and all(bool(torch.isfinite(_values(g)).all()) for g in single)


def _fused_checkable(g: torch.Tensor) -> bool:
    """Whether the fused finiteness check takes ``g``: a plain real floating tensor laid out
    densely as autograd accumulates gradients (no expanded or overlapping elements, not a
    DTensor or a sparse tensor). Anything else is checked on its own."""
    if type(g) is not torch.Tensor or g.layout != torch.strided:
        return False
    if g.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return False
    dense = g.is_contiguous()
    if not dense and g.dim() in (4, 5):
        fmt = torch.channels_last if g.dim() == 4 else torch.channels_last_3d
        dense = g.is_contiguous(memory_format=fmt)
    return dense


def _values(g: torch.Tensor) -> torch.Tensor:
    """The stored values of a gradient (a sparse one's, coalesced)."""
    return g.coalesce().values() if g.layout == torch.sparse_coo else g


def check_weights_finite(
    model: nn.Module, cfg: TrainConfig, epoch: int, out: Path, rows: list[dict] = ()
) -> None:
    """After an epoch: trained weights that became non-finite, or exploded beyond
    ±:data:`EXPLODED_WEIGHT`, stop the run (a step with finite gradients can still overflow
    them); the last checkpoint stays the last good one. ``rows``: the metrics rows so
    far (for :func:`last_checkpoint_note`)."""
    trained = [p.detach() for p in model.parameters() if p.requires_grad]
    if not all(bool(torch.isfinite(p).all()) for p in trained):
        what = "became non-finite"
    elif any(p.numel() and float(p.abs().max()) > EXPLODED_WEIGHT for p in trained):
        what = f"exploded (beyond ±{EXPLODED_WEIGHT:g})"
    else:
        return
    raise DivergenceError(
        f"training diverged: the trained weights {what} in epoch {epoch + 1}. No adapter was "
        f"written; {last_checkpoint_note(out, rows)}. Lower --lr (now {cfg.lr})"
    )


def check_epoch_had_a_finite_step(
    cfg: TrainConfig, epoch: int, seen: float, skipped: int, out: Path, rows: list[dict] = ()
) -> None:
    """An epoch whose every step was skipped as non-finite (on all processes: ``seen`` is
    the total of trained samples) stops the run, whatever ``--max-nonfinite-steps`` says."""
    if skipped and not seen:
        raise DivergenceError(
            f"training diverged: no step of epoch {epoch + 1} had a finite loss and gradient "
            f"({skipped} skipped here). No adapter was written; "
            f"{last_checkpoint_note(out, rows)}. "
            f"Lower --lr (now {cfg.lr}) or check the data"
        )


def divergence_message(
    cfg: TrainConfig, epoch: int, step: Stepper, out: Path, rows: list[dict] = ()
) -> str:
    """Why the run stopped after more than ``--max-nonfinite-steps`` skipped steps in a row."""
    return (
        f"training diverged: {step.bad_streak} consecutive steps with a non-finite loss or "
        f"gradient (epoch {epoch + 1}, step {step.steps} of this process; "
        f"--max-nonfinite-steps {cfg.max_nonfinite_steps}). No adapter was written; "
        f"{last_checkpoint_note(out, rows)}. Lower --lr (now {cfg.lr}) or check the data"
    )


# -- evaluation --------------------------------------------------------------------------------
@torch.no_grad()
def evaluate(
    net, dataset, batch_size, d: Dist, autocast, channels_last, workers: int = 0
) -> tuple[float, float]:
    """``(loss, accuracy)`` over the whole dataset; each rank takes every world-th sample.

    :class:`DivergenceError` (on every rank) when any image's outputs (logits) are not
    finite: no accuracy is computed from them."""
    was = net.training
    net.eval()
    shard = torch.utils.data.Subset(dataset, range(d.rank, len(dataset), d.world))
    loss_sum, correct, bad, batches = 0.0, 0, 0, 0
    pin = d.device.type == "cuda"  # pinned batches: the non-blocking copies overlap
    for x, y in DataLoader(shard, batch_size=batch_size, shuffle=False, num_workers=workers,
                           pin_memory=pin):  # fmt: skip
        x, y = to_device(x, d.device, channels_last), y.to(d.device, non_blocking=True)
        with autocast():
            logits = net(x)
        # the batch's three numbers read back together: one synchronisation, not three
        got = torch.stack([(~torch.isfinite(logits)).any(-1).sum().double(),
                           F.cross_entropy(logits.float(), y, reduction="sum").double(),
                           (logits.argmax(-1) == y).sum().double()]).tolist()  # fmt: skip
        bad += int(got[0])
        loss_sum += got[1]
        correct += int(got[2])
        batches += 1
    most = math.ceil(math.ceil(len(dataset) / d.world) / batch_size)
    if d.lockstep and most > batches:  # as many forwards as the rank with the most batches
        x = to_device(dataset[0][0][None], d.device, channels_last)  # (outputs unused)
        for _ in range(most - batches):
            with autocast():
                net(x)
    net.train(was)
    loss_sum, correct, n, bad = d.sum(loss_sum, correct, len(shard), bad)
    if bad:
        raise DivergenceError(
            f"{int(bad)} of {int(n)} evaluation images got non-finite outputs (logits): no "
            "accuracy is computed from them"
        )
    return loss_sum / max(n, 1), correct / max(n, 1)
