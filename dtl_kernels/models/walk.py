"""The block walk every DTL wrapper shares: frozen blocks in order, the CSN's taps before a
block and its add-backs after it, and the trunk / tail split (SPEC §3)."""

from __future__ import annotations

import torch
from torch import nn


class BlockWalk:
    """Mixin of :class:`~dtl_kernels.models.base.DTLModel`: ``forward`` and the walk.

    A wrapper describes its backbone with: ``embed`` (images → input of block 0 and a
    context), ``blocks`` (the frozen blocks in order), ``block_input`` (anything that runs
    between blocks, e.g. Swin's patch merging) and ``tokens`` / ``untokens`` (the
    backbone's feature layout ↔ the CSN's ``(batch, tokens, d)``). The walk also uses the
    model's ``csn`` (``None``: no side network), ``backbone_images`` and ``forward_head``.
    """

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """``images``: ``(batch, 3, H, W)`` float → logits ``(batch, num_classes)``."""
        return self.forward_head(self.forward_features(images))

    # -- what a wrapper says about its backbone ---------------------------------------
    #: set by a wrapper whose features already are the CSN's tokens: ``tokens(x, ctx)`` is
    #: ``(x, ctx["grid"], self.num_prefix)`` and ``untokens`` returns ``t`` (timm's ViT).
    #: With the default ``block_input`` and ``call_block`` too, the walk skips those four
    #: calls per block (:func:`_run_plain`): at batch sizes where the GPU waits for the
    #: host, they cost about a third of the side network's host time.
    features_are_tokens = False

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

    def call_block(self, block: nn.Module, i: int, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        """Block ``i`` (0-based) on ``x``; a backbone whose blocks take more than the tokens
        (EVA's rotary embedding) passes it from ``ctx`` here."""
        return block(x)

    def input_is_output(self, i: int) -> bool:
        """Whether block ``i``'s input is block ``i-1``'s output as it is (``block_input(i,
        x)`` returns ``x``): only then may add-back ``i-1`` take block ``i``'s tap from its
        own output (``add_back(tap_next=True)``). A wrapper that overrides ``block_input``
        says at which blocks; the default holds where ``block_input`` is the identity."""
        own = "block_input" in self.__dict__
        return not own and type(self).block_input is BlockWalk.block_input

    # -- the walk ------------------------------------------------------------------------
    def forward_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images → features after the last block (before the final norm)."""
        x, ctx = self.embed(self.backbone_images(images))
        csn, blocks = self.csn, self.blocks
        if csn is not None and csn.depth == len(blocks) and _plain_walk(self):
            return _run_planned(blocks, csn, x, ctx["grid"], self.num_prefix)
        state = csn.start() if csn is not None else None
        return self._walk(blocks, x, ctx, state, 0, len(blocks))

    def run_blocks(self, x: torch.Tensor, ctx: dict, state, start: int, stop: int) -> torch.Tensor:
        """Run blocks ``start … stop-1`` (0-based) with taps and add-backs.

        ``state`` is the CSN's side state (``None`` without a CSN); it is updated in place,
        so a walk can be split (shared trunk, cached trunk) and resumed, once: to resume it
        more often, give each resumption ``state.fork()``.
        """
        return self._walk(self.blocks, x, ctx, state, start, stop)

    def _walk(self, blocks: list[nn.Module], x, ctx: dict, state, start: int, stop: int):
        """:meth:`run_blocks` over ``blocks`` (``self.blocks``, which builds a list)."""
        csn = self.csn
        if _plain_walk(self):
            return _run_plain(blocks, csn, x, ctx["grid"], self.num_prefix, state, start, stop)
        taken = False  # block i's tap was taken by add-back i-1 (as in _run_plain)
        for i in range(start, stop):
            x = self.block_input(i, x)
            if csn is not None and csn.is_tapped(i) and not taken:
                csn.tap(state, i, self.tokens(x, ctx)[0])
            y = self.call_block(blocks[i], i, x, ctx)
            taken = False
            if csn is not None and csn.is_adapted(i):
                t, grid, num_prefix = self.tokens(y, ctx)
                # the next block's input is these tokens (tokens ∘ untokens keeps the values)
                taken = (csn.fold_blocks[i] and i + 1 < stop and state.fold
                         and self.input_is_output(i + 1))  # fmt: skip
                y = self.untokens(csn.add_back(state, i, t, grid, num_prefix, taken), y)
            x = y
        return x

    # -- trunk / tail split (feature reuse, trunk caching; SPEC §3) -------------------------
    @property
    def trunk_depth(self) -> int:
        """Blocks ``0 … trunk_depth-1`` (0-based) whose outputs are task-independent: with a
        side network, up to and including the first adapted block ``M``; with LoRA
        (``method="lora"``), the blocks before the first one it adapts (``lora_blocks``
        ``(M, N)``: ``M − 1``; every block: none); otherwise (linear probe) all."""
        if self.csn is not None:
            return self.csn.config.adapt_from
        lora = getattr(self, "lora", None)  # the settings models.build.add_lora records
        if lora is not None:
            blocks = lora.get("blocks")
            return int(blocks[0]) - 1 if blocks else 0
        return len(self.blocks)

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


# per class: (what decides it, whether its walk is plain); re-decided when a class attribute
# it rests on is replaced (a method patched on the class after its first forward)
_PLAIN: dict[type, tuple[tuple, bool]] = {}


def _plain_walk(model: BlockWalk) -> bool:
    """Whether ``model``'s walk is the plain one: ``features_are_tokens`` and the default
    ``block_input`` / ``call_block``. A subclass overriding either (EVA's rotary
    ``call_block``) or ``tokens`` / ``untokens``, or an instance given its own, keeps the
    general walk."""
    own = model.__dict__
    if "call_block" in own or "block_input" in own or "tokens" in own or "untokens" in own:
        return False
    cls = type(model)
    basis = (cls.features_are_tokens, cls.tokens, cls.untokens, cls.block_input, cls.call_block)
    known = _PLAIN.get(cls)
    if known is not None and known[0] == basis:
        return known[1]
    # the class that declared features_are_tokens vouches for its tokens / untokens only
    owner = next(c for c in cls.__mro__ if "features_are_tokens" in c.__dict__)
    plain = bool(
        cls.features_are_tokens
        and cls.tokens is owner.tokens
        and cls.untokens is owner.untokens
        and cls.block_input is BlockWalk.block_input
        and cls.call_block is BlockWalk.call_block
    )
    _PLAIN[cls] = (basis, plain)
    return plain


def _run_plain(blocks, csn, x, grid, num_prefix, state, start, stop) -> torch.Tensor:
    """:meth:`BlockWalk.run_blocks` where features are tokens and blocks take only them."""
    if csn is None:
        for i in range(start, stop):
            x = blocks[i](x)
        return x
    tapped, adapted, folds = csn.tapped_blocks, csn.adapted_blocks, csn.fold_blocks
    taken = False  # block i's tap was recorded by add-back i-1 (its output is i's input)
    for i in range(start, stop):
        if tapped[i] and not taken:
            csn.tap(state, i, x)
        x = blocks[i](x)
        # (a split walk's next part taps its own first block)
        taken = folds[i] and i + 1 < stop and state.fold
        if adapted[i]:
            x = csn.add_back(state, i, x, grid, num_prefix, taken)
    return x


def _run_planned(blocks, csn, x, grid, num_prefix: int) -> torch.Tensor:
    """The plain walk of every block: from the first tapped block on as the CSN's plan says
    (one call per add-back: :meth:`~dtl_kernels.csn.CompactSideNetwork.walk_plan`, made
    there, where ``tap`` would decide), else as :func:`_run_plain`. Should grad mode come on
    inside a block of a pass begun without it (or inference mode go off), or go off inside
    a block of a recorded pass, the walk goes on from there as :func:`_run_plain`, with the
    side state the plan's pass hands it."""
    first, stop = csn.first_tapped, len(blocks)
    for i in range(first):
        x = blocks[i](x)
    plan = csn.walk_plan(x, grid, num_prefix)
    if plan is None:
        return _run_plain(blocks, csn, x, grid, num_prefix, csn.start(), first, stop)
    run = csn.begin_pass(plan)
    pending, rows = [], plan.rows
    if plan.grad:
        for i in range(first, stop):
            collect, row = rows[i]
            if collect:
                pending.append(x)
            x = blocks[i](x)
            if not torch.is_grad_enabled():
                state = run.hand_off(i, pending)
                if row is not None:
                    x = csn.add_back(state, i, x, grid, num_prefix)
                return _run_plain(blocks, csn, x, grid, num_prefix, state, i + 1, stop)
            if row is not None:
                x = run.recorded_step(x, pending, row)
                pending = []
        return x
    folded = None
    for i in range(first, stop):
        collect, row = rows[i]
        if collect:
            pending.append(x)
        x = blocks[i](x)
        if row is None:
            continue
        if torch.is_grad_enabled() or (plan.inference and not torch.is_inference_mode_enabled()):
            state = run.hand_off(i, pending, folded)
            x = csn.add_back(state, i, x, grid, num_prefix)
            return _run_plain(blocks, csn, x, grid, num_prefix, state, i + 1, stop)
        x = run.step(x, pending, row)
        pending, folded = [], x if row[2] is not None else None
    return x
