"""The files a run wrote in its output folder: ``OUTPUT/.dtl-train-manifest.json``.

Every output name (adapter, summary, metrics, curves, config, each checkpoint) is recorded
here before the file is first written, so ``--overwrite`` deletes exactly the files a run
recorded as its own and never a file someone else put in the folder (that one is moved
aside instead). The manifest is read as untrusted input: only plain relative names inside
the folder count.
"""

from __future__ import annotations

import os
from pathlib import Path, PurePosixPath

from .._io import atomic_write, json_text
from .._untrusted import parse_json, read_regular_bytes

MANIFEST_NAME = ".dtl-train-manifest.json"
FORMAT = "dtl_kernels.run-manifest/1"
_MAX_FILES = 100_000
_MAX_BYTES = 64 * 2**20  # _MAX_FILES names of a few hundred bytes


def recorded(out: str | Path) -> set[str]:
    """The names (relative to ``out``, ``/``-separated) the manifest lists; empty when
    there is none or it is unreadable (then nothing counts as a run's own)."""
    path = Path(out) / MANIFEST_NAME
    try:  # (a FIFO under its name: nothing recorded, never a read that blocks)
        data = parse_json(read_regular_bytes(path, _MAX_BYTES), f"manifest {path}")
    except (OSError, ValueError):
        return set()
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        return set()
    files = data.get("files")
    if not isinstance(files, list) or len(files) > _MAX_FILES:
        return set()
    return {f for f in files if isinstance(f, str) and _plain(f)}


def _plain(name: str) -> bool:
    p = PurePosixPath(name)
    return bool(name) and not p.is_absolute() and ".." not in p.parts and "\\" not in name


def record(out: str | Path, *paths: str | Path) -> None:
    """Add ``paths`` (inside ``out``) to the manifest, written atomically when it grows;
    names whose file is gone (rotated checkpoints) are dropped."""
    out = Path(out)
    names = {_inside(out, Path(p)) for p in paths}
    have = recorded(out)
    if names <= have:
        return
    files = sorted(n for n in have | names if n in names or (out / n).exists())
    data = {"format": FORMAT, "files": files}
    atomic_write(out / MANIFEST_NAME, lambda tmp: Path(tmp).write_text(json_text(data) + "\n"))


def _inside(out: Path, path: Path) -> str:
    """``path``'s name relative to ``out``, ``/``-separated, worked out from the names
    alone: a symbolic link inside the folder (``checkpoints`` on another disk) is not
    followed out of it."""
    rel = Path(os.path.relpath(os.path.abspath(path), os.path.abspath(out))).as_posix()
    if not _plain(rel):
        raise ValueError(f"{path} is not inside the output folder {out}")
    return rel


def forget(out: str | Path) -> None:
    """Start a new manifest (a fresh run: the earlier run's files were deleted or moved)."""
    (Path(out) / MANIFEST_NAME).unlink(missing_ok=True)
