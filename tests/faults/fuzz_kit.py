"""Seeded mutation fuzzing for the readers of files that come from others: random edits of
a valid file (byte flips, insertions, deletions, truncations, copied ranges, huge varints),
a fixed number per test so the run time is bounded, and the Python memory a read costs."""

from __future__ import annotations

import random
import tracemalloc
from collections.abc import Callable, Iterator

# bytes that make parsers misbehave: varint continuation, all ones, zero, sign bits
_SPECIAL = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x0A, 0x12, 0x22, 0x3A, 0x42, 0x4A)
# a varint of 2^35 - 1 and one of 2^62: lengths and counts far beyond any file
_HUGE = (b"\xff\xff\xff\xff\x7f", b"\x80\x80\x80\x80\x80\x80\x80\x80\x40")


_IN_PLACE = (0, 1, 7)  # the edits that keep the file's length and layout


def _mutate_once(data: bytearray, rng: random.Random, in_place: bool) -> None:
    n = len(data)
    op = rng.choice(_IN_PLACE) if in_place else rng.randrange(8)
    i = rng.randrange(n) if n else 0
    if op == 0 and n:  # flip bits
        data[i] ^= 1 << rng.randrange(8)
    elif op == 1 and n:  # a special byte
        data[i] = rng.choice(_SPECIAL)
    elif op == 2:  # insert random bytes
        data[i:i] = rng.randbytes(rng.randrange(1, 9))
    elif op == 3 and n:  # delete a range
        del data[i : i + rng.randrange(1, 17)]
    elif op == 4 and n:  # truncate
        del data[rng.randrange(n) :]
    elif op == 5 and n:  # copy a range elsewhere
        j = rng.randrange(n)
        data[j:j] = data[i : i + rng.randrange(1, 65)]
    elif op == 6:  # a huge varint
        data[i:i] = rng.choice(_HUGE)
    elif n:  # overwrite a range with one repeated byte
        k = min(rng.randrange(1, 9), n - i)
        data[i : i + k] = bytes([rng.choice(_SPECIAL)]) * k


def mutants(
    valid: bytes, count: int, seed: int, max_edits: int = 3, in_place: bool = False
) -> Iterator[bytes]:
    """``count`` mutated copies of ``valid``, each with 1…``max_edits`` random edits
    (``in_place``: only edits that keep the length: flips and overwritten bytes)."""
    rng = random.Random(seed)
    for _ in range(count):
        data = bytearray(valid)
        for _ in range(rng.randint(1, max_edits)):
            _mutate_once(data, rng, in_place)
        yield bytes(data)


def python_peak(fn: Callable[[], object]) -> tuple[object, int]:
    """``(fn's result or the exception it raised, peak bytes Python allocated meanwhile)``
    (tracemalloc sees Python objects and NumPy arrays, not torch's own allocator)."""
    tracemalloc.start()
    try:
        try:
            result = fn()
        except Exception as exc:  # noqa: BLE001 — the caller checks which
            result = exc
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


class AllocationGuard:
    """Refuse (``MemoryError``, before any memory is taken) every torch factory call
    (``empty``, ``zeros``, ``randn``…) that would allocate more than ``max_bytes`` at once:
    a reader that builds from unchecked sizes fails fast here instead of taking gigabytes.
    ``largest`` is the largest allocation seen."""

    def __init__(self, max_bytes: int):
        from torch.utils._python_dispatch import TorchDispatchMode

        guard = self
        self.max_bytes, self.largest = int(max_bytes), 0

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                if func.__name__.split(".")[0] in _FACTORIES and args:
                    guard._check(args[0], kwargs.get("dtype"))
                return func(*args, **kwargs)

        self._mode = _Mode()

    def _check(self, size, dtype) -> None:
        import math

        import torch

        if not isinstance(size, (list, tuple)):
            return
        itemsize = (dtype or torch.get_default_dtype()).itemsize
        nbytes = math.prod(int(s) for s in size) * itemsize
        self.largest = max(self.largest, nbytes)
        if nbytes > self.max_bytes:
            raise MemoryError(f"allocation of {nbytes} bytes (over {self.max_bytes}) for {size}")

    def __enter__(self):
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        return self._mode.__exit__(*exc)


_FACTORIES = {"empty", "empty_strided", "zeros", "ones", "full", "rand", "randn", "randint"}
