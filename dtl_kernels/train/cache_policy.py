"""Trunk cache policy: whether this run may cache the trunk, in which mode, within
which budget.

Caching is allowed (:func:`refusal` returns ``None``) when

* the method is not ``full`` (the backbone is frozen), the model has a trunk (blocks before
  the first trained one: up to ``M`` for DTL, before ``--lora-blocks``' first for LoRA)
  and no trunk parameter is trainable;
* ``--drop-path 0`` and the trunk has no active dropout / drop-path / patch dropout: the
  uncached path runs the trunk in *train* mode, so its outputs must equal the eval-mode
  outputs the cache stores (checked on two samples, with the RNG state restored);
* the dataset returns the same tensor for the same index (no random augmentation).

An explicit ``ram`` / ``disk`` that is not allowed, or whose size estimate exceeds
``--cache-max-bytes`` (default 6 GiB), is a :class:`CacheRefused` saying why; ``auto``
then trains uncached (:func:`dtl_kernels.train.cache.prepare` decides).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils.data import Dataset

MODES = ("off", "auto", "ram", "disk")
ALIASES = {"on": "ram"}  # the flag's earlier spelling
DEFAULT_MAX_BYTES = 6 * 2**30
MAX_BYTES = 2**62  # a budget beyond any machine; keeps the arithmetic in integers


class CacheRefused(ValueError):
    """The trunk cache cannot be used as asked; the message says why."""


def parse_bytes(value) -> int | None:
    """``None``, an int, or a string like ``"6GiB"``, ``"500M"``, ``"2e9"`` → bytes."""
    if value is None or isinstance(value, int):
        return value
    text = str(value).strip().lower().replace(" ", "")
    units = {"": 1, "b": 1, "k": 2**10, "kib": 2**10, "kb": 10**3, "m": 2**20, "mib": 2**20,
             "mb": 10**6, "g": 2**30, "gib": 2**30, "gb": 10**9, "t": 2**40, "tib": 2**40,
             "tb": 10**12}  # fmt: skip
    number = text.rstrip("abgikmt")
    unit = text[len(number) :]
    try:
        if unit not in units:
            raise ValueError
        size = float(number) * units[unit]
        if not math.isfinite(size) or size > MAX_BYTES:  # inf, nan, 1e400: no byte count
            raise ValueError
        return int(size)
    except ValueError:
        raise ValueError(
            f"--cache-max-bytes: cannot read {value!r} (a byte count up to 2^62, e.g. 6GiB, "
            "500MB, 2e9)"
        ) from None


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


def resolve_mode(mode: str) -> str:
    mode = ALIASES.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"--cache-trunk must be one of {MODES}, got {mode!r}")
    return mode


# -- when caching is allowed ------------------------------------------------------------------
def _tail_modules(model: nn.Module) -> set[int]:
    out = set()
    for block in model.blocks[model.trunk_depth :]:
        out.update(id(m) for m in block.modules())
    return out


def _random_modules(model: nn.Module) -> list[str]:
    """Backbone modules outside the tail blocks that are random in train mode."""
    tail, found = _tail_modules(model), []
    for name, m in model.backbone.named_modules():
        if id(m) in tail:
            continue
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            found.append(f"{name} (dropout p={m.p})")
        elif float(getattr(m, "drop_prob", 0) or 0) > 0:
            found.append(f"{name} (drop-path {m.drop_prob})")
        elif type(m).__name__ == "PatchDropout" and float(getattr(m, "prob", 0) or 0) > 0:
            found.append(f"{name} (patch dropout {m.prob})")
    return found


def sample_tensor(dataset: Dataset, i: int) -> torch.Tensor:
    """Sample ``i``'s image; a dataset that returns no tensor cannot be cached."""
    x = dataset[i][0]
    if not isinstance(x, torch.Tensor):
        raise CacheRefused(f"the dataset returns {type(x).__name__}, not a tensor")
    return x


def refusal(model: nn.Module, method: str, drop_path: float, datasets: list[Dataset]) -> str | None:
    """Why the trunk cannot be cached for this run (``None``: it can)."""
    if method == "full":
        return "method 'full' trains the backbone, so the trunk's outputs change every step"
    if drop_path and drop_path > 0:
        return f"--drop-path {drop_path} > 0: the trunk runs drop-path in training (random outputs)"
    if not all(hasattr(model, a) for a in ("trunk_forward", "forward_from_trunk", "trunk_depth")):
        return f"{type(model).__name__} has no trunk_forward / forward_from_trunk"
    if model.trunk_depth == 0:
        return "no frozen block comes before the first trained one (LoRA on every block?)"
    trunk_blocks = model.blocks[: model.trunk_depth]
    trainable = [n for b in trunk_blocks for n, p in b.named_parameters() if p.requires_grad]
    if trainable:
        return f"trunk parameters are trainable ({trainable[0]}…)"
    random_mods = _random_modules(model)
    if random_mods:
        return "the trunk is random in train mode: " + ", ".join(random_mods[:4])
    for ds in datasets:
        if len(ds) == 0:
            continue
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(1)
            a = sample_tensor(ds, 0)
            torch.manual_seed(2)
            b = sample_tensor(ds, 0)
        if a.shape != b.shape or not torch.equal(a, b):
            return (
                "the input pipeline is random (the dataset returns different tensors for "
                "one index: augmentation?)"
            )
    # The functional check behind the static one: train-mode trunk (two RNG seeds) == eval.
    ds = datasets[0]
    x = torch.stack([sample_tensor(ds, i) for i in range(min(2, len(ds)))])
    x = x.to(next(model.parameters()).device)
    was = model.training
    try:
        with torch.random.fork_rng(devices=_rng_devices(x.device)):
            model.eval()
            ref = _flat(*model.trunk_forward(x)[:2])
            model.train()
            for seed in (1, 2):
                torch.manual_seed(seed)
                got = _flat(*model.trunk_forward(x)[:2])
                if not torch.allclose(got, ref, rtol=1e-4, atol=1e-5):
                    return (
                        "the trunk's train-mode outputs differ from its eval-mode outputs "
                        "(dropout, drop-path or batch statistics in the trunk)"
                    )
    finally:
        model.train(was)
    return None


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def _flat(taps: list[torch.Tensor], y: torch.Tensor) -> torch.Tensor:
    return torch.cat([t.float().reshape(-1) for t in [*taps, y]])
