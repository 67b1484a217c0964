"""Fidelity: the package computes the published DTL / DTL+ forward pass, and its gradients.

The reference below is written from SPEC §1 only, on top of timm's own backbone modules
(``patch_embed``, ``_pos_embed``, ``blocks``, ``norm``, Swin ``layers`` / ``downsample``)
and plain torch ops. It shares no code with ``dtl_kernels``: the two meet only through
the published checkpoint names (SPEC §6), which is how the reference gets the package's
numbers. Everything runs in float64 with non-zero ``B``, a random conv and a random head.
"""

from __future__ import annotations

import copy
import math

import pytest
import timm
import torch
import torch.nn.functional as F

from dtl_kernels import DTLSwin, DTLViT
from dtl_kernels.ops import _ext

BETA = 100.0
BATCH = 2
VIT = "vit_tiny_patch16_224"
SWIN = "swin_tiny_patch4_window7_224"
# Small, non-square inputs: a 4×5 patch grid for ViT-Ti/16 catches transposed grids.
VIT_IMG = (64, 80)
# Swin-T at 64×64 with 2×2 windows: stage grids 16, 8, 4, 2; shifted windows still used.
SWIN_KW = dict(img_size=64, window_size=2)


pytestmark = pytest.mark.usefixtures("one_thread")


# --------------------------------------------------------------------------------------
# The reference (SPEC §1)
# --------------------------------------------------------------------------------------


def ref_theta(x: torch.Tensor, beta: float = BETA) -> torch.Tensor:
    """θ(x) = x · sigmoid(β·x)."""
    return x * torch.sigmoid(beta * x)


def ref_depthwise_same(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """g: depthwise k×k conv, no bias, stride 1, PyTorch's "same" padding; x is B×C×H×W."""
    return F.conv2d(x, weight, bias=None, stride=1, padding="same", groups=x.shape[1])


def ref_vit_logits(
    bb: torch.nn.Module,
    images: torch.Tensor,
    params: dict[str, torch.Tensor],
    *,
    adapt_from: int,
    tap_from: int = 1,
    conv: bool,
    beta: float = BETA,
    variant: str | None = None,
) -> torch.Tensor:
    """Published ViT forward. ``params`` uses the official names (SPEC §6).

    ``variant`` names a deliberately wrong reading of the method (used only to show that
    the comparison can tell them apart): ``"h_without_own_term"``, ``"conv_on_prefix"``,
    ``"norm_then_mean"``.
    """
    z = bb.patch_embed(images)
    if z.ndim == 4:  # dynamic_img_size: timm's patch_embed keeps B×H×W×C
        grid = (z.shape[1], z.shape[2])
    else:
        ph, pw = bb.patch_embed.patch_size
        grid = (images.shape[-2] // ph, images.shape[-1] // pw)
    z = bb._pos_embed(z)
    rope = None
    if isinstance(z, tuple):  # EVA: tokens and the blocks' rotary embedding
        z, rope = z
    else:
        z = bb.patch_drop(z)
    z = bb.norm_pre(z)
    npre = bb.num_prefix_tokens
    batch, tokens, dim = z.shape
    assert tokens == npre + grid[0] * grid[1]

    h = None
    for i, block in enumerate(bb.blocks, start=1):  # 1-based block index
        h_before = h
        if i >= tap_from:
            a = params[f"lora_dict.{i - 1}.lora_A"]  # r×d
            b = params[f"lora_dict.{i - 1}.lora_B"]  # d×r
            term = (z @ a.t()) @ b.t()
            h = term if h is None else h + term  # h_i includes block i's own term
        out = block(z) if rope is None else block(z, rope=rope)
        if i >= adapt_from:
            if variant == "h_without_own_term":
                side = ref_theta(h_before if h_before is not None else torch.zeros_like(h), beta)
            else:
                side = ref_theta(h, beta)
            if conv and variant == "conv_on_prefix":
                grid_all = (1, tokens)  # everything, prefix included, as one row
                patches = side.transpose(1, 2).reshape(batch, dim, *grid_all)
                mixed = ref_depthwise_same(patches, params["lora_fusion.weight"])
                side = mixed.reshape(batch, dim, tokens).transpose(1, 2)
            elif conv:
                patches = side[:, npre:].transpose(1, 2).reshape(batch, dim, *grid)
                mixed = ref_depthwise_same(patches, params["lora_fusion.weight"])
                mixed = mixed.reshape(batch, dim, grid[0] * grid[1]).transpose(1, 2)
                side = torch.cat([side[:, :npre], mixed], dim=1)  # prefix: θ(h) only
            z = out + side
        else:
            z = out
    # The pretrained final LayerNorm, on the pooled vector (timm's avg-pool ViTs keep it
    # as ``fc_norm`` and leave ``norm`` an Identity).
    final_norm = bb.fc_norm if isinstance(bb.norm, torch.nn.Identity) else bb.norm
    if variant == "norm_then_mean":
        pooled = final_norm(z[:, npre:]).mean(dim=1)
    else:
        pooled = final_norm(z[:, npre:].mean(dim=1))  # patch tokens only
    return F.linear(pooled, params["head.weight"], params["head.bias"])


def ref_swin_logits(
    bb: torch.nn.Module,
    images: torch.Tensor,
    params: dict[str, torch.Tensor],
    *,
    adapt_from: int,
    tap_from: int,
    conv: bool,
    beta: float = BETA,
) -> torch.Tensor:
    """Published Swin forward: h restarts per stage, one conv per stage, B×H×W×C maps."""
    x = bb.patch_embed(images)  # B×H×W×C
    i = 0  # global 1-based block index after the increment
    for stage, layer in enumerate(bb.layers):
        x = layer.downsample(x)
        h = None  # restarts at every stage, dropped at the boundary
        for block in layer.blocks:
            i += 1
            if i >= tap_from:
                a = params[f"lora_dict.{i - 1}.lora_A"]
                b = params[f"lora_dict.{i - 1}.lora_B"]
                term = (x @ a.t()) @ b.t()
                h = term if h is None else h + term
            out = block(x)
            if i >= adapt_from:
                side = ref_theta(h, beta)
                if conv:  # all H×W tokens are convolved (no class token)
                    side = ref_depthwise_same(
                        side.permute(0, 3, 1, 2), params[f"lora_fusions.{stage}.weight"]
                    ).permute(0, 2, 3, 1)
                x = out + side
            else:
                x = out
    x = bb.norm(x)
    pooled = x.mean(dim=(1, 2))
    return F.linear(pooled, params["head.weight"], params["head.bias"])


# --------------------------------------------------------------------------------------
# Helpers: random official parameters, and the package's gradients by official names
# --------------------------------------------------------------------------------------


def random_official(model: torch.nn.Module, gen: torch.Generator) -> dict[str, torch.Tensor]:
    """Random values (non-zero B, random conv and head) for every official key."""
    out = {}
    for key, value in model.official_state_dict().items():
        shape, dtype = value.shape, torch.float64
        if key.endswith("lora_A"):
            bound = 1.0 / math.sqrt(shape[1])
            t = (torch.rand(shape, generator=gen, dtype=dtype) * 2 - 1) * bound
        elif key.endswith("lora_B"):
            # Scale chosen so that h spans both the linear and the cut-off side of θ.
            t = torch.randn(shape, generator=gen, dtype=dtype) * 0.05
        elif "fusion" in key:
            t = torch.randn(shape, generator=gen, dtype=dtype) * 0.3
        elif key == "head.weight":
            t = torch.randn(shape, generator=gen, dtype=dtype) * 0.1
        elif key == "head.bias":
            t = torch.randn(shape, generator=gen, dtype=dtype) * 0.1
        else:
            raise AssertionError(f"unexpected official key {key!r}")
        out[key] = t
    return out


def package_grads_official(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The package's parameter gradients under the official names.

    ``official_state_dict`` only renames / reshapes / transposes parameters (a linear map),
    so putting each gradient in place of its parameter and reading the official dict gives
    the gradients in official layout.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.data for p in params]
    try:
        for p in params:
            p.data = p.grad.detach().clone() if p.grad is not None else torch.zeros_like(p)
        return {k: v.detach().clone() for k, v in model.official_state_dict().items()}
    finally:
        for p, s in zip(params, saved, strict=False):
            p.data = s


def assert_close64(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    scale = max(1.0, expected.abs().max().item())
    torch.testing.assert_close(
        actual, expected, rtol=1e-9, atol=1e-11 * scale, msg=lambda m: f"{what}: {m}"
    )


def check_against_reference(model, ref_fn, bb_ref, images, ref_kwargs, seed=1):
    """Load random official params into ``model``; compare logits and every gradient."""
    gen = torch.Generator().manual_seed(seed)
    official = random_official(model, gen)
    model.load_official_state_dict(official)
    # The round trip through the package's layout is exact.
    for k, v in model.official_state_dict().items():
        assert torch.equal(v.to(torch.float64), official[k]), k

    logits = model(images)
    weights = torch.randn(logits.shape, generator=gen, dtype=torch.float64)
    model.zero_grad(set_to_none=True)
    (logits * weights).sum().backward()
    got = package_grads_official(model)

    params = {k: v.clone().requires_grad_(True) for k, v in official.items()}
    ref_logits = ref_fn(bb_ref, images, params, **ref_kwargs)
    keys = list(params)
    grads = torch.autograd.grad(
        (ref_logits * weights).sum(), [params[k] for k in keys], allow_unused=True
    )
    assert_close64(logits.detach(), ref_logits.detach(), "logits")
    # Non-trivial: the side network changed the output.
    assert logits.abs().max() > 0
    for key, grad in zip(keys, grads, strict=False):
        expected = torch.zeros_like(params[key]) if grad is None else grad
        assert_close64(got[key], expected, f"grad of {key}")
    # Every trainable tensor of the package is one of the official tensors.
    n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert n_trainable == sum(v.numel() for v in official.values())
    return logits


def _vit_pair(name=VIT, img_size=VIT_IMG, **timm_kw):
    bb_ref = timm.create_model(name, pretrained=False, num_classes=0, img_size=img_size, **timm_kw)
    bb_ref = bb_ref.double().eval()
    bb_pkg = copy.deepcopy(bb_ref)
    return bb_ref, bb_pkg


def _swin_pair(**timm_kw):
    kw = dict(SWIN_KW, **timm_kw)
    bb_ref = timm.create_model(SWIN, pretrained=False, num_classes=0, **kw).double().eval()
    return bb_ref, copy.deepcopy(bb_ref)


def _images(shape, seed=2):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64)


# The side op runs on the pure-PyTorch reference backend or the compiled CPU kernels
# (the default on CPU when built); both must compute the published model.
BACKENDS = [
    "reference",
    pytest.param(
        "cpu", marks=pytest.mark.skipif(not _ext.cpu_built(), reason="CPU extension not built")
    ),
]


@pytest.fixture(params=BACKENDS)
def side_backend(request, monkeypatch):
    monkeypatch.setenv("DTL_KERNELS_BACKEND", request.param)
    return request.param


# --------------------------------------------------------------------------------------
# ViT
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("adapt_from", [1, 7, 12])
@pytest.mark.parametrize("conv_kernel", [0, 3, 4, 5])
def test_vit_matches_reference(adapt_from, conv_kernel, side_backend):
    bb_ref, bb_pkg = _vit_pair()
    model = DTLViT(bb_pkg, adapt_from=adapt_from, conv_kernel=conv_kernel, num_classes=7)
    model = model.double().eval()
    images = _images((BATCH, 3, *VIT_IMG))
    check_against_reference(
        model,
        ref_vit_logits,
        bb_ref,
        images,
        dict(adapt_from=adapt_from, conv=conv_kernel > 0),
    )


@pytest.mark.parametrize(
    "tap_from,adapt_from,rank,conv_kernel", [(3, 7, 2, 4), (5, 5, 3, 0), (1, 1, 1, 5)]
)
def test_vit_tap_from_and_rank(tap_from, adapt_from, rank, conv_kernel, side_backend):
    bb_ref, bb_pkg = _vit_pair()
    model = DTLViT(
        bb_pkg,
        rank=rank,
        tap_from=tap_from,
        adapt_from=adapt_from,
        conv_kernel=conv_kernel,
        num_classes=3,
    ).double()
    model.eval()
    keys = {k for k in model.official_state_dict() if k.startswith("lora_dict.")}
    expected = {f"lora_dict.{i}.lora_{ab}" for i in range(tap_from - 1, 12) for ab in "AB"}
    assert keys == expected
    assert model.official_state_dict()["lora_dict.11.lora_A"].shape == (rank, 192)
    check_against_reference(
        model,
        ref_vit_logits,
        bb_ref,
        _images((BATCH, 3, *VIT_IMG)),
        dict(adapt_from=adapt_from, tap_from=tap_from, conv=conv_kernel > 0),
    )


@pytest.mark.parametrize(
    "name,timm_kw,conv_kernel,adapt_from",
    [
        (VIT, dict(reg_tokens=4, class_token=True), 4, 7),  # 5 prefix tokens
        (VIT, dict(reg_tokens=2, class_token=False, global_pool="avg"), 3, 1),  # 2 prefix
        ("deit_tiny_distilled_patch16_224", {}, 5, 1),  # class + distillation token
        (VIT, dict(class_token=False, global_pool="avg"), 3, 7),  # no prefix at all
    ],
)
def test_vit_prefix_tokens_match_reference(name, timm_kw, conv_kernel, adapt_from, side_backend):
    bb_ref, bb_pkg = _vit_pair(name, **timm_kw)
    model = DTLViT(bb_pkg, adapt_from=adapt_from, conv_kernel=conv_kernel, num_classes=4)
    model = model.double().eval()
    check_against_reference(
        model,
        ref_vit_logits,
        bb_ref,
        _images((BATCH, 3, *VIT_IMG)),
        dict(adapt_from=adapt_from, conv=conv_kernel > 0),
    )


@pytest.mark.parametrize("conv_kernel", [0, 4])
def test_vit_dynamic_img_size_matches_reference(conv_kernel, side_backend):
    bb_ref, bb_pkg = _vit_pair(img_size=64, dynamic_img_size=True)
    model = DTLViT(bb_pkg, adapt_from=4, conv_kernel=conv_kernel, num_classes=3)
    model = model.double().eval()
    # 3×6 grid: neither the configured 4×4 nor square.
    check_against_reference(
        model,
        ref_vit_logits,
        bb_ref,
        _images((BATCH, 3, 48, 96)),
        dict(adapt_from=4, conv=conv_kernel > 0),
    )


def test_vit_dynamic_img_pad_matches_reference():
    # Images that are not a patch multiple, padded by timm: a 3×3 grid from 40×36.
    bb_ref, bb_pkg = _vit_pair(img_size=32, dynamic_img_size=True, dynamic_img_pad=True)
    model = DTLViT(bb_pkg, adapt_from=3, conv_kernel=4, num_classes=3).double().eval()
    images = _images((BATCH, 3, 40, 36))
    assert model.patch_grid(images) == (3, 3)
    check_against_reference(model, ref_vit_logits, bb_ref, images, dict(adapt_from=3, conv=True))


@pytest.mark.parametrize("variant", ["h_without_own_term", "conv_on_prefix", "norm_then_mean"])
def test_comparison_tells_wrong_readings_apart(variant):
    """Negative control: plausible misreadings of SPEC §1 give clearly different logits."""
    bb_ref, bb_pkg = _vit_pair()
    model = DTLViT(bb_pkg, adapt_from=7, conv_kernel=3, num_classes=7).double().eval()
    gen = torch.Generator().manual_seed(1)
    official = random_official(model, gen)
    model.load_official_state_dict(official)
    images = _images((BATCH, 3, *VIT_IMG))
    with torch.no_grad():
        logits = model(images)
        kw = dict(adapt_from=7, conv=True)
        right = ref_vit_logits(bb_ref, images, official, **kw)
        wrong = ref_vit_logits(bb_ref, images, official, variant=variant, **kw)
    assert_close64(logits, right, "logits")
    assert (wrong - right).abs().max() > 1e-4 * right.abs().max()


# --------------------------------------------------------------------------------------
# Swin
# --------------------------------------------------------------------------------------

# Swin-T depths (2, 2, 6, 2): global blocks 1-2 | 3-4 | 5-10 | 11-12.
SWIN_CASES = [
    # (tap_from, adapt_from, conv_kernel); None = the package's defaults (5, 8 for Swin-T)
    (None, None, 0),
    (None, None, 3),
    (None, None, 4),
    (None, None, 5),
    (1, 1, 5),  # every block adapted, h restarting in every stage
    (1, 3, 4),  # adapt from the first block of stage 2
    (3, 6, 3),  # adapted part starts mid-stage 3
    (11, 12, 0),  # last stage only, one adapted block
]


@pytest.mark.parametrize("tap_from,adapt_from,conv_kernel", SWIN_CASES)
def test_swin_matches_reference(tap_from, adapt_from, conv_kernel, side_backend):
    bb_ref, bb_pkg = _swin_pair()
    kw = {} if tap_from is None else dict(tap_from=tap_from, adapt_from=adapt_from)
    model = DTLSwin(bb_pkg, conv_kernel=conv_kernel, num_classes=5, **kw).double().eval()
    if tap_from is None:
        tap_from, adapt_from = 5, 8  # the published rule (SPEC §1) scaled to Swin-T
    ref_kw = dict(tap_from=tap_from, adapt_from=adapt_from, conv=conv_kernel > 0)
    official = model.official_state_dict()
    fusions = {k for k in official if k.startswith("lora_fusions.")}
    if conv_kernel:
        stage_of = [0, 0, 1, 1, 2, 2, 2, 2, 2, 2, 3, 3]
        adapted_stages = {stage_of[i - 1] for i in range(adapt_from, 13)}
        assert {f"lora_fusions.{s}.weight" for s in adapted_stages} <= fusions
        for s in adapted_stages:
            dim = 96 * 2**s
            assert official[f"lora_fusions.{s}.weight"].shape == (dim, 1, conv_kernel, conv_kernel)
    else:
        assert not fusions
    check_against_reference(model, ref_swin_logits, bb_ref, _images((BATCH, 3, 64, 64)), ref_kw)


@pytest.mark.parametrize(
    "tap_from,adapt_from,conv_kernel", [(None, None, 3), (1, 3, 4), (11, 12, 0)]
)
def test_swinv2_matches_reference(tap_from, adapt_from, conv_kernel, side_backend):
    """timm's SwinTransformerV2 (post-norm blocks, cosine attention) has Swin's layout:
    the same wrapper and the same published reference."""
    kw = dict(SWIN_KW, num_classes=0)
    bb_ref = timm.create_model("swinv2_tiny_window8_256", pretrained=False, **kw).double().eval()
    bb_pkg = copy.deepcopy(bb_ref)
    opts = {} if tap_from is None else dict(tap_from=tap_from, adapt_from=adapt_from)
    model = DTLSwin(bb_pkg, conv_kernel=conv_kernel, num_classes=5, **opts).double().eval()
    if tap_from is None:
        tap_from, adapt_from = 5, 8
    ref_kw = dict(tap_from=tap_from, adapt_from=adapt_from, conv=conv_kernel > 0)
    check_against_reference(model, ref_swin_logits, bb_ref, _images((BATCH, 3, 64, 64)), ref_kw)


def test_swin_other_image_size_matches_reference():
    # strict_img_size=False: a 96×64 input gives non-square stage grids 24×16 … 3×2.
    bb_ref, bb_pkg = _swin_pair(strict_img_size=False)
    model = DTLSwin(bb_pkg, conv_kernel=3, num_classes=3).double().eval()
    check_against_reference(
        model,
        ref_swin_logits,
        bb_ref,
        _images((BATCH, 3, 96, 64)),
        dict(tap_from=5, adapt_from=8, conv=True),
    )


# --------------------------------------------------------------------------------------
# Init, frozen trunk, trainable set
# --------------------------------------------------------------------------------------


def _vit_head_path(bb, images, head_w, head_b):
    """Frozen backbone features through the published head path (no CSN)."""
    x = bb.norm_pre(bb.patch_drop(bb._pos_embed(bb.patch_embed(images))))
    x = bb.blocks(x)
    final_norm = bb.fc_norm if isinstance(bb.norm, torch.nn.Identity) else bb.norm
    pooled = final_norm(x[:, bb.num_prefix_tokens :].mean(dim=1))
    return F.linear(pooled, head_w, head_b)


@pytest.mark.parametrize("conv_kernel,adapt_from", [(0, 7), (3, 1), (5, 12)])
def test_vit_init_is_the_backbone(conv_kernel, adapt_from):
    bb_ref, bb_pkg = _vit_pair(reg_tokens=1, class_token=True)
    model = DTLViT(bb_pkg, adapt_from=adapt_from, conv_kernel=conv_kernel, num_classes=6)
    model = model.double().eval()
    official = model.official_state_dict()
    for key, value in official.items():
        if key.endswith("lora_B"):
            assert torch.count_nonzero(value) == 0, f"{key} must start at zero"
        if key.endswith("lora_A"):
            bound = 1.0 / math.sqrt(value.shape[1])
            assert value.abs().max() <= bound + 1e-12 and value.abs().max() > 0
    assert torch.count_nonzero(official["head.bias"]) == 0
    images = _images((BATCH, 3, *VIT_IMG))
    with torch.no_grad():
        expected = _vit_head_path(bb_ref, images, official["head.weight"], official["head.bias"])
        assert_close64(model(images), expected, "init logits")


@pytest.mark.parametrize("conv_kernel", [0, 5])
def test_swin_init_is_the_backbone(conv_kernel):
    bb_ref, bb_pkg = _swin_pair()
    model = DTLSwin(bb_pkg, conv_kernel=conv_kernel, tap_from=1, adapt_from=2, num_classes=6)
    model = model.double().eval()
    official = model.official_state_dict()
    images = _images((BATCH, 3, 64, 64))
    with torch.no_grad():
        pooled = bb_ref.forward_features(images).mean(dim=(1, 2))
        expected = F.linear(pooled, official["head.weight"], official["head.bias"])
        assert_close64(model(images), expected, "init logits")


def _record_blocks(blocks):
    seen = {}
    handles = []
    for idx, block in enumerate(blocks, start=1):

        def hook(module, args, output, idx=idx):
            seen[idx] = (args[0].requires_grad, output.requires_grad, output.grad_fn)

        handles.append(block.register_forward_hook(hook))
    return seen, handles


@pytest.mark.parametrize("adapt_from", [1, 4, 7, 12])
def test_vit_trunk_records_no_autograd(adapt_from, side_backend):
    bb = timm.create_model(VIT, pretrained=False, num_classes=0, img_size=32, drop_path_rate=0.1)
    model = DTLViT(bb, adapt_from=adapt_from, conv_kernel=3, num_classes=4).train()
    seen, handles = _record_blocks(model.backbone.blocks)
    try:
        model(torch.randn(2, 3, 32, 32)).sum().backward()
    finally:
        for h in handles:
            h.remove()
    assert sorted(seen) == list(range(1, 13)), "every backbone block runs once, through its module"
    for i, (in_grad, out_grad, grad_fn) in seen.items():
        if i <= adapt_from:  # blocks 1…M see a frozen input: nothing recorded
            assert not in_grad and not out_grad and grad_fn is None, f"block {i}"
        else:  # after the first add-back the input carries the side network
            assert in_grad and out_grad and grad_fn is not None, f"block {i}"


def test_swin_trunk_records_no_autograd(side_backend):
    bb = timm.create_model(SWIN, pretrained=False, num_classes=0, **SWIN_KW)
    model = DTLSwin(bb, conv_kernel=5, num_classes=4).train()  # defaults: taps 5…, M = 8
    blocks = [b for layer in model.backbone.layers for b in layer.blocks]
    seen, handles = _record_blocks(blocks)
    try:
        model(torch.randn(2, 3, 64, 64)).sum().backward()
    finally:
        for h in handles:
            h.remove()
    assert sorted(seen) == list(range(1, 13))
    for i, (in_grad, out_grad, grad_fn) in seen.items():
        if i <= 8:
            assert not in_grad and not out_grad and grad_fn is None, f"block {i}"
        else:
            assert in_grad and out_grad and grad_fn is not None, f"block {i}"


@pytest.mark.parametrize("family", ["vit", "swin"])
def test_only_side_network_and_head_train(family):
    if family == "vit":
        bb = timm.create_model(VIT, pretrained=False, num_classes=0, img_size=32)
        model = DTLViT(bb, conv_kernel=3, num_classes=4)
        images = torch.randn(2, 3, 32, 32)
    else:
        bb = timm.create_model(SWIN, pretrained=False, num_classes=0, **SWIN_KW)
        model = DTLSwin(bb, conv_kernel=5, num_classes=4)
        images = torch.randn(2, 3, 64, 64)
    for name, p in model.backbone.named_parameters():
        assert not p.requires_grad, f"backbone parameter {name} must be frozen"
    trainable = [p for p in model.parameters() if p.requires_grad]
    official = model.official_state_dict()
    assert sum(p.numel() for p in trainable) == sum(v.numel() for v in official.values())
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in trainable}
    model.train()
    model(images).sum().backward()
    for name, p in model.backbone.named_parameters():
        assert p.grad is None, f"backbone parameter {name} got a gradient"
    # At init (B = 0, θ(0) = 0) the A_i and the conv get zero gradient, the B_i and head do.
    grads = package_grads_official(model)
    for key in ("head.weight", *[k for k in grads if k.endswith("lora_B")]):
        assert grads[key].abs().max() > 0, f"{key} got no gradient"


@pytest.mark.parametrize("adapt_from,conv_kernel", [(7, 0), (7, 3), (1, 4)])
def test_eva_matches_reference(adapt_from, conv_kernel, side_backend):
    """timm's Eva (EVA-02: rotary embeddings handed to every block) through DTLEva against
    the published ViT formulation with the blocks called as timm calls them."""
    from dtl_kernels import DTLEva

    bb_ref, bb_pkg = _vit_pair("eva02_tiny_patch14_224", img_size=(56, 70))
    model = DTLEva(bb_pkg, adapt_from=adapt_from, conv_kernel=conv_kernel, num_classes=5)
    model = model.double().eval()
    ref_kw = dict(adapt_from=adapt_from, conv=conv_kernel > 0)
    check_against_reference(model, ref_vit_logits, bb_ref, _images((BATCH, 3, 56, 70)), ref_kw)
