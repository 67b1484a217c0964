"""Backbone files: a local checkpoint (timm ``.safetensors`` / ``.pth`` / ``.pth.tar`` /
``.bin``…, a Hugging Face sharded checkpoint, Google's ViT ``.npz``, an
EfficientNet-PyTorch ``.pth`` mapped by position) loaded into a timm backbone before it is
wrapped. Checkpoints are read as timm's ``load_state_dict`` reads them (its semantics:
``state_dict_ema`` / ``model_ema`` / ``state_dict`` / ``model`` keys, ``module.`` and
``_orig_mod.`` prefixes removed, weights only), through the checked, memory-mapped readers
of :mod:`.weight_files`; what this module adds is the classifier skip, the position mapping
and one error listing every mismatch."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch
from torch import nn

from .._untrusted import MAX_PATCH_KERNEL_AREA, non_float_for_float
from .npz_weights import load_google_npz
from .weight_files import open_weights


def load_backbone_weights(backbone: nn.Module, path: str | os.PathLike) -> None:
    """Load a local checkpoint into a timm backbone, through timm's own key filter
    (old names, resized position embeddings). A classifier head whose class count differs,
    or that the backbone does not have, is skipped (DTL trains a new one). ``ValueError``
    lists missing / unexpected keys, or names the tensors that hold NaN or infinities.
    The file is read through its memory map (:func:`.weight_files.open_weights`): only the
    backbone's own copy of the weights is ever whole in memory."""
    path = Path(path)
    if path.suffix.lower() == ".npz" and path.is_file():
        load_google_npz(backbone, path)
        return
    state = fitted_state(open_weights(path).tensors, backbone, path)
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise ValueError(f"{path} holds NaN or infinite values in {bad[:8]}")
    backbone.load_state_dict(state, strict=False)


def fitted_state(state: dict[str, torch.Tensor], backbone: nn.Module, path) -> dict:
    """``state`` (a checkpoint's tensors) as ``backbone`` takes it: an EfficientNet-PyTorch
    checkpoint mapped by position, anything else through timm's key filter of the
    backbone's module; a classifier head the backbone no longer has (a wrapper replaced it)
    or whose shape differs is skipped (DTL trains a new one). ``ValueError`` (naming
    ``path``) lists missing / unexpected / mis-shaped keys. Shapes only are compared, so
    ``backbone`` may live on the meta device."""
    own = backbone.state_dict()
    classifier = _classifiers(backbone)  # DTL trains a new one
    if is_positional_efficientnet_checkpoint(state):  # EfficientNet-PyTorch names
        if not any(k.startswith(classifier) for k in own):  # a wrapper removed it
            state = {k: v for k, v in state.items() if not k.startswith("_fc.")}
        return map_positional_efficientnet(state, backbone)
    _check_before_filter(state, path)
    module = sys.modules.get(type(backbone).__module__)
    filter_fn = getattr(module, "checkpoint_filter_fn", None)
    if filter_fn is not None:
        try:  # timm's resamplers run on the file's shapes: an error names the file
            state = filter_fn(state, backbone)
        except Exception as exc:
            raise ValueError(
                f"{path} does not fit {type(backbone).__name__}: timm's checkpoint filter "
                f"failed ({type(exc).__name__}: {exc})"
            ) from exc
    for key in [k for k in state if k.startswith(classifier)]:
        if key not in own or state[key].shape != own[key].shape:
            del state[key]
    misshaped = [
        f"{k}: {tuple(v.shape)} != {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = [k for k in own if k not in state and not k.startswith(classifier)]
    unexpected = [k for k in state if k not in own]
    if misshaped or missing or unexpected:
        raise ValueError(
            f"{path} does not fit {type(backbone).__name__}: missing {missing[:20]}, "
            f"unexpected {unexpected[:20]}, mis-shaped {misshaped[:20]}"
        )
    # a real floating tensor where the backbone's is one (an integer, bool or complex one
    # would be cast silently)
    wrong = non_float_for_float(state, own)
    if wrong:
        raise ValueError(f"{path}: tensors of a non-float dtype for float weights: {wrong[:8]}")
    return state


def _check_before_filter(state: dict[str, torch.Tensor], path) -> None:
    """What timm's key filter would trust: no expanded (stride-0) or otherwise overlapping
    tensor with more elements than its storage holds, which lets a file of a few bytes
    stand for a huge tensor, and no patch-embedding kernel large enough for its resampler
    to build a matrix of gigabytes."""
    for k, v in state.items():
        if v.numel() > 1 and 0 in v.stride():
            raise ValueError(f"{path}: {k} is an expanded tensor (stride 0), not weights")
        if v.numel() * v.element_size() > v.untyped_storage().nbytes():
            raise ValueError(f"{path}: {k} overlaps itself ({v.numel()} elements on a storage "
                             f"of {v.untyped_storage().nbytes()} bytes), not weights")  # fmt: skip
        if k.endswith("patch_embed.proj.weight") and (
            v.dim() != 4 or v.shape[-1] * v.shape[-2] > MAX_PATCH_KERNEL_AREA
        ):
            raise ValueError(f"{path}: {k} has shape {tuple(v.shape)}, not a patch kernel "
                             f"of at most {MAX_PATCH_KERNEL_AREA} pixels")  # fmt: skip


def _classifiers(backbone: nn.Module) -> tuple[str, ...]:
    """The key prefixes of a timm backbone's classifier(s) (``head.``, ``head.fc.``,
    ``classifier.``, ``fc.``; DeiT's ``head.`` and ``head_dist.``): only these may be
    missing from a checkpoint or differ in shape (a new head is trained). Not every
    ``head*`` key: ConvNeXt's ``head.norm`` is a pretrained layer."""
    name = (getattr(backbone, "pretrained_cfg", None) or {}).get("classifier")
    names = [name] if isinstance(name, str) else list(name or [])
    names = [n for n in names if isinstance(n, str) and n] or ["head"]
    return tuple(f"{n}." for n in names)


def is_positional_efficientnet_checkpoint(state: dict) -> bool:
    """True for EfficientNet-PyTorch style keys (``_conv_stem``, ``_blocks.<i>.…``)."""
    return "_conv_stem.weight" in state and any(k.startswith("_blocks.") for k in state)


def map_positional_efficientnet(state: dict[str, torch.Tensor], backbone: nn.Module) -> dict:
    """Rename an EfficientNet-PyTorch state dict onto a timm EfficientNet, by position.

    Both list the same tensors in the same order (stem, every block's convs and norms,
    head conv, head norm, classifier), only under other names. Every pair must have the
    same shape and the counts must agree, else ``ValueError`` names the first mismatch.
    """
    own = backbone.state_dict()
    theirs = list(state.items())
    if len(theirs) != len(own):
        raise ValueError(
            f"checkpoint has {len(theirs)} tensors, {_name(backbone)} has {len(own)}: "
            "it is not the same architecture"
        )
    out = {}
    for (their_key, value), (our_key, target) in zip(theirs, own.items(), strict=True):
        if tuple(value.shape) != tuple(target.shape):
            raise ValueError(
                f"checkpoint tensor {their_key} {tuple(value.shape)} does not line up with "
                f"{our_key} {tuple(target.shape)} of {_name(backbone)}"
            )
        out[our_key] = value
    return out


def _name(backbone: nn.Module) -> str:
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(backbone).__name__
