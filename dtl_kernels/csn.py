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
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from . import _env, memory
from .ops import reference, side, step
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


class ShapedParameters(nn.ParameterDict):
    """The CSN's ``down`` / ``up`` projections, which keep the shapes the config gave
    them: assigning one of another shape is refused, naming it. Used as it is, it would
    shift the taps' columns and change the answer without an error (the kernels see shapes
    consistent with each other; a conv of another ``k``, by contrast, is taken as it is).
    Checked where a parameter is assigned, not at every pass (host time); a ``.data`` of
    another shape escapes it."""

    def __init__(self, group: str):
        super().__init__()
        self.__dict__["_group"] = group
        self.__dict__["_shapes"] = None

    def keep_shapes(self) -> None:
        """From now on, every parameter keeps its present shape."""
        self.__dict__["_shapes"] = {k: p.shape for k, p in self._parameters.items()}

    def register_parameter(self, name: str, param) -> None:
        shapes = self.__dict__.get("_shapes")
        if shapes is not None and param is not None and name in shapes:
            if param.shape != shapes[name]:
                raise ValueError(
                    f"CompactSideNetwork: csn.{self._group}.{name} must keep its shape "
                    f"{tuple(shapes[name])} (from the side network's config), got "
                    f"{tuple(param.shape)}: build a model with the other config instead"
                )
        super().register_parameter(name, param)


@dataclass
class SideState:
    """What one forward pass carries from block to block (never a parameter).

    The reference backend keeps the running ``h`` (the published eager formulation). Fused
    backends keep the stage's taps in ONE ``(batch, tokens, K_stage)`` tensor whose columns
    of blocks not tapped yet are zero, so ``taps · upsᵀ`` over the whole stage equals the
    sum over the blocks tapped so far and every add-back of a stage runs the kernel on the
    same shapes. A tap only records its block input; the next add-back computes the pending
    taps and the side op in one call (:func:`dtl_kernels.ops.step.side_step`). The backend
    is chosen at the first tap of the pass; the stage's buffers (taps, its ups side by side in
    the taps' dtype) at its first tap, its kernel at its first add-back.
    """

    backend: str | None = None
    stage: int = -1
    taps: torch.Tensor | None = None  # fused: (B, N, K_stage), later blocks' columns zero
    inputs: list = field(default_factory=list)  # fused: block inputs z_j not tapped yet
    downs: list = field(default_factory=list)  # … and their A_j
    first_col: int = 0  # fused: the column of the first pending tap
    pending_bytes: int = 0
    ups: torch.Tensor | None = None  # fused: (d, K_stage) the stage's B_i side by side
    kernel: str | None = None  # fused: the backend running this stage's side op
    step_: object = None  # fused, plain no-grad: ops.step.bind_side_step_'s runner …
    step_key: tuple | None = None  # … bound for this (grid, num_prefix)
    plain: bool = False  # fused: a plain eager pass (_plain_eager), decided per stage
    own_taps: bool = False  # fused, no grad: `taps` is this pass's copy, written in place
    fold: bool = False  # plain no-grad stage: a walk may let add-backs take the next tap
    folded: torch.Tensor | None = None  # the input of the block whose tap the last add-back took
    h: torch.Tensor | None = None  # reference: the running side state

    def fork(self) -> SideState:
        """A copy to resume a split walk from more than once (``run_blocks`` updates a
        state in place, and no-grad add-backs write its taps in place): the lists are
        copied, and the next no-grad add-back of either copies the taps first (the original
        may be resumed too)."""
        self.own_taps = False
        return replace(self, inputs=list(self.inputs), downs=list(self.downs))


@dataclass(frozen=True)
class WalkPlan:
    """What every block of a plain walk does on the side, worked out once per kind of input
    (:meth:`CompactSideNetwork.walk_plan`) instead of at each tap and add-back.

    ``rows[i]`` for block ``i``: ``(collect, step)``. ``collect``: the walk keeps the block's
    input for the next step (its tap); ``step``: ``None``, or after the block the step
    ``(pending down keys, first column, next block's down key or None)`` -- without
    autograd (``grad`` false) the in-place step, which may also take the next block's tap;
    with it, the recorded one. Parameters are named by key, looked up at every pass (a
    parameter may be replaced). ``first``: the first tapped block (the plan is made from its
    input, where ``tap`` decides)."""

    first: int
    stage: int
    backend: str
    kernel: str
    zeros: torch.Tensor
    conv_key: str | None
    grid: tuple[int, int]
    num_prefix: int
    grad: bool
    inference: bool
    rows: tuple


class PlannedPass:
    """One pass of a :class:`WalkPlan`: the stage's taps (without autograd, this pass's copy
    of the kept zeros, written in place), its ups and conv, and the step."""

    __slots__ = ("plan", "taps", "ups", "run", "down", "convs", "beta", "save_dtype")

    def __init__(self, csn: CompactSideNetwork, plan: WalkPlan):
        self.plan = plan
        # (side_step never writes its taps: a recorded pass starts from the kept zeros)
        self.taps = plan.zeros if plan.grad else plan.zeros.clone()
        self.ups = csn._stage_ups(plan.stage, plan.zeros.dtype)
        self.beta, self.save_dtype = csn.config.beta, csn.trunk_dtype
        self.down, self.convs = csn._modules["down"]._parameters, csn._modules["convs"]._parameters
        if not plan.grad:  # (the conv bound once per pass, as the general no-grad walk does)
            conv = None if plan.conv_key is None else self.convs[plan.conv_key]
            self.run = step.bind_side_step_(self.ups, conv, plan.grid, plan.num_prefix,
                                            self.beta, plan.kernel)  # fmt: skip

    def step(self, y: torch.Tensor, pending: list, row: tuple) -> torch.Tensor:
        """Block ``i``'s add-back without autograd (``row``: its ``step`` entry): ``y`` + the
        side output, the pending taps (inputs ``pending``) and, where the row says, the next
        block's tap, into this pass's taps."""
        keys, first_col, next_key = row
        down = self.down
        return self.run(y, self.taps, pending, [down[k] for k in keys], first_col,
                        None if next_key is None else down[next_key])  # fmt: skip

    def recorded_step(self, y: torch.Tensor, pending: list, row: tuple) -> torch.Tensor:
        """Block ``i``'s add-back as autograd records it (:func:`~dtl_kernels.ops.step.
        side_step`, called as :meth:`CompactSideNetwork.add_back` calls it, the conv looked
        up at each step as there); the new taps are kept for the next step."""
        keys, first_col, _ = row
        down, plan = self.down, self.plan
        conv = None if plan.conv_key is None else self.convs[plan.conv_key]
        out, self.taps = step.side_step(
            y, self.taps, pending, [down[k] for k in keys], first_col, self.ups, conv,
            plan.grid, plan.num_prefix, self.beta, plan.kernel, self.save_dtype,
        )  # fmt: skip
        return out

    def hand_off(self, i: int, pending: list, folded: torch.Tensor | None = None) -> SideState:
        """The :class:`SideState` the general walk would hold after block ``i``, from where it
        goes on: in a pass begun without autograd, at block ``i``'s step, grad mode having
        come on (or inference mode gone off) inside the block (``folded``: its input where
        the last step took its tap); in a recorded pass, grad mode having gone off inside
        it (the general walk then takes no-grad steps and counts pending taps against
        :data:`PENDING_BYTES`). ``pending``: the inputs collected since the last step."""
        plan = self.plan
        keys, first_col = (), 0
        for _, row in plan.rows[i:]:  # the step these inputs wait for: i's, or a later one
            if row is not None:
                keys, first_col = row[0][: len(pending)], row[1]
                break
        no_grad = not plan.grad  # its taps are this pass's copy; its add-backs fold taps
        return SideState(
            backend=plan.backend, stage=plan.stage, taps=self.taps, ups=self.ups,
            inputs=list(pending), downs=[self.down[k] for k in keys], first_col=first_col,
            kernel=plan.kernel, plain=True, own_taps=no_grad, fold=no_grad, folded=folded,
        )  # fmt: skip


#: without autograd (which keeps tap inputs anyway), pending tap inputs are computed at once
#: rather than held for the next add-back once they hold more than this many bytes
PENDING_BYTES = 64 * 2**20
#: whether autocast is on for any device, asked before the device-type check, whose
#: argument parsing a pass without autocast need not pay for (a torch without it: ask)
_any_autocast = getattr(torch._C, "_is_any_autocast_enabled", lambda: True)
#: β's bound (the kernels compute in float32 at least; adapters and --beta share it)
FLOAT32_MAX = torch.finfo(torch.float32).max


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

    Parameters (``down``, ``up``, ``convs``) and ``config`` may be changed in place or
    replaced between forward passes: the next pass uses them, planned or not (tested).
    Replacing one *during* a pass (from a block's hook) is not supported: which of the
    old and new tensors that pass uses depends on the walk (the stage's ups are joined at
    its first tap; a planned pass binds the conv and ``β`` where it begins and looks each
    ``A`` up at its step), so such a pass can differ from the reference formulation.
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
        self.down = ShapedParameters("down")
        self.up = ShapedParameters("up")
        for i in range(config.tap_from - 1, depth):
            if not tappable[i]:
                continue
            self.down[str(i)] = nn.Parameter(torch.empty(r, block_widths[i]))
            self.up[str(i)] = nn.Parameter(torch.empty(block_widths[i], r))
        # per block (the walk asks for every block of every forward)
        self._tapped = [i >= config.tap_from - 1 and tappable[i] for i in range(depth)]
        self._first_tap = self._tapped.index(True)  # (_validate: some block is tapped)
        self._adapted = [i >= config.adapt_from - 1 and tappable[i] for i in range(depth)]
        self._keys = [str(i) for i in range(depth)]
        # fused backends: each tapped block's columns in its stage's taps, the stage's blocks
        self._columns: dict[int, tuple[int, int]] = {}
        self._stage_keys: dict[int, list[str]] = {}
        self._stage_width: dict[int, int] = {}
        for i in range(config.tap_from - 1, depth):
            if tappable[i]:
                s = block_stages[i]
                first = self._stage_width.get(s, 0)
                self._columns[i] = (first, first + r)
                self._stage_width[s] = first + r
                self._stage_keys.setdefault(s, []).append(str(i))
        # per block: may add_back(i, tap_next=True) record block i+1's tap too? (the next
        # block is tapped, in the same stage, its columns right after block i's)
        self._folds = [
            self._adapted[i]
            and i + 1 < depth
            and self._tapped[i + 1]
            and block_stages[i + 1] == block_stages[i]
            and self._columns[i + 1][0] == self._columns[i][1]
            for i in range(depth)
        ]
        self.convs = nn.ParameterDict()  # any k: the kernels take it from the conv itself
        if k > 0:
            for i in range(config.adapt_from - 1, depth):
                s = str(block_stages[i])
                if tappable[i] and s not in self.convs:
                    self.convs[s] = nn.Parameter(torch.empty(block_widths[i], 1, k, k))
        # stage → its conv's key (DTL+), for the add-back's lookup
        self._conv_keys = {int(s): s for s in self.convs}
        for group in (self.down, self.up):
            group.keep_shapes()
        # what _select_backend and _start_stage_kernel decided, per tensors' kind
        self._selected: dict[tuple, str] = {}
        self._kernels: dict[tuple, str] = {}
        self._zeros: dict[tuple, torch.Tensor] = {}  # see _stage_buffers
        self._plans: dict[tuple, WalkPlan | None] = {}  # see walk_plan
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
        return self._tapped[i]

    @property
    def tapped_blocks(self) -> list[bool]:
        """Per block, :meth:`is_tapped` (read-only: for a walk that asks for every block)."""
        return self._tapped

    @property
    def adapted_blocks(self) -> list[bool]:
        """Per block, :meth:`is_adapted` (read-only)."""
        return self._adapted

    def is_adapted(self, i: int) -> bool:
        return self._adapted[i]

    @property
    def fold_blocks(self) -> list[bool]:
        """Per block ``i``, whether :meth:`add_back` may take block ``i+1``'s tap too
        (``tap_next``): ``i`` is adapted, ``i+1`` tapped in the same stage (read-only).
        Worth it where ``state.fold`` is set (a plain no-grad pass: the step computes the
        tap); elsewhere ``add_back`` would only call :meth:`tap` itself."""
        return self._folds

    # -- forward ---------------------------------------------------------------------
    def start(self) -> SideState:
        """A fresh side state for one forward pass."""
        return SideState()

    def tap(self, state: SideState, i: int, z: torch.Tensor) -> None:
        """Record block ``i``'s tap ``z · A_iᵀ``. ``z``: ``(batch, tokens, d_i)``."""
        stage = self.block_stages[i]
        if stage != state.stage:  # h restarts at every stage
            self._start_stage(state, stage, z)
        down = self._modules["down"]._parameters[self._keys[i]]  # see _param
        if state.backend != "reference":
            inputs = state.inputs
            if not inputs:
                state.first_col = self._columns[i][0]
            inputs.append(z)
            state.downs.append(down)
            if not torch.is_grad_enabled():
                state.pending_bytes += z.numel() * z.element_size()  # (nbytes: no dynamic batch)
                if state.pending_bytes > PENDING_BYTES:
                    self._flush_taps(state)
            return
        if down.dtype != z.dtype and not torch.is_autocast_enabled(z.device.type):
            down = down.to(z.dtype)  # a low-precision frozen backbone (backbone_dtype)
        t = self._tap_value(z, down)
        up = self._param("up", self._keys[i])
        state.h = reference.accumulate(state.h, t, up if up.dtype == t.dtype else up.to(t.dtype))

    def _tap_value(self, z: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """``z · downᵀ`` as separate PyTorch calls, keeping ``z`` in :attr:`trunk_dtype` for
        ``∂A`` where autograd keeps it for nothing else (the memory option; the one-call
        step does the same through its ``save_dtype``)."""
        low = self.trunk_dtype
        keeps_z = torch.is_grad_enabled() and down.requires_grad  # only ∂A needs z
        if low is not None and keeps_z and not z.requires_grad and z.dtype != low:
            return memory.low_precision_tap(z, down, low)
        return reference.tap(z, down)

    def _start_stage(self, state: SideState, stage: int, z: torch.Tensor) -> None:
        """At a stage's first tap: a fresh side state for it and, on a fused backend, the
        stage's buffers (taps, and its ups side by side in the taps' dtype)."""
        state.stage, state.kernel, state.h, state.taps, state.ups = stage, None, None, None, None
        state.inputs, state.downs, state.pending_bytes = [], [], 0
        state.step_key, state.folded = None, None
        if state.backend is None:  # the first tap of the forward pass
            state.backend = self._select_backend(z)
        if state.backend == "reference":
            return
        state.plain, state.own_taps = _plain_eager(z), False
        state.fold = state.plain and not torch.is_grad_enabled()
        state.taps, state.ups = self._stage_buffers(stage, z, state.plain)

    def _stage_buffers(
        self, stage: int, z: torch.Tensor, plain: bool | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The stage's zero taps ``(*z.shape[:-1], K_stage)`` and its ups side by side
        ``(d, K_stage)``, both in the taps' dtype.

        In plain eager runs (``plain``: :func:`_plain_eager`, worked out if not given) the
        zeros are kept between forward passes (making them is a dispatched call per pass):
        ``side_step`` never writes its ``taps`` argument, and :meth:`_flush_taps` and a
        no-grad pass's first ``side_step_`` write into a copy. The ups are concatenated at
        every pass: a parameter can change without its version counter knowing
        (``p.data.copy_``), so a kept copy could go stale.
        """
        dtype = _tap_dtype(z)
        shape = (*z.shape[:-1], self._stage_width[stage])
        if plain is None:
            plain = _plain_eager(z)
        if not plain:  # a graph, fake tensors, a transform: made anew, seen by it
            zeros = z.new_zeros(shape, dtype=dtype)
        else:
            key = (shape, dtype, z.device, torch.is_inference_mode_enabled())
            zeros = self._zeros.get(key)
            if zeros is None:
                zeros = z.new_zeros(shape, dtype=dtype)
                self._zeros = _bounded(self._zeros, 8)
                self._zeros[key] = zeros
        return zeros, self._stage_ups(stage, dtype)

    def _stage_ups(self, stage: int, dtype: torch.dtype) -> torch.Tensor:
        """The stage's ``B_i`` side by side ``(d, K_stage)`` in ``dtype`` (as autocast would
        cast them)."""
        up = self._modules["up"]._parameters
        ups = torch.cat([up[key] for key in self._stage_keys[stage]], dim=-1)
        return ups if ups.dtype == dtype else ups.to(dtype)

    def _select_backend(self, z: torch.Tensor) -> str:
        """:func:`side.select` for tensors like ``z``, remembered per device, dtype, request:
        selecting costs more host time than a tap (every forward pass). Compiling,
        exporting and tracing select anew (export picks the reference formulation), and so
        do functorch transforms (``vmap``, ``grad``: ``auto`` picks it there too)."""
        if _tracing() or side.transformed():  # (traced once: no cache for a graph to guard)
            return side.select(z, self.backend, conv_weight=self._any_conv())
        key = (z.device, z.dtype, self.backend, _env.get(side.BACKEND_ENV))
        name = self._selected.get(key)
        if name is None:  # the conv (DTL+) and dtype decide auto's order on CUDA
            name = side.select(z, self.backend, conv_weight=self._any_conv())
            self._selected = _bounded(self._selected)
            self._selected[key] = name
        return name

    def _any_conv(self) -> nn.Parameter | None:
        return next(iter(self.convs.values())) if len(self.convs) else None

    def _param(self, group: str, key: str) -> nn.Parameter:
        """``self.<group>[key]`` (``group``: ``down``, ``up`` or ``convs``) by plain dict
        lookups. A ``ParameterDict``'s own ``[key]`` goes through ``Module.__getattr__``
        (an ``AttributeError`` raised and caught per call): ≈ 1.4 µs, paid at every tap and
        add-back of every forward."""
        return self._modules[group]._parameters[key]

    def _flush_taps(self, state: SideState) -> None:
        """Without autograd: the pending taps now, into the stage's taps (frees the inputs)."""
        col = state.first_col
        state.taps = state.taps.clone()  # it may be the kept zeros (_stage_buffers)
        state.own_taps = state.plain  # this pass's copy: a later no-grad step may write it
        for z, down in zip(state.inputs, state.downs, strict=True):
            r = down.shape[0]
            state.taps[..., col : col + r] = torch.matmul(
                z.to(state.taps.dtype), down.to(state.taps.dtype).t()
            )
            col += r
        state.first_col, state.inputs, state.downs, state.pending_bytes = col, [], [], 0

    def add_back(
        self,
        state: SideState,
        i: int,
        y: torch.Tensor,
        grid: tuple[int, int],
        num_prefix: int = 0,
        tap_next: bool = False,
    ) -> torch.Tensor:
        """Return ``y + θ(h_i)`` (DTL) or ``y + g(θ(h_i))`` (DTL+) after block ``i``.

        Args:
            y: ``(batch, tokens, d_i)`` output of block ``i``.
            grid: ``(H, W)`` of the patch tokens.
            num_prefix: leading tokens that are not on the grid.
            tap_next: the result is block ``i+1``'s input as it is: record its tap too
                (the caller then skips :meth:`tap` for it). Only where
                :attr:`fold_blocks` says so. A no-grad pass computes it inside the step.
        """
        stage = self.block_stages[i]
        if state.stage != stage or (state.h is None and state.taps is None):
            raise RuntimeError(f"block {i} is adapted but its stage has no tap before it")
        if tap_next and not self._folds[i]:
            raise ValueError(f"add_back(tap_next=True): block {i + 1} cannot be tapped here")
        if state.kernel is not None and state.plain and not torch.is_grad_enabled():
            return self._step_in_place(state, i, y, grid, num_prefix, tap_next)
        if state.folded is not None:  # block i's tap was taken without autograd: again
            self._unfold(state, i)
        return self._add_back(state, i, y, grid, num_prefix, tap_next)

    def _step_in_place(self, state: SideState, i: int, y, grid, num_prefix: int, tap_next: bool):
        """A plain no-grad pass's add-back (most inference): ``side_step_`` into the pass's
        own taps, with the stage's arguments bound once per stage (host time of every
        forward, bench_host.py)."""
        if not state.own_taps or (
            state.taps.is_inference() and not torch.is_inference_mode_enabled()
        ):
            # the kept zeros (or a copy made in inference mode, read-only outside it): one
            # copy per stage, not one per step
            state.taps = state.taps.clone(memory_format=torch.contiguous_format)
            state.own_taps = True
        if state.step_key != (grid, num_prefix):
            if state.kernel not in step.STEP_KERNELS:
                return self._add_back(state, i, y, grid, num_prefix, tap_next)
            state.step_ = self._bind_step(state, grid, num_prefix)
            state.step_key = (grid, num_prefix)
        out = state.step_(y, state.taps, state.inputs, state.downs, state.first_col,
                          self._param("down", self._keys[i + 1]) if tap_next else None)  # fmt: skip
        # blocks up to i (i+1 with tap_next) are tapped, none pending
        state.first_col = self._columns[i + 1 if tap_next else i][1]
        state.folded = out if tap_next else None
        if state.inputs:
            state.inputs, state.downs, state.pending_bytes = [], [], 0
        return out

    def _unfold(self, state: SideState, i: int) -> None:
        """Block ``i``'s tap, taken by the previous add-back without autograd, pending again:
        grad mode came on between the two (inside block ``i``), and autograd must see it."""
        state.inputs = [state.folded, *state.inputs]
        state.downs = [self._param("down", self._keys[i]), *state.downs]
        state.first_col, state.folded = self._columns[i][0], None

    def _bind_step(self, state: SideState, grid, num_prefix: int):
        """The stage's in-place step with its constant arguments bound."""
        conv = self._param("convs", self._conv_keys[state.stage]) if self._conv_keys else None
        return step.bind_side_step_(state.ups, conv, grid, num_prefix, self.config.beta,
                                    state.kernel)  # fmt: skip

    def _add_back(self, state: SideState, i: int, y, grid, num_prefix: int, tap_next: bool):
        """:meth:`add_back` on every path but a plain no-grad pass's step."""
        stage = self.block_stages[i]
        conv = self._param("convs", self._conv_keys[stage]) if self._conv_keys else None
        beta = self.config.beta
        if state.backend == "reference":
            out = reference.add_back(y, state.h, beta, conv, grid, num_prefix)
            if tap_next:
                self.tap(state, i + 1, out)
            return out
        if state.kernel is None:
            self._start_stage_kernel(state, stage, y, conv, grid, num_prefix)
            if state.plain and not torch.is_grad_enabled():
                return self._step_in_place(state, i, y, grid, num_prefix, tap_next)
        if state.fold and torch.is_grad_enabled():
            # the stage began without autograd (its ups made without it, add-backs taking the
            # next taps): grad mode came on since, and autograd must see the ups
            state.ups = self._stage_ups(stage, state.taps.dtype)
            state.fold = False
        if state.kernel in step.STEP_KERNELS:
            out, state.taps = step.side_step(
                y, state.taps, state.inputs, state.downs, state.first_col, state.ups, conv, grid,
                num_prefix, beta, state.kernel, self.trunk_dtype,
            )  # fmt: skip
            state.own_taps = False  # autograd may keep these taps: never written in place
        else:  # a kernel without the one-call step (the reference, as a fallback)
            out = self._step_in_python(state, y, conv, grid, num_prefix)
        state.first_col = self._columns[i][1]  # block i was the last pending tap
        state.inputs, state.downs, state.pending_bytes = [], [], 0
        if tap_next:
            self.tap(state, i + 1, out)
        return out

    def _start_stage_kernel(self, state: SideState, stage: int, y, conv, grid, num_prefix):
        """At a stage's first add-back: the backend that takes these shapes (remembered per
        shapes and dtypes; under ``auto`` a backend's limits may rule it out)."""
        kernel = state.backend
        if self.backend != "auto":
            state.kernel = kernel if side.has_step(kernel) else f"python:{kernel}"
            return
        compiling = torch.compiler.is_compiling()
        key = (kernel, y.shape, y.dtype, y.device, state.taps.shape, state.taps.dtype,
               None if conv is None else conv.shape, grid, num_prefix)  # fmt: skip
        if compiling or key not in self._kernels:
            args = SideArgs.of(y, state.taps, state.ups, self.config.beta, conv, grid,
                               num_prefix, check=False)  # fmt: skip
            if not side.BACKENDS[kernel].fits(args):
                kernel = side.select(y, "auto", args)  # e.g. K beyond a kernel's limit
            kernel = kernel if side.has_step(kernel) else f"python:{kernel}"
            if compiling:
                state.kernel = kernel
                return
            self._kernels = _bounded(self._kernels)
            self._kernels[key] = kernel
        state.kernel = self._kernels[key]

    def _step_in_python(self, state: SideState, y, conv, grid, num_prefix) -> torch.Tensor:
        """The step as separate PyTorch calls, then the backend's side op (what
        :func:`~dtl_kernels.ops.step.side_step` does in one call)."""
        col = state.first_col
        for z, down in zip(state.inputs, state.downs, strict=True):
            t = self._tap_value(z.to(state.taps.dtype), down.to(state.taps.dtype))
            end = col + t.shape[-1]
            state.taps = torch.slice_scatter(state.taps, t, dim=-1, start=col, end=end)
            col = end
        taps = state.taps if state.taps.dtype == y.dtype else state.taps.to(y.dtype)
        args = SideArgs.of(y, taps, state.ups, self.config.beta, conv, grid, num_prefix,
                           check=False)  # fmt: skip
        return side.BACKENDS[state.kernel.removeprefix("python:")].run(args)

    # -- a plain walk, planned once per kind of input -------------------------------------
    @property
    def first_tapped(self) -> int:
        """The first tapped block (0-based)."""
        return self._first_tap

    def walk_plan(self, z: torch.Tensor, grid: tuple[int, int], num_prefix: int) -> WalkPlan | None:
        """The plan of a whole plain walk (every block, features are the tokens, blocks keep
        their shape and dtype), from the input ``z`` ``(batch, tokens, d)`` of block
        :attr:`first_tapped`, where :meth:`tap` would decide the pass's backend and buffers;
        for autograd's present mode (a pass begun without it, or recorded). ``None`` where
        :meth:`tap` / :meth:`add_back` must run instead: not a plain eager pass
        (:func:`_plain_eager`), a device without fused kernels, the reference formulation
        or a kernel without the one-call step, more than one stage, pending taps beyond
        :data:`PENDING_BYTES` (without autograd).

        Why: at the batch sizes where a GPU waits for its host, the Python of a tap and an
        add-back (backend and stage look-ups, the state's bookkeeping, four calls deep per
        step) cost more host time than the steps themselves (``benchmarks/host_context.py``).
        A pass of the plan runs one call per step (:class:`PlannedPass`)."""
        if not _plain_eager(z):
            return None
        device = z.device
        if device.type not in ("cpu", "cuda"):  # (meta: the reference; autocast knows neither)
            return None
        amp = _any_autocast() and torch.is_autocast_enabled(device.type)
        convs = self._modules["convs"]._parameters.values()  # a replaced one may change kernel
        key = (z.shape, z.dtype, device, torch.is_grad_enabled(),
               torch.is_inference_mode_enabled(),
               torch.get_autocast_dtype(device.type) if amp else None, self.backend,
               _env.get(side.BACKEND_ENV), grid, num_prefix, PENDING_BYTES,
               tuple(w.shape for w in convs))  # fmt: skip
        try:
            return self._plans[key]
        except KeyError:
            pass
        plan = self._make_walk_plan(z, grid, num_prefix, grad=key[3], inference=key[4])
        self._plans = _bounded(self._plans, 16)
        self._plans[key] = plan
        return plan

    def begin_pass(self, plan: WalkPlan) -> PlannedPass:
        """A pass of ``plan`` (its taps, ups and step)."""
        return PlannedPass(self, plan)

    def _make_walk_plan(
        self, x, grid, num_prefix: int, grad: bool, inference: bool
    ) -> WalkPlan | None:
        """:meth:`walk_plan` worked out: the choices :meth:`tap` and :meth:`add_back` make
        for these tensors (backend, kernel, kept zeros), and each block's row."""
        stages = {self.block_stages[i] for i in range(self.depth) if self._tapped[i]}
        if len(stages) != 1 or not any(self._adapted):
            return None
        stage = stages.pop()
        state = SideState()
        self._start_stage(state, stage, x)
        if state.backend == "reference" or not state.plain:
            return None
        conv_key = self._conv_keys.get(stage)
        conv = self._param("convs", conv_key) if conv_key is not None else None
        self._start_stage_kernel(state, stage, x, conv, grid, num_prefix)  # y has x's shape
        if state.kernel not in step.STEP_KERNELS:
            return None
        # what _run_plain's walk makes tap() and add_back() do, block by block (a recorded
        # pass takes no next tap: autograd keeps each block's input anyway)
        rows, pending, first_col, taken = [], [], 0, False
        for i in range(self.depth):
            collect = self._tapped[i] and not taken
            if collect:
                if not pending:
                    first_col = self._columns[i][0]
                pending.append(self._keys[i])
                if not grad and len(pending) * x.numel() * x.element_size() > PENDING_BYTES:
                    return None  # tap() would compute them early: its path, not this one
            taken, row = self._folds[i] and not grad, None
            if self._adapted[i]:
                row = (tuple(pending), first_col, self._keys[i + 1] if taken else None)
                first_col, pending = self._columns[i + 1 if taken else i][1], []
            rows.append((collect, row))
        return WalkPlan(self._first_tap, stage, state.backend, state.kernel, state.taps,
                        conv_key, tuple(grid), num_prefix, grad, inference,
                        tuple(rows))  # fmt: skip

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
    if isinstance(config.beta, bool) or not isinstance(config.beta, (int, float)):
        raise TypeError(f"beta must be a Python int or float, got {type(config.beta).__name__} "
                        "(float(beta) converts a NumPy or tensor scalar)")  # fmt: skip
    # the kernels compute in float32 at least, and an adapter records β as a float32 number
    if not math.isfinite(config.beta) or abs(config.beta) > FLOAT32_MAX:
        raise ValueError(f"beta must be a finite number of float32's range (|β| ≤ "
                         f"{FLOAT32_MAX:.4g}), got {config.beta!r}")  # fmt: skip
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


def _bounded(cache: dict, size: int = 64) -> dict:
    """``cache``, emptied once it holds ``size`` entries (shapes vary with the batch)."""
    return cache if len(cache) < size else {}


def _tracing() -> bool:
    """Is this forward being compiled, exported or traced (``torch.jit.trace``, the
    TorchScript ONNX exporter)? Then nothing is taken from or put into a cache."""
    return torch.compiler.is_compiling() or torch._C._get_tracing_state() is not None


def _plain_eager(z: torch.Tensor) -> bool:
    """Does this pass run plain eager PyTorch on ordinary tensors like ``z``: no tracing,
    no functorch transform (``vmap``, ``grad``), no dispatch mode, no tensor subclass (fake
    tensors), no CUDA-graph capture (its kernels do not run: zeros made there are never
    filled)? Only then may a tensor be kept from one pass for the next."""
    return (
        type(z) is torch.Tensor
        and not _tracing()
        and not torch._C._are_functorch_transforms_active()
        and torch._C._len_torch_dispatch_stack() == 0
        and not (z.is_cuda and torch.cuda.is_current_stream_capturing())
    )


def _tap_dtype(z: torch.Tensor) -> torch.dtype:
    """The dtype of ``z · Aᵀ`` as the model runs it: autocast's for a float32 ``z`` under
    autocast, else ``z``'s (the CSN casts ``A`` to a low-precision backbone's dtype)."""
    if z.dtype != torch.float32:
        return z.dtype
    device = z.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else z.dtype
