"""estimate_memory: the fake-tensor simulation of two training steps against two real
ones, storage by storage (the live tensor bytes' peak), per backbone family, batch size,
method, precision and memory option."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dtl_kernels import create_model, estimate_memory
from dtl_kernels.estimate import _LiveBytes
from dtl_kernels.optim import adamw

# (timm name, image size, create_model options): small inputs, real architectures (ViT-B
# is ViT-S's code at another width: not a family of its own)
FAMILIES = [
    ("vit_small_patch16_224", 112, {"img_size": 112}),
    ("swin_tiny_patch4_window7_224", 224, {}),
    ("tf_efficientnet_lite0", 128, {}),
]


def real_peak(model, batch: int, size: int, precision: str = "fp32") -> int:
    """Peak live tensor bytes of two real AdamW steps (parameters and input excluded)."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = adamw(params, lr=1e-3)  # as dtl-train and the estimator build it
    x = torch.randn(batch, 3, size, size)
    y = torch.zeros(batch, dtype=torch.long)
    tracker = _LiveBytes(list(model.parameters()) + list(model.buffers()) + [x])
    with tracker:
        for _ in range(2):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                loss = F.cross_entropy(model(x).float(), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            del loss
    return tracker.peak


# each family with both methods and both batch sizes, in two of the four pairings: the
# fake-tensor simulation runs the same code at every batch size, and each real step of a
# Swin costs seconds of the test run's budget
VIT, SWIN, EFFICIENTNET = FAMILIES
STEPS = [(*VIT, 2, "dtl+"), (*VIT, 4, "full"), (*SWIN, 4, "dtl+"), (*SWIN, 2, "full"),
         (*EFFICIENTNET, 2, "dtl+"), (*EFFICIENTNET, 4, "full")]  # fmt: skip


@pytest.mark.parametrize("name,size,options,batch,method", STEPS,
                         ids=[f"{s[0]}-{s[3]}-{s[4]}" for s in STEPS])  # fmt: skip
def test_estimate_equals_a_real_step(name, size, options, batch, method, one_thread):
    torch.manual_seed(0)
    model = create_model(name, method, num_classes=10, **options)
    est = estimate_memory(model, batch, size)
    real = real_peak(model, batch, size)
    assert abs(est.training_peak - real) <= 0.01 * real, (est.training_peak, real)
    trainable = sum(p.numel() * p.element_size() for p in model.parameters() if p.requires_grad)
    assert est.parameters == sum(p.numel() * p.element_size() for p in model.parameters())
    assert est.optimizer_state in (0, 2 * trainable)  # AdamW's moments, if live at the peak
    assert est.activations > 0


@pytest.mark.parametrize(
    "options,precision",
    [({}, "bf16"), ({"checkpoint_tail": True}, "fp32"), ({"trunk_dtype": "bf16"}, "fp32"),
     ({"backbone_dtype": torch.bfloat16}, "fp32")],
)  # fmt: skip
def test_precision_and_memory_options(options, precision, one_thread):
    torch.manual_seed(0)
    model = create_model("vit_small_patch16_224", "dtl+", num_classes=10, img_size=112,
                         **options)  # fmt: skip
    est = estimate_memory(model, 4, 112, precision)
    assert abs(est.training_peak - real_peak(model, 4, 112, precision)) <= 0.01 * est.training_peak


def test_the_estimate_leaves_the_model_alone(one_thread):
    model = create_model("vit_small_patch16_224", "dtl", num_classes=3, img_size=112)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    est = estimate_memory(model, 2, 112)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert all(p.grad is None for p in model.parameters())
    assert "peak" in str(est) and est.peak == est.parameters + est.training_peak


def test_bad_arguments():
    model = create_model("vit_small_patch16_224", "dtl", num_classes=3, img_size=112)
    with pytest.raises(ValueError, match="batch_size"):
        estimate_memory(model, 0, 112)
    with pytest.raises(ValueError, match="precision"):
        estimate_memory(model, 2, 112, "fp8")
    with pytest.raises(ValueError, match="too large"):  # no int64 overflow inside torch
        estimate_memory(model, 10**30, 112)
    with pytest.raises(ValueError, match="maps images to logits"):  # not an image model
        estimate_memory(torch.nn.Linear(3, 3), 2, 112)
    with pytest.raises(TypeError, match="channels_last must be True or False, got 'no'"):
        estimate_memory(model, 2, 112, channels_last="no")  # was taken as True
    with pytest.raises(ValueError, match="num_classes=1000, but the model outputs 3"):
        estimate_memory(model, 2, 112, num_classes=1000)  # was ignored


def test_the_device_argument_names_the_models_device_or_says_where_it_is(one_thread):
    """``cpu:0`` / ``cpu:1`` are the CPU (CPU tensors carry no index: both failed inside
    the simulation with a message that blamed the model); another device type is refused
    naming where the model's tensors are."""
    model = create_model("vit_small_patch16_224", "dtl", num_classes=3, img_size=112)
    base = estimate_memory(model, 2, 112)
    for device in ("cpu", "cpu:0", "cpu:1", torch.device("cpu", 1)):
        assert estimate_memory(model, 2, 112, device=device) == base
    with pytest.raises(ValueError, match=r"on cpu, not on device=cuda"):
        estimate_memory(model, 2, 112, device="cuda")


def test_many_micro_batches_cost_two_and_give_their_peak(one_thread, monkeypatch):
    """grad_accum=10**6 simulated a million micro-batches a step (days); the peak is
    reached by the second, so two a step give it for any number."""
    from dtl_kernels import estimate

    model = create_model("vit_tiny_patch16_224", "dtl", num_classes=3, img_size=32)
    two = estimate_memory(model, 2, 32, grad_accum=2)
    forwards = []
    counted = estimate._logits
    monkeypatch.setattr(estimate, "_logits", lambda *a: forwards.append(1) or counted(*a))
    assert estimate_memory(model, 2, 32, grad_accum=50) == two
    assert len(forwards) == 4  # two steps of two micro-batches (100 before)


def test_dtl_train_estimate_memory(capsys):
    from dtl_kernels.train.cli import main

    code = main(["--model", "vit_small_patch16_224", "--method", "dtl+", "--img-size", "112",
                 "--batch-size", "4", "--pretrained", "none", "--estimate-memory"])  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0 and "estimated training memory: batch 4, 112 px, fp32" in out
    assert "activations and temporaries" in out and "peak" in out


def test_a_model_built_on_the_meta_device_gets_the_same_estimate(one_thread):
    """Shapes only (``device="meta"``, what a model too large for this machine needs):
    the fake copy puts the meta tensors on the simulated device; the prediction is the
    materialised model's, byte for byte (bf16 frozen and float32 trainable tensors)."""
    kw = dict(num_classes=10, img_size=112, backbone_dtype=torch.bfloat16, checkpoint_tail=True)
    real = create_model("vit_small_patch16_224", "dtl+", **kw)
    meta = create_model("vit_small_patch16_224", "dtl+", device="meta", **kw)
    assert all(p.is_meta for p in meta.parameters())
    a, b = estimate_memory(real, 4, 112, "bf16"), estimate_memory(meta, 4, 112, "bf16")
    assert (a.parameters, a.gradients, a.optimizer_state, a.activations) == (
        b.parameters, b.gradients, b.optimizer_state, b.activations)  # fmt: skip
    with pytest.raises(ValueError, match="real device"):
        estimate_memory(meta, 4, 112, device="meta")
