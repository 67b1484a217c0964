"""dtl-train options: numbers in any spelling a YAML file gives, every option validated
before any work, errors on one line without a traceback."""

from __future__ import annotations

import pytest

from dtl_kernels.train import config as C
from dtl_kernels.train import make_config
from dtl_kernels.train import setup as train_setup
from dtl_kernels.train.cli import main


def test_yaml_numbers_in_every_spelling(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(
        "lr: 1e-3\nwarmup-lr: 1E-7\nmin_lr: .5e-8\nweight_decay: 5.0e-2\nepochs: 1_0\n"
        "batch_size: 8.0\nseed: 0x2A\nresume: yes\nprogress: 'off'\nbeta: 100\n"
        "cache_max_bytes: 2.0e+9\n"
    )
    cfg = C.load_config(["--config", str(path), "--dataset", "elpv"])
    assert (cfg.lr, cfg.warmup_lr, cfg.min_lr, cfg.weight_decay) == (1e-3, 1e-7, 5e-9, 0.05)
    assert (cfg.epochs, cfg.batch_size, cfg.seed) == (10, 8, 42)
    assert cfg.resume is True and cfg.progress is False and cfg.beta == 100.0
    assert cfg.cache_max_bytes == 2 * 10**9
    assert type(cfg.epochs) is int and type(cfg.lr) is float


def test_flags_and_python_values_are_coerced_too():
    cfg = C.load_config(["--lr", "3e-3", "--epochs", "1e1", "--min-lr", "1_0e-9"])
    assert (cfg.lr, cfg.epochs, cfg.min_lr) == (3e-3, 10, 1e-8)
    assert make_config({"lr": "1e-2", "epochs": 2.0, "resume": "true"}).epochs == 2


@pytest.mark.parametrize(
    "values,message",
    [
        ({"warmup_lr": -1e-7}, "--warmup-lr must be ≥ 0"),
        ({"min_lr": 1.0}, r"--min-lr \(1.0\) must not exceed --lr"),
        ({"min_lr": "abc"}, "--min-lr: expected a number, got 'abc'"),
        ({"lr": float("nan")}, "--lr must be a finite number"),
        ({"epochs": 2.5}, "--epochs: expected a whole number"),
        ({"batch_size": True}, "--batch-size: expected a whole number"),
        ({"drop_path": 1.5}, r"--drop-path must be in \[0, 1\)"),
        ({"workers": -1}, "--workers must be ≥ 0"),
        ({"rank": 0}, "--rank must be ≥ 1"),
        ({"max_nonfinite_steps": -1}, "--max-nonfinite-steps must be ≥ 0"),
        ({"dataset": "folder"}, "needs --data-root"),
        ({"dataset": "vtab:"}, "unknown dataset"),
        ({"resume": "maybe"}, "--resume: expected true or false"),
        ({"epochs": [1, 2]}, "--epochs: expected one value"),
        # each within its limit, together a resize to 32768 px a side no adapter may record
        ({"img_size": 8192, "crop_pct": 0.25}, "resizes images to 32768 px a side, more than"),
    ],
)
def test_every_option_is_validated(values, message):
    with pytest.raises(ValueError, match=message):
        make_config(values)


def test_errors_come_before_any_work(tmp_path, monkeypatch, capsys):
    def no_work(*a, **k):
        raise AssertionError("data was read before the options were checked")

    monkeypatch.setattr(train_setup, "build_datasets", no_work)  # where the data is read
    out = str(tmp_path / "o")
    assert main(["--min-lr", "-1", "--output", out]) == 2
    assert main(["--epochs", "ten", "--output", out]) == 2
    missing = str(tmp_path / "missing.pth")
    assert main(["--pretrained", missing, "--output", out]) == 1
    assert main(["--model", "no_such_model", "--output", out]) == 2
    # what the model's constructor refuses, found by a build on the meta device
    assert main(["--checkpoint-tail", "--pretrained", "none", "--output", out]) == 2
    assert main(["--model", "vit_tiny_patch16_224", "--output", out]) == 2  # no weights named
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [x for x in err.splitlines() if x.startswith("dtl-train: error:")]
    assert len(lines) == 6  # one each (argparse writes the one for --epochs ten)
    assert any("checkpoint_tail is not an option of DTLConvNet" in x for x in lines)
    assert any("has no weights that install offline" in x for x in lines)
    assert any("checkpoint not found: " + missing in x for x in lines)
    assert any("'no_such_model' is not a timm model name" in x for x in lines)
    assert "argument --epochs: expected a whole number, got 'ten'" in err


def test_an_aliased_yaml_value_is_shown_short_in_its_error(tmp_path):
    """A value built from YAML aliases (10^8 elements from a few hundred bytes) is named by
    a bounded repr: the full one took 10 GB and printed a 580 MB error line."""
    anchors, prev = [], "[x, x, x, x, x, x, x, x, x, x]"
    for i in range(8):
        anchors.append(f"&a{i} {prev}")
        prev = "[" + ", ".join([f"*a{i}"] * 10) + "]"
    path = tmp_path / "bomb.yaml"
    path.write_text("scale: [" + ", ".join(anchors) + "]\n")
    with pytest.raises(ValueError, match="--scale: expected two numbers") as info:
        C.load_config(["--config", str(path), "--dataset", "elpv"])
    assert len(str(info.value)) < 1000


def test_a_number_too_long_to_read_names_the_config_file(tmp_path):
    path = tmp_path / "long.yaml"
    path.write_text("epochs: 1" + "0" * 5000 + "\n")
    with pytest.raises(ValueError, match=r"config file .*long\.yaml: .*digits"):
        C.load_config(["--config", str(path), "--dataset", "elpv"])


@pytest.mark.parametrize(
    "text,named",
    [("base: &b\n  lr: 0.01\n<<: *b\n", r"merge keys \('<<', line 3\) are not supported"),
     ("output: !!binary aGVsbG8=\n", "--output: expected a name, got b'hello'"),
     ("model: [vit]\n", "--model: expected one value, got a list")],
    ids=["merge-key", "binary", "list"],
)  # fmt: skip
def test_yaml_values_that_are_no_option_value_are_named(tmp_path, text, named):
    """A merge key was "not valid YAML"; !!binary bytes named the output folder "b'hello'"."""
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=named):
        C.load_config(["--config", str(path), "--dataset", "elpv"])
