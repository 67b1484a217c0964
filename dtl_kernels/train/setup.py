"""Set-up of a ``dtl-train`` run: the checks that need no data (:func:`preflight`), then
the data and the model (:func:`build`): backbone family, input size, normalisation,
pretrained weights, the model with its options, channels-last and autocast."""

from __future__ import annotations

import os
import sys
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from .. import create_model
from ..models import giants, lora, offline_weights
from ..models.adapter_description import class_names_problem
from ..models.adapters import adapter_info, read_adapter
from .adapter_options import adapter_into_config
from .config import TrainConfig, check_crop_resize
from .data import DataError, build_datasets
from .dist import Dist
from .log import LOGGER
from .outputs import check_output_folder
from .transforms import NAMED, Augmentation, Preprocessing

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# -- before any work ---------------------------------------------------------------------------
@dataclass
class Preflight:
    """What the checks before any work found: the backbone family and, for ``--eval-only``,
    the adapter's parsed metadata (:func:`dtl_kernels.models.adapters.adapter_info`)."""

    family: str
    adapter: dict | None = None


def preflight(cfg: TrainConfig) -> Preflight:
    """Checks that need no data: for ``--eval-only`` the adapter (whose model, weights,
    preprocessing and data fill what the flags leave open), the model name, the pretrained
    weights, LoRA's library, then :func:`check_options`. What the options alone make wrong
    is an :class:`OptionsError`."""
    info = None
    if cfg.eval_only:
        _, meta = read_adapter(cfg.adapter)
        info = adapter_info(meta, cfg.adapter)
        _option_checked(adapter_into_config, cfg, info)
    family = _option_checked(backbone_family, cfg.model)
    _option_checked(check_pretrained, cfg)  # a missing file stays an OSError (exit 1)
    if cfg.method == "lora":
        lora.check_peft()
    _option_checked(check_options, cfg)
    _option_checked(check_output_folder, cfg)
    return Preflight(family, info)


class OptionsError(ValueError):
    """An option combination found wrong before any work (``dtl-train`` exits 2)."""


def _option_checked(fn, *args):
    try:
        return fn(*args)
    except ValueError as exc:
        raise OptionsError(str(exc)) from exc


def check_options(cfg: TrainConfig) -> None:
    """What the options can be judged wrong by without data: the precision for this
    machine, the batch split, and the model the options describe — built on the meta
    device (no weights, no memory), so that what the constructors refuse (a DTL+ kernel
    wider than the token grids, a memory option the wrapper lacks) is refused before any
    data is read."""
    if cfg.precision == "fp16" and not torch.cuda.is_available():
        raise ValueError("--precision fp16 needs CUDA; use bf16 (or fp32) on CPU")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(
            f"--batch-size {cfg.batch_size} is not divisible by {world} process(es) × "
            f"--grad-accum {cfg.grad_accum}"
        )
    if cfg.crop_pct is not None and not cfg.img_size:  # the model's own size (the flag: config)
        check_crop_resize(input_size(cfg), cfg.crop_pct)
    build_model(cfg, cfg.num_classes or 2, False, device="meta")


def check_pretrained(cfg: TrainConfig) -> None:
    """``--pretrained``: a path must exist, offline weights must fit the model, and a model
    without weights that install offline needs it given (``none`` for a random backbone)."""
    p = cfg.pretrained
    if offline_weights.is_offline_name(p):
        offline_weights.check_fits(p, cfg.model)
        return
    if p is None and offline_weights.for_arch(cfg.model) is None:
        raise ValueError(
            f"--model {cfg.model} has no weights that install offline: pass --pretrained PATH "
            "(a checkpoint), --pretrained hub (download) or --pretrained none (a random "
            f"backbone: the accuracy then says nothing){offline_weights.hint()}"
        )
    if p is None or str(p).lower() in ("none", "hub"):
        return
    if not Path(p).is_file():
        raise FileNotFoundError(f"--pretrained: checkpoint not found: {p}")


# -- data and model ----------------------------------------------------------------------------
@dataclass
class Setup:
    """What the later phases work on: the data, the model and how batches reach it."""

    family: str  # backbone_family()
    prep: Preprocessing  # every image's resize, crop and normalisation
    augment: Augmentation  # training only (off by default)
    local_batch: int  # this process's micro-batch: --batch-size / (processes × --grad-accum)
    train_set: Dataset | None  # None under --eval-only
    test_set: Dataset
    num_classes: int
    model: nn.Module
    channels_last: bool
    autocast: Callable  # context-manager factory for every forward pass

    @property
    def size(self) -> int:
        """Input images are ``size × size``."""
        return self.prep.size


def build(cfg: TrainConfig, d: Dist, pre: Preflight, say: Callable[[str], None]) -> Setup:
    """Read the data and build the model on ``d.device``, seeded by ``--seed``; a failure
    on one rank is raised on every rank. ``--eval-only`` reads no training split."""
    prep = preprocessing(cfg, pre.family, pre.adapter)
    augment = Augmentation.from_config(cfg)
    local_batch = cfg.batch_size // (d.world * cfg.grad_accum)

    seed_everything(cfg.seed)
    train_set, test_set, num_classes = d.run_agreed(
        "reading the data", build_datasets, cfg, prep, augment, not cfg.eval_only
    )
    classes = getattr(test_set, "classes", None)
    if pre.adapter is not None:
        classes = _adapter_classes(cfg, pre.adapter, classes)
    problem = None if classes is None else class_names_problem(list(classes))
    remedy = "rename the class folders"
    if problem is None and classes is not None and len(classes) != num_classes:
        problem = f"{len(classes)} names for a head of --num-classes {num_classes}"
        remedy = "drop --num-classes"
    if problem is not None:  # before training, not when its adapter is written at the end
        raise DataError(
            f"the class names of --dataset {cfg.dataset} cannot be recorded in an adapter: "
            f"{problem}; {remedy}"
        )
    # only rank 0 warns about a random backbone
    pretrained = resolve_pretrained(cfg, pre.family) if d.main else _quiet_pretrained(cfg)
    seed_everything(cfg.seed)  # the initial weights do not depend on what the data drew
    model = d.run_agreed("building the model", build_model, cfg, num_classes, pretrained)
    # what predicting needs, recorded in the adapter: the preprocessing and the class names
    model.pretrained_cfg = {**model.pretrained_cfg, **prep.data_config()}
    model.class_names = list(classes) if classes is not None else None
    channels_last = cfg.channels_last == "on" or (
        cfg.channels_last == "auto" and pre.family == "convnet"
    )
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if cfg.fsdp and d.world > 1:  # each block goes to the device as it is sharded
        from .fsdp import shard

        model = d.run_agreed("sharding the backbone", shard, model, d)
    else:
        model = model.to(d.device)
    autocast = autocast_for(cfg.precision, d.device)
    say(model.summary())
    n_train = f"{len(train_set)} train / " if train_set is not None else ""
    say(
        f"data: {cfg.dataset}: {n_train}{len(test_set)} "
        f"{'validation (held out of train)' if cfg.val_split else 'test'} images, "
        f"{num_classes} classes, {prep.describe()}; world={d.world}"
    )
    if augment.flags():
        say(f"augmentation: {' '.join(augment.flags())}")
    if cfg.fsdp:
        say(f"--fsdp: the backbone's blocks sharded over {d.world} processes (FSDP2)"
            if d.world > 1 else "--fsdp: one process, nothing to shard")  # fmt: skip
    if d.main:
        LOGGER.debug(f"preprocessing (timm data config): {prep.data_config()}")
    return Setup(pre.family, prep, augment, local_batch, train_set, test_set, num_classes, model,
                 channels_last, autocast)  # fmt: skip


def preprocessing(cfg: TrainConfig, family: str, adapter: dict | None = None) -> Preprocessing:
    """The input pipeline of this run: the adapter's (``--eval-only``, when it records one),
    else the flags' with the weights' own interpolation and mean / std for ``auto``."""
    if adapter is not None and adapter["preprocessing"] is not None:
        return Preprocessing.from_data_config(adapter["preprocessing"])
    mean, std = mean_std(cfg, family)
    return Preprocessing(
        input_size(cfg), mean, std, cfg.interpolation or weights_interpolation(cfg.model),
        1.0 if cfg.crop_pct is None else cfg.crop_pct, cfg.crop_mode or "squash",
    )  # fmt: skip


def _adapter_classes(cfg: TrainConfig, info: dict, data_classes) -> list[str] | None:
    """``--eval-only``: the adapter's class names; ``ValueError`` when the dataset names
    other classes (the adapter's label ``i`` would be scored against another class)."""
    theirs = info["classes"]
    if theirs is not None and data_classes is not None and list(data_classes) != theirs:
        raise ValueError(
            f"--eval-only: the adapter's classes {theirs[:8]} differ from those of --dataset "
            f"{cfg.dataset} {list(data_classes)[:8]}: evaluate on the data it was trained for"
        )
    return theirs if theirs is not None else data_classes


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


def backbone_family(model_name: str) -> str:
    """``vit`` / ``swin`` / ``convnet`` / ``other`` from timm's registry (no model built)."""
    import timm

    if not timm.is_model(model_name):
        raise ValueError(
            f"--model {model_name!r} is not a timm model name (see timm.list_models())"
        )
    module = timm.models.model_entrypoint(model_name).__module__
    if module.endswith("vision_transformer") or module == giants.__name__:  # ViT-22B's shape
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


def mean_std(cfg: TrainConfig, family: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The input mean / std of ``--normalize``: a named set, or for ``auto`` what the
    weights were trained with — the offline weights' own, else the mean / std of timm's
    pretrained config of ``--model`` (CLIP's, EVA-02's… as they are); for a model timm
    has none for, 0.5 for ViT and Swin, ImageNet's for the rest."""
    if cfg.normalize != "auto":
        return NAMED[cfg.normalize]
    offline = offline_weights_of(cfg)
    if offline is not None:
        return NAMED[offline.normalize]
    import timm

    try:
        mean = timm.models.get_pretrained_cfg_value(cfg.model, "mean")
        std = timm.models.get_pretrained_cfg_value(cfg.model, "std")
    except Exception:  # noqa: BLE001 — an unknown name is reported when the model is built
        mean = std = None
    if mean and std and len(mean) == len(std) == 3:
        return tuple(float(v) for v in mean), tuple(float(v) for v in std)
    return NAMED["half" if family in ("vit", "swin") else "imagenet"]


def weights_interpolation(model_name: str) -> str:
    """The resize filter timm's pretrained config of the model names (bicubic if none)."""
    import timm

    try:
        interp = timm.models.get_pretrained_cfg_value(model_name, "interpolation")
    except Exception:  # noqa: BLE001 — an unknown name is reported when the model is built
        interp = None
    return interp if interp in ("bicubic", "bilinear", "nearest", "lanczos", "box", "hamming") \
        else "bicubic"  # fmt: skip


def resolve_pretrained(cfg: TrainConfig, family: str):
    """What ``create_model(pretrained=…)`` gets; warns loudly for a random backbone (only
    ``--pretrained none`` asks for one: :func:`check_pretrained`)."""
    p = cfg.pretrained
    offline = offline_weights_of(cfg)
    if p is None and offline is not None:  # weights that install offline: the default
        p = offline.name
    if p is None or str(p).lower() == "none":
        loud_warning(
            f"{cfg.model} has a RANDOM backbone (--pretrained none). DTL fine-tunes a frozen "
            "*pretrained* network: with random weights the method is meaningless and the "
            "accuracy says nothing. Pass --pretrained PATH (or 'hub' with a network)."
        )
        return False
    if p == "hub":
        return True
    return p


def build_model(cfg: TrainConfig, num_classes: int, pretrained, device=None) -> nn.Module:
    """The model ``cfg`` describes, built on ``device`` (``create_model``'s: the CPU by
    default, ``"meta"`` for shapes only); an option combination timm or the wrapper rejects
    is a ``ValueError`` naming the model, and so is a DTL+ kernel wider than its token
    grids."""
    size = input_size(cfg)
    if cfg.conv_kernel is not None and cfg.conv_kernel > 2 * size - 1:  # no grid beats the image
        _kernel_too_wide(cfg.conv_kernel, size, (size, size), "no token grid exceeds")
    try:
        model = _create(cfg, num_classes, pretrained, device)
    except (TypeError, AssertionError) as exc:
        raise ValueError(f"cannot build --model {cfg.model} with these options: {exc}") from exc
    check_conv_kernel(model, size)
    return model


def check_conv_kernel(model: nn.Module, size: int) -> None:
    """DTL+'s kernel must reach tokens: on an ``H × W`` grid, taps farther than
    ``max(H, W) - 1`` from the centre never touch one (they only cost time and memory), so
    ``k ≤ 2·max(H, W) - 1`` on the largest grid of an adapted block (``ValueError``)."""
    csn = getattr(model, "csn", None)
    k = csn.config.conv_kernel if csn is not None else 0
    if not k or not callable(getattr(model, "side_grids", None)):
        return
    ref = next(model.parameters())
    grids = model.side_grids(torch.zeros(1, 3, size, size, device=ref.device))
    largest = max(grids, key=max)
    if k > 2 * max(largest) - 1:
        _kernel_too_wide(k, size, largest, "the largest token grid of an adapted block is")


def _kernel_too_wide(k: int, size: int, grid: tuple[int, int], which: str) -> None:
    most = 2 * max(grid) - 1
    raise ValueError(
        f"--conv-kernel {k} is wider than the token grids it runs on: at --img-size {size} "
        f"{which} {grid[0]}×{grid[1]}, where a kernel wider than {most} has taps that never "
        f"reach a token; use --conv-kernel ≤ {most} or larger images"
    )


def _create(cfg: TrainConfig, num_classes: int, pretrained, device=None) -> nn.Module:
    options = {} if device is None else {"device": device}
    options |= {
        k: getattr(cfg, k)
        for k in ("rank", "adapt_from", "tap_from", "conv_kernel", "beta")
        if getattr(cfg, k) is not None
    }
    if cfg.checkpoint_tail:
        options["checkpoint_tail"] = True
    if cfg.trunk_dtype is not None:
        options["trunk_dtype"] = _DTYPES[cfg.trunk_dtype]
    if cfg.backbone_dtype is not None:
        options["backbone_dtype"] = _DTYPES[cfg.backbone_dtype]
    if cfg.lora_rank is not None:
        options["lora_rank"] = cfg.lora_rank
    if cfg.lora_blocks is not None:
        options["lora_blocks"] = cfg.lora_blocks
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


def _quiet_pretrained(cfg):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        old, sys.stderr = sys.stderr, open(os.devnull, "w")  # noqa: SIM115
        try:
            return resolve_pretrained(cfg, "")
        finally:
            sys.stderr.close()
            sys.stderr = old


def autocast_for(precision: str, device: torch.device):
    if precision == "fp32":
        return nullcontext
    if precision == "fp16" and device.type != "cuda":
        raise ValueError("--precision fp16 needs CUDA; use bf16 (or fp32) on CPU")
    dtype = torch.float16 if precision == "fp16" else torch.bfloat16
    return lambda: torch.autocast(device.type, dtype=dtype)
