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
from ..models import lora, offline_weights
from ..models.adapters import adapter_info, read_adapter
from .config import TrainConfig
from .data import build_datasets
from .dist import Dist


# -- before any work ---------------------------------------------------------------------------
def preflight(cfg: TrainConfig) -> str:
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
    blocks = (conf.get("lora") or {}).get("blocks")
    cfg.lora_blocks = lora.format_blocks(blocks) if blocks else None


# -- data and model ----------------------------------------------------------------------------
@dataclass
class Setup:
    """What the later phases work on: the data, the model and how batches reach it."""

    family: str  # backbone_family()
    size: int  # input images are size × size
    norm: str  # the normalisation ("auto" resolved)
    local_batch: int  # this process's share of --batch-size
    train_set: Dataset
    test_set: Dataset
    num_classes: int
    model: nn.Module
    channels_last: bool
    autocast: Callable  # context-manager factory for every forward pass


def build(cfg: TrainConfig, d: Dist, family: str, say: Callable[[str], None]) -> Setup:
    """Read the data and build the model on ``d.device``, seeded by ``--seed``; a failure
    on one rank is raised on every rank."""
    size = input_size(cfg)
    norm = cfg.normalize if cfg.normalize != "auto" else auto_normalize(cfg, family)
    local_batch = cfg.batch_size // d.world

    seed_everything(cfg.seed)
    train_set, test_set, num_classes = d.run_agreed(
        "reading the data", build_datasets, cfg, size, norm
    )
    # only rank 0 warns about a random backbone
    pretrained = resolve_pretrained(cfg, family) if d.main else _quiet_pretrained(cfg)
    seed_everything(cfg.seed)  # the initial weights do not depend on what the data drew
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
    return Setup(family, size, norm, local_batch, train_set, test_set, num_classes, model,
                 channels_last, autocast)  # fmt: skip


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
    ``ValueError`` naming the model, and so is a DTL+ kernel wider than its token grids."""
    size = input_size(cfg)
    if cfg.conv_kernel is not None and cfg.conv_kernel > 2 * size - 1:  # no grid beats the image
        _kernel_too_wide(cfg.conv_kernel, size, (size, size), "no token grid exceeds")
    try:
        model = _create(cfg, num_classes, pretrained)
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


def _create(cfg: TrainConfig, num_classes: int, pretrained) -> nn.Module:
    options = {
        k: getattr(cfg, k)
        for k in ("rank", "adapt_from", "tap_from", "conv_kernel", "beta")
        if getattr(cfg, k) is not None
    }
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
