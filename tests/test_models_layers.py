"""``dtl_kernels/models`` imports run one way (issue 20, item 10): no module imports one
that imports it back, at module level or deferred into a function; the wrappers import
nothing that reads or writes files; no name is re-exported for old import paths."""

from __future__ import annotations

import ast
from pathlib import Path

import dtl_kernels.models

MODELS = Path(dtl_kernels.models.__file__).parent
WRAPPERS = ("base", "vit", "swin", "convnet", "hf", "walk", "published", "adapter_state")
FILE_MODULES = ("adapters", "pretrained", "factory", "build", "backbone_files", "hub",
                "offline_weights", "onnx_reader", "multitask", "weight_files",
                "materialize")  # fmt: skip


def _imports(path: Path) -> set[str]:
    """The ``dtl_kernels.models`` modules ``path`` imports, wherever the import statement is."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 1:  # from .x import …
            if node.module:
                found.add(node.module.split(".")[0])
            else:  # from . import x, y
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
            "dtl_kernels.models."
        ):
            found.add(node.module.split(".")[2])
    return found


def _graph() -> dict[str, set[str]]:
    modules = {p.stem for p in MODELS.glob("*.py") if p.stem != "__init__"}
    return {m: _imports(MODELS / f"{m}.py") & modules for m in modules}


def test_models_imports_form_no_circle():
    graph, done, order = _graph(), set(), []
    while len(done) < len(graph):
        ready = sorted(m for m in graph if m not in done and graph[m] <= done)
        assert ready, f"import circle among {sorted(set(graph) - done)}: " + "; ".join(
            f"{m} → {sorted(graph[m] - done)}" for m in sorted(set(graph) - done)
        )
        done.update(ready)
        order += ready
    assert order.index("base") < order.index("vit") < order.index("build")
    assert order.index("build") < order.index("pretrained") < order.index("factory")


def test_wrappers_know_nothing_of_files():
    graph = _graph()
    for wrapper in WRAPPERS:
        reached, todo = set(), [wrapper]
        while todo:  # everything the wrapper imports, directly or not
            for m in graph[todo.pop()] - reached:
                reached.add(m)
                todo.append(m)
        assert not reached & set(FILE_MODULES), (wrapper, sorted(reached & set(FILE_MODULES)))


def test_no_reexports_for_old_import_paths():
    for path in MODELS.glob("*.py"):
        assert "noqa: F401" not in path.read_text(), path.name
