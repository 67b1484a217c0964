"""What every DTL model wrapper shares: freezing, parameter accounting, published
checkpoints and adapter files. Wrappers (ViT, Swin, CNN) only say how to walk their
backbone; they hold no kernel math (that is in :mod:`dtl_kernels.ops`)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import warnings
from pathlib import Path

import torch
from torch import nn

from .._io import atomic_write
from .._version import __version__
from ..csn import CompactSideNetwork, CSNConfig

# Adapter metadata schema: /2 adds ``backbone_sha256`` (see DTLModel.backbone_fingerprint).
ADAPTER_FORMAT = "dtl_kernels.adapter/2"
ADAPTER_FORMATS = ("dtl_kernels.adapter/1", ADAPTER_FORMAT)
BACKBONE_MISMATCH = ("error", "warn")
HEAD_MODES = ("published", "backbone")
# The published Swin registers its shared LoRA modules in every stage as well.
_STAGE_ALIAS = re.compile(r"layers\.\d+\.(lora_dict\.\d+\.lora_[AB]|lora_fusions\.\d+\.weight)")


class AdapterError(ValueError):
    """An adapter file that cannot be used; the message names the file and the problem."""


class DTLModel(nn.Module):
    """Base of :class:`DTLViT`, :class:`DTLSwin` and the CNN wrapper.

    Subclasses set ``backbone``, ``csn`` (or ``None`` for the linear / full baselines),
    ``head`` and implement :meth:`forward_features`, :meth:`forward_head` and
    :meth:`backbone_identity`.
    """

    #: ViT has one shared conv (``lora_fusion``); staged backbones one per stage.
    per_stage_convs = False

    def __init__(self) -> None:
        super().__init__()
        self.csn: CompactSideNetwork | None = None
        self.head_mode = "published"
        self.method = "dtl"
        self.backbone_dtype: torch.dtype | None = None  # memory.set_backbone_dtype

    def backbone_images(self, images: torch.Tensor) -> torch.Tensor:
        """Images in the frozen backbone's dtype (unchanged unless ``backbone_dtype``)."""
        if self.backbone_dtype is not None and images.is_floating_point():
            return images.to(self.backbone_dtype)
        return images

    # -- freezing and accounting ------------------------------------------------------
    def _freeze(self, train_backbone: bool, trainable_backbone_prefixes: tuple[str, ...] = ()):
        """Freeze the backbone except ``trainable_backbone_prefixes`` (its own head when
        ``head="backbone"``); everything outside the backbone stays trainable."""
        for name, p in self.backbone.named_parameters():
            p.requires_grad_(train_backbone or name.startswith(trainable_backbone_prefixes))

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters an optimizer should see (CSN + head, or more for baselines)."""
        return [p for p in self.parameters() if p.requires_grad]

    def num_parameters(self, trainable_only: bool = False) -> int:
        params = self.trainable_parameters() if trainable_only else list(self.parameters())
        return sum(p.numel() for p in params)

    def summary(self) -> str:
        """One line: method, trainable and total parameter counts and their ratio."""
        trainable, total = self.num_parameters(True), self.num_parameters()
        cfg = self.csn.config if self.csn is not None else None
        side = (
            f"rank={cfg.rank} adapt_from={cfg.adapt_from} tap_from={cfg.tap_from} "
            f"conv_kernel={cfg.conv_kernel} beta={cfg.beta}"
            if cfg
            else "no side network"
        )
        return (
            f"{type(self).__name__} [{self.method}; {side}; head={self.head_mode}]: "
            f"{trainable:,} trainable / {total:,} total parameters "
            f"({100.0 * trainable / max(total, 1):.3f}%)"
        )

    def print_summary(self) -> None:
        print(self.summary())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: ``(batch, 3, H, W)`` float → logits ``(batch, num_classes)``."""
        return self.forward_head(self.forward_features(images))

    # -- the block walk every wrapper shares -------------------------------------------
    # A wrapper describes its backbone with: ``embed`` (images → input of block 0 and a
    # context), ``blocks`` (the frozen blocks in order), ``block_input`` (anything that
    # runs between blocks, e.g. Swin's patch merging) and ``tokens`` / ``untokens`` (the
    # backbone's feature layout ↔ the CSN's ``(batch, tokens, d)``).
    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, dict]:
        raise NotImplementedError

    @property
    def blocks(self) -> list[nn.Module]:
        raise NotImplementedError

    def block_input(self, i: int, x: torch.Tensor) -> torch.Tensor:
        return x

    def tokens(self, x: torch.Tensor, ctx: dict) -> tuple[torch.Tensor, tuple[int, int], int]:
        """Features → ``(tokens (batch, N, d), grid (H, W), num_prefix)``."""
        raise NotImplementedError

    def untokens(self, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return t.reshape(like.shape)

    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images → features after the last block (before the final norm)."""
        x, ctx = self.embed(self.backbone_images(images))
        state = self.csn.start() if self.csn is not None else None
        return self.run_blocks(x, ctx, state, 0, len(self.blocks))

    # -- trunk / tail split (feature reuse, trunk caching; SPEC §3) -------------------------
    @property
    def trunk_depth(self) -> int:
        """Blocks ``0 … trunk_depth-1`` (0-based) see task-independent inputs: up to and
        including the first adapted block ``M``."""
        if self.csn is None:
            return len(self.blocks)
        return self.csn.config.adapt_from

    @torch.no_grad()
    def trunk_forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor, dict]:
        """Run the frozen trunk once, with no autograd.

        Returns ``(taps_inputs, y, ctx)``: the token tensors ``z_i`` ``(batch, N_i, d_i)``
        of the tapped blocks before ``M`` and of block ``M`` itself, the output ``y`` of
        block ``M`` before its add-back (the backbone's own layout), and the walk
        context. Everything training needs from the trunk: feed it to
        :meth:`forward_from_trunk`.
        """
        x, ctx = self.embed(self.backbone_images(images))
        blocks, csn, inputs = self.blocks, self.csn, []
        y = x
        for i in range(self.trunk_depth):
            x = self.block_input(i, x)
            if csn is not None and csn.is_tapped(i):
                inputs.append(self.tokens(x, ctx)[0])
            y = x = self.call_block(blocks[i], i, x, ctx)
        return inputs, y, ctx

    def forward_from_trunk(
        self, taps_inputs: list[torch.Tensor], y: torch.Tensor, ctx: dict
    ) -> torch.Tensor:
        """Logits from :meth:`trunk_forward`'s outputs: the CSN taps, block ``M``'s add-back,
        the tail blocks and the head. Equals ``forward(images)``."""
        csn, depth = self.csn, self.trunk_depth
        state = csn.start() if csn is not None else None
        if csn is not None:
            tapped = [i for i in range(depth) if csn.is_tapped(i)]
            if len(tapped) != len(taps_inputs):
                raise ValueError(f"expected {len(tapped)} trunk tap inputs, got {len(taps_inputs)}")
            for i, z in zip(tapped, taps_inputs, strict=False):
                csn.tap(state, i, z)
            if csn.is_adapted(depth - 1):  # a CNN's block M may change shape: no add-back
                t, grid, num_prefix = self.tokens(y, ctx)
                y = self.untokens(csn.add_back(state, depth - 1, t, grid, num_prefix), y)
        x = self.run_blocks(y, ctx, state, depth, len(self.blocks))
        return self.forward_head(x)

    def call_block(self, block: nn.Module, i: int, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Block ``i`` (0-based) on ``x``; a backbone whose blocks take more than the tokens
        (EVA's rotary embedding) passes it from ``ctx`` here."""
        return block(x)

    def run_blocks(self, x: torch.Tensor, ctx: dict, state, start: int, stop: int) -> torch.Tensor:
        """Run blocks ``start … stop-1`` (0-based) with taps and add-backs.

        ``state`` is the CSN's side state (``None`` without a CSN); it is updated in place,
        so a walk can be split (shared trunk, cached trunk) and resumed.
        """
        csn, blocks = self.csn, self.blocks
        for i in range(start, stop):
            x = self.block_input(i, x)
            if csn is not None and csn.is_tapped(i):
                csn.tap(state, i, self.tokens(x, ctx)[0])
            y = self.call_block(blocks[i], i, x, ctx)
            if csn is not None and csn.is_adapted(i):
                t, grid, num_prefix = self.tokens(y, ctx)
                y = self.untokens(csn.add_back(state, i, t, grid, num_prefix), y)
            x = y
        return x

    # -- identity ------------------------------------------------------------------------
    def backbone_identity(self) -> dict:
        raise NotImplementedError

    def adapter_config(self) -> dict:
        return {
            "method": self.method,
            "head_mode": self.head_mode,
            "num_classes": self.num_classes,
            "csn": self.csn.config.to_dict() if self.csn is not None else None,
            **({"lora": self.lora} if getattr(self, "lora", None) else {}),
        }

    # -- published checkpoints (SPEC §6) ---------------------------------------------------
    def _official_mapping(self) -> dict[str, str]:
        """Published key → our state-dict key, for the CSN and the head."""
        mapping = {}
        if self.csn is not None:
            for theirs, ours in self.csn.official_to_local(self.per_stage_convs).items():
                mapping[theirs] = f"csn.{ours}"
        for name, _ in self._head_parameters():
            mapping[name.removeprefix("backbone.")] = name
        return mapping

    def _head_parameters(self) -> list[tuple[str, nn.Parameter]]:
        prefix = "head." if self.head_mode == "published" else "backbone.head."
        return [(n, p) for n, p in self.named_parameters() if n.startswith(prefix)]

    def official_state_dict(self, include_backbone: bool = False) -> dict[str, torch.Tensor]:
        """Our weights under the published implementation's key names.

        Args:
            include_backbone: also write the frozen backbone's own keys.
        """
        own = self.state_dict()
        out = {
            theirs: own[ours].detach().clone() for theirs, ours in self._official_mapping().items()
        }
        if include_backbone:
            for k, v in self.backbone.state_dict().items():
                out.setdefault(k, v.detach().clone())
        return out

    def load_official_state_dict(self, state_dict: dict[str, torch.Tensor], strict: bool = True):
        """Load a checkpoint of the published implementation.

        Keys ``lora_dict.<i>.lora_A/B``, ``lora_fusion.weight`` / ``lora_fusions.<s>.weight``
        and ``head.*`` go to the CSN and head; any other key that names a backbone tensor is
        loaded into the (frozen) backbone. The published Swin's per-stage aliases
        ``layers.<s>.lora_dict.<i>.lora_A/B`` and ``layers.<s>.lora_fusions.<j>.weight``
        are accepted when equal to their top-level tensor. Raises ``ValueError`` listing
        missing (strict), unexpected (strict), mis-shaped (always) keys and aliases that
        differ from their top-level tensor (always).
        """
        if not isinstance(state_dict, dict):
            raise TypeError(f"expected a state dict (dict), got {type(state_dict).__name__}")
        state_dict = _fold_stage_aliases(_unwrap_checkpoint(state_dict))
        mapping = self._official_mapping()
        own = self.state_dict()
        backbone_keys = self.backbone.state_dict()
        ignorable = self._ignorable_official_keys()
        missing = [k for k in mapping if k not in state_dict]
        misshaped, to_load, rest = [], {}, {}
        for key, value in state_dict.items():
            if key in mapping:
                target = own[mapping[key]]
                if tuple(value.shape) != tuple(target.shape):
                    misshaped.append(f"{key}: {tuple(value.shape)} != {tuple(target.shape)}")
                else:
                    to_load[mapping[key]] = value
            elif not ignorable(key):
                rest[key] = value
        # Everything else should be the backbone's own weights (possibly old-style names).
        backbone_part = self._filter_backbone_checkpoint(rest) if rest else {}
        unexpected = [k for k in backbone_part if k not in backbone_keys]
        for key, value in backbone_part.items():
            target = backbone_keys.get(key)
            if target is not None and tuple(value.shape) != tuple(target.shape):
                misshaped.append(f"{key}: {tuple(value.shape)} != {tuple(target.shape)}")
        problems = []
        if strict and missing:
            problems.append(f"missing keys: {', '.join(missing)}")
        if strict and unexpected:
            problems.append(f"unexpected keys: {', '.join(unexpected)}")
        if misshaped:
            problems.append(f"mis-shaped keys: {'; '.join(misshaped)}")
        if problems:
            raise ValueError("cannot load the published checkpoint: " + " | ".join(problems))
        with torch.no_grad():
            for name, value in to_load.items():
                own[name].copy_(value)
            known = {k: v for k, v in backbone_part.items() if k in backbone_keys}
            if known:
                self.backbone.load_state_dict(known, strict=False)
        return {"missing": missing, "unexpected": unexpected}

    def _ignorable_official_keys(self):
        """Keys the published code writes that never affect this model's output."""
        return lambda key: False

    def _filter_backbone_checkpoint(self, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return sd

    # -- adapter files -------------------------------------------------------------------
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


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read an adapter file: ``(tensors, metadata)``; the metadata passed the schema check
    of :func:`adapter_info`. Clear errors for anything else."""
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"adapter file not found: {path}")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # safetensors raises its own error types for bad files
        raise AdapterError(f"{path} is not a readable safetensors adapter file ({exc})") from exc
    if metadata.get("format") not in ADAPTER_FORMATS:
        raise AdapterError(
            f"{path} is a safetensors file but not a dtl_kernels adapter "
            f"(format={metadata.get('format')!r}; this version reads {ADAPTER_FORMATS})"
        )
    adapter_info(metadata, path)
    return tensors, metadata


def adapter_info(metadata: dict[str, str], path: str | os.PathLike = "adapter") -> dict:
    """The adapter metadata, parsed and schema-checked: ``{"format", "config": {method,
    head_mode, num_classes, csn}, "backbone": {family, …}, "backbone_sha256": str | None}``.
    :class:`AdapterError` naming the file and the field for anything missing or mistyped."""
    from .factory import METHODS

    def fail(problem: str):
        raise AdapterError(f"adapter {path}: {problem} (schema {metadata.get('format')})")

    def parsed(field: str) -> dict:
        if field not in metadata:
            fail(f"metadata has no '{field}'")
        try:
            value = json.loads(metadata[field])
        except (TypeError, ValueError):
            fail(f"metadata '{field}' is not JSON")
        if not isinstance(value, dict):
            fail(f"metadata '{field}' is not a mapping")
        return value

    config, backbone = parsed("config"), parsed("backbone")
    for key, ok, want in (
        ("method", lambda v: v in METHODS, f"one of {METHODS}"),
        ("head_mode", lambda v: v in HEAD_MODES, f"one of {HEAD_MODES}"),
        ("num_classes", lambda v: _is_int(v) and v >= 0, "a whole number ≥ 0"),
        ("csn", lambda v: v is None or isinstance(v, dict), "a mapping or null"),
    ):
        if key not in config:
            fail(f"config has no '{key}'")
        if not ok(config[key]):
            fail(f"config '{key}' is {config[key]!r}, expected {want}")
    _check_csn_fields(config["csn"], fail)
    if not isinstance(backbone.get("family"), str):
        fail("backbone has no 'family'")
    fingerprint = metadata.get("backbone_sha256")
    if fingerprint is not None and not re.fullmatch(r"[0-9a-f]{64}", fingerprint):
        fail(f"'backbone_sha256' is not a sha256 hex digest: {fingerprint[:70]!r}")
    return {
        "format": metadata["format"],
        "config": config,
        "backbone": backbone,
        "backbone_sha256": fingerprint,
    }


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_csn_fields(csn: dict | None, fail) -> None:
    if csn is None:
        return
    for key, low in (("rank", 1), ("tap_from", 1), ("adapt_from", 1), ("conv_kernel", 0)):
        if not _is_int(csn.get(key)) or csn[key] < low:
            fail(f"config 'csn.{key}' is {csn.get(key)!r}, expected a whole number ≥ {low}")
    beta = csn.get("beta")
    if isinstance(beta, bool) or not isinstance(beta, (int, float)):
        fail(f"config 'csn.beta' is {beta!r}, expected a number")


def _fold_stage_aliases(sd: dict) -> dict:
    """Drop the published Swin's per-stage copies (``layers.<s>.<shared key>``) of its
    shared LoRA tensors after checking each equals its top-level tensor (taken from the
    copies when the top-level key is absent). ``ValueError`` naming a copy that differs."""
    out, copies = {}, {}
    for key, value in sd.items():
        m = _STAGE_ALIAS.fullmatch(key) if isinstance(key, str) else None
        if m is None:
            out[key] = value
        else:
            copies.setdefault(m.group(1), []).append((key, value))
    for top, aliases in copies.items():
        ref = out.setdefault(top, aliases[0][1])
        for key, value in aliases:
            same = (
                isinstance(value, torch.Tensor)
                and isinstance(ref, torch.Tensor)
                and value.shape == ref.shape
                and torch.equal(value.to(ref.dtype), ref)
            )
            if not same:
                raise ValueError(
                    f"cannot load the published checkpoint: {key} differs from {top} "
                    "(the per-stage copies of the shared LoRA tensors must be equal)"
                )
    return out


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


def _unwrap_checkpoint(sd: dict) -> dict:
    """Published / timm checkpoints sometimes nest the weights under one key."""
    for key in ("model", "state_dict", "model_state"):
        if key in sd and isinstance(sd[key], dict):
            return sd[key]
    return sd


def validate_head_mode(head: str) -> str:
    if head not in HEAD_MODES:
        raise ValueError(f"head must be one of {HEAD_MODES}, got {head!r}")
    return head


def new_head(width: int, num_classes: int) -> nn.Module:
    """Published head: Linear with trunc-normal(std 0.02) weight and zero bias."""
    if num_classes <= 0:
        return nn.Identity()
    head = nn.Linear(width, num_classes)
    nn.init.trunc_normal_(head.weight, std=0.02)
    nn.init.zeros_(head.bias)
    return head


def csn_config(rank, beta, tap_from, adapt_from, conv_kernel) -> CSNConfig:
    return CSNConfig(
        rank=rank,
        beta=float(beta) if isinstance(beta, int) and not isinstance(beta, bool) else beta,
        tap_from=tap_from,
        adapt_from=adapt_from,
        conv_kernel=conv_kernel,
    )


def _architecture(backbone: nn.Module) -> str:
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(backbone).__name__


def _method_name(side: bool, train_backbone: bool, csn: CompactSideNetwork | None) -> str:
    if not side:
        return "full" if train_backbone else "linear"
    c = csn.config
    if c.conv_kernel == 0:
        return "dtl"
    return "dtl+*" if c.adapt_from == 1 else "dtl+"
