"""Predictions from an adapter file alone: :class:`Predictor` (Python) and ``dtl-predict``
(:mod:`dtl_kernels.predict_cli`).

The adapter records everything predicting needs (:func:`dtl_kernels.from_pretrained`): the
model and its backbone weights, the preprocessing it was trained with and the class names.
The images go through timm's evaluation transform of that preprocessing
(``timm.data.create_transform(**timm.data.resolve_model_data_config(model))``), after the
same 8-bit RGB conversion as in training (16-bit and float images scaled, gray repeated),
so a prediction sees exactly what the trainer's evaluation saw.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import nn

from .models.pretrained import from_pretrained
from .train.data import IMAGE_EXTENSIONS, DataError, eight_bit


class Predictor:
    """Class probabilities of images for a DTL model with its preprocessing.

    Args:
        model: a DTL model whose ``pretrained_cfg`` holds its preprocessing (as
            :func:`~dtl_kernels.from_pretrained` sets it) and ``class_names`` its classes
            (``"0"``, ``"1"``… when it has none).
        batch_size: images per forward pass.
    """

    def __init__(self, model: nn.Module, batch_size: int = 32) -> None:
        from timm.data import create_transform, resolve_model_data_config

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a whole number ≥ 1, got {batch_size!r}")
        n = model.num_classes
        if not n:
            raise ValueError("the model has no classifier head (num_classes=0): nothing to "
                             "predict (its features: model.forward_features)")  # fmt: skip
        self.model = model.eval()
        self.data_config = resolve_model_data_config(model)
        channels = _input_channels(model)
        if channels not in (None, 3):  # (a model's pretrained_cfg says 3 whatever in_chans is)
            raise ValueError(f"the model takes {channels}-channel images; Predictor reads "
                             "images as RGB (3 channels)")  # fmt: skip
        self.transform = create_transform(**self.data_config)
        self.classes = list(model.class_names or [str(i) for i in range(n)])
        self.batch_size = batch_size

    @classmethod
    def from_adapter(
        cls,
        path: str | os.PathLike,
        pretrained=None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        backbone_mismatch: str = "error",
    ) -> Predictor:
        """The predictor of an adapter file (``pretrained``: as :func:`from_pretrained`)."""
        model = from_pretrained(path, pretrained, backbone_mismatch=backbone_mismatch,
                                device=device)  # fmt: skip
        return cls(model, batch_size)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def image_tensor(self, image) -> torch.Tensor:
        """One image (a path or a PIL image) → ``(3, H, W)`` float32 model input;
        :class:`DataError` naming an unreadable file."""
        from PIL import Image

        if isinstance(image, Image.Image):
            return self.transform(eight_bit(image))
        try:
            with Image.open(image) as img:
                return self.transform(eight_bit(img))
        except FileNotFoundError:
            raise DataError(f"image file not found: {image}") from None
        except Exception as exc:  # PIL raises several types for corrupt files
            raise DataError(f"cannot read image {image}: {type(exc).__name__}: {exc}") from exc

    def probabilities(self, images: Sequence) -> torch.Tensor:
        """``(len(images), num_classes)`` float32 class probabilities (softmax), on the CPU."""
        images = _as_list(images)
        dtype = _input_dtype(self.model)
        out = []
        for start in range(0, len(images), self.batch_size):
            batch = torch.stack(
                [self.image_tensor(i) for i in images[start : start + self.batch_size]]
            )
            # inference mode: less host time per forward than no_grad (no version counters,
            # no autograd keys); the result is concatenated outside it, an ordinary tensor
            with torch.inference_mode():
                logits = self.model(batch.to(self.device, dtype)).float()
                finite = torch.isfinite(logits).all(-1).cpu()
                out.append(logits.softmax(-1).cpu())
            if not finite.all():  # a probability of NaN is no prediction
                names = [str(images[start + int(i)]) for i in (~finite).nonzero().flatten()[:3]]
                raise ValueError(
                    f"{int((~finite).sum())} of {len(finite)} images got non-finite outputs "
                    f"(e.g. {', '.join(names)}): the backbone weights or the adapter hold "
                    "values this model cannot compute with"
                )
        return torch.cat(out) if out else torch.empty(0, len(self.classes))

    def predict(self, images: Sequence, top_k: int = 1) -> list[list[tuple[str, float]]]:
        """For each image, its ``top_k`` most probable ``(class name, probability)``."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a whole number ≥ 1, got {top_k!r}")
        k = min(top_k, len(self.classes))
        probs = self.probabilities(images)
        values, index = probs.topk(k, dim=-1)
        return [
            [(self.classes[i], float(p)) for p, i in zip(v.tolist(), ix.tolist(), strict=True)]
            for v, ix in zip(values, index, strict=True)
        ]


def _as_list(images) -> list:
    """The images as a list: a list, tuple, NumPy array… of paths or PIL images; one image
    alone is refused (a path string would be read letter by letter)."""
    from PIL import Image

    if isinstance(images, (str, bytes, os.PathLike, Image.Image)):
        raise TypeError(f"images must be a list of paths or PIL images, got one: [{images!r}]")
    if not hasattr(images, "__len__") or not hasattr(images, "__iter__"):
        raise TypeError(
            f"images must be a list of paths or PIL images, got {type(images).__name__}"
        )
    return list(images)


def _input_dtype(model: nn.Module) -> torch.dtype:
    """The images' dtype: a model cast whole (``model.to(torch.bfloat16)``, ``.double()``)
    takes them in its own; one of mixed dtypes (``backbone_dtype``) casts them itself."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def _input_channels(model: nn.Module) -> int | None:
    """The channels of the images the model takes: its first convolution's (the patch
    embedding or a CNN's stem); ``None`` without one."""
    backbone = getattr(model, "backbone", model)
    first = next((m for m in backbone.modules() if isinstance(m, nn.Conv2d)), None)
    return None if first is None else first.in_channels


def image_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files given directly, and those under given folders (recursively, sorted);
    ``DataError`` for a path that does not exist or a folder without images."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = sorted(p for p in path.rglob("*")
                           if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)  # fmt: skip
            if not found:
                raise DataError(f"no images under {path} ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif path.is_file():
            files.append(path)
        else:
            raise DataError(f"no such image or folder: {path}")
    return files
