"""A ``torch.save`` archive's tensors as views of a private memory map of the file, each
storage checked against the zip record it names.

``torch.load(mmap=True)`` takes a storage's size from the pickle and slices the whole
file's map by it, so a storage that declares more bytes than its record silently reads the
next records' bytes (and the zip directory) as weights; torch's reading load refuses such a
file. This reader keeps the map (a checkpoint is never held twice) and the refusal: the
pickle is read by torch's own weights-only unpickler, and each storage it names must be a
record ``data/<key>`` stored in the file with exactly the bytes it declares.

It is stricter than ``weights_only`` where weights need no more: the pickle may name only
what ``torch.save`` writes for tensors, parameters, dtypes, sizes and devices (torch's list
also lets ``bytearray(10**9)`` or ``torch.FloatTensor(n)`` run: gigabytes, or weights of
uninitialised memory, from a few hundred bytes); it may hold at most
:data:`MAX_HUGE_INTS` integers beyond 2^61 (ints equal modulo 2^61 − 1 hash alike: a dict
of many makes unpickling quadratic); every tensor must be dense, on the CPU and on a
storage read from its record; records may not overlap one another.
"""

from __future__ import annotations

import io
import mmap
import pickletools
import struct
import zipfile
from pathlib import Path

import torch

from .._untrusted import check_torch_archive

_LOCAL_HEADER = struct.Struct("<4s22xHH")  # signature, …, name length, extra length
_LOCAL_SIGNATURE = b"PK\x03\x04"
# the globals torch.save writes for weights ("module name"; also torch's storage classes
# and dtypes, by rule in _check_global)
_GLOBALS = {
    "collections OrderedDict", "torch Size", "torch device", "torch.storage UntypedStorage",
    "torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_tensor_v3",
    "torch._utils _rebuild_parameter", "torch._utils _rebuild_parameter_with_state",
}  # fmt: skip
MAX_HUGE_INTS = 1000
_HASH_MODULUS = 2**61 - 1


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
    check_torch_archive(file)  # stored members that fit in the file
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
    pickled = bytes(mm[pkl[0] : pkl[1]])
    _check_pickle(file, pickled)
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


def _check_pickle(file: Path, pickled: bytes) -> None:
    """The pickle, scanned without running it: every global it names is one a checkpoint
    of weights needs (:func:`_check_global`), at most :data:`MAX_HUGE_INTS` integers of
    magnitude 2^61 − 1 or more."""
    memo: dict[int, object] = {}
    recent: list[object] = []  # what the last two ops pushed, where a scan can tell
    huge = 0
    try:
        for op, arg, _ in pickletools.genops(pickled):
            name = op.name
            if name == "GLOBAL":
                _check_global(file, *str(arg).split(" ", 1))
            elif name == "STACK_GLOBAL":  # protocol 4: module and name pushed before it
                if len(recent) < 2 or not all(isinstance(v, str) for v in recent):
                    raise ValueError(f"{file}: the pickle builds a global's name by other means")
                _check_global(file, *recent)
            elif name in ("INST", "OBJ", "EXT1", "EXT2", "EXT4"):
                raise ValueError(f"{file}: the pickle uses {name}, which torch.save never writes")
            if isinstance(arg, int) and abs(arg) >= _HASH_MODULUS:
                huge += 1
                if huge > MAX_HUGE_INTS:
                    raise ValueError(f"{file}: more than {MAX_HUGE_INTS} integers beyond 2^61")
            if name in ("PROTO", "FRAME"):
                continue
            if name in ("MEMOIZE", "BINPUT", "LONG_BINPUT", "PUT"):
                memo[len(memo) if name == "MEMOIZE" else int(arg)] = recent[-1] if recent else None
                continue  # pushes nothing
            if name in ("BINGET", "LONG_BINGET", "GET"):
                recent.append(memo.get(int(arg)))
            else:
                recent.append(arg if isinstance(arg, str) and "UNICODE" in name else None)
            del recent[:-2]
    except ValueError as exc:
        if str(file) in str(exc):
            raise
        raise ValueError(f"{file}: its pickle is malformed ({exc})") from None


def _check_global(file: Path, module: str, name: str = "") -> None:
    if f"{module} {name}" in _GLOBALS:
        return
    if module == "torch" and (
        name.endswith("Storage") or isinstance(getattr(torch, name, None), torch.dtype)
    ):
        return
    raise ValueError(f"{file}: the pickle names {module[:60]}.{name[:60]}, which a checkpoint "
                     "of weights does not need")  # fmt: skip


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
