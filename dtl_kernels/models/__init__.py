"""Model wrappers and what builds them. Imports run one way, downward:

* ``factory`` (:func:`create_model`) → ``pretrained`` (models rebuilt from adapter files)
  → ``adapters`` (the file format) and ``build`` (backbones, wrapper choice, LoRA);
  ``factory`` → ``materialize`` (a meta-built backbone given its tensors in the frozen
  weights' dtype) → ``backbone_files`` → ``weight_files`` (checkpoints mapped, not read);
* ``build`` → the wrappers ``vit``, ``swin``, ``convnet``, ``hf`` → ``base``
  (:class:`DTLModel`) → ``walk``, ``published``, ``adapter_state`` (the adapter in memory);
* ``multitask`` serves several adapters on one backbone; ``backbone_files``,
  ``offline_weights`` (+ ``onnx_reader``), ``hub``, ``lora`` and ``giants`` (ViT-22B's shape
  by name) feed ``build``.

The wrappers compose the CSN with a frozen backbone (no kernel math) and know nothing of
files.
"""

from .adapter_state import AdapterError
from .adapters import load_adapter, read_adapter, save_adapter
from .base import DTLModel
from .build import wrapper_for
from .choices import METHODS
from .convnet import DTLConvNet
from .factory import create_model
from .hf import DTLHFViT
from .multitask import MultiTaskDTL
from .pretrained import from_pretrained, model_from_adapter
from .swin import DTLSwin
from .vit import DTLEva, DTLViT

__all__ = [
    "METHODS",
    "AdapterError",
    "DTLConvNet",
    "DTLEva",
    "DTLHFViT",
    "DTLModel",
    "DTLSwin",
    "DTLViT",
    "MultiTaskDTL",
    "create_model",
    "from_pretrained",
    "load_adapter",
    "model_from_adapter",
    "read_adapter",
    "save_adapter",
    "wrapper_for",
]
