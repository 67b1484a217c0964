"""Google's ViT ``.npz`` checkpoints (JAX/Flax), loaded by timm's ``load_pretrained`` under
checks timm leaves out.

timm copies each array into its parameter with ``Tensor.copy_``, which broadcasts: an
array of the wrong shape (a ``(1,)`` bias, a ``(D,)`` row for a matrix) is spread over the
parameter silently, and an integer, complex or NaN array is taken as weights. A file with
more encoder blocks than the model is loaded block by block until the model's run out,
the rest ignored. Here every copy timm makes must have the parameter's own shape and a
finite real value, and the file's block count must be the model's.
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .._untrusted import check_npz_archive

_BLOCK = re.compile(r"(?:^|/)Transformer/encoderblock_(\d+)/")
_STACKED = re.compile(r"(?:^|/)Transformer/encoderblock/.+\.npy$")  # big_vision: one array per kind


def load_google_npz(backbone: nn.Module, path: Path) -> None:
    """``backbone.load_pretrained(path)`` (a timm ViT) with the checks above; ``ValueError``
    naming the file and what does not fit."""
    if not hasattr(backbone, "load_pretrained"):
        raise ValueError(f"{path}: .npz checkpoints are only supported for ViT backbones")
    check_npz_archive(path)
    depth = _file_depth(path)
    blocks = getattr(backbone, "blocks", None)
    if depth is not None and blocks is not None and depth != len(blocks):
        raise ValueError(f"{path} holds {depth} encoder blocks, the model has {len(blocks)}")
    try:
        with _StrictCopies(path):
            backbone.load_pretrained(str(path))
    except ValueError:
        raise
    except Exception as exc:
        raise ValueError(f"could not load Google ViT checkpoint {path}: {exc}") from exc


class _StrictCopies(TorchFunctionMode):
    """Refuses a ``copy_`` / ``add_`` into a tensor from one of another shape, or from a
    value that is not finite real numbers (where the target holds floats)."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in (torch.Tensor.copy_, torch.Tensor.add_) and len(args) >= 2:
            dst, src = args[0], args[1]
            if isinstance(src, torch.Tensor) and isinstance(dst, torch.Tensor):
                self._check(dst, src)
        return func(*args, **(kwargs or {}))

    def _check(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if src.shape != dst.shape:
            raise ValueError(f"{self.path}: an array of shape {tuple(src.shape)} for a weight "
                             f"of shape {tuple(dst.shape)}")  # fmt: skip
        if dst.is_floating_point():
            if not src.is_floating_point() or src.is_complex():
                raise ValueError(f"{self.path}: an array of dtype {src.dtype} for float weights")
            if not torch.isfinite(src).all():
                raise ValueError(f"{self.path} holds NaN or infinite values")


def _file_depth(path: Path) -> int | None:
    """How many encoder blocks the file holds (``None``: it names none): the count of
    ``encoderblock_<i>`` folders, or the leading dimension of big_vision's stacked
    arrays (read from their headers, not loaded)."""
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        numbered = {int(m.group(1)) for n in names if (m := _BLOCK.search(n))}
        if numbered:
            return max(numbered) + 1
        stacked = [n for n in names if _STACKED.search(n)]
        depths = {_leading_dim(archive, n) for n in stacked}
    if len(depths) > 1:
        raise ValueError(f"{path}: its stacked encoder arrays disagree on the block count")
    return depths.pop() if depths else None


def _leading_dim(archive: zipfile.ZipFile, name: str) -> int | None:
    with archive.open(name) as f:
        try:
            major, _ = np.lib.format.read_magic(f)
            read = (
                np.lib.format.read_array_header_1_0
                if major == 1
                else np.lib.format.read_array_header_2_0
            )
            shape, _, _ = read(f, max_header_size=10_000)
        except ValueError as exc:
            raise ValueError(f"{archive.filename}: {name} is not a .npy array ({exc})") from None
    return shape[0] if shape else None
