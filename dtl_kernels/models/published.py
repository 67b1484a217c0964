"""Published checkpoints (SPEC §6): our CSN and head weights under the key names of the
published implementation, and loading its checkpoints (CSN, head and backbone keys)."""

from __future__ import annotations

import re

import torch

# The published Swin registers its shared LoRA modules in every stage as well.
_STAGE_ALIAS = re.compile(r"layers\.\d+\.(lora_dict\.\d+\.lora_[AB]|lora_fusions\.\d+\.weight)")


class PublishedCheckpoint:
    """Mixin of :class:`~dtl_kernels.models.base.DTLModel`: the published key names.

    Uses the model's ``csn``, ``backbone``, ``per_stage_convs`` and ``_head_parameters``;
    a wrapper may override :meth:`_ignorable_official_keys` and
    :meth:`_filter_backbone_checkpoint` (its backbone's old key names).
    """

    def _official_mapping(self) -> dict[str, str]:
        """Published key → our state-dict key, for the CSN and the head."""
        mapping = {}
        if self.csn is not None:
            for theirs, ours in self.csn.official_to_local(self.per_stage_convs).items():
                mapping[theirs] = f"csn.{ours}"
        for name, _ in self._head_parameters():
            mapping[name.removeprefix("backbone.")] = name
        return mapping

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


def _unwrap_checkpoint(sd: dict) -> dict:
    """Published / timm checkpoints sometimes nest the weights under one key."""
    for key in ("model", "state_dict", "model_state"):
        if key in sd and isinstance(sd[key], dict):
            return sd[key]
    return sd


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
