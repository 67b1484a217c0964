"""``dtl-train --fsdp`` (issue 21, item 5): the frozen backbone's blocks sharded with FSDP2
over two CPU processes (gloo) train as one process with the same global batch does."""

from __future__ import annotations

import contextlib
import json

import pytest
import torch
from safetensors import safe_open
from train_cli import train_cli

from dtl_kernels.train import make_config, run


def fsdp_unavailable() -> str | None:
    """Why this PyTorch cannot run FSDP2 here (``None``: it can)."""
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as exc:
        return f"torch {torch.__version__} has no FSDP2 fully_shard ({exc})"
    if not torch.distributed.is_gloo_available():
        return f"torch {torch.__version__} has no gloo backend for CPU processes"
    return None


def adapter(path) -> tuple[dict, dict]:
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def metrics(run) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(fsdp_unavailable() is not None, reason=str(fsdp_unavailable()))
@pytest.mark.filterwarnings("ignore:.*RANDOM backbone")
def test_fsdp_two_processes_match_one(toy, tmp_path):
    """Two epochs of two steps, tiny ViT with the DTL+ side network and checkpoint_tail
    (the sharded tail blocks recompute in backward): the same losses as one process within
    float tolerance, and the same adapter (tensors and the frozen weights' fingerprint)."""
    options = dict(
        model="vit_tiny_patch16_224", pretrained="none", method="dtl+", img_size=32,
        adapt_from=10, checkpoint_tail=True, dataset="folder", data_root=str(toy), epochs=2,
        batch_size=8, lr=1e-2, progress=False,
    )  # fmt: skip
    run(make_config({**options, "output": str(tmp_path / "one")}))  # one process, here
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in options.items() if k != "progress"]
    flags = [f for f in flags if f != "--checkpoint-tail=True"] + ["--checkpoint-tail"]
    two = train_cli([*flags, "--no-progress", "--fsdp", "--output", str(tmp_path / "two")],
                    nproc=2)  # fmt: skip
    assert "sharded over 2 processes (FSDP2)" in two.stderr + two.stdout
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["world_size"] == 2
    for a, b in zip(metrics(tmp_path / "one"), metrics(tmp_path / "two"), strict=True):
        for key in ("train_loss", "test_loss", "test_acc"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
    (ta, ma), (tb, mb) = (adapter(tmp_path / r / "adapter.safetensors") for r in ("one", "two"))
    assert ta.keys() == tb.keys() and ma["backbone_sha256"] == mb["backbone_sha256"]
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-5, msg=k)


def test_fsdp_refuses_what_it_cannot_shard():
    with pytest.raises(ValueError, match="--fsdp shards the frozen backbone"):
        make_config({"method": "full", "fsdp": True})
    with pytest.raises(ValueError, match="trunk cache is built by one process"):
        make_config({"fsdp": True, "cache_trunk": "disk"})


def test_evaluation_runs_as_many_forwards_on_every_rank():
    """Sharded blocks gather their weights in every forward (a collective): a rank whose
    evaluation shard has fewer batches runs extra forwards, whose outputs are not counted."""
    from types import SimpleNamespace

    from dtl_kernels.train.step import evaluate

    data = torch.utils.data.TensorDataset(torch.randn(5, 3), torch.zeros(5, dtype=torch.long))
    calls = []

    def net(x):
        calls.append(len(x))
        return torch.zeros(len(x), 2)

    net.training, net.eval, net.train = False, lambda: None, lambda was: None
    for rank, forwards in ((0, [2, 1]), (1, [2, 1])):  # shards of 3 and 2 samples, batch 2
        calls.clear()
        d = SimpleNamespace(rank=rank, world=2, device=torch.device("cpu"), lockstep=True,
                            sum=lambda *v: list(v))  # fmt: skip
        loss, acc = evaluate(net, data, 2, d, contextlib.nullcontext, False)
        assert sorted(calls, reverse=True) == forwards and acc == 1.0
