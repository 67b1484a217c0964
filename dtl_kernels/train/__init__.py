"""``dtl-train``: fine-tune a frozen backbone with DTL / DTL+ (or the linear / full
baselines) on built-in or folder datasets. Entry points: :func:`train` (Python),
``dtl-train`` / ``python -m dtl_kernels.train`` (command line)."""

from .config import TrainConfig, load_config, make_config
from .loop import run


def train(**options) -> dict:
    """Run ``dtl-train`` from Python: ``train(model=…, method="dtl+", dataset="elpv", …)``.
    Returns the summary dict (also written to ``OUTPUT/summary.json``)."""
    return run(make_config(options))


__all__ = ["TrainConfig", "load_config", "make_config", "run", "train"]
