"""Trunk feature cache for ``dtl-train`` (``--cache-trunk off|auto|ram|disk``).

Blocks ``1 … M`` of a DTL model see task-independent inputs (SPEC §3): with a frozen
backbone and a deterministic input pipeline, everything training needs from them — the
tapped block inputs ``z_i`` (``i ≤ M``) and block ``M``'s output before its add-back,
i.e. what :meth:`DTLModel.trunk_forward` returns — is the same every epoch. The cache
computes it once per sample (one pass before training, eval mode, no autograd) and every
step then runs only :meth:`DTLModel.forward_from_trunk`: the CSN taps, the add-backs,
the tail blocks and the head. With an fp32 cache the training run is the same
computation as without one; ``--cache-dtype bf16|fp16`` halves the bytes (values rounded
once, cast back to their original dtype when read).

When it is allowed (:func:`refusal` returns ``None``):

* the method is not ``full`` (the backbone is frozen) and no trunk parameter is trainable;
* ``--drop-path 0`` and the trunk has no active dropout / drop-path / patch dropout: the
  uncached path runs the trunk in *train* mode, so its outputs must equal the eval-mode
  outputs the cache stores (checked on two samples, with the RNG state restored);
* the dataset returns the same tensor for the same index (no random augmentation).

An explicit ``ram`` / ``disk`` that is not allowed, or whose size estimate exceeds
``--cache-max-bytes`` (default 6 GiB), is an error saying why; the default ``auto`` then
trains uncached and prints one line saying why. ``auto`` only ever uses RAM.

Key: everything that changes the cached values — backbone class, identity and a hash of
all its weights and buffers, ``M`` and the tapped blocks, the dataset (name, root,
split, subset options, sample count, input size, normalisation and a content hash of
the decoded images when the dataset holds them), cache dtype, autocast precision,
channels-last and the device type. A disk cache (``<output>/trunk-cache`` or
``--cache-dir``) is one raw file per split, ``<split>.bin`` (``samples × elements``,
read back through a copy-on-write memory map), written to a temporary file and renamed
(:func:`dtl_kernels._io.atomic_write`), with ``<split>.key.json`` beside it (deleted
before a rebuild, written after the data): a key file always describes a complete data
file. A cache whose key differs is rebuilt; on load, sample 0 is recomputed and
compared as a last check.

Disk space: the build needs the whole file's size free besides the old file, which lives
until the new one is renamed over it. It is checked first, then reserved
(``posix_fallocate``) and the rows are written with ``write()`` (never through a memory
map, where a full disk is a ``SIGBUS``): no room is a :class:`CacheRefused` saying how
much is needed and free, and no temporary file stays behind.

Distributed: the sampler gives every process different samples each epoch, so every
process needs the whole cache. ``ram``: each process builds its own. ``disk``: rank 0
builds the files while the others wait (for ``--ddp-timeout`` plus an estimate of the
build time from the probe pass), then map them (shared page cache). A failure of rank
0's build is raised on every rank, naming it.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import time
import zlib
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from .._io import atomic_write, is_out_of_space, json_text, reserve_space

FORMAT = "dtl_kernels.trunk-cache/1"
MODES = ("off", "auto", "ram", "disk")
ALIASES = {"on": "ram"}  # the flag's earlier spelling
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEFAULT_MAX_BYTES = 6 * 2**30
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}  # fmt: skip


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
        return int(float(number) * units[unit])
    except ValueError:
        raise ValueError(
            f"--cache-max-bytes: cannot read {value!r} (e.g. 6GiB, 500MB, 2e9)"
        ) from None


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} GiB"


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


def _sample(dataset: Dataset, i: int) -> torch.Tensor:
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
            a = _sample(ds, 0)
            torch.manual_seed(2)
            b = _sample(ds, 0)
        if a.shape != b.shape or not torch.equal(a, b):
            return (
                "the input pipeline is random (the dataset returns different tensors for "
                "one index: augmentation?)"
            )
    # The functional check behind the static one: train-mode trunk (two RNG seeds) == eval.
    ds = datasets[0]
    x = torch.stack([_sample(ds, i) for i in range(min(2, len(ds)))])
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


# -- the key -----------------------------------------------------------------------------------
def weights_hash(module: nn.Module) -> str:
    """sha256 over every parameter and buffer (name, dtype, shape, bytes)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def dataset_fingerprint(dataset: Dataset) -> dict:
    """Sample count and a content hash: of all decoded images and labels when the dataset
    holds them as tensors (``images`` / ``labels``), else of its first and last samples."""
    h = hashlib.sha256()
    images, labels = getattr(dataset, "images", None), getattr(dataset, "labels", None)
    if callable(getattr(dataset, "fingerprint", None)):  # files: paths, sizes, mtimes, labels
        h.update(dataset.fingerprint().encode())
        content = "files"
    elif isinstance(images, torch.Tensor):
        h.update(f"{images.dtype}|{tuple(images.shape)}|".encode())
        h.update(images.contiguous().reshape(-1).view(torch.uint8).numpy().data)
        for attr in ("mean", "std"):
            v = getattr(dataset, attr, None)
            if isinstance(v, torch.Tensor):
                h.update(f"{attr}={v.flatten().tolist()}".encode())
        content = "images"
    else:
        for i in sorted({0, len(dataset) - 1}):
            x = _sample(dataset, i).contiguous()
            h.update(f"{x.dtype}|{tuple(x.shape)}|".encode())
            h.update(x.reshape(-1).view(torch.uint8).numpy().data)
        content = "first+last samples"
    if isinstance(labels, torch.Tensor):
        h.update(labels.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return {"samples": len(dataset), "content": content, "content_sha256": h.hexdigest()}


def cache_key(model: nn.Module, dataset: Dataset, identity: dict, dtype: str, setup: dict) -> dict:
    """Everything that changes the cached values (see the module docstring)."""
    csn = model.csn
    depth = model.trunk_depth
    x0 = _sample(dataset, 0)
    return {
        "format": FORMAT,
        "model_class": type(model).__name__,
        "backbone": model.backbone_identity(),
        "backbone_weights_sha256": weights_hash(model.backbone),
        "trunk_depth_M": depth,
        "tapped_blocks": [i + 1 for i in range(depth) if csn is not None and csn.is_tapped(i)],
        "dataset": dict(identity),
        "data": dataset_fingerprint(dataset),
        "input_shape": list(x0.shape),
        "cache_dtype": dtype,
        **setup,
        "torch": torch.__version__.split("+")[0],
    }


def key_hash(key: dict) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()


# Slack for the DDP wait on rank 0's build: the probe ran one sample without batching.
_BUILD_TIME_FACTOR = 4.0
_MIN_WRITE_BYTES_PER_S = 20e6


# -- the cache ---------------------------------------------------------------------------------
class TrunkCache:
    """The trunk outputs of every sample of one dataset split.

    Args:
        model: a DTL model (``trunk_forward`` / ``forward_from_trunk``).
        dataset: ``(image, label)`` samples; cache row ``i`` is sample ``i``.
        name: split name (``train`` / ``test``): the disk files' stem.
        identity: what names the dataset (name, root, split, options…), for the key.
        dtype: ``fp32`` | ``bf16`` | ``fp16``, the stored precision.
        setup: the rest of the key (autocast precision, channels-last, device type).
        autocast: a context-manager factory the trunk runs under (as in training).
        batch_size: batch of the build pass.

    The constructor runs the trunk on sample 0 to learn the layout (tensor shapes and
    dtypes) and the walk context; it builds nothing.
    """

    def __init__(
        self,
        model: nn.Module,
        dataset: Dataset,
        name: str,
        identity: dict,
        dtype: str = "fp32",
        setup: dict | None = None,
        autocast: Callable = nullcontext,
        channels_last: bool = False,
        batch_size: int = 32,
        workers: int = 0,
    ) -> None:
        if dtype not in DTYPES:
            raise ValueError(f"--cache-dtype must be one of {tuple(DTYPES)}, got {dtype!r}")
        self.model, self.dataset, self.name = model, dataset, name
        self.dtype_name, self.dtype = dtype, DTYPES[dtype]
        self.autocast, self.channels_last = autocast, channels_last
        self.batch_size, self.workers = max(1, int(batch_size)), workers
        self.device = next(model.parameters()).device
        self.labels = _labels(dataset)
        self.key = cache_key(model, dataset, identity, dtype, dict(setup or {}))
        self.key_hash = key_hash(self.key)
        t0 = time.perf_counter()
        probe, _, self.ctx = self._trunk(_sample(dataset, 0)[None])
        self.probe_seconds = time.perf_counter() - t0
        self.shapes = [tuple(t.shape[1:]) for t in probe]
        self.src_dtypes = [t.dtype for t in probe]
        self.numels = [math.prod(s) for s in self.shapes]
        self.row = sum(self.numels)
        self.probe = probe
        self.data: torch.Tensor | None = None
        self.built = False  # True when this process computed the values (not loaded)
        self.path: Path | None = None

    # -- size ------------------------------------------------------------------------------
    @property
    def bytes_per_sample(self) -> int:
        return self.row * self.dtype.itemsize

    def estimate(self) -> int:
        """Bytes of the whole cache (exactly the disk file's size)."""
        return self.bytes_per_sample * len(self.dataset)

    def build_seconds(self) -> float:
        """A generous estimate of the build time (from the probe pass and the file size)."""
        compute = _BUILD_TIME_FACTOR * self.probe_seconds * len(self.dataset)
        return compute + self.estimate() / _MIN_WRITE_BYTES_PER_S

    def describe(self) -> str:
        return (
            f"{self.name}: {len(self.dataset)} samples × {len(self.shapes)} tensors "
            f"({human(self.bytes_per_sample)}/sample, {self.dtype_name}) = {human(self.estimate())}"
        )

    # -- building ----------------------------------------------------------------------------
    def _trunk(self, images: torch.Tensor):
        images = images.to(self.device)
        if self.channels_last and images.dim() == 4:
            images = images.contiguous(memory_format=torch.channels_last)
        with self.autocast():
            taps, y, ctx = self.model.trunk_forward(images)
        return [*taps, y], None, ctx

    def _rows(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        b = tensors[0].shape[0]
        return torch.cat([t.reshape(b, -1).to(self.dtype) for t in tensors], dim=1).cpu()

    @torch.no_grad()
    def _batches(self):
        """Yield the trunk outputs of every sample as ``(batch, row)`` rows, in order."""
        was = self.model.training
        self.model.eval()
        loader = DataLoader(
            self.dataset, batch_size=self.batch_size, shuffle=False, num_workers=self.workers,
            generator=torch.Generator().manual_seed(0),  # keeps the global RNG untouched
        )  # fmt: skip
        done = 0
        try:
            for images, _ in loader:
                tensors, _, _ = self._trunk(images)
                rows = self._rows(tensors)
                done += len(rows)
                yield rows
        finally:
            self.model.train(was)
        if done != len(self.dataset):
            raise RuntimeError(
                f"trunk cache {self.name}: {done} samples, expected {len(self.dataset)}"
            )

    def _fill(self, out: torch.Tensor) -> None:
        """Trunk outputs of every sample into ``out`` (``samples × row``), in order."""
        start = 0
        for rows in self._batches():
            out[start : start + len(rows)] = rows
            start += len(rows)

    def build_ram(self) -> TrunkCache:
        self.data = torch.empty(len(self.dataset), self.row, dtype=self.dtype)
        self._fill(self.data)
        self.built = True
        return self

    def files(self, folder: str | os.PathLike) -> tuple[Path, Path]:
        folder = Path(folder)
        return folder / f"{self.name}.bin", folder / f"{self.name}.key.json"

    def _write_file(self, tmp: str) -> None:
        """Reserve the file's bytes, then write every row with ``write()``."""
        crc = 0
        with open(tmp, "r+b") as f:
            reserve_space(f.fileno(), self.estimate())
            for rows in self._batches():
                chunk = rows.contiguous().view(torch.uint8).numpy().data
                f.write(chunk)
                crc = zlib.crc32(chunk, crc)
            self._written_crc32 = crc
            if f.tell() != self.estimate():
                raise RuntimeError(f"trunk cache {self.name}: wrote {f.tell()} bytes, "
                                   f"expected {self.estimate()}")  # fmt: skip

    def build_disk(self, folder: str | os.PathLike) -> Path:
        """Write ``<split>.bin`` atomically (space reserved first), then
        ``<split>.key.json``; map it. :class:`CacheRefused` when the disk is full."""
        data_path, key_path = self.files(folder)
        data_path.parent.mkdir(parents=True, exist_ok=True)
        key_path.unlink(missing_ok=True)  # no key file may describe a half-replaced cache
        try:
            atomic_write(data_path, self._write_file)
        except OSError as exc:
            if not is_out_of_space(exc):
                raise
            raise CacheRefused(
                f"--cache-trunk disk: no room for {data_path} ({human(self.estimate())}): "
                f"{exc.strerror}; free space, point --cache-dir elsewhere or use "
                "--cache-trunk ram/off"
            ) from exc
        meta = {
            "format": FORMAT,
            "key_sha256": self.key_hash,
            "key": self.key,
            "samples": len(self.dataset),
            "row_elements": self.row,
            "shapes": [list(s) for s in self.shapes],
            "source_dtypes": [_DTYPE_NAMES.get(d, str(d)) for d in self.src_dtypes],
            "bytes": self.estimate(),
            "crc32": self._written_crc32,
        }
        atomic_write(
            key_path, lambda tmp: Path(tmp).write_text(json_text(meta, 1, default=str) + "\n")
        )
        reason = self.load_disk(folder)
        if reason is not None:
            raise RuntimeError(f"trunk cache {self.name}: new file unusable: {reason}")
        self.built = True
        return data_path

    def load_disk(self, folder: str | os.PathLike) -> str | None:
        """Map ``<split>.bin`` if its key file matches; ``None`` on success, else why not."""
        data_path, key_path = self.files(folder)
        if not key_path.is_file() or not data_path.is_file():
            return "no cache file yet"
        try:
            meta = json.loads(key_path.read_text())
        except (OSError, ValueError):
            return f"unreadable key file {key_path}"
        if not isinstance(meta, dict):
            return f"unreadable key file {key_path}"
        if meta.get("key_sha256") != self.key_hash:
            ours = json.loads(json.dumps(self.key, default=str))
            theirs = meta.get("key") or {}
            changed = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            return "the key changed: " + ", ".join(changed or ["format"])
        if meta.get("row_elements") != self.row or meta.get("samples") != len(self.dataset):
            return "the layout changed"
        if data_path.stat().st_size != self.estimate():
            return f"{data_path} has {data_path.stat().st_size} bytes, expected {self.estimate()}"
        if "crc32" in meta and file_crc32(data_path) != meta["crc32"]:
            return f"{data_path} is damaged (its checksum differs from the key file's)"
        mm = np.memmap(data_path, dtype=_NUMPY[self.dtype], mode="c",
                       shape=(len(self.dataset), self.row))  # fmt: skip
        data = torch.from_numpy(mm).view(self.dtype)
        fresh = self._rows(self.probe).float()[0]
        stored = data[0].float()
        tol = 1e-3 if self.dtype == torch.float32 else 2e-2
        if not (stored - fresh).abs().max() <= tol * fresh.abs().max() + 1e-6:
            return "sample 0 differs from a fresh trunk pass"
        self.data, self.path = data, data_path
        return None

    # -- reading -----------------------------------------------------------------------------
    def sample(self, i: int) -> list[torch.Tensor]:
        """The trunk outputs of sample ``i``: ``[z_1 … z_k, y]`` (no batch axis), each in
        the dtype the trunk produced."""
        row = self.data[i]
        out, start = [], 0
        for shape, n, dt in zip(self.shapes, self.numels, self.src_dtypes, strict=True):
            out.append(row[start : start + n].reshape(shape).to(dt, copy=True))
            start += n
        return out

    def view(self) -> CachedTrunkSet:
        if self.data is None:
            raise RuntimeError(f"trunk cache {self.name} is neither built nor loaded")
        return CachedTrunkSet(self)


class CachedTrunkSet(Dataset):
    """The cache as a dataset: item ``i`` is ``([z_1 … z_k, y], label)`` (the default
    collate batches each tensor), with the same indices as the image dataset."""

    def __init__(self, cache: TrunkCache):
        self.cache, self.labels = cache, cache.labels

    def __len__(self) -> int:
        return len(self.cache.dataset)

    def __getitem__(self, i: int):
        return self.cache.sample(i), int(self.labels[i])


def _labels(dataset: Dataset) -> torch.Tensor:
    labels = getattr(dataset, "labels", None)
    if isinstance(labels, torch.Tensor) and len(labels) == len(dataset):
        return labels
    return torch.tensor([int(dataset[i][1]) for i in range(len(dataset))])


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
    module to train on them and a one-line description."""

    def __init__(self, caches: dict[str, TrunkCache], mode: str):
        self.caches, self.mode = caches, mode
        first = next(iter(caches.values()))
        self.tail = TrunkTail(first.model, first.ctx)
        self.trunk_depth = first.model.trunk_depth

    def view(self, split: str):
        return self.caches[split].view() if split in self.caches else None


def resolve_mode(mode: str) -> str:
    mode = ALIASES.get(mode, mode)
    if mode not in MODES:
        raise ValueError(f"--cache-trunk must be one of {MODES}, got {mode!r}")
    return mode


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


def file_crc32(path: Path, chunk: int = 16 * 2**20) -> int:
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc


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


def dataset_identity(cfg, split: str, size: int, norm: str) -> dict:
    """What names one split of ``cfg``'s dataset (the data's content is hashed as well)."""
    root = str(Path(cfg.data_root).resolve()) if cfg.data_root else None
    ident = {
        "name": cfg.dataset,
        "root": root,
        "split": split,
        "list": cfg.train_split if split == "train" else cfg.test_split,
        "max": cfg.max_train if split == "train" else cfg.max_test,
        "val_split": cfg.val_split,
        "img_size": size,
        "normalize": norm,
    }
    if cfg.dataset.startswith("fewshot:"):
        ident.update(shots=cfg.shots, shot_seed=cfg.shot_seed)
    return ident
