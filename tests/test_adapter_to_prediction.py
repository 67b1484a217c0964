"""From an adapter file to predictions (issue 20, items 1 and 2): the adapter records what
predicting needs; ``--eval-only --adapter`` needs nothing else and reads only the test
split; a flag that contradicts the adapter, or what an older adapter lacks, is named;
``from_pretrained`` / ``create_model(adapter=)`` rebuild the model; ``dtl-predict`` writes
the trainer's own predictions."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from timm.data import resolve_model_data_config

from dtl_kernels import AdapterError, create_model, from_pretrained, read_adapter, save_adapter
from dtl_kernels.predict import Predictor
from dtl_kernels.predict_cli import main as predict
from dtl_kernels.train.cli import main as train

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM backbone")
VIT = "vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory):
    """One epoch of DTL+ on the toy folder, from a backbone checkpoint on disk."""
    root = tmp_path_factory.mktemp("trained")
    torch.manual_seed(1)
    backbone = create_model(VIT, "linear", num_classes=3, img_size=32).backbone
    weights = root / "backbone.pth"
    torch.save({"state_dict": backbone.state_dict()}, weights)
    out = root / "run"
    argv = ["--model", VIT, "--pretrained", str(weights), "--img-size", "32", "--method", "dtl+",
            "--adapt-from", "11", "--data-root", str(toy), "--epochs", "1", "--batch-size", "4",
            "--output", str(out), "--cache-trunk", "off"]  # fmt: skip
    assert train(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    return {"adapter": out / "adapter.safetensors", "weights": weights, "summary": summary}


def test_adapter_records_what_predicting_needs(trained, toy):
    _, meta = read_adapter(trained["adapter"])
    assert meta["format"] == "dtl_kernels.adapter/3" and meta["dtl_kernels_version"]
    model = json.loads(meta["model"])
    assert model == {"library": "timm", "name": VIT, "options": {"img_size": 32},
                     "pretrained": str(trained["weights"].resolve())}  # fmt: skip
    prep = json.loads(meta["preprocessing"])
    assert prep == {"input_size": [3, 32, 32], "interpolation": "bicubic", "crop_pct": 1.0,
                    "crop_mode": "squash", "mean": [0.5] * 3, "std": [0.5] * 3}  # fmt: skip
    assert json.loads(meta["classes"]) == ["class0", "class1", "class2"]  # folder order
    training = json.loads(meta["training"])
    assert training == {"dataset": "folder", "data_root": str(Path(toy).resolve()),
                        "test_split": "test"}  # fmt: skip
    assert len(meta["backbone_sha256"]) == 64


def test_eval_only_needs_only_the_adapter(trained, tmp_path, capsys, monkeypatch):
    from dtl_kernels.train import data

    read = []
    real = data.scan_folder
    monkeypatch.setattr(data, "scan_folder", lambda root: read.append(root.name) or real(root))
    capsys.readouterr()
    out = tmp_path / "eval"
    assert train(["--eval-only", "--adapter", str(trained["adapter"]), "--output", str(out)]) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["test_acc"] == pytest.approx(trained["summary"]["test_acc"], abs=1e-9)
    assert read == ["test"] and s["train_images"] is None  # the training split is not read
    printed = capsys.readouterr().out
    assert printed.count("accuracy") == 1 and "adapter.safetensors)" not in printed
    assert sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) == ["summary.json"]


@pytest.mark.parametrize(
    "flags,named",
    [
        (["--img-size", "64"], "--img-size 64: adapter .* was trained at 32 px; drop --img-size"),
        (
            ["--model", "vit_small_patch16_224"],
            "--model vit_small_patch16_224: .*trained on " + VIT,
        ),
        (["--normalize", "imagenet"], "--normalize imagenet: .*drop --normalize"),
        (["--crop-mode", "center"], "--crop-mode center: .*drop --crop-mode"),
    ],
)
def test_eval_only_mismatch_names_the_flag(trained, tmp_path, capsys, flags, named):
    argv = ["--eval-only", "--adapter", str(trained["adapter"]), "--output", str(tmp_path / "e")]
    assert train(argv + flags) == 2  # an option error: nothing was started
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("dtl-train: error:"), err
    assert re.search(named, err[0]), err[0]


def _as_schema_2(src: Path, dst: Path) -> Path:
    """The adapter as an older version wrote it: no model, preprocessing, classes, data."""
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    for key in ("model", "preprocessing", "classes", "training"):
        meta.pop(key, None)
    meta["format"] = "dtl_kernels.adapter/2"
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_older_adapters_load_and_ask_for_what_they_lack(trained, toy, tmp_path, capsys):
    old = _as_schema_2(trained["adapter"], tmp_path / "old.safetensors")
    argv = ["--eval-only", "--adapter", str(old), "--output", str(tmp_path / "e1"),
            "--pretrained", str(trained["weights"])]  # fmt: skip
    assert train(argv) == 2  # the ViT's size comes from its grid; the data is not recorded
    assert "does not record its dataset: pass --dataset" in capsys.readouterr().err
    ok = argv + ["--dataset", "folder", "--data-root", str(toy)]
    assert train(ok) == 0  # model from the backbone's identity, size from its token grid
    s = json.loads((tmp_path / "e1" / "summary.json").read_text())
    assert s["test_acc"] == pytest.approx(trained["summary"]["test_acc"], abs=1e-9)
    cnn = create_model("tf_efficientnet_lite0", "dtl", num_classes=3)  # no grid: no size
    path = _as_schema_2(save_adapter(cnn, tmp_path / "cnn.safetensors"), tmp_path / "c.safetensors")
    argv = ["--eval-only", "--adapter", str(path), "--dataset", "folder", "--data-root", str(toy),
            "--pretrained", "none", "--output", str(tmp_path / "e2")]  # fmt: skip
    assert train(argv) == 2
    assert "does not record its image size (schema dtl_kernels.adapter/2): pass --img-size" in (
        capsys.readouterr().err
    )


def test_from_pretrained_rebuilds_the_model(trained):
    model = from_pretrained(trained["adapter"])
    again = create_model(adapter=trained["adapter"])
    assert model.class_names == ["class0", "class1", "class2"] and not model.training
    cfg = resolve_model_data_config(model)  # timm's own reading of the model
    assert cfg["input_size"] == (3, 32, 32) and cfg["crop_pct"] == 1.0
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(model(x), again.eval()(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match="drop \\['method'\\]"):
        create_model(adapter=trained["adapter"], method="dtl")
    with pytest.raises(ValueError, match="was trained on 'vit_tiny_patch16_224', not"):
        create_model("vit_small_patch16_224", adapter=trained["adapter"])


def test_dtl_predict_gives_the_trainers_predictions(trained, toy, tmp_path, capsys):
    out = tmp_path / "p.csv"
    argv = [str(toy / "test"), "--adapter", str(trained["adapter"]), "--top-k", "2",
            "--batch-size", "4", "--output", str(out)]  # fmt: skip
    assert predict(argv) == 0
    rows = list(csv.DictReader(out.open()))
    files = sorted((toy / "test").rglob("*.png"))
    assert [r["path"] for r in rows] == [str(f) for f in files]
    assert list(rows[0]) == ["path", "class_1", "prob_1", "class_2", "prob_2"]
    # the probabilities the trainer's model gives the trainer's own test tensors
    from dtl_kernels.train import make_config
    from dtl_kernels.train.data import build_datasets
    from dtl_kernels.train.transforms import Preprocessing

    model = from_pretrained(trained["adapter"])
    prep = Preprocessing.from_data_config(resolve_model_data_config(model))
    _, test, _ = build_datasets(make_config({"dataset": "folder", "data_root": str(toy)}), prep)
    with torch.no_grad():
        probs = model(torch.stack([test[i][0] for i in range(len(test))])).softmax(-1)
    order = {str(p): i for i, p in enumerate(test.paths)}
    for r in rows:
        top = probs[order[r["path"]]].topk(2)
        assert [r["class_1"], r["class_2"]] == [model.class_names[i] for i in top.indices]
        assert float(r["prob_1"]) == pytest.approx(float(top.values[0]), abs=2e-6)
    right = sum(r["class_1"] == Path(r["path"]).parent.name for r in rows)
    assert right / len(rows) == pytest.approx(trained["summary"]["test_acc"], abs=1e-9)
    # the same through Python, to the standard output, and errors as one line
    assert (
        Predictor.from_adapter(trained["adapter"]).predict(files[:1])[0][0][0] == rows[0]["class_1"]
    )
    # computed in inference mode, returned as an ordinary tensor (in-place edits allowed)
    got = Predictor.from_adapter(trained["adapter"], batch_size=3).probabilities(files[:5])
    assert not got.is_inference() and got.shape == (5, len(model.class_names))
    torch.testing.assert_close(got, probs[[order[str(f)] for f in files[:5]]], rtol=0, atol=2e-6)
    got.mul_(1.0)
    capsys.readouterr()
    assert predict([str(files[0]), "--adapter", str(trained["adapter"])]) == 0
    assert capsys.readouterr().out.splitlines()[1].startswith(str(files[0]) + ",")
    assert predict([str(tmp_path / "nothing.png"), "--adapter", str(trained["adapter"])]) == 1
    assert predict([str(files[0]), "--adapter", str(trained["adapter"]), "--top-k", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"dtl-predict: error: no such image or folder: {tmp_path / 'nothing.png'}",
                   "dtl-predict: error: --top-k and --batch-size must be ≥ 1"]  # fmt: skip


def test_moved_backbone_weights_are_asked_for(trained, tmp_path, capsys):
    with safe_open(str(trained["adapter"]), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    model = json.loads(meta["model"])
    meta["model"] = json.dumps({**model, "pretrained": str(tmp_path / "gone" / "backbone.pth")})
    moved = tmp_path / "moved.safetensors"
    save_file(tensors, str(moved), metadata=meta)
    argv = ["--eval-only", "--adapter", str(moved), "--output", str(tmp_path / "e")]
    assert train(argv) == 2
    assert "which are not there now: pass --pretrained PATH" in capsys.readouterr().err
    assert train(argv + ["--pretrained", str(trained["weights"])]) == 0


def _with_metadata(src: Path, dst: Path, **changes) -> Path:
    with safe_open(str(src), framework="pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}
    meta.update({k: json.dumps(v) for k, v in changes.items()})
    save_file(tensors, str(dst), metadata=meta)
    return dst


def test_dtl_predict_never_writes_over_what_it_reads_and_fails_in_one_line(
    trained, toy, tmp_path, capsys
):
    """--output: an existing file only with --overwrite; never the adapter, the weights or
    an image (even with it); a folder or an unwritable place: one error line, no traceback,
    the earlier file untouched."""
    adapter = tmp_path / "a.safetensors"
    adapter.write_bytes(trained["adapter"].read_bytes())
    image = sorted((toy / "test").rglob("*.png"))[0]
    base = [str(image), "--adapter", str(adapter), "--pretrained", str(trained["weights"])]
    out = tmp_path / "p.csv"
    out.write_text("earlier")
    assert predict(base + ["--output", str(out)]) == 1
    assert out.read_text() == "earlier"
    assert predict(base + ["--output", str(out), "--overwrite"]) == 0
    assert out.read_text().startswith("path,class_1,prob_1\n")
    longest = tmp_path / ("p" * 251 + ".csv")  # 255 bytes: its temporary name was too long
    assert predict(base + ["--output", str(longest)]) == 0 and longest.read_text() == (
        out.read_text()
    )
    kept = {p: p.read_bytes() for p in (adapter, image, trained["weights"])}
    for target in kept:
        assert predict(base + ["--output", str(target), "--overwrite"]) == 1
    assert all(p.read_bytes() == b for p, b in kept.items())
    assert predict(base + ["--output", str(tmp_path)]) == 1
    assert predict(base + ["--output", "/proc/dtl-predict.csv"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 6 and all(line.startswith("dtl-predict: error: ") for line in err)
    assert f"--output {out} exists: pass --overwrite" in err[0]
    assert "is the adapter, the backbone weights or an image" in err[1]
    assert f"--output {tmp_path} is a folder" in err[4]


def test_dtl_predict_keeps_undecodable_file_names_as_bytes(trained, toy, tmp_path, capsysbinary):
    """A file name that is not UTF-8 (Linux allows any bytes) comes out as its own bytes,
    on the standard output and in a file, instead of an encoding error."""
    import os

    folder = tmp_path / "imgs"
    folder.mkdir()
    src = sorted((toy / "test").rglob("*.png"))[0]
    odd = os.path.join(os.fsencode(folder), b"bad\xff.png")
    with open(odd, "wb") as f:
        f.write(src.read_bytes())
    argv = [str(folder), "--adapter", str(trained["adapter"])]
    assert predict(argv) == 0
    assert b"bad\xff.png," in capsysbinary.readouterr().out
    assert predict(argv + ["--output", str(tmp_path / "p.csv")]) == 0
    assert b"bad\xff.png," in (tmp_path / "p.csv").read_bytes()


def test_dtl_predict_reads_every_image_header_before_the_model(
    trained, toy, tmp_path, capsys, monkeypatch
):
    """A truncated image among good ones is named before the model is built."""
    from dtl_kernels import predict as predict_module

    folder = tmp_path / "imgs"
    folder.mkdir()
    for i, src in enumerate(sorted((toy / "test").rglob("*.png"))[:3]):
        (folder / f"{i}.png").write_bytes(src.read_bytes())
    (folder / "3.png").write_bytes(b"\x89PNG\r\n")  # truncated
    monkeypatch.setattr(predict_module.Predictor, "from_adapter",
                        lambda *a, **k: pytest.fail("the model was built"))  # fmt: skip
    assert predict([str(folder), "--adapter", str(trained["adapter"])]) == 1
    assert f"cannot read image {folder / '3.png'}" in capsys.readouterr().err


def _outcome_unblocked(call, fifo: Path, seconds: float = 60.0):
    """``call()``'s result or exception, run in a thread; a failure if it is still running
    after ``seconds`` (blocked opening ``fifo``: a writer that closes at once ends the
    wait, so the test fails instead of hanging)."""
    import threading

    box = []

    def run():
        try:
            box.append(call())
        except Exception as exc:  # noqa: BLE001 — the outcome is what is tested
            box.append(exc)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    if thread.is_alive():
        with contextlib.suppress(OSError):
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        thread.join(seconds)
        pytest.fail(f"still running after {seconds:g} s: it opened the FIFO {fifo} to read")
    return box[0]


def test_a_fifo_named_like_an_image_is_refused_not_read(trained, toy, tmp_path, capsys):
    """Predictor.predict blocked forever opening a FIFO given as an image (as did training's
    header check of a listed file); dtl-predict called an existing FIFO 'no such image'."""
    from dtl_kernels.train.data import DataError, check_image_header

    pipe = tmp_path / "pipe.png"
    os.mkfifo(pipe)
    ok = sorted((toy / "test").rglob("*.png"))[0]
    predictor = Predictor.from_adapter(trained["adapter"])
    for call in (lambda: predictor.predict([ok, pipe]), lambda: check_image_header(pipe)):
        got = _outcome_unblocked(call, pipe)
        assert isinstance(got, DataError), got
        assert f"{pipe} is not a regular file" in str(got)
    assert predict([str(ok), str(pipe), "--adapter", str(trained["adapter"])]) == 1
    assert f"error: not a regular file or folder: {pipe}" in capsys.readouterr().err


def test_a_fifo_swapped_in_after_the_check_by_name_is_refused_not_read(tmp_path, monkeypatch):
    """opened_image asked the name whether it was a regular file and then opened it: a FIFO
    put in its place between the two blocked the open forever. The open descriptor is
    checked now (the check by name is made to pass here, as if the swap came after it)."""
    from dtl_kernels.train import data

    pipe = tmp_path / "swapped.png"
    os.mkfifo(pipe)
    monkeypatch.setattr(data.os.path, "isfile", lambda _: True)
    for call in (lambda: data.check_image_header(pipe), lambda: data.load_image(pipe, 16)):
        got = _outcome_unblocked(call, pipe)
        assert isinstance(got, data.DataError), got
        assert f"{pipe} is not a regular file" in str(got)


def test_an_image_path_with_a_nul_byte_is_not_called_a_fifo():
    from dtl_kernels.train import data

    with pytest.raises(data.DataError, match="ValueError: embedded null byte"):
        data.check_image_header("bad\0name.png")


def test_dtl_predict_refuses_a_strip_before_the_model_where_the_crop_keeps_aspect(
    trained, toy, tmp_path, capsys, monkeypatch
):
    """The header pre-check ignored the crop mode: with a center crop (aspect kept) a
    6500x100 image was refused only after the model was built and earlier batches were
    predicted. Now by the recorded crop before the model; for an adapter recording none,
    by timm's default once the model is built, before any image is predicted."""
    from PIL import Image

    from dtl_kernels import predict as predict_module

    folder = tmp_path / "imgs"
    folder.mkdir()
    (folder / "0.png").write_bytes(sorted((toy / "test").rglob("*.png"))[0].read_bytes())
    Image.new("RGB", (6500, 100)).save(folder / "1_strip.png")
    prep = json.loads(read_adapter(trained["adapter"])[1]["preprocessing"])
    center = _with_metadata(trained["adapter"], tmp_path / "center.safetensors",
                            preprocessing={**prep, "crop_mode": "center"})  # fmt: skip
    real = predict_module.Predictor.from_adapter
    monkeypatch.setattr(predict_module.Predictor, "from_adapter",
                        lambda *a, **k: pytest.fail("the model was built"))  # fmt: skip
    argv = [str(folder), "--pretrained", str(trained["weights"]), "--adapter"]
    assert predict(argv + [str(center)]) == 1
    assert "1_strip.png: ValueError: 6500x100 pixels: more than 64 times" in (
        capsys.readouterr().err
    )
    monkeypatch.setattr(predict_module.Predictor, "from_adapter", real)
    monkeypatch.setattr(predict_module.Predictor, "probabilities",
                        lambda *a, **k: pytest.fail("images were predicted"))  # fmt: skip
    old = _as_schema_2(trained["adapter"], tmp_path / "old.safetensors")  # timm's: center
    from dtl_kernels.train import data as data_module

    opened, opener = [], data_module.opened_image
    monkeypatch.setattr(data_module, "opened_image", lambda p: opened.append(p) or opener(p))
    with pytest.warns(UserWarning, match="records no preprocessing"):
        assert predict(argv + [str(old)]) == 1
    assert len(opened) == 2  # each header read once: the strip judged from its size
    assert "1_strip.png: ValueError: 6500x100 pixels: more than 64 times" in (
        capsys.readouterr().err
    )
    monkeypatch.undo()
    assert predict(argv + [str(trained["adapter"])]) == 0  # squash: the strip is read


def test_predictor_refuses_what_is_no_prediction(trained):
    """No head (features only): refused when the Predictor is made; non-finite outputs
    (weights that overflow): refused, naming images, not written as probabilities."""
    model = from_pretrained(trained["adapter"])
    files = sorted(Path(json.loads(read_adapter(trained["adapter"])[1]["training"])["data_root"])
                   .joinpath("test").rglob("*.png"))[:4]  # fmt: skip
    with torch.no_grad():
        model.head.weight.fill_(3e38)  # finite, but the logits overflow
    with pytest.raises(ValueError, match=r"4 of 4 images got non-finite outputs \(e\.g\. "):
        Predictor(model).probabilities(files)
    good = Predictor(from_pretrained(trained["adapter"]))
    for one in (str(files[0]), files[0]):  # one image, not a list: not read letter by letter
        with pytest.raises(TypeError, match="a list of paths or PIL images, got one"):
            good.predict(one)
    for k in (0, 2.7, "2", True):
        with pytest.raises(ValueError, match="top_k must be a whole number"):
            good.predict(files[:1], top_k=k)
    want = good.probabilities(files)
    for dtype, tol in ((torch.float64, 1e-5), (torch.bfloat16, 0.05)):  # a model cast whole
        cast = Predictor(from_pretrained(trained["adapter"]).to(dtype))
        torch.testing.assert_close(cast.probabilities(files), want, rtol=0, atol=tol)
    import numpy as np

    assert good.predict(np.array([str(f) for f in files[:2]])) == good.predict(files[:2])
    with pytest.raises(ValueError, match="takes 1-channel images"):
        Predictor(create_model(VIT, "dtl", num_classes=3, img_size=32, in_chans=1))
    features = create_model(VIT, "dtl", num_classes=0, img_size=32)
    with pytest.raises(ValueError, match="no classifier head"):
        Predictor(features)
    for odd, named in ((np.zeros((64, 64)), "ndarray"), (None, "NoneType"), (3, "int")):
        with pytest.raises(TypeError, match=f"paths or PIL images, got {named} among them"):
            good.predict([files[0], odd])
    with pytest.raises(TypeError, match="conv_kernel must be an int, got str"):
        create_model(VIT, "dtl+", num_classes=3, img_size=32, conv_kernel="3")
    for value in ("no", -1, None):  # truthy text or numbers switched the option on
        with pytest.raises(TypeError, match="checkpoint_tail must be True or False"):
            create_model(VIT, "dtl", num_classes=3, img_size=32, checkpoint_tail=value)
    for name, value in (("num_classes", 10**12), ("conv_kernel", 10**6), ("rank", 10**7)):
        kw = {"num_classes": 3, name: value}  # refused before a byte is allocated
        with pytest.raises(ValueError, match=f"{name} must be ≤ "):
            create_model(VIT, "dtl+", img_size=32, device="meta", **kw)
    # class names out of step with the head: named, not an IndexError (helper 4)
    model = from_pretrained(trained["adapter"])
    model.class_names = ["a", "b"]
    with pytest.raises(ValueError, match="2 class names for a model of 3 outputs"):
        Predictor(model).predict(files[:1])
    model.class_names = "abc"
    with pytest.raises(TypeError, match="a list of names, got one string"):
        Predictor(model)
    # a model put back in training mode after the Predictor was made still predicts in eval
    model.class_names = None
    again = Predictor(model)
    model.train()
    torch.testing.assert_close(again.probabilities(files), want, rtol=0, atol=1e-6)
    assert not model.training  # (with drop path, training mode would randomise the outputs)


def test_a_hostile_model_record_is_refused_before_it_is_built(trained, tmp_path, monkeypatch):
    """The adapter's model record is checked against the backbone it records on the meta
    device: another size or another model is refused before any real build; options the
    architecture does not take are an AdapterError naming them."""
    from dtl_kernels.models import pretrained as P

    monkeypatch.setattr(P, "timm_backbone", lambda *a, **k: pytest.fail("built for real"))
    model = json.loads(read_adapter(trained["adapter"])[1]["model"])
    cases = [
        ({**model, "options": {"img_size": 8192}}, "backbone.grid: file has"),
        ({**model, "name": "vit_base_patch16_224"}, "does not build the backbone"),
        ({**model, "name": "resnet18"}, "cannot be built: TypeError.*img_size"),
        ({**model, "name": "resnet18", "options": {}}, "does not fit this ResNet"),
    ]
    for i, (record, match) in enumerate(cases):
        path = _with_metadata(trained["adapter"], tmp_path / f"h{i}.safetensors", model=record)
        with pytest.raises(ValueError, match=match):
            from_pretrained(path)


def test_an_adapter_without_preprocessing_warns(trained, tmp_path):
    old = _as_schema_2(trained["adapter"], tmp_path / "old.safetensors")
    with pytest.warns(UserWarning, match="records no preprocessing"):
        from_pretrained(old, trained["weights"])


@pytest.mark.parametrize(
    "size,named",
    [([3, 16384, 16384], "is 16384x16384, the backbone is fixed to 32x32"),
     ([4, 32, 32], "has 4 channels, the model takes 3")],
    ids=["size", "channels"],
)  # fmt: skip
def test_a_recorded_input_size_the_model_cannot_take_is_refused_at_load(
    trained, tmp_path, size, named
):
    """Before the fix each image was resized to 16384² px (3.2 GB) before the model refused
    it, and a 4-channel size was reported as an unreadable image."""
    with safe_open(str(trained["adapter"]), framework="pt") as f:
        prep = json.loads(f.metadata()["preprocessing"])
    prep.update(input_size=size, mean=[0.5] * size[0], std=[0.5] * size[0])
    bad = _with_metadata(trained["adapter"], tmp_path / "bad.safetensors", preprocessing=prep)
    with pytest.raises(ValueError, match=named):
        from_pretrained(bad, trained["weights"])


def test_a_recorded_resize_beyond_the_size_limit_is_refused_at_load(tmp_path):
    """input_size and crop_pct were bounded each alone: a backbone of any input size (here
    a ViT with dynamic_img_size) loaded a record that resizes each image to 32768 px a side
    (3.2 GB, then the crop); the limit is the resize's side, and a record at it loads."""
    torch.manual_seed(0)
    model = create_model(VIT, "dtl", num_classes=3, img_size=32, dynamic_img_size=True)
    path = save_adapter(model, tmp_path / "dynamic.safetensors")
    prep = json.loads(read_adapter(path)[1]["preprocessing"])
    at_limit = {**prep, "input_size": [3, 8192, 8192], "crop_pct": 0.5}
    ok = _with_metadata(path, tmp_path / "ok.safetensors", preprocessing=at_limit)
    with pytest.warns(UserWarning, match="other backbone weights"):  # (a random backbone)
        assert from_pretrained(ok, backbone_mismatch="warn").pretrained_cfg["crop_pct"] == 0.5
    over = {**prep, "input_size": [3, 8192, 8192], "crop_pct": 0.25}
    bad = _with_metadata(path, tmp_path / "bad.safetensors", preprocessing=over)
    with pytest.raises(AdapterError, match="'preprocessing' resizes images to 32768 px a side"):
        from_pretrained(bad)


def test_a_float16_backbones_adapter_loads_on_the_float32_weights(tmp_path):
    """--backbone-dtype fp16: the fingerprint rounds to bfloat16, and float16 weights round
    otherwise than their float32 source for ~6 % of values; from_pretrained / dtl-predict
    rebuild the backbone in float32 and refused the adapter as "other backbone weights"."""
    from dtl_kernels import load_adapter

    weights = tmp_path / "backbone.pth"
    torch.manual_seed(0)
    source = create_model(VIT, "linear", num_classes=3, img_size=32).backbone
    torch.save({"state_dict": source.state_dict()}, weights)

    def build(**kw):
        torch.manual_seed(0)
        return create_model(VIT, "dtl", num_classes=3, img_size=32, pretrained=str(weights), **kw)

    half = build(backbone_dtype=torch.float16)
    save_adapter(half, tmp_path / "half.safetensors")
    full = build()
    assert full.backbone_fingerprint() != half.backbone_fingerprint()
    load_adapter(full, tmp_path / "half.safetensors")  # the float32 source of those weights
    other = build()
    with torch.no_grad():
        next(other.backbone.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="trained on other backbone weights"):
        load_adapter(other, tmp_path / "half.safetensors")


def test_save_adapter_refuses_what_would_not_read_back(tmp_path):
    """The adapter's tensors are the trainable ones: a head frozen by hand was left out of
    the file without a word (the trained head lost, found only at load); a swapped head
    of another size, a NaN, too."""
    torch.manual_seed(0)
    model = create_model(VIT, "dtl", num_classes=3, img_size=32)
    model.head.requires_grad_(False)
    with pytest.raises(ValueError, match="cannot write adapter .*the file's head is"):
        save_adapter(model, tmp_path / "a.safetensors")
    model.head.requires_grad_(True)
    model.head = torch.nn.Linear(model.head.in_features, 7)
    with pytest.raises(ValueError, match="cannot write adapter .*'num_classes' is 3"):
        save_adapter(model, tmp_path / "a.safetensors")
    model.head = torch.nn.Linear(model.head.in_features, 3)
    with torch.no_grad():
        model.head.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"NaN or infinite values in \['head.weight'\]"):
        save_adapter(model, tmp_path / "a.safetensors")
    assert not (tmp_path / "a.safetensors").exists()


def test_a_one_channel_models_adapter_loads(tmp_path):
    """timm's pretrained_cfg says 3 channels whatever in_chans is: the stem's own count is
    accepted beside it (review: a [1, H, W] record was refused)."""
    from dtl_kernels import load_adapter

    torch.manual_seed(0)
    model = create_model(VIT, "dtl", num_classes=3, img_size=32, in_chans=1)
    model.pretrained_cfg = {**model.pretrained_cfg, "input_size": (1, 32, 32),
                            "mean": (0.5,), "std": (0.5,)}  # fmt: skip
    save_adapter(model, tmp_path / "one.safetensors")
    torch.manual_seed(0)
    again = create_model(VIT, "dtl", num_classes=3, img_size=32, in_chans=1)
    load_adapter(again, tmp_path / "one.safetensors")
    assert again.pretrained_cfg["input_size"] == (1, 32, 32)


def test_dtl_predict_takes_a_run_folder_and_checks_the_device_first(trained, toy, capsys):
    image = str(sorted((toy / "test").rglob("*.png"))[0])
    assert predict([image, "--adapter", str(trained["adapter"].parent)]) == 0
    capsys.readouterr()
    for bad in ("meta", "mps", "cuda:99", "nonsense"):
        assert predict([image, "--adapter", str(trained["adapter"]), "--device", bad]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 4 and all(line.startswith("dtl-predict: error: --device") for line in err)


def test_class_names_with_control_characters_are_never_written_and_read_escaped(trained, tmp_path):
    """A control character in a class name (a terminal escape through dtl-predict): an
    adapter is never written with one, and one read from someone else's file comes back
    as its escape sequence. Names may repeat (ImageNet's labels do), on both sides."""
    names = ["a", "x\x1b[31mRED", "a"]
    path = _with_metadata(trained["adapter"], tmp_path / "c.safetensors", classes=names)
    model = from_pretrained(path)
    assert model.class_names == ["a", "x\\x1b[31mRED", "a"]
    with pytest.raises(ValueError, match="holds a control character"):
        save_adapter(model_with(model, names), tmp_path / "w.safetensors")
    repeated = model_with(model, ["crane", "crane", "maillot"])
    assert from_pretrained(save_adapter(repeated, tmp_path / "r.safetensors")).class_names == [
        "crane", "crane", "maillot"
    ]  # fmt: skip


def model_with(model, names):
    model.class_names = list(names)
    return model


def test_dtl_train_refuses_class_folders_it_could_not_record(toy, tmp_path, capsys):
    import shutil

    root = tmp_path / "data"
    shutil.copytree(toy, root)
    for split in ("train", "test"):
        (root / split / "class1").rename(root / split / "class\x1b1")
    argv = ["--model", VIT, "--pretrained", "none", "--img-size", "32", "--data-root", str(root),
            "--epochs", "1", "--output", str(tmp_path / "run"), "--cache-trunk", "off"]  # fmt: skip
    assert train(argv) == 1
    assert "holds a control character" in capsys.readouterr().err
    run = tmp_path / "run"
    assert not (run / "adapter.safetensors").exists() and not (run / "metrics.csv").exists()


def test_dtl_predict_checks_where_the_output_goes_before_it_predicts(
    trained, toy, tmp_path, capsys, monkeypatch
):
    from dtl_kernels import predict as predict_module
    from dtl_kernels.predict_cli import _csv

    image = str(sorted((toy / "test").rglob("*.png"))[0])
    (tmp_path / "blocker").write_text("a file")
    monkeypatch.setattr(predict_module.Predictor, "from_adapter",
                        lambda *a, **k: pytest.fail("the model was built"))  # fmt: skip
    argv = [image, "--adapter", str(trained["adapter"]), "--output"]
    assert predict(argv + [str(tmp_path / "blocker" / "sub" / "p.csv")]) == 1
    assert "cannot be written" in capsys.readouterr().err
    long_name = tmp_path / ("p" * 300 + ".csv")  # past the file-name limit: refused now
    assert predict(argv + [str(long_name)]) == 1
    assert "File name too long" in capsys.readouterr().err
    os.mkfifo(tmp_path / "pipe.csv")  # refused now, not after predicting (review)
    assert predict(argv + [str(tmp_path / "pipe.csv"), "--overwrite"]) == 1
    assert "pipe.csv: it is a FIFO" in capsys.readouterr().err
    # a file name's control characters: escaped on a terminal, kept in a file
    rows = [("x\x1b[31m.png", [("a", 0.5)])]
    assert "x\\x1b[31m.png" in _csv(rows, 1, escape=True)
    assert "x\x1b[31m.png" in _csv(rows, 1)


def test_predictor_workers_give_the_same_probabilities_and_name_a_bad_image(trained, toy, tmp_path):
    """Images decoded by worker processes: the same batches, so the same probabilities
    bit for bit; an image that fails to decode in a worker is raised here as DataError,
    naming the file, not wrapped in the worker's traceback; the workers stop with any error."""
    import multiprocessing

    import numpy as np
    from PIL import Image

    from dtl_kernels.train.data import DataError

    files = sorted((toy / "test").rglob("*.png"))
    here = Predictor.from_adapter(trained["adapter"], batch_size=4).probabilities(files)
    workers = Predictor.from_adapter(trained["adapter"], batch_size=4, workers=2)
    assert torch.equal(workers.probabilities(files), here)
    bad = tmp_path / "bad.png"
    bad.write_bytes(files[0].read_bytes()[:60])  # a header, then nothing to decode
    with pytest.raises(DataError, match=r"^cannot read image .*bad\.png: ") as got:
        workers.probabilities([*files[:5], bad, *files[5:]])
    assert "Traceback" not in str(got.value)
    # stopped at once, not when the traceback is collected (~5 s a worker then)
    assert multiprocessing.active_children() == []
    # a PIL image that cannot be converted: named as a file is, not wrapped by the worker
    nan_image = Image.fromarray(np.full((32, 32), np.nan, dtype=np.float32))
    with pytest.raises(DataError, match=r"^cannot convert image <PIL.*NaN") as got:
        workers.probabilities([*files[:3], nan_image])
    assert "Traceback" not in str(got.value) and multiprocessing.active_children() == []
    # an error raised inside the loader (its own frames in the traceback): images of two
    # sizes that cannot be stacked into one batch
    uneven = Predictor(workers.model, batch_size=4, workers=2)
    uneven.transform = lambda im: torch.zeros(3, im.height, im.width)
    with pytest.raises(RuntimeError, match="stack"):
        uneven.probabilities([Image.new("RGB", (8 + i % 2, 8)) for i in range(8)])
    assert multiprocessing.active_children() == []
    with torch.no_grad():
        workers.model.head.weight.fill_(3e38)  # an error after a batch, in the caller's loop
    with pytest.raises(ValueError, match="non-finite outputs"):
        workers.probabilities(files)
    assert multiprocessing.active_children() == []
    for bad_count in (-1, 1.5, True):
        with pytest.raises(ValueError, match="workers must be a whole number ≥ 0"):
            Predictor(workers.model, workers=bad_count)


def test_predictor_compile_pads_the_last_batch_to_one_shape(trained, toy, monkeypatch):
    """compile=True: the model goes through torch.compile once, at the first batch, in the
    device's mode (CUDA graphs on a GPU), and every batch it sees has ``batch_size`` images
    (the last one padded, its padding dropped): one compiled graph, no recompilation."""
    files = sorted((toy / "test").rglob("*.png"))
    assert len(files) % 4  # a partial last batch
    want = Predictor.from_adapter(trained["adapter"], batch_size=4).probabilities(files)
    calls, seen = [], []

    def fake_compile(model, **options):
        calls.append(options)
        return lambda x: (seen.append(tuple(x.shape)), model(x))[1]

    monkeypatch.setattr(torch, "compile", fake_compile)
    p = Predictor.from_adapter(trained["adapter"], batch_size=4, compile=True)
    got = p.probabilities(files)
    assert calls == [{"mode": None, "dynamic": False}]
    assert seen == [(4, 3, 32, 32)] * -(-len(files) // 4)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)
    assert p.probabilities(files[:1]).shape == (1, 3) and len(calls) == 1
    p.model = from_pretrained(trained["adapter"])  # another model: compiled anew, never stale
    with torch.no_grad():
        p.model.head.bias.add_(1.0)
    torch.testing.assert_close(p.probabilities(files), Predictor(p.model).probabilities(files),
                               rtol=0, atol=1e-6)  # fmt: skip
    assert len(calls) == 2


def _tiny_dtl_plus(device: str = "cpu"):
    """A 2-block DTL+ ViT whose side network changes the logits (B ≠ 0), and 5 images."""
    from PIL import Image

    torch.manual_seed(0)
    model = create_model(VIT, "dtl+", num_classes=3, img_size=32, depth=2, adapt_from=1)
    with torch.no_grad():
        for p in model.csn.up.values():
            p.normal_(0, 0.5)
    images = [Image.fromarray((torch.rand(32, 32, 3) * 255).byte().numpy()) for _ in range(5)]
    return model.to(device), images


def test_predictor_compile_runs_the_compiled_model():
    """compile=True for real (inductor on the CPU): the probabilities of the eager model,
    a partial last batch included."""
    model, images = _tiny_dtl_plus()
    want = Predictor(model, batch_size=3).probabilities(images)
    got = Predictor(model, batch_size=3, compile=True).probabilities(images)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none visible)")
def test_predictor_compile_under_cuda_graphs():
    """compile=True on a GPU (mode="reduce-overhead": CUDA graphs): the eager model's
    probabilities, again on a second call (graph replays: every output copied out before
    the next replay overwrites it), the padded last batch included."""
    model, images = _tiny_dtl_plus("cuda")
    want = Predictor(model, batch_size=2).probabilities(images)
    p = Predictor(model, batch_size=2, compile=True)
    first = p.probabilities(images)
    torch.testing.assert_close(first, want, rtol=0, atol=1e-4)
    assert torch.equal(p.probabilities(images), first)


def test_predictor_progress_bar_goes_to_stderr(trained, toy, capsys):
    files = sorted((toy / "test").rglob("*.png"))
    Predictor.from_adapter(trained["adapter"], batch_size=4, progress=True).probabilities(files)
    assert "predict" in capsys.readouterr().err
    Predictor.from_adapter(trained["adapter"], batch_size=4, progress=False).probabilities(files)
    assert capsys.readouterr().err == ""


def test_dtl_predict_passes_workers_and_compile(trained, toy, capsys, monkeypatch):
    from dtl_kernels import predict as predict_module

    image = str(sorted((toy / "test").rglob("*.png"))[0])
    made = {}
    real = predict_module.Predictor.from_adapter

    def spy(*args, **kwargs):
        made.update(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(predict_module.Predictor, "from_adapter", spy)
    monkeypatch.setattr(torch, "compile", lambda model, **options: model)
    argv = [image, "--adapter", str(trained["adapter"]), "--workers", "1", "--compile"]
    assert predict(argv) == 0
    assert made == {"workers": 1, "compile": True, "progress": None, "precision": "fp32"}
    assert predict([image, "--adapter", str(trained["adapter"]), "--precision", "bf16"]) == 0
    assert made["precision"] == "bf16"
    assert predict([image, "--adapter", str(trained["adapter"]), "--workers", "-1"]) == 2
    assert capsys.readouterr().err.strip() == "dtl-predict: error: --workers must be ≥ 0"


def test_predictor_bf16_autocast_is_close_and_fp16_needs_cuda(trained, toy):
    """precision="bf16" runs the model under bf16 autocast (other numbers than float32's,
    within bf16's error); fp16 is refused on the CPU before any image is read."""
    files = sorted((toy / "test").rglob("*.png"))
    want = Predictor.from_adapter(trained["adapter"]).probabilities(files)
    got = Predictor.from_adapter(trained["adapter"], precision="bf16").probabilities(files)
    assert not torch.equal(got, want) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, rtol=0, atol=0.03)
    with pytest.raises(ValueError, match="fp16 needs CUDA"):
        Predictor.from_adapter(trained["adapter"], precision="fp16").probabilities(files)
    with pytest.raises(ValueError, match="precision must be one of fp32, bf16, fp16"):
        Predictor.from_adapter(trained["adapter"], precision="int8")
