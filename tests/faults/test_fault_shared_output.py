"""Two runs that meet in one ``--output``: the folder is locked for the whole run, a
second run is refused naming the first (pid, host), nothing of the first is touched, and
the lock dies with its holder (``kill -9``: ``--resume`` goes on). ``--overwrite`` deletes
only the files a run recorded as its own, and says which."""

from __future__ import annotations

import os
import signal
import socket

import pytest
from fault_kit import flags, options, start_child, wait_for

from dtl_kernels.train import checkpoint as ckpt
from dtl_kernels.train import make_config, run
from dtl_kernels.train.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM backbone")

# the child run (A) signals after its first checkpoint, then waits, holding the folder
PAUSE_AFTER_EPOCH_1 = """
import pathlib, time
from dtl_kernels.train import outputs
_save = outputs.save_epoch
def save_epoch(out, epoch, *args, **kwargs):
    _save(out, epoch, *args, **kwargs)
    if epoch == 1:
        (pathlib.Path(out) / "paused").write_text("1")
        time.sleep(600)
outputs.save_epoch = save_epoch
"""


def test_a_second_run_is_refused_while_the_first_holds_the_folder(toy, tmp_path, capsys):
    out = tmp_path / "run"
    a = start_child(PAUSE_AFTER_EPOCH_1, options(toy, out))
    try:
        wait_for(out / "paused", a)
        before = sorted(p.relative_to(out).as_posix() for p in out.rglob("*"))
        assert main(flags(options(toy, out, seed=7))) == 1  # B: a fresh run in A's folder
        err = capsys.readouterr().err
        assert f"is in use by another dtl-train run (pid {a.pid}" in err, err[-2000:]
        assert socket.gethostname() in err and "Traceback" not in err
        assert sorted(p.relative_to(out).as_posix() for p in out.rglob("*")) == before
        assert not list(out.glob("checkpoints.old-*"))  # A's live checkpoints stay put
    finally:
        os.kill(a.pid, signal.SIGKILL)  # a holder that dies leaves no stale lock
        a.wait()
    assert main(flags(options(toy, out, resume=True))) == 0
    assert "resumed from" in capsys.readouterr().out
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["epoch_0002.pt", "epoch_0003.pt"]


def test_overwrite_never_deletes_files_no_run_recorded(toy, tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "config.json").write_text('{"my": "own notes"}')
    (out / "metrics.csv").write_text("my,own\n1,2\n")
    run(make_config(options(toy, out, epochs=1, overwrite=True)))
    said = capsys.readouterr().out
    assert "kept metrics.csv, config.json: no run recorded them as its own" in said
    kept = out / "checkpoints.old-1"
    assert (kept / "config.json").read_text() == '{"my": "own notes"}'
    assert (kept / "metrics.csv").read_text() == "my,own\n1,2\n"
    assert "deleted" not in said


def test_overwrite_deletes_exactly_the_earlier_runs_files_and_names_them(toy, tmp_path, capsys):
    out = tmp_path / "run"
    run(make_config(options(toy, out, epochs=2, keep_checkpoints=1)))
    (out / "notes.txt").write_text("mine")
    capsys.readouterr()
    run(make_config(options(toy, out, epochs=1, overwrite=True)))
    said = capsys.readouterr().out
    deleted = next(line for line in said.splitlines() if line.startswith("--overwrite: deleted"))
    names = deleted.removeprefix("--overwrite: deleted ").split(f" in {out}")[0].split(", ")
    assert sorted(names) == sorted([
        "adapter.safetensors", "summary.json", "metrics.jsonl", "metrics.csv", "curves.png",
        "config.json", "checkpoints/epoch_0002.pt",
    ])  # fmt: skip
    assert (out / "notes.txt").read_text() == "mine" and not list(out.glob("checkpoints.old-*"))


def test_fuzzed_manifests_never_name_a_file_outside_the_folder(tmp_path):
    from pathlib import PurePosixPath

    from fuzz_kit import mutants

    from dtl_kernels.train import manifest

    out = tmp_path / "run"
    out.mkdir()
    (out / "adapter.safetensors").write_bytes(b"x")
    manifest.record(out, out / "adapter.safetensors", out / "checkpoints" / "epoch_0001.pt")
    good = (out / manifest.MANIFEST_NAME).read_bytes()
    hostile = good.replace(b'"adapter.safetensors"', b'"../../etc/passwd", "/etc/passwd"')
    for data in [hostile, b"[]", b'"text"', *mutants(good, count=150, seed=22)]:
        (out / manifest.MANIFEST_NAME).write_bytes(data)
        for name in manifest.recorded(out):  # never raises; only plain names inside OUTPUT
            p = PurePosixPath(name)
            assert not p.is_absolute() and ".." not in p.parts, name


HOLD_WITH_A_FORKED_CHILD = """
import multiprocessing, os, sys, time
from dtl_kernels.train.output_lock import OutputLock
lock = OutputLock.acquire(sys.argv[1])
child = multiprocessing.get_context("fork").Process(target=time.sleep, args=(60,))
child.start()  # as a data loader's worker is forked
print(child.pid, flush=True)
time.sleep(0.5)
os.kill(os.getpid(), 9)
"""


def test_a_killed_runs_forked_workers_do_not_hold_its_folder(tmp_path):
    """``kill -9`` of a run whose loader workers are still alive: the folder is free at
    once (each forked child closes its copy of the lock; a flock lasts while any copy is
    open: the next run was refused for seconds, naming a dead pid)."""
    import subprocess
    import sys

    from dtl_kernels.train.output_lock import OutputLock

    command = [sys.executable, "-c", HOLD_WITH_A_FORKED_CHILD, str(tmp_path)]
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    child = int(proc.stdout.readline())  # (the orphan keeps the pipe open: no EOF to wait for)
    proc.wait(timeout=60)
    proc.stdout.close()
    try:
        os.kill(child, 0)  # the orphaned worker still runs
        lock = OutputLock.acquire(tmp_path)
        assert lock is not None
        lock.release()
    finally:
        os.kill(child, signal.SIGKILL)


def test_a_holder_that_has_ended_is_said_so():
    import json
    import subprocess
    import sys

    from dtl_kernels.train.output_lock import _describe

    dead = int(subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                              capture_output=True, text=True).stdout)  # fmt: skip
    said = _describe(json.dumps({"pid": dead, "host": socket.gethostname()}).encode())
    assert f"pid {dead}" in said and "has ended" in said and "retry in a few seconds" in said
    alive = _describe(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode())
    assert "has ended" not in alive
