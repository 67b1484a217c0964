"""Model wrappers: they compose the CSN with a frozen timm backbone; no kernel math."""

from .base import DTLModel, read_adapter
from .factory import METHODS, create_model, load_backbone_weights, wrapper_for
from .swin import DTLSwin, default_swin_blocks
from .vit import DTLViT

__all__ = [
    "METHODS",
    "DTLModel",
    "DTLSwin",
    "DTLViT",
    "create_model",
    "default_swin_blocks",
    "load_backbone_weights",
    "read_adapter",
    "wrapper_for",
]
