"""Host (Python / dispatch) overhead of a DTL step, measured on the CPU where compute is
negligible: ViT-B/16's block structure (12 blocks, M = 7) at a tiny width and image size,
batch 1, one thread (``make bench`` runs it; ``--quick`` for fewer repetitions).

On a GPU at small and medium batches the host issues kernels more slowly than the GPU runs
them, so the host time per step *is* the step time there. This benchmark measures that
host time without a GPU: every provider runs the same walk, with the tensors so small that
what is left is Python, autograd and the dispatcher.

Providers: ``timm`` (the plain timm model; its inference forward runs a frozen copy, as
every DTL model's backbone is frozen: under autocast each weight that requires grad goes
through autocast's cast cache, ~10 % of this forward, which a frozen one skips),
``linear`` (head only), ``full`` (everything trains), ``lora`` (PEFT LoRA r = 8 on every
``qkv``), ``dtl_ref`` (DTL on the eager published formulation), ``dtl`` / ``dtl+`` on the
compiled C++ kernels (``cpu``) and on the Triton launchers with Triton's driver replaced
by a recorder (``triton*``: everything the Triton path does on the host, Triton's own launch
path included, up to the driver's launch call; nothing runs on a device). ``tail_floor``
is the host work every DTL step does whatever its side network costs: the linear probe's
step plus the input-gradient backward through the frozen blocks after ``M`` (8–12), with
no side network at all; a DTL step's ratio to full fine-tuning cannot go below ``tail_floor``'s.

Measured (``bench_host.csv``, ``bench_host.png``):

* ``infer_us``: an eval forward under ``torch.no_grad`` (``infer_im_us``: the same in
  inference mode, as ``Predictor`` runs it); ``step_us``: forward +
  cross-entropy + backward + AdamW step (``dtl_kernels.optim.adamw``, fused, as dtl-train
  builds it), also split into ``fwd_us``, ``bwd_us`` and ``opt_us``. The providers run
  interleaved round-robin (one call each per round, ``--reps`` rounds after a warm-up), so
  a load change hits them alike; median, p25 and p75 per provider; ratios are of medians of
  the same run. Times are the benchmark thread's CPU time (``time.thread_time``): other
  processes on the machine do not add to it (they can still slow it through shared caches).
  Both in float32 and under bfloat16 autocast (``dtype`` column).
* ``fwd_ops`` / ``bwd_ops``: operations dispatched (a ``TorchDispatchMode`` counter) in the
  training forward (with the loss) and in the backward (+ AdamW is not counted). Under a
  dispatch mode the side network does not run its plain-eager path (it cannot keep tensors
  across passes a mode might see): the forward count includes the stage's zero taps made
  anew (one operation per stage), which the timed passes take from their cache.
* ``addback_us`` / ``addback_ops`` at block 7 and block 12 (the first and last add-back):
  host time and dispatched operations of one add-back in a training forward: the step of
  the walk's plan where the walk takes one (``PlannedPass.recorded_step``), else the
  ``add_back`` call.

Operation counts are deterministic; times depend on the machine's load, which the output
states (``os.getloadavg``).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import os
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Results  # noqa: E402

from dtl_kernels import DTLViT  # noqa: E402
from dtl_kernels import csn as csn_module  # noqa: E402
from dtl_kernels.optim import adamw  # noqa: E402

NUM_CLASSES = 10
ADAPT_FROM = 7  # M (1-based, the published ViT setting): add-backs after blocks 7…12
TINY = dict(img_size=32, patch_size=16, embed_dim=32, depth=12, num_heads=2)  # grid 2×2
PROVIDERS = ("timm", "linear", "tail_floor", "dtl_ref", "dtl", "dtl+", "triton_dtl",
             "triton_dtl+", "full", "lora")  # fmt: skip


# -- models --------------------------------------------------------------------------------
def tiny_backbone(num_classes: int = NUM_CLASSES):
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(**TINY, num_classes=num_classes)


def build(provider: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if provider == "timm":
        return tiny_backbone()
    if provider == "lora":
        import peft

        cfg = peft.LoraConfig(r=8, target_modules=["qkv"], modules_to_save=["head"])
        return peft.get_peft_model(tiny_backbone(), cfg)
    side = provider not in ("linear", "full", "tail_floor")
    k = 3 if provider.endswith("+") else 0
    model = DTLViT(tiny_backbone(), conv_kernel=k, side=side, train_backbone=provider == "full",
                   adapt_from=ADAPT_FROM, num_classes=NUM_CLASSES)  # fmt: skip
    if provider == "tail_floor":
        model.call_block = _gradient_from(model, first=ADAPT_FROM)  # 0-based: block M + 1
    if side:
        model.csn.backend = {"dtl_ref": "reference"}.get(provider, "auto")
        if provider.startswith("triton"):
            model.csn.backend = "triton"
        with torch.no_grad():  # B ≠ 0: nothing short-circuits on zeros
            for p in model.csn.up.values():
                p.normal_(0, 0.02)
    return model


def _gradient_from(model, first: int):
    """``model.call_block`` with block ``first``'s input (0-based) made a leaf that needs a
    gradient in training, as DTL's add-back output does: the blocks from there on run their
    input-gradient backward, with no side network."""
    plain = model.call_block

    def call_block(block, i, x, ctx):
        if i == first and torch.is_grad_enabled():
            x = x.detach().requires_grad_()
        return plain(block, i, x, ctx)

    return call_block


@contextlib.contextmanager
def triton_launches_recorded():
    """The Triton path on CPU tensors with Triton's driver replaced by a recorder
    (``triton_fake_driver.py``): all of its host work -- planning, checks, temporaries, the
    op glue and Triton's own launch path (the JIT's first launch, then direct launches) --
    up to ``cuLaunchKernel``, which is never called. Kernels compile for sm_90 on first use
    (about a second each). Outputs are uninitialised."""
    from triton_fake_driver import fake_cuda_driver

    from dtl_kernels.ops import side

    saved = side.BACKENDS["triton"]
    side.BACKENDS["triton"] = dataclasses.replace(saved, runs=lambda x: True)
    try:
        with fake_cuda_driver(keep_calls=False):
            yield
    finally:
        side.BACKENDS["triton"] = saved


# -- measurements --------------------------------------------------------------------------
class OpCounter(TorchDispatchMode):
    """Counts the operations that reach the dispatcher's Python mode (every aten call)."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


class Provider:
    """One provider's model, batch, optimizer and the calls the benchmark times."""

    def __init__(self, name: str, amp: bool = False):
        self.name = name
        self.model = build(name)
        # what infer() runs: timm's frozen copy (module docstring), else the model itself
        self.infer_model = self.model
        if name == "timm":
            self.infer_model = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.amp = amp
        gen = torch.Generator().manual_seed(0)
        self.x = torch.randn(1, 3, TINY["img_size"], TINY["img_size"], generator=gen)
        self.y = torch.randint(0, NUM_CLASSES, (1,), generator=gen)
        params = [p for p in self.model.parameters() if p.requires_grad]
        self.opt = adamw(params, lr=1e-4, weight_decay=0.05)
        self.parts: list[tuple[float, float, float]] = []  # (fwd, bwd, opt) µs per step

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.amp)

    def infer(self) -> None:
        """An eval forward (call ``model.eval()`` first: switching modes is not timed)."""
        with torch.no_grad(), self.autocast():
            self.infer_model(self.x)

    def infer_im(self) -> None:
        """:meth:`infer` in inference mode (what ``Predictor`` / ``dtl-predict`` run)."""
        with torch.inference_mode(), self.autocast():
            self.infer_model(self.x)

    def loss(self) -> torch.Tensor:
        """The training forward and loss (``model.train()`` first)."""
        with self.autocast():
            return F.cross_entropy(self.model(self.x).float(), self.y)

    def step(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        t0 = time.thread_time()
        loss = self.loss()
        t1 = time.thread_time()
        loss.backward()
        t2 = time.thread_time()
        self.opt.step()
        t3 = time.thread_time()
        self.parts.append(((t1 - t0) * 1e6, (t2 - t1) * 1e6, (t3 - t2) * 1e6))

    def op_counts(self) -> tuple[int, int]:
        """Dispatched operations of the training forward (+ loss) and of the backward."""
        self.opt.zero_grad(set_to_none=True)
        with OpCounter() as fwd:
            loss = self.loss()
        with OpCounter() as bwd:
            loss.backward()
        return fwd.total, bwd.total

    def add_backs(self, reps: int) -> dict[int, tuple[float, int]]:
        """Per adapted block (0-based): median host µs and dispatched ops of one add-back
        in a training forward: ``add_back`` where the walk calls it, else the step of the
        walk's plan (``PlannedPass.recorded_step``; its k-th call in a forward is the k-th
        adapted block's)."""
        csn = getattr(self.model, "csn", None)
        if csn is None:
            return {}
        times: dict[int, list[float]] = {}
        ops: dict[int, int] = {}
        adapted = [i for i, a in enumerate(csn.adapted_blocks) if a]
        original, planned = csn.add_back, csn_module.PlannedPass.recorded_step
        calls = []  # planned steps of this forward

        def measured(fn, block_of):
            def call(*args, **kwargs):
                i = block_of(args)
                if counting:
                    with OpCounter() as c:
                        out = fn(*args, **kwargs)
                    ops[i] = c.total
                    return out
                t0 = time.thread_time()
                out = fn(*args, **kwargs)
                times.setdefault(i, []).append((time.thread_time() - t0) * 1e6)
                return out

            return call

        def planned_block(args):
            calls.append(None)
            return adapted[len(calls) - 1]

        csn.add_back = measured(original, lambda args: args[1])
        csn_module.PlannedPass.recorded_step = measured(planned, planned_block)
        try:
            for r in range(reps + 1):
                counting = r == 0
                calls.clear()
                self.loss()
        finally:
            del csn.add_back  # the instance attribute; the method is back
            csn_module.PlannedPass.recorded_step = planned
        return {i: (statistics.median(t), ops[i]) for i, t in times.items()}


def round_robin(providers: list[Provider], call: str, reps: int, warmup: int) -> dict:
    """``{name: [µs, …]}``: ``reps`` rounds, each calling every provider once, in turn."""
    samples = {p.name: [] for p in providers}
    for p in providers:
        p.model.train(call not in ("infer", "infer_im"))
    for r in range(warmup + reps):
        for p in providers:
            fn = getattr(p, call)
            t0 = time.thread_time()
            fn()
            dt = (time.thread_time() - t0) * 1e6
            if r >= warmup:
                samples[p.name].append(dt)
    return samples


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q1, med, q3 = statistics.quantiles(sorted(xs), n=4, method="inclusive")
    return med, q1, q3


def measure(names: list[str], amp: bool, reps: int) -> dict:
    """Every measurement of the providers ``names`` in one precision."""
    recorded = any(n.startswith("triton") for n in names)
    with triton_launches_recorded() if recorded else contextlib.nullcontext():
        providers = [Provider(n, amp) for n in names]
        infer = round_robin(providers, "infer", reps, warmup=5)
        infer_im = round_robin(providers, "infer_im", reps, warmup=5)
        step = round_robin(providers, "step", reps, warmup=5)
        for p in providers:
            p.model.train()
        counts = {p.name: p.op_counts() for p in providers}
        adds = {p.name: p.add_backs(reps) for p in providers}
    parts = {p.name: [list(col) for col in zip(*p.parts[-reps:], strict=True)] for p in providers}
    return dict(infer=infer, infer_im=infer_im, step=step, counts=counts, adds=adds, parts=parts)


def record(res: Results, m: dict, names: list[str], dtype: str) -> None:
    shape = "ViT-B/16 blocks, d=32, 32 px, batch 1"
    model = "tiny-vit12"

    def add(name, mode, value, unit, shp=shape):
        res.add(name, mode, model, 1, dtype, shp, value, unit)

    for name in names:
        add(name, "infer_us", quartiles(m["infer"][name]), "us")
        add(name, "infer_im_us", quartiles(m["infer_im"][name]), "us")
        add(name, "step_us", quartiles(m["step"][name]), "us")
        for part, samples in zip(("fwd_us", "bwd_us", "opt_us"), m["parts"][name], strict=True):
            add(name, part, quartiles(samples), "us")
        add(name, "fwd_ops", m["counts"][name][0], "ops")
        add(name, "bwd_ops", m["counts"][name][1], "ops")
        adds = m["adds"][name]
        for i in (min(adds), max(adds)) if adds else ():
            us, n_ops = adds[i]
            add(name, "addback_us", us, "us", f"block {i + 1}")
            add(name, "addback_ops", n_ops, "ops", f"block {i + 1}")


def summary_lines(m: dict, names: list[str], dtype: str) -> list[str]:
    med = {n: (statistics.median(m["infer"][n]), statistics.median(m["step"][n]),
               statistics.median(m["infer_im"][n])) for n in names}  # fmt: skip
    lines = [f"{dtype}:"]
    for n in names:
        line = f"  {n:12s} infer {med[n][0]:7.0f} µs"
        if "timm" in med:
            line += f" ({med[n][0] / med['timm'][0]:.2f}× timm"
            line += f"; inference mode {med[n][2]:.0f} µs, {med[n][2] / med['timm'][2]:.2f}×)"
        line += f"   step {med[n][1]:7.0f} µs"
        if "full" in med:
            line += f" ({med[n][1] / med['full'][1]:.2f}× full"
            line += f", {med[n][1] / med['dtl_ref'][1]:.2f}× dtl_ref)" if "dtl_ref" in med else ")"
        adds = m["adds"][n]
        if adds:
            line += "   add-back " + " / ".join(
                f"{adds[i][0]:.0f} µs {adds[i][1]} ops" for i in (min(adds), max(adds))
            )
        lines.append(line)
    return lines


def plot(all_m: dict, names: list[str], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    width = 0.8 / len(all_m)
    for ax, call in zip(axes, ("infer", "step"), strict=True):
        for j, (dtype, m) in enumerate(all_m.items()):
            meds = [statistics.median(m[call][n]) / 1e3 for n in names]
            ax.bar([i + j * width for i in range(len(names))], meds, width, label=dtype)
        ax.set_xticks([i + width * (len(all_m) - 1) / 2 for i in range(len(names))])
        ax.set_xticklabels(names, rotation=35, ha="right")
        ax.set_ylabel("host time (ms, thread CPU time)")
        ax.set_title({"infer": "inference forward", "step": "training step (fwd+bwd+AdamW)"}[call])
        ax.grid(axis="y", alpha=0.3)
        ax.legend()
    fig.suptitle("Host overhead: ViT-B/16's 12 blocks at d=32, 32 px, batch 1, one thread")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--reps", type=int, default=60, help="timed rounds (default 60)")
    ap.add_argument("--quick", action="store_true", help="20 rounds, float32 only")
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    reps = 20 if args.quick else args.reps
    torch.set_num_threads(1)
    names = [p for p in args.providers if p != "lora" or _has_peft()]
    if not _has("triton"):
        print("bench_host: Triton is not installed: the triton_* providers are left out")
        names = [p for p in names if not p.startswith("triton")]
    load_before = os.getloadavg()[0]
    precisions = {"float32": False} if args.quick else {"float32": False, "bf16-autocast": True}
    all_m = {dtype: measure(names, amp, reps) for dtype, amp in precisions.items()}
    load = f"load average {load_before:.2f} → {os.getloadavg()[0]:.2f} (2 cores)"
    res = Results("bench_host")
    for dtype, m in all_m.items():
        record(res, m, names, dtype)
    res.write(directory=args.results)
    plot(all_m, names, args.results / "bench_host.png")
    print(f"\n{load}")
    for dtype, m in all_m.items():
        print("\n".join(summary_lines(m, names, dtype)))
    return 0


def _has_peft() -> bool:
    return _has("peft")


def _has(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


if __name__ == "__main__":
    sys.exit(main())
