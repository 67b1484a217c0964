"""The Compact Side Network (CSN): the only trainable part of DTL besides the head.

It owns the parameters (``A_i``, ``B_i`` per tapped block, one depthwise kernel per
stage for DTL+), the configuration, the mapping to the published checkpoint names, and
the per-forward side state. It knows nothing about ViT or Swin: a model wrapper tells
it the width and stage of every block and calls :meth:`tap` before a block and
:meth:`add_back` after it. The math lives in :mod:`dtl_kernels.ops`.

Block indices here are 0-based; the user-facing ``tap_from`` / ``adapt_from`` are the
paper's 1-based numbers.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from . import memory
from .ops import reference, side
from .ops.contract import SideArgs


@dataclass(frozen=True)
class CSNConfig:
    """Hyper-parameters of a CSN (all user-facing indices are 1-based, as in the paper).

    Attributes:
        rank: ``r``, columns of every tap.
        beta: β of the Swish θ (fixed, not learned).
        tap_from: first tapped block ``i`` (taps on blocks ``tap_from … N``).
        adapt_from: ``M``; add-back after blocks ``M … N``.
        conv_kernel: ``k`` of the depthwise conv of DTL+; ``0`` is plain DTL.
    """

    rank: int = 2
    beta: float = 100.0
    tap_from: int = 1
    adapt_from: int = 7
    conv_kernel: int = 0

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class SideState:
    """What one forward pass carries from block to block (never a parameter).

    The reference backend keeps the running ``h`` (the published eager formulation);
    fused backends keep only the rank-r taps and rebuild ``h`` inside the kernel. The
    backend is chosen once, at the first tap of the pass.
    """

    backend: str | None = None
    stage: int = -1
    taps: list[torch.Tensor] = field(default_factory=list)
    ups: list[torch.Tensor] = field(default_factory=list)
    h: torch.Tensor | None = None


class CompactSideNetwork(nn.Module):
    """Low-rank taps and add-backs beside a frozen backbone of ``N`` blocks.

    Args:
        block_widths: width ``d`` of each block's input, length ``N``.
        block_stages: stage id of each block (non-decreasing); ``h`` restarts per stage
            and each stage with adapted blocks gets its own depthwise conv.
        config: :class:`CSNConfig`.
        tappable: per block, whether it can be tapped / adapted at all (default: all).
            Blocks whose input and output shapes differ (a CNN block with a stride or a
            channel change) are not tappable: they get no ``A``/``B``, no tap and no
            add-back, whatever ``tap_from`` / ``adapt_from`` say.
    """

    def __init__(
        self,
        block_widths: list[int],
        block_stages: list[int],
        config: CSNConfig,
        tappable: list[bool] | None = None,
    ):
        super().__init__()
        depth = len(block_widths)
        tappable = [True] * depth if tappable is None else [bool(t) for t in tappable]
        _validate(config, block_widths, block_stages, tappable)
        self.config = config
        self.block_widths = list(block_widths)
        self.block_stages = list(block_stages)
        self.tappable = tappable
        self.backend = "auto"
        # Memory option (see dtl_kernels.memory): dtype in which trunk taps (inputs that
        # need no gradient) keep z_i for ∂A_i; None keeps z_i as it is.
        self.trunk_dtype: torch.dtype | None = None
        r, k = config.rank, config.conv_kernel
        self.down = nn.ParameterDict()
        self.up = nn.ParameterDict()
        for i in range(config.tap_from - 1, depth):
            if not tappable[i]:
                continue
            self.down[str(i)] = nn.Parameter(torch.empty(r, block_widths[i]))
            self.up[str(i)] = nn.Parameter(torch.empty(block_widths[i], r))
        self.convs = nn.ParameterDict()
        if k > 0:
            for i in range(config.adapt_from - 1, depth):
                s = str(block_stages[i])
                if tappable[i] and s not in self.convs:
                    self.convs[s] = nn.Parameter(torch.empty(block_widths[i], 1, k, k))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Published init: ``A ~ U(±1/√d)``, ``B = 0``, conv as PyTorch's Conv2d default."""
        for a in self.down.values():
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        for b in self.up.values():
            nn.init.zeros_(b)
        for w in self.convs.values():
            nn.init.kaiming_uniform_(w, a=math.sqrt(5))

    # -- structure -------------------------------------------------------------------
    @property
    def depth(self) -> int:
        return len(self.block_widths)

    def is_tapped(self, i: int) -> bool:
        return i >= self.config.tap_from - 1 and self.tappable[i]

    def is_adapted(self, i: int) -> bool:
        return i >= self.config.adapt_from - 1 and self.tappable[i]

    # -- forward ---------------------------------------------------------------------
    def start(self) -> SideState:
        """A fresh side state for one forward pass."""
        return SideState()

    def tap(self, state: SideState, i: int, z: torch.Tensor) -> None:
        """Record block ``i``'s tap ``z · A_iᵀ``. ``z``: ``(batch, tokens, d_i)``."""
        stage = self.block_stages[i]
        if stage != state.stage:  # h restarts at every stage
            state.stage, state.taps, state.ups, state.h = stage, [], [], None
        if state.backend is None:  # the conv (DTL+) and dtype decide auto's order on CUDA
            conv = next(iter(self.convs.values())) if len(self.convs) else None
            state.backend = side.select(z, self.backend, conv_weight=conv)
        down = self.down[str(i)]
        if down.dtype != z.dtype and not torch.is_autocast_enabled(z.device.type):
            down = down.to(z.dtype)  # a low-precision frozen backbone (backbone_dtype)
        keeps_z = torch.is_grad_enabled() and down.requires_grad  # only ∂A needs z
        low = self.trunk_dtype
        if low is not None and keeps_z and not z.requires_grad and z.dtype != low:
            t = memory.low_precision_tap(z, down, low)
        else:
            t = reference.tap(z, down)
        up = self.up[str(i)]
        if state.backend == "reference" and up.dtype != t.dtype:
            up = up.to(t.dtype)
        if state.backend == "reference":
            state.h = reference.accumulate(state.h, t, up)
        else:
            state.taps.append(t)
            state.ups.append(up)

    def add_back(
        self,
        state: SideState,
        i: int,
        y: torch.Tensor,
        grid: tuple[int, int],
        num_prefix: int = 0,
    ) -> torch.Tensor:
        """Return ``y + θ(h_i)`` (DTL) or ``y + g(θ(h_i))`` (DTL+) after block ``i``.

        Args:
            y: ``(batch, tokens, d_i)`` output of block ``i``.
            grid: ``(H, W)`` of the patch tokens.
            num_prefix: leading tokens that are not on the grid.
        """
        if state.stage != self.block_stages[i] or (state.h is None and not state.taps):
            raise RuntimeError(f"block {i} is adapted but its stage has no tap before it")
        conv = self.convs[str(self.block_stages[i])] if len(self.convs) else None
        beta = self.config.beta
        if state.backend == "reference":
            return reference.add_back(y, state.h, beta, conv, grid, num_prefix)
        taps = torch.cat(state.taps, dim=-1) if len(state.taps) > 1 else state.taps[0]
        ups = torch.cat(state.ups, dim=-1) if len(state.ups) > 1 else state.ups[0]
        if taps.dtype != y.dtype:  # autocast: bf16 taps (a matmul) beside an fp32 residual
            taps = taps.to(y.dtype)
        # the wrappers build these inputs, so the kernels' own checks suffice
        args = SideArgs.of(y, taps, ups, beta, conv, grid, num_prefix, check=False)
        backend = side.BACKENDS[state.backend]
        if self.backend == "auto" and not backend.fits(args):
            backend = side.BACKENDS[side.select(y, "auto", args)]  # e.g. K beyond a kernel
        return backend.run(args)

    # -- published checkpoint names (SPEC §6) ---------------------------------------------
    def official_state_dict(self, per_stage_convs: bool) -> dict[str, torch.Tensor]:
        """Parameters under the published names: ``lora_dict.<i>.lora_A/lora_B`` and
        ``lora_fusion.weight`` (ViT) or ``lora_fusions.<stage>.weight`` (Swin)."""
        out = {}
        for key in self.down:
            out[f"lora_dict.{key}.lora_A"] = self.down[key].detach()
            out[f"lora_dict.{key}.lora_B"] = self.up[key].detach()
        for stage, w in self.convs.items():
            name = f"lora_fusions.{stage}.weight" if per_stage_convs else "lora_fusion.weight"
            out[name] = w.detach()
        return out

    def official_to_local(self, per_stage_convs: bool) -> dict[str, str]:
        """Published key → our parameter name (relative to this module)."""
        mapping = {}
        for key in self.down:
            mapping[f"lora_dict.{key}.lora_A"] = f"down.{key}"
            mapping[f"lora_dict.{key}.lora_B"] = f"up.{key}"
        for stage in self.convs:
            name = f"lora_fusions.{stage}.weight" if per_stage_convs else "lora_fusion.weight"
            mapping[name] = f"convs.{stage}"
        return mapping

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"rank={c.rank}, beta={c.beta}, tap_from={c.tap_from}, adapt_from={c.adapt_from}, "
            f"conv_kernel={c.conv_kernel}, depth={self.depth}"
        )


def _validate(
    config: CSNConfig, widths: list[int], stages: list[int], tappable: list[bool] | None = None
) -> None:
    depth = len(widths)
    if depth == 0 or len(stages) != depth:
        raise ValueError("block_widths and block_stages must be non-empty and equally long")
    tappable = [True] * depth if tappable is None else tappable
    if len(tappable) != depth:
        raise ValueError(f"tappable has {len(tappable)} entries for {depth} blocks")
    if any(b < a for a, b in zip(stages, stages[1:], strict=False)):
        raise ValueError(f"block_stages must be non-decreasing, got {stages}")
    for name in ("rank", "tap_from", "adapt_from", "conv_kernel"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not isinstance(config.beta, (int, float)) or not math.isfinite(config.beta):
        raise TypeError(f"beta must be a finite number, got {config.beta!r}")
    if not 1 <= config.tap_from <= depth:
        raise ValueError(f"tap_from={config.tap_from} is outside 1…{depth} (the block count)")
    if not 1 <= config.adapt_from <= depth:
        raise ValueError(f"adapt_from={config.adapt_from} is outside 1…{depth} (the block count)")
    if config.adapt_from < config.tap_from:
        raise ValueError(
            f"adapt_from={config.adapt_from} < tap_from={config.tap_from}: a block cannot add "
            "back a side state that has no tap yet"
        )
    first = config.tap_from - 1
    tapped = [w for w, t in zip(widths[first:], tappable[first:], strict=False) if t]
    if not any(tappable[config.adapt_from - 1 :]):
        raise ValueError(
            f"adapt_from={config.adapt_from}: no block from there on can be adapted "
            "(all change their feature shape)"
        )
    min_width = min(tapped)
    if not 1 <= config.rank <= min_width:
        raise ValueError(f"rank={config.rank} must be in 1…{min_width} (the smallest tapped width)")
    if config.conv_kernel < 0:
        raise ValueError(f"conv_kernel={config.conv_kernel} must be ≥ 0 (0 means plain DTL)")
