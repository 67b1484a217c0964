"""Training time with and without the trunk cache (``--cache-trunk``).

Two measurements per setting:

1. *Interleaved steps* (in this process): one training step (forward, backward, AdamW)
   on the same batch, uncached (images → ``model``) and from a RAM trunk cache (the batch
   read and collated from the cache → ``forward_from_trunk``), alternated ``--steps``
   times. On a shared, loaded machine this is the steadier number: both variants see the
   same load. An epoch is ``steps/epoch`` such steps, so the ratio of the medians is the
   epoch-time ratio of the training loop.
2. *dtl-train runs*: the whole command trained twice with the same data, schedule and
   seed — once uncached (``--cache-trunk off``) and once from the cache (``ram`` by
   default) — each in its own process (``python -m dtl_kernels.train``); epoch wall times
   from ``metrics.jsonl`` and the process CPU time of the middle epochs.

Settings:

* ``elpv``: the ``make demo`` setting, ImageNet EfficientNet-Lite0 DTL+ on elpv at 128 px,
  batch 32 (``--elpv-max-train`` images);
* ``vit``: ViT-B/16 with random weights (``--pretrained none`` only warns; the timing does
  not depend on the weights), DTL+ with ``M = 7`` (taps on every block, so the cache
  holds ``z_1 … z_7`` and block 7's output: ~4.8 MB a sample in fp32), elpv images at 224
  px, batch 16 (``--vit-max-train`` images).

For the runs, the training time of every epoch comes from ``metrics.jsonl``
(``epoch_time_s``: the training loop only, evaluation excluded), the cache build time (one
trunk pass over the train and test images) from the run's log; the ratio uses each run's
fastest epoch. Target (ViT-B, M = 7): cached epochs ≤ 0.6× the uncached epoch time.

    python benchmarks/bench_cache.py                    # both settings, steps + runs
    python benchmarks/bench_cache.py --no-runs --steps 8
    python benchmarks/bench_cache.py --settings vit --epochs 3 --cache-dtype bf16

Rows → ``benchmarks/results/bench_cache.csv`` (columns of ``benchmarks/common.py``;
``median``/``p20``/``p80``: over the interleaved steps, or over a run's epochs).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results  # noqa: E402

SETTINGS = {
    "elpv": dict(
        model="tf_efficientnet_lite0", pretrained="efficientnet-lite0", img_size=128,
        batch_size=32, lr=3e-3, extra=[],
    ),
    "vit": dict(
        model="vit_base_patch16_224", pretrained="none", img_size=224, batch_size=16, lr=1e-3,
        extra=["--adapt-from", "7"],
    ),
}  # fmt: skip


def train(setting: str, cache: str, args, out: Path) -> dict:
    s = SETTINGS[setting]
    max_train = args.elpv_max_train if setting == "elpv" else args.vit_max_train
    cmd = [
        sys.executable, "-m", "dtl_kernels.train", "--model", s["model"],
        "--pretrained", s["pretrained"], "--method", "dtl+", "--dataset", "elpv",
        "--img-size", str(s["img_size"]), "--epochs", str(args.epochs),
        "--batch-size", str(s["batch_size"]), "--lr", str(s["lr"]), "--warmup-epochs", "1",
        "--max-train", str(max_train), "--max-test", str(args.max_test),
        "--eval-every", str(args.epochs), "--output", str(out), "--no-progress",
        "--cache-trunk", cache, "--cache-dtype", args.cache_dtype,
        "--cache-max-bytes", args.cache_max_bytes, *s["extra"],
    ]  # fmt: skip
    print("$", " ".join(cmd), flush=True)
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines, cpu_marks = [], []
    for line in proc.stdout:  # the process's CPU time at the end of every epoch
        lines.append(line)
        if re.match(r"epoch \d+/\d+:", line):
            cpu_marks.append(_cpu_seconds(proc.pid))
    stderr = proc.stderr.read()
    proc.wait()
    wall = time.time() - t0
    stdout = "".join(lines)
    if proc.returncode:
        print(stdout[-3000:], stderr[-3000:], sep="\n")
        raise SystemExit(f"{setting}/{cache}: dtl-train failed ({proc.returncode})")
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    built = re.search(r"trunk cache: built in ([0-9.]+)s", stdout)
    size = re.search(r"; total ([0-9.]+ \w+) of", stdout)
    result = dict(
        epochs=[r["epoch_time_s"] for r in rows], build_s=float(built.group(1)) if built else 0.0,
        cache_size=size.group(1) if size else "", summary=summary, wall=wall,
        # CPU seconds of the epochs between the first and the last (no warm-up, no eval)
        cpu=[b - a for a, b in zip(cpu_marks[:-2], cpu_marks[1:-1], strict=True)],
    )  # fmt: skip
    times = ", ".join(f"{t:.2f}" for t in result["epochs"])
    cpu = ", ".join(f"{t:.1f}" for t in result["cpu"])
    print(f"  epochs [{times}] s (CPU [{cpu}] s); build {result['build_s']:.1f} s; "
          f"cache {result['cache_size'] or '-'}; trunk_cache={summary['trunk_cache']}; "
          f"wall {wall:.0f} s", flush=True)  # fmt: skip
    if cache != "off" and summary["trunk_cache"] == "off":
        raise SystemExit(f"{setting}: the cache was not used")
    return result


def interleaved_steps(setting: str, args, res: Results) -> float:
    """One training step (forward, backward, AdamW) on the same batch, uncached (images →
    ``model``) and cached (the batch read from a RAM trunk cache → ``forward_from_trunk``),
    alternated ``--steps`` times so that a shared machine's load hits both alike.
    Returns the ratio of the medians, cached / uncached."""
    import statistics

    import torch
    import torch.nn.functional as F
    from torch.utils.data import default_collate

    from dtl_kernels import create_model
    from dtl_kernels.train import cache as tc
    from dtl_kernels.train.data import elpv, normalization

    s = SETTINGS[setting]
    mean, std = normalization("imagenet" if setting == "elpv" else "half")
    train_set, _ = elpv(s["img_size"], mean, std)
    batch = s["batch_size"]
    data = train_set.subset(torch.arange(batch))
    pretrained = False if s["pretrained"] == "none" else s["pretrained"]
    options = {"adapt_from": 7} if setting == "vit" else {}
    if setting == "vit":
        options["img_size"] = s["img_size"]
    torch.manual_seed(0)
    model = create_model(s["model"], "dtl+", 4, pretrained, **options)
    channels_last = setting == "elpv"
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    cache = tc.TrunkCache(model, data, "train", {"bench": setting}, args.cache_dtype,
                          channels_last=channels_last, batch_size=batch).build_ram()  # fmt: skip
    view, tail = cache.view(), tc.TrunkTail(model, cache.ctx)
    opt = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4)
    model.train()

    def step(cached: bool) -> float:
        t0 = time.perf_counter()
        if cached:
            x, y = default_collate([view[i] for i in range(batch)])
            logits = tail(x)
        else:
            x, y = default_collate([data[i] for i in range(batch)])
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            logits = model(x)
        loss = F.cross_entropy(logits, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    for _ in range(2):  # warm-up: allocator, AdamW state, first touch of the cache pages
        step(False), step(True)
    times = {False: [], True: []}
    for _ in range(args.steps):
        for cached in (False, True):
            times[cached].append(step(cached))
    shape = f"{s['img_size']}px" + (" M=7" if setting == "vit" else "")
    for cached, t in times.items():
        mode = f"step cache=ram/{args.cache_dtype}" if cached else "step uncached"
        q = sorted(t)
        stats = (statistics.median(t), q[len(q) // 5], q[(4 * len(q)) // 5])
        res.add("interleaved", mode, s["model"], batch, "float32", shape, stats, "s/step")
    ratio = statistics.median(times[True]) / statistics.median(times[False])
    best = min(times[True]) / min(times[False])
    res.add("interleaved", "cached/uncached step (medians)", s["model"], batch, "float32",
            shape, ratio, "x")  # fmt: skip
    res.add("interleaved", "cached/uncached step (fastest)", s["model"], batch, "float32",
            shape, best, "x")  # fmt: skip
    print(f"{setting}: interleaved steps, cached/uncached: medians {ratio:.2f}x "
          f"({statistics.median(times[True]):.2f} / {statistics.median(times[False]):.2f} s), "
          f"fastest {best:.2f}x ({min(times[True]):.2f} / {min(times[False]):.2f} s)"
          + (f"; target <= 0.6x: {'PASS' if ratio <= 0.6 else 'MISS'} (medians)"
             if setting == "vit" else ""), flush=True)  # fmt: skip
    return ratio


def _cpu_seconds(pid: int) -> float:
    """user + system CPU time of a running process (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--settings", nargs="+", default=["elpv", "vit"], choices=list(SETTINGS))
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--cache", default="ram", choices=["ram", "disk"])
    p.add_argument("--cache-dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--cache-max-bytes", default="16GiB")
    p.add_argument("--elpv-max-train", type=int, default=640)  # whole train split: 1968
    p.add_argument("--vit-max-train", type=int, default=64)
    p.add_argument("--max-test", type=int, default=32)
    p.add_argument("--steps", type=int, default=6, help="interleaved steps per variant")
    p.add_argument("--no-runs", action="store_true", help="only the interleaved step timing")
    p.add_argument("--no-steps", action="store_true", help="only the dtl-train runs")
    args = p.parse_args(argv)

    res = Results("bench_cache")
    if not args.no_steps:
        for setting in args.settings:
            interleaved_steps(setting, args, res)
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        for setting in [] if args.no_runs else args.settings:
            s = SETTINGS[setting]
            n = args.elpv_max_train if setting == "elpv" else args.vit_max_train
            shape = f"{s['img_size']}px n={n}" + (" M=7" if setting == "vit" else "")
            runs = {c: train(setting, c, args, Path(tmp) / f"{setting}_{c}")
                    for c in ("off", args.cache)}  # fmt: skip
            for cache, r in runs.items():
                mode = "uncached" if cache == "off" else f"cache={cache}/{args.cache_dtype}"
                ep = sorted(r["epochs"])
                res.add("dtl-train", f"{mode} epoch", s["model"], s["batch_size"], "float32",
                        shape, (ep[len(ep) // 2], ep[0], ep[-1]), "s/epoch")  # fmt: skip
                if r["cpu"]:  # needs ≥ 3 epochs
                    res.add("dtl-train", f"{mode} epoch CPU", s["model"], s["batch_size"],
                            "float32", shape, min(r["cpu"]), "cpu-s/epoch")  # fmt: skip
            cached = runs[args.cache]
            res.add("dtl-train", f"cache={args.cache}/{args.cache_dtype} build", s["model"],
                    s["batch_size"], "float32", f"{shape} {cached['cache_size']}",
                    cached["build_s"], "s")  # fmt: skip
            ratio = min(cached["epochs"]) / min(runs["off"]["epochs"])
            res.add("dtl-train", "cached/uncached fastest epoch", s["model"], s["batch_size"],
                    "float32", shape, ratio, "x")  # fmt: skip
            cpu = "CPU n/a (needs --epochs >= 3)"
            if cached["cpu"] and runs["off"]["cpu"]:
                cpu_ratio = min(cached["cpu"]) / min(runs["off"]["cpu"])
                res.add("dtl-train", "cached/uncached epoch CPU", s["model"], s["batch_size"],
                        "float32", shape, cpu_ratio, "x")  # fmt: skip
                cpu = f"CPU {cpu_ratio:.2f}x"
            print(f"{setting}: cached/uncached epoch: wall {ratio:.2f}x, {cpu}"
                  + (f" (target <= 0.6x: {'PASS' if ratio <= 0.6 else 'MISS'})"
                     if setting == "vit" else ""), flush=True)  # fmt: skip
    res.write()


if __name__ == "__main__":
    main()
