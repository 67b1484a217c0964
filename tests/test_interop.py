"""Other frameworks (issue 20, item 6): ONNX and ``torch.export`` take the reference
formulation of the side op on their own and match the eager model; Hugging Face's
``Trainer`` checkpoints hold only the adapter (:class:`AdapterTrainer`)."""

from __future__ import annotations

import pytest
import torch

from dtl_kernels import create_model, load_adapter
from dtl_kernels.ops import side

pytestmark = pytest.mark.filterwarnings(
    "ignore::torch.jit.TracerWarning", "ignore:Constant folding"
)
VIT = "vit_tiny_patch16_224"


@pytest.fixture
def model():
    torch.manual_seed(0)
    m = create_model(VIT, "dtl+", 3, img_size=32, adapt_from=10).eval()
    for p in m.csn.parameters():  # B = 0 at init: make the side network count
        torch.nn.init.normal_(p, std=0.05)
    return m


def test_onnx_export_runs_the_reference_formulation(model, tmp_path):
    ort = pytest.importorskip("onnxruntime")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
    path = tmp_path / "dtl.onnx"
    torch.onnx.export(model, (x,), str(path), dynamo=False, input_names=["images"],
                      output_names=["logits"], dynamic_axes={"images": {0: "batch"}})  # fmt: skip
    assert b"dtl_kernels" not in path.read_bytes()  # no custom op in the graph
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    out = session.run(None, {"images": x.numpy()})[0]
    torch.testing.assert_close(torch.from_numpy(out), eager, rtol=1e-4, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(x), eager, rtol=0, atol=0)  # eager model untouched


def test_torch_export_runs_the_reference_formulation(model):
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        eager = model(x)
    exported = torch.export.export(model, (x,))
    assert not [n for n in exported.graph.nodes if "dtl_kernels" in str(n.target)]
    torch.testing.assert_close(exported.module()(x), eager, rtol=1e-5, atol=1e-6)
    with torch.no_grad():  # the eager model is untouched by the export (real tensors, same values)
        torch.testing.assert_close(model(x), eager, rtol=0, atol=0)


@pytest.mark.parametrize("exporter", ["onnx", "torch.export"])
def test_auto_picks_the_reference_while_exporting(monkeypatch, exporter):
    x = torch.randn(4, 8)
    if exporter == "onnx":
        monkeypatch.setattr(torch.onnx, "is_in_onnx_export", lambda: True)
    else:
        monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    assert side.select(x) == "reference"
    assert side.select(x, "cpu") == "cpu"  # a backend asked for by name stays asked for


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # torch's, for timm's SDPA
@pytest.mark.parametrize("method, trunk_dtype", [("dtl", None), ("dtl+", None),
                                                 ("dtl+", "bfloat16")])  # fmt: skip
def test_functorch_transforms_run_the_reference_formulation(method, trunk_dtype):
    """``torch.func.vmap`` / ``grad`` (per-sample gradients): ``auto`` takes the reference
    formulation there (the fused ops have no batching rule, and a C++ autograd function
    cannot run under these transforms: both raised); the eager model keeps its fused
    backend after (the selection under a transform is not remembered). With bf16 trunk
    taps too (their autograd function raised under the transforms)."""
    from torch.func import functional_call, grad, vmap

    torch.manual_seed(0)
    m = create_model(VIT, method, 3, img_size=32, adapt_from=10, trunk_dtype=trunk_dtype)
    m.eval()
    for p in m.csn.parameters():  # B = 0 at init: make the side network count
        torch.nn.init.normal_(p, std=0.05)
    x, y = torch.randn(3, 3, 32, 32), torch.tensor([0, 1, 2])
    with torch.no_grad():
        eager = m(x)
        mapped = vmap(lambda xi: m(xi[None])[0])(x)
    torch.testing.assert_close(mapped, eager, rtol=1e-5, atol=1e-6)
    params = {k: v.detach() for k, v in m.named_parameters() if v.requires_grad}

    def loss(p, xi, yi):
        return torch.nn.functional.cross_entropy(functional_call(m, p, (xi[None],)), yi[None])

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(len(x)):  # each against the fused backward of that image alone
        m.zero_grad()
        torch.nn.functional.cross_entropy(m(x[i : i + 1]), y[i : i + 1]).backward()
        for name, p in m.named_parameters():
            if p.requires_grad:
                torch.testing.assert_close(per_sample[name][i], p.grad, rtol=1e-4, atol=1e-6)
    assert m.csn._select_backend(x) == side.select(x) != "reference"  # fused, plain eager


def test_hf_trainer_checkpoints_hold_only_the_adapter(model, tmp_path):
    pytest.importorskip("transformers")
    from transformers import TrainingArguments

    from dtl_kernels.integrations.hf_trainer import AdapterTrainer

    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": i % 3}
            for i in range(8)]  # fmt: skip
    model.train()
    args = TrainingArguments(
        output_dir=str(tmp_path / "hf"), max_steps=2, save_steps=1, per_device_train_batch_size=4,
        learning_rate=1e-2, report_to=[], use_cpu=True, disable_tqdm=True, logging_strategy="no",
        save_strategy="steps", dataloader_num_workers=0,
    )  # fmt: skip
    trainer = AdapterTrainer(model=model, args=args, train_dataset=data, eval_dataset=data)
    trainer.train()
    for step in (1, 2):
        folder = tmp_path / "hf" / f"checkpoint-{step}"
        names = {p.name for p in folder.iterdir()}
        assert "adapter.safetensors" in names, names
        assert not names & {"model.safetensors", "pytorch_model.bin"}, names
        assert (folder / "adapter.safetensors").stat().st_size < 200_000
    assert trainer.evaluate()["eval_loss"] > 0  # logits and labels reach the evaluation
    fresh = create_model(VIT, "dtl+", 3, img_size=32, adapt_from=10)
    fresh.backbone.load_state_dict(model.backbone.state_dict())
    load_adapter(fresh, tmp_path / "hf" / "checkpoint-2" / "adapter.safetensors")
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(fresh.eval()(x), model.eval()(x))


def test_hf_trainer_unwraps_what_it_saves_and_loads_and_refuses_other_models(model, tmp_path):
    """A DataParallel-wrapped DTL model: checkpoints written and read back (resume) through
    the model inside (a torch.compile'd one takes the same path, keep_torch_compile=False:
    checked by hand, ~40 s of compiling here); a model that is no DTL model: refused at
    once, not at the first checkpoint."""
    pytest.importorskip("transformers")
    import timm
    from transformers import TrainingArguments

    from dtl_kernels.integrations.hf_trainer import AdapterTrainer

    g = torch.Generator().manual_seed(0)
    data = [{"pixel_values": torch.randn(3, 32, 32, generator=g), "labels": i % 3}
            for i in range(8)]  # fmt: skip

    def args(name, steps):
        return TrainingArguments(
            output_dir=str(tmp_path / name), max_steps=steps, save_steps=1,
            per_device_train_batch_size=4, learning_rate=1e-2, report_to=[], use_cpu=True,
            disable_tqdm=True, logging_strategy="no", save_strategy="steps",
            dataloader_num_workers=0,
        )  # fmt: skip

    for name, wrap in (("dp", torch.nn.DataParallel),):
        wrapped = wrap(model.train())
        AdapterTrainer(model=wrapped, args=args(name, 1), train_dataset=data).train()
        resumed = AdapterTrainer(model=wrapped, args=args(name, 2), train_dataset=data)
        resumed.train(resume_from_checkpoint=str(tmp_path / name / "checkpoint-1"))
        assert (tmp_path / name / "checkpoint-2" / "adapter.safetensors").is_file()
    plain = timm.create_model(VIT, pretrained=False, img_size=32, num_classes=3)
    with pytest.raises(TypeError, match="AdapterTrainer trains DTL models"):
        AdapterTrainer(model=plain, args=args("plain", 1), train_dataset=data)
