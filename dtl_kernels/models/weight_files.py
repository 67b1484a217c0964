"""Backbone checkpoints mapped, not read: each tensor's bytes are read from the file when it
is converted (to the backbone's dtype, on its device) and given back right after, so loading
a checkpoint never holds a second copy of the weights (issue 21).

:func:`open_weights` takes a ``.safetensors`` file, a Hugging Face sharded checkpoint (its
``*.index.json``, or a folder holding ``model.safetensors[.index.json]`` /
``pytorch_model.bin[.index.json]``) or a ``torch.save`` archive (``.pth``, ``.pth.tar``,
``.bin``, ``.pt``; mapped by :mod:`.torch_archive` with torch's weights-only unpickler; the
entry timm's ``load_checkpoint`` would take: ``state_dict_ema`` / ``model_ema`` /
``state_dict`` / ``model``; a legacy non-zip file is read whole). Names lose the wrapper
prefixes ``module.`` / ``_orig_mod.`` as timm's ``clean_state_dict`` removes them. The
tensors it returns are views of the files' memory maps; only what a conversion touches is
paged in.

Every byte is untrusted (:mod:`dtl_kernels._untrusted`): a safetensors header's dtypes,
shapes and offsets are checked against the file before any tensor is made (the tensors
must tile its data, as the format requires); an index may only name files beside it; a
torch archive's storages must match their records; two tensors may not end up under one
name.
"""

from __future__ import annotations

import math
import mmap
import os
import zipfile
from pathlib import Path

import torch

from .._untrusted import check_legacy_torch_file, parse_json
from .torch_archive import read_mapped

# the safetensors dtype names (a non-float one for float weights is refused later)
_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2, "C64": torch.complex64,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8,
    "BOOL": torch.bool,
}  # fmt: skip
_MAX_HEADER = 100 * 2**20  # a header is JSON names and offsets: far below this
_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
_SINGLE = ("model.safetensors", "pytorch_model.bin")
_PAGE = mmap.PAGESIZE


class MappedWeights:
    """A checkpoint's tensors (``tensors``: name → CPU tensor whose bytes stay in the file
    until used). :meth:`release` hands a used tensor's pages back to the file."""

    def __init__(self, source: Path):
        self.source = source
        self.tensors: dict[str, torch.Tensor] = {}
        self._ranges: dict[int, tuple[mmap.mmap, int, int]] = {}  # storage pointer → bytes
        self._files: dict[Path, dict[str, torch.Tensor]] = {}  # each file mapped once

    def release(self, tensor: torch.Tensor) -> None:
        """Drop the pages ``tensor`` (one of :attr:`tensors`) was read from: the mapping is
        private and never written, so a later read pages them in from the file again."""
        where = self._ranges.pop(tensor.untyped_storage().data_ptr(), None)
        if where is None:  # a tensor a filter made, or a storage already released
            return
        mm, start, stop = where
        start -= start % _PAGE
        stop = min(len(mm), -(-stop // _PAGE) * _PAGE)
        if stop > start and hasattr(mm, "madvise"):
            mm.madvise(mmap.MADV_DONTNEED, start, stop - start)


def open_weights(path: str | os.PathLike) -> MappedWeights:
    """The tensors of the checkpoint at ``path`` (see the module docstring), mapped;
    ``ValueError`` naming the file and the field for one that is not a checkpoint."""
    path = Path(path)
    if path.is_dir():
        found = [path / n for n in _INDEXES + _SINGLE if (path / n).is_file()]
        if not found:
            raise FileNotFoundError(f"{path} holds none of {', '.join(_INDEXES + _SINGLE)}")
        path = found[0]
    if not path.is_file():
        raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
    weights = MappedWeights(path)
    if path.name.endswith(".index.json"):
        for name, file in _index(path).items():
            _add(weights, path.parent / file, only={name})
    else:
        _add(weights, path)
    weights.tensors = without_wrapper_prefixes(weights.tensors, path)
    return weights


def _index(path: Path) -> dict[str, str]:
    """A Hugging Face index's ``weight_map`` (tensor → file name beside the index)."""
    if path.stat().st_size > _MAX_HEADER:
        raise ValueError(f"{path} is too large for a checkpoint index")
    index = parse_json(path.read_bytes(), f"checkpoint index {path}")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise ValueError(f"{path}: 'weight_map' must map tensor names to file names")
    for file in set(weight_map.values()):
        if Path(file).name != file or file in ("", ".", ".."):
            raise ValueError(f"{path}: weight_map names {file!r}, not a file beside the index")
    return weight_map


def _add(weights: MappedWeights, file: Path, only: set[str] | None = None) -> None:
    """Map ``file``'s tensors into ``weights`` (``only``: just these names). Each file of
    an index is mapped once, however many of its tensors the index names."""
    opened = weights._files
    if file not in opened:
        if not file.is_file():
            raise FileNotFoundError(f"checkpoint shard not found: {file}")
        read = _safetensors if file.suffix == ".safetensors" else _torch_archive
        opened[file] = read(file, weights)
    tensors = opened[file]
    names = tensors.keys() if only is None else only
    missing = [n for n in names if n not in tensors]
    if missing:
        raise ValueError(f"{file} does not hold {missing[:5]} (named by the index)")
    for n in names:
        weights.tensors[n] = tensors[n]


def _safetensors(file: Path, weights: MappedWeights) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as views of a private, copy-on-write map of the file."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        if size < 8:
            raise ValueError(f"{file} is too short for a safetensors file")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    n = int.from_bytes(mm[:8], "little")
    if n > min(_MAX_HEADER, size - 8):
        raise ValueError(f"{file}: safetensors header length {n} does not fit the file")
    header = parse_json(bytes(mm[8 : 8 + n]), f"{file}: safetensors header")
    if not isinstance(header, dict):
        raise ValueError(f"{file}: safetensors header is not a mapping")
    base, data = 8 + n, size - 8 - n
    entries = {
        name: _entry(file, name, info, data)
        for name, info in header.items()
        if name != "__metadata__"
    }
    _check_tiling(file, entries, data)
    out = {}
    for name, (dtype, shape, (start, stop)) in entries.items():
        numel = math.prod(shape)
        if numel * dtype.itemsize != stop - start:
            raise ValueError(f"{file}: {name!r} has {stop - start} bytes for shape {shape}")
        if numel == 0:
            out[name] = torch.empty(shape, dtype=dtype)
            continue
        t = torch.frombuffer(mm, dtype=dtype, count=numel, offset=base + start).view(shape)
        weights._ranges[t.untyped_storage().data_ptr()] = (mm, base + start, base + stop)
        out[name] = t
    return out


def _check_tiling(file: Path, entries: dict, data: int) -> None:
    """The format's rule: the tensors' byte ranges, in order, cover the data exactly once
    (a range shared by two tensors, or bytes no tensor owns, mark a file written by
    something else)."""
    end = 0
    for name, (_, _, (start, stop)) in sorted(entries.items(), key=lambda e: e[1][2]):
        if start != end:
            what = (
                "overlaps another tensor" if start < end else f"leaves bytes {end}..{start} unowned"
            )
            raise ValueError(f"{file}: {name!r} (bytes {start}..{stop}) {what}")
        end = stop
    if end != data:
        raise ValueError(f"{file}: its tensors end at byte {end} of {data} data bytes")


def _entry(file: Path, name: str, info, data: int):
    """``(dtype, shape, (start, stop))`` of one header entry, checked against the file."""
    if not isinstance(info, dict):
        raise ValueError(f"{file}: header entry {name!r} is not a mapping")
    dtype = _SAFETENSORS_DTYPES.get(info.get("dtype"))
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if dtype is None:
        raise ValueError(f"{file}: {name!r} has unsupported dtype {str(info.get('dtype'))[:20]!r}")
    if not (isinstance(shape, list) and len(shape) <= 8 and all(_count(v) for v in shape)):
        raise ValueError(f"{file}: {name!r} has a bad shape {str(shape)[:60]}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(v) for v in offsets)
            and offsets[0] <= offsets[1] <= data):  # fmt: skip
        raise ValueError(f"{file}: {name!r} has data offsets {str(offsets)[:60]} outside the file")
    return dtype, shape, tuple(offsets)


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62


def _torch_archive(file: Path, weights: MappedWeights) -> dict[str, torch.Tensor]:
    """A ``torch.save`` archive's state dict, memory-mapped (:mod:`.torch_archive`), with
    timm's entry selection (a file in torch's legacy, non-zip format cannot be mapped: it
    is read whole, as timm reads it)."""
    if zipfile.is_zipfile(file):
        archive = read_mapped(file)
        for ptr, (start, stop) in archive.ranges.items():
            weights._ranges[ptr] = (archive.mm, start, stop)
        return state_dict_of(archive.value, file)
    check_legacy_torch_file(file)
    try:
        value = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for bad files
        raise ValueError(f"could not read checkpoint {file}: {exc}") from exc
    return state_dict_of(value, file)


_WRAPPER_PREFIXES = ("_orig_mod.", "module.", "_orig_mod.")  # compile, DDP, either order


def state_dict_of(value, file) -> dict[str, torch.Tensor]:
    """The state dict a checkpoint holds, picked as timm's ``load_state_dict`` picks it
    (``state_dict_ema`` / ``model_ema`` / ``state_dict`` / ``model``); ``ValueError`` when
    it is no mapping of names to tensors."""
    if isinstance(value, dict):
        for key in ("state_dict_ema", "model_ema", "state_dict", "model"):
            if value.get(key) is not None:
                value = value[key]
                break
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items()
    ):
        raise ValueError(f"{file} does not hold a state dict of tensors")
    return value


def without_wrapper_prefixes(tensors: dict[str, torch.Tensor], file) -> dict[str, torch.Tensor]:
    """``tensors`` with the wrapper prefixes removed as timm's ``clean_state_dict`` removes
    them (from any checkpoint format); ``ValueError`` when two would get one name (timm
    keeps the last one silently)."""
    state: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        name = key
        for prefix in _WRAPPER_PREFIXES:
            name = name.removeprefix(prefix)
        if name in state:
            raise ValueError(f"{file}: two tensors are named {name!r} once the wrapper "
                             f"prefixes {sorted(set(_WRAPPER_PREFIXES))} are removed")  # fmt: skip
        state[name] = tensor
    return state
