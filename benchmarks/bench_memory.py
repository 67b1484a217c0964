"""Activation memory of DTL training: bytes autograd saves for backward.

Measured with ``torch.autograd.graph.saved_tensors_hooks`` over one forward of a training
step, deduplicated by storage, parameters excluded (SPEC §2's protocol):

* ``csn``: the bytes the Compact Side Network itself adds — tensors saved by the CSN's
  taps / add-backs whose storage the backbone does not save anyway — fused vs reference
  (targets ≤ 0.4× for DTL, ≤ 0.3× for DTL+).
* ``model``: a whole DTLViT ViT-B/16 step (M = 7) as a fraction of full fine-tuning
  (targets ≤ 0.30×, ≤ 0.28× with ``trunk_dtype=bfloat16``), and with ``checkpoint_tail``;
  beside it PEFT LoRA r = 8 on every block and on blocks 7-12 only.

The counts are exactly linear in the batch, so a small batch (default 4) gives the same
fractions as 32. Run: ``python benchmarks/bench_memory.py [--batch 4]``.

``--backbones NAME …``: instead, every wrapped backbone family at its default ``M`` and its
timm input size — full fine-tuning, PEFT LoRA (transformers), DTL, DTL+ — into
``memory_backbones.csv`` (per backbone family).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import Results  # noqa: E402

from dtl_kernels import create_model  # noqa: E402
from dtl_kernels.csn import CompactSideNetwork, PlannedPass  # noqa: E402


class SavedBytes:
    """Records storages saved for backward, and which of them the CSN saved."""

    def __init__(self, model: torch.nn.Module):
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.storages: dict[int, int] = {}
        self.by_csn: set[int] = set()
        self.by_backbone: set[int] = set()
        self.in_csn = False

    def pack(self, t):
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            s = t.untyped_storage()
            ptr = s.data_ptr()
            if ptr not in self.params:
                self.storages[ptr] = s.nbytes()
                (self.by_csn if self.in_csn else self.by_backbone).add(ptr)
        return t

    @property
    def total(self) -> int:
        return sum(self.storages.values())

    @property
    def csn_only(self) -> int:
        return sum(self.storages[p] for p in self.by_csn - self.by_backbone)

    #: every way the CSN enters a forward: the general walk's tap / add_back, and a planned
    #: pass's begin and steps (models/walk.py runs a plain walk from the CSN's plan)
    CSN_ENTRIES = (
        (CompactSideNetwork, "tap"),
        (CompactSideNetwork, "add_back"),
        (CompactSideNetwork, "begin_pass"),
        (PlannedPass, "step"),
        (PlannedPass, "recorded_step"),
    )

    @contextlib.contextmanager
    def csn_calls(self):
        """Flag the CSN's calls (:data:`CSN_ENTRIES`) while they run; ``self.csn_entered``
        counts them."""
        originals = [(cls, name, getattr(cls, name)) for cls, name in self.CSN_ENTRIES]
        self.csn_entered = 0

        def wrap(fn):
            def inner(*args, **kwargs):
                self.in_csn = True
                self.csn_entered += 1
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.in_csn = False

            return inner

        for cls, name, fn in originals:
            setattr(cls, name, wrap(fn))
        try:
            yield
        finally:
            for cls, name, fn in originals:
                setattr(cls, name, fn)


def measure(model: torch.nn.Module, images: torch.Tensor) -> SavedBytes:
    rec = SavedBytes(model)
    model.train()
    with rec.csn_calls(), torch.autograd.graph.saved_tensors_hooks(rec.pack, lambda t: t):
        loss = model(images).float().square().mean()
    if rec.csn_entered == 0 and any(isinstance(m, CompactSideNetwork) for m in model.modules()):
        # the CSN ran through a way CSN_ENTRIES does not list: its bytes would read as 0
        raise RuntimeError("bench_memory: the side network ran, but through none of "
                           f"SavedBytes.CSN_ENTRIES {SavedBytes.CSN_ENTRIES}")  # fmt: skip
    loss.backward()
    return rec


FAMILIES = [
    "vit_base_patch16_224", "eva02_base_patch14_224", "swin_tiny_patch4_window7_224",
    "swinv2_tiny_window8_256", "tf_efficientnet_lite0", "resnet50", "convnext_tiny",
    "hf:ViTModel", "hf:Dinov2Model", "hf:CLIPVisionModel", "hf:SiglipVisionModel",
]  # fmt: skip


def _backbone(name: str):
    """``(backbone or timm name, input size)``: ``hf:CLASS`` is that Hugging Face model in
    its default configuration (the base size), random weights."""
    if not name.startswith("hf:"):
        import timm

        return name, int((timm.models.get_pretrained_cfg_value(name, "input_size") or (3, 224))[-1])
    import transformers

    cls = getattr(transformers, name[3:])
    config = getattr(transformers, name[3:].replace("Model", "Config"))(image_size=224)
    kwargs = {"add_pooling_layer": False} if cls is transformers.ViTModel else {}
    return cls(config, **kwargs), 224


def backbone_rows(names: list[str], batch: int) -> None:
    """Saved bytes of full / LoRA / DTL / DTL+ per backbone family, default M."""
    res = Results("memory_backbones")
    lines = []
    for name in names:
        torch.manual_seed(0)
        size = _backbone(name)[1]
        images = torch.randn(batch, 3, size, size)
        shape = f"{size}x{size}"
        full = measure(
            create_model(_backbone(name)[0], method="full", num_classes=10), images
        ).total
        res.add("full", "model", name, batch, "float32", shape, full / 2**20, "MB")
        row = [f"{name:30s} full {full / 2**20:7.1f} MB"]
        for method in ("lora", "dtl", "dtl+"):
            try:
                model = create_model(_backbone(name)[0], method=method, num_classes=10)
            except ValueError as exc:  # LoRA on a CNN: no qkv layers
                row.append(f"{method} -")
                print(f"  ({name} {method}: {exc})")
                continue
            rec = measure(model, images)
            res.add(method, "model", name, batch, "float32", shape, rec.total / full, "x_full")
            row.append(f"{method} {rec.total / full:.3f}x")
        lines.append(", ".join(row))
        print(lines[-1], flush=True)
    res.write()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--img", type=int, default=224)
    ap.add_argument("--backbones", nargs="*", default=None, help=f"default: {FAMILIES}")
    args = ap.parse_args()
    if args.backbones is not None:
        return backbone_rows(args.backbones or FAMILIES, args.batch)
    torch.manual_seed(0)
    images = torch.randn(args.batch, 3, args.img, args.img)
    res = Results("memory")
    shape = f"{args.img}x{args.img}"
    mb = 1 / 2**20

    def build(method, backend="auto", **opts):
        model = create_model(args.model, method=method, num_classes=10, **opts)
        if model.csn is not None:
            model.csn.backend = backend
            with torch.no_grad():  # B = 0 at init; any values do for memory, keep it honest
                for p in model.csn.up.values():
                    p.normal_(0, 0.02)
        return model

    full = measure(build("full"), images).total
    res.add("full_finetune", "model", args.model, args.batch, "float32", shape, full * mb, "MB")
    summary = [f"full fine-tuning: {full * mb:.1f} MB saved for backward"]
    configs = [
        ("dtl", "reference", {}),
        ("dtl", "auto", {}),
        ("dtl", "auto", {"trunk_dtype": torch.bfloat16}),
        ("dtl", "auto", {"checkpoint_tail": True}),
        ("dtl", "auto", {"trunk_dtype": torch.bfloat16, "checkpoint_tail": True}),
        ("dtl+", "reference", {}),
        ("dtl+", "auto", {}),
        ("dtl+", "auto", {"trunk_dtype": torch.bfloat16}),
    ]
    # PEFT LoRA r = 8 on every block, and on blocks 7-12 only (the study's memory-matched
    # LoRA: its backward runs through the same blocks as DTL's with M = 7)
    for tag, opts in (("lora", {}), ("lora+lora_blocks=7-12", {"lora_blocks": "7-12"})):
        total = measure(build("lora", **opts), images).total
        res.add("peft", "model", tag, args.batch, "float32", shape, total * mb, "MB")
        res.add("peft", "model", tag, args.batch, "float32", shape, total / full, "x_full")
        summary.append(f"peft      {tag:45s} model {total * mb:8.1f} MB = {total / full:.3f}x full")
    csn_ref = {}
    for method, backend, opts in configs:
        model = build(method, backend, adapt_from=7, **opts)
        rec = measure(model, images)
        provider = "reference" if backend == "reference" else "ours"
        tag = method + "".join(f"+{k}={str(v).replace('torch.', '')}" for k, v in opts.items())
        res.add(provider, "model", tag, args.batch, "float32", shape, rec.total * mb, "MB")
        res.add(provider, "model", tag, args.batch, "float32", shape, rec.total / full, "x_full")
        res.add(provider, "csn", tag, args.batch, "float32", shape, rec.csn_only * mb, "MB")
        line = (
            f"{provider:9s} {tag:45s} model {rec.total * mb:8.1f} MB"
            f" = {rec.total / full:.3f}x full;"
            f" CSN itself {rec.csn_only * mb:7.1f} MB"
        )
        if backend == "reference" and not opts:
            csn_ref[method] = rec.csn_only
        elif method in csn_ref:
            ratio = rec.csn_only / csn_ref[method]
            res.add(provider, "csn", tag, args.batch, "float32", shape, ratio, "x_reference")
            line += f" = {ratio:.3f}x reference"
        summary.append(line)
    res.write()
    print("\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
