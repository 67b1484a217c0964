"""Process groups get explicit timeouts (--ddp-timeout, plus the work's estimate for a
wait on one rank) and one rank's failure is raised on every rank (see also
tests/faults/test_fault_ddp.py for two real processes)."""

from __future__ import annotations

from datetime import timedelta

import pytest

from dtl_kernels.train import dist as D


class FakeCollectives:
    """Stands in for ``torch.distributed`` as seen by rank 0 of 2; the other rank's
    message (``peer``) is what ``all_gather_object`` brings back."""

    def __init__(self, peer=None):
        self.peer, self.init, self.groups = peer, None, []

    def is_initialized(self):
        return self.init is not None

    def init_process_group(self, backend, timeout=None):
        self.init = (backend, timeout)

    def new_group(self, backend=None, timeout=None):
        self.groups.append((backend, timeout))
        return f"group{len(self.groups)}"

    def all_gather_object(self, out, obj, group=None):
        out[:] = [obj, self.peer]

    def destroy_process_group(self):
        self.init = None


@pytest.fixture
def two_ranks(monkeypatch):
    def make(peer=None):
        fake = FakeCollectives(peer)
        monkeypatch.setattr(D, "dist", fake)
        monkeypatch.setattr(D.torch.cuda, "is_available", lambda: False)
        for k, v in dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0").items():
            monkeypatch.setenv(k, v)
        return fake

    return make


def test_timeouts_are_explicit_and_sized(two_ranks):
    fake = two_ranks()
    d = D.Dist(timeout_s=600)
    assert fake.init == ("gloo", timedelta(seconds=600))
    assert fake.groups == [("gloo", timedelta(seconds=600))]
    d.agree(None, "building the cache", extra_timeout_s=3000)
    assert fake.groups[-1] == ("gloo", timedelta(seconds=3600))


def test_a_peer_failure_is_raised_here(two_ranks):
    two_ranks(peer="OSError: [Errno 28] No space left on device")
    d = D.Dist()
    with pytest.raises(D.RankFailed, match="rank 1 failed while saving: OSError: .*No space"):
        d.run_agreed("saving", lambda: None)
    with pytest.raises(D.RankFailed):
        d.main_then_agree("writing", lambda: "fine here")


def test_own_failure_is_raised_once(two_ranks):
    fake = two_ranks()
    d = D.Dist()
    calls = []
    fake.all_gather_object = lambda out, obj, group=None: (calls.append(obj), out.__setitem__(
        slice(None), [obj, None]))  # fmt: skip

    def inner():
        d.agree(ValueError("bad\nthing"), "inner")

    with pytest.raises(ValueError, match="bad"):
        d.run_agreed("outer", inner)
    assert calls == ["ValueError: bad thing"]  # agreed once, on one line
