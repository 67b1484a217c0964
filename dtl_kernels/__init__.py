"""dtl_kernels: Disentangled Transfer Learning (DTL / DTL+) with fused kernels.

    from dtl_kernels import DTLViT, DTLSwin, create_model
"""

from ._version import __version__
from .csn import CompactSideNetwork, CSNConfig
from .models import DTLModel, DTLSwin, DTLViT, create_model, read_adapter
from .ops import BackendUnavailable

__all__ = [
    "BackendUnavailable",
    "CSNConfig",
    "CompactSideNetwork",
    "DTLModel",
    "DTLSwin",
    "DTLViT",
    "__version__",
    "create_model",
    "read_adapter",
]
