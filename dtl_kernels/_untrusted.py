"""Reading files that come from others: every byte is untrusted.

One rule for every reader of the package (adapters, checkpoints, caches, YAML; the ONNX
reader applies it to the protobuf wire format): sizes, counts and nesting are checked
against the file and sane limits *before* anything is allocated from them, so a hostile
file costs at most a small multiple of its own size in memory and time, and a bad one ends
in one error that names the file and the field.

* :func:`parse_json` — JSON text with bounded nesting (``ValueError``, never a
  ``RecursionError``) and no key given twice in one object (which ``json`` resolves
  silently: the last one wins).
* :func:`check_torch_archive` — a ``torch.save`` file before ``torch.load`` reads it: a zip
  archive whose members are stored uncompressed and fit inside the file (a deflated member
  could expand a small file into gigabytes; the legacy non-zip format allocates what its
  pickle declares before reading), and whose pickle names only what weights need
  (:func:`check_torch_pickle`, scanned without running it).
"""

from __future__ import annotations

import json
import os
import pickletools
import re
import reprlib
import stat
import zipfile
from pathlib import Path

MAX_JSON_DEPTH = 16  # the package's own JSON is at most 4 levels deep


_SHOWN = reprlib.Repr()
_SHOWN.maxlevel, _SHOWN.maxstring, _SHOWN.maxother, _SHOWN.maxlong = 2, 60, 60, 40
_SHOWN.maxlist = _SHOWN.maxtuple = _SHOWN.maxdict = _SHOWN.maxset = 4


def shown(value) -> str:
    """A short ``repr`` of an untrusted value for an error message, in bounded time and
    memory (``repr`` of a YAML anchor bomb is gigabytes; of a 5,000-digit int, an error)."""
    try:
        return _SHOWN.repr(value)
    except (ValueError, RecursionError):
        return f"a value of type {type(value).__name__} too large to show"


def json_depth(value) -> int:
    """How deeply lists and mappings nest in ``value`` (a scalar is 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, depth = stack.pop()
        if isinstance(v, dict):
            children = v.values()
        elif isinstance(v, (list, tuple)):
            children = v
        else:
            continue
        deepest = max(deepest, depth)
        stack.extend((c, depth + 1) for c in children)
    return deepest


def first_repeat(items):
    """The first item that comes a second time (``None``: none does), in linear time: a
    hostile file may hold a hundred thousand names."""
    seen = set()
    return next((x for x in items if x in seen or seen.add(x)), None)


def _unique_keys(pairs: list) -> dict:
    value = dict(pairs)
    if len(value) != len(pairs):
        twice = first_repeat(k for k, _ in pairs)
        raise ValueError(f"key {escape_controls(twice[:80])!r} is given twice")
    return value


def parse_json(text: str | bytes, what: str, max_depth: int = MAX_JSON_DEPTH):
    """``json.loads(text)`` for text from a file; ``ValueError`` starting with ``what``
    (which names the file and the field) for text that is not JSON, nests deeper than
    ``max_depth`` or gives one key twice in an object."""
    try:
        value = json.loads(text, object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError(f"{what} is nested too deeply (over {max_depth} levels)") from None
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{what} is not JSON ({exc})") from None
    if json_depth(value) > max_depth:
        raise ValueError(f"{what} is nested too deeply (over {max_depth} levels)")
    return value


# C0 / C1 control characters: a terminal takes them as escape sequences
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


def has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None


def escape_controls(text: str) -> str:
    """``text`` with each control character written as its escape (``\\x1b``): a name read
    from someone's file, printed as it is, could drive the terminal."""
    return _CONTROL.sub(lambda m: m.group().encode("unicode_escape").decode(), text)


def non_float_for_float(tensors: dict, like: dict) -> list[str]:
    """``"name: dtype"`` of each tensor that is no real floating one where ``like[name]``
    is floating: a complex tensor copied into float weights loses its imaginary part, a
    bool or integer one passes for weights."""
    return [
        f"{k}: {v.dtype}"
        for k, v in tensors.items()
        if like[k].is_floating_point() and (not v.is_floating_point() or v.is_complex())
    ]


# An .npz may be compressed (np.savez_compressed): its members may hold more than the file,
# but not by more than float weights compress.
_NPZ_EXPANSION = 4


# The largest patch-embedding kernel area timm's resampler is let loose on (a .pth's or an
# .npz's): it builds an (area x area) matrix (64² → 64 MB); real patch sizes are 8…32.
MAX_PATCH_KERNEL_AREA = 64 * 64


class NotRegularFile(ValueError):
    """What was opened is a FIFO, a device, a folder…: nothing to read a file's bytes from."""


def _open_regular_fd(path: str | bytes | os.PathLike) -> tuple[int, os.stat_result]:
    """A read-only descriptor of ``path`` and its ``fstat`` if it is a regular file, else
    :class:`NotRegularFile` (an ``OSError`` from the open itself passes, as does the
    ``ValueError`` of a path with a NUL byte in it). Opened without blocking
    and checked on the descriptor, not by name: a FIFO named like the file, even one
    swapped in after a check by name, would block a plain open or read forever."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(path, flags)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise NotRegularFile(f"{os.fsdecode(path)} is not a regular file")
    except BaseException:
        os.close(fd)
        raise
    return fd, info


def open_regular(path: str | bytes | os.PathLike):
    """``path`` opened to read bytes (a binary file object, the caller closes it) if it is a
    regular file, else :class:`NotRegularFile`; as :func:`_open_regular_fd`. (A regular file's reads
    never wait, so the descriptor's non-blocking flag changes nothing for the reader.)"""
    fd, _ = _open_regular_fd(path)
    try:
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_regular_bytes(path: str | os.PathLike, limit: int) -> bytes:
    """The bytes of ``path`` if it is a regular file of at most ``limit`` bytes, else
    ``ValueError`` (:class:`NotRegularFile` for what is no file); opened as
    :func:`_open_regular_fd` does."""
    fd, info = _open_regular_fd(path)
    try:
        if info.st_size > limit:
            raise ValueError(f"{path} holds {info.st_size} bytes, more than {limit}")
        chunks, size = [], 0
        while size <= limit and (chunk := os.read(fd, limit + 1 - size)):
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > limit:  # grew since the fstat
        raise ValueError(f"{path} holds more than {limit} bytes")
    return b"".join(chunks)


def regular_file(path: str | os.PathLike) -> Path:
    """``path`` if it is a regular file (or a link to one), else ``ValueError``: opening a
    FIFO named like a checkpoint blocks until something writes to it; a directory or a
    device is not a file to read weights from either."""
    path = Path(path)
    if not path.is_file():
        what = "does not exist" if not path.exists() else "is not a regular file"
        raise ValueError(f"{path} {what}")
    return path


def check_npz_archive(path: str | os.PathLike) -> None:
    """``ValueError`` unless ``path`` is a zip archive whose members declare at most
    4 × the file's size (+ 1 MiB) in all: a compressed member that would expand into
    gigabytes (zipfile never reads past a member's declared size) is refused unread."""
    path = regular_file(path)
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            declared = sum(m.file_size for m in archive.infolist())
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path} is not an .npz (zip) archive ({exc})") from None
    if declared > _NPZ_EXPANSION * size + 2**20:
        raise ValueError(
            f"{path}: its arrays declare {declared} bytes, more than {_NPZ_EXPANSION} x "
            f"the file's {size}: refusing to expand it"
        )


def check_torch_archive(path: str | os.PathLike) -> None:
    """``ValueError`` unless ``path`` is a zip archive (``torch.save``'s format) whose
    members are stored uncompressed, together fit inside the file and have one name each,
    and whose pickle needs nothing beyond weights (:func:`check_torch_pickle`)."""
    path = regular_file(path)
    size = path.stat().st_size
    try:
        with zipfile.ZipFile(path) as archive:
            members = archive.infolist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError) as exc:
        raise ValueError(f"{path} is not a torch.save zip archive ({exc})") from None
    twice = first_repeat(m.filename for m in members)
    if twice is not None:
        raise ValueError(f"{path}: member {twice!r} is in the archive twice (which one is meant?)")
    total = 0
    for m in members:
        if m.compress_type != zipfile.ZIP_STORED:
            raise ValueError(
                f"{path}: member {m.filename!r} is compressed (torch.save stores members as "
                "they are); refusing a file that could expand beyond its size"
            )
        total += m.file_size
        if m.file_size != m.compress_size or total > size:
            raise ValueError(f"{path}: member {m.filename!r} declares more bytes than the file has")
    with zipfile.ZipFile(path) as archive:
        for m in members:
            if m.filename.count("/") == 1 and m.filename.endswith("/data.pkl"):
                check_torch_pickle(path, archive.read(m))


# What torch.save writes for tensors, parameters, dtypes, sizes and devices ("module name";
# torch's storage classes and dtypes by rule). torch's weights-only list also lets
# bytearray(10**9) or torch.FloatTensor(n) run: gigabytes, or uninitialised memory, from a
# few hundred bytes.
_TORCH_GLOBALS = {
    "collections OrderedDict", "torch Size", "torch device", "torch.storage UntypedStorage",
    "torch._utils _rebuild_tensor_v2", "torch._utils _rebuild_tensor_v3",
    "torch._utils _rebuild_parameter", "torch._utils _rebuild_parameter_with_state",
}  # fmt: skip
# ints equal modulo 2^61 - 1 hash alike: a dict of many such keys unpickles in quadratic time
MAX_HUGE_INTS = 1000
_HASH_MODULUS = 2**61 - 1


def check_legacy_torch_file(path: str | os.PathLike) -> None:
    """:func:`check_torch_pickle` for each of the five pickles a legacy (pre-1.6, non-zip)
    ``torch.save`` file starts with (magic number, protocol, system info, the object, its
    storage keys). Its storages are allocated at the sizes the object declares before
    their data is read; that stays as torch does it."""
    with open(regular_file(path), "rb") as f:
        for _ in range(5):
            check_torch_pickle(path, f)


def check_torch_pickle(file, pickled) -> None:
    """``ValueError`` naming ``file`` unless the pickle of a ``torch.save`` archive (bytes,
    or a file read up to its STOP), scanned op by op without running it, names only
    globals :data:`_TORCH_GLOBALS` allows (and torch's storage classes and dtypes), by
    ``GLOBAL`` (protocol 2, what ``torch.save`` writes; torch's weights-only unpickler
    reads no protocol-4 frames), and holds at most :data:`MAX_HUGE_INTS` integers of
    magnitude 2^61 − 1 or more."""
    huge = 0
    try:
        for op, arg, _ in pickletools.genops(pickled):
            if op.name == "GLOBAL":
                _check_global(file, *str(arg).split(" ", 1))
            elif op.name in ("STACK_GLOBAL", "INST", "OBJ", "EXT1", "EXT2", "EXT4"):
                raise ValueError(
                    f"{file}: its pickle uses {op.name}, which torch.save never writes"
                )
            elif isinstance(arg, int) and abs(arg) >= _HASH_MODULUS:
                huge += 1
                if huge > MAX_HUGE_INTS:
                    raise ValueError(f"{file}: more than {MAX_HUGE_INTS} integers beyond 2^61")
    except ValueError as exc:
        if str(file) in str(exc):
            raise
        raise ValueError(f"{file}: its pickle is malformed ({exc})") from None
    except Exception as exc:  # noqa: BLE001 — genops raises what its readers raise
        raise ValueError(f"{file}: its pickle is malformed ({type(exc).__name__})") from None


def _check_global(file, module: str, name: str = "") -> None:
    import torch

    if f"{module} {name}" in _TORCH_GLOBALS:
        return
    if module == "torch" and (
        name.endswith("Storage") or isinstance(vars(torch).get(name), torch.dtype)  # no lazy import
    ):
        return
    raise ValueError(f"{file}: the pickle names {module[:60]}.{name[:60]}, which a checkpoint "
                     "of weights does not need")  # fmt: skip
