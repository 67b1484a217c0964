"""The README (issue 20, item 8): its Python examples import the modules they use, and the
figures it quotes from the demo and the memory benchmark are those of the committed files;
the same for the giants' table in benchmarks/RESULTS.md; every relative link between the
project's documents reaches a file and, where it names one, a heading."""

from __future__ import annotations

import ast
import csv
import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
RESULTS = ROOT / "benchmarks" / "results"
RESULTS_MD = (ROOT / "benchmarks" / "RESULTS.md").read_text()
DOCS = ("README.md", "DEVELOPERS.md", "benchmarks/RESULTS.md", "benchmarks/README.md")
MODULES = {"torch", "timm", "dtl_kernels", "np", "numpy", "PIL", "transformers"}


def _python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)


def test_python_examples_import_what_they_use():
    blocks = _python_blocks()
    assert len(blocks) >= 5
    for block in blocks:
        tree = ast.parse(block)
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                imported |= {(a.asname or a.name).split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom):
                imported |= {a.asname or a.name for a in node.names}
        used = {
            node.value.id
            for node in ast.walk(tree)
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
        }
        missing = (used & MODULES) - imported
        assert not missing, (
            f"a README example uses {sorted(missing)} without importing it:\n{block}"
        )


def test_install_of_the_extra_is_from_a_checkout():
    assert "dtl-kernels[hf]" not in README and '".[hf]"' in README


def test_demo_figures_are_the_committed_runs():
    run = json.loads((RESULTS / "demo" / "summary.json").read_text())
    again = json.loads((RESULTS / "demo" / "eval_only_summary.json").read_text())
    acc = f"{100 * run['test_acc']:.2f} %"
    assert f"test accuracy **{acc}**" in README and f"gives the same {acc}" in README
    assert again["eval_only"] and again["test_acc"] == run["test_acc"]
    assert f"{run['peak_memory_bytes'] / 2**20:.1f} MiB" in README
    assert f"{run['trainable_params']:,} trainable" in README


def test_memory_ratios_are_the_committed_ones():
    rows = list(csv.DictReader((RESULTS / "memory.csv").open()))
    ratio = {r["model"]: float(r["median"]) for r in rows
             if r["provider"] == "ours" and r["unit"] == "x_full"}  # fmt: skip
    intro = README[: README.index("## The two commands")]
    assert f"**{ratio['dtl']:.3f}×**" in intro
    assert f"({ratio['dtl+trunk_dtype=bfloat16']:.3f}× with bf16 trunk taps" in intro
    assert f"{ratio['dtl+checkpoint_tail=True']:.3f}× with the frozen tail" in intro


def test_giant_predictions_are_the_committed_ones():
    """Issue 21: every predicted peak of the giants' table is the committed CSV's."""
    rows = list(csv.DictReader((RESULTS / "estimate_giants.csv").open()))
    assert len(rows) == 24
    table = RESULTS_MD.split("**Giants, predicted**")[1].split("What fits where")[0]
    for r in rows:
        peak = f"{float(r['peak_gib']):.2f}"
        line = next(ln for ln in table.splitlines() if f"| {r['config']} |" in ln and (
            ln.startswith(f"| {_GIANT_LABELS[r['model']]}")))  # fmt: skip
        assert peak in line, (r["model"], r["config"], r["batch"], peak)


_GIANT_LABELS = {"vit_giant_patch14_dinov2": "ViT-g/14", "vit_pe_core_gigantic_patch14_448":
                 "PE-G/14", "vit_22b_patch14_224": "ViT-22B shape"}  # fmt: skip


def _anchor(heading: str) -> str:
    """GitHub's anchor of a Markdown heading: lower case, punctuation dropped, spaces → -."""
    text = heading.lstrip("#").strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def test_relative_links_reach_their_files_and_headings():
    broken = []
    for doc in DOCS:
        path = ROOT / doc
        for target in re.findall(r"\]\(([^)\s]+)\)", path.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a URL
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                broken.append(f"{doc}: {target} (no such file)")
            elif anchor and dest.suffix == ".md":
                headings = re.findall(r"^#+ .*$", dest.read_text(), flags=re.M)
                if anchor not in {_anchor(h) for h in headings}:
                    broken.append(f"{doc}: {target} (no such heading)")
    assert not broken, "\n".join(broken)
