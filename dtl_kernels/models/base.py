"""What every DTL model wrapper shares. :class:`DTLModel` holds the wrappers' common
set-up (CSN, head, freezing), parameter accounting and timm's model conventions
(``pretrained_cfg``, ``get_classifier`` / ``reset_classifier``) here, and takes the rest
from one module per concern: the block walk (:mod:`.walk`), published checkpoint names
(:mod:`.published`) and the adapter in memory (:mod:`.adapter_state`). Wrappers (ViT,
Swin, CNN, Hugging Face) only say how to walk their backbone; they hold no kernel math
(that is in :mod:`dtl_kernels.ops`) and know nothing of files (adapter files, backbone
checkpoints and the factory are above them)."""

from __future__ import annotations

import torch
from torch import nn

from .. import memory
from ..csn import CompactSideNetwork, CSNConfig
from .adapter_state import AdapterState
from .choices import HEAD_MODES, LIMITS
from .published import PublishedCheckpoint
from .walk import BlockWalk

# The constructor arguments every wrapper passes on to DTLModel._set_up unchanged.
SHARED_OPTIONS = ("head", "num_classes", "side", "train_backbone", "rank", "beta", "tap_from",
                  "adapt_from", "conv_kernel", "trunk_dtype", "checkpoint_tail")  # fmt: skip


def shared_options(arguments: dict) -> dict:
    """The :data:`SHARED_OPTIONS` among a wrapper constructor's ``locals()``."""
    return {k: arguments[k] for k in SHARED_OPTIONS if k in arguments}


class DTLModel(BlockWalk, PublishedCheckpoint, AdapterState, nn.Module):
    """Base of :class:`DTLViT`, :class:`DTLSwin` and the CNN wrapper.

    Subclasses describe their backbone's walk (see :class:`.walk.BlockWalk`), call
    :meth:`_set_up` once in their constructor and implement :meth:`forward_head` and
    :meth:`backbone_identity`.

    Besides its weights a model carries what predicting with it needs (plain attributes,
    written into adapter files by :func:`dtl_kernels.save_adapter`):

    * ``pretrained_cfg`` — timm's data config of the input (``input_size``,
      ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``, ``std``…): the backbone's
      own, with its real input size, so ``timm.data.resolve_model_data_config(model)``
      works; the trainer overwrites it with the preprocessing it trained with.
    * ``class_names`` — the head's classes in label order, or ``None``.
    * ``origin`` — how to build the backbone again (``{"library", "name", "options",
      "pretrained"}``; set by :func:`dtl_kernels.create_model`), or ``None``.
    """

    #: ViT has one shared conv (``lora_fusion``); staged backbones one per stage.
    per_stage_convs = False

    def __init__(self) -> None:
        super().__init__()
        self.csn: CompactSideNetwork | None = None
        self.head_mode = "published"
        self.method = "dtl"
        self.backbone_dtype: torch.dtype | None = None  # memory.set_backbone_dtype
        self._new_head = True  # a head of ours (else the backbone's own classifier trains)
        self._trained_backbone_parts: tuple[str, ...] = ()
        self._head_width = 0
        self.pretrained_cfg: dict = {}
        self.class_names: list[str] | None = None
        self.origin: dict | None = None

    def _set_up(
        self,
        backbone: nn.Module,
        *,
        head: str,
        num_classes: int | None,
        head_width: int,
        side: bool,
        train_backbone: bool,
        widths: list[int],
        stages: list[int],
        rank: int,
        beta: float,
        tap_from: int | None,
        adapt_from: int | None,
        conv_kernel: int,
        default_blocks: tuple[int, int] | None = None,
        tappable: list[bool] | None = None,
        trunk_dtype: torch.dtype | str | None = None,
        checkpoint_tail: bool = False,
        trainable_backbone_prefixes: tuple[str, ...] = (),
    ) -> None:
        """The constructor part every wrapper shares: attach ``backbone``, build the CSN
        (when ``side``), the head (per ``head``) and freeze the backbone.

        Args:
            head_width: input width of a new (published) head.
            widths, stages, tappable: every block's input width, its stage and whether it
                can be tapped (``None``: all), as :class:`CompactSideNetwork` takes them.
            rank, beta, tap_from, adapt_from, conv_kernel: the CSN's configuration; a
                ``tap_from`` / ``adapt_from`` of ``None`` takes ``default_blocks``.
            trunk_dtype, checkpoint_tail: the memory options (:mod:`dtl_kernels.memory`).
            trainable_backbone_prefixes: backbone parts trained with the head (SigLIP's
                attention pooling under ``head="backbone"``).

        A backbone without a classifier of its own (no ``reset_classifier``: Hugging Face
        encoders) always gets a new head; ``num_classes`` must then be given.
        """
        for name, flag in (("side", side), ("train_backbone", train_backbone),
                           ("checkpoint_tail", checkpoint_tail)):  # fmt: skip
            if not isinstance(flag, bool):  # a truthy "no" or -1 would switch it on
                raise TypeError(f"{name} must be True or False, got {flag!r:.40}")
        self.backbone = backbone
        self.head_mode = validate_head_mode(head)
        own = callable(getattr(backbone, "reset_classifier", None))
        if num_classes is None and not own:
            raise ValueError(f"{type(backbone).__name__} has no classifier: give num_classes")
        if num_classes is not None and (
            isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0
        ):  # 0 is timm's "features, no head"; a negative count is a mistake, not that
            raise ValueError(f"num_classes must be a whole number ≥ 0, got {num_classes!r}")
        if num_classes is not None and num_classes > LIMITS["num_classes"]:
            raise ValueError(f"num_classes must be ≤ {LIMITS['num_classes']}, got {num_classes}")
        self.num_classes = backbone.num_classes if num_classes is None else int(num_classes)
        if default_blocks is not None:
            tap_from = default_blocks[0] if tap_from is None else tap_from
            adapt_from = default_blocks[1] if adapt_from is None else adapt_from
        if side:
            config = csn_config(rank, beta, tap_from, adapt_from, conv_kernel)
            self.csn = CompactSideNetwork(widths, stages, config, tappable)
        self.method = _method_name(side, train_backbone, self.csn)
        self._tail = []  # checkpointed wrappers of the tail blocks (memory option)
        self._tail = memory.checkpointed_tail(self, checkpoint_tail)
        if self.csn is not None:
            self.csn.trunk_dtype = memory.resolve_trunk_dtype(trunk_dtype)
        self._new_head = self.head_mode == "published" or not own
        self._trained_backbone_parts = tuple(trainable_backbone_prefixes)
        self._head_width = head_width
        self.pretrained_cfg = {
            **(getattr(backbone, "pretrained_cfg", None) or {}),
            "input_size": self.native_input_size(),
        }
        if self._new_head:
            if own and backbone.num_classes:
                backbone.reset_classifier(0)  # the published head replaces it
            self.head = new_head(head_width, self.num_classes)
            self._freeze(train_backbone, self._trained_backbone_parts)
        else:
            if backbone.num_classes != self.num_classes:
                backbone.reset_classifier(self.num_classes)
            self._freeze(train_backbone, (self.backbone_classifier,))

    @property
    def backbone_classifier(self) -> str:
        """Prefix of the backbone's own classifier in ``backbone`` (``head="backbone"``)."""
        return "head."

    # -- timm's model conventions -------------------------------------------------------
    def input_channels(self) -> int | None:
        """Channels of the images the backbone takes: its first convolution's (the patch
        embedding or a CNN's stem); ``None`` without one. (timm's ``pretrained_cfg`` says 3
        whatever ``in_chans`` is.)"""
        first = next((m for m in self.backbone.modules() if isinstance(m, nn.Conv2d)), None)
        return None if first is None else first.in_channels

    def native_input_size(self) -> tuple[int, int, int]:
        """``(channels, H, W)`` the backbone is built for: a patch embedding's fixed image
        size, else the input size of its timm pretrained config (224 px when none)."""
        size = getattr(getattr(self.backbone, "patch_embed", None), "img_size", None)
        cfg = getattr(self.backbone, "pretrained_cfg", None) or {}
        channels = int((cfg.get("input_size") or (3,))[0])
        if size is not None:
            return (channels, int(size[0]), int(size[1]))
        return tuple(int(v) for v in (cfg.get("input_size") or (3, 224, 224)))

    @property
    def default_cfg(self) -> dict:
        """timm's older name of :attr:`pretrained_cfg`."""
        return self.pretrained_cfg

    def get_classifier(self) -> nn.Module:
        """The classifier that trains: the new head, or the backbone's own
        (``head="backbone"``), as timm's ``get_classifier``."""
        return self.head if self._new_head else self.backbone.get_classifier()

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new, trainable classifier for ``num_classes`` (``0``: pooled features), as
        timm's ``reset_classifier``; ``class_names`` are dropped when their count differs.
        ``global_pool`` only applies to the backbone's own head (``head="backbone"``)."""
        if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
            raise ValueError(f"num_classes must be a whole number ≥ 0, got {num_classes!r}")
        old = self.get_classifier()
        ref = next(iter(old.parameters()), None)
        if self._new_head:
            if global_pool is not None:
                raise ValueError("the published head pools tokens its own way: no global_pool")
            self.head = new_head(self._head_width, num_classes)
            if ref is not None:
                self.head.to(device=ref.device, dtype=ref.dtype)
        else:
            args = (num_classes,) if global_pool is None else (num_classes, global_pool)
            self.backbone.reset_classifier(*args)
            for p in self.backbone.get_classifier().parameters():
                p.requires_grad_(True)
        self.num_classes = num_classes
        if self.class_names is not None and len(self.class_names) != num_classes:
            self.class_names = None

    def backbone_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in the frozen backbone's dtype (unchanged unless ``backbone_dtype``)."""
        if self.backbone_dtype is not None and images.is_floating_point():
            return images.to(self.backbone_dtype)
        return images

    # -- freezing and accounting ------------------------------------------------------
    def _freeze(self, train_backbone: bool, trainable_backbone_prefixes: tuple[str, ...] = ()):
        """Freeze the backbone except ``trainable_backbone_prefixes`` (its own head when
        ``head="backbone"``); everything outside the backbone stays trainable."""
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(train_backbone or name.startswith(trainable_backbone_prefixes))

    def _head_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """The trained head's parameters: the new one, or the backbone's own classifier."""
        if self._new_head:
            prefix = ("head.",) + tuple(f"backbone.{p}" for p in self._trained_backbone_parts)
        else:
            prefix = (f"backbone.{self.backbone_classifier}",)
        return [(n, p) for n, p in self.named_parameters() if n.startswith(prefix)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should see (CSN + head, or more for baselines)."""
        return [p for p in self.parameters() if p.requires_grad]

    def num_parameters(self, trainable_only: bool = False) -> int:
        params = self.trainable_parameters() if trainable_only else list(self.parameters())
        return sum(p.numel() for p in params)

    def summary(self) -> str:
        """One line: method, trainable and total parameter counts and their ratio."""
        trainable, total = self.num_parameters(True), self.num_parameters()
        cfg = self.csn.config if self.csn is not None else None
        side = (
            f"rank={cfg.rank} adapt_from={cfg.adapt_from} tap_from={cfg.tap_from} "
            f"conv_kernel={cfg.conv_kernel} beta={cfg.beta}"
            if cfg
            else "no side network"
        )
        return (
            f"{type(self).__name__} [{self.method}; {side}; head={self.head_mode}]: "
            f"{trainable:,} trainable / {total:,} total parameters "
            f"({100.0 * trainable / max(total, 1):.3f}%)"
        )

    def print_summary(self) -> None:
        print(self.summary())

    # -- validation ----------------------------------------------------------------------
    @torch.no_grad()
    def side_grids(self, images: torch.Tensor) -> list[tuple[int, int]]:
        """The token grid ``(H, W)`` after each adapted block for ``images``: what DTL+'s
        convolution runs on. The frozen blocks run once in eval mode, without the side
        network (so a huge ``conv_kernel`` costs nothing here)."""
        if self.csn is None:
            return []
        was = self.training
        self.eval()
        try:
            x, ctx = self.embed(self.backbone_images(images))
            grids = []
            for i, block in enumerate(self.blocks):
                x = self.call_block(block, i, self.block_input(i, x), ctx)
                if self.csn.is_adapted(i):
                    grids.append(tuple(self.tokens(x, ctx)[1]))
        finally:
            self.train(was)
        return grids

    # -- identity ------------------------------------------------------------------------
    def backbone_identity(self) -> dict:
        raise NotImplementedError


def validate_head_mode(head: str) -> str:
    if head not in HEAD_MODES:
        raise ValueError(f"head must be one of {HEAD_MODES}, got {head!r}")
    return head


def new_head(width: int, num_classes: int) -> nn.Module:
    """Published head: Linear with trunc-normal(std 0.02) weight and zero bias."""
    if num_classes <= 0:
        return nn.Identity()
    head = nn.Linear(width, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


def csn_config(rank, beta, tap_from, adapt_from, conv_kernel) -> CSNConfig:
    for name, value in (("rank", rank), ("conv_kernel", conv_kernel)):  # before allocating
        if isinstance(value, int) and value > LIMITS[name]:
            raise ValueError(f"{name} must be ≤ {LIMITS[name]}, got {value}")
    return CSNConfig(
        rank=rank,
        beta=float(beta) if isinstance(beta, int) and not isinstance(beta, bool) else beta,
        tap_from=tap_from,
        adapt_from=adapt_from,
        conv_kernel=conv_kernel,
    )


def _architecture(backbone: nn.Module) -> str:
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(backbone).__name__


def _method_name(side: bool, train_backbone: bool, csn: CompactSideNetwork | None) -> str:
    if not side:
        return "full" if train_backbone else "linear"
    c = csn.config
    if c.conv_kernel == 0:
        return "dtl"
    return "dtl+*" if c.adapt_from == 1 else "dtl+"
