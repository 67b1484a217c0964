"""Checkpoints and YAML files from others: a checkpoint's archive and every field of its
payload are checked before they are used (a compressed member, a wrong shape, a huge
step count, junk random-number states), and a YAML file may not give an option twice.
Seeded fuzz tests: every mutant loads or ends in one error naming the file."""

from __future__ import annotations

import copy
import random
import zipfile
from pathlib import Path

import pytest
import torch
from fuzz_kit import AllocationGuard, mutants
from torch import nn

from dtl_kernels.train import checkpoint as ckpt
from dtl_kernels.train.config import load_config
from dtl_kernels.train.step import WarmupCosine, param_groups

pytestmark = pytest.mark.filterwarnings("ignore:Detected pickle protocol")
MIB = 2**20
CONFIG = {"model": "vit_tiny_patch16_224", "epochs": 3, "lr": 0.01, "batch_size": 4}


def _trainer():
    """A tiny model, AdamW and the warm-up/cosine schedule, one step taken."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.LayerNorm(3))
    opt = torch.optim.AdamW(param_groups(model, 0.05), lr=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, WarmupCosine(0.01, 1e-7, 1e-8, 2, 6))
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ckpt")
    model, opt, sched = _trainer()
    row = {"epoch": 1, "lr": 0.01, "train_loss": 1.0, "test_acc": None, "skipped_steps": 0}
    return ckpt.save_checkpoint(out, 1, model, opt, sched, [row], CONFIG)


def _resume(path: Path) -> None:
    """What ``--resume`` does with a checkpoint file: read it, compare, restore it."""
    found = ckpt.load_latest(path.parent.parent)
    assert found is not None
    _, payload = found
    ckpt.resume_plan(payload["config"], CONFIG, payload["epoch"], False)
    model, opt, sched = _trainer()
    ckpt.restore(payload, path, model, opt, sched)


def _expect_refused(path: Path, match: str) -> None:
    with AllocationGuard(path.stat().st_size + MIB):
        with pytest.raises(ckpt.CheckpointError, match=match) as info:
            _resume(path)
    assert str(path) in str(info.value)


def test_compressed_checkpoint_member_is_refused_before_loading(saved, tmp_path):
    out = tmp_path / "run" / "checkpoints" / saved.name
    out.parent.mkdir(parents=True)
    with zipfile.ZipFile(saved) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():  # a deflated member could expand to any size
            dst.writestr(info.filename, src.read(info), compress_type=zipfile.ZIP_DEFLATED)
    _expect_refused(out, "is compressed")


def test_a_checkpoint_whose_pickle_would_allocate_is_refused_unread(saved, tmp_path):
    """``bytearray(10**9)`` is on torch's weights-only list: 1 GB from 40 bytes of pickle."""
    out = tmp_path / "run" / "checkpoints" / saved.name
    out.parent.mkdir(parents=True)
    bomb = b"\x80\x02cbuiltins\nbytearray\nJ\x00\xca\x9a;\x85R."
    with zipfile.ZipFile(saved) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = bomb if info.filename.endswith("/data.pkl") else src.read(info)
            dst.writestr(info.filename, data)
    _expect_refused(out, "names builtins.bytearray")


def _key(node, part: str):
    """A path part as the key ``node`` uses (list indices and optimizer states are ints)."""
    if part.isdigit() and (isinstance(node, list) or int(part) in node):
        return int(part)
    return part


def _edit(payload: dict, where: str, value) -> None:
    *parents, last = where.split("/")
    node = payload
    for p in parents:
        node = node[_key(node, p)]
    node[_key(node, last)] = value


HOSTILE = {
    "negative epoch": ("epoch", -3, "'epoch'"),
    "huge epoch": ("epoch", 2**62, "'epoch'"),
    "metrics of another length": ("metrics", [], "'metrics'"),
    "a tensor in a metrics row": ("metrics/0/lr", torch.ones(3), "'metrics'"),
    "a tensor in the config": ("config/lr", torch.ones(3), "'config'"),
    "a nested config": ("config/lr", {"a": {"b": 1}}, "'config'"),
    "negative step": ("scheduler/last_epoch", -5, "'scheduler.last_epoch'"),
    "a huge view as a weight": ("trained/0.weight", torch.zeros(1).expand(2**40), "mis-shaped"),
    "moments of another shape": ("optimizer/state/0/exp_avg", torch.zeros(7), "optimizer state"),
    "junk random state": ("rng/torch", torch.zeros(3), "'rng'"),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_checkpoint_fields_are_one_error_naming_the_file(saved, tmp_path, case):
    where, value, field = HOSTILE[case]
    payload = torch.load(saved, weights_only=True)
    _edit(payload, where, value)
    path = tmp_path / "run" / "checkpoints" / saved.name
    path.parent.mkdir(parents=True)
    torch.save(payload, path)
    _expect_refused(path, field)


HOSTILE_VALUES = (-1, 0, 2**70, 2.5, float("nan"), None, "x", True, [], {}, [[[]]],
                  torch.zeros(1).expand(2**40), torch.ones(2, 2))  # fmt: skip


def _leaf_paths(value, prefix=""):
    if isinstance(value, dict):
        for k, v in value.items():
            yield from _leaf_paths(v, f"{prefix}{k}/")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from _leaf_paths(v, f"{prefix}{i}/")
    else:
        yield prefix.rstrip("/")


def test_fuzzed_checkpoints_resume_or_fail_cleanly(saved, tmp_path):
    path = tmp_path / "run" / "checkpoints" / saved.name
    path.parent.mkdir(parents=True)
    good = torch.load(saved, weights_only=True)
    leaves = [p for p in _leaf_paths(good) if not p.startswith("rng/numpy/1")]
    rng = random.Random(22)
    outcome = {"resumed": 0, "refused": 0}

    def check():
        with AllocationGuard(path.stat().st_size + MIB):
            try:
                _resume(path)
                outcome["resumed"] += 1
            except ckpt.CheckpointError as exc:
                outcome["refused"] += 1
                assert str(path) in str(exc) or "--resume: " in str(exc), str(exc)

    for _ in range(80):  # the payload's values
        payload = copy.deepcopy(good)
        for where in rng.sample(leaves, rng.randint(1, 2)):
            _edit(payload, where, rng.choice(HOSTILE_VALUES))
        torch.save(payload, path)
        check()
    for in_place in (False, True):  # the file's bytes
        for data in mutants(saved.read_bytes(), count=60, seed=22, in_place=in_place):
            path.write_bytes(data)
            check()
    assert outcome["resumed"] > 5 and outcome["refused"] > 100, outcome


# -- YAML --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "text, message",
    [
        ("lr: 1e-3\nepochs: 3\nlr: 1e-2\n", "option 'lr' is given twice (lines 1 and 3)"),
        ("warmup-epochs: 1\nwarmup_epochs: 2\n", "--warmup-epochs is given twice"),
        ("lr: " + "[" * 20000 + "]" * 20000 + "\n", "nested too deeply"),
    ],
)
def test_yaml_given_twice_or_nested_too_deeply_is_refused(tmp_path, text, message):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError) as info:
        load_config(["--config", str(path)])
    assert str(path) in str(info.value) and message in str(info.value), str(info.value)


VALID_YAML = """\
model: vit_tiny_patch16_224
method: dtl+
dataset: folder
data-root: /data/toy
img_size: 32
epochs: 3
batch-size: 4
lr: 1e-2
warmup_epochs: 1
cache-max-bytes: 6GiB
progress: false
"""


def test_fuzzed_yaml_configs_load_or_fail_cleanly(tmp_path):
    path = tmp_path / "run.yaml"
    outcome = {"loaded": 0, "refused": 0}
    for data in mutants(VALID_YAML.encode(), count=300, seed=22, max_edits=2):
        path.write_bytes(data)
        try:
            load_config(["--config", str(path)])
            outcome["loaded"] += 1
        except (ValueError, OSError) as exc:
            assert str(path) in str(exc) or "--" in str(exc), str(exc)  # the file or option
            outcome["refused"] += 1
    assert outcome["loaded"] > 10 and outcome["refused"] > 100, outcome
