"""Prediction throughput of :class:`~dtl_kernels.Predictor` (what ``dtl-predict`` runs) on
real images and real backbones, eager against ``compile=True``, with and without decoding
workers (``make bench`` runs it; ``--quick`` for fewer images).

Images: the first ``--images`` elpv solar-cell images (PyPI ``elpv-dataset``, 300×300
8-bit gray), written once as PNG files into a temporary folder, so that every provider
decodes files as ``dtl-predict`` does. Models: the two offline backbones with DTL+ (random
side network, ``B ≠ 0``; throughput does not depend on trained values): EfficientNet-Lite0
at 128 px (``make demo``'s) and the DINOv2 ViT-S/14 at 112 px (``make demo-vit``'s).

Providers: ``eager`` (decoded in this process between batches), ``eager+workers`` (decoded
by ``--workers`` processes while the model runs), ``compiled`` and ``compiled+workers``
(``Predictor(compile=True)``: inductor on the CPU, CUDA graphs on a GPU), ``bf16`` and
``compiled+bf16`` (``precision="bf16"``: bf16 autocast, AMX / AVX-512-BF16 matrix units on
this CPU). Measured:

* ``images_per_s``: images over the wall time of ``probabilities(files)``, median of
  ``--reps`` passes after a first pass (the ``p20`` / ``p80`` columns: the slowest and the
  fastest pass);
* ``first_pass_s``: the first pass over one batch, with the compilation for ``compiled*``
  (dynamo reset before each provider; inductor's on-disk cache in a fresh folder per run):
  ``compiled`` compiles with nothing cached, what the first ``--compile`` run on a machine
  pays; ``compiled+workers`` then reads what it cached, as every later run does.

Providers run one after another (each pass is seconds long); the machine's load average is
printed with the results.

On a GPU machine (``--device cuda``; it has neither the elpv nor the weights packages):
``--synthetic`` writes 300×300 gray noise PNGs instead of elpv's and builds the backbones
with random weights (throughput depends on neither), e.g.
``python3 benchmarks/bench_predict.py --device cuda --synthetic --workers 8``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, Results  # noqa: E402

from dtl_kernels import create_model  # noqa: E402
from dtl_kernels.predict import Predictor  # noqa: E402

MODELS = {  # name → (timm name, offline weights, image size, create_model options)
    "effnet-lite0": ("tf_efficientnet_lite0", "efficientnet-lite0", 128, {}),
    "dinov2-vits14": ("vit_small_patch14_dinov2", "dinov2-vits14-imgfocus", 112,
                      {"img_size": 112}),
}  # fmt: skip
PROVIDERS = ("eager", "eager+workers", "compiled", "compiled+workers", "bf16", "compiled+bf16")


def write_images(folder: Path, count: int, synthetic: bool = False) -> list[Path]:
    """The first ``count`` elpv images (``synthetic``: 300×300 gray noise) as PNG files in
    ``folder``."""
    import numpy as np
    from PIL import Image

    if synthetic:
        images = np.random.default_rng(0).integers(0, 256, (count, 300, 300), dtype=np.uint8)
    else:
        from dtl_kernels.train.data import elpv_arrays

        images, _ = elpv_arrays()
    files = []
    for i in range(min(count, len(images))):
        path = folder / f"cell_{i:04d}.png"
        Image.fromarray(images[i]).save(path)
        files.append(path)
    return files


def build(name: str, random_weights: bool = False) -> torch.nn.Module:
    arch, weights, size, options = MODELS[name]
    torch.manual_seed(0)
    weights = None if random_weights else weights
    model = create_model(arch, "dtl+", num_classes=4, pretrained=weights, **options)
    with torch.no_grad():  # B ≠ 0: nothing short-circuits on zeros
        for p in model.csn.up.values():
            p.normal_(0, 0.02)
    # the preprocessing a model trained at this size records (as from_pretrained sets it)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (3, size, size),
                            "crop_pct": 1.0}  # fmt: skip
    return model


def measure(model, files: list[Path], provider: str, batch: int, workers: int, reps: int):
    """``(images per second over each pass, seconds of the first pass)``."""
    torch._dynamo.reset()  # no compiled code kept from the previous provider
    p = Predictor(model, batch_size=batch, workers=workers if "workers" in provider else 0,
                  compile=provider.startswith("compiled"), progress=False,
                  precision="bf16" if provider.endswith("bf16") else "fp32")  # fmt: skip
    t0 = time.perf_counter()
    p.probabilities(files[:batch])
    first = time.perf_counter() - t0
    rates = []
    for _ in range(reps):
        t0 = time.perf_counter()
        p.probabilities(files)
        rates.append(len(files) / (time.perf_counter() - t0))
    return rates, first


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--providers", nargs="+", default=list(PROVIDERS), choices=PROVIDERS)
    ap.add_argument("--images", type=int, default=512, help="images per pass (default 512)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=2, help="decoding workers (default 2)")
    ap.add_argument("--reps", type=int, default=3, help="timed passes (default 3)")
    ap.add_argument("--quick", action="store_true", help="128 images, 2 passes")
    ap.add_argument("--device", default="cpu", help="cpu (default) | cuda | cuda:N")
    ap.add_argument("--synthetic", action="store_true",
                    help="noise images and random backbone weights (no elpv / weights "
                    "packages needed)")  # fmt: skip
    ap.add_argument("--results", type=Path, default=RESULTS)
    args = ap.parse_args()
    if args.quick:
        args.images, args.reps = 128, 2
    device = torch.device(args.device)
    res = Results("bench_predict", device.type)
    load = [os.getloadavg()[0]]
    summary = []
    with tempfile.TemporaryDirectory(prefix="bench_predict_") as tmp:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(tmp) / "inductor")  # a cold cache
        files = write_images(Path(tmp), args.images, args.synthetic)
        for name in args.models:
            model = build(name, args.synthetic).eval().to(device)
            size = MODELS[name][2]
            source = "noise" if args.synthetic else "elpv"
            shape = f"{source} 300x300 PNG -> {size} px, {len(files)} images"
            rates = {}
            for provider in args.providers:
                got, first = measure(model, files, provider, args.batch_size, args.workers,
                                     args.reps)  # fmt: skip
                rates[provider] = statistics.median(got)
                stats = (rates[provider], min(got), max(got))
                dtype = "bf16-autocast" if provider.endswith("bf16") else "float32"
                res.add(provider, "images_per_s", name, args.batch_size, dtype, shape,
                        stats, "images/s")  # fmt: skip
                res.add(provider, "first_pass_s", name, args.batch_size, dtype, shape,
                        first, "s")  # fmt: skip
            summary.append((name, rates))
    load.append(os.getloadavg()[0])
    name = "bench_predict" + ("_cuda" if device.type == "cuda" else "")
    res.write(name + ("_synthetic" if args.synthetic else ""), args.results)
    print(f"\nload average {load[0]:.2f} → {load[1]:.2f} ({os.cpu_count()} cores), "
          f"{torch.get_num_threads()} threads, {args.workers} decoding workers")  # fmt: skip
    for name, rates in summary:
        base = rates.get("eager")
        line = ", ".join(f"{p} {r:.0f}/s" + (f" ({r / base:.2f}×)" if base else "")
                         for p, r in rates.items())  # fmt: skip
        print(f"  {name}: {line}")


if __name__ == "__main__":
    main()
