"""``dtl-train --fsdp`` (issue 21, item 5): the frozen backbone sharded over the ``torchrun``
processes with PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``), for backbones whose
weights do not fit one device.

Every frozen block of the model's walk is one FSDP unit: each process keeps ``1/world`` of
its weights, gathers them for the block's forward (and for its backward, or the recompute
of ``--checkpoint-tail``) and frees them after. Everything else — the CSN, the head and the
backbone's small parts outside the blocks (patch embedding, position embedding, norms) — is
replicated, as under DDP: rank 0's values are broadcast once, and the trainable gradients are
averaged over the processes once per optimiser step (:meth:`ReplicatedGradients.sync_gradients`,
one all-reduce of them flattened), so a run matches one process with the same global batch.

What sharding asks of the rest of the run: every process runs every sharded forward (the
blocks' all-gathers are collectives), so evaluation pads the shorter shards with repeated
batches (:attr:`Dist.lockstep`), and the trunk cache (built by one process) is off. The
adapter's fingerprint of the frozen weights is taken before they are sharded.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..memory import CheckpointedBlock
from .dist import Dist

# what --fsdp shards: a frozen backbone (the baselines that train it are refused)
METHODS = ("dtl", "dtl+", "dtl+*", "linear")


def frozen_blocks(model: nn.Module) -> list[nn.Module]:
    """The backbone blocks of ``model``'s walk (unwrapped from ``checkpoint_tail``), every
    one frozen (``ValueError`` naming one that trains)."""
    blocks = [b.block if isinstance(b, CheckpointedBlock) else b for b in model.blocks]
    for i, block in enumerate(blocks):
        if any(p.requires_grad for p in block.parameters()):
            raise ValueError(f"--fsdp shards frozen blocks; block {i + 1} has trainable weights")
    return blocks


def shard(model: nn.Module, d: Dist) -> nn.Module:
    """Shard ``model``'s frozen blocks over the processes of ``d`` on ``d.device`` (each
    block is moved there as it is sharded, so no device ever holds the whole backbone) and
    move the rest there; rank 0's replicated tensors are broadcast. Returns ``model``."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    fingerprint = model.backbone_fingerprint()  # from the whole weights, before sharding
    model.backbone_fingerprint = lambda: fingerprint  # (an instance attribute: frozen)
    mesh = init_device_mesh(d.device.type, (d.world,))
    blocks = frozen_blocks(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=True)
    inside = {id(m) for b in blocks for m in b.modules()}
    for module in model.modules():
        if id(module) not in inside:
            module._apply(lambda t: t.to(d.device), recurse=False)
    with torch.no_grad():
        for module in model.modules():
            if id(module) in inside:
                continue
            for t in (*module.parameters(recurse=False), *module.buffers(recurse=False)):
                dist.broadcast(t.data, src=0)
    d.lockstep = True
    return model


class ReplicatedGradients(nn.Module):
    """``model`` (its frozen blocks sharded by :func:`shard`) as the training loop calls
    it: the forward, and :meth:`sync_gradients` once per optimiser step (where DDP would
    have averaged the replicated trainable gradients during the last backward)."""

    def __init__(self, model: nn.Module, d: Dist):
        super().__init__()
        self.module = model
        self._world = d.world

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.module(images)

    def sync_gradients(self) -> None:
        """Average the trainable gradients over the processes (one all-reduce). Every
        process ran the same graph, so the same parameters have gradients on each; one
        without a gradient keeps none, as in a single process."""
        params = [p for p in self.module.parameters() if p.requires_grad and p.grad is not None]
        if not params:
            return
        grads = [p.grad for p in params]
        flat = torch.cat([g.reshape(-1).to(torch.float32) for g in grads])
        dist.all_reduce(flat)
        flat /= self._world
        offset = 0
        for p, g in zip(params, grads, strict=True):
            n = g.numel()
            p.grad = flat[offset : offset + n].view_as(g).to(g.dtype)
            offset += n
