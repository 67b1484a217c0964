"""Where a DTL inference forward's host time goes *in context*: the side network's calls
timed between the backbone's blocks, as a user's forward runs them, against the same calls
repeated at once (hot). Not in ``make bench``; a diagnostic for the host-overhead issue.

Why: micro-benchmarks of the side network's calls, run hot in a loop, add up to a few
percent of a forward (``bench_host.py`` at d=32: ~4 µs per side step, ~16 µs of stage
set-up), yet the DTL forward measures ~10 % over timm's, and callgrind counts only ~4 % more
instructions (``host_instructions.py``). This script decides where the difference is.

One DTL model (``bench_host.py``'s tiny ViT-B/16 structure, batch 1, one thread, the C++
kernels), timm's model beside it, interleaved round-robin, thread CPU time, median and
p25–p75 per variant:

* ``timm``: the plain timm forward;
* ``dtl``: the DTL forward as it is;
* ``dtl_step_twice``: every side step (``ops.step.side_step`` / ``side_step_``) called
  twice, the second call right after the first (hot); the extra time over ``dtl`` is what
  the steps cost hot;
* ``dtl_no_step``: the side network's Python runs, the step returns ``y`` unchanged;
* ``dtl_walk_only``: ``tap`` and ``add_back`` are no-ops and the walk's plan is off (the
  wrapper's walk alone: :func:`~dtl_kernels.models.walk._run_plain`'s loop, where ``dtl``
  runs the plan's, so ``side_us`` also holds the difference of the two loops).

Derived (``host_context.csv``, per forward, 6 add-backs): ``side_us`` = dtl − walk_only;
``step_in_context_us`` = dtl − no_step; ``step_hot_us`` = step_twice − dtl;
``python_us`` = no_step − walk_only. Differences of medians carry the noise of both (on a
loaded machine tens of µs): a ``step_hot_us`` below zero means "too small to see here".
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_host import Provider, quartiles  # noqa: E402
from common import RESULTS, Results  # noqa: E402

from dtl_kernels import csn as csn_module  # noqa: E402

VARIANTS = ("timm", "dtl", "dtl_step_twice", "dtl_no_step", "dtl_walk_only")


def _setter(model: torch.nn.Module):
    """``set(variant)``: patch the DTL model (and the steps its CSN calls: ``side_step``,
    and in no-grad passes the runners ``bind_side_step_`` makes) for ``variant``."""
    csn = model.csn
    step = csn_module.step
    real, real_bind = step.side_step, step.bind_side_step_

    def twice(fn, first_args: int | None = None):
        def call(*args, **kwargs):
            # side_step_ writes the same taps again (the same values); its first call leaves
            # out the next block's tap (next_down, after the 5 others), which the side op
            # must not see yet
            fn(*args[:first_args], **kwargs)
            return fn(*args, **kwargs)

        return call

    def no_step(y, taps, *args, **kwargs):
        return y, taps

    def no_step_(y, taps, *args, **kwargs):
        return y

    def bind(variant: str):
        def bind_side_step_(*args, **kwargs):
            run = real_bind(*args, **kwargs)
            return {"dtl_step_twice": twice(run, 5), "dtl_no_step": no_step_}.get(variant, run)

        return bind_side_step_

    def set_variant(variant: str) -> None:
        for name in ("tap", "add_back", "walk_plan"):
            csn.__dict__.pop(name, None)
        step.side_step = {"dtl_step_twice": twice(real), "dtl_no_step": no_step}.get(variant, real)
        patched = variant in ("dtl_step_twice", "dtl_no_step")
        step.bind_side_step_ = bind(variant) if patched else real_bind
        if variant == "dtl_walk_only":
            csn.tap = lambda state, i, z: None
            csn.add_back = lambda state, i, y, grid, num_prefix=0, tap_next=False: y
            csn.walk_plan = lambda x, grid, num_prefix: None  # the walk calls them

    return set_variant, lambda: set_variant("dtl")


def measure(reps: int, amp: bool) -> dict[str, list[float]]:
    timm, dtl = Provider("timm", amp), Provider("dtl", amp)
    for p in (timm, dtl):
        p.model.eval()
    set_variant, restore = _setter(dtl.model)
    samples: dict[str, list[float]] = {v: [] for v in VARIANTS}
    try:
        for r in range(reps + 5):
            for v in VARIANTS:
                p = timm if v == "timm" else dtl
                if p is dtl:
                    set_variant(v)
                t0 = time.thread_time()
                p.infer()
                dt = (time.thread_time() - t0) * 1e6
                if r >= 5:
                    samples[v].append(dt)
    finally:
        restore()
    return samples


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--reps", type=int, default=300, help="timed rounds (default 300)")
    ap.add_argument("--amp", action="store_true", help="under bfloat16 autocast")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    torch.set_num_threads(1)
    load_before = os.getloadavg()[0]
    s = measure(args.reps, args.amp)
    med = {v: statistics.median(x) for v, x in s.items()}
    derived = {
        "side_us": med["dtl"] - med["dtl_walk_only"],
        "step_in_context_us": med["dtl"] - med["dtl_no_step"],
        "step_hot_us": med["dtl_step_twice"] - med["dtl"],
        "python_us": med["dtl_no_step"] - med["dtl_walk_only"],
    }
    dtype = "bf16-autocast" if args.amp else "float32"
    shape = "ViT-B/16 blocks, d=32, 32 px, batch 1"
    res = Results("host_context")
    for v in VARIANTS:
        res.add(v, "infer_us", "tiny-vit12", 1, dtype, shape, quartiles(s[v]), "us")
    for name, value in derived.items():
        res.add("dtl", name, "tiny-vit12", 1, dtype, shape, value, "us")
    res.write(directory=args.results)
    print(f"load average {load_before:.2f} → {os.getloadavg()[0]:.2f}; {dtype}, {args.reps} rounds")
    for v in VARIANTS:
        print(f"  {v:15s} {med[v]:8.0f} µs  ({med[v] / med['timm']:.3f}× timm)")
    for name, value in derived.items():
        print(f"  {name:19s} {value:8.0f} µs per forward")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
