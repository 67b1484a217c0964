"""Adapter files: the trained part of a model (CSN + head) as safetensors, with its
configuration, the backbone's identity and a fingerprint of the frozen backbone weights as
metadata; reading them back with a schema check and clear errors."""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch

from .._io import atomic_write
from .._untrusted import parse_json
from .._version import __version__

# Adapter metadata schema: /2 adds ``backbone_sha256`` (see AdapterFiles.backbone_fingerprint).
ADAPTER_FORMAT = "dtl_kernels.adapter/2"
ADAPTER_FORMATS = ("dtl_kernels.adapter/1", ADAPTER_FORMAT)
BACKBONE_MISMATCH = ("error", "warn")


class AdapterError(ValueError):
    """An adapter file that cannot be used; the message names the file and the problem."""


class AdapterFiles:
    """Mixin of :class:`~dtl_kernels.models.base.DTLModel`: save and load adapter files.

    Uses the model's ``backbone``, ``csn``, ``method``, ``head_mode``, ``num_classes``
    (and ``lora`` when set) and its :meth:`backbone_identity`.
    """

    def adapter_config(self) -> dict:
        return {
            "method": self.method,
            "head_mode": self.head_mode,
            "num_classes": self.num_classes,
            "csn": self.csn.config.to_dict() if self.csn is not None else None,
            **({"lora": self.lora} if getattr(self, "lora", None) else {}),
        }

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained part only: CSN + head (+ backbone for ``method="full"``)."""
        return {
            n: p.detach().contiguous().cpu()
            for n, p in self.named_parameters()
            if p.requires_grad or n.startswith("csn.")
        }

    def backbone_fingerprint(self) -> str | None:
        """sha256 of the frozen backbone parameters (name, shape and value rounded to
        bfloat16, so a bf16 copy of the same weights matches); ``None`` when nothing in the
        backbone is frozen (``full``: the adapter carries the whole backbone)."""
        frozen = sorted((n, p) for n, p in self.backbone.named_parameters() if not p.requires_grad)
        if not frozen:
            return None
        h = hashlib.sha256()
        for name, p in frozen:
            t = p.detach().to("cpu")
            t = (t.to(torch.bfloat16) if t.is_floating_point() else t).contiguous()
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        return h.hexdigest()

    def save_adapter(self, path: str | os.PathLike) -> Path:
        """Write the CSN + head as safetensors (atomically), with config, backbone identity
        and backbone weights fingerprint as metadata (schema ``ADAPTER_FORMAT``)."""
        from safetensors.torch import save_file

        metadata = {
            "format": ADAPTER_FORMAT,
            "dtl_kernels_version": __version__,
            "config": json.dumps(self.adapter_config(), sort_keys=True),
            "backbone": json.dumps(self.backbone_identity(), sort_keys=True),
        }
        fingerprint = self.backbone_fingerprint()
        if fingerprint is not None:
            metadata["backbone_sha256"] = fingerprint
        tensors = self.adapter_state_dict()
        return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

    def load_adapter(self, path: str | os.PathLike, backbone_mismatch: str = "error") -> None:
        """Load an adapter written by :meth:`save_adapter`.

        Args:
            path: the ``.safetensors`` file.
            backbone_mismatch: ``"error"`` (default) or ``"warn"``: what to do when the
                file's backbone weights fingerprint differs from this model's (an adapter
                trained on other weights of the same architecture).

        Raises ``FileNotFoundError`` if absent, :class:`AdapterError` (a ``ValueError``) if
        the file is not an adapter, is truncated, breaks the metadata schema, holds
        non-finite values, or if its backbone or configuration differ from this model's
        (the message lists each difference). Nothing is loaded unless everything fits.
        """
        if backbone_mismatch not in BACKBONE_MISMATCH:
            raise ValueError(f"backbone_mismatch must be one of {BACKBONE_MISMATCH}")
        tensors, metadata = read_adapter(path)
        info = adapter_info(metadata, path)
        diffs = _diff("backbone", info["backbone"], self.backbone_identity())
        diffs += _diff("config", info["config"], self.adapter_config())
        if diffs:
            raise AdapterError(f"adapter {path} does not fit this model: " + "; ".join(diffs))
        self._check_adapter_tensors(tensors, path)
        self._check_backbone_fingerprint(info["backbone_sha256"], path, backbone_mismatch)
        own = self.state_dict()
        with torch.no_grad():
            for k, v in tensors.items():
                own[k].copy_(v)

    def _check_adapter_tensors(self, tensors: dict[str, torch.Tensor], path) -> None:
        own = self.state_dict()
        expected = set(self.adapter_state_dict())
        missing = sorted(expected - set(tensors))
        unexpected = sorted(set(tensors) - expected)
        misshaped = [
            f"{k}: {tuple(v.shape)} != {tuple(own[k].shape)}"
            for k, v in tensors.items()
            if k in own and tuple(v.shape) != tuple(own[k].shape)
        ]
        if missing or unexpected or misshaped:
            raise AdapterError(
                f"adapter {path} has missing keys {missing}, unexpected keys {unexpected}, "
                f"mis-shaped keys {misshaped}"
            )
        bad = sorted(
            k for k, v in tensors.items() if v.is_floating_point() and not torch.isfinite(v).all()
        )
        if bad:
            raise AdapterError(f"adapter {path} holds NaN or infinite values in {bad[:8]}")

    def _check_backbone_fingerprint(self, theirs: str | None, path, on_mismatch: str) -> None:
        ours = self.backbone_fingerprint()
        if theirs is None or ours is None or theirs == ours:
            return
        message = (
            f"adapter {path} was trained on other backbone weights (fingerprint "
            f"{theirs[:12]}…, this backbone {ours[:12]}…): same architecture, different "
            "pretrained weights? Load the backbone it was trained on, or pass "
            "backbone_mismatch='warn' (dtl-train: --allow-backbone-mismatch) to load it anyway"
        )
        if on_mismatch == "error":
            raise AdapterError(message)
        warnings.warn(message, stacklevel=3)


# Sane limits of adapter metadata (those of dtl-train's options): far beyond any real model,
# they keep every product of sizes sane before the file's tensors are consulted.
LIMITS = {"num_classes": 2**24, "rank": 2**16, "tap_from": 2**16, "adapt_from": 2**16,
          "conv_kernel": 2**10, "lora.rank": 2**16}  # fmt: skip
CSN_FIELDS = ("rank", "beta", "tap_from", "adapt_from", "conv_kernel")  # CSNConfig's
_FP32_MAX = 3.4028234663852886e38
_MAX_LORA_TARGETS, _MAX_NAME = 64, 256


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an adapter file: ``(tensors, metadata)``. The metadata passed the schema check
    of :func:`adapter_info`, against the file's own tensor shapes, before any tensor is
    read. :class:`AdapterError` naming the file (and the field) for anything else."""
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
            adapter_info(metadata, path, shapes)
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except AdapterError:
        raise
    except Exception as exc:  # safetensors raises its own error types for bad files
        raise AdapterError(f"{path} is not a readable safetensors adapter file ({exc})") from exc
    return tensors, metadata


def adapter_info(
    metadata: dict[str, str],
    path: str | os.PathLike = "adapter",
    shapes: dict[str, tuple[int, ...]] | None = None,
) -> dict:
    """The adapter metadata, parsed and schema-checked: ``{"format", "config": {method,
    head_mode, num_classes, csn[, lora]}, "backbone": {family, …}, "backbone_sha256": str |
    None}``. Every size is bounded by :data:`LIMITS` and, given the file's tensor
    ``shapes``, must agree with them (so a model built from it allocates no more than the
    file holds). :class:`AdapterError` naming the file and the field for anything missing,
    mistyped, out of range or inconsistent."""
    from .base import HEAD_MODES
    from .factory import METHODS

    def fail(problem: str):
        raise AdapterError(f"adapter {path}: {problem} (schema {str(metadata.get('format'))[:40]})")

    def parsed(field: str) -> dict:
        if field not in metadata:
            fail(f"metadata has no '{field}'")
        try:
            value = parse_json(metadata[field], f"metadata '{field}'")
        except ValueError as exc:
            fail(str(exc))
        if not isinstance(value, dict):
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
    return {
        "format": metadata["format"],
        "config": config,
        "backbone": backbone,
        "backbone_sha256": fingerprint,
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
    if isinstance(beta, bool) or not isinstance(beta, (int, float)) or not abs(beta) <= _FP32_MAX:
        fail(f"config 'csn.beta' is {_short(beta)}, expected a finite float32 number")
    if (csn["conv_kernel"] == 0) != (method == "dtl"):
        fail(f"config 'csn.conv_kernel' is {csn['conv_kernel']} for method {method!r}")


def _check_lora_fields(method: str, lora, fail) -> None:
    if lora is None:
        return
    if method != "lora" or not isinstance(lora, dict) or set(lora) - {"rank", "targets"}:
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
            r = shape[0] if name.startswith("csn.down.") else shape[-1]
            if len(shape) != 2 or r != csn["rank"]:
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


def _diff(what: str, theirs: dict | None, ours: dict | None) -> list[str]:
    theirs, ours = theirs or {}, ours or {}
    out = []
    for key in sorted(set(theirs) | set(ours)):
        a, b = theirs.get(key), ours.get(key)
        if isinstance(a, dict) or isinstance(b, dict):
            out += _diff(f"{what}.{key}", a, b)
        elif _normal(a) != _normal(b):
            out.append(f"{what}.{key}: file has {a!r}, model has {b!r}")
    return out


def _normal(v):
    return list(v) if isinstance(v, (tuple, list)) else v
