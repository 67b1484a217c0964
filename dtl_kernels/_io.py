"""Durable file writes: a crash never leaves a half-written file under the final name.

* :func:`atomic_write` writes to a temporary file in the destination folder, fsyncs it,
  gives it the mode a normal ``open()`` would (``0o666 & ~umask``, or the replaced
  file's mode), renames it onto the final name and fsyncs the folder, so the rename
  itself survives a power cut.
* Temporary files are named ``.<name>.<pid>.<random>.tmp`` (``<name>`` cut short where
  the whole would pass the folder's file-name limit). A process killed during a write
  leaves one behind; :func:`remove_stale_temps` deletes those whose writer is gone.
* :func:`reserve_space` allocates a file's blocks before it is filled, so a full disk is
  an ``OSError`` up front instead of a ``SIGBUS`` in a memory map or a half-written file.
* :func:`json_text` writes strict JSON: NaN and ±inf become ``null``.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Callable
from pathlib import Path

TEMP_SUFFIX = ".tmp"
# .<name>.<pid>.<random>.tmp (this module) and .<name>.<random>.tmp (versions before the pid)
_TEMP_WITH_PID = re.compile(r"\.(.+)\.(\d+)\.[A-Za-z0-9_]{8}\.tmp")
_TEMP_WITHOUT_PID = re.compile(r"\.(.+)\.[A-Za-z0-9_]{8}\.tmp")
_RANDOM_CHARS = 8  # of mkstemp's names (the {8} above)
_NAME_MAX = 255  # bytes of a file name (Linux, macOS) where the filesystem does not say
# errors of fsync / fallocate that only mean "this filesystem does not do that"
_UNSUPPORTED = {errno.EINVAL, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOSYS}


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Call ``write(tmp_path)``, fsync the file, rename it onto ``path``, fsync the folder.

    The temporary file lives in the destination folder so the rename is atomic; on any
    error (or ``KeyboardInterrupt``) it is removed and ``path`` keeps its previous content.
    Only a regular file (or nothing) is replaced, through a symbolic link at its target:
    a ``path`` that is (or links to) a directory, a FIFO or a device raises
    ``FileExistsError`` (the rename would put a file in the place of ``/dev/null`` itself,
    or of the link instead of writing its target). Returns the path written.
    """
    path = write_target(Path(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, tmp = tempfile.mkstemp(prefix=_temp_prefix(path), suffix=TEMP_SUFFIX, dir=path.parent)
    except OSError as exc:  # named after the file asked for, not the temporary one
        raise type(exc)(exc.errno, exc.strerror, str(path)) from exc
    os.close(fd)
    try:
        write(tmp)
        fsync_file(tmp)
        os.chmod(tmp, _mode_for(path))
        os.replace(tmp, path)
    except BaseException as exc:
        if os.path.exists(tmp):
            os.remove(tmp)
        if isinstance(exc, OSError) and exc.errno is not None and exc.filename in (None, tmp):
            # named after the file asked for (a write through a file object names none)
            why = exc.strerror or os.strerror(exc.errno)
            if is_out_of_space(exc):
                why = f"{why} ({space_note(path.parent)})"
            raise type(exc)(exc.errno, why, str(path)) from exc
        raise
    fsync_dir(path.parent)
    return path


def save_safetensors(tensors: dict, path: str | os.PathLike, metadata: dict) -> None:
    """``safetensors.torch.save_file``, whose I/O errors come as its own exception type
    ("I/O error: File too large (os error 27)"): raised as the ``OSError`` they are, so
    that a full disk is one, named, error line like any other write's."""
    from safetensors.torch import save_file

    try:
        save_file(tensors, str(path), metadata=metadata)
    except Exception as exc:
        code = re.search(r"\(os error (\d+)\)", str(exc))
        if type(exc).__name__ != "SafetensorError" or code is None:
            raise
        number = int(code.group(1))
        raise OSError(number, os.strerror(number), str(path)) from exc


def space_note(folder: str | os.PathLike) -> str:
    """The room a write in ``folder`` had, for the message of one that failed: the free
    bytes of its disk, and this process's file-size limit where one is set."""
    parts = []
    try:
        parts.append(f"{shutil.disk_usage(folder).free / 2**20:,.1f} MiB free on its disk")
    except OSError:
        pass
    try:
        import resource

        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if limit != resource.RLIM_INFINITY:
            parts.append(f"a file-size limit of {limit / 2**20:,.1f} MiB (ulimit -f)")
    except (ImportError, OSError, ValueError):
        pass
    return ", ".join(parts) or "the room left is unknown"


def _name_max(folder: str | os.PathLike) -> int:
    """The longest file name, in bytes, that ``folder``'s filesystem takes."""
    try:
        limit = os.pathconf(folder, "PC_NAME_MAX")
    except (OSError, ValueError):
        return _NAME_MAX
    return limit if limit > 0 else _NAME_MAX


def _temp_prefix(path: Path) -> str:
    """``.<name>.<pid>.``, ``<name>`` cut by whole characters so that the temporary name
    fits the folder's limit (a valid 236-character name + ``.csv`` made one too long);
    one character at least, so that :func:`stale_temps` still recognises it."""
    fixed = len(f"..{os.getpid()}.") + _RANDOM_CHARS + len(TEMP_SUFFIX)
    room, name = _name_max(path.parent) - fixed, path.name
    while len(os.fsencode(name)) > room and len(name) > 1:
        name = name[:-1]
    return f".{name}.{os.getpid()}."


_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"),
          (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
          (stat.S_ISSOCK, "a socket"))  # fmt: skip


def unwritable_kind(path: Path) -> str | None:
    """What stands at ``path`` (through a symbolic link, at its target) that a write must
    not replace: ``"a directory"``, ``"a FIFO"``, …; ``None`` for a regular file or
    nothing (or a path the write itself will refuse)."""
    try:
        mode = os.stat(path).st_mode  # (follows links)
    except OSError:
        return None  # not there, or e.g. a parent that is not a folder: the write says so
    if stat.S_ISREG(mode):
        return None
    return next((name for test, name in _KINDS if test(mode)), "not a regular file")


def write_target(path: Path) -> Path:
    """Where a write to ``path`` goes: ``path``, or the file a symbolic link names (even
    one not made yet); ``FileExistsError`` naming it where that is not a regular file (a
    directory, a FIFO, a device, a socket)."""
    target = Path(os.path.realpath(path)) if os.path.islink(path) else path
    kind = unwritable_kind(target)
    if kind is None:
        return target
    via = f" (where the link {path} points)" if target != path else ""
    raise FileExistsError(f"refusing to replace {target}{via}: it is {kind} (only a regular "
                          "file is written over; choose another path)")  # fmt: skip


def fsync_file(path: str | os.PathLike) -> None:
    with open(path, "rb+") as f:
        f.flush()
        os.fsync(f.fileno())


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename or a deletion in ``folder`` durable (no-op where not supported)."""
    try:
        fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in _UNSUPPORTED:
            raise
    finally:
        os.close(fd)


def _umask() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    old = os.umask(0o022)
    os.umask(old)
    return old


def _mode_for(path: Path) -> int:
    """The mode ``path`` would get from ``open(path, "w")``: kept if it exists, else
    ``0o666`` less the umask (``mkstemp`` alone would give ``0o600``)."""
    try:
        return stat.S_IMODE(path.stat().st_mode)
    except OSError:
        return 0o666 & ~_umask()


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` exists (owned by anyone)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def stale_temps(folder: str | os.PathLike, owned: Callable[[str], bool]) -> list[Path]:
    """Temporary files of :func:`atomic_write` in ``folder`` whose writer process is gone
    (or that predate the pid in the name), of files the caller writes: ``owned(name)``
    for the name of the file each was to become. Any other hidden ``.tmp`` file (another
    program's, one that looks like ours) is never touched."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in sorted(folder.iterdir()):
        if not p.name.endswith(TEMP_SUFFIX) or not p.is_file():
            continue
        m = _TEMP_WITH_PID.fullmatch(p.name)
        if m is not None:
            pid = int(m.group(2))
            if owned(m.group(1)) and pid != os.getpid() and not process_alive(pid):
                found.append(p)
        elif (m := _TEMP_WITHOUT_PID.fullmatch(p.name)) is not None and owned(m.group(1)):
            found.append(p)
    return found


def remove_stale_temps(*folders: str | os.PathLike, owned: Callable[[str], bool]) -> list[Path]:
    """Delete the stale temporary files (see :func:`stale_temps`) of ``folders``."""
    removed = []
    for folder in folders:
        found = stale_temps(folder, owned)
        for p in found:
            p.unlink(missing_ok=True)
        if found:
            fsync_dir(folder)
        removed += found
    return removed


def reserve_space(fd: int, nbytes: int) -> bool:
    """Allocate ``nbytes`` for the open file ``fd`` now (``posix_fallocate``).

    Raises ``OSError`` (``ENOSPC``, ``EFBIG``, ``EDQUOT``…) when they do not fit. Returns
    ``False`` where the filesystem cannot reserve (later writes still fail cleanly with
    an ``OSError``; nothing is memory-mapped for writing).
    """
    if nbytes <= 0 or not hasattr(os, "posix_fallocate"):
        return False
    try:
        os.posix_fallocate(fd, 0, nbytes)
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            return False
        raise
    return True


def is_out_of_space(exc: BaseException) -> bool:
    """An ``OSError`` that means the disk, the quota or the file-size limit is full."""
    codes = {errno.ENOSPC, errno.EFBIG, getattr(errno, "EDQUOT", errno.ENOSPC)}
    return isinstance(exc, OSError) and exc.errno in codes


def finite_or_none(value):
    """``value`` with every non-finite float (NaN, ±inf) replaced by ``None``, recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: finite_or_none(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [finite_or_none(v) for v in value]
    return value


def json_text(value, indent: int | None = 2, default=None) -> str:
    """Strict JSON (``NaN`` / ``Infinity`` never appear: they are written as ``null``)."""
    return json.dumps(finite_or_none(value), indent=indent, allow_nan=False, default=default)
