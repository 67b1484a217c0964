"""Shared helpers of the benchmark scripts: timing, environment description, CSV rows.

Every script writes rows with the columns of :data:`COLUMNS` to
``benchmarks/results/<name>.csv`` (overwritten per run) and prints a table.
"""

from __future__ import annotations

import csv
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch

COLUMNS = [
    "benchmark",
    "provider",
    "mode",
    "model",
    "batch",
    "dtype",
    "shape",
    "median",
    "p20",
    "p80",
    "unit",
    "machine",
    "torch",
    "version",
    "git_rev",
    "triton",
    "date",
]
RESULTS = Path(__file__).resolve().parent / "results"


def machine() -> str:
    """CPU model, thread count and torch's CPU capability, with "+ bf16 pairs" where the CPU
    kernels take bf16 taps and ups through AVX512-BF16 (``_ext.cpu_bf16_dot()``)."""
    name = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    isa = torch.backends.cpu.get_cpu_capability()
    try:
        from dtl_kernels.ops import _ext

        isa += " + bf16 pairs" if _ext.cpu_bf16_dot() else ""
    except ImportError:  # run from a checkout without the package on the path
        pass
    return f"{name}; {torch.get_num_threads()} threads; {isa}"


def git_rev() -> str:
    """The commit measured (``DTL_GIT_REV`` names it where the tree has no .git)."""
    if os.environ.get("DTL_GIT_REV"):
        return os.environ["DTL_GIT_REV"]
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            check=True,
        )
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def env_columns(device: str = "cpu") -> dict[str, str]:
    """Where and when a result was measured: device name, torch / triton versions, date, rev.

    ``device`` ``"cuda"`` names the current GPU (CUDA is touched only then)."""
    name = torch.cuda.get_device_name() if device == "cuda" else machine()
    return dict(device=name, **code_columns())


def code_columns() -> dict[str, str]:
    """What measured it and when: torch / triton versions, date, rev."""
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = "-"
    return dict(torch=torch.__version__, triton=triton_version, date=time.strftime("%Y-%m-%d"),
                git_rev=git_rev())  # fmt: skip


def package_version() -> str:
    from dtl_kernels import __version__

    return __version__


def op_bytes(rows: int, d: int, k_cols: int, mode: str, elem: int, side_elem: int = 0) -> int:
    """Fewest bytes one side-op call must move through memory: forward reads y and T and
    writes out; backward reads G and T and writes ∂T (∂y is G itself, no copy). The
    parameters (d·K, d·k²) are left out: < 0.5 % at the benchmark shapes. ``mode``:
    ``"fwd"`` or ``"full"`` (forward + backward); ``elem``: bytes per element of y, out
    and G; ``side_elem``: of T and ∂T where they differ (autocast's mix), else ``elem``."""
    side_elem = side_elem or elem
    fwd = 2 * rows * d * elem + rows * k_cols * side_elem
    bwd = rows * d * elem + 2 * rows * k_cols * side_elem
    return fwd if mode == "fwd" else fwd + bwd


def side_kernel(backend: str) -> Callable:
    """``side_add``-like ``(y, taps, ups, beta, w, grid, prefix)`` on one backend without the
    user-input checks (kernel timing: the op as the model wrappers call it)."""
    from dtl_kernels.ops import side
    from dtl_kernels.ops.contract import SideArgs

    run = side.BACKENDS[backend].run

    def call(y, taps, ups, beta, w=None, grid=None, prefix=0):
        return run(SideArgs.of(y, taps, ups, beta, w, grid, prefix, check=False))

    return call


def quantiles(samples: list[float]) -> tuple[float, float, float]:
    """(median, p20, p80) of ``samples``."""
    s = sorted(samples)
    if len(s) == 1:
        return s[0], s[0], s[0]
    q = statistics.quantiles(s, n=10, method="inclusive")
    return statistics.median(s), q[1], q[7]


def time_fn(
    fn: Callable[[], object], warmup: int = 3, reps: int = 15, min_time: float = 0.0
) -> tuple[float, float, float]:
    """Wall time of ``fn()`` in milliseconds: (median, p20, p80) over ``reps`` runs (more
    if ``min_time`` seconds have not passed), after ``warmup`` runs."""
    for _ in range(warmup):
        fn()
    samples: list[float] = []
    start = time.perf_counter()
    while len(samples) < reps or time.perf_counter() - start < min_time:
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return quantiles(samples)


def interleaved(fns: dict, reps: int, warmup: int = 3) -> dict:
    """``{name: (median, p20, p80)}`` ms of each ``fns[name]()``, called in turn (in the
    dict's order) for ``warmup + reps`` rounds: a change of a shared machine's load hits
    them alike."""
    samples = {name: [] for name in fns}
    for r in range(warmup + reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            if r >= warmup:
                samples[name].append((time.perf_counter() - t0) * 1e3)
    return {name: quantiles(xs) for name, xs in samples.items()}


class Results:
    """Collects rows of one benchmark; :meth:`write` saves the CSV and prints a table."""

    def __init__(self, benchmark: str, device: str = "cpu"):
        self.benchmark = benchmark
        self.rows: list[dict] = []
        env = env_columns(device)
        self.env = dict(
            machine=env["device"],
            torch=env["torch"],
            version=package_version(),
            git_rev=env["git_rev"],
            triton=env["triton"],
            date=env["date"],
        )

    def add(self, provider, mode, model, batch, dtype, shape, stats, unit) -> dict:
        median, p20, p80 = stats if isinstance(stats, tuple) else (stats, stats, stats)
        row = dict(
            benchmark=self.benchmark,
            provider=provider,
            mode=mode,
            model=model,
            batch=batch,
            dtype=str(dtype).replace("torch.", ""),
            shape=shape,
            median=median,
            p20=p20,
            p80=p80,
            unit=unit,
            **self.env,
        )
        self.rows.append(row)
        return row

    def write(self, name: str | None = None, directory: Path | None = None,
              show: bool = True) -> Path:  # fmt: skip
        """Save the rows (atomically: a crash leaves the previous CSV); ``show``: print
        the table too (a script that saves as it goes prints it once, at the end)."""
        directory = Path(directory) if directory is not None else RESULTS
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"{name or self.benchmark}.csv"
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS)
            writer.writeheader()
            for row in self.rows:
                writer.writerow({k: _fmt(row[k]) for k in COLUMNS})
        os.replace(tmp, path)  # a crash leaves the previous CSV, never half of one
        if not show:
            return path
        self.print_table()
        print(f"\n{len(self.rows)} rows -> {os.path.relpath(path)}  [{self.env['machine']}]")
        return path

    def print_table(self) -> None:
        cols = ["provider", "mode", "model", "batch", "dtype", "shape"]
        cols += ["median", "p20", "p80", "unit"]
        table = [[_fmt(r[c]) for c in cols] for r in self.rows]
        widths = [max([len(c)] + [len(t[i]) for t in table]) for i, c in enumerate(cols)]
        print("  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
        for t in table:
            print("  ".join(v.ljust(w) for v, w in zip(t, widths, strict=True)))


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def cpu_peak_bytes(fn) -> int:
    """Peak CPU allocator bytes of ``fn()`` above what was live at its start: the largest
    prefix sum, in time order, of the signed sizes of the profiler's ``[memory]`` events."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e
        for e in prof.profiler.kineto_results.events()
        if e.name() == "[memory]" and e.device_type() == torch.autograd.DeviceType.CPU
    ]
    total = peak = 0
    for e in sorted(events, key=lambda e: e.start_ns()):
        total += e.nbytes()
        peak = max(peak, total)
    return peak
