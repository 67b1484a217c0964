"""benchmarks/host_context.py: its variants do what they say and leave the model as it was."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import host_context as H  # noqa: E402
from bench_host import Provider  # noqa: E402

from dtl_kernels import csn as csn_module  # noqa: E402


def _logits(p: Provider) -> torch.Tensor:
    with torch.no_grad():
        return p.model(p.x)


def test_variants_change_only_what_they_name():
    p = Provider("dtl")
    p.model.eval()
    torch.manual_seed(0)
    with torch.no_grad():
        for up in p.model.csn.up.values():
            up.normal_()  # B = 0 at init would make every variant's logits equal
    real, real_ = csn_module.step.side_step, csn_module.step.bind_side_step_
    set_variant, restore = H._setter(p.model)
    got = {}
    try:
        for v in H.VARIANTS[1:]:
            set_variant(v)
            got[v] = _logits(p)
    finally:
        restore()
    assert not torch.allclose(got["dtl"], got["dtl_walk_only"])
    torch.testing.assert_close(got["dtl_step_twice"], got["dtl"])
    torch.testing.assert_close(got["dtl_no_step"], got["dtl_walk_only"])
    assert csn_module.step.side_step is real and csn_module.step.bind_side_step_ is real_
    assert not {"tap", "add_back", "walk_plan"} & set(p.model.csn.__dict__)
    torch.testing.assert_close(_logits(p), got["dtl"])


def test_measure_times_every_variant_and_restores():
    real = csn_module.step.side_step
    samples = H.measure(reps=1, amp=False)
    assert set(samples) == set(H.VARIANTS) and all(len(s) == 1 for s in samples.values())
    assert csn_module.step.side_step is real
