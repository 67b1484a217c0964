"""The GPU check script (`make gpu-check`) on the CPU: its --dry-run runs every stage that
can run here (C++ kernels and Triton under its interpreter against the float64 reference,
kernel timing, end to end on a tiny ViT) and writes the same files as on a GPU, so the GPU
minutes go to measuring, not to debugging the script."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("DTL_KERNELS_BACKEND", None)
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--dry-run", "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
        cwd=ROOT,
    )
    return proc, out


def read(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_dry_run_writes_every_result(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for name in (
        "correctness.csv",
        "kernels.csv",
        "kernel_profile.csv",
        "e2e.csv",
        "step.csv",
        "estimate_gpu.csv",
        "fit_giants.csv",
        "log.txt",
        "summary.txt",
    ):
        assert (out / name).exists(), name
    summary = (out / "summary.txt").read_text()
    assert "cpu      3/3 cases pass" in summary and "triton   2/2 cases pass" in summary
    assert "overall: OK" in summary


def test_every_row_says_where_and_when(dry_run):
    _, out = dry_run
    rows = read(out / "correctness.csv")
    assert rows and all(r["passed"] == "True" for r in rows)
    assert all(r["device"] and r["torch"] and r["date"] for r in rows)
    kernels = read(out / "kernels.csv")
    assert {r["provider"] for r in kernels} >= {"eager", "cpu", "copy"}
    assert all(r["machine"] and r["torch"] and r["date"] for r in kernels)
    profile = read(out / "kernel_profile.csv")
    assert {r["provider"] for r in profile} == {"cpu"} and all(" | " in r["shape"] for r in profile)
    assert all(float(r["median"]) > 0 for r in profile)
    e2e = read(out / "e2e.csv")
    assert {r["provider"] for r in e2e} >= {"full", "dtl"}
    step = read(out / "step.csv")  # the interleaved step / inference protocol (bench_step.py)
    modes = {(r["provider"], r["mode"]) for r in step}
    assert {("dtl", "step_ms"), ("full", "step_ms"), ("dtl", "step_x_full"),
            ("dtl+", "infer_ms"), ("dtl", "infer_x_timm")} <= modes  # fmt: skip
    assert all(r["machine"] and r["torch"] and r["date"] for r in step)


def test_fit_stage_measures_the_giants_path(dry_run):
    """Issue 21's fit stage on a stand-in: built in bf16 by name, the prediction beside the
    measured live bytes, build time, host memory and step time recorded, goals judged."""
    _, out = dry_run
    (row,) = read(out / "fit_giants.csv")
    assert row["model"] == "vit_22b_patch14_224" and row["run_as"] == "vit_tiny_patch16_224"
    assert abs(float(row["estimate_over_measured"]) - 1) <= 0.01
    assert float(row["build_s"]) > 0 and float(row["step_ms_median"]) > 0
    assert float(row["host_peak_growth_gib"]) >= 0 and row["goal_gb"] == "80"
    summary = (out / "summary.txt").read_text()
    assert "vit_22b_patch14_224 (as vit_tiny_patch16_224) batch 2" in summary
    assert "estimate/measured    PASS" in summary


def test_summary_reports_failures_and_misses(tmp_path):
    """A failing correctness row, a crashed stage and a missed target are all visible."""
    from gpu_correct import COLUMNS
    from gpu_summary import summary, verdict

    fields = COLUMNS + ["device", "torch", "triton", "date", "git_rev"]
    with open(tmp_path / "correctness.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerow(
            dict(
                backend="cuda",
                case="c1",
                tensor="out",
                err="1",
                tol="0.1",
                err_torch="0.01",
                finite="True",
                bit_identical="True",
                passed="False",
                seconds="1",
                device="gpu",
                torch="x",
                triton="y",
                date="d",
                git_rev="r",
            )
        )
    text, ok = summary(tmp_path, [("correct-cuda", "TIMEOUT", 300.0, "rc=None")], "")
    assert not ok and "0/1 cases pass" in text and "FAILED: c1" in text
    assert verdict(0.35, 0.7, ">=").startswith("MISS") and "2.00x" in verdict(0.35, 0.7, ">=")
    assert verdict(0.05, 0.1, "<=").startswith("PASS")


def test_summary_reads_sanitizer_verdicts(tmp_path):
    """compute-sanitizer's own lines start with nine '=': the stage's section must not stop
    at them, and a hazard anywhere fails the run."""
    from gpu_summary import summary

    log = (
        "\n===== sanitize-racecheck-cuda-0 (20s, rc=0): cmd\n"
        "========= COMPUTE-SANITIZER\n[cuda] case PASS\n"
        "========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n"
        "\n===== sanitize-racecheck-cuda-1 (20s, rc=9): cmd\n"
        "========= COMPUTE-SANITIZER\n"
        "========= RACECHECK SUMMARY: 2 hazards displayed (2 errors, 0 warnings)\n"
    )
    text, ok = summary(tmp_path, [], log)
    assert "sanitize-racecheck-cuda-0: RACECHECK SUMMARY: 0 hazards" in text
    assert "sanitize-racecheck-cuda-1: RACECHECK SUMMARY: 2 hazards" in text
    assert not ok


def test_one_racecheck_process_per_sanitize_case():
    import gpu_check
    from gpu_correct import sanitize_cases

    assert gpu_check.SANITIZE_CASES == len(sanitize_cases())
