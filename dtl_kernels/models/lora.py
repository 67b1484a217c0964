"""The LoRA baseline (``method="lora"``): Hugging Face PEFT's LoRA layers injected into the
frozen backbone, trained with the head — the parameter-efficient method DTL is compared with.

PEFT replaces each target ``nn.Linear`` by a layer holding the frozen original and a
low-rank update ``B·A`` (``A``: r × in, random; ``B``: out × r, zero, so the model starts as
the pretrained one). Only ``A``, ``B`` and the head train. Unlike DTL, the update sits inside
the backbone, so its backward runs through every block after the first adapted one.

``blocks=(M, N)`` (1-based, inclusive, as the paper numbers blocks) restricts LoRA to the
attention projections of blocks ``M … N``: PEFT is given those layers' full names, so the
forward is PEFT's on exactly those layers, and blocks before ``M`` hold nothing trainable
(their forward records no autograd graph, their backward never runs).
"""

from __future__ import annotations

import re

import torch
from torch import nn

DEFAULT_RANK = 8
# attention input projections: fused (timm ViT, Swin) or separate (EVA-02, Hugging Face
# CLIP / SigLIP / ViT / DINOv2 in transformers 5: *_proj; query / key / value in older ones)
DEFAULT_TARGETS = ("qkv", "q_proj", "k_proj", "v_proj", "query", "key", "value")


def parse_blocks(value) -> tuple[int, int] | None:
    """``lora_blocks`` as ``(M, N)``, 1-based and inclusive: from ``"7-12"``, ``"7"``,
    ``(7, 12)`` / ``[7, 12]`` or ``None`` (every block). ``ValueError`` (one line) for
    anything else, or when ``M > N`` or ``M < 1``; the range against the backbone's depth
    is checked by :func:`block_range` (the depth is known only then)."""
    if value is None:
        return None
    pair = None
    if isinstance(value, str):
        m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", value)
        if m:
            pair = (int(m[1]), int(m[2] or m[1]))
    elif isinstance(value, (tuple, list)) and len(value) == 2:
        if all(isinstance(v, int) and not isinstance(v, bool) for v in value):
            pair = (value[0], value[1])
    if pair is None:
        raise ValueError(f"lora_blocks must be M-N (1-based blocks, e.g. 7-12), got {value!r}")
    if not 1 <= pair[0] <= pair[1]:
        raise ValueError(f"lora_blocks {pair[0]}-{pair[1]}: need 1 ≤ M ≤ N (1-based blocks)")
    return pair


def format_blocks(blocks: tuple[int, int]) -> str:
    """``(7, 12)`` → ``"7-12"`` (how the command line and configs spell it)."""
    return f"{blocks[0]}-{blocks[1]}"


def block_range(blocks: tuple[int, int], depth: int) -> range:
    """0-based indices of blocks ``M … N`` of a backbone with ``depth`` blocks."""
    first, last = blocks
    if last > depth:
        raise ValueError(
            f"lora_blocks {first}-{last} is outside the backbone's {depth} blocks (1-{depth})"
        )
    return range(first - 1, last)


def inject_lora(
    backbone: nn.Module,
    rank: int = DEFAULT_RANK,
    targets=DEFAULT_TARGETS,
    blocks: tuple[int, int] | None = None,
    block_modules: list[nn.Module] | None = None,
) -> dict:
    """Add LoRA of ``rank`` to every ``nn.Linear`` of ``backbone`` whose name ends in one of
    ``targets`` — only inside blocks ``M … N`` when ``blocks=(M, N)`` is given, with
    ``block_modules`` the backbone's blocks in order (the wrapper's walk). Returns the
    settings to record in an adapter: ``{"rank", "targets"}`` (and ``"blocks": [M, N]``)."""
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"lora_rank must be a positive int, got {rank!r}")
    blocks = parse_blocks(blocks)
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
    peft = check_peft()
    if blocks is not None:
        names = _names_in_blocks(backbone, names, blocks, block_modules)
    found = sorted({n.rsplit(".", 1)[-1] for n in names})  # the targets this backbone has
    # PEFT matches a list entry exactly (or as a dotted suffix): full names pick exactly the
    # layers of blocks M … N, which then run PEFT's own LoRA layer
    target_modules = found if blocks is None else names
    trainable = {n: p.requires_grad for n, p in backbone.named_parameters()}
    config = peft.LoraConfig(r=rank, lora_alpha=rank, target_modules=target_modules)
    peft.inject_adapter_in_model(config, backbone)
    if blocks is not None:  # PEFT's name matching must have picked exactly these layers
        adapted = sorted(n.removesuffix(".lora_A") for n, _ in backbone.named_modules()
                         if n.endswith(".lora_A"))  # fmt: skip
        if adapted != sorted(names):
            raise RuntimeError(f"PEFT adapted {adapted}, expected {sorted(names)}")
    # PEFT freezes all but its own factors: give back what trained before (a backbone head
    # with head="backbone"); the wrapped originals (renamed …base_layer…) stay frozen
    for name, p in backbone.named_parameters():
        p.requires_grad_(".lora_" in name or trainable.get(name, False))
    _check_lora_runs(backbone)
    settings = {"rank": rank, "targets": found}
    if blocks is not None:
        settings["blocks"] = list(blocks)  # a list: the adapter's JSON metadata reads back equal
    return settings


def _names_in_blocks(backbone, names: list[str], blocks, block_modules) -> list[str]:
    """The target layers (full names, of ``names``) that sit inside blocks ``M … N``."""
    if block_modules is None:
        raise ValueError("lora_blocks needs the backbone's blocks in order (block_modules)")
    inside = {
        id(m)
        for i in block_range(blocks, len(block_modules))
        for m in block_modules[i].modules()  # a checkpointed tail block holds the original
    }
    modules = dict(backbone.named_modules())
    chosen = [n for n in names if id(modules[n]) in inside]
    if not chosen:
        raise ValueError(
            f"lora_blocks {format_blocks(blocks)}: no attention projection in those blocks"
        )
    return chosen


def describe(settings: dict) -> str:
    """``settings`` (as :func:`inject_lora` returns them) in words, for a model summary."""
    where = (
        f"blocks {format_blocks(settings['blocks'])}" if settings.get("blocks") else "all blocks"
    )
    return f"LoRA r={settings['rank']} on {'/'.join(settings['targets'])} of {where}"


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


def check_peft():
    """The ``peft`` module; ``ImportError`` with the install command when it is missing."""
    try:
        import peft
    except ImportError:
        raise ImportError(
            "method 'lora' needs Hugging Face PEFT, which is not installed: pip install peft"
        ) from None
    return peft
