"""``make gpu-check``: everything a lent GPU should tell us, in one command of ≤ 8 minutes.

    python benchmarks/gpu_check.py --out DIR [--dry-run] [--stages ...] [--deadline S]

Stages (each a subprocess with a timeout, so one CUDA fault cannot poison the rest; their
output goes to ``DIR/log.txt``):

1. ``build``: the extension in place against this machine's torch, for this GPU's arch
   only and this host's CPU only (``DTL_KERNELS_NATIVE=1``), all cores (``setup.py
   build_ext --inplace``), then ``python -m dtl_kernels.info``.
2. At once, as they only check: ``correct`` (``gpu_correct.py`` for ``cuda`` and ``triton``:
   float64 reference, forward and every gradient, ViT-B / Swin-B shapes, fp32 / bf16 / fp16
   and autocast's float32 y + 16-bit taps, strided, bit-identical repeats: Triton's in its
   deterministic mode), ``pytest`` (the suite's GPU-marked tests), ``sanitize``
   (compute-sanitizer memcheck and racecheck on both backends, ViT-B shapes with several
   row tiles per CTA / program, Swin-B's K = 72, the mix) and two warm-ups that fill the
   compile caches for the timing stages (the side op's configurations; the models'
   fused kernels at every add-back width and the compiled point).
3. ``kernels``: ``gpu_kernels.py`` (eager, torch.compile, cuda, triton; fwd and fwd+bwd;
   ViT-B DTL / DTL+ k3 / k5 and Swin-B stage 3, all-bf16 and the autocast mix; CUDA graphs
   of 100 calls, L2 flushed; plain copy beside), then a profiler breakdown of our fwd+bwd
   into its kernels (``kernel_profile.csv``).
4. ``step``: ``bench_step.py`` on ViT-B/16 and Swin-B, batch 32, bf16 autocast: step time of
   full / linear / LoRA / DTL (eager reference and fused) / DTL+ interleaved round-robin,
   ≥ 30 rounds, median and IQR, GPU-busy time from the profiler; inference at batch 1 / 4 /
   16 eager and replayed from CUDA graphs, one torch.compile(mode="reduce-overhead") point.
   ``e2e``: ``bench_e2e.py``: peak memory of the same providers and the memory options.
5. ``fit``: ``bench_estimate.py fit``: ``estimate_memory``'s prediction beside the measured
   peak of two bf16 steps, ViT-B / ViT-L and the 1.1 B-parameter ViT-g/14 moonshot
   (DTL+, bf16 frozen weights, ``checkpoint_tail``, batch 32) → ``estimate_gpu.csv``; then
   the giants of issue 21, one process each (``bench_estimate.py fit-giant``): ViT-g/14 at
   batch 32 (goal ≤ 8 GB), PE-G/14 at 448 px batch 32 (≤ 24 GB), the ViT-22B shape at batch
   8 (fits 80 GB), built with random weights in bf16 straight on the GPU: build time and
   host memory, the prediction beside ``max_memory_allocated`` (within 10 %), step time →
   ``fit_giants.csv``. Alone: ``--stages fit --deadline 560`` (no build needed: the side
   op runs on Triton; the giants need timm's meta-device init, ``init_weights(needs_reset=)``
   as in timm 1.0.31 here: where the GPU's image has an older timm, carry 1.0.31's wheel).

Outputs in ``DIR``: ``correctness.csv``, ``kernels.csv``, ``kernel_profile.csv``,
``e2e.csv`` (device, torch, date in every row), ``log.txt``, and ``summary.txt`` (also
printed last): pass counts, the kernel table, and every target with its measured ratio and
by how much it is missed.

``--dry-run`` runs the same stages on the CPU with tiny shapes (C++ kernels, Triton under
its interpreter, no sanitizer, no build) so the script itself is tested in CI.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
CACHE = Path("/tmp/dtl_kernels_gpu_cache")  # inductor + triton caches of this run
STAGES = ("build", "correct", "pytest", "sanitize", "kernels", "step", "e2e", "fit")
SANITIZE_CASES = 5  # len(gpu_correct.sanitize_cases()); kept import-light (no torch here)
# bench_estimate.FIT_GIANTS with each one's time box (s): build, two predictions (the
# 22B's fake copy alone takes ~10 s), Triton's first compile for its width, 12 steps
GIANT_FITS = [("vit_giant_patch14_dinov2", 150), ("vit_pe_core_gigantic_patch14_448", 180),
              ("vit_22b_patch14_224", 240)]  # fmt: skip


class Log:
    """Appends to ``log.txt``; ``say`` also prints (the reply shows the end of stdout)."""

    def __init__(self, path: Path):
        self.path = path
        self.lock = threading.Lock()
        path.write_text("")

    def write(self, text: str) -> None:
        with self.lock, open(self.path, "a") as f:
            f.write(text if text.endswith("\n") else text + "\n")

    def say(self, text: str) -> None:
        print(text, flush=True)
        self.write(text)


class Runner:
    def __init__(self, log: Log, env: dict, deadline: float):
        self.log = log
        self.env = env
        self.deadline = deadline
        self.records: list[tuple[str, str, float, str]] = []  # stage, status, seconds, note
        self.outputs: dict[str, str] = {}
        self.lock = threading.Lock()

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def run(
        self,
        name: str,
        cmd: list[str],
        timeout: float,
        env: dict | None = None,
        min_time: float = 10,
    ) -> int | None:
        """Run ``cmd``; its output goes to the log under a header. None: not run / timed out."""
        budget = min(timeout, self.left())
        if budget < min_time:
            self._record(name, "SKIPPED", 0.0, f"deadline: {self.left():.0f}s left")
            return None
        t0 = time.monotonic()
        proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env={**self.env, **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )
        timer = threading.Timer(budget, lambda: os.killpg(proc.pid, signal.SIGKILL))
        timer.start()
        out, _ = proc.communicate()
        timer.cancel()
        secs = time.monotonic() - t0
        self.outputs[name] = out
        timed_out = proc.returncode == -signal.SIGKILL and secs >= budget - 1
        self.log.write(
            f"\n===== {name} ({secs:.0f}s, rc={proc.returncode}"
            f"{', TIMED OUT' if timed_out else ''}): {' '.join(cmd)}\n{out}"
        )
        status = "TIMEOUT" if timed_out else ("ok" if proc.returncode == 0 else "FAILED")
        self._record(name, status, secs, f"rc={proc.returncode}")
        return None if timed_out else proc.returncode

    def _record(self, name, status, secs, note):
        with self.lock:
            self.records.append((name, status, secs, note))
        self.log.say(f"[{time.strftime('%H:%M:%S')}] {name:22s} {status:8s} {secs:5.0f}s  {note}")

    def parallel(self, jobs: list[tuple]) -> None:
        threads = [threading.Thread(target=self.run, args=job) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()


def gpu_arch(py: str, env: dict) -> str | None:
    code = "import torch; print('%d.%d' % torch.cuda.get_device_capability())"
    try:
        out = subprocess.run([py, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    except subprocess.TimeoutExpired:
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def sanitizer_jobs(py: str) -> list[tuple]:
    tool = shutil.which("compute-sanitizer") or "/usr/local/cuda/bin/compute-sanitizer"
    if not os.path.exists(tool):
        return []
    case = [py, "benchmarks/gpu_correct.py", "--cases", "sanitize", "--out", "/tmp/dtl_sanitize"]
    jobs = []
    # racecheck: one process per case on the CUDA C++ kernels (run 2's second case in the
    # same process met a sanitizer-internal error after the first had passed); Triton's in
    # two, for time
    # (Triton's racecheck before the CUDA shards: it never ran, the CUDA one did)
    runs = [("memcheck", "cuda", "0/1"), ("memcheck", "triton", "0/1")]
    runs += [("racecheck", "triton", f"{i}/2") for i in range(2)]
    runs += [("racecheck", "cuda", f"{i}/{SANITIZE_CASES}") for i in range(SANITIZE_CASES)]
    for tool_name, backend, shard in runs:
        # only our kernels (racecheck of cuBLAS's would take minutes): the CUDA C++ ones by
        # their namespace (dtl::cuda_side), Triton's by their names (_fwd_kernel,
        # _fwd_conv_kernel, _bwd_kernel, _bwd_finish_kernel: unmangled), which "side"
        # matched none of; a sanitizer without the regex key reruns unfiltered (below)
        only = "kns=side" if backend == "cuda" else "regex=^_(fwd|bwd)_.*$"  # (search or match)
        cmd = [tool, "--tool", tool_name, "--error-exitcode", "9", "--kernel-name", only,
               "--print-limit", "20", *case, "--backend", backend, "--shard", shard]  # fmt: skip
        part = "" if shard == "0/1" else "-" + shard.split("/")[0]
        jobs.append((f"sanitize-{tool_name}-{backend}{part}", cmd))
    return jobs


def run_sanitizers(runner: Runner, jobs: list[tuple], box: float) -> None:
    end = time.monotonic() + box
    # without PyTorch's caching allocator every tensor is its own allocation, so memcheck
    # sees a read past a tensor's end (inside a cached segment it would be legal memory)
    env = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
    for name, cmd in jobs:  # one after another: each instruments its own process
        rc = runner.run(name, cmd, end - time.monotonic(), env)
        said = runner.outputs.get(name, "")
        if (
            rc not in (0, 9, None)
            and "SUMMARY" not in said
            and re.search(r"kernel.name|regex|invalid|unrecogni[sz]ed|unknown", said, re.I)
        ):
            # a compute-sanitizer without this --kernel-name key: check every kernel instead,
            # the rerun's record and section replacing the first's (the summary reads the last)
            i = cmd.index("--kernel-name")
            with runner.lock:
                runner.records = [r for r in runner.records if r[0] != name]
            runner.run(name, cmd[:i] + cmd[i + 2 :], end - time.monotonic(), env)


def merge_csvs(parts: list[Path], dest: Path) -> None:
    rows, fields = [], []
    for p in parts:
        if not p.exists():
            continue
        with open(p, newline="") as f:
            reader = csv.DictReader(f)
            fields += [c for c in reader.fieldnames or [] if c not in fields]
            rows += list(reader)
        p.unlink()
    if not rows:
        return
    tmp = dest.with_name(dest.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, dest)


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", required=True, type=Path, help="folder for CSVs, log, summary")
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes (tests the script)")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES)
    ap.add_argument("--deadline", type=float, default=470, help="seconds for the whole run")
    ap.add_argument(
        "--e2e-models", nargs="+", default=["vit_base_patch16_224", "swin_base_patch4_window7_224"]
    )
    ap.add_argument(
        "--e2e-providers",
        nargs="+",
        default=None,
        help="bench_e2e.py providers (default: all of its PROVIDERS)",
    )
    ap.add_argument(
        "--correct-backends", nargs="+", default=["cuda", "triton"], choices=["cuda", "triton"]
    )
    ap.add_argument(
        "--check-seconds",
        type=float,
        default=160,
        help="time box of the checks that run side by side (stage 2)",
    )
    ap.add_argument("--load-cache", type=Path, help="a compile_cache.tgz of an earlier run")
    ap.add_argument(
        "--save-cache",
        action="store_true",
        help="write DIR/compile_cache.tgz (inductor + triton caches)",
    )
    args = ap.parse_args()
    t_start = time.monotonic()
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    for stale in [*out.glob("*.csv"), out / "summary.txt"]:  # an earlier run's results
        stale.unlink(missing_ok=True)
    log = Log(out / "log.txt")
    py = sys.executable
    env = dict(
        os.environ,
        PYTHONUNBUFFERED="1",
        PYTHONPATH=os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
    )
    if not args.dry_run:
        if args.load_cache and args.load_cache.exists():
            with tarfile.open(args.load_cache) as tar:
                tar.extractall(CACHE.parent, filter="data")
        env.update(
            TORCHINDUCTOR_CACHE_DIR=str(CACHE / "inductor"), TRITON_CACHE_DIR=str(CACHE / "triton")
        )
    runner = Runner(log, env, t_start + args.deadline)
    stages = set(args.stages)
    dry = ["--dry-run"] if args.dry_run else []
    log.say(
        f"gpu_check: {'dry run (CPU)' if args.dry_run else 'GPU'}; stages {args.stages}; "
        f"deadline {args.deadline:.0f}s; out {out}"
    )

    # 1. build + info
    if "build" in stages and not args.dry_run:
        arch = gpu_arch(py, env)
        if arch is None:
            log.say("no CUDA GPU visible to torch: nothing to check on a GPU (use --dry-run)")
            return 2
        # the CPU kernels once, for this host (-march=native), not in three ISA variants:
        # each variant is a build of its own, one after another (device time)
        benv = dict(
            TORCH_CUDA_ARCH_LIST=arch,
            MAX_JOBS=str(os.cpu_count() or 4),
            DTL_KERNELS_CUDA="1",
            DTL_KERNELS_NATIVE="1",
        )
        if runner.run("build", [py, "setup.py", "build_ext", "--inplace"], 300, benv) != 0:
            log.say("build failed: see log.txt")
            return summarize(out, runner, log)
    if shutil.which("nvidia-smi") and not args.dry_run:  # the card as found: clocks, power
        runner.run(
            "nvidia-smi",
            [
                "nvidia-smi",
                "--query-gpu=name,driver_version,memory.total,"
                "clocks.sm,clocks.max.sm,power.draw,power.limit,"
                "temperature.gpu,utilization.gpu",
                "--format=csv",
            ],
            30,
        )
    runner.run("info", [py, "-m", "dtl_kernels.info"], 60)
    from gpu_summary import section  # noqa: PLC0415

    info = out / "log.txt"
    log.say(section(info.read_text(), "info").strip())

    # 2. checks, side by side, within one time box (they only check; timing comes after)
    box = min(args.check_seconds, runner.left() - 60)
    jobs = []
    if "correct" in stages:
        backends = ["cpu", "triton"] if args.dry_run else args.correct_backends
        for b in backends:
            extra = {"TRITON_INTERPRET": "1"} if args.dry_run and b == "triton" else None
            # Triton compiles a kernel per dtype / k / grid / mode (its deterministic mode
            # too): three shards, a third of the wait each
            shards = 3 if b == "triton" and not args.dry_run else 1
            for i in range(shards):
                cmd = [
                    py,
                    "benchmarks/gpu_correct.py",
                    "--backend",
                    b,
                    "--out",
                    str(out),
                    "--shard",
                    f"{i}/{shards}",
                ] + dry
                jobs.append((f"correct-{b}-{i}", cmd, box, extra))
    if "pytest" in stages and not args.dry_run:
        xdist = ["-n", "4"] if importlib.util.find_spec("xdist") else []
        jobs.append(
            (
                "pytest-gpu",
                [
                    py,
                    "-m",
                    "pytest",
                    "-q",
                    "-m",
                    "gpu",
                    "-p",
                    "no:cacheprovider",
                    *xdist,
                    "tests/test_side_cuda.py",
                    "tests/test_side_triton.py",
                    "tests/test_triton_launch.py",
                    "tests/test_side_step.py",
                    "tests/test_walk.py",
                    "tests/test_adapter_to_prediction.py",
                ],
                box,
            )
        )
    if "kernels" in stages and not args.dry_run:
        jobs.append(
            (
                "warm-compile",
                [py, "benchmarks/gpu_kernels.py", "--out", str(out), "--warm-only"],
                box,
            )
        )
    if "step" in stages and not args.dry_run:  # the models' kernels and compiled point
        cmd = [py, "benchmarks/bench_step.py", "--models", *args.e2e_models, "--warm-only"]
        # inductor's compile workers would take every core from the checks beside it
        jobs.append(("warm-step", cmd, box, {"TORCHINDUCTOR_COMPILE_THREADS": "4"}))
    san = sanitizer_jobs(py) if "sanitize" in stages and not args.dry_run else []
    threads = [threading.Thread(target=runner.parallel, args=(jobs,))]
    if san:
        threads.append(threading.Thread(target=run_sanitizers, args=(runner, san, box)))
    elif "sanitize" in stages:
        runner._record(
            "sanitize", "SKIPPED", 0, "dry run" if args.dry_run else "compute-sanitizer not found"
        )
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    merge_csvs(sorted(out.glob("correct_*_*.csv")), out / "correctness.csv")

    # 3. kernel timing, alone on the device
    if "kernels" in stages:
        runner.run("kernels", [py, "benchmarks/gpu_kernels.py", "--out", str(out)] + dry, 240)

    # 4. step and inference time (the interleaved protocol), one model per process; the
    # compiled point and the diagnostic providers on the first model only (time); each
    # process saves its rows as it goes, so a stage cut off keeps what it measured
    if "step" in stages:
        models = ["vit_tiny_patch16_224"] if args.dry_run else args.e2e_models
        for i, model in enumerate(models):
            cmd = [py, "benchmarks/bench_step.py", "--models", model, "--results-dir", str(out),
                   "--out", f"step_{i}"] + dry  # fmt: skip
            if i > 0:
                cmd += ["--no-compile", "--no-diagnostics"]
            # the time left, shared by weight among the models still to run: the first
            # carries the diagnostics and the compiled point (1.5 : 1); what one leaves
            # unused goes to the next
            weights = [1.5] + [1.0] * (len(models) - 1)
            share = runner.left() * weights[i] / sum(weights[i:])
            runner.run(f"step-{model}", cmd, min(170, share), min_time=30)
        merge_csvs([out / f"step_{i}.csv" for i in range(len(models))], out / "step.csv")

    # end to end memory, one model per process (a model cut off by the deadline loses only itself)
    if "e2e" in stages:
        if args.dry_run:
            models = ["vit_tiny_patch16_224"]
            e2e = [
                "--device",
                "cpu",
                "--batches",
                "2",
                "--providers",
                "full",
                "dtl",
                "--reps",
                "1",
                "--infer-batches",
                "1",
                "--infer-reps",
                "1",
            ]
        else:
            models = args.e2e_models
            e2e = [
                "--device",
                "cuda",
                "--batches",
                "32",
                *(["--providers", *args.e2e_providers] if args.e2e_providers else []),
                "--reps",
                "3",
                "--infer-batches",
                "1",
                "--infer-reps",
                "3",
                "--amp",
                "bf16",
            ]
        for i, model in enumerate(models):
            runner.run(
                f"e2e-{model}",
                [
                    py,
                    "benchmarks/bench_e2e.py",
                    "--models",
                    model,
                    *e2e,
                    "--time-batches",
                    "--sweep-batches",
                    "--m-values",
                    "--no-plots",
                    "--results-dir",
                    str(out),
                    "--out",
                    f"e2e_{i}",
                ],
                200,
                min_time=30,
            )
        merge_csvs([out / f"e2e_{i}.csv" for i in range(len(models))], out / "e2e.csv")

    # 5. will it fit: the giants first (issue 21), one process each (its host memory is the
    # build's; the dry run one stand-in), then the estimator against ViT-B / L / g
    if "fit" in stages:
        giants = GIANT_FITS[-1:] if args.dry_run else GIANT_FITS
        for i, (name, timeout) in enumerate(giants):
            cmd = [py, "benchmarks/bench_estimate.py", "fit-giant", "--model", name,
                   "--tag", str(i), "--out", str(out)] + dry  # fmt: skip
            runner.run(f"fit-{name}", cmd, timeout, min_time=30)
        merge_csvs([out / f"fit_giant_{i}.csv" for i in range(len(giants))], out / "fit_giants.csv")
        runner.run("fit", [py, "benchmarks/bench_estimate.py", "fit", "--out", str(out)] + dry,
                   150)  # fmt: skip

    if args.save_cache and CACHE.exists():
        dest = out / "compile_cache.tgz"
        with tarfile.open(dest, "w:gz") as tar:
            tar.add(CACHE, arcname=CACHE.name)
        if dest.stat().st_size > 15 * 2**20:  # the device tool brings back ≤ 16 MB a file
            dest.unlink()
    log.say(f"total {time.monotonic() - t_start:.0f}s")
    return summarize(out, runner, log)


def summarize(out: Path, runner: Runner, log: Log) -> int:
    from gpu_summary import summary  # noqa: PLC0415 (keeps the orchestrator import-light)

    text, ok = summary(out, runner.records, (out / "log.txt").read_text())
    tmp = out / "summary.txt.tmp"
    tmp.write_text(text)
    os.replace(tmp, out / "summary.txt")
    log.write(text)
    print(text, flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    sys.exit(main())
