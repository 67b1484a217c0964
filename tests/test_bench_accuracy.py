"""The accuracy study's protocol (benchmarks/bench_accuracy.py) with the training runs
replaced by a fake: learning rates are chosen on the validation runs only, the seeds run
on the test split with that rate, and the tables report mean ± std."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import bench_accuracy as B  # noqa: E402


def test_lr_chosen_on_validation_then_seeds_on_test(tmp_path, monkeypatch):
    calls = []

    def fake(args, backbone, dataset, method, phase, lr, seed):
        calls.append((method, phase, lr, seed))
        # validation prefers the larger lr; test accuracy varies with the seed
        acc = (80.0 + 1000 * lr) if phase == "select" else (70.0 + seed)
        return {"backbone": backbone, "dataset": dataset, "method": method, "phase": phase,
                "lr": lr, "seed": seed, "acc": acc, "trainable_params": 10,
                "peak_memory_mib": 100.0 + seed, "images_per_s": 5.0, "wall_s": 2.0}  # fmt: skip

    monkeypatch.setattr(B, "run_one", fake)
    args = argparse.Namespace(
        quick=False, backbones=["lite0"], datasets=["elpv"], methods=["lora", "dtl", "full"],
        seeds=3, epochs=1, results=tmp_path, precision="fp32", lrs={"full": (1e-4,)},
    )  # fmt: skip
    monkeypatch.setattr(B, "write_runs", lambda *a: None)
    rows = B.study(args)
    assert not [c for c in calls if c[0] == "lora"]  # a CNN has no qkv to adapt
    test_lrs = {(m, lr) for m, phase, lr, _ in calls if phase == "test"}
    assert test_lrs == {("dtl", max(B.LR_GRID["dtl"])), ("full", 1e-4)}  # full: --lrs grid
    assert not [c for c in calls if c[0] == "full" and c[1] == "select"]  # one lr: no search
    summary = B.aggregate(rows)
    dtl = next(r for r in summary if r["method"] == "dtl")
    assert (dtl["acc_mean"], dtl["acc_std"], dtl["seeds"]) == (71.0, 1.0, 3)
    assert dtl["peak_memory_mib"] == 101.0
    B.write_tables(args, summary)
    table = (tmp_path / "accuracy.md").read_text()
    assert "| lite0 | elpv | dtl | 71.00 ± 1.00 (3) |" in table
    assert (tmp_path / "accuracy.csv").is_file()


def test_run_folders_name_what_differs_and_are_reused_only_when_equal(tmp_path):
    import json

    full = argparse.Namespace(epochs=3, max_train=None, precision="fp32")
    quick = argparse.Namespace(epochs=2, max_train=800, precision="fp32")
    assert B.run_tag(full) == "" and B.run_tag(quick) == "-e2-n800"
    path = tmp_path / "summary.json"
    path.write_text(json.dumps(dict(epochs=3, precision="fp32", img_size=112, evaluated_on="test")))
    assert B._reusable(path, full, {"img_size": 112})
    assert not B._reusable(path, full, {"img_size": 112, "val_split": 400})  # a val run is not
    assert not B._reusable(path, quick, {"img_size": 112})
    assert not B._reusable(tmp_path / "missing.json", full, {"img_size": 112})
