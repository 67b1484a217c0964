"""Hyper-parameter selection of the accuracy study, on the validation split only.

Per variant × backbone × dataset (every run ``phase="select"``, seed 0):

1. **learning rate** at drop path 0 over the variant's grid (about two decades in
   half-decade steps, :data:`LR_GRIDS`). Whenever the winner is the grid's smallest or
   largest value the grid grows by one half-decade step past it and the new run is
   compared too — at most :data:`MAX_EXTENSIONS` times; a winner still at an edge then is
   reported as such.
2. **drop path** (every variant that runs the backbone in training; not ``linear``): a
   coordinate search, to keep the compute affordable — drop path 0.1 at the winning lr,
   and, only if it beats drop path 0 there, at that lr's two grid neighbours as well.

The pick is the best select run by validation accuracy, ties broken by the lower
validation loss (the run's ``test_loss``: the loss on the split it evaluated), then by no
drop path and the smaller lr. The test split is never read here.

The search asks for runs through ``evaluate(runs) → {run: summary or None}``; ``None``
(not run yet: ``--reuse-only``, ``--plan``) stops it at that stage, undecided, with a bound
on how many more select runs it may still ask for.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from accuracy_runs import Run

DTL_GRID = (1e-3, 3e-3, 1e-2, 3e-2)
LORA_GRID = (3e-4, 1e-3, 3e-3, 1e-2)
LR_GRIDS = {
    "dtl": DTL_GRID, "dtl+": DTL_GRID, "dtl+k5": DTL_GRID,
    "lora": LORA_GRID, "lora-r1": LORA_GRID, "lora-tail": LORA_GRID,
    "linear": (1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
    "full": (1e-5, 3e-5, 1e-4),
}  # fmt: skip
MAX_EXTENSIONS = 2
DROP_PATH = 0.1  # the value tried against 0 (the published scripts: 0.1-0.2 in 30 of 38)
NO_DROP_PATH_SEARCH = ("linear",)  # a linear probe's backbone runs without training it

Evaluate = Callable[[list[Run]], dict[Run, dict | None]]


def half_decade(lr: float, direction: int) -> float:
    """The grid value one half-decade step above (``direction=1``) or below (``-1``)
    ``lr`` on the 1-3-10 ladder: 1e-2 → 3e-2 → 1e-1, 1e-3 → 3e-4 → 1e-4."""
    exp = math.floor(math.log10(lr) + 1e-9)
    mantissa = lr / 10.0**exp
    if math.isclose(mantissa, 1, rel_tol=1e-6):
        value = 3 * 10.0**exp if direction > 0 else 3 * 10.0 ** (exp - 1)
    elif math.isclose(mantissa, 3, rel_tol=1e-6):
        value = 10.0 ** (exp + 1) if direction > 0 else 10.0**exp
    else:  # off the ladder (a --lrs grid): a factor √10
        return float(f"{lr * 10 ** (0.5 * direction):.2g}")
    return float(f"{value:.1g}")  # 3e-4, not 3.0000000000000003e-4 (run folder names)


def selection_key(run: Run, summary: dict) -> tuple:
    """Larger is better: validation accuracy, then lower validation loss, then no drop
    path, then the smaller lr. A diverged run is worse than any other."""
    acc, loss = summary.get("test_acc"), summary.get("test_loss")
    acc = -math.inf if summary.get("diverged") or acc is None else acc
    loss = math.inf if loss is None or not math.isfinite(loss) else loss
    return (acc, -loss, -run.drop_path, -run.lr)


@dataclass
class Selection:
    """What the search of one variant asked for, found and picked."""

    variant: str
    grid: list[float]  # the lr grid after its extensions
    extensions: int = 0
    results: dict[Run, dict] = field(default_factory=dict)  # finished select runs
    missing: list[Run] = field(default_factory=list)  # asked for, not run yet
    more_at_least: int = 0  # undecided: select runs it will still ask for after `missing`
    more_at_most: int = 0  # … and may ask for at most
    pick: Run | None = None  # the chosen run (lr, drop path); None while undecided

    @property
    def at_edge(self) -> bool:
        """The pick's lr is still the grid's smallest or largest value (after the capped
        extensions, or a one-value grid): the optimum may lie beyond it."""
        return self.pick is not None and self.pick.lr in (self.grid[0], self.grid[-1])

    def best(self, runs) -> Run:
        return max(runs, key=lambda r: selection_key(r, self.results[r]))


def select(
    variant: str,
    make_run: Callable[[float, float], Run],
    evaluate: Evaluate,
    grid: tuple[float, ...] | None = None,
) -> Selection:
    """The search above for ``variant``; ``make_run(lr, drop_path)`` builds a select run.
    A one-value ``grid`` has nothing to choose: no select run, that lr at drop path 0."""
    sel = Selection(variant, sorted(grid or LR_GRIDS[variant]))
    dp_search = variant not in NO_DROP_PATH_SEARCH
    if len(sel.grid) == 1:
        sel.pick = make_run(sel.grid[0], 0.0)
        return sel
    while True:  # 1. the lr grid at drop path 0, extended at its edges
        if not _ask(sel, [make_run(lr, 0.0) for lr in sel.grid], evaluate):
            sel.more_at_least = 1 if dp_search else 0  # the drop-path run
            sel.more_at_most = MAX_EXTENSIONS - sel.extensions + (3 if dp_search else 0)
            return sel
        best = sel.best(make_run(lr, 0.0) for lr in sel.grid)
        if sel.extensions == MAX_EXTENSIONS or best.lr not in (sel.grid[0], sel.grid[-1]):
            break
        up = best.lr == sel.grid[-1]
        sel.grid.insert(len(sel.grid) if up else 0, half_decade(best.lr, 1 if up else -1))
        sel.extensions += 1
    if dp_search:  # 2. drop path at the winning lr, then at its neighbours if it helped
        with_dp = make_run(best.lr, DROP_PATH)
        if not _ask(sel, [with_dp], evaluate):
            sel.more_at_most = 2
            return sel
        if sel.best([best, with_dp]) is with_dp:
            i = sel.grid.index(best.lr)
            lrs = [sel.grid[j] for j in (i - 1, i + 1) if 0 <= j < len(sel.grid)]
            if not _ask(sel, [make_run(lr, DROP_PATH) for lr in lrs], evaluate):
                return sel
    sel.pick = sel.best(sel.results)
    return sel


def _ask(sel: Selection, runs: list[Run], evaluate: Evaluate) -> bool:
    """Evaluate the runs not known yet; ``False`` (and ``sel.missing`` filled) when some
    have no result."""
    new = [r for r in runs if r not in sel.results]
    got = evaluate(new) if new else {}
    sel.results.update({r: s for r, s in got.items() if s is not None})
    sel.missing = [r for r in new if got.get(r) is None]
    return not sel.missing
