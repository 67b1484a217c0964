"""Tiny configurations of real backbone families, shared by the tests that build them."""

from __future__ import annotations

SWIN = "swin_tiny_patch4_window7_224"
# Swin-T's code at 64 px: four stages (windows of 4, grids 16 / 8 / 4 / 2), width 24; the
# side network taps from stage 1 and adds back from stage 3 (wrapper options included).
TINY_SWIN = dict(
    img_size=64,
    window_size=4,
    depths=(1, 1, 2, 1),
    embed_dim=24,
    num_heads=(1, 1, 2, 2),
    tap_from=1,
    adapt_from=3,
)
