"""The input pipeline of ``dtl-train`` and ``dtl-predict``, built from timm's own
transforms (``timm.data.create_transform``).

* :class:`Preprocessing` — what every image goes through, in training, evaluation and
  prediction: timm's evaluation transform (resize, centre crop, to tensor, normalise) for
  one data config. The default is the published recipe's (the whole image resized to a
  square, ``crop_mode="squash"``, ``crop_pct=1``) with the weights' interpolation and
  mean / std; ``--crop-pct`` / ``--crop-mode center`` give timm's ImageNet evaluation. Its
  resize part (:meth:`Preprocessing.resize`) runs once per image of an in-memory dataset;
  the adapter records the data config so prediction repeats it exactly.
* :class:`Augmentation` — training only and off by default, as in the published recipe:
  timm's training transform (``--scale``, ``--hflip``, ``--aa``) applied to the resized
  image, and timm's ``Mixup`` (``--mixup``, ``--cutmix``) applied to each batch. Any of
  them makes the input random, which the trunk cache refuses.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

IMAGENET = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
HALF = ((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
NAMED = {"imagenet": IMAGENET, "half": HALF}
# The published recipe's pipeline: nothing of the image is cut away.
WHOLE_IMAGE = {"crop_pct": 1.0, "crop_mode": "squash"}


@dataclass(frozen=True)
class Preprocessing:
    """timm's data config of one run: ``size × size`` inputs (3 channels), ``mean`` /
    ``std`` per channel, the resize filter and crop."""

    size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bicubic"
    crop_pct: float = 1.0
    crop_mode: str = "squash"

    @classmethod
    def from_data_config(cls, cfg: dict) -> Preprocessing:
        """From timm's data config (``resolve_model_data_config``, an adapter's record)."""
        size = tuple(cfg["input_size"])
        if size[1] != size[2]:
            raise ValueError(f"input size {size[1]}x{size[2]}: only square inputs are supported")
        return cls(int(size[1]), tuple(float(v) for v in cfg["mean"]),
                   tuple(float(v) for v in cfg["std"]), cfg["interpolation"],
                   float(cfg["crop_pct"]), cfg["crop_mode"])  # fmt: skip

    def data_config(self) -> dict:
        """timm's data config (``input_size``, ``interpolation``, ``crop_pct``,
        ``crop_mode``, ``mean``, ``std``): what a model's ``pretrained_cfg`` takes."""
        return {"input_size": (3, self.size, self.size), "interpolation": self.interpolation,
                "crop_pct": self.crop_pct, "crop_mode": self.crop_mode, "mean": self.mean,
                "std": self.std}  # fmt: skip

    def transform(self):
        """PIL image → ``(3, size, size)`` float32 tensor: timm's evaluation transform."""
        from timm.data import create_transform

        return create_transform(
            input_size=(3, self.size, self.size), is_training=False,
            interpolation=self.interpolation, crop_pct=self.crop_pct,
            crop_mode=self.crop_mode, mean=self.mean, std=self.std,
        )  # fmt: skip

    def resize(self):
        """PIL image → PIL image of ``size × size``: the steps of :meth:`transform` before
        the tensor (deterministic; in-memory datasets run them once per image)."""
        from torchvision import transforms

        steps = self.transform().transforms
        cut = next(i for i, t in enumerate(steps) if "ToTensor" in type(t).__name__)
        return transforms.Compose(steps[:cut])

    def keeps_aspect(self) -> bool:
        return resize_keeps_aspect(self.crop_mode)

    def whole_image(self) -> bool:
        return self.crop_pct == 1.0 and self.crop_mode == "squash"

    def identity(self) -> dict:
        """What names this pipeline in cache keys: the mean / std (by name when they are a
        named set, as earlier versions wrote them) and, when not the whole image with a
        bicubic filter, the resize and crop."""
        name = next((k for k, v in NAMED.items() if _same(v, (self.mean, self.std))), None)
        out = {"normalize": name or {"mean": list(self.mean), "std": list(self.std)}}
        if not self.whole_image() or self.interpolation != "bicubic":
            out["resize"] = {"interpolation": self.interpolation, "crop_pct": self.crop_pct,
                             "crop_mode": self.crop_mode}  # fmt: skip
        return out

    def describe(self) -> str:
        crop = "whole image" if self.whole_image() else f"{self.crop_mode} crop {self.crop_pct:g}"
        name = self.identity()["normalize"]
        norm = name if isinstance(name, str) else f"mean {_fmt(self.mean)} std {_fmt(self.std)}"
        return f"{self.size}x{self.size}, {self.interpolation}, {crop}, normalise={norm}"


def _same(a, b) -> bool:
    return all(abs(x - y) < 1e-6 for pa, pb in zip(a, b, strict=True)
               for x, y in zip(pa, pb, strict=True))  # fmt: skip


def _fmt(values) -> str:
    return "(" + ", ".join(f"{v:.4g}" for v in values) + ")"


@dataclass(frozen=True)
class Augmentation:
    """The training augmentation (timm's names; all off by default)."""

    hflip: float = 0.0
    aa: str | None = None
    scale: tuple[float, float] | None = None
    mixup: float = 0.0
    cutmix: float = 0.0

    @classmethod
    def from_config(cls, cfg) -> Augmentation:
        scale = tuple(float(v) for v in cfg.scale.split(",")) if cfg.scale else None
        return cls(cfg.hflip, cfg.aa, scale, cfg.mixup, cfg.cutmix)

    def flags(self) -> list[str]:
        """The augmentation flags in use, as given (``["--hflip 0.5", …]``)."""
        out = [f"--hflip {self.hflip:g}"] if self.hflip else []
        out += [f"--aa {self.aa}"] if self.aa else []
        out += [f"--scale {self.scale[0]:g} {self.scale[1]:g}"] if self.scale else []
        out += [f"--{k} {getattr(self, k):g}" for k in ("mixup", "cutmix") if getattr(self, k)]
        return out

    def image_transform(self, prep: Preprocessing):
        """PIL image of ``prep.size`` (already resized by ``prep``) → augmented tensor, by
        timm's training transform; ``None`` when no image augmentation is on. Without
        ``--scale`` its random-resized crop keeps the whole image (scale and ratio 1)."""
        if not (self.hflip or self.aa or self.scale):
            return None
        from timm.data import create_transform

        return create_transform(
            input_size=prep.size, is_training=True,
            scale=self.scale or (1.0, 1.0), ratio=None if self.scale else (1.0, 1.0),
            hflip=self.hflip, color_jitter=None, auto_augment=self.aa,
            interpolation=prep.interpolation, mean=prep.mean, std=prep.std,
        )  # fmt: skip

    def batch_mixer(self, num_classes: int, label_smoothing: float):
        """timm's ``Mixup`` for ``--mixup`` / ``--cutmix`` (soft targets), else ``None``."""
        if not (self.mixup or self.cutmix):
            return None
        from timm.data import Mixup

        return Mixup(mixup_alpha=self.mixup, cutmix_alpha=self.cutmix,
                     label_smoothing=label_smoothing, num_classes=num_classes)  # fmt: skip


def to_tensor(images_uint8: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """``(C, S, S)`` uint8 (C = 1 or 3) → normalised ``(3, S, S)`` float32: the tensor steps
    of timm's transform (``/255``, then ``(x - mean) / std``), on images already resized."""
    x = images_uint8.float().div_(255)
    if x.shape[0] == 1:
        x = x.expand(3, -1, -1)
    return (x - mean) / std


def resize_keeps_aspect(crop_mode: str | None) -> bool:
    """Whether timm's evaluation transform keeps an image's aspect (then crops): its center
    and border crops, and center where no mode is given (timm's default); ``squash``
    resizes straight to ``size × size``. Where it keeps the aspect a long strip becomes a
    huge image (:func:`dtl_kernels.train.data.check_aspect`)."""
    return (crop_mode or "center") != "squash"
