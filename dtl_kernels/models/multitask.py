"""Many DTL tasks on one frozen backbone: the trunk runs once (SPEC §3).

Blocks ``1 … M`` see the same input whatever the task (a task's CSN only adds back
after block ``M``), so ``T`` tasks share them: the trunk runs up to each task's ``M``,
then each task continues on its own tail. Tails of all tasks that have branched are
run as one batch through each frozen block (bigger GEMMs; the frozen weights are read
once), then split again for each task's add-back.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import torch
from torch import nn

from .adapters import adapter_info, read_adapter
from .base import DTLModel
from .build import wrapper_for
from .pretrained import model_from_adapter, restored_if_refused

# A backbone-head task trains the backbone's own classifier, which every task shares.
_OWN_HEAD = (
    "task {name!r} uses head='backbone' (the backbone's own classifier, which all tasks would "
    "share); MultiTaskDTL serves tasks with the published head"
)


class MultiTaskDTL(nn.Module):
    """Serve several fine-tuned DTL tasks on one backbone.

    Args:
        backbone: the frozen timm backbone every task was trained on.
        tasks: name → adapter file (written by :func:`dtl_kernels.save_adapter`) or a ``DTLViT`` /
            ``DTLSwin`` built on this backbone (the same module, or one with identical
            weights).
        batch_tails: run the tails of all branched tasks as one batch per block.

    ``forward(images)`` returns ``{name: logits (batch, num_classes_of_task)}``. Inference
    only: call ``.eval()`` (dropout/drop-path would differ between tasks otherwise).
    Tasks are checked here (same backbone weights, the published head, a side network
    that leaves the trunk): build a new ``MultiTaskDTL`` to add one; a model put into
    ``.tasks`` afterwards is not checked.
    """

    def __init__(
        self,
        backbone: nn.Module,
        tasks: Mapping[str, str | os.PathLike | DTLModel],
        batch_tails: bool = True,
    ) -> None:
        super().__init__()
        if not isinstance(tasks, Mapping):
            raise TypeError(f"tasks must map task names to adapter paths or DTL models, got a "
                            f"{type(tasks).__name__}")  # fmt: skip
        if not tasks:
            raise ValueError("MultiTaskDTL needs at least one task")
        self.backbone = backbone
        walker_cls = wrapper_for(backbone)
        if not isinstance(batch_tails, bool):
            raise TypeError(f"batch_tails must be True or False, got {batch_tails!r:.40}")
        self.batch_tails = batch_tails
        self.tasks = nn.ModuleDict()
        # a task refused after others were loaded leaves the backbone as it was given
        with restored_if_refused(backbone):
            self._add_tasks(tasks, walker_cls)

    def _add_tasks(self, tasks: Mapping, walker_cls: type) -> None:
        for name, task in tasks.items():
            if not isinstance(name, str) or not name or "." in name:  # ModuleDict's key rules
                raise ValueError(f"task names must be non-empty text without '.', got {name!r:.60}")
            if hasattr(self.tasks, name):  # an attribute of the dict itself: 'training', 'keys'
                raise ValueError(f"task name {name!r} is reserved (an attribute of nn.ModuleDict)")
            if isinstance(task, (str, os.PathLike)):
                config = adapter_info(read_adapter(task)[1], task)["config"]
                if config.get("head_mode") != "published":
                    raise ValueError(_OWN_HEAD.format(name=name))
                _check_shares_trunk(name, config.get("method"))  # before it touches backbone
                model = model_from_adapter(task, self.backbone)
            elif isinstance(task, DTLModel):
                model = task
                self._check_same_backbone(name, model)
            else:
                raise TypeError(
                    f"task {name!r}: expected an adapter path or a DTL model, "
                    f"got {type(task).__name__}"
                )
            if model.head_mode != "published":
                raise ValueError(_OWN_HEAD.format(name=name))
            _check_shares_trunk(name, model.method)
            self.tasks[name] = model
            if not isinstance(model, walker_cls):
                raise TypeError(
                    f"task {name!r} is a {type(model).__name__}, not a {walker_cls.__name__}"
                )

    @property
    def _walker(self) -> DTLModel:
        """Any task model can walk the shared backbone (embed / blocks / tokens)."""
        for model in self.tasks.values():
            return model
        raise ValueError("MultiTaskDTL has no task left (all were removed from .tasks)")

    def _check_same_backbone(self, name: str, model: DTLModel) -> None:
        if model.backbone is self.backbone:
            return
        own = {k: v for k, v in self.backbone.state_dict().items() if not k.startswith("head")}
        theirs = {k: v for k, v in model.backbone.state_dict().items() if not k.startswith("head")}
        if own.keys() != theirs.keys():
            diff = sorted(set(own) ^ set(theirs))[:10]
            raise ValueError(f"task {name!r} was built on another backbone (keys differ: {diff})")
        for key, value in theirs.items():
            if value.shape != own[key].shape or not torch.equal(
                value.to(own[key].device), own[key]
            ):
                raise ValueError(
                    f"task {name!r}: backbone weight {key} differs from the shared one"
                )

    def _branch_block(self, model: DTLModel) -> int:
        """0-based index of the block after which the task leaves the trunk."""
        if model.csn is None:
            return len(self._walker.blocks)  # linear probe: never leaves
        return model.csn.config.adapt_from - 1

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        walker = self._walker
        blocks = walker.blocks
        x, ctx = walker.embed(walker.backbone_images(images))  # its dtype (backbone_dtype)
        batch = images.shape[0]
        states = {n: m.csn.start() for n, m in self.tasks.items() if m.csn is not None}
        branch_at = {n: self._branch_block(m) for n, m in self.tasks.items()}
        tails: dict[str, torch.Tensor] = {}
        for i in range(len(blocks)):
            running = [n for n in tails]  # tasks that left the trunk before block i
            on_trunk = [n for n in self.tasks if branch_at[n] >= i]
            if on_trunk:
                x = walker.block_input(i, x)
                for n in on_trunk:
                    self._tap(n, i, x, ctx, states)
                y = walker.call_block(blocks[i], i, x, ctx)
                for n in on_trunk:
                    if branch_at[n] == i:
                        tails[n] = self._add_back(n, i, y, ctx, states)
                x = y
            if running:
                inputs = [walker.block_input(i, tails[n]) for n in running]
                for n, xin in zip(running, inputs, strict=False):
                    self._tap(n, i, xin, ctx, states)
                if self.batch_tails and len(running) > 1:
                    outputs = walker.call_block(blocks[i], i, torch.cat(inputs), ctx).split(batch)
                else:
                    outputs = [walker.call_block(blocks[i], i, xin, ctx) for xin in inputs]
                for n, y_n in zip(running, outputs, strict=False):
                    tails[n] = self._add_back(n, i, y_n, ctx, states)
        return {n: m.forward_head(tails.get(n, x)) for n, m in self.tasks.items()}

    def _tap(self, name, i, x, ctx, states):
        csn = self.tasks[name].csn
        if csn is not None and csn.is_tapped(i):
            csn.tap(states[name], i, self._walker.tokens(x, ctx)[0])

    def _add_back(self, name, i, y, ctx, states):
        csn = self.tasks[name].csn
        if csn is None or not csn.is_adapted(i):
            return y
        t, grid, num_prefix = self._walker.tokens(y, ctx)
        return self._walker.untokens(csn.add_back(states[name], i, t, grid, num_prefix), y)


def _check_shares_trunk(name: str, method: str | None) -> None:
    """Tasks share one frozen backbone: none may change it."""
    if method == "full":
        raise ValueError(f"task {name!r} fine-tunes the whole backbone: it shares no trunk")
    if method == "lora":
        raise ValueError(
            f"task {name!r} is a LoRA model: its low-rank updates live inside the backbone's "
            "layers, so it cannot share a frozen backbone with other tasks"
        )
