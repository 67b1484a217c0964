"""dtl-train's command line (issue 20, items 3, 5, 6 and 7): every memory option and
gradient accumulation from flags (``--estimate-memory`` honours them), defaults that
refuse to guess (``--data-root`` alone, a random backbone), LoRA without PEFT, and the
output: logging levels, no progress bar off a terminal, ``--help`` and ``--version``."""

from __future__ import annotations

import contextlib
import copy
import json
import sys

import pytest
import torch

from dtl_kernels import create_model, estimate_memory, from_pretrained
from dtl_kernels.train import make_config
from dtl_kernels.train import setup as train_setup
from dtl_kernels.train.cli import main
from dtl_kernels.train.config import TrainConfig, build_parser
from dtl_kernels.train.dist import Dist
from dtl_kernels.train.step import Stepper, param_groups

pytestmark = pytest.mark.filterwarnings("ignore:.*RANDOM backbone")
VIT = "vit_tiny_patch16_224"
TINY = ["--model", VIT, "--img-size", "32", "--adapt-from", "11", "--pretrained", "none"]
MEMORY = ["--checkpoint-tail", "--trunk-dtype", "bf16", "--backbone-dtype", "bf16"]


def test_estimate_memory_honours_every_memory_flag(capsys):
    argv = TINY + ["--method", "dtl+", "--num-classes", "3", "--batch-size", "8",
                   "--estimate-memory"]  # fmt: skip
    assert main(argv + MEMORY + ["--grad-accum", "2"]) == 0
    printed = capsys.readouterr().out
    model = create_model(VIT, "dtl+", 3, img_size=32, adapt_from=11, checkpoint_tail=True,
                         trunk_dtype=torch.bfloat16, backbone_dtype=torch.bfloat16)  # fmt: skip
    expected = estimate_memory(model, 4, 32, grad_accum=2)  # micro-batches of 8 / 2
    assert str(expected) in printed and "4 images per process × 2 micro-batches" in printed
    assert main(argv) == 0
    plain = capsys.readouterr().out
    assert str(expected) not in plain and str(estimate_memory(model, 8, 32)) not in plain


def _stepper(model, cfg):
    # plain SGD: the update is the gradient itself (Adam's first step is about its sign)
    opt = torch.optim.SGD(param_groups(model, 0.0), lr=cfg.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return Stepper(model, model, opt, sched, None, cfg, contextlib.nullcontext, Dist())


def test_grad_accum_takes_the_step_of_the_whole_batch():
    cfg = make_config({"model": VIT, "lr": 1e-2})
    torch.manual_seed(0)
    one = create_model(VIT, "dtl+", 3, img_size=32, adapt_from=11).train()
    split = copy.deepcopy(one)
    x, y = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 0, 1, 2])
    loss_one, hits_one = _stepper(one, cfg)([(x, y)])
    loss_split, hits_split = _stepper(split, cfg)([(x[:4], y[:4]), (x[4:], y[4:])])  # 4 + 2
    assert loss_split == pytest.approx(loss_one, rel=1e-5) and hits_split == hits_one
    for (name, a), b in zip(one.named_parameters(), split.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step()`")
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_a_non_finite_gradient_skips_the_step_whatever_the_dtypes(bad):
    """A finite loss whose gradient is not (one gradient poisoned by a hook): no update, the
    streak counted; the fused check (one per device, every dtype together) also passes
    finite gradients of mixed dtypes. Loss and hits as read back one by one."""
    cfg = make_config({"model": VIT, "lr": 1e-2})
    torch.manual_seed(0)
    model = create_model(VIT, "dtl", 3, img_size=32, adapt_from=11).train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    before = copy.deepcopy(model.state_dict())
    step = _stepper(model, cfg)
    trained = [p for p in model.parameters() if p.requires_grad]
    hook = trained[0].register_hook(lambda g: g * bad)
    assert step([(x, y)]) is None and step.bad_streak == 1
    for name, t in model.state_dict().items():
        assert torch.equal(t, before[name]), name
    hook.remove()
    trained[1].data = trained[1].data.double()  # gradients of three dtypes in one check
    trained[2].data = trained[2].data.bfloat16()
    hooks = [p.register_hook(lambda g, p=p: g.to(p.dtype)) for p in trained[1:3]]
    with torch.no_grad():
        logits = model(x)
    loss, hits = step([(x, y)])
    assert step.bad_streak == 0 and trained[1].grad.dtype == torch.float64
    assert loss == torch.nn.functional.cross_entropy(logits.float(), y).item()
    assert hits == int((logits.argmax(-1) == y).sum())
    after = model.state_dict()
    assert any(not torch.equal(after[n], before[n]) for n, p in model.named_parameters()
               if p.requires_grad)  # fmt: skip
    for h in hooks:
        h.remove()
    for poisoned in trained[1:3]:  # the float64 and the bfloat16 group: each flags the step
        hook = poisoned.register_hook(lambda g, p=poisoned: (g * bad).to(p.dtype))
        assert step([(x, y)]) is None
        hook.remove()


def test_memory_flags_train_and_print_nothing_when_quiet(toy, tmp_path, capsys):
    out, weights = tmp_path / "run", tmp_path / "backbone.pth"
    torch.save(create_model(VIT, "linear", 3, img_size=32).backbone.state_dict(), weights)
    argv = TINY[:-1] + [str(weights), "--data-root", str(toy), "--epochs", "1",
                        "--batch-size", "4", "--grad-accum", "2", "--output", str(out),
                        "--quiet"] + MEMORY  # fmt: skip
    capsys.readouterr()
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out == ""  # --quiet: no messages, no report
    assert "\r" not in captured.err  # not a terminal: no progress bar frames
    config = json.loads((out / "config.json").read_text())
    assert config["dataset"] == "folder"  # inferred from --data-root
    assert (config["checkpoint_tail"], config["trunk_dtype"], config["backbone_dtype"],
            config["grad_accum"]) == (True, "bf16", "bf16", 2)  # fmt: skip
    model = from_pretrained(out / "adapter.safetensors")  # fp32 backbone, same fingerprint
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)


def test_verbose_prints_the_resolved_options(toy, tmp_path, capsys):
    argv = TINY + ["--data-root", str(toy), "--epochs", "1", "--batch-size", "12",
                   "--max-train", "6", "--output", str(tmp_path / "v")]  # fmt: skip
    assert main(argv + ["--verbose"]) == 0
    out = capsys.readouterr().out
    assert "options: model=vit_tiny_patch16_224" in out and "timm data config" in out
    assert "epoch 1/1: train loss" in out  # one plain line per epoch


def test_data_root_alone_is_a_folder_or_an_error(toy, tmp_path):
    assert make_config({"data_root": str(toy)}).dataset == "folder"
    assert make_config({}).dataset == "elpv"
    (tmp_path / "images").mkdir()
    with pytest.raises(
        ValueError, match="without --dataset: it is no image-folder tree.*--dataset"
    ):
        make_config({"data_root": str(tmp_path / "images")})


def test_a_random_backbone_must_be_asked_for(toy, tmp_path, capsys, monkeypatch):
    def no_work(*a, **k):
        raise AssertionError("data was read before the options were checked")

    monkeypatch.setattr(train_setup, "build_datasets", no_work)
    argv = ["--model", VIT, "--data-root", str(toy), "--output", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no weights that install offline" in err[0]
    assert (
        "--pretrained none" in err[0] and "efficientnet-lite0 (for tf_efficientnet_lite0)" in err[0]
    )


def test_lora_without_peft_is_one_line(toy, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "peft", None)  # import peft → ImportError
    argv = TINY + ["--method", "lora", "--data-root", str(toy), "--output", str(tmp_path / "l")]
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [
        "dtl-train: error: method 'lora' needs Hugging Face PEFT, which is not installed: "
        "pip install peft"
    ]


def test_lr_defaults_per_method_unless_given():
    """The study's picks when no --lr is given (flag, YAML or recipe); any given value wins."""
    from dtl_kernels.train.config import load_config

    common = ["--dataset", "elpv"]
    assert load_config([*common, "--method", "dtl"]).lr == 1e-2
    assert load_config([*common, "--method", "dtl+"]).lr == 1e-2
    assert load_config([*common, "--method", "linear"]).lr == 1e-3
    assert load_config([*common, "--method", "dtl", "--lr", "3e-4"]).lr == 3e-4
    assert load_config([*common, "--method", "dtl", "--recipe", "published"]).lr == 1e-3


def test_help_shows_every_option_with_its_default(capsys):
    parser = build_parser()
    for action in parser._actions:
        assert action.help and action.help.strip(), action.option_strings
    defaults = TrainConfig()
    for action in parser._actions:
        if hasattr(defaults, action.dest) and getattr(defaults, action.dest) is not None:
            assert "default" in action.help, action.option_strings
    text = parser.format_help()
    assert "(default: 10)" in text and "(default: off)" in text
    flat = " ".join(text.split())  # argparse wraps the help text
    assert "(default: dtl 0.01, dtl+ 0.01, what the accuracy study picked; 0.001 for the " in flat
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["--version"])
    assert info.value.code == 0
    from dtl_kernels import __version__

    assert capsys.readouterr().out.strip() == f"dtl-train (dtl_kernels) {__version__}"


def _first(t: torch.Tensor, value: float) -> torch.Tensor:
    """``t`` with its first stored element set to ``value``."""
    t.view(-1)[0] = value
    return t


@pytest.mark.filterwarnings("ignore:Sparse invariant checks")
@pytest.mark.parametrize(
    "make",
    [
        lambda v: _first(torch.randn(3, 4), v),
        lambda v: _first(torch.randn(3, 4, dtype=torch.float64), v),
        lambda v: _first(torch.randn(3, 4).bfloat16(), v),
        lambda v: _first(torch.randn(3, 4).half(), v),
        lambda v: _first(torch.randn(4, 3), v).t(),  # transposed: checked on its own
        lambda v: _first(torch.randn(2, 5, 4, 3), v).permute(0, 3, 1, 2),  # channels_last
        lambda v: _first(torch.randn(3, dtype=torch.complex64), v),
        lambda v: _first(torch.randn(1, 4), v).expand(3, 4),  # one element seen three times
        lambda v: torch.sparse_coo_tensor([[0, 2]], [v, 1.0], (3,)),
    ],
)
def test_the_gradient_check_takes_every_kind_of_gradient(make):
    """Stepper's finiteness check agrees with the per-tensor ``isfinite(g).all()`` for every
    layout and dtype a gradient can have (the fused kernel takes the dense real ones, the
    rest is checked one by one), beside another gradient, also with float64 as the default
    dtype; an empty gradient is finite."""
    cfg = make_config({"model": VIT, "lr": 1e-2})
    other = torch.nn.Parameter(torch.zeros(2))
    other.grad = torch.ones(2)
    for value, expected in ((0.5, True), (float("nan"), False), (float("inf"), False)):
        g = make(value)
        p = torch.nn.Parameter(torch.zeros(g.shape, dtype=g.dtype))
        p.grad = g
        step = _stepper(torch.nn.Linear(1, 1), cfg)
        step.params = [other, p]
        assert step._grads_finite() is expected, (g.dtype, g.layout, value)
        previous = torch.get_default_dtype()
        torch.set_default_dtype(torch.float64)
        try:
            assert step._grads_finite() is expected
        finally:
            torch.set_default_dtype(previous)
    empty = torch.nn.Parameter(torch.zeros(0))
    empty.grad = torch.zeros(0)
    step.params = [empty]
    assert step._grads_finite() is True
