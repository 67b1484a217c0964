"""Kill -9 during a checkpoint write and during the disk trunk-cache build: no broken
file under a final name, the stale temporary file is removed at the next start, and the
resumed run ends bit-identical to an uninterrupted one."""

from __future__ import annotations

import signal

import pytest
from fault_kit import assert_same_adapter, metric_rows, options, run_child, temp_files

from dtl_kernels.train import checkpoint as ckpt
from dtl_kernels.train import make_config, run

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM backbone")

KILL_IN_CHECKPOINT_2 = """
import os, signal, torch
_save = torch.save
def save(obj, f, *a, **k):
    if isinstance(obj, dict) and obj.get("epoch") == 2:
        with open(f, "wb") as fh:
            fh.write(b"the first bytes of a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    return _save(obj, f, *a, **k)
torch.save = save
"""

# trunk passes: the probes of the train and test caches, then the train build's batches;
# the 4th is the build's second batch (the first is in the file by then)
KILL_IN_CACHE_BUILD = """
import os, signal
from dtl_kernels.train import cache
_trunk, calls = cache.TrunkCache._trunk, []
def trunk(self, images):
    calls.append(1)
    if len(calls) == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return _trunk(self, images)
cache.TrunkCache._trunk = trunk
"""


def test_kill_during_checkpoint_write_then_resume(toy, tmp_path, reference):
    out = tmp_path / "run"
    child = run_child(KILL_IN_CHECKPOINT_2, options(toy, out))
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["epoch_0001.pt"]
    assert temp_files(out / "checkpoints"), "the killed write should have left its temp file"

    run(make_config(options(toy, out, resume=True)))
    assert temp_files(out) == []
    assert_same_adapter(reference, out)
    assert metric_rows(out) == metric_rows(reference)


def test_kill_during_cache_build_then_resume(toy, tmp_path, reference):
    out = tmp_path / "run"
    child = run_child(KILL_IN_CACHE_BUILD, options(toy, out, cache_trunk="disk"))
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]
    cache_dir = out / "trunk-cache"
    assert temp_files(cache_dir) and not (cache_dir / "trunk-train.key.json").exists()

    run(make_config(options(toy, out, cache_trunk="disk", resume=True)))
    assert temp_files(out) == []
    assert sorted(p.name for p in cache_dir.iterdir()) == [
        "trunk-test.bin", "trunk-test.key.json", "trunk-train.bin", "trunk-train.key.json",
    ]  # fmt: skip
    assert_same_adapter(reference, out)
