"""Serve many fine-tuned DTL tasks on one image batch with a shared frozen trunk.

    python python/multitask_serve.py --tasks 5 --model vit_tiny_patch16_224

Builds a few task adapters on one backbone (random weights here; in practice each comes
from `dtl-train` as an adapter .safetensors), saves them (in a temporary folder, removed
at the end), then serves them all with `MultiTaskDTL` and checks the outputs against the
separate models.
"""

import argparse
import tempfile
import time
from pathlib import Path

import timm
import torch

from dtl_kernels import DTLViT, MultiTaskDTL, save_adapter


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="vit_tiny_patch16_224")
    parser.add_argument("--tasks", type=int, default=5)
    parser.add_argument("--adapt-from", type=int, default=7)
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()

    backbone = timm.create_model(args.model, num_classes=0).eval()
    with tempfile.TemporaryDirectory(prefix="dtl_tasks_") as tmp:  # removed at the end
        serve(backbone, args, Path(tmp))


def serve(backbone: torch.nn.Module, args: argparse.Namespace, folder: Path) -> None:
    separate, files = {}, {}
    for t in range(args.tasks):
        model = DTLViT(backbone, adapt_from=args.adapt_from, conv_kernel=3, num_classes=10 + t)
        for up in model.csn.up.values():  # stand-in for training
            torch.nn.init.normal_(up, std=0.1)
        files[f"task{t}"] = save_adapter(model, folder / f"task{t}.safetensors")
        separate[f"task{t}"] = model.eval()

    served = MultiTaskDTL(backbone, files).eval()
    images = torch.randn(args.batch, 3, 224, 224)
    with torch.no_grad():
        start = time.perf_counter()
        outputs = served(images)
        shared_s = time.perf_counter() - start
        start = time.perf_counter()
        expected = {name: m(images) for name, m in separate.items()}
        separate_s = time.perf_counter() - start
    for name, logits in outputs.items():
        err = (logits - expected[name]).abs().max().item()
        print(f"{name}: logits {tuple(logits.shape)}, max |shared - separate| = {err:.2e}")
    print(
        f"shared trunk: {shared_s * 1e3:.0f} ms, one model after another: {separate_s * 1e3:.0f} ms"
    )
    sizes = sorted(Path(f).stat().st_size for f in files.values())
    print(f"{len(files)} adapter files of {sizes[0] / 1e3:.1f}–{sizes[-1] / 1e3:.1f} kB")


if __name__ == "__main__":
    main()
