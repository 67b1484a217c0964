"""Giant backbones by name (issue 21): what the memory estimator and the benchmarks call
``vit_giant_patch14_dinov2``, ``vit_pe_core_gigantic_patch14_448`` and ``vit_22b_patch14_224``.

The first two are timm's own models (DINOv2 ViT-g/14, 1.1 B parameters; Meta's Perception
Encoder core G/14, an ``Eva`` with rotary embeddings and no class token, 1.9 B parameters,
1,024 tokens at 448 px). ViT-22B (Dehghani et al., 2023) has no public weights and is not
in timm: :func:`register` adds its *shape*, :func:`vit_22b_patch14_224`, to timm's model
registry (:mod:`.build` calls it on import), so
``dtl_kernels.create_model``, ``dtl-train --model`` and then ``timm.create_model`` accept it.

The shape is the paper's: width 6144, depth 48, 48 heads (head width 128), MLP 24,576, patch
14, no bias in the QKV projection, LayerNorm on queries and keys; ≈ 21.7 B parameters. The
blocks are timm's sequential pre-norm ``Block`` (attention, then MLP), not the paper's
parallel layout: the side network and the LoRA baseline need the ``qkv`` projection a
sequential block has, and weights and activations per block are the same size.
"""

from __future__ import annotations

import timm
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

VIT_22B = "vit_22b_patch14_224"

#: the three giants of issue 21, each with the input size its benchmarks use
GIANTS = {
    "vit_giant_patch14_dinov2": {"img_size": 224},  # timm's default is 518 px
    "vit_pe_core_gigantic_patch14_448": {},  # 448 px, 32 × 32 tokens
    VIT_22B: {},
}

# timm reads a registered model's pretrained config (input size, mean / std) from here
default_cfgs = generate_default_cfgs(
    {
        VIT_22B: {
            "url": "",
            "num_classes": 0,
            "input_size": (3, 224, 224),
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
            "interpolation": "bicubic",
            "crop_pct": 1.0,
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        }
    }
)


def register() -> None:
    """Add the giants timm lacks to its model registry (once)."""
    if not timm.is_model(VIT_22B):
        register_model(vit_22b_patch14_224)


def vit_22b_patch14_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    """A ViT-22B-shaped timm ``VisionTransformer`` (random weights: none are published)."""
    args = dict(patch_size=14, embed_dim=6144, depth=48, num_heads=48, mlp_ratio=4.0,
                qkv_bias=False, qk_norm=True, num_classes=0)  # fmt: skip
    return build_model_with_cfg(
        VisionTransformer,
        VIT_22B,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        **dict(args, **kwargs),
    )
