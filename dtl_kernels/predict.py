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

import contextlib
import os
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from .models.pretrained import from_pretrained
from .train.data import (
    IMAGE_EXTENSIONS,
    DataError,
    check_aspect,
    eight_bit,
    images_under,
    opened_image,
)
from .train.setup import autocast_for
from .train.transforms import resize_keeps_aspect


class Predictor:
    """Class probabilities of images for a DTL model with its preprocessing.

    Args:
        model: a DTL model whose ``pretrained_cfg`` holds its preprocessing (as
            :func:`~dtl_kernels.from_pretrained` sets it) and ``class_names`` its classes
            (``"0"``, ``"1"``… when it has none).
        batch_size: images per forward pass.
        workers: processes that decode images while the model runs (a ``DataLoader``'s
            workers); ``0``: decoded in this process, between forward passes.
        compile: run the model through ``torch.compile`` (compiled at the first batch:
            seconds to a minute), under CUDA graphs on a GPU (``mode="reduce-overhead"``:
            the host launches one graph per batch instead of every kernel). The last batch
            is padded to ``batch_size`` (one compiled graph serves every batch; a call with
            fewer images still computes a whole batch). Compiled anew when ``model`` or
            its device changes.
        progress: a progress bar over the batches on the standard error (``None``: only
            when it is a terminal).
        precision: ``"fp32"``; ``"bf16"`` (autocast: 1.4–2.2× faster on a CPU with AMX in
            ``benchmarks/bench_predict.py``, probabilities off by up to ~0.07); ``"fp16"``
            (autocast, CUDA only). A model cast whole (``model.to(torch.bfloat16)``) runs in
            its dtype.
    """

    def __init__(
        self,
        model: nn.Module,
        batch_size: int = 32,
        workers: int = 0,
        compile: bool = False,
        progress: bool | None = None,
        precision: str = "fp32",
    ) -> None:
        from timm.data import create_transform, resolve_model_data_config

        from .train.config import PRECISIONS

        for name, value, low in (("batch_size", batch_size, 1), ("workers", workers, 0)):
            if isinstance(value, bool) or not isinstance(value, int) or value < low:
                raise ValueError(f"{name} must be a whole number ≥ {low}, got {value!r}")
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got "
                             f"{precision!r}")  # fmt: skip
        n = model.num_classes
        if not n:
            raise ValueError("the model has no classifier head (num_classes=0): nothing to "
                             "predict (its features: model.forward_features)")  # fmt: skip
        self.model = model.eval()
        self.data_config = resolve_model_data_config(model)
        channels = model.input_channels()
        if channels not in (None, 3):  # (a model's pretrained_cfg says 3 whatever in_chans is)
            raise ValueError(f"the model takes {channels}-channel images; Predictor reads "
                             "images as RGB (3 channels)")  # fmt: skip
        self.transform = create_transform(**self.data_config)
        self.keeps_aspect = resize_keeps_aspect(self.data_config.get("crop_mode"))
        if isinstance(model.class_names, (str, bytes)):  # list() would split it into letters
            raise TypeError("model.class_names must be a list of names, got one string")
        self.classes = list(model.class_names or [str(i) for i in range(n)])
        self.batch_size, self.workers = batch_size, workers
        self.compile, self.progress, self.precision = bool(compile), progress, precision
        self._compiled = None  # (model, device type, compiled model), made at a first batch

    @classmethod
    def from_adapter(
        cls,
        path: str | os.PathLike,
        pretrained=None,
        device: str | torch.device | None = None,
        batch_size: int = 32,
        backbone_mismatch: str = "error",
        workers: int = 0,
        compile: bool = False,
        progress: bool | None = None,
        precision: str = "fp32",
    ) -> Predictor:
        """The predictor of an adapter file (``pretrained``: as :func:`from_pretrained`; the
        other options as for :class:`Predictor`)."""
        model = from_pretrained(path, pretrained, backbone_mismatch=backbone_mismatch,
                                device=device)  # fmt: skip
        return cls(model, batch_size, workers, compile, progress, precision)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def image_tensor(self, image) -> torch.Tensor:
        """One image (a path or a PIL image) → ``(3, H, W)`` float32 model input;
        :class:`DataError` naming an unreadable file."""
        return _decode(image, self.transform, self.keeps_aspect)

    def probabilities(self, images: Sequence) -> torch.Tensor:
        """``(len(images), num_classes)`` float32 class probabilities (softmax), on the CPU."""
        images = _as_list(images)
        self.model.eval()  # a model put back in training mode would predict with drop path
        dtype, device, out = _input_dtype(self.model), self.device, []
        autocast = autocast_for(self.precision, device)  # (fp16 on a CPU: refused here)
        # closed on any error: the decoding workers stop now, not at a garbage collection
        with contextlib.closing(self._batches(images, device)) as batches:
            for start, batch in batches:
                # inference mode: less host time per forward than no_grad (no version
                # counters, no autograd keys); the result is concatenated outside it
                with torch.inference_mode(), autocast():
                    logits = self._logits(batch.to(device, dtype, non_blocking=True))
                    finite = torch.isfinite(logits).all(-1).cpu()
                    out.append(logits.softmax(-1).cpu())
                if not finite.all():  # a probability of NaN is no prediction
                    bad = (~finite).nonzero().flatten()[:3]
                    names = [str(images[start + int(i)]) for i in bad]
                    raise ValueError(
                        f"{int((~finite).sum())} of {len(finite)} images got non-finite "
                        f"outputs (e.g. {', '.join(names)}): the backbone weights or the "
                        "adapter hold values this model cannot compute with"
                    )
        return torch.cat(out) if out else torch.empty(0, len(self.classes))

    def _batches(self, images: list, device) -> Iterator[tuple[int, torch.Tensor]]:
        """``(index of the first image, (n, 3, H, W) float32 batch)``, in order: decoded here,
        or by ``workers`` processes while the model runs (a decoding error is raised here,
        as :class:`DataError`, naming the file)."""
        from torch.utils.data import DataLoader

        count = -(-len(images) // self.batch_size)
        decoded = _Decoded(images, self.transform, self.keeps_aspect)
        loader = DataLoader(decoded, batch_size=self.batch_size,
                            num_workers=min(self.workers, count), collate_fn=_stack,
                            pin_memory=device.type == "cuda")  # fmt: skip
        it = iter(loader)
        batches = enumerate(it)
        wanted = self.progress
        if wanted is None:  # a terminal (no stderr at all under pythonw)
            wanted = bool(getattr(sys.stderr, "isatty", lambda: False)())
        if wanted and count > 1:
            from tqdm import tqdm

            batches = tqdm(batches, total=count, desc="predict", unit="batch",
                           leave=False, dynamic_ncols=True)  # fmt: skip
        try:
            for j, batch in batches:
                if isinstance(batch, DataError):
                    raise batch
                yield j * self.batch_size, batch
        finally:
            # the workers stopped now: the iterator would stop them when its last reference
            # goes, but an error's traceback (the loader's own frames, or this one) keeps it
            # until a garbage collection, whose shutdown then waits ~5 s a worker
            shutdown = getattr(it, "_shutdown_workers", None)  # (none without workers)
            if shutdown is not None:
                shutdown()

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        """The model's float32 logits ``(n, num_classes)`` for the images ``x`` ``(n, 3, H,
        W)`` (on the model's device, in its input dtype)."""
        if not self.compile:
            return self.model(x).float()
        n = x.shape[0]
        if n < self.batch_size:  # one shape for every batch: no second compilation
            x = torch.cat([x, x[-1:].expand(self.batch_size - n, *x.shape[1:])])
        if self._compiled is None or self._compiled[:2] != (self.model, x.device.type):
            mode = "reduce-overhead" if x.is_cuda else None  # CUDA graphs
            compiled = torch.compile(self.model, mode=mode, dynamic=False)
            self._compiled = (self.model, x.device.type, compiled)
        # a copy: a CUDA graph's output is overwritten by its next replay
        return self._compiled[2](x)[:n].to(torch.float32, copy=True)

    def predict(self, images: Sequence, top_k: int = 1) -> list[list[tuple[str, float]]]:
        """For each image, its ``top_k`` most probable ``(class name, probability)``."""
        if isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1:
            raise ValueError(f"top_k must be a whole number ≥ 1, got {top_k!r}")
        probs = self.probabilities(images)
        if len(self.classes) != probs.shape[-1]:  # e.g. class_names set or the head reset since
            raise ValueError(f"{len(self.classes)} class names for a model of "
                             f"{probs.shape[-1]} outputs: set model.class_names to match the "
                             "head and make the Predictor again")  # fmt: skip
        k = min(top_k, len(self.classes))
        values, index = probs.topk(k, dim=-1)
        return [
            [(self.classes[i], float(p)) for p, i in zip(v.tolist(), ix.tolist(), strict=True)]
            for v, ix in zip(values, index, strict=True)
        ]


class _Decoded(torch.utils.data.Dataset):
    """The images, decoded on request (in a ``DataLoader`` worker, or in this process)."""

    def __init__(self, images: list, transform, keeps_aspect: bool) -> None:
        self.images, self.transform, self.keeps_aspect = images, transform, keeps_aspect

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> torch.Tensor | DataError:
        try:
            return _decode(self.images[i], self.transform, self.keeps_aspect)
        except DataError as exc:  # returned: a worker's raise reaches the caller re-wrapped
            return exc


def _stack(items: list) -> torch.Tensor | DataError:
    """A batch of decoded images, or the first decoding error in it (raised by the caller,
    in its own process)."""
    error = next((i for i in items if isinstance(i, DataError)), None)
    return error if error is not None else torch.stack(items)


def _decode(image, transform, keeps_aspect: bool) -> torch.Tensor:
    """One image (a path or a PIL image) → the model input; :class:`DataError` naming an
    unreadable file, or one too long for a resize that ``keeps_aspect``."""
    from PIL import Image

    if isinstance(image, Image.Image):
        try:
            check_aspect(image, keeps_aspect)
            return transform(eight_bit(image))
        except Exception as exc:  # e.g. NaN pixels; named, and not wrapped by a worker
            raise DataError(f"cannot convert image {image!r}: {type(exc).__name__}: "
                            f"{exc}") from exc  # fmt: skip
    with opened_image(image) as img:
        check_aspect(img, keeps_aspect)
        return transform(eight_bit(img))


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
    items = list(images)
    odd = [type(x).__name__ for x in items
           if not isinstance(x, (str, bytes, os.PathLike, Image.Image))]  # fmt: skip
    if odd:  # (named by type: the repr of an array is the whole array)
        raise TypeError(f"images must be paths or PIL images, got {odd[0]} among them")
    return items


def _input_dtype(model: nn.Module) -> torch.dtype:
    """The images' dtype: a model cast whole (``model.to(torch.bfloat16)``, ``.double()``)
    takes them in its own; one of mixed dtypes (``backbone_dtype``) casts them itself."""
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    return dtypes.pop() if len(dtypes) == 1 else torch.float32


def image_files(inputs: Iterable[str | os.PathLike]) -> list[Path]:
    """Image files given directly, and those under given folders (recursively, sorted);
    ``DataError`` for a path that does not exist or a folder without images."""
    files: list[Path] = []
    for item in inputs:
        path = Path(item)
        if path.is_dir():
            found = images_under(path)
            if not found:
                raise DataError(f"no images under {path} ({', '.join(IMAGE_EXTENSIONS)})")
            files += found
        elif path.is_file():
            files.append(path)
        elif path.exists():  # a FIFO would block the first read forever
            raise DataError(f"not a regular file or folder: {path}")
        else:
            raise DataError(f"no such image or folder: {path}")
    return files
