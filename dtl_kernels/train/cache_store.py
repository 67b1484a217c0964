"""Trunk cache storage: :class:`TrunkCache` computes and holds the trunk outputs of one
dataset split, in RAM or in a disk file, and reads them back.

Disk format: one raw file per split, ``trunk-<split>.bin`` (``samples × elements`` in the
cache dtype, read back through a copy-on-write memory map; the prefix: a ``--cache-dir``
may hold a user's own ``train.bin``), written to a temporary file and renamed
(:func:`dtl_kernels._io.atomic_write`), with ``trunk-<split>.key.json`` beside it (the key,
layout and the SHA-256 of the data computed while writing it; deleted before a rebuild,
written after the data): a key file always describes a complete data file. On load the
data file is opened once, hashed whole and mapped through that same handle (another run
renaming its own file over it in between cannot swap in data that was not checked), and
the digest compared with the key file's (a key file without one is an older cache): a
damaged or altered file is rebuilt, never used; a key or digest mismatch means a rebuild,
and sample 0 is recomputed and compared as a last check.

Disk space: the build needs the whole file's size free besides the old file, which lives
until the new one is renamed over it. The bytes are reserved first (``posix_fallocate``)
and the rows are written with ``write()`` (never through a memory map, where a full disk
is a ``SIGBUS``): no room is a :class:`CacheRefused` saying how much is needed, and no
temporary file stays behind.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
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
from .._untrusted import parse_json
from .cache_key import FORMAT, cache_key, key_hash
from .cache_policy import CacheRefused, human, sample_tensor

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_NUMPY = {torch.float32: np.float32, torch.float16: np.float16, torch.bfloat16: np.uint16}
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}  # fmt: skip

# Slack for the DDP wait on rank 0's build: the probe ran one sample without batching.
_BUILD_TIME_FACTOR = 4.0
_MIN_WRITE_BYTES_PER_S = 20e6


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
        probe, _, self.ctx = self._trunk(sample_tensor(dataset, 0)[None])
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
        rows = torch.cat([t.reshape(b, -1).to(self.dtype) for t in tensors], dim=1).cpu()
        if self.dtype == torch.float16 and not torch.isfinite(rows).all():
            finite = all(torch.isfinite(t).all() for t in tensors)
            if finite:  # a value beyond float16's range (65504) became inf
                raise CacheRefused(
                    f"trunk cache {self.name}: the trunk's outputs exceed float16's range "
                    "(65504): use --cache-dtype bf16 or fp32"
                )
        return rows

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
        return folder / f"trunk-{self.name}.bin", folder / f"trunk-{self.name}.key.json"

    @staticmethod
    def is_file_name(name: str) -> bool:
        """Whether ``name`` is one :meth:`files` gives (for some split)."""
        return name.startswith("trunk-") and name.endswith((".bin", ".key.json"))

    def _write_file(self, tmp: str) -> None:
        """Reserve the file's bytes, then write every row with ``write()``."""
        digest = hashlib.sha256()
        with open(tmp, "r+b") as f:
            reserve_space(f.fileno(), self.estimate())
            for rows in self._batches():
                chunk = rows.contiguous().view(torch.uint8).numpy().data
                f.write(chunk)
                digest.update(chunk)
            self._written_sha256 = digest.hexdigest()
            if f.tell() != self.estimate():
                raise RuntimeError(f"trunk cache {self.name}: wrote {f.tell()} bytes, "
                                   f"expected {self.estimate()}")  # fmt: skip

    def build_disk(self, folder: str | os.PathLike) -> Path:
        """Write ``trunk-<split>.bin`` atomically (space reserved first), then
        ``trunk-<split>.key.json``; map it. :class:`CacheRefused` when the disk is full."""
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
            "sha256": self._written_sha256,
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
        """Map ``trunk-<split>.bin`` if its key file matches; ``None`` on success, else why not."""
        data_path, key_path = self.files(folder)
        if not key_path.is_file() or not data_path.is_file():
            return "no cache file yet"
        try:
            meta = parse_json(key_path.read_bytes(), f"key file {key_path}")
        except (OSError, ValueError):
            return f"unreadable key file {key_path}"
        if not isinstance(meta, dict):
            return f"unreadable key file {key_path}"
        if meta.get("key_sha256") != self.key_hash:
            # only our own fields are named (the file's are untrusted text)
            ours = json.loads(json.dumps(self.key, default=str))
            theirs = meta["key"] if isinstance(meta.get("key"), dict) else {}
            changed = sorted(k for k in ours if ours[k] != theirs.get(k))
            return "the key changed: " + ", ".join(changed or ["format"])
        if meta.get("row_elements") != self.row or meta.get("samples") != len(self.dataset):
            return "the layout changed"
        if not isinstance(meta.get("sha256"), str):
            return f"{key_path} has no digest of the data (an older cache)"
        with open(data_path, "rb") as f:  # hashed and mapped through one handle
            size = os.fstat(f.fileno()).st_size
            if size != self.estimate():
                return f"{data_path} has {size} bytes, expected {self.estimate()}"
            if _handle_sha256(f) != meta["sha256"]:
                return f"{data_path} is damaged (its SHA-256 differs from the key file's)"
            mm = np.memmap(f, dtype=_NUMPY[self.dtype], mode="c",
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


def file_sha256(path: Path, chunk: int = 16 * 2**20) -> str:
    """SHA-256 of a whole file, read in chunks (the key file stores the data file's)."""
    with open(path, "rb") as f:
        return _handle_sha256(f, chunk)


def _handle_sha256(f, chunk: int = 16 * 2**20) -> str:
    """SHA-256 of an open file from its start."""
    digest = hashlib.sha256()
    f.seek(0)
    while block := f.read(chunk):
        digest.update(block)
    return digest.hexdigest()


def file_crc32(path: Path, chunk: int = 16 * 2**20) -> int:
    """CRC-32 of a whole file, read in chunks (the key file stores the data file's)."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(chunk):
            crc = zlib.crc32(block, crc)
    return crc
