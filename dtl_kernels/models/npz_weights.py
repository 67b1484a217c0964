"""Google's ViT ``.npz`` checkpoints (JAX/Flax), loaded by timm's ``load_pretrained`` under
checks timm leaves out.

timm copies each array into its parameter with ``Tensor.copy_``, which broadcasts: an
array of the wrong shape (a ``(1,)`` bias, a ``(D,)`` row for a matrix) is spread over the
parameter silently, and an integer, complex or NaN array is taken as weights. A file with
more encoder blocks than the model is loaded block by block until the model's run out,
the rest ignored. Here every copy timm makes must have the parameter's own shape and a
finite real value, and, read from the arrays' headers before timm runs: the file's block
count must be the model's, the query, key and value arrays of a block one shape (timm
joins them before its copy), and the patch kernel at most 64 × 64 (timm's resampler
builds a matrix of its area squared).
"""

from __future__ import annotations

import re
import zipfile
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from .._untrusted import MAX_PATCH_KERNEL_AREA, check_npz_archive

_BLOCK = re.compile(r"(?:^|/)Transformer/encoderblock_(\d+)/")
_STACKED = re.compile(r"(?:^|/)Transformer/encoderblock/")  # big_vision: one array per kind
_QKV = re.compile(r"^(.*)/(?:query|key|value)/(kernel|bias)$")


def load_google_npz(backbone: nn.Module, path: Path) -> None:
    """``backbone.load_pretrained(path)`` (a timm ViT) with the checks above; ``ValueError``
    naming the file and what does not fit."""
    if not hasattr(backbone, "load_pretrained"):
        raise ValueError(f"{path}: .npz checkpoints are only supported for ViT backbones")
    check_npz_archive(path)
    shapes = _array_shapes(path)
    _check_shapes(path, shapes)
    depth = _file_depth(path, shapes)
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


def _array_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Each array's shape, read from its ``.npy`` header (the data is not read)."""
    shapes = {}
    with zipfile.ZipFile(path) as archive:
        for name in archive.namelist():
            if not name.endswith(".npy"):
                continue
            with archive.open(name) as f:
                try:
                    major, _ = np.lib.format.read_magic(f)
                    read = (np.lib.format.read_array_header_1_0 if major == 1
                            else np.lib.format.read_array_header_2_0)  # fmt: skip
                    shape, _, _ = read(f, max_header_size=10_000)
                except ValueError as exc:
                    raise ValueError(f"{path}: {name} is not a .npy array ({exc})") from None
            shapes[name[: -len(".npy")]] = tuple(shape)
    return shapes


def _check_shapes(path: Path, shapes: dict[str, tuple[int, ...]]) -> None:
    """A patch kernel timm's resampler can take; one shape for a block's q, k and v."""
    for name, shape in shapes.items():
        if name.endswith("embedding/kernel") and _kernel_too_big(shape):
            raise ValueError(f"{path}: {name} has shape {shape}, not a patch kernel of at most "
                             f"{MAX_PATCH_KERNEL_AREA} pixels")  # fmt: skip
    groups: dict[tuple[str, str], set] = {}
    for name, shape in shapes.items():
        if m := _QKV.match(name):
            groups.setdefault((m.group(1), m.group(2)), set()).add(shape)
    for (where, part), found in groups.items():
        if len(found) > 1:
            raise ValueError(f"{path}: {where}'s query, key and value {part}s differ in shape "
                             f"({sorted(found)})")  # fmt: skip


def _kernel_too_big(shape: tuple[int, ...]) -> bool:
    """A conv kernel (h, w, in, out) of more than the bound's pixels; a NaFlex dense one
    (h·w·in, out) of more than the bound's pixels in up to four channels."""
    if len(shape) == 4:
        return shape[0] * shape[1] > MAX_PATCH_KERNEL_AREA
    return len(shape) != 2 or shape[0] > 4 * MAX_PATCH_KERNEL_AREA


def _file_depth(path: Path, shapes: dict[str, tuple[int, ...]]) -> int | None:
    """How many encoder blocks the file holds (``None``: it names none): the count of
    ``encoderblock_<i>`` folders, or the leading dimension of big_vision's stacked arrays."""
    numbered = {int(m.group(1)) for n in shapes if (m := _BLOCK.search(n))}
    if numbered:
        return max(numbered) + 1
    depths = {shape[0] if shape else None for n, shape in shapes.items() if _STACKED.search(n)}
    if len(depths) > 1:
        raise ValueError(f"{path}: its stacked encoder arrays disagree on the block count")
    return depths.pop() if depths else None
