"""Processes of a ``dtl-train`` run: rank, world size, device, and collectives that never
hang on a failure.

Under ``torchrun`` the process group gets an explicit timeout (``--ddp-timeout``, default
30 min) and a CPU (gloo) group for exchanging small Python objects. :meth:`Dist.agree` is
how one rank's failure reaches the others: every rank calls it after a step (with the
exception it caught, or ``None``); if any rank failed, every rank raises — the failed one
its own exception, the others :class:`RankFailed` naming that rank and its message. A
wait for long work on one rank (rank 0 building the disk trunk cache) gets a group whose
timeout adds an estimate of that work.
"""

from __future__ import annotations

import os
from datetime import timedelta

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 1800.0


class RankFailed(RuntimeError):
    """Another process of the run failed; the message names its rank and error."""


class Dist:
    """Rank / world size / device; ``torchrun`` sets ``WORLD_SIZE`` and friends."""

    def __init__(self, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.timeout_s = float(timeout_s)
        local = int(os.environ.get("LOCAL_RANK", "0"))
        use_cuda = torch.cuda.is_available()
        self.device = torch.device(f"cuda:{local}" if use_cuda else "cpu")
        if use_cuda:
            torch.cuda.set_device(self.device)
        self._cpu_group = None
        # every rank must run the same forwards (a sharded backbone's all-gathers are
        # collectives): evaluation pads the shorter shards (set by train/fsdp.py)
        self.lockstep = False
        if self.world > 1:
            if not dist.is_initialized():
                dist.init_process_group(
                    "nccl" if use_cuda else "gloo", timeout=timedelta(seconds=self.timeout_s)
                )
            self._cpu_group = self.new_cpu_group(0.0)

    @property
    def main(self) -> bool:
        return self.rank == 0

    def new_cpu_group(self, extra_timeout_s: float):
        """A gloo group of all ranks whose timeout is ``--ddp-timeout + extra_timeout_s``
        (a collective: every rank calls it, in the same order)."""
        timeout = timedelta(seconds=self.timeout_s + max(0.0, float(extra_timeout_s)))
        return dist.new_group(backend="gloo", timeout=timeout)

    def sum(self, *values: float) -> list[float]:
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            dist.all_reduce(t)
        return t.tolist()

    def all_true(self, flag: bool) -> bool:
        """``flag`` and-ed over every rank (one tiny all-reduce; local when alone)."""
        if self.world == 1:
            return bool(flag)
        t = torch.tensor([0.0 if flag else 1.0], dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        return t.item() == 0.0

    def agree(self, error: BaseException | None, what: str, extra_timeout_s: float = 0.0):
        """Raise on every rank if ``error`` is set on any (see the module docstring).

        ``extra_timeout_s`` > 0: wait that much longer than ``--ddp-timeout`` for the
        slowest rank (work that only one rank does).
        """
        if self.world == 1:
            if error is not None:
                raise error
            return
        group = self.new_cpu_group(extra_timeout_s) if extra_timeout_s > 0 else self._cpu_group
        message = None if error is None else _one_line(error)
        gathered: list = [None] * self.world
        dist.all_gather_object(gathered, message, group=group)
        if error is not None:
            raise _agreed(error)
        for rank, msg in enumerate(gathered):
            if msg is not None:
                raise _agreed(RankFailed(f"rank {rank} failed while {what}: {msg}"))

    def run_agreed(self, what: str, fn, *args, **kwargs):
        """``fn(*args, **kwargs)`` on every rank; any rank's failure raised on all. An
        error that an inner :meth:`agree` already raised on every rank is not exchanged
        again (each rank makes the same number of collective calls)."""
        try:
            result = fn(*args, **kwargs)
        except Exception as exc:
            if getattr(exc, "dtl_agreed", False):
                raise
            self.agree(exc, what)
            raise  # not reached: agree raised
        self.agree(None, what)
        return result

    def main_then_agree(self, what: str, fn, *args, **kwargs):
        """``fn`` on rank 0 only (writing files); its failure raised on every rank."""
        error, result = None, None
        if self.main:
            try:
                result = fn(*args, **kwargs)
            except Exception as exc:
                error = exc
        self.agree(error, what)
        return result

    def barrier(self) -> None:
        if self.world > 1:
            dist.barrier()

    def close(self) -> None:
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


def _agreed(exc: BaseException) -> BaseException:
    exc.dtl_agreed = True
    return exc


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}"
