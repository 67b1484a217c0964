"""Trunk feature cache for ``dtl-train`` (``--cache-trunk off|auto|ram|disk``): what the
loop calls (:func:`prepare`) and what it trains on (:class:`TrunkTail`).

Blocks ``1 … M`` of a DTL model see task-independent inputs (SPEC §3): with a frozen
backbone and a deterministic input pipeline, everything training needs from them — the
tapped block inputs ``z_i`` (``i ≤ M``) and block ``M``'s output before its add-back,
i.e. what :meth:`DTLModel.trunk_forward` returns — is the same every epoch. The cache
computes it once per sample (one pass before training, eval mode, no autograd) and every
step then runs only :meth:`DTLModel.forward_from_trunk`: the CSN taps, the add-backs,
the tail blocks and the head. With an fp32 cache the training run is the same
computation as without one; ``--cache-dtype bf16|fp16`` halves the bytes (values rounded
once, cast back to their original dtype when read).

The parts, one module each:

* :mod:`~dtl_kernels.train.cache_policy` — whether caching is allowed, the mode, the
  byte budget (:func:`refusal`, :func:`resolve_mode`, :class:`CacheRefused`);
* :mod:`~dtl_kernels.train.cache_key` — what identifies the cached values
  (:func:`cache_key`, :func:`dataset_identity`);
* :mod:`~dtl_kernels.train.cache_store` — building, storing and reading them in RAM or
  on disk (:class:`TrunkCache`, the file format);
* this module — the plan (which splits fit the budget; an explicit ``ram`` / ``disk``
  that is refused or does not fit is an error, ``auto`` then trains uncached and prints
  one line saying why, and only ever uses RAM), the build or reuse, and the tail module.

Distributed: the sampler gives every process different samples each epoch, so every
process needs the whole cache. ``ram``: each process builds its own. ``disk``: rank 0
builds the files while the others wait (for ``--ddp-timeout`` plus an estimate of the
build time from the probe pass), then map them (shared page cache). A failure of rank
0's build is raised on every rank, naming it.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import Dataset

# The parts' public names are re-exported: callers use ``cache.<name>`` throughout.
from .cache_key import (
    FORMAT,
    cache_key,
    dataset_fingerprint,
    dataset_identity,
    key_hash,
    weights_hash,
)
from .cache_policy import (
    ALIASES,
    DEFAULT_MAX_BYTES,
    MODES,
    CacheRefused,
    human,
    parse_bytes,
    refusal,
    resolve_mode,
)
from .cache_store import DTYPES, CachedTrunkSet, TrunkCache, file_crc32, file_sha256
from .transforms import Augmentation

__all__ = [
    "ALIASES", "DEFAULT_MAX_BYTES", "DTYPES", "FORMAT", "MODES", "CacheRefused",
    "CachedTrunkSet", "Prepared", "TrunkCache", "TrunkTail", "cache_folder", "cache_key",
    "dataset_fingerprint", "dataset_identity", "file_crc32", "file_sha256", "human", "key_hash",
    "parse_bytes", "prepare", "refusal", "resolve_mode", "weights_hash",
]  # fmt: skip


class TrunkTail(nn.Module):
    """The model after the trunk: ``forward([z_1 … z_k, y])`` → logits (what the loop
    trains and evaluates on cached batches; ``model`` is a registered submodule)."""

    def __init__(self, model: nn.Module, ctx: dict):
        super().__init__()
        self.model, self.ctx = model, ctx

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        *taps, y = feats
        return self.model.forward_from_trunk(taps, y, self.ctx)


# -- what the loop calls -------------------------------------------------------------------------
class Prepared:
    """The outcome of :func:`prepare`: cached views (``train``, maybe ``test``), the tail
    module to train on them, the mode (``ram`` / ``disk``) and the cached depth ``M``."""

    def __init__(self, caches: dict[str, TrunkCache], mode: str):
        self.caches, self.mode = caches, mode
        first = next(iter(caches.values()))
        self.tail = TrunkTail(first.model, first.ctx)
        self.trunk_depth = first.model.trunk_depth

    def view(self, split: str):
        return self.caches[split].view() if split in self.caches else None


def prepare(
    cfg,
    model: nn.Module,
    splits: dict[str, Dataset],
    identities: dict[str, dict],
    d,
    autocast: Callable,
    channels_last: bool,
    batch_size: int,
    say: Callable[[str], None] = print,
) -> Prepared | None:
    """Decide, estimate, build or load the trunk cache for ``splits`` (``train`` first).

    ``d``: the loop's process info (``main``, ``world``, ``agree()``, ``run_agreed()``,
    ``device``). Returns ``None`` when training runs uncached. Raises
    :class:`CacheRefused` when an explicit ``ram`` / ``disk`` cache is not allowed, does
    not fit the budget or the disk; under DDP every rank raises when one fails.
    """
    mode = resolve_mode(cfg.cache_trunk)
    if mode == "off":
        return None
    plan = d.run_agreed(
        "planning the trunk cache", _plan, cfg, model, splits, identities, d, autocast,
        channels_last, batch_size, say,
    )  # fmt: skip
    if plan is None:
        return None
    kind, chosen = plan
    t0 = time.time()
    if kind == "disk":
        _disk_cache(cfg, chosen, d, say)
    else:
        for c in chosen.values():
            c.build_ram()
    if d.main and any(c.built for c in chosen.values()):
        say(f"trunk cache: built in {time.time() - t0:.1f}s")
    return Prepared(chosen, kind)


def cache_folder(cfg) -> Path:
    return Path(cfg.cache_dir) if cfg.cache_dir else Path(cfg.output) / "trunk-cache"


def _plan(cfg, model, splits, identities, d, autocast, channels_last, batch_size, say):
    """``(kind, {split: TrunkCache})`` within the budget, or ``None`` (uncached, said)."""
    mode = resolve_mode(cfg.cache_trunk)
    explicit = mode != "auto"

    def no(reason: str):
        if explicit:
            raise CacheRefused(f"--cache-trunk {mode}: {reason}")
        if d.main:
            say(f"trunk cache: off ({reason})")
        return None

    augmentation = Augmentation.from_config(cfg).flags()
    if augmentation:  # the cached trunk outputs would freeze one draw of the random input
        return no(f"the input is augmented ({' '.join(augmentation)}): every epoch sees other "
                  "images, so the trunk's outputs cannot be stored; drop the augmentation flags "
                  "to cache")  # fmt: skip
    why = refusal(model, cfg.method, cfg.drop_path, list(splits.values()))
    if why:
        return no(why)
    budget = parse_bytes(cfg.cache_max_bytes)
    budget = DEFAULT_MAX_BYTES if budget is None else budget
    setup = {
        "precision": cfg.precision,
        "channels_last": bool(channels_last),
        "device": d.device.type,
    }
    caches = {
        name: TrunkCache(
            model, ds, name, identities[name], cfg.cache_dtype, setup, autocast,
            channels_last, batch_size, cfg.workers,
        )
        for name, ds in splits.items()
    }  # fmt: skip
    kind = "ram" if mode == "auto" else mode
    total, chosen = 0, {}
    for name, c in caches.items():
        if total + c.estimate() > budget:
            if not chosen:
                return no(
                    f"the {name} split needs {human(c.estimate())} ({c.describe()}), over the "
                    f"--cache-max-bytes budget of {human(budget)}"
                )
            if d.main:
                say(f"trunk cache: {name} split not cached ({human(c.estimate())} would exceed "
                    f"the {human(budget)} budget)")  # fmt: skip
            continue
        total += c.estimate()
        chosen[name] = c
    if d.main:
        where = f" in {cache_folder(cfg)}" if kind == "disk" else ""
        say(
            f"trunk cache ({kind}{where}, {cfg.cache_dtype}, blocks 1…{model.trunk_depth}): "
            + "; ".join(c.describe() for c in chosen.values())
            + f"; total {human(total)} of a {human(budget)} budget"
        )
    return kind, chosen


def _disk_cache(cfg, chosen: dict[str, TrunkCache], d, say) -> None:
    """Rank 0 loads or builds the files while the others wait (``--ddp-timeout`` plus the
    build estimate); its failure is raised on every rank; then the others map them."""
    folder = cache_folder(cfg)
    error = None
    if d.main:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for c in chosen.values():
                _load_or_build(c, folder, say)
        except Exception as exc:  # raised on every rank by d.agree
            error = exc
    wait = sum(c.build_seconds() for c in chosen.values())
    d.agree(error, "building the disk trunk cache", extra_timeout_s=wait)
    if not d.main:
        for c in chosen.values():
            reason = c.load_disk(folder)
            if reason is not None:
                raise RuntimeError(f"trunk cache {c.name} written by rank 0 unusable: {reason}")


def _load_or_build(c: TrunkCache, folder: Path, say: Callable[[str], None]) -> None:
    """Map ``c``'s disk file when its key matches; else check the free space and build it."""
    reason = c.load_disk(folder)
    if reason is None:
        say(f"trunk cache: reusing {c.path}")
        return
    existing = c.files(folder)[0]
    free = shutil.disk_usage(folder).free
    if c.estimate() > free:
        old = existing.stat().st_size if existing.is_file() else 0
        kept = (
            f"; the old {existing.name} ({human(old)}) is kept until the new one is complete: "
            "delete it to make room"
            if old
            else ""
        )
        raise CacheRefused(
            f"--cache-trunk disk: {c.describe()}, but only {human(free)} free in {folder}{kept}"
        )
    say(f"trunk cache: building {existing} ({reason})")
    c.build_disk(folder)
