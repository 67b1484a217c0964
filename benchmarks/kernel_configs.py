"""The side-op configurations ``gpu_kernels.py`` times, as plain data: the labels its CSV
rows carry and the summary's checklist (``gpu_summary.py`` reads them in the orchestrator,
which imports neither torch nor the package)."""

from __future__ import annotations

#: the dtype mixes timed (y's dtype, the taps' / ups' dtype): all-bf16 and autocast's
MIXES = (("bfloat16", "bfloat16"), ("float32", "bfloat16"))


def configs(dry_run: bool) -> list[tuple]:
    """(label, B, prefix, grid, d, K, k, dtype name, side dtype name)."""
    if dry_run:
        tiny = ("tiny", 2, 1, (4, 5), 40, 6)
        return [(*tiny, 0, "float32", "float32"), (*tiny, 3, "float32", "float32"),
                (*tiny, 3, "float32", "bfloat16")]  # fmt: skip
    vit = [("vitb", 32, 1, (14, 14), 768, 24, k, dt, side) for dt, side in MIXES
           for k in (0, 3, 5)]  # fmt: skip
    return vit + [("swinb-s3", 32, 0, (14, 14), 512, 72, 5, dt, side) for dt, side in MIXES]


def dtype_label(dtype: str, side: str) -> str:
    """The CSV's dtype column: ``bfloat16``, or ``float32+bfloat16`` for a mix."""
    return dtype if side == dtype else f"{dtype}+{side}"


def model_label(ksize: int) -> str:
    return "DTL" if ksize == 0 else f"DTL+k{ksize}"


def shape_label(label: str, b: int, prefix: int, grid, d: int, k_cols: int) -> str:
    return f"{label}:B{b},N={prefix + grid[0] * grid[1]},d={d},K={k_cols}"


def expected(dry_run: bool) -> list[tuple[str, str, str]]:
    """(shape, model, dtype label) of every config a run times."""
    return [(shape_label(label, b, p, g, d, kc), model_label(k), dtype_label(dt, side))
            for label, b, p, g, d, kc, k, dt, side in configs(dry_run)]  # fmt: skip
