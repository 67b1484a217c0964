"""DTL / DTL+ around a timm ``SwinTransformer`` or ``SwinTransformerV2`` (hierarchical: ``h``
restarts per stage). Both keep the same layout — patch merging at the start of each stage,
``(batch, H, W, C)`` maps, a final norm — so one wrapper walks both; V2's post-norm blocks
and scaled cosine attention stay inside the blocks."""

from __future__ import annotations

import re

import torch
from torch import nn

from .. import memory
from .base import DTLModel, _architecture, shared_options

# Published Swin-B (depths 2,2,18,2): taps on blocks 5…24, add-back after 15…24.
_PUBLISHED_ADAPTED_FRACTION = 10 / 24


def default_swin_blocks(depths: list[int]) -> tuple[int, int]:
    """``(tap_from, adapt_from)`` (1-based) for any Swin depths.

    Taps start at the first block of the third stage (or the first block when there are
    fewer than three stages); the last ``round(10/24 · N)`` blocks are adapted (at least
    one, never before the first tap). For Swin-B this gives the published ``(5, 15)``.
    """
    n = sum(depths)
    tap_from = sum(depths[:2]) + 1 if len(depths) >= 3 else 1
    adapted = max(1, round(_PUBLISHED_ADAPTED_FRACTION * n))
    return tap_from, max(tap_from, n - adapted + 1)


def _swin_types() -> tuple[type, ...]:
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    return SwinTransformer, SwinTransformerV2


class DTLSwin(DTLModel):
    """A frozen timm Swin Transformer with a per-stage Compact Side Network.

    Args:
        backbone: a timm ``SwinTransformer`` or ``SwinTransformerV2`` (any depths).
        rank: ``r`` of every tap (published Swin-B: 4).
        beta: β of θ.
        adapt_from: 1-based ``M`` over all blocks (global numbering); default
            :func:`default_swin_blocks` (15 for Swin-B).
        tap_from: first tapped block, 1-based global; default :func:`default_swin_blocks`
            (5 for Swin-B).
        conv_kernel: ``k`` of the per-stage depthwise conv (DTL+; published 5); 0 = DTL.
        num_classes, head, side, train_backbone, trunk_dtype, checkpoint_tail: as
            :class:`DTLViT`. The published head is
            final norm → average pool over all tokens → new Linear.

    Input: ``(batch, in_chans, H, W)``. Output: ``(batch, num_classes)``.
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
        trunk_dtype: torch.dtype | str | None = None,
        checkpoint_tail: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, _swin_types()):
            raise TypeError(
                "DTLSwin needs a timm SwinTransformer or SwinTransformerV2, got "
                f"{type(backbone).__name__}; "
                "use DTLViT for ViT, or dtl_kernels.create_model(name) to pick the wrapper"
            )
        self.depths = [len(stage.blocks) for stage in backbone.layers]
        starts = [sum(self.depths[:s]) for s in range(len(self.depths))]
        self._stage_starts = {start: s for s, start in enumerate(starts)}
        widths, stages = [], []
        for s, stage in enumerate(backbone.layers):
            width = stage.blocks[0].norm1.normalized_shape[0]
            widths += [width] * len(stage.blocks)
            stages += [s] * len(stage.blocks)
        self._set_up(
            backbone,
            head_width=backbone.num_features,
            widths=widths,
            stages=stages,
            default_blocks=default_swin_blocks(self.depths),
            **shared_options(locals()),
        )

    def _check_images(self, images: torch.Tensor) -> None:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError("images must be a (batch, channels, H, W) tensor")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point, got {images.dtype}")
        if images.shape[0] == 0:  # timm's window attention cannot reshape an empty batch
            raise ValueError("images: an empty batch (0 images); Swin needs at least one")
        pe = self.backbone.patch_embed
        if images.shape[1] != pe.proj.in_channels:
            raise ValueError(
                f"images have {images.shape[1]} channels, "
                f"the backbone expects {pe.proj.in_channels}"
            )
        size = tuple(images.shape[-2:])
        if getattr(pe, "strict_img_size", False) and size != tuple(pe.img_size):
            raise ValueError(
                f"images are {size[0]}x{size[1]} but this Swin is fixed to "
                f"{pe.img_size[0]}x{pe.img_size[1]} (create it with strict_img_size=False "
                "to accept other sizes)"
            )

    # -- the block walk (see DTLModel.run_blocks) ----------------------------------------
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``(batch, 3, H, W)`` → ``(batch, H', W', C)`` patch features before block 0."""
        self._check_images(images)
        return self.backbone.patch_embed(images), {}

    @property
    def blocks(self) -> list[nn.Module]:
        blocks = [block for stage in self.backbone.layers for block in stage.blocks]
        return memory.with_tail(blocks, self._tail)

    def block_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        # Patch merging runs at the start of a stage (timm layout), on adapted features.
        stage = self._stage_starts.get(i)
        return x if stage is None else self.backbone.layers[stage].downsample(x)

    def input_is_output(self, i: int) -> bool:
        # patch merging only at a stage's first block (DTLSwin's own block_input)
        return (
            "block_input" not in self.__dict__
            and type(self).block_input is DTLSwin.block_input
            and i not in self._stage_starts
        )

    def tokens(self, x: torch.Tensor, ctx: dict):
        b, h, w, c = x.shape
        return x.reshape(b, h * w, c), (h, w), 0

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        x = self.backbone.norm(x)
        if self.head_mode == "published":
            return self.head(x.mean(dim=(1, 2)))
        return self.backbone.forward_head(x)

    def backbone_identity(self) -> dict:
        bb = self.backbone
        pe = bb.patch_embed
        return {
            "family": "swin",
            "architecture": _architecture(bb),
            "depths": self.depths,
            "widths": [stage.blocks[0].norm1.normalized_shape[0] for stage in bb.layers],
            "patch": list(pe.patch_size),
            "grid": list(pe.grid_size) if pe.grid_size is not None else None,
        }

    def _ignorable_official_keys(self):
        # The published code builds a fusion conv for every stage; those of stages
        # without adapted blocks are never used.
        used = set(self.csn.convs) if self.csn is not None else set()

        def ignorable(key: str) -> bool:
            m = re.fullmatch(r"lora_fusions\.(\d+)\.weight", key)
            return bool(m) and m.group(1) not in used

        return ignorable

    def _filter_backbone_checkpoint(self, sd):
        import sys

        module = sys.modules[type(self.backbone).__module__]  # v1's or v2's own filter
        return module.checkpoint_filter_fn(sd, self.backbone)
