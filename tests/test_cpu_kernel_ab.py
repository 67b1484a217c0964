"""``benchmarks/cpu_kernel_ab.py`` can still build this commit's kernels: the flags it reads
from ``setup.py`` and the registration line it renames (building takes a minute: not run
here)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import cpu_kernel_ab  # noqa: E402


def test_reads_the_avx512_variants_flags_from_setup_py():
    flags = cpu_kernel_ab.variant_flags()
    assert "-mavx512f" in flags and "-mfma" in flags


def test_the_kernel_file_and_its_includes_are_the_ones_it_copies():
    text = cpu_kernel_ab.source_of("WORKTREE", "csrc/cpu/side.cpp")
    assert text.count(cpu_kernel_ab.REGISTRATION) == 1
    included = {line.split('"')[1] for line in text.splitlines() if line.startswith('#include "')}
    copied = {Path(p).name for p in cpu_kernel_ab.SOURCES}
    assert {Path(p).name for p in included} <= copied
    checks = cpu_kernel_ab.source_of("WORKTREE", "csrc/side_checks.h")
    for line in checks.splitlines():
        if line.startswith('#include "'):
            assert Path(line.split('"')[1]).name in copied, line
