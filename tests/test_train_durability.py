"""Durable outputs: atomic writes fsync the folder too and give normal file modes; stale
temporary files of killed writers are removed at start; a fresh run never replaces an
earlier run's outputs (it moves them aside) unless told to (--overwrite)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from dtl_kernels import _io
from dtl_kernels.train import checkpoint as ckpt
from dtl_kernels.train import make_config, run
from dtl_kernels.train.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM backbone")


def test_atomic_write_fsyncs_the_file_and_its_folder(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def fsync(fd):
        synced.append(stat.S_ISDIR(os.fstat(fd).st_mode))
        return real(fd)

    monkeypatch.setattr(os, "fsync", fsync)
    _io.atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
    assert synced == [False, True]  # the file, then the folder after the rename


def test_atomic_write_gives_normal_file_modes(tmp_path):
    umask = os.umask(0o022)
    try:
        path = _io.atomic_write(tmp_path / "a.txt", lambda tmp: Path(tmp).write_text("x"))
        assert stat.S_IMODE(path.stat().st_mode) == 0o644  # not mkstemp's 0o600
        os.chmod(path, 0o640)
        _io.atomic_write(path, lambda tmp: Path(tmp).write_text("y"))
        assert stat.S_IMODE(path.stat().st_mode) == 0o640  # a replaced file keeps its mode
    finally:
        os.umask(umask)


@pytest.mark.parametrize("kind", ["fifo", "directory", "link-to-fifo"])
def test_atomic_write_replaces_only_a_regular_file(tmp_path, kind):
    """The rename would put a regular file in the place of a FIFO or a device (`/dev/null`
    itself, written as root): refused by name, nothing changed."""
    path, fifo = tmp_path / "out.csv", tmp_path / "pipe"
    if kind == "directory":
        path.mkdir()
    else:
        os.mkfifo(fifo if kind == "link-to-fifo" else path)
    if kind == "link-to-fifo":
        path.symlink_to(fifo)
    what = {"fifo": "a FIFO", "directory": "a directory", "link-to-fifo": "a FIFO"}[kind]
    with pytest.raises(FileExistsError, match=f"refusing to replace .*: it is {what}"):
        _io.atomic_write(path, lambda tmp: Path(tmp).write_text("new"))
    assert os.path.islink(path) == (kind == "link-to-fifo") and not list(tmp_path.glob(".*.tmp"))


def test_atomic_write_through_a_symbolic_link_writes_its_target(tmp_path):
    """The link stays; the file it names is replaced atomically (made if it is missing)."""
    target, link = tmp_path / "data" / "target.csv", tmp_path / "out.csv"
    target.parent.mkdir()
    link.symlink_to(target)
    assert _io.atomic_write(link, lambda tmp: Path(tmp).write_text("one")) == target
    _io.atomic_write(link, lambda tmp: Path(tmp).write_text("two"))
    assert link.is_symlink() and target.read_text() == "two"


@pytest.mark.skipif(not Path("/proc/self").is_dir(), reason="needs Linux's /proc")
def test_atomic_write_names_the_file_it_cannot_write():
    """An error making the temporary file names the file asked for, not the temporary one
    (/proc takes no new files, even from root)."""
    with pytest.raises(OSError, match="dtl-out.csv") as info:
        _io.atomic_write("/proc/self/dtl-out.csv", lambda tmp: Path(tmp).write_text("x"))
    assert ".tmp" not in str(info.value)


@pytest.mark.parametrize("stem", ["x" * 236, "é" * 118], ids=["ascii", "two-byte"])
def test_atomic_write_takes_a_name_at_the_length_limit(tmp_path, stem, monkeypatch):
    """A valid name of 240 bytes made a temporary name ``.<name>.<pid>.<random>.tmp`` past
    the 255-byte limit: the write failed (after all the work, blaming the final name). The
    name part of the temporary name is cut to fit, and a stale one is still recognised."""
    path = tmp_path / f"{stem}.csv"
    temps = []

    def write(tmp):
        temps.append(Path(tmp).name)
        Path(tmp).write_text("x")

    assert _io.atomic_write(path, write) == path and path.read_text() == "x"
    assert len(os.fsencode(temps[0])) <= 255 and temps[0].startswith(f".{stem[:100]}")
    # left by a writer that is gone: removed like any other
    with monkeypatch.context() as m:
        m.setattr(os, "getpid", lambda: 4_194_304)  # the longest pid Linux gives
        stale = tmp_path / (_io._temp_prefix(path) + "ab12cd34" + _io.TEMP_SUFFIX)
    stale.write_text("partial")  # (a name past 255 bytes could not be made)
    monkeypatch.setattr(_io, "process_alive", lambda pid: False)
    assert _io.remove_stale_temps(tmp_path, owned=lambda name: True) == [stale]
    assert path.exists()


def test_stale_temp_files_are_removed(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()  # fmt: skip
    alive = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        names = {
            "dead": f".epoch_0002.pt.{dead}.ab12cd34.tmp",
            "old": ".summary.json.x1y2z3w4.tmp",  # written before the pid was in the name
            "alive": f".metrics.jsonl.{alive.pid}.ab12cd34.tmp",
            "own": f".config.json.{os.getpid()}.ab12cd34.tmp",
            "user": "notes.tmp",
            # another program's hidden temporary files, named like ours (both were deleted)
            "theirs": f".results.{dead}.20241207.tmp",
            "theirs, no pid": ".draft.backup_1.tmp",
        }
        for name in names.values():
            (tmp_path / name).write_text("partial")
        ours = {"epoch_0002.pt", "summary.json", "metrics.jsonl", "config.json"}
        removed = _io.remove_stale_temps(tmp_path, owned=ours.__contains__)
        assert sorted(p.name for p in removed) == sorted([names["dead"], names["old"]])
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [names[k] for k in ("alive", "own", "user", "theirs", "theirs, no pid")]
        )
    finally:
        alive.kill()
        alive.wait()


def options(toy: Path, out: Path, **kw) -> dict:
    base = dict(
        model="vit_tiny_patch16_224", pretrained="none", method="dtl+", dataset="folder",
        data_root=str(toy), img_size=32, epochs=1, batch_size=4, lr=1e-2, output=str(out),
        progress=False, cache_trunk="ram",
    )  # fmt: skip
    base.update(kw)
    return base


def argv(opts: dict) -> list[str]:
    flag = lambda k: "--" + k.replace("_", "-")  # noqa: E731
    return [flag(k) if v is True else f"--no-{flag(k)[2:]}" if v is False else f"{flag(k)}={v}"
            for k, v in opts.items()]  # fmt: skip


def test_a_fresh_run_never_replaces_a_finished_one(toy, tmp_path, capsys, one_thread):
    out = tmp_path / "run"
    run(make_config(options(toy, out)))
    outputs = ("adapter.safetensors", "summary.json", "metrics.jsonl", "config.json")
    before = {n: (out / n).read_bytes() for n in outputs}
    stale = out / f".summary.json.{2**22 + 12345}.ab12cd34.tmp"  # a pid that cannot exist
    stale.write_text("{")
    foreign = [out / f".results.{2**22 + 12345}.20241207.tmp", out / ".draft.backup_1.tmp"]
    for p in foreign:  # another program's, named like an interrupted write: never ours
        p.write_text("precious")
    capsys.readouterr()

    assert main(argv(options(toy, out, seed=7))) == 0  # a fresh run in the same folder
    assert "moved its checkpoints and outputs to" in capsys.readouterr().out
    kept = out / "checkpoints.old-1"
    assert {n: (kept / n).read_bytes() for n in outputs} == before
    assert (kept / "epoch_0001.pt").is_file() and not stale.exists()
    assert all(p.read_text() == "precious" for p in foreign)
    assert json.loads((out / "summary.json").read_text())["seed"] == 7

    second = (out / "summary.json").read_bytes()
    ev = options(toy, out, eval_only=True, adapter=str(kept / "adapter.safetensors"))
    assert main(argv(ev)) == 0
    assert (out / "summary.old-1.json").read_bytes() == second

    run(make_config(options(toy, out, seed=8, overwrite=True)))  # told to: deleted, not kept
    assert not (out / "checkpoints.old-2").exists()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["epoch_0001.pt"]
    assert json.loads((out / "summary.json").read_text())["seed"] == 8


def _fifo(path: Path) -> None:
    os.mkfifo(path)


def _folder(path: Path) -> None:
    path.mkdir()


def _file(path: Path) -> None:
    path.write_text("x")


@pytest.mark.parametrize(
    "name, make",
    [("adapter.safetensors", _folder), ("checkpoints", _file),
     (".dtl-train-manifest.json", _fifo), (".dtl-train.lock", _fifo)],
)  # fmt: skip
def test_an_output_name_taken_by_what_cannot_be_written_is_refused_first(
    toy, tmp_path, capsys, name, make
):
    """Found after the last epoch (a folder named like the adapter), after the first (a
    file named ``checkpoints``), as a hang (a FIFO manifest) or "Invalid argument" (a FIFO
    lock): now refused before any work, exit 2, naming the path."""
    out = tmp_path / "run"
    out.mkdir()
    make(out / name)
    assert main(argv(options(toy, out))) == 2
    err = capsys.readouterr().err
    assert str(out / name) in err and "remove it or choose another --output" in err
    assert not ckpt.list_checkpoints(out)
    regular = tmp_path / "a-file"
    regular.write_text("x")
    assert main(argv(options(toy, regular))) == 2
    assert "exists and is not a folder" in capsys.readouterr().err


def test_a_fifo_manifest_reads_as_nothing_recorded_without_blocking(tmp_path):
    import threading

    from dtl_kernels.train import manifest

    os.mkfifo(tmp_path / manifest.MANIFEST_NAME)
    got = []
    reader = threading.Thread(target=lambda: got.append(manifest.recorded(tmp_path)), daemon=True)
    reader.start()
    reader.join(timeout=20)
    assert got == [set()]


def test_checkpoints_linked_to_another_disk(toy, tmp_path, one_thread):
    """``OUTPUT/checkpoints`` a symbolic link to a folder elsewhere: the manifest records
    names inside OUTPUT as they are (resolving the link put them outside: the run failed
    when it recorded its first checkpoint)."""
    from dtl_kernels.train import manifest

    out, elsewhere = tmp_path / "run", tmp_path / "big-disk"
    out.mkdir()
    elsewhere.mkdir()
    (out / "checkpoints").symlink_to(elsewhere)
    run(make_config(options(toy, out, epochs=2)))
    assert sorted(p.name for p in elsewhere.iterdir()) == ["epoch_0001.pt", "epoch_0002.pt"]
    assert {"checkpoints/epoch_0002.pt", "adapter.safetensors"} <= manifest.recorded(out)


def test_eval_only_checks_the_names_it_writes_first(toy, tmp_path, capsys, one_thread):
    """``--eval-only`` writes its summary and the manifest: a folder under the manifest's
    name failed it after the evaluation."""
    from dtl_kernels.train import manifest

    run(make_config(options(toy, tmp_path / "run")))
    out = tmp_path / "eval"
    (out / manifest.MANIFEST_NAME).mkdir(parents=True)
    adapter = str(tmp_path / "run" / "adapter.safetensors")
    capsys.readouterr()
    assert main(argv(options(toy, out, eval_only=True, adapter=adapter))) == 2
    err = capsys.readouterr().err
    assert manifest.MANIFEST_NAME in err and "is a directory" in err
    assert "test accuracy" not in err
