"""DTL / DTL+ around Hugging Face ``transformers`` vision encoders (optional extra:
``pip install dtl-kernels[hf]``, ``transformers`` 5; tested with 5.24; ``transformers`` is
imported only when one is wrapped).

``ViTModel``, ``Dinov2Model``, ``Dinov2WithRegistersModel``, ``CLIPVisionModel`` and
``SiglipVisionModel`` are plain ViTs to the side network: patch embedding, a stack of
pre-norm encoder layers on ``(batch, prefix + H·W, d)`` tokens, a final LayerNorm. What
differs between them is written once, in :data:`LAYOUTS`: where the parts live (the
attribute paths moved between ``transformers`` releases), how many prefix tokens lead
the patch tokens, and how the model pools for its own head.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import nn

from .base import DTLModel, shared_options


@dataclass(frozen=True)
class HFLayout:
    """Where a Hugging Face vision encoder keeps its parts (first path that exists wins).

    ``pool``: how the model pools for its own head (``head="backbone"``): ``"norm_cls"``
    (final norm, then the class token: ViT, DINOv2), ``"cls_norm"`` (the class token, then
    the final norm: CLIP) or ``"map"`` (final norm, then the attention-pooling head:
    SigLIP).
    """

    family: str
    pool: str
    embeddings: tuple[str, ...] = ("embeddings", "vision_model.embeddings")
    layers: tuple[str, ...] = (
        "layers",
        "encoder.layer",
        "encoder.layers",
        "vision_model.encoder.layers",
    )
    final_norm: tuple[str, ...] = ("layernorm", "post_layernorm", "vision_model.post_layernorm")
    pre_norm: tuple[str, ...] = ("pre_layrnorm", "vision_model.pre_layrnorm")
    pool_head: tuple[str, ...] = ("head", "vision_model.head")


LAYOUTS = {
    "ViTModel": HFLayout("hf-vit", "norm_cls"),
    "Dinov2Model": HFLayout("hf-dinov2", "norm_cls"),
    "Dinov2WithRegistersModel": HFLayout("hf-dinov2", "norm_cls"),
    "CLIPVisionModel": HFLayout("hf-clip", "cls_norm"),
    "SiglipVisionModel": HFLayout("hf-siglip", "map"),
}


def hf_layout_of(backbone: nn.Module) -> HFLayout | None:
    """The layout of a supported ``transformers`` model, else ``None`` (never imports it)."""
    module = type(backbone).__module__
    if not module.startswith("transformers."):
        return None
    return LAYOUTS.get(type(backbone).__name__)


def _find_path(module: nn.Module, paths: tuple[str, ...]) -> str | None:
    """The first of ``paths`` (dotted attribute names) that ``module`` has."""
    for path in paths:
        obj = module
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if obj is not None:
            return path
    return None


class DTLHFViT(DTLModel):
    """A frozen Hugging Face vision encoder with a Compact Side Network beside it.

    Args:
        backbone: a ``transformers`` ``ViTModel``, ``Dinov2Model``,
            ``Dinov2WithRegistersModel``, ``CLIPVisionModel`` or ``SiglipVisionModel``.
        num_classes: classes of the new head (``0``: pooled features). These models have
            no classifier of their own, so this is required.
        adapt_from: the paper's 1-based ``M``; default ``depth // 2 + 1`` (7 for 12 blocks,
            the published ViT-B setting).
        head: ``"published"`` (mean over patch tokens → the model's final norm → new
            Linear) or ``"backbone"`` (the model's own pooling → new Linear; SigLIP's
            attention-pooling head is then trained too).
        other arguments: as :class:`~dtl_kernels.models.vit.DTLViT`.

    Input: ``(batch, channels, H, W)`` float images, ``H`` and ``W`` multiples of the patch
    size (other sizes than the configured one interpolate the position embeddings, as
    ``interpolate_pos_encoding=True`` does). Output: ``(batch, num_classes)``.
    """

    def __init__(
        self,
        backbone: nn.Module,
        num_classes: int,
        rank: int = 2,
        beta: float = 100.0,
        adapt_from: int | None = None,
        conv_kernel: int = 0,
        tap_from: int = 1,
        head: str = "published",
        side: bool = True,
        train_backbone: bool = False,
        trunk_dtype: torch.dtype | str | None = None,
        checkpoint_tail: bool = False,
    ) -> None:
        super().__init__()
        layout = hf_layout_of(backbone)
        if layout is None:
            raise TypeError(
                f"DTLHFViT needs a transformers {', '.join(LAYOUTS)}; got "
                f"{type(backbone).__module__}.{type(backbone).__name__}"
            )
        self.layout = layout
        # where this transformers release keeps each part, found once (paths, not modules:
        # the backbone stays the only owner of its submodules)
        self._paths = {
            "embeddings": _find_path(backbone, layout.embeddings),
            "layers": _find_path(backbone, layout.layers),
            "final_norm": _find_path(backbone, layout.final_norm),
            "pre_norm": _find_path(backbone, layout.pre_norm),
            "pool_head": _find_path(backbone, layout.pool_head) if layout.pool == "map" else None,
        }
        missing = [k for k in ("embeddings", "layers", "final_norm") if self._paths[k] is None]
        if missing:
            raise TypeError(
                f"{type(backbone).__name__}: no {', '.join(missing)} found at the known "
                "attribute paths (an unsupported transformers release?)"
            )
        cfg = backbone.config
        self.patch = int(cfg.patch_size)
        self.image_size = int(cfg.image_size)
        self.channels = int(getattr(cfg, "num_channels", 3))
        self.num_prefix = (
            0 if layout.family == "hf-siglip" else 1 + int(getattr(cfg, "num_register_tokens", 0))
        )
        emb = backbone.get_submodule(self._paths["embeddings"])
        self._interpolates = "interpolate_pos_encoding" in inspect.signature(emb.forward).parameters
        depth = len(backbone.get_submodule(self._paths["layers"]))
        width = int(cfg.hidden_size)
        # SigLIP's attention-pooling head is the model's own pooling: trained with
        # head="backbone" (wherever this transformers release keeps it)
        pool_path = self._paths["pool_head"]
        own_pooling = [pool_path] if pool_path is not None and head == "backbone" else []
        self._set_up(
            backbone,
            head_width=width,
            widths=[width] * depth,
            stages=[0] * depth,
            default_blocks=(1, depth // 2 + 1),
            trainable_backbone_prefixes=tuple(f"{p}." for p in own_pooling),
            **shared_options(locals()),
        )

    def native_input_size(self) -> tuple[int, int, int]:
        """``(channels, image_size, image_size)`` of the model's config."""
        return (self.channels, self.image_size, self.image_size)

    def _parts(self) -> dict:
        """The backbone's parts (``None`` where this model has none)."""
        bb = self.backbone
        return {k: bb.get_submodule(v) if v is not None else None for k, v in self._paths.items()}

    # -- the block walk ----------------------------------------------------------------
    def patch_grid(self, images: torch.Tensor) -> tuple[int, int]:
        if not isinstance(images, torch.Tensor) or images.dim() != 4:
            raise ValueError("images must be a (batch, channels, H, W) tensor")
        if not images.is_floating_point():
            raise TypeError(f"images must be floating point, got {images.dtype}")
        if images.shape[1] != self.channels:
            raise ValueError(
                f"images have {images.shape[1]} channels, the model takes {self.channels}"
            )
        h, w = images.shape[-2:]
        if h % self.patch or w % self.patch:
            raise ValueError(f"image size {(h, w)} is not a multiple of the patch {self.patch}")
        return h // self.patch, w // self.patch

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        grid = self.patch_grid(images)
        parts = self._parts()
        emb = parts["embeddings"]
        kwargs = {}
        if self._interpolates:  # DINOv2's embedding always interpolates and takes no flag
            size = (self.image_size, self.image_size)
            kwargs["interpolate_pos_encoding"] = tuple(images.shape[-2:]) != size
        x = emb(images, **kwargs)
        if parts["pre_norm"] is not None:
            x = parts["pre_norm"](x)
        return x, {"grid": grid}

    @property
    def blocks(self) -> list[nn.Module]:
        from .. import memory

        return memory.with_tail(list(self._parts()["layers"]), self._tail)

    def call_block(self, block: nn.Module, i: int, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        out = block(x, None)  # no attention mask: every token attends to every token
        return out[0] if isinstance(out, tuple) else out  # older releases return tuples

    def tokens(self, x: torch.Tensor, ctx: dict):
        return x, ctx["grid"], self.num_prefix

    def untokens(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        parts = self._parts()
        norm = parts["final_norm"]
        if self.head_mode == "published":
            return self.head(norm(x[:, self.num_prefix :].mean(dim=1)))
        pool = self.layout.pool
        if pool == "norm_cls":
            pooled = norm(x)[:, 0]
        elif pool == "cls_norm":
            pooled = norm(x[:, 0])
        else:  # SigLIP: attention pooling over all tokens (or their mean without the head)
            y = norm(x)
            pooled = parts["pool_head"](y) if parts["pool_head"] is not None else y.mean(dim=1)
        return self.head(pooled)

    def backbone_identity(self) -> dict:
        cfg = self.backbone.config
        return {
            "family": self.layout.family,
            "architecture": type(self.backbone).__name__,
            "depth": len(self.blocks),
            "width": int(cfg.hidden_size),
            "patch": [self.patch, self.patch],
            "grid": [self.image_size // self.patch] * 2,
            "num_prefix_tokens": self.num_prefix,
        }
