"""DTL / DTL+ around a staged CNN: timm ``EfficientNet`` (EfficientNet, -Lite, MixNet…),
``ResNet`` (ResNet, ResNeXt, SE-ResNet…) and ``ConvNeXt``.

SPEC §1 "Other staged backbones": the low-rank maps act on channels, so a feature map
``(batch, C, H, W)`` is handed to the CSN channels-last as ``(batch, H·W, C)`` tokens on
the ``(H, W)`` grid with no prefix tokens; ``h`` restarts at every stage (timm's
``blocks[s]`` is stage ``s``) and DTL+ uses one depthwise conv per stage, like Swin.

Only *shape-preserving* blocks are tapped or adapted. A block whose output shape differs
from its input shape (a stride or a channel change — in EfficientNet the first block of
most stages) has no ``A``/``B`` and no add-back: ``h_i`` there would live in another
space than the block's output. The tappable blocks are found once, at construction, by
running the frozen stem and blocks on a small dummy image and comparing shapes.

Block numbers (``tap_from``, ``adapt_from``) are global and 1-based over all blocks of
all stages, tappable or not (EfficientNet-Lite0: 16 blocks in 7 stages, 9 tappable). A
ConvNeXt stage's downsampling layer counts as that stage's first (never tappable) block.

What differs between the families — the stem, the stages' blocks, the frozen layers
between the last block and the pooling, the pooled features of the published head and the
name of the backbone's classifier — is one :class:`Layout` each; everything else is shared.

The frozen backbone's BatchNorm layers stay in eval mode (running statistics, no update)
whenever the backbone is frozen, even under ``model.train()``: freezing a CNN means
freezing its normalisation statistics too. ``method="full"`` trains them as usual.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from .base import DTLModel, _architecture, shared_options

#: Side of the dummy image used to find shape-changing blocks (large enough that every
#: stride-2 block still halves a map bigger than 1×1).
_PROBE_SIZE = 64


@dataclass(frozen=True)
class Layout:
    """Where a CNN family keeps its parts (``bb`` is the timm backbone)."""

    family: str
    stem: Callable  # (bb, images) → the first block's input
    stages: Callable  # bb → [[block, …] per stage]
    finish: Callable  # (bb, x) → frozen layers after the last block, before pooling
    pooled: Callable  # (bb, x) → pooled features (batch, num_features) for a new head
    in_channels: Callable  # bb → image channels
    classifier: str  # prefix of the backbone's own classifier (head="backbone")


def _conv_in(module: nn.Module) -> int:
    conv = next(m for m in module.modules() if isinstance(m, nn.Conv2d))
    return conv.in_channels


# named functions, not lambdas: a wrapped model stays picklable
def _effnet_stem(bb, x):
    return bb.bn1(bb.conv_stem(x))


def _effnet_stages(bb):
    return [list(stage) for stage in bb.blocks]


def _effnet_finish(bb, x):
    return bb.bn2(bb.conv_head(x))


def _global_pool(bb, x):
    return bb.global_pool(x)


def _resnet_stem(bb, x):
    return bb.maxpool(bb.act1(bb.bn1(bb.conv1(x))))


def _resnet_stages(bb):
    return [list(getattr(bb, f"layer{i}")) for i in range(1, 5)]


def _unchanged(bb, x):
    return x


def _convnext_stages(bb):
    return [
        [m for m in (stage.downsample, *stage.blocks) if not isinstance(m, nn.Identity)]
        for stage in bb.stages
    ]


def _convnext_finish(bb, x):
    return bb.norm_pre(x)


def _convnext_pooled(bb, x):
    head = bb.head  # NormMlpClassifierHead: pool → the pretrained norm → flatten
    return head.flatten(head.norm(head.global_pool(x)))


def _effnet_in(bb):
    return bb.conv_stem.in_channels


def _resnet_in(bb):
    return _conv_in(bb.conv1)


def _convnext_stem(bb, x):
    return bb.stem(x)


def _convnext_in(bb):
    return _conv_in(bb.stem)


LAYOUTS = {
    "efficientnet": Layout(
        "efficientnet", _effnet_stem, _effnet_stages, _effnet_finish, _global_pool, _effnet_in,
        "classifier.",
    ),
    "resnet": Layout(
        "resnet", _resnet_stem, _resnet_stages, _unchanged, _global_pool, _resnet_in, "fc."
    ),
    "convnext": Layout(
        "convnext", _convnext_stem, _convnext_stages, _convnext_finish, _convnext_pooled,
        _convnext_in, "head.fc.",
    ),
}  # fmt: skip


def layout_of(backbone: nn.Module) -> Layout | None:
    """The :class:`Layout` of a timm CNN this wrapper takes (``None``: not one of them)."""
    from timm.models.convnext import ConvNeXt
    from timm.models.efficientnet import EfficientNet
    from timm.models.resnet import ResNet

    for cls, family in ((EfficientNet, "efficientnet"), (ResNet, "resnet"), (ConvNeXt, "convnext")):
        if isinstance(backbone, cls):
            return LAYOUTS[family]
    return None


def default_convnet_blocks(depths: list[int], tappable: list[bool]) -> tuple[int, int]:
    """``(tap_from, adapt_from)`` (1-based) for a staged CNN.

    Both start at the first block of the middle stage (``len(depths) // 2``, 0-based), or
    of the next stage that has a tappable block: taps in stages without add-backs would
    be dropped at the stage boundary unused. EfficientNet-Lite0 (depths 1,2,2,3,3,4,1):
    block 6, i.e. stages 3, 4 and 5 adapted (7 tappable blocks).
    """
    starts = [sum(depths[:s]) for s in range(len(depths))]
    for s in range(len(depths) // 2, len(depths)):
        if any(tappable[starts[s] : starts[s] + depths[s]]):
            return starts[s] + 1, starts[s] + 1
    first = tappable.index(True) + 1  # fewer stages than usual: take any tappable block
    return first, first


class DTLConvNet(DTLModel):
    """A frozen timm CNN (EfficientNet, ResNet or ConvNeXt family) with a per-stage Compact
    Side Network.

    Args:
        backbone: a timm ``EfficientNet`` (``tf_efficientnet_lite0``, ``efficientnet_b0``…),
            ``ResNet`` (``resnet50``, ``resnext50_32x4d``…) or ``ConvNeXt`` (``convnext_tiny``…).
        rank: ``r`` of every tap (default 4, as the published Swin).
        beta: β of θ.
        adapt_from: 1-based ``M`` over all blocks (global numbering); default
            :func:`default_convnet_blocks`. Only shape-preserving blocks from ``M`` on
            get an add-back.
        tap_from: first tapped block (1-based, global); default as ``adapt_from``.
        conv_kernel: ``k`` of the per-stage depthwise conv (DTL+); 0 = DTL.
        num_classes: classes of the new head (default: the backbone's).
        head: ``"published"`` (the frozen layers after the last block — EfficientNet's
            ``conv_head`` + ``bn2``, ConvNeXt's ``norm_pre`` and head norm — → average pool
            → new Linear) or ``"backbone"`` (the backbone's own pooling and classifier,
            trained).
        side, train_backbone: as :class:`DTLViT` (``False`` / ``True`` give the linear
            probe / full fine-tuning baselines).

    Input: ``(batch, in_chans, H, W)`` float images. Output: ``(batch, num_classes)``.
    """

    per_stage_convs = True

    def __init__(
        self,
        backbone: nn.Module,
        rank: int = 4,
        beta: float = 100.0,
        adapt_from: int | None = None,
        tap_from: int | None = None,
        conv_kernel: int = 0,
        num_classes: int | None = None,
        head: str = "published",
        side: bool = True,
        train_backbone: bool = False,
    ) -> None:
        super().__init__()
        layout = layout_of(backbone)
        if layout is None:
            raise TypeError(
                f"DTLConvNet needs a timm EfficientNet, ResNet or ConvNeXt, got "
                f"{type(backbone).__name__}; use dtl_kernels.create_model(name) to pick the wrapper"
            )
        self.layout = layout
        self.train_backbone = bool(train_backbone)
        stages = layout.stages(backbone)
        self.depths = [len(stage) for stage in stages]
        self._blocks = [block for stage in stages for block in stage]
        widths, self.tappable = _probe_blocks(backbone, layout, self._blocks)
        self.csn_widths = widths
        self._set_up(
            backbone,
            head_width=backbone.num_features,
            widths=widths,
            stages=[s for s, n in enumerate(self.depths) for _ in range(n)],
            tappable=self.tappable,
            default_blocks=default_convnet_blocks(self.depths, self.tappable),
            **shared_options(locals()),
        )
        self.train(self.training)

    def train(self, mode: bool = True) -> DTLConvNet:
        """As ``nn.Module.train``, but a frozen backbone's BatchNorm stays in eval mode."""
        super().train(mode)
        if mode and not self.train_backbone:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    @property
    def backbone_classifier(self) -> str:
        return self.layout.classifier

    # -- the block walk (see DTLModel.run_blocks) ----------------------------------------
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``(batch, 3, H, W)`` → the stem's feature map ``(batch, C, H', W')``."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError("images must be a (batch, channels, H, W) tensor")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point, got {images.dtype}")
        channels = self.layout.in_channels(self.backbone)
        if images.shape[1] != channels:
            raise ValueError(
                f"images have {images.shape[1]} channels, the backbone expects {channels}"
            )
        return self.layout.stem(self.backbone, images), {}

    @property
    def blocks(self) -> list[nn.Module]:
        return self._blocks

    def tokens(self, x: torch.Tensor, ctx: dict):
        """``(batch, C, H, W)`` → channels-last tokens ``(batch, H·W, C)``, grid ``(H, W)``."""
        b, c, h, w = x.shape
        return x.permute(0, 2, 3, 1).reshape(b, h * w, c), (h, w), 0

    def untokens(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """Tokens back to ``like``'s shape and memory format (an add-back never changes
        the backbone's layout: NCHW stays NCHW, channels-last stays channels-last)."""
        b, c, h, w = like.shape
        y = t.reshape(b, h, w, c).permute(0, 3, 1, 2)
        channels_last = like.is_contiguous(memory_format=torch.channels_last)
        if channels_last and not like.is_contiguous():
            return y.contiguous(memory_format=torch.channels_last)
        return y.contiguous()

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        """Features after the last block → the frozen layers before pooling → pool → head."""
        bb = self.backbone
        x = self.layout.finish(bb, x)
        if self.head_mode == "published":
            return self.head(self.layout.pooled(bb, x))
        return bb.forward_head(x)

    def backbone_identity(self) -> dict:
        bb = self.backbone
        return {
            "family": "convnet",
            "architecture": _architecture(bb),
            "depths": self.depths,
            "tappable": [i for i, t in enumerate(self.tappable) if t],
            "stem_channels": self.csn_widths[0] if self.csn_widths else None,
            "num_features": bb.num_features,
        }


def _probe_blocks(
    backbone: nn.Module, layout: Layout, blocks: list[nn.Module]
) -> tuple[list[int], list[bool]]:
    """Input channels of every block and whether it preserves the feature shape.

    Runs the stem and the blocks once on a dummy ``_PROBE_SIZE`` image, in eval mode and
    without autograd (the backbone's modes are restored afterwards).
    """
    modes = {m: m.training for m in backbone.modules()}
    param = next(backbone.parameters())
    x = torch.zeros(1, layout.in_channels(backbone), _PROBE_SIZE, _PROBE_SIZE, dtype=param.dtype)
    widths, tappable = [], []
    try:
        backbone.eval()
        with torch.no_grad():
            x = layout.stem(backbone, x.to(param.device))
            for block in blocks:
                y = block(x)
                widths.append(int(x.shape[1]))
                tappable.append(tuple(y.shape) == tuple(x.shape))
                x = y
    finally:
        for m, mode in modes.items():
            m.training = mode
    if not any(tappable):
        raise ValueError("no block of this backbone preserves its feature shape: nothing to tap")
    return widths, tappable
