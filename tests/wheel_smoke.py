"""`make wheel-check` (``wheel_check.py``): run from outside the checkout against an
installed wheel (argument: its site folder; ``--modules``: the package's modules in the
source tree). The package must come from there, carry every module of the source tree,
load its CPU kernels and compute the side op like the reference."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

parser = argparse.ArgumentParser()
parser.add_argument("site")
parser.add_argument("--modules", default="", help="comma-separated module names it must carry")
args = parser.parse_args()
site = Path(args.site).resolve()
modules = [m for m in args.modules.split(",") if m]
for name in modules:  # each file in the wheel's folder (before any import: a quick refusal)
    parts = name.split(".")
    found = (site.joinpath(*parts).with_suffix(".py"), site.joinpath(*parts, "__init__.py"))
    assert any(f.is_file() for f in found), f"the wheel lacks {name} (no {found[0]})"

import torch  # noqa: E402

import dtl_kernels  # noqa: E402
from dtl_kernels.ops import _ext, reference, side  # noqa: E402

where = Path(dtl_kernels.__file__).resolve()
assert site in where.parents, f"dtl_kernels imported from {where}, not from the wheel in {site}"
for name in modules:  # and found there by the import system
    spec = importlib.util.find_spec(name)
    origin = Path(spec.origin).resolve() if spec is not None and spec.origin else None
    assert origin is not None and site in origin.parents, f"the wheel lacks {name} ({origin})"
assert _ext.cpu_built(), f"the wheel's CPU kernels do not load: {_ext.CPU_ERROR}"
modules_so = {p.name.split(".")[0] for p in where.parent.glob("_C*.so")}
assert "_C" in modules_so, f"the wheel lacks the op schemas' module _C ({sorted(modules_so)})"
variants = sorted(modules_so - {"_C", "_C_bind", "_C_cuda"})
assert {"_C_cpu", "_C_cpu_avx2", "_C_cpu_avx512"} <= set(variants), f"the wheel carries {variants}"
assert _ext.BINDING is not None, f"the wheel's direct entry does not load: {_ext.BINDING_ERROR}"
recipes = [p.name for p in (where.parent / "train" / "recipes").glob("*.yaml")]
assert "published.yaml" in recipes, f"the wheel carries the recipes {recipes}"  # --recipe
torch.manual_seed(0)
y, t = torch.randn(2, 17, 40, dtype=torch.float64), torch.randn(2, 17, 6, dtype=torch.float64)
u, w = torch.randn(40, 6, dtype=torch.float64) * 0.3, torch.randn(40, 1, 3, 3, dtype=torch.float64)
ours = side.side_add(y, t, u, 100.0, w, (4, 4), 1, backend="cpu")
torch.testing.assert_close(ours, reference.side_add(y, t, u, 100.0, w, (4, 4), 1))
print(f"wheel check: ok ({where.parent}; CPU kernels {_ext.CPU_VARIANT}; {len(variants)} variants)")
