"""DTL / DTL+ around a timm ``VisionTransformer`` (the published ViT setting)."""

from __future__ import annotations

import torch
from torch import nn

from .. import memory
from .base import DTLModel, _architecture, shared_options


def _vision_transformer_type():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer


class DTLViT(DTLModel):
    """A frozen timm ViT with a Compact Side Network beside it.

    Args:
        backbone: a timm ``VisionTransformer`` (any size, patch, image size, class /
            register / distillation tokens, ``dynamic_img_size``).
        rank: ``r`` of every tap (published: 2).
        beta: β of θ (published: 100).
        adapt_from: the paper's 1-based ``M``: add-back after blocks ``M … N``. ``1`` is
            DTL+* (every block adapted).
        conv_kernel: ``k`` of the shared depthwise conv (DTL+); ``0`` is plain DTL.
        tap_from: first tapped block (1-based; published: 1, all blocks).
        num_classes: classes of the new head; default: the backbone's ``num_classes``
            (``0`` returns pooled features).
        head: ``"published"`` (mean over patch tokens → the pretrained final norm →
            new Linear) or ``"backbone"`` (the backbone's own pooling and head, trained).
        side: build the CSN (``False`` gives the linear-probe / full baselines).
        train_backbone: leave the backbone trainable (full fine-tuning baseline).
        trunk_dtype: memory option: keep the trunk taps' inputs ``z_i`` (``i ≤ M``, only
            needed for ``∂A_i``) in this dtype (e.g. ``torch.bfloat16``); ``None``: as they are.
        checkpoint_tail: memory option: recompute the frozen blocks after ``M`` in backward
            (``torch.utils.checkpoint``) instead of storing their activations.

    Input: ``(batch, in_chans, H, W)`` float images. Output: ``(batch, num_classes)``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        rank: int = 2,
        beta: float = 100.0,
        adapt_from: int = 7,
        conv_kernel: int = 0,
        tap_from: int = 1,
        num_classes: int | None = None,
        head: str = "published",
        side: bool = True,
        train_backbone: bool = False,
        trunk_dtype: torch.dtype | str | None = None,
        checkpoint_tail: bool = False,
    ) -> None:
        super().__init__()
        if not isinstance(backbone, self._backbone_type()):
            raise TypeError(
                f"{type(self).__name__} needs a timm {self._backbone_type().__name__}, got "
                f"{type(backbone).__name__}; use dtl_kernels.create_model(name) to pick the wrapper"
            )
        self.num_prefix = int(getattr(backbone, "num_prefix_tokens", 1))
        depth, width = len(backbone.blocks), backbone.embed_dim
        self._set_up(
            backbone,
            head_width=width,
            widths=[width] * depth,
            stages=[0] * depth,
            **shared_options(locals()),
        )

    @staticmethod
    def _backbone_type() -> type:
        return _vision_transformer_type()

    # -- structure -------------------------------------------------------------------
    @property
    def final_norm(self) -> nn.Module:
        """The pretrained final LayerNorm (``fc_norm`` for timm's avg-pool variants)."""
        bb = self.backbone
        if isinstance(bb.norm, nn.Identity) and not isinstance(bb.fc_norm, nn.Identity):
            return bb.fc_norm
        return bb.norm

    def patch_grid(self, images: torch.Tensor) -> tuple[int, int]:
        """``(H, W)`` of the patch grid for these images; ``ValueError`` if they do not fit."""
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError(
                f"images must be a (batch, channels, H, W) tensor, got "
                f"{tuple(images.shape) if isinstance(images, torch.Tensor) else type(images)}"
            )
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point, got {images.dtype}")
        pe = self._backbone_part("patch_embed")
        channels = pe._modules["proj"].in_channels
        if images.shape[1] != channels:
            raise ValueError(
                f"images have {images.shape[1]} channels, the backbone expects {channels}"
            )
        size = tuple(images.shape[-2:])
        if getattr(pe, "strict_img_size", False) and pe.img_size is not None:
            if size != tuple(pe.img_size):
                raise ValueError(
                    f"images are {size[0]}x{size[1]} but this backbone is fixed to "
                    f"{pe.img_size[0]}x{pe.img_size[1]} (create it with dynamic_img_size=True "
                    "to accept other sizes)"
                )
        if not getattr(pe, "dynamic_img_pad", False):
            ph, pw = pe.patch_size
            if size[0] % ph or size[1] % pw:
                raise ValueError(
                    f"image size {size} is not a multiple of the patch size {pe.patch_size}"
                )
        return (
            tuple(pe.dynamic_feat_size(size))
            if hasattr(pe, "dynamic_feat_size")
            else tuple(pe.grid_size)
        )

    # -- the block walk (see DTLModel.run_blocks) ----------------------------------------
    features_are_tokens = True  # tokens() and untokens() below are the identity

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        """``(batch, 3, H, W)`` → tokens ``(batch, prefix + H'·W', width)`` before block 0."""
        grid = self.patch_grid(images)
        bb = self.backbone
        x = bb.patch_embed(images)
        x = bb._pos_embed(x)
        x = bb.patch_drop(x)
        x = bb.norm_pre(x)
        return x, {"grid": grid}

    @property
    def blocks(self) -> list[nn.Module]:
        blocks = self._backbone_part("blocks")._modules.values()  # Sequential or ModuleList
        return memory.with_tail(list(blocks), self._tail)

    def _backbone_part(self, name: str) -> nn.Module:
        """``self.backbone.<name>`` by plain dict lookups: ``nn.Module.__getattr__`` costs
        about 1 µs a step, and the walk asks for the blocks and the patch embedding at
        every forward."""
        return self._modules["backbone"]._modules[name]

    def tokens(self, x: torch.Tensor, ctx: dict):
        return x, ctx["grid"], self.num_prefix

    def untokens(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        if self.head_mode == "published":
            pooled = x[:, self.num_prefix :].mean(dim=1)
            return self.head(self.final_norm(pooled))
        return self.backbone.forward_head(self.backbone.norm(x))

    def backbone_identity(self) -> dict:
        bb = self.backbone
        pe = bb.patch_embed
        return {
            "family": "vit",
            "architecture": _architecture(bb),
            "depth": len(bb.blocks),
            "width": bb.embed_dim,
            "patch": list(pe.patch_size),
            "grid": list(pe.grid_size) if pe.grid_size is not None else None,
            "num_prefix_tokens": self.num_prefix,
        }

    def _filter_backbone_checkpoint(self, sd):
        from timm.models.vision_transformer import checkpoint_filter_fn

        return checkpoint_filter_fn(sd, self.backbone)


class DTLEva(DTLViT):
    """A frozen timm ``Eva`` (EVA-02 and its relatives) with a Compact Side Network.

    The same method and options as :class:`DTLViT`: EVA is a plain ViT whose blocks also
    take a rotary position embedding (and use SwiGLU MLPs and sub-LayerNorms inside, which
    the side network never sees). The rotary embedding is computed once per image size in
    :meth:`embed` and handed to every block (per block where the backbone mixes them).
    """

    @staticmethod
    def _backbone_type() -> type:
        from timm.models.eva import Eva

        return Eva

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        grid = self.patch_grid(images)
        bb = self.backbone
        x, rope = bb._pos_embed(bb.patch_embed(images))
        return bb.norm_pre(x), {"grid": grid, "rope": rope}

    def call_block(self, block: nn.Module, i: int, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        rope = ctx["rope"]
        if rope is not None and getattr(self.backbone, "rope_mixed", False):
            rope = rope[i]  # one embedding per block
        return block(x, rope=rope)

    def backbone_identity(self) -> dict:
        return {**super().backbone_identity(), "family": "eva"}

    def _filter_backbone_checkpoint(self, sd):
        from timm.models.eva import checkpoint_filter_fn

        return checkpoint_filter_fn(sd, self.backbone)
