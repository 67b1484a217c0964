"""The LoRA baseline (``method="lora"``): Hugging Face PEFT's LoRA layers injected into the
frozen backbone, trained with the head — the parameter-efficient method DTL is compared with.

PEFT replaces each target ``nn.Linear`` by a layer holding the frozen original and a
low-rank update ``B·A`` (``A``: r × in, random; ``B``: out × r, zero, so the model starts as
the pretrained one). Only ``A``, ``B`` and the head train. Unlike DTL, the update sits inside
the backbone, so its backward runs through every block after the first adapted one.
"""

from __future__ import annotations

import torch
from torch import nn

DEFAULT_RANK = 8
# attention input projections: fused (timm ViT, Swin) or separate (EVA-02, Hugging Face
# CLIP / SigLIP / ViT / DINOv2 in transformers 5: *_proj; query / key / value in older ones)
DEFAULT_TARGETS = ("qkv", "q_proj", "k_proj", "v_proj", "query", "key", "value")


def inject_lora(backbone: nn.Module, rank: int = DEFAULT_RANK, targets=DEFAULT_TARGETS) -> dict:
    """Add LoRA of ``rank`` to every ``nn.Linear`` of ``backbone`` whose name ends in one of
    ``targets``; returns the settings to record in an adapter (``{"rank", "targets"}``)."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"lora_rank must be a positive int, got {rank!r}")
    if any(".lora_" in n for n, _ in backbone.named_parameters()):
        raise ValueError(
            "method='lora': this backbone already holds LoRA layers (PEFT changes it in place); "
            "build each LoRA model on its own copy of the backbone"
        )
    names = [
        n
        for n, m in backbone.named_modules()
        if isinstance(m, nn.Linear) and n.rsplit(".", 1)[-1] in targets
    ]
    if not names:
        raise ValueError(
            f"method='lora': {type(backbone).__name__} has no nn.Linear named {list(targets)}"
        )
    try:
        import peft
    except ImportError as exc:
        raise ImportError("method='lora' needs Hugging Face PEFT: pip install peft") from exc
    found = sorted({n.rsplit(".", 1)[-1] for n in names})  # the targets this backbone has
    trainable = {n: p.requires_grad for n, p in backbone.named_parameters()}
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=found)
    peft.inject_adapter_in_model(config, backbone)
    # PEFT freezes all but its own factors: give back what trained before (a backbone head
    # with head="backbone"); the wrapped originals (renamed …base_layer…) stay frozen
    for name, p in backbone.named_parameters():
        p.requires_grad_(".lora_" in name or trainable.get(name, False))
    _check_lora_runs(backbone)
    return {"rank": rank, "targets": found}


def _check_lora_runs(backbone: nn.Module) -> None:
    """Every LoRA layer must run in the backbone's forward. Some blocks read a Linear's
    ``weight`` directly instead of calling it (timm's Swin V2 adds its q / v biases that
    way): LoRA there would never train, silently. One forward of a small dummy batch."""
    lora_a = {n: m for n, m in backbone.named_modules() if n.endswith(".lora_A.default")}
    called: set[str] = set()
    hooks = [
        m.register_forward_hook(lambda mod, inp, out, n=n: called.add(n)) for n, m in lora_a.items()
    ]
    param = next(backbone.parameters())
    patch_embed = getattr(backbone, "patch_embed", None)
    config = getattr(backbone, "config", None)  # a Hugging Face model
    size = getattr(patch_embed, "img_size", None) or (getattr(config, "image_size", 224),) * 2
    proj = getattr(patch_embed, "proj", None)
    channels = getattr(proj, "in_channels", getattr(config, "num_channels", 3))
    modes = {m: m.training for m in backbone.modules()}
    try:
        backbone.eval()
        with torch.no_grad():
            backbone(torch.zeros(1, channels, *size, dtype=param.dtype, device=param.device))
    finally:
        for h in hooks:
            h.remove()
        for m, mode in modes.items():
            m.training = mode
    unused = sorted(set(lora_a) - called)
    if unused:
        raise ValueError(
            f"method='lora': {type(backbone).__name__} bypasses the forward of "
            f"{len(unused)} of its {len(lora_a)} LoRA layers (e.g. "
            f"{unused[0].removesuffix('.lora_A.default')}): their updates would never "
            "reach the output or train. LoRA is not supported for this backbone."
        )
