"""A Hugging Face ``Trainer`` for DTL models that saves only the adapter, as PEFT does.

The stock ``Trainer`` writes the whole ``model.safetensors`` (86 MB for ViT-B) into every
checkpoint, although only the side network and the head train. :class:`AdapterTrainer`
writes ``adapter.safetensors`` (:func:`dtl_kernels.save_adapter`: the trained tensors and
what rebuilds the model) instead, and reads it back to resume or to load the best
checkpoint. Batches are dictionaries with ``pixel_values`` ``(batch, 3, H, W)`` and
``labels`` ``(batch,)``; the loss is the cross-entropy of the model's logits::

    from dtl_kernels.integrations.hf_trainer import AdapterTrainer
    trainer = AdapterTrainer(model=model, args=TrainingArguments(...), train_dataset=ds)
    trainer.train()                       # OUTPUT/checkpoint-N/adapter.safetensors
    model = dtl_kernels.from_pretrained("OUTPUT/checkpoint-N/adapter.safetensors")

Needs ``transformers`` (``pip install --no-build-isolation ".[hf]"``).
"""

from __future__ import annotations

import os
from pathlib import Path

import torch.nn.functional as F
from transformers import Trainer

from ..models.adapters import load_adapter, save_adapter

ADAPTER_FILE = "adapter.safetensors"


class AdapterTrainer(Trainer):
    """``transformers.Trainer`` whose checkpoints and ``save_model`` hold only the adapter."""

    def __init__(self, *args, **kwargs) -> None:
        model = kwargs.get("model", args[0] if args else None)
        inner = getattr(model, "_orig_mod", getattr(model, "module", model))  # compiled / DP
        if model is not None and not hasattr(inner, "adapter_state_dict"):
            raise TypeError(
                f"AdapterTrainer trains DTL models (dtl_kernels.create_model), got "
                f"{type(inner).__name__}: its checkpoints would hold no adapter"
            )
        super().__init__(*args, **kwargs)
        if not self.args.label_names:  # a DTL model's forward takes images only
            self.label_names = ["labels"]
        self._signature_columns = ["pixel_values", "labels"]  # what the batches keep

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        logits = model(inputs["pixel_values"])
        loss = F.cross_entropy(logits.float(), inputs["labels"])
        return (loss, {"logits": logits}) if return_outputs else loss

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Write ``OUTPUT/adapter.safetensors`` (main process only); nothing else of the model."""
        output_dir = Path(output_dir or self.args.output_dir)
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            save_adapter(self._dtl_model(self.model), output_dir / ADAPTER_FILE)

    def _load_from_checkpoint(self, resume_from_checkpoint, model=None) -> None:
        path = Path(resume_from_checkpoint) / ADAPTER_FILE
        load_adapter(self._dtl_model(model or self.model), path)

    def _load_best_model(self) -> None:
        path = Path(self.state.best_model_checkpoint) / ADAPTER_FILE
        load_adapter(self._dtl_model(self.model), path)

    def _dtl_model(self, model):
        """The DTL model inside ``model`` (DataParallel / DDP / a ``torch.compile``d one)."""
        return self.accelerator.unwrap_model(model, keep_torch_compile=False)
