"""``dtl-train --eval-only --adapter FILE``: the adapter says what it needs — its model,
backbone weights, image size, preprocessing, side-network options, class count and the
data it was trained on — so the flags may be left out. A flag that contradicts the
adapter is refused, naming it; what an older adapter (before ``dtl_kernels.adapter/3``)
does not record is asked for by the flag to pass."""

from __future__ import annotations

from pathlib import Path

from ..models import lora
from .config import TrainConfig, _check_dataset
from .transforms import NAMED

_CSN_OPTIONS = ("rank", "adapt_from", "tap_from", "conv_kernel", "beta")


def adapter_into_config(cfg: TrainConfig, info: dict) -> None:
    """Fill ``cfg`` from the adapter's parsed metadata ``info``
    (:func:`dtl_kernels.models.adapters.adapter_info`); ``ValueError`` naming the flag for
    a contradiction or for what the adapter does not record."""
    where = f"adapter {cfg.adapter}"
    _model(cfg, info, where)
    _image_size(cfg, info, where)
    _preprocessing_flags(cfg, info, where)
    origin = info["model"]
    if cfg.pretrained is None and origin is not None and origin["pretrained"] is not None:
        recorded = origin["pretrained"]
        if "/" in recorded and not Path(recorded).is_file():  # a checkpoint that moved
            raise ValueError(
                f"{where} was trained on the backbone weights {recorded}, which are not there "
                "now: pass --pretrained PATH (where they are)"
            )
        cfg.pretrained = recorded
    conf = info["config"]
    cfg.method = conf["method"]
    cfg.num_classes = conf["num_classes"]
    for key in _CSN_OPTIONS:
        setattr(cfg, key, (conf.get("csn") or {}).get(key))
    cfg.lora_rank = (conf.get("lora") or {}).get("rank")
    blocks = (conf.get("lora") or {}).get("blocks")
    cfg.lora_blocks = lora.format_blocks(blocks) if blocks else None
    _dataset(cfg, info, where)


def _model(cfg: TrainConfig, info: dict, where: str) -> None:
    import timm

    origin = info["model"]
    if origin is not None and origin["library"] != "timm":
        raise ValueError(
            f"{where} was trained on a Hugging Face {origin['name']!r}: dtl-train evaluates "
            "timm models; load it with dtl_kernels.from_pretrained(path, pretrained=FOLDER)"
        )
    name = origin["name"] if origin is not None else info["backbone"].get("architecture")
    if not (isinstance(name, str) and timm.is_model(name)):
        name = None
    if cfg.model is None:
        if name is None:
            raise ValueError(f"{where} does not record its timm model: pass --model NAME")
        cfg.model = name
    elif name is not None and cfg.model != name:
        raise ValueError(f"--model {cfg.model}: {where} was trained on {name}; drop --model")


def _image_size(cfg: TrainConfig, info: dict, where: str) -> None:
    """The input size: the preprocessing's, else the ViT / Swin token grid's."""
    size = None
    if info["preprocessing"] is not None:
        size = info["preprocessing"]["input_size"][1]
    else:
        grid, patch = info["backbone"].get("grid"), info["backbone"].get("patch")
        if isinstance(grid, list) and isinstance(patch, list) and len(grid) == len(patch) == 2:
            if all(isinstance(v, int) and 0 < v <= 2**14 for v in (*grid, *patch)):
                size = grid[0] * patch[0]
    if cfg.img_size is None:
        if size is None:
            raise ValueError(
                f"{where} does not record its image size (schema {info['format']}): pass "
                "--img-size, the size it was trained at"
            )
        cfg.img_size = size
    elif size is not None and cfg.img_size != size:
        raise ValueError(
            f"--img-size {cfg.img_size}: {where} was trained at {size} px; drop --img-size"
        )


def _preprocessing_flags(cfg: TrainConfig, info: dict, where: str) -> None:
    """Preprocessing flags must agree with the adapter's record (older adapters: the flags
    are used as given)."""
    prep = info["preprocessing"]
    if prep is None:
        return
    given = {
        "--interpolation": (cfg.interpolation, prep["interpolation"]),
        "--crop-pct": (cfg.crop_pct, prep["crop_pct"]),
        "--crop-mode": (cfg.crop_mode, prep["crop_mode"]),
    }
    if cfg.normalize != "auto":
        given["--normalize"] = (list(NAMED[cfg.normalize][0]), prep["mean"])
    for flag, (ours, theirs) in given.items():
        if ours is not None and not _same(ours, theirs):
            shown = cfg.normalize if flag == "--normalize" else ours
            raise ValueError(f"{flag} {shown}: {where} was trained with {theirs}; drop {flag}")


def _same(a, b) -> bool:
    if isinstance(a, list):
        return len(a) == len(b) and all(abs(x - y) < 1e-6 for x, y in zip(a, b, strict=True))
    if isinstance(a, float):
        return abs(a - b) < 1e-9
    return a == b


def _dataset(cfg: TrainConfig, info: dict, where: str) -> None:
    """The data to evaluate on: the flags', else the data the adapter was trained on."""
    training = info["training"]
    if cfg.dataset is None:
        if training is None:
            raise ValueError(f"{where} does not record its dataset: pass --dataset")
        cfg.dataset = training["dataset"]
        if cfg.data_root is None:
            cfg.data_root = training["data_root"]
        if training["test_split"] is not None and cfg.test_split == TrainConfig.test_split:
            cfg.test_split = training["test_split"]
    _check_dataset(cfg)
