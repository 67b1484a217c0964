"""One run per output folder: an exclusive lock on ``OUTPUT/.dtl-train.lock`` held for the
whole run.

The lock is ``flock(LOCK_EX | LOCK_NB)`` on the lock file: the kernel releases it when the
holder exits in any way (an error, Ctrl-C, ``kill -9``, a power cut), so a lock is never
stale and never needs removing by hand. The holder writes its pid, host, start time and
command line into the file, so a second run names the first in its error. Under
``torchrun`` only rank 0 takes it (:func:`dtl_kernels.train.loop.run`).

Where ``fcntl`` does not exist (Windows) there is no lock.
"""

from __future__ import annotations

import os
import socket
import sys
import time
from pathlib import Path

from .._io import json_text, process_alive
from .._untrusted import parse_json

LOCK_NAME = ".dtl-train.lock"
_MAX_HOLDER_BYTES = 4096  # what a lock file's description may take
# The descriptors of the locks this process holds. A forked child (a data loader's worker)
# closes its copies at once: a flock lasts while any copy is open, so a run killed with
# kill -9 held its folder until its orphaned workers ended, seconds later.
_HELD: set[int] = set()


def _close_inherited() -> None:
    for fd in _HELD:
        try:
            os.close(fd)  # (only the child's copy: the parent keeps the lock)
        except OSError:
            pass
    _HELD.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_inherited)


class OutputInUse(OSError):
    """Another run holds the output folder; the message names it."""


class OutputLock:
    """The exclusive lock of one output folder (see the module docstring)."""

    def __init__(self, fd: int, path: Path):
        self.fd, self.path = fd, path

    @classmethod
    def acquire(cls, folder: str | os.PathLike) -> OutputLock | None:
        """Lock ``folder`` (created if needed) for this process; :class:`OutputInUse`
        naming the holder when another process has it. ``None`` without ``fcntl``."""
        try:
            import fcntl
        except ImportError:  # no flock here: runs are not serialised
            return None
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / LOCK_NAME
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _describe(os.pread(fd, _MAX_HOLDER_BYTES, 0))
            os.close(fd)
            raise OutputInUse(
                f"--output {folder} is in use by another dtl-train run ({holder}); wait for it "
                "to finish, or give this run another --output"
            ) from None
        except BaseException:
            os.close(fd)
            raise
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "command": " ".join(sys.argv)[:1000],
        }
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json_text(me) + "\n").encode(), 0)
        _HELD.add(fd)
        return cls(fd, path)

    def release(self) -> None:
        """Let the next run in (the kernel also does this when the process ends)."""
        if self.fd < 0:
            return
        import fcntl

        fcntl.flock(self.fd, fcntl.LOCK_UN)
        _HELD.discard(self.fd)
        os.close(self.fd)
        self.fd = -1


def _describe(raw: bytes) -> str:
    """The lock holder as the lock file describes it (untrusted text, bounded)."""
    try:
        info = parse_json(raw.decode("utf-8"), "lock file")
    except (UnicodeDecodeError, ValueError):
        info = None
    if not isinstance(info, dict):
        return "a process that has not described itself yet"
    pid = info.get("pid")
    pid = pid if isinstance(pid, int) and not isinstance(pid, bool) and pid > 0 else None
    parts = [
        f"pid {pid}" if pid is not None else "",
        f"on {str(info.get('host'))[:100]}" if info.get("host") else "",
        f"started {str(info.get('started'))[:40]}" if info.get("started") else "",
        f"running {str(info.get('command'))[:200]!r}" if info.get("command") else "",
    ]
    said = ", ".join(p for p in parts if p) or "an unknown process"
    if pid is not None and info.get("host") == socket.gethostname() and not process_alive(pid):
        # its children (data loader workers) inherited the lock and end a moment later
        said += ("; that process has ended, and what it started still holds the lock: "
                 "retry in a few seconds")  # fmt: skip
    return said
