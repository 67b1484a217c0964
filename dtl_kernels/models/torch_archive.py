"""A ``torch.save`` archive's tensors as views of a private memory map of the file, each
storage checked against the zip record it names.

``torch.load(mmap=True)`` takes a storage's size from the pickle and slices the whole
file's map by it, so a storage that declares more bytes than its record silently reads the
next records' bytes (and the zip directory) as weights; torch's reading load refuses such a
file. This reader keeps the map (a checkpoint is never held twice) and the refusal: the
pickle is read by torch's own weights-only unpickler, and each storage it names must be a
record ``data/<key>`` stored in the file with exactly the bytes it declares.

The archive is checked first (:func:`dtl_kernels._untrusted.check_torch_archive`: its
pickle names nothing beyond what ``torch.save`` writes for weights); then every tensor
must be dense, on the CPU and on a storage read from its record (a storage of an empty
record would otherwise grow under a tensor: weights of uninitialised memory), and records
may not overlap one another.
"""

from __future__ import annotations

import io
import mmap
import struct
import zipfile
from pathlib import Path

import torch

from .._untrusted import check_torch_archive

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, …, name length, extra length
_LOCAL_SIGNATURE = b"PK\x03\x04"


class MappedArchive:
    """``value``: what the archive holds (a state dict, a training checkpoint…), its
    storages views of ``mm``; ``ranges``: each storage's ``(start, stop)`` in the file, by
    its data pointer (what :meth:`.weight_files.MappedWeights.release` gives back)."""

    def __init__(self, value, mm: mmap.mmap, ranges: dict[int, tuple[int, int]]):
        self.value, self.mm, self.ranges = value, mm, ranges


def read_mapped(file: Path) -> MappedArchive:
    """The object the ``torch.save`` zip archive ``file`` holds, every tensor on the CPU
    (whatever device it was saved from); ``ValueError`` naming the file and the part for
    an archive that is not torch's, a storage without its record or of another size, or a
    tensor outside its storage."""
    check_torch_archive(file)  # members stored, within the file, named once; the pickle scanned
    with zipfile.ZipFile(file) as archive:
        members = archive.infolist()
    size = file.stat().st_size
    pickles = [
        m for m in members if m.filename.count("/") == 1 and m.filename.endswith("/data.pkl")
    ]
    if len(pickles) != 1:
        raise ValueError(f"{file}: not a torch.save archive (no single <name>/data.pkl)")
    prefix = pickles[0].filename[: -len("data.pkl")]
    with open(file, "rb") as f:
        if size == 0:
            raise ValueError(f"{file} is empty")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    spans = {m.filename: _data_span(file, mm, m) for m in members}
    _check_apart(file, members, spans)
    order = spans.get(prefix + "byteorder")
    if order is not None and bytes(mm[order[0] : order[1]]) != b"little":
        raise ValueError(f"{file} was saved on a big-endian machine; not supported")
    records = {name[len(prefix) + 5 :]: span for name, span in spans.items()
               if name.startswith(prefix + "data/")}  # fmt: skip
    pkl = spans[pickles[0].filename]
    pickled = bytes(mm[pkl[0] : pkl[1]])  # scanned by check_torch_archive
    ranges: dict[int, tuple[int, int]] = {}
    storages: dict[str, torch.storage.TypedStorage] = {}

    def storage(pid) -> torch.storage.TypedStorage:
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise ValueError(f"{file}: a persistent id {str(pid)[:60]} is not a storage")
        _, kind, key, location, numel = pid
        dtype = torch.uint8 if kind is torch.UntypedStorage else getattr(kind, "dtype", None)
        if not isinstance(dtype, torch.dtype) or not isinstance(location, str):
            raise ValueError(f"{file}: storage {str(key)[:40]!r} has no storage type")
        if not (isinstance(key, str) and isinstance(numel, int) and 0 <= numel < 2**62):
            raise ValueError(f"{file}: a storage names {str(key)[:40]!r} / {str(numel)[:20]}")
        if key in storages:
            return storages[key]
        if key not in records:
            raise ValueError(f"{file}: storage {key[:40]!r} has no record data/{key[:40]}")
        start, stop = records[key]
        if numel * dtype.itemsize != stop - start:
            raise ValueError(
                f"{file}: storage {key[:40]!r} declares {numel * dtype.itemsize} bytes, "
                f"its record holds {stop - start}"
            )
        if numel == 0:
            untyped = torch.UntypedStorage(0)
        else:
            view = torch.frombuffer(mm, dtype=torch.uint8, count=stop - start, offset=start)
            untyped = view.untyped_storage()
            ranges[untyped.data_ptr()] = (start, stop)
        storages[key] = torch.storage.TypedStorage(
            wrap_storage=untyped, dtype=dtype, _internal=True
        )
        return storages[key]

    from torch import _weights_only_unpickler  # torch.load(weights_only=True)'s unpickler

    unpickler = _weights_only_unpickler.Unpickler(io.BytesIO(pickled), encoding="utf-8")
    unpickler.persistent_load = storage
    try:
        value = unpickler.load()
    except ValueError:
        raise
    except Exception as exc:  # the unpickler and the tensor rebuild raise several types
        raise ValueError(f"could not read checkpoint {file}: {type(exc).__name__}: {exc}") from exc
    sizes = {ptr: stop - start for ptr, (start, stop) in ranges.items()}
    _check_tensors(file, value, sizes)
    return MappedArchive(value, mm, ranges)


def _data_span(file: Path, mm: mmap.mmap, member: zipfile.ZipInfo) -> tuple[int, int]:
    """Where ``member``'s bytes are in the file (after its local header), checked."""
    at = member.header_offset
    if not 0 <= at <= len(mm) - _LOCAL_HEADER.size:
        raise ValueError(f"{file}: member {member.filename!r} has no local header")
    signature, name_len, extra_len = _LOCAL_HEADER.unpack_from(mm, at)
    start = at + _LOCAL_HEADER.size + name_len + extra_len
    stop = start + member.file_size
    name = bytes(mm[at + _LOCAL_HEADER.size : at + _LOCAL_HEADER.size + name_len])
    if signature != _LOCAL_SIGNATURE or name != member.filename.encode() or stop > len(mm):
        raise ValueError(f"{file}: member {member.filename!r} has a bad local header")
    return start, stop


def _check_apart(file: Path, members: list, spans: dict) -> None:
    """No member's local header or bytes inside another's (a record declared over its
    neighbours would read their headers as weights)."""
    end = 0
    for m in sorted(members, key=lambda m: m.header_offset):
        if m.header_offset < end:
            raise ValueError(f"{file}: member {m.filename!r} lies inside the one before it")
        end = spans[m.filename][1]


def _check_tensors(file: Path, value, sizes: dict[int, int]) -> None:
    """Every tensor in ``value`` (walked without recursion) dense, on the CPU and on a
    storage read from its record, of that record's size (``sizes``, by data pointer) — or
    empty on an empty storage."""
    seen, stack = set(), [value]
    while stack:
        v = stack.pop()
        if id(v) in seen:
            continue
        seen.add(id(v))
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, (list, tuple, set, frozenset)):
            stack.extend(v)
        elif isinstance(v, torch.Tensor):
            if v.layout != torch.strided or v.device.type != "cpu":
                raise ValueError(f"{file}: a {v.layout} tensor on {v.device}, not dense weights")
            storage = v.untyped_storage()
            ptr, nbytes = storage.data_ptr(), storage.nbytes()
            if sizes.get(ptr) != nbytes and not (nbytes == 0 and v.numel() == 0):
                raise ValueError(f"{file}: a tensor of shape {tuple(v.shape)} is not on a "
                                 "storage read from the file's records")  # fmt: skip
