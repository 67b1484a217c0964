"""Models rebuilt from adapter files: :func:`from_pretrained` (the backbone too, from what
the adapter records) and :func:`model_from_adapter` (on a backbone you give). Above the
wrappers and beside the factory: this is where an adapter's metadata becomes a model."""

from __future__ import annotations

import contextlib
import copy
import os
import warnings
from pathlib import Path

import torch
from torch import nn

from . import offline_weights
from .adapter_state import AdapterError, backbone_differences
from .adapters import adapter_info, describe, read_adapter, wrapper_options
from .build import add_lora, meta_timm_backbone, pretrained_record, timm_backbone, wrapper_for
from .hf import LAYOUTS as HF_LAYOUTS

# timm backbones whose identity (older adapters) names their timm architecture
_TIMM_FAMILIES = ("vit", "eva", "swin", "efficientnet", "resnet", "convnext")


def from_pretrained(
    path: str | os.PathLike,
    pretrained: bool | str | os.PathLike | None = None,
    *,
    backbone_mismatch: str = "error",
    device: str | torch.device | None = None,
) -> nn.Module:
    """The model an adapter file describes, backbone included, with the adapter loaded,
    its class names and preprocessing (``model.pretrained_cfg``) set, in eval mode.

    Args:
        path: an adapter written by :func:`dtl_kernels.save_adapter` (or ``dtl-train``).
        pretrained: the backbone weights, as :func:`dtl_kernels.create_model` takes them;
            ``None``: those the adapter records (an offline weights' name, ``"hub"``, a
            checkpoint path), else the offline weights made for its model.
        backbone_mismatch: ``"error"`` or ``"warn"`` when the weights' fingerprint differs
            from the one the adapter was trained on.
        device: where the model goes (default: the CPU).

    :class:`AdapterError` naming the file and, where the adapter lacks something (files
    written before ``dtl_kernels.adapter/3``), the argument to pass.
    """
    tensors, metadata = read_adapter(path)  # schema, limits and tensor shapes checked
    info = adapter_info(metadata, path)
    origin = info["model"] or _origin_from_identity(info, path)
    if origin["library"] == "timm":
        _check_timm_origin(origin, info, path)  # before any memory is spent on it
    if info["preprocessing"] is None:
        warnings.warn(
            f"adapter {path} (schema {info['format']}) records no preprocessing: the model "
            "gets timm's default data config for its architecture, which may differ from "
            "what it was trained with (dtl-train crops nothing: crop_pct 1.0, squash)",
            stacklevel=2,
        )
    weights = _weights(pretrained, origin, path)
    backbone = _backbone(origin, weights, info, path)
    model = _wrap(backbone, info["config"], path)
    model.load_adapter_state(tensors, info, str(path), backbone_mismatch)
    describe(model, info)
    model.origin = {**origin, "pretrained": pretrained_record(weights)}
    if device is not None:
        model.to(device)
    return model.eval()


def model_from_adapter(
    path: str | os.PathLike, backbone: nn.Module, backbone_mismatch: str = "error"
) -> nn.Module:
    """Build the wrapper an adapter file describes on ``backbone`` and load its weights
    (and its class names and preprocessing).

    The backbone must be the one the adapter was trained on (checked, naming any
    difference; ``backbone_mismatch="warn"`` accepts other weights of the same
    architecture with a warning). Wrapping removes the backbone's classifier and freezes
    it; a refused adapter leaves ``backbone`` as it was."""
    tensors, metadata = read_adapter(path)  # schema, limits and the file's tensor shapes checked
    info = adapter_info(metadata, path)
    with restored_if_refused(backbone):
        model = _wrap(backbone, info["config"], path)
        ref = next(backbone.parameters())
        model.to(device=ref.device, dtype=ref.dtype)  # the new CSN / head follow the backbone
        model.load_adapter_state(tensors, info, str(path), backbone_mismatch)
    describe(model, info)
    return model


@contextlib.contextmanager
def restored_if_refused(backbone: nn.Module):
    """Put ``backbone`` back as it was (its modules, attributes and parameters'
    ``requires_grad``) when the block raises: the identity and fingerprint checks need the
    wrapped model, and wrapping changes the backbone (``reset_classifier(0)``, frozen
    parameters). The copy kept shares every parameter and buffer: no tensor is copied."""
    shared = {id(t): t for t in (*backbone.parameters(), *backbone.buffers())}
    try:
        kept = copy.deepcopy(backbone, memo=shared)
    except Exception:  # a module that cannot be copied: checked as before, not restored
        kept = None
    flags = [(p, p.requires_grad) for p in backbone.parameters()]
    try:
        yield
    except BaseException:
        if kept is not None:
            backbone.__dict__.clear()
            backbone.__dict__.update(kept.__dict__)
        for p, flag in flags:
            p.requires_grad_(flag)
        raise


def _wrap(backbone: nn.Module, config: dict, path) -> nn.Module:
    cls = wrapper_for(backbone)
    try:  # what the backbone bounds (rank ≤ width, blocks ≤ depth) is checked here
        model = cls(backbone, **wrapper_options(config))
        if config["method"] == "lora":
            add_lora(model, config.get("lora") or {})
    except (ValueError, TypeError) as exc:
        raise AdapterError(
            f"adapter {path}: its config does not fit this {type(backbone).__name__}: {exc}"
        ) from exc
    return model


def _check_timm_origin(origin: dict, info: dict, path) -> None:
    """The adapter's model record, built on the meta device (no memory, no initialisation),
    against the backbone identity it records: a record that names another model, or the
    same at another size, is refused before the real one is built (a file of a few
    kilobytes must not make this process build a giant)."""
    try:
        meta = meta_timm_backbone(origin["name"], dict(origin["options"]))
    except Exception as exc:  # timm raises TypeError / ValueError / AssertionError alike
        raise AdapterError(
            f"adapter {path}: its model {origin['name']!r} with options "
            f"{str(origin['options'])[:200]} cannot be built: {type(exc).__name__}: {exc}"
        ) from exc
    diffs = backbone_differences(
        info["backbone"], _wrap(meta, info["config"], path).backbone_identity()
    )
    if diffs:
        raise AdapterError(
            f"adapter {path}: its model record does not build the backbone it was trained "
            "on: " + "; ".join(diffs[:4]) + " (a backbone built with options the adapter "
            "does not record: build it yourself and use model_from_adapter(path, backbone))"
        )


def _origin_from_identity(info: dict, path) -> dict:
    """An older adapter's backbone: the timm architecture its identity names, at the image
    size of its token grid (ViT, Swin); else :class:`AdapterError` asking for the model."""
    import timm

    ident = info["backbone"]
    arch = ident.get("architecture")
    if ident.get("family") not in _TIMM_FAMILIES or not (
        isinstance(arch, str) and timm.is_model(arch)
    ):
        raise AdapterError(
            f"adapter {path} (schema {info['format']}) does not record the model it was "
            "trained on: build it yourself and use model_from_adapter(path, backbone) "
            "(dtl-train: pass --model NAME)"
        )
    options = {}
    grid, patch = ident.get("grid"), ident.get("patch")
    if _pair(grid) and _pair(patch):
        size = [grid[0] * patch[0], grid[1] * patch[1]]
        default = timm.models.get_pretrained_cfg_value(arch, "input_size") or (3, 224, 224)
        if size != list(default[1:]):
            options["img_size"] = size[0] if size[0] == size[1] else size
    return {"library": "timm", "name": arch, "options": options, "pretrained": None}


def _pair(v) -> bool:
    return (
        isinstance(v, list)
        and len(v) == 2
        and all(isinstance(x, int) and not isinstance(x, bool) and 0 < x <= 2**14 for x in v)
    )


def _weights(pretrained, origin: dict, path):
    """The backbone weights to load: given, recorded, or the model's offline weights."""
    if pretrained is not None:
        return pretrained
    recorded = origin.get("pretrained")
    if recorded == "hub":
        return True
    if recorded == "none":
        return False
    if recorded is not None:
        return recorded
    offline = offline_weights.for_arch(origin["name"]) if origin["library"] == "timm" else None
    if offline is not None:
        return offline.name
    raise AdapterError(
        f"adapter {path} does not record the backbone weights it was trained on: pass "
        "pretrained=PATH, an offline weights' name or True for the hub (--pretrained)"
    )


def _backbone(origin: dict, weights, info: dict, path) -> nn.Module:
    if isinstance(weights, (str, os.PathLike)) and not offline_weights.is_offline_name(
        weights
    ) and str(weights) not in ("hub", "none"):  # fmt: skip
        if not Path(weights).exists():
            raise FileNotFoundError(
                f"backbone weights {weights} (recorded in adapter {path}) not found: pass "
                "pretrained=PATH (--pretrained) to where they are now"
            )
    if origin["library"] == "timm":
        weights = {"hub": True, "none": False}.get(weights, weights) if isinstance(
            weights, str
        ) else weights  # fmt: skip
        return timm_backbone(origin["name"], weights, dict(origin["options"]))
    return _hf_backbone(origin, weights, info, path)


def _hf_backbone(origin: dict, weights, info: dict, path) -> nn.Module:
    """A Hugging Face encoder of the adapter's architecture, from ``weights`` (a folder or
    a hub name; ``True``/``"hub"``: the name it was built from)."""
    arch = info["backbone"].get("architecture")
    if arch not in HF_LAYOUTS:
        raise AdapterError(f"adapter {path}: backbone.architecture {str(arch)[:60]!r} is not "
                           f"one of {tuple(HF_LAYOUTS)}")  # fmt: skip
    if weights is False or weights == "none":
        raise AdapterError(f"adapter {path}: a Hugging Face backbone needs its weights: pass "
                           "pretrained=FOLDER (--pretrained)")  # fmt: skip
    import transformers

    source = origin["name"] if weights is True or weights == "hub" else str(weights)
    return getattr(transformers, arch).from_pretrained(source)
