"""A tiny ImageFolder tree shared by the training tests: 3 classes of 32×32 PNGs told
apart by colour (class c has channel c raised), seeded."""

from pathlib import Path

import numpy as np
from PIL import Image


def make_toy_folder(root: Path, n_train: int, n_test: int) -> Path:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("test", n_test)):
        for k in range(n):
            c = k % 3
            img = rng.integers(0, 60, (32, 32, 3)).astype(np.uint8)
            img[..., c] += 150
            path = root / split / f"class{c}" / f"{k}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(path)
    return root
