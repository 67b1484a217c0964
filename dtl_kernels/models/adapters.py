"""Adapter files: the trained part of a model (CSN + head) as safetensors, with what
rebuilds and feeds it as metadata: its configuration, the backbone's identity, a
fingerprint of the frozen backbone weights, how to build the backbone again, the
preprocessing it was trained with, the class names (:mod:`.adapter_description`); writing
them (:func:`save_adapter`) and reading them back with a schema check and clear errors
(:func:`read_adapter`, :func:`adapter_info`, :func:`load_adapter`).

This module sits above the wrappers: they hold their adapter in memory
(:class:`~.adapter_state.AdapterState`) and know nothing of files.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_write, save_safetensors
from .._untrusted import parse_json
from .._version import __version__
from ..csn import FLOAT32_MAX
from .adapter_description import check_description, class_names_problem
from .adapter_state import AdapterError
from .choices import HEAD_MODES, LIMITS, METHODS

# Adapter metadata schema: /2 adds ``backbone_sha256`` (AdapterState.backbone_fingerprint);
# /3 adds ``model``, ``preprocessing``, ``classes`` and ``training`` (.adapter_description).
ADAPTER_FORMAT = "dtl_kernels.adapter/3"
ADAPTER_FORMATS = ("dtl_kernels.adapter/1", "dtl_kernels.adapter/2", ADAPTER_FORMAT)
DESCRIPTION_FIELDS = ("model", "preprocessing", "classes", "training")
_DATA_CONFIG_KEYS = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")


def save_adapter(
    model: nn.Module, path: str | os.PathLike, *, training: dict | None = None
) -> Path:
    """Write ``model``'s adapter (CSN + head) as safetensors, atomically, with what
    rebuilds and feeds it as metadata (schema :data:`ADAPTER_FORMAT`).

    Args:
        model: a DTL model (:class:`~dtl_kernels.models.base.DTLModel`). Its
            ``pretrained_cfg`` gives the preprocessing (through timm's
            ``resolve_model_data_config``), its ``class_names`` the classes and its
            ``origin`` the backbone to build again (derived from the backbone when unset).
        path: the ``.safetensors`` file to write.
        training: ``{"dataset", "data_root", "test_split"}`` of the data it was trained on
            (``dtl-train --eval-only`` evaluates there by default).

    Returns the path. :class:`AdapterError` when a field breaks the schema (e.g. a class
    name over 256 characters): the file would not load.
    """
    metadata = {
        "format": ADAPTER_FORMAT,
        "dtl_kernels_version": __version__,
        "config": json.dumps(model.adapter_config(), sort_keys=True),
        "backbone": json.dumps(model.backbone_identity(), sort_keys=True),
        "model": json.dumps(origin_of(model), sort_keys=True),
        "preprocessing": json.dumps(data_config(model), sort_keys=True),
    }
    if model.class_names is not None:
        problem = class_names_problem(list(model.class_names))
        if problem is not None:
            raise AdapterError(f"cannot write adapter {path}: class names: {problem}")
        metadata["classes"] = json.dumps(list(model.class_names))
    if training is not None:
        metadata["training"] = json.dumps(training, sort_keys=True)
    fingerprint = model.backbone_fingerprint()
    if fingerprint is not None:
        metadata["backbone_sha256"] = fingerprint
    tensors = model.adapter_state_dict()
    # what we write, we can read back: the metadata against the tensors' shapes, as
    # read_adapter checks them (a head frozen by hand would be left out of the file)
    try:
        adapter_info(metadata, path, {k: tuple(v.shape) for k, v in tensors.items()})
    except AdapterError as exc:
        raise AdapterError(f"cannot write adapter {path}: the model's trainable tensors do not "
                           f"match its adapter config ({exc})") from None  # fmt: skip
    bad = sorted(k for k, v in tensors.items() if v.is_floating_point() and not v.isfinite().all())
    if bad:
        raise AdapterError(f"cannot write adapter {path}: NaN or infinite values in {bad[:8]}")
    return atomic_write(path, lambda tmp: save_safetensors(tensors, tmp, metadata))


def load_adapter(
    model: nn.Module, path: str | os.PathLike, backbone_mismatch: str = "error"
) -> dict:
    """Load an adapter file written by :func:`save_adapter` into ``model`` (built with the
    same backbone and configuration), and its class names and preprocessing with it.

    Args:
        backbone_mismatch: ``"error"`` (default) or ``"warn"``: what to do when the file's
            backbone weights fingerprint differs from the model's.

    Returns the file's :func:`adapter_info`. Raises ``FileNotFoundError`` if absent,
    :class:`AdapterError` (a ``ValueError``) if the file is not an adapter, is truncated,
    breaks the metadata schema, holds non-finite values, or if its backbone or
    configuration differ from the model's (the message lists each difference). Nothing is
    loaded unless everything fits.
    """
    tensors, metadata = read_adapter(path)
    info = adapter_info(metadata, path)
    model.load_adapter_state(tensors, info, str(path), backbone_mismatch)
    describe(model, info)
    return info


def describe(model: nn.Module, info: dict) -> None:
    """Give ``model`` the class names, preprocessing and origin an adapter records."""
    if info["classes"] is not None:
        model.class_names = list(info["classes"])
    if info["preprocessing"] is not None:
        model.pretrained_cfg = {**model.pretrained_cfg, **_as_timm(info["preprocessing"])}
    if info["model"] is not None and model.origin is None:
        model.origin = dict(info["model"])


def data_config(model: nn.Module) -> dict:
    """The model's input preprocessing as timm resolves it from ``model.pretrained_cfg``
    (``input_size``, ``interpolation``, ``crop_pct``, ``crop_mode``, ``mean``, ``std``),
    in JSON types."""
    from timm.data import resolve_model_data_config

    cfg = resolve_model_data_config(model)
    out = {k: cfg[k] for k in _DATA_CONFIG_KEYS}
    out["input_size"] = [int(v) for v in out["input_size"]]
    out["mean"], out["std"] = [float(v) for v in out["mean"]], [float(v) for v in out["std"]]
    out["crop_pct"] = float(out["crop_pct"])
    return out


def origin_of(model: nn.Module) -> dict:
    """How to build ``model``'s backbone again: ``model.origin`` (set by ``create_model``),
    else what the backbone says of itself (its timm architecture and image size, or a
    Hugging Face model's ``name_or_path``)."""
    if model.origin is not None:
        return model.origin
    bb = model.backbone
    cfg = getattr(bb, "pretrained_cfg", None) or {}
    if cfg.get("architecture"):
        options = {}
        size = list(model.native_input_size()[1:])
        if size != list((cfg.get("input_size") or (3, 224, 224))[1:]):
            options["img_size"] = size[0] if size[0] == size[1] else size
        return {"library": "timm", "name": cfg["architecture"], "options": options,
                "pretrained": None}  # fmt: skip
    name = getattr(getattr(bb, "config", None), "name_or_path", "") or type(bb).__name__
    return {"library": "transformers", "name": name, "options": {}, "pretrained": None}


def _as_timm(preprocessing: dict) -> dict:
    """A recorded preprocessing as timm keeps it in ``pretrained_cfg`` (tuples)."""
    out = dict(preprocessing)
    for key in ("input_size", "mean", "std"):
        out[key] = tuple(out[key])
    return out


CSN_FIELDS = ("rank", "beta", "tap_from", "adapt_from", "conv_kernel")  # CSNConfig's
_MAX_LORA_TARGETS, _MAX_NAME = 64, 256


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an adapter file: ``(tensors, metadata)``. The metadata passed the schema check
    of :func:`adapter_info`, against the file's own tensor shapes, before any tensor is
    read. :class:`AdapterError` naming the file (and the field) for anything else."""
    tensors, metadata, _ = _read_checked(path, with_tensors=True)
    return tensors, metadata


def read_adapter_info(path: str | os.PathLike) -> dict:
    """:func:`adapter_info` of an adapter file, checked as :func:`read_adapter` checks it,
    without reading its tensors (e.g. its preprocessing, before a model is built)."""
    return _read_checked(path, with_tensors=False)[2]


def _read_checked(path, with_tensors: bool) -> tuple[dict, dict[str, str], dict]:
    """``(tensors or {}, metadata, adapter_info)`` of an adapter file."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            if metadata.get("format") not in ADAPTER_FORMATS:
                raise AdapterError(
                    f"{path} is a safetensors file but not a dtl_kernels adapter "
                    f"(format={str(metadata.get('format'))[:70]!r}; this version reads "
                    f"{ADAPTER_FORMATS})"
                )
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            info = adapter_info(metadata, path, shapes)
            tensors = {k: f.get_tensor(k) for k in f.keys()} if with_tensors else {}
    except AdapterError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad files
        raise AdapterError(f"{path} is not a readable safetensors adapter file ({exc})") from exc
    return tensors, metadata, info


def adapter_info(
    metadata: dict[str, str],
    path: str | os.PathLike = "adapter",
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> dict:
    """The adapter metadata, parsed and schema-checked: ``{"format", "version", "config":
    {method, head_mode, num_classes, csn[, lora]}, "backbone": {family, …},
    "backbone_sha256": str | None, "model", "preprocessing", "classes", "training"}`` (the
    last four as :mod:`.adapter_description` checks them; ``None`` in older files). Every
    size is bounded by :data:`LIMITS` and, given the file's tensor ``shapes``, must agree
    with them (so a model built from it allocates no more than the file holds).
    :class:`AdapterError` naming the file and the field for anything missing, mistyped, out
    of range or inconsistent."""

    def fail(problem: str):
        raise AdapterError(f"adapter {path}: {problem} (schema {str(metadata.get('format'))[:40]})")

    def parsed(field: str, mapping: bool = True):
        if field not in metadata:
            fail(f"metadata has no '{field}'")
        try:
            value = parse_json(metadata[field], f"metadata '{field}'")
        except ValueError as exc:
            fail(str(exc))
        if mapping and not isinstance(value, dict):
            fail(f"metadata '{field}' is not a mapping")
        return value

    config, backbone = parsed("config"), parsed("backbone")
    for key, ok, want in (
        ("method", lambda v: v in METHODS, f"one of {METHODS}"),
        ("head_mode", lambda v: v in HEAD_MODES, f"one of {HEAD_MODES}"),
        ("num_classes", lambda v: _whole(v, 0, LIMITS["num_classes"]),
         f"a whole number in 0…{LIMITS['num_classes']}"),
        ("csn", lambda v: v is None or isinstance(v, dict), "a mapping or null"),
    ):  # fmt: skip
        if key not in config:
            fail(f"config has no '{key}'")
        if not ok(config[key]):
            fail(f"config '{key}' is {_short(config[key])}, expected {want}")
    _check_csn_fields(config["method"], config["csn"], fail)
    _check_lora_fields(config["method"], config.get("lora"), fail)
    if not isinstance(backbone.get("family"), str):
        fail("backbone has no 'family'")
    fingerprint = metadata.get("backbone_sha256")
    if fingerprint is not None and not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
        fail(f"'backbone_sha256' is not a sha256 hex digest: {fingerprint[:70]!r}")
    if shapes is not None:
        _check_against_shapes(config, shapes, fail)
    fields = {f: parsed(f, mapping=False) for f in DESCRIPTION_FIELDS if f in metadata}
    version = metadata.get("dtl_kernels_version")
    return {
        "format": metadata["format"],
        "version": version[:40] if isinstance(version, str) else None,
        "config": config,
        "backbone": backbone,
        "backbone_sha256": fingerprint,
        **check_description(fields, config["num_classes"], fail),
    }


def wrapper_options(config: dict) -> dict:
    """The wrapper's constructor arguments for a checked adapter ``config`` (only the
    validated fields: nothing else of the file reaches the constructor)."""
    kwargs = {"num_classes": config["num_classes"], "head": config["head_mode"]}
    if config["csn"] is not None:
        kwargs.update({k: config["csn"][k] for k in CSN_FIELDS})
    else:
        kwargs.update(side=False, train_backbone=config["method"] == "full")
    return kwargs


def _whole(v, low: int, high: int) -> bool:
    return _is_int(v) and low <= v <= high


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 70 else text[:67] + "..."


def _check_csn_fields(method: str, csn: dict | None, fail) -> None:
    if (csn is not None) != (method in ("dtl", "dtl+", "dtl+*")):
        fail(f"config 'csn' is {_short(csn)} for method {method!r}")
    if csn is None:
        return
    unknown = sorted(set(csn) - set(CSN_FIELDS))
    if unknown:
        fail(f"config 'csn' has unknown fields {_short(unknown)}")
    for key, low in (("rank", 1), ("tap_from", 1), ("adapt_from", 1), ("conv_kernel", 0)):
        if not _whole(csn.get(key), low, LIMITS[key]):
            fail(
                f"config 'csn.{key}' is {_short(csn.get(key))}, expected a whole number in "
                f"{low}…{LIMITS[key]}"
            )
    beta = csn.get("beta")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not abs(beta) <= FLOAT32_MAX:
        fail(f"config 'csn.beta' is {_short(beta)}, expected a finite float32 number")
    if (csn["conv_kernel"] == 0) != (method == "dtl"):
        fail(f"config 'csn.conv_kernel' is {csn['conv_kernel']} for method {method!r}")


def _check_lora_fields(method: str, lora, fail) -> None:
    if lora is None:
        return
    if method != "lora" or not isinstance(lora, dict) or set(lora) - {"rank", "targets", "blocks"}:
        fail(f"config 'lora' is {_short(lora)} for method {method!r}")
    if not _whole(lora.get("rank"), 1, LIMITS["lora.rank"]):
        fail(f"config 'lora.rank' is {_short(lora.get('rank'))}, expected a whole number in "
             f"1…{LIMITS['lora.rank']}")  # fmt: skip
    targets = lora.get("targets")
    if not (
        isinstance(targets, list)
        and 0 < len(targets) <= _MAX_LORA_TARGETS
        and all(isinstance(t, str) and 0 < len(t) <= _MAX_NAME for t in targets)
    ):
        fail(f"config 'lora.targets' is {_short(targets)}, expected a list of layer names")
    blocks = lora.get("blocks")  # LoRA on blocks M … N only (1-based; the depth bounds it later)
    if blocks is not None and not (
        isinstance(blocks, list)
        and len(blocks) == 2
        and all(_whole(b, 1, LIMITS["lora.blocks"]) for b in blocks)
        and blocks[0] <= blocks[1]
    ):
        fail(f"config 'lora.blocks' is {_short(blocks)}, expected [M, N] with 1 ≤ M ≤ N")


def _check_against_shapes(config: dict, shapes: dict[str, tuple[int, ...]], fail) -> None:
    """Every size of ``config`` agrees with the file's tensors (see :func:`adapter_info`)."""

    def rows(prefix: str) -> dict[str, tuple[int, ...]]:
        return {k: s for k, s in shapes.items() if k.startswith(prefix)}

    csn = config["csn"]
    if csn is not None:
        down, up, convs = rows("csn.down."), rows("csn.up."), rows("csn.convs.")
        if not down:
            fail("the file holds no side-network tensors (csn.down.*) for its config 'csn'")
        for name, shape in (down | up).items():
            if len(shape) != 2 or shape[0 if name.startswith("csn.down.") else 1] != csn["rank"]:
                fail(f"config 'csn.rank' is {csn['rank']}, but the file's {name} has shape "
                     f"{shape}")  # fmt: skip
        k = csn["conv_kernel"]
        if bool(convs) != (k > 0) or any(s[1:] != (1, k, k) for s in convs.values()):
            fail(f"config 'csn.conv_kernel' is {k}, but the file's convolutions have shapes "
                 f"{_short(sorted(set(convs.values())))}")  # fmt: skip
    n = config["num_classes"]
    head = {k: s for k, s in shapes.items() if k.startswith("head.")}
    if config["head_mode"] == "published":
        fits = set(head) == ({"head.weight", "head.bias"} if n else set())
        if fits and n:
            weight, bias = head["head.weight"], head["head.bias"]
            fits = bias == (n,) and len(weight) == 2 and weight[0] == n
        if not fits:
            fail(f"config 'num_classes' is {n}, but the file's head is {_short(head)}")
    elif n and not any(s[:1] == (n,) for k, s in shapes.items() if not k.startswith("csn.")):
        fail(f"config 'num_classes' is {n}, but no tensor of the file has {n} rows")
    lora = config.get("lora")
    if lora is not None:
        a = [s for k, s in shapes.items() if ".lora_A." in k]
        if not a or any(len(s) != 2 or s[0] != lora["rank"] for s in a):
            fail(f"config 'lora.rank' is {lora['rank']}, but the file's LoRA factors have "
                 f"shapes {_short(sorted(set(a)))}")  # fmt: skip
