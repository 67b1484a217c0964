"""MultiTaskDTL: one shared trunk, outputs equal to the separate task models."""

import copy

import pytest
import timm
import torch

from dtl_kernels import DTLSwin, DTLViT, save_adapter
from dtl_kernels.models.multitask import MultiTaskDTL


def _vit_tasks(dtype):
    torch.manual_seed(0)
    bb = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0).to(dtype).eval()
    tasks = {}
    for t, (m, k) in enumerate([(7, 0), (7, 3), (3, 0), (12, 4), (1, 5)]):
        model = DTLViT(bb, adapt_from=m, conv_kernel=k, num_classes=3 + t).to(dtype).eval()
        for p in model.csn.up.values():
            torch.nn.init.normal_(p, std=0.5)
        tasks[f"task{t}"] = model
    tasks["probe"] = DTLViT(bb, side=False, num_classes=2).to(dtype).eval()
    return bb, tasks


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("batch_tails", [True, False])
def test_vit_equals_separate_models(dtype, batch_tails):
    bb, tasks = _vit_tasks(dtype)
    multi = MultiTaskDTL(bb, tasks, batch_tails=batch_tails).eval()
    x = torch.randn(3, 3, 64, 64, dtype=dtype)
    out = multi(x)
    assert set(out) == set(tasks)
    # float64: equal up to the summation order of a batched GEMM (bit equality held with 2
    # threads but not 1: BLAS blocks the batched tails differently)
    tol = dict(atol=1e-12, rtol=1e-12) if dtype == torch.float64 else dict(atol=1e-5, rtol=1e-4)
    for name, model in tasks.items():
        with torch.no_grad():
            torch.testing.assert_close(out[name], model(x), **tol)


def test_adapter_files_equal_models(tmp_path):
    bb, tasks = _vit_tasks(torch.float64)
    paths = {}
    for name, model in tasks.items():
        paths[name] = tmp_path / f"{name}.safetensors"
        save_adapter(model, paths[name])
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    from_models = MultiTaskDTL(bb, tasks).eval()(x)
    from_files = MultiTaskDTL(bb, paths).eval()(x)
    for name in tasks:
        torch.testing.assert_close(from_files[name], from_models[name], atol=0, rtol=0)


def test_swin_equals_separate_models():
    torch.manual_seed(0)
    bb = (
        timm.create_model(
            "swin_tiny_patch4_window7_224", img_size=112, window_size=7, num_classes=0
        )
        .double()
        .eval()
    )
    tasks = {}
    for t, (m, k) in enumerate([(8, 5), (10, 0), (5, 3)]):
        model = DTLSwin(bb, adapt_from=m, conv_kernel=k, num_classes=4).double().eval()
        for p in model.csn.up.values():
            torch.nn.init.normal_(p, std=0.5)
        tasks[str(t)] = model
    x = torch.randn(2, 3, 112, 112, dtype=torch.float64)
    out = MultiTaskDTL(bb, tasks).eval()(x)
    for name, model in tasks.items():
        with torch.no_grad():  # batched window attention reorders fp64 sums: ~1e-16
            torch.testing.assert_close(out[name], model(x), atol=1e-12, rtol=1e-12)


def test_bad_tasks_are_clear_errors(tmp_path):
    bb, tasks = _vit_tasks(torch.float32)
    with pytest.raises(ValueError, match="at least one task"):
        MultiTaskDTL(bb, {})
    with pytest.raises(TypeError, match="adapter path or a DTL model"):
        MultiTaskDTL(bb, {"x": 3})
    with pytest.raises(TypeError, match="map task names .* got a list"):
        MultiTaskDTL(bb, list(tasks.values()))
    one = next(iter(tasks.values()))
    for name in (1, "", "a.b"):  # torch's ModuleDict refused these with its own messages
        with pytest.raises(ValueError, match="task names must be non-empty text without"):
            MultiTaskDTL(bb, {name: one})
    other = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0).eval()
    foreign = DTLViT(other, num_classes=3)
    with pytest.raises(ValueError, match="differs from the shared one"):
        MultiTaskDTL(bb, {"foreign": foreign})
    deeper = timm.create_model("vit_small_patch16_224", img_size=64, num_classes=0)
    path = tmp_path / "small.safetensors"
    save_adapter(DTLViT(deeper, num_classes=3), path)
    with pytest.raises(ValueError, match="does not fit"):
        MultiTaskDTL(bb, {"small": path})
    full = DTLViT(bb, side=False, train_backbone=True, num_classes=3)
    with pytest.raises(ValueError, match="whole backbone"):
        MultiTaskDTL(bb, {"full": full})


def test_a_refused_adapter_leaves_the_backbone_as_it_was(tmp_path):
    """The fingerprint is checked on the wrapped model, and wrapping removed the caller's
    classifier and froze the backbone: a refusal left it so (a review's finding). Also
    when an earlier task of the same MultiTaskDTL had loaded."""
    from dtl_kernels.models.pretrained import model_from_adapter

    torch.manual_seed(0)
    make = lambda classes: timm.create_model(  # noqa: E731
        "vit_tiny_patch16_224", img_size=32, num_classes=classes
    )
    foreign = tmp_path / "foreign.safetensors"
    save_adapter(DTLViT(make(0), num_classes=3), foreign)  # other random weights
    bb = make(10)
    own = tmp_path / "own.safetensors"
    save_adapter(DTLViT(copy.deepcopy(bb), num_classes=3), own)  # bb's weights; bb untouched
    flags = [p.requires_grad for p in bb.parameters()]
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        logits = bb(x)
    for refused in (lambda: model_from_adapter(foreign, bb),
                    lambda: MultiTaskDTL(bb, {"own": own, "foreign": foreign})):  # fmt: skip
        with pytest.raises(ValueError, match="trained on other backbone weights"):
            refused()
        assert bb.num_classes == 10 and [p.requires_grad for p in bb.parameters()] == flags
        with torch.no_grad():
            assert torch.equal(bb(x), logits)


def test_a_backbone_kept_in_bf16_takes_float32_images():
    """backbone_dtype: the single model casts the images to the backbone's dtype; the
    shared trunk did not ("Input type (float) and bias type (BFloat16)" at the stem)."""
    from dtl_kernels import create_model

    torch.manual_seed(0)
    model = create_model("vit_tiny_patch16_224", "dtl+", num_classes=3, img_size=32,
                         backbone_dtype=torch.bfloat16).eval()  # fmt: skip
    for p in model.csn.up.values():
        torch.nn.init.normal_(p, std=0.5)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(MultiTaskDTL(model.backbone, {"a": model}).eval()(x)["a"],
                                   model(x), rtol=0, atol=0)  # fmt: skip


def test_reserved_names_and_no_task_left_are_named():
    bb, tasks = _vit_tasks(torch.float32)
    one = next(iter(tasks.values()))
    for name in ("training", "keys", "forward"):  # torch's KeyError("attribute … exists")
        with pytest.raises(ValueError, match=f"task name '{name}' is reserved"):
            MultiTaskDTL(bb, {name: one})
    multi = MultiTaskDTL(bb, {"a": one}).eval()
    del multi.tasks["a"]
    with pytest.raises(ValueError, match="no task left"):  # a bare StopIteration before
        multi(torch.randn(1, 3, 64, 64))


def test_backbone_head_tasks_are_refused(tmp_path):
    bb, _ = _vit_tasks(torch.float32)
    own_head = DTLViT(bb, head="backbone", num_classes=4)
    with pytest.raises(ValueError, match="head='backbone'"):
        MultiTaskDTL(bb, {"own": own_head})
    path = tmp_path / "own.safetensors"
    save_adapter(own_head, path)
    other = timm.create_model("vit_tiny_patch16_224", img_size=64, num_classes=0)
    with pytest.raises(ValueError, match="head='backbone'"):
        MultiTaskDTL(other, {"own": path})
    assert other.num_classes == 0  # refused before anything touched the shared backbone


@pytest.mark.parametrize(
    "name,kwargs,size",
    [("eva02_tiny_patch14_224", dict(img_size=56), 56),
     ("swinv2_tiny_window8_256", dict(img_size=64, window_size=2), 64),
     ("resnet18", {}, 64), ("convnext_atto", {}, 64)],
)  # fmt: skip
def test_other_families_equal_separate_models(name, kwargs, size):
    """Every wrapper family serves tasks through the same shared walk."""
    from dtl_kernels.models.build import wrapper_for

    torch.manual_seed(0)
    bb = timm.create_model(name, num_classes=0, **kwargs).double().eval()
    cls = wrapper_for(bb)
    tasks = {}
    for t, k in enumerate([0, 3]):
        model = cls(bb, conv_kernel=k, num_classes=3 + t).double().eval()
        for p in model.csn.up.values():
            torch.nn.init.normal_(p, std=0.5)
        tasks[f"t{t}"] = model
    x = torch.randn(2, 3, size, size, dtype=torch.float64)
    out = MultiTaskDTL(bb, tasks).eval()(x)
    for task, model in tasks.items():
        with torch.no_grad():
            torch.testing.assert_close(out[task], model(x), atol=1e-12, rtol=1e-12)
