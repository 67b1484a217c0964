"""``benchmarks/host_ab.py``: a measuring process reports every metric of its checkout's
``bench_host.measure``; the driver alternates the two versions process by process and
writes one row per process and provider. Never a time threshold."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import host_ab  # noqa: E402


def test_a_measuring_process_reports_every_metric(monkeypatch):
    monkeypatch.chdir(ROOT)
    got = host_ab.child(["timm", "dtl"], "float32", reps=2)
    assert set(got) == {"timm", "dtl"}
    for name, values in got.items():
        assert set(values) == set(host_ab.METRICS)
        for metric in ("infer_us", "infer_im_us", "step_us", "bwd_us"):
            assert values[metric] > 0, (name, metric)
    assert got["timm"]["addback_last_us"] is None  # no side network
    assert got["dtl"]["addback_last_us"] > 0


def test_the_versions_alternate_process_by_process(monkeypatch, tmp_path):
    calls = []

    def fake_child(tree, providers, precision, reps):
        calls.append((tree.name, precision))
        return {p: dict.fromkeys(host_ab.METRICS, float(len(calls))) for p in providers}

    monkeypatch.setattr(host_ab, "run_child", fake_child)
    monkeypatch.setattr(host_ab, "revision", lambda tree: tree.name)
    base, head = tmp_path / "old", tmp_path / "new"
    out = tmp_path / "ab.csv"
    argv = ["host_ab.py", "--base", str(base), "--head", str(head), "--processes", "2",
            "--providers", "timm", "dtl", "--out", str(out)]  # fmt: skip
    monkeypatch.setattr(sys, "argv", argv)
    assert host_ab.main() == 0
    precisions = list(host_ab.PRECISIONS)
    assert calls == [(tree, p) for _ in range(2) for tree in ("old", "new") for p in precisions]
    lines = out.read_text().splitlines()
    assert lines[0].startswith("# host_ab.py: old vs new, 2 processes each")
    rows = list(csv.DictReader(lines[1:]))
    assert len(rows) == 2 * 2 * len(precisions) * 2  # processes × versions × precisions × providers
    assert [r["code"] for r in rows[::4]] == ["old", "new", "old", "new"]
    assert {r["process"] for r in rows} == {"1", "2"}


def test_the_same_commit_twice_is_refused(monkeypatch, tmp_path):
    monkeypatch.setattr(host_ab, "revision", lambda tree: "abc1234")
    argv = ["host_ab.py", "--base", str(tmp_path / "a"), "--head", str(tmp_path / "b")]
    monkeypatch.setattr(sys, "argv", argv)
    with pytest.raises(SystemExit):
        host_ab.main()
