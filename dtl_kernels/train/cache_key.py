"""Trunk cache key: everything that changes the cached values, hashed.

The backbone class, identity and a hash of its frozen weights and buffers, ``M`` and the
tapped blocks, the dataset (name, root, split, subset options, sample count, input size,
normalisation and a content hash of the decoded images when the dataset holds them), the
cache dtype, autocast precision, channels-last and the device type. A stored cache whose
key differs is rebuilt (:mod:`dtl_kernels.train.cache_store`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

from .._version import __version__
from .cache_policy import sample_tensor
from .data import data_fingerprint as dataset_fingerprint  # the data's one fingerprint

# Part of the key and of every disk file: a new layout invalidates the old caches.
FORMAT = "dtl_kernels.trunk-cache/1"


def weights_hash(module: nn.Module, skip: frozenset[str] = frozenset()) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes) but those named in
    ``skip``."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        if name in skip:
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def cache_key(model: nn.Module, dataset: Dataset, identity: dict, dtype: str, setup: dict) -> dict:
    """Everything that changes the cached values (see the module docstring)."""
    csn = model.csn
    depth = model.trunk_depth
    x0 = sample_tensor(dataset, 0)
    return {
        "format": FORMAT,
        "model_class": type(model).__name__,
        "backbone": model.backbone_identity(),
        # frozen weights only: the trunk holds no trainable one (cache_policy), so a trained
        # part (LoRA factors, a backbone head) never changes the cached values
        "backbone_weights_sha256": weights_hash(model.backbone, _trainable(model.backbone)),
        "trunk_depth_M": depth,
        "tapped_blocks": [i + 1 for i in range(depth) if csn is not None and csn.is_tapped(i)],
        "dataset": dict(identity),
        "data": dataset_fingerprint(dataset),
        "input_shape": list(x0.shape),
        "cache_dtype": dtype,
        **setup,
        # the code that computes the trunk (a forward change that keeps the weights)
        "torch": torch.__version__.split("+")[0],
        "timm": _version("timm"),
        "transformers": _version("transformers") if _is_hf(model) else None,
        "dtl_kernels": __version__,  # (also where it runs from a checkout, not installed)
    }


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _is_hf(model: nn.Module) -> bool:
    return type(model.backbone).__module__.startswith("transformers.")


def _trainable(module: nn.Module) -> frozenset[str]:
    return frozenset(n for n, p in module.named_parameters() if p.requires_grad)


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


def dataset_identity(cfg, split: str, size: int, prep) -> dict:
    """What names one split of ``cfg``'s dataset (the data's content is hashed as well);
    ``prep``: the :class:`~dtl_kernels.train.transforms.Preprocessing` of its images."""
    root = str(Path(cfg.data_root).resolve()) if cfg.data_root else None
    ident = {
        "name": cfg.dataset,
        "root": root,
        "split": split,
        "list": cfg.train_split if split == "train" else cfg.test_split,
        "max": cfg.max_train if split == "train" else cfg.max_test,
        "val_split": cfg.val_split,
        "img_size": size,
        **prep.identity(),
    }
    if cfg.dataset.startswith("fewshot:"):
        ident.update(shots=cfg.shots, shot_seed=cfg.shot_seed)
    return ident
