"""What an adapter holds, in memory: the trained tensors, the configuration that rebuilds
the wrapper, the backbone's identity and a fingerprint of its frozen weights. The
wrappers know nothing of files: writing and reading adapter files is
:mod:`dtl_kernels.models.adapters`, above them."""

from __future__ import annotations

import hashlib
import warnings

import torch

from .._untrusted import non_float_for_float

BACKBONE_MISMATCH = ("error", "warn")


class AdapterError(ValueError):
    """An adapter that cannot be used; the message names its source and the problem."""


class AdapterState:
    """Mixin of :class:`~dtl_kernels.models.base.DTLModel`: its adapter, in memory.

    Uses the model's ``backbone``, ``csn``, ``method``, ``head_mode``, ``num_classes``
    (and ``lora`` when set) and its :meth:`backbone_identity`.
    """

    def adapter_config(self) -> dict:
        """``{method, head_mode, num_classes, csn[, lora]}``: what rebuilds the wrapper."""
        return {
            "method": self.method,
            "head_mode": self.head_mode,
            "num_classes": self.num_classes,
            "csn": self.csn.config.to_dict() if self.csn is not None else None,
            **({"lora": self.lora} if getattr(self, "lora", None) else {}),
        }

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trained part only: CSN + head (+ backbone for ``method="full"``), on the CPU."""
        return {
            n: p.detach().contiguous().cpu()
            for n, p in self.named_parameters()
            if p.requires_grad or n.startswith("csn.")
        }

    def backbone_fingerprint(self, via: torch.dtype | None = None) -> str | None:
        """sha256 of the frozen backbone parameters (name, shape and value rounded to
        bfloat16, so a bf16 copy of the same weights matches); ``None`` when nothing in the
        backbone is frozen (``full``: the adapter carries the whole backbone). ``via``: round
        to that dtype first (``float16``: what a float16 copy of these weights gives, whose
        bfloat16 rounding differs from float32's for ~6 % of values)."""
        frozen = sorted((n, p) for n, p in self.backbone.named_parameters() if not p.requires_grad)
        if not frozen:
            return None
        h = hashlib.sha256()
        for name, p in frozen:
            t = p.detach().to("cpu")
            if t.is_floating_point():
                t = (t.to(via) if via is not None else t).to(torch.bfloat16)
            t = t.contiguous()
            h.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
            if t.numel():
                h.update(t.reshape(-1).view(torch.uint8).numpy().data)
        return h.hexdigest()

    def _check_input_size(self, preprocessing: dict | None, source: str) -> None:
        """The recorded ``input_size`` must be one this model takes: its channels, and the
        backbone's own size where that is fixed (else every image is resized to it --
        16384² px, 3.2 GB each -- before the model refuses it, and a wrong channel count
        was reported as an unreadable image)."""
        if preprocessing is None:
            return
        channels, height, width = preprocessing["input_size"]
        native = self.native_input_size()
        # timm's pretrained_cfg says 3 whatever in_chans is (and adapters record it): the
        # stem convolution's count is accepted beside it, and named
        stem = self.input_channels()
        if channels not in (native[0], stem):
            raise AdapterError(f"adapter {source}: 'preprocessing.input_size' has {channels} "
                               f"channels, the model takes {stem or native[0]}")  # fmt: skip
        patch_embed = getattr(self.backbone, "patch_embed", None)
        if getattr(patch_embed, "strict_img_size", False) and (height, width) != native[1:]:
            raise AdapterError(
                f"adapter {source}: 'preprocessing.input_size' is {height}x{width}, the "
                f"backbone is fixed to {native[1]}x{native[2]}"
            )

    def load_adapter_state(
        self,
        tensors: dict[str, torch.Tensor],
        info: dict,
        source: str = "adapter",
        backbone_mismatch: str = "error",
    ) -> None:
        """Copy an adapter's ``tensors`` into this model after checking that it fits.

        Args:
            tensors: name → tensor, as :meth:`adapter_state_dict` gives them.
            info: ``{"config", "backbone", "backbone_sha256"}`` of the adapter (as
                :func:`dtl_kernels.models.adapters.adapter_info` parses them).
            source: what the errors call the adapter (its file name).
            backbone_mismatch: ``"error"`` or ``"warn"`` when the adapter's backbone weights
                fingerprint differs from this model's (other weights, same architecture).

        :class:`AdapterError` lists every difference of backbone or configuration, missing,
        unexpected and mis-shaped tensors, non-finite values. Nothing is copied unless
        everything fits.
        """
        if backbone_mismatch not in BACKBONE_MISMATCH:
            raise ValueError(f"backbone_mismatch must be one of {BACKBONE_MISMATCH}")
        diffs = _diff("backbone", info["backbone"], self.backbone_identity())
        diffs += _diff("config", info["config"], self.adapter_config())
        if diffs:
            raise AdapterError(f"adapter {source} does not fit this model: " + "; ".join(diffs))
        self._check_input_size(info.get("preprocessing"), source)
        self._check_adapter_tensors(tensors, source)
        origin = info.get("model")
        random = isinstance(origin, dict) and origin.get("pretrained") == "none"
        self._check_backbone_fingerprint(info.get("backbone_sha256"), source, backbone_mismatch,
                                         random)  # fmt: skip
        own = self.state_dict()
        with torch.no_grad():
            for k, v in tensors.items():
                own[k].copy_(v)

    def _check_adapter_tensors(self, tensors: dict[str, torch.Tensor], source: str) -> None:
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
                f"adapter {source} has missing keys {missing}, unexpected keys {unexpected}, "
                f"mis-shaped keys {misshaped}"
            )
        # a real floating dtype where the model's is one (a complex tensor would lose its
        # imaginary part, a bool or integer one pass for weights), finite in the model's dtype
        wrong = sorted(non_float_for_float(tensors, own))
        if wrong:
            raise AdapterError(f"adapter {source} holds tensors of a non-float dtype: {wrong[:8]}")
        bad = sorted(
            k
            for k, v in tensors.items()
            if v.is_floating_point() and not torch.isfinite(v.to(own[k].dtype)).all()
        )
        if bad:
            raise AdapterError(
                f"adapter {source} holds NaN or infinite values in {bad[:8]} (in the model's dtype)"
            )

    def _check_backbone_fingerprint(self, theirs: str | None, source: str, on_mismatch: str,
                                    random: bool = False):  # fmt: skip
        """``random``: the adapter says its backbone had random weights (pretrained
        "none"), which only the same seed and build reproduce."""
        ours = self.backbone_fingerprint()
        if theirs is None or ours is None or theirs == ours:
            return
        if theirs == self.backbone_fingerprint(via=torch.float16):
            return  # saved from a float16 copy of these weights (--backbone-dtype fp16)
        message = (
            f"adapter {source} was trained on other backbone weights (fingerprint "
            f"{theirs[:12]}…, this backbone {ours[:12]}…): same architecture, different "
            "pretrained weights? Load the backbone it was trained on (dtl-train / dtl-predict: "
            "--pretrained), or pass backbone_mismatch='warn' (--allow-backbone-mismatch) to "
            "load it anyway (a float16 backbone's adapter matches float16 / float32 copies of "
            "its weights, not bfloat16 ones)"
        )
        if random:  # timm's init runs in the kept dtype there (models/materialize.py)
            message += (
                ". It was trained on a RANDOM backbone: only the same seed and backbone "
                "dtype rebuild it (dtl-train: --seed, --backbone-dtype)"
            )
        if on_mismatch == "error":
            raise AdapterError(message)
        warnings.warn(message, stacklevel=4)


def backbone_differences(theirs: dict | None, ours: dict | None) -> list[str]:
    """``"backbone.<field>: file has …, model has …"`` for each field where an adapter's
    backbone identity (``theirs``) and a model's differ."""
    return _diff("backbone", theirs, ours)


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
