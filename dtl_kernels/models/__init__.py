"""Model wrappers: they compose the CSN with a frozen timm backbone; no kernel math."""

from .base import DTLModel, read_adapter
from .convnet import DTLConvNet
from .factory import METHODS, create_model, load_backbone_weights, model_from_adapter, wrapper_for
from .hf import DTLHFViT
from .multitask import MultiTaskDTL
from .swin import DTLSwin, default_swin_blocks
from .vit import DTLEva, DTLViT

__all__ = [
    "METHODS",
    "DTLConvNet",
    "DTLEva",
    "DTLHFViT",
    "DTLModel",
    "DTLSwin",
    "DTLViT",
    "MultiTaskDTL",
    "create_model",
    "default_swin_blocks",
    "load_backbone_weights",
    "model_from_adapter",
    "read_adapter",
    "wrapper_for",
]
