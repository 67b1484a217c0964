"""Out of disk: a real file-size limit (RLIMIT_FSIZE) for the trunk cache, injected
ENOSPC for a checkpoint and for the adapter. Each is one clear error,
leaves no temporary file and loses nothing: the run resumes to the uninterrupted result."""

from __future__ import annotations

import errno
import resource
from contextlib import contextmanager

import pytest
import torch
from fault_kit import (
    assert_same_adapter,
    flags,
    metric_rows,
    options,
    strict_json,
    temp_files,
)

from dtl_kernels.train import checkpoint as ckpt
from dtl_kernels.train import make_config, run
from dtl_kernels.train.cli import main

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM backbone")


@contextmanager
def file_size_limit(nbytes: int):
    """A real size limit on every file this process writes (``RLIMIT_FSIZE``; Python
    ignores ``SIGXFSZ``, so a write past it fails with ``EFBIG``)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (nbytes, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")


def one_error_line(err: str) -> str:
    lines = [x for x in err.splitlines() if x.strip() and not x.startswith(("!!", "\n"))]
    errors = [x for x in lines if x.startswith("dtl-train: error:")]
    assert len(errors) == 1 and "Traceback" not in err, err[-3000:]
    return errors[0]


def test_trunk_cache_beyond_the_file_size_limit(toy, tmp_path, capsys):
    out = tmp_path / "run"  # the train split's cache file needs 360 KiB
    with file_size_limit(150_000):
        code = main(flags(options(toy, out, cache_trunk="disk")))
    assert code == 1
    line = one_error_line(capsys.readouterr().err)
    assert "no room for" in line and "trunk-train.bin" in line and "File too large" in line
    assert temp_files(out) == [] and not (out / "trunk-cache" / "trunk-train.bin").exists()


def test_checkpoint_write_out_of_space(toy, tmp_path, reference, monkeypatch, capsys):
    out = tmp_path / "run"
    real_save = torch.save

    def save(obj, f, *a, **k):
        if isinstance(obj, dict) and obj.get("epoch") == 2:
            enospc()
        return real_save(obj, f, *a, **k)

    monkeypatch.setattr(torch, "save", save)
    assert main(flags(options(toy, out))) == 1
    assert "No space left on device" in one_error_line(capsys.readouterr().err)
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["epoch_0001.pt"]
    assert temp_files(out) == [] and not (out / "adapter.safetensors").exists()
    assert [r["epoch"] for r in metric_rows(out)] == [1]

    run(make_config(options(toy, out, resume=True)))
    assert_same_adapter(reference, out)


def test_adapter_write_out_of_space(toy, tmp_path, reference, monkeypatch, capsys):
    import safetensors.torch

    out = tmp_path / "run"
    monkeypatch.setattr(safetensors.torch, "save_file", enospc)
    assert main(flags(options(toy, out))) == 1
    assert "No space left on device" in one_error_line(capsys.readouterr().err)
    monkeypatch.undo()
    assert temp_files(out) == [] and not (out / "adapter.safetensors").exists()
    assert not (out / "summary.json").exists()

    run(make_config(options(toy, out, resume=True)))  # evaluates the last checkpoint
    assert_same_adapter(reference, out)
    assert strict_json((out / "summary.json").read_text())["epochs"] == 3


def test_checkpoint_beyond_the_file_size_limit(toy, tmp_path, reference, capsys):
    """A real short write: torch.save reports it as an internal error ("unexpected pos"),
    which came out as a traceback; now one line naming the checkpoint and the room."""
    out = tmp_path / "run"
    with file_size_limit(60_000):  # below one checkpoint
        code = main(flags(options(toy, out)))
    assert code == 1
    line = one_error_line(capsys.readouterr().err)
    assert "could not write checkpoint" in line and "epoch_0001.pt" in line
    assert "file-size limit" in line and "is the disk full?" in line
    assert temp_files(out) == [] and ckpt.list_checkpoints(out) == []


def test_curves_beyond_the_file_size_limit_name_the_file(toy, tmp_path, capsys):
    """A write through a file object (matplotlib's) fails with an error that names no
    file: it is named now ("[Errno 27] File too large" alone before)."""
    out = tmp_path / "run"
    run(make_config(options(toy, out, method="linear", stop_after=2)))
    capsys.readouterr()
    written = max(p.stat().st_size for p in ckpt.list_checkpoints(out))
    with file_size_limit(written + 4096):  # room for the checkpoints, not the plot
        code = main(flags(options(toy, out, method="linear", resume=True)))
    assert code == 1
    line = one_error_line(capsys.readouterr().err)
    assert "File too large" in line and "curves.png" in line and "file-size limit" in line
    assert temp_files(out) == []


def test_adapter_beyond_the_file_size_limit(toy, tmp_path, monkeypatch, capsys):
    """A real short write of the adapter: safetensors raises its own error type ("I/O
    error: File too large (os error 27)"), which came out as a traceback."""
    from dtl_kernels.train import outputs

    real = outputs.save_adapter

    def limited(*args, **kwargs):  # as if the disk filled up just now
        with file_size_limit(4096):
            return real(*args, **kwargs)

    monkeypatch.setattr(outputs, "save_adapter", limited)
    out = tmp_path / "run"
    assert main(flags(options(toy, out))) == 1
    line = one_error_line(capsys.readouterr().err)
    assert "File too large" in line and "adapter.safetensors" in line
    assert "file-size limit" in line and temp_files(out) == []
