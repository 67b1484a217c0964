"""dtl_kernels: Disentangled Transfer Learning (DTL / DTL+) with fused kernels.

from dtl_kernels import DTLViT, DTLSwin, create_model
"""

from ._version import __version__
from .csn import CompactSideNetwork, CSNConfig
from .estimate import MemoryEstimate, estimate_memory
from .models import (
    AdapterError,
    DTLConvNet,
    DTLEva,
    DTLHFViT,
    DTLModel,
    DTLSwin,
    DTLViT,
    MultiTaskDTL,
    create_model,
    from_pretrained,
    load_adapter,
    model_from_adapter,
    read_adapter,
    save_adapter,
)
from .ops import BackendUnavailable

__all__ = [
    "AdapterError",
    "BackendUnavailable",
    "CSNConfig",
    "CompactSideNetwork",
    "DTLConvNet",
    "DTLEva",
    "DTLHFViT",
    "DTLModel",
    "DTLSwin",
    "DTLViT",
    "MemoryEstimate",
    "MultiTaskDTL",
    "__version__",
    "create_model",
    "estimate_memory",
    "from_pretrained",
    "load_adapter",
    "model_from_adapter",
    "read_adapter",
    "save_adapter",
]
