"""Host time of two versions of the package, measured in alternating processes.

Why: on this benchmark's tiny models the host time of one build moves by ±2 % with nothing
changed (code layout, other tenants of a shared machine), and a change of a few µs per
add-back is smaller than that. Timing the two versions in one process is impossible when
the change is in compiled code, so each version runs in processes of its own, in turn:
base, head, base, head, … — whatever the machine does meanwhile touches both alike.

Each process runs ``bench_host.measure`` of *its own* checkout (which must be built in
place: ``setup.py build_ext --inplace``) on the providers and precision asked for, and
reports per provider the medians of the inference forward (``no_grad`` and inference
mode), the training step, its backward, and the add-back at the last adapted block (in a
training forward: block 12 of the ViT-B structure). The base's ``bench_host.measure``
must have this one's interface (it has since 3bdf3f9). One row per process and
provider; the summary prints each version's values process by process (not pooled: the
spread between processes is the noise to judge a change against).

    python benchmarks/host_ab.py --base /path/to/checkout-of-the-old-commit \\
        [--head .] [--processes 3] [--reps 150] [--providers timm dtl triton_dtl] \\
        [--out benchmarks/results/host_ab.csv]

``benchmarks/results/host_ab_triton_key.csv`` (51b4912 against 1e28e10) was measured
this way. Not in ``make bench`` (a diagnostic for changes to the host path).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
METRICS = ("infer_us", "infer_im_us", "step_us", "bwd_us", "addback_last_us")
PRECISIONS = {"float32": False, "bf16-autocast": True}


def child(providers: list[str], precision: str, reps: int) -> dict:
    """In the checkout this process runs from: ``{provider: {metric: µs}}``."""
    import torch

    sys.path.insert(0, str(Path.cwd() / "benchmarks"))
    import bench_host

    torch.set_num_threads(1)
    m = bench_host.measure(providers, PRECISIONS[precision], reps)
    out = {}
    for name in providers:
        adds = m["adds"].get(name) or {}
        out[name] = dict(
            infer_us=statistics.median(m["infer"][name]),
            infer_im_us=statistics.median(m["infer_im"][name]),
            step_us=statistics.median(m["step"][name]),
            bwd_us=statistics.median(m["parts"][name][1]),
            addback_last_us=adds[max(adds)][0] if adds else None,  # the last adapted block's
        )
    return out


def run_child(tree: Path, providers: list[str], precision: str, reps: int) -> dict:
    """One measuring process in ``tree`` (its own package and benchmarks on the path)."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", precision, str(reps),
           *providers]  # fmt: skip
    proc = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=3600)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"host_ab: the process in {tree} failed (rc {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")  # fmt: skip
    return json.loads(lines[-1][len("RESULT ") :])


def revision(tree: Path) -> str:
    got = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)  # fmt: skip
    return got.stdout.strip() or tree.name


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        precision, reps, providers = sys.argv[2], int(sys.argv[3]), sys.argv[4:]
        print("RESULT " + json.dumps(child(providers, precision, reps)), flush=True)
        return 0
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--base", type=Path, required=True, help="a checkout built in place")
    ap.add_argument("--head", type=Path, default=ROOT, help="default: this checkout")
    ap.add_argument("--processes", type=int, default=3, help="per version and precision")
    ap.add_argument("--reps", type=int, default=150, help="bench_host rounds per process")
    ap.add_argument("--providers", nargs="+", default=["timm", "dtl", "triton_dtl"])
    ap.add_argument("--precisions", nargs="+", default=list(PRECISIONS), choices=PRECISIONS)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "host_ab.csv")
    args = ap.parse_args()
    trees = {revision(t): t.resolve() for t in (args.base, args.head)}
    if len(trees) != 2:
        ap.error("--base and --head are the same commit")
    load_before = os.getloadavg()[0]
    rows = []
    for process in range(1, args.processes + 1):
        for rev, tree in trees.items():  # base, head, base, head, …
            for precision in args.precisions:
                got = run_child(tree, args.providers, precision, args.reps)
                print(f"process {process}: {rev} {precision} done", flush=True)
                for provider, values in got.items():
                    rows.append(dict(code=rev, precision=precision, process=process,
                                     provider=provider, **values))  # fmt: skip
    load = f"load average {load_before:.2f} -> {os.getloadavg()[0]:.2f}"
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.out.with_suffix(".tmp")
    with tmp.open("w", newline="") as f:
        f.write(f"# host_ab.py: {' vs '.join(trees)}, {args.processes} processes each, "
                f"{args.reps} rounds, one thread; {load}\n")  # fmt: skip
        writer = csv.DictWriter(f, fieldnames=["code", "precision", "process", "provider",
                                               *METRICS])  # fmt: skip
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(args.out)
    for precision in args.precisions:
        for provider in args.providers:
            for rev in trees:
                picked = [r for r in rows if (r["code"], r["precision"], r["provider"])
                          == (rev, precision, provider)]  # fmt: skip
                cols = "  ".join(
                    f"{m} " + "/".join("-" if r[m] is None else f"{r[m]:.1f}" for r in picked)
                    for m in METRICS
                )
                print(f"{precision:13} {provider:12} {rev:9} {cols}")
    print(f"{load}; rows -> {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
