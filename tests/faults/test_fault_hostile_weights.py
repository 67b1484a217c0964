"""Backbone weights from someone else's file (``create_model(..., pretrained=PATH)``, the
classic path, and with ``backbone_dtype``, the lean one): a small file never expands into
gigabytes, and weights that are no float weights are refused by name, not loaded."""

from __future__ import annotations

import json
import pickle
import pickletools
import warnings
import zipfile

import numpy as np
import pytest
import torch

from dtl_kernels import create_model

VIT = "vit_tiny_patch16_224"
OPTS = dict(num_classes=3, img_size=32)


def _state():
    return create_model(VIT, "linear", **OPTS).backbone.state_dict()


def _build(path, lean: bool):
    extra = {"backbone_dtype": torch.bfloat16} if lean else {}
    return create_model(VIT, "dtl", pretrained=str(path), **OPTS, **extra)


def _deflated(src, dst):
    """The same torch.save archive with its members compressed (a zip bomb's shape)."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w", zipfile.ZIP_DEFLATED) as b:
        for m in a.infolist():
            b.writestr(m.filename, a.read(m.filename))
    return dst


@pytest.mark.parametrize("lean", [False, True], ids=["classic", "lean"])
def test_a_compressed_archive_is_refused_unread(tmp_path, lean):
    torch.save(_state(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match="compressed"):
        _build(_deflated(tmp_path / "w.pth", tmp_path / "z.pth"), lean)


@pytest.mark.parametrize("lean", [False, True], ids=["classic", "lean"])
@pytest.mark.parametrize(
    "edit,match",
    [
        (lambda s: s.update({"patch_embed.proj.weight": torch.zeros(1).expand(1, 1, 128, 128)}),
         "expanded tensor"),
        (lambda s: s.update({"patch_embed.proj.weight": torch.zeros(1, 1, 128, 128)}),
         "not a patch kernel"),
        (lambda s: s.update({"pos_embed": torch.zeros(5)}), "checkpoint filter failed"),
        (lambda s: s.update({"norm.weight": s["norm.weight"].to(torch.int64)}), "non-float"),
        (lambda s: s.update({"norm.weight": s["norm.weight"].to(torch.complex64)}),
         "non-float"),
        (lambda s: s["norm.weight"].__setitem__(0, float("nan")), "NaN or infinite"),
    ],
    ids=["stride-0", "huge-kernel", "1-d-pos-embed", "int", "complex", "nan"],
)  # fmt: skip
def test_weights_that_are_no_weights_are_refused_by_name(tmp_path, lean, edit, match):
    state = _state()
    edit(state)
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(ValueError, match=match) as info:
        _build(tmp_path / "w.pth", lean)
    assert str(tmp_path / "w.pth") in str(info.value)


def test_a_value_beyond_the_backbone_dtype_is_refused(tmp_path):
    state = _state()
    state["norm.weight"][0] = 1e6  # finite in float32, inf in float16
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="NaN or infinite"):
        create_model(VIT, "dtl", pretrained=str(tmp_path / "w.pth"), backbone_dtype=torch.float16,
                     **OPTS)  # fmt: skip


def test_an_npz_that_would_expand_is_refused(tmp_path):
    np.savez_compressed(tmp_path / "bomb.npz", x=np.zeros(2**26, dtype=np.float32))
    with pytest.raises(ValueError, match="refusing to expand"):
        create_model(VIT, "dtl", pretrained=str(tmp_path / "bomb.npz"), **OPTS)


@pytest.mark.parametrize("lean", [False, True], ids=["classic", "lean"])
def test_a_pretrained_layer_named_head_must_be_in_the_checkpoint(tmp_path, lean):
    """Only the classifier (ConvNeXt's head.fc) may be missing: head.norm is a pretrained
    layer the published head uses, not to be left at its initial values."""
    kw = dict(num_classes=3, depths=(1, 1, 1, 1), dims=(8, 16, 24, 32))
    state = create_model("convnext_atto", "linear", **kw).backbone.state_dict()
    torch.save(state, tmp_path / "ok.pth")
    torch.save({k: v for k, v in state.items() if not k.startswith("head.norm")},
               tmp_path / "no-norm.pth")  # fmt: skip
    extra = {"backbone_dtype": torch.bfloat16} if lean else {}
    create_model("convnext_atto", "dtl", pretrained=str(tmp_path / "ok.pth"), **kw, **extra)
    with pytest.raises(ValueError, match=r"missing \['head\.norm"):
        create_model("convnext_atto", "dtl", pretrained=str(tmp_path / "no-norm.pth"), **kw,
                     **extra)  # fmt: skip


def _rewrite_pickle(src, dst, edit):
    """The torch.save archive ``src`` with its ``data.pkl`` passed through ``edit``."""
    with zipfile.ZipFile(src) as a, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as b:
        for m in a.infolist():
            data = a.read(m.filename)
            b.writestr(m, edit(data) if m.filename.endswith("/data.pkl") else data)
    return dst


def _one_more_element(pkl: bytes) -> bytes:
    """The first storage declares one element more than its record holds (the tensor on
    it keeps its shape): the integer right before the first persistent id's tuple."""
    ops = list(pickletools.genops(pkl))
    at = next(i for i, (op, _, _) in enumerate(ops) if op.name == "BINPERSID")
    at = max(i for i in range(at) if ops[i][0].name == "TUPLE")  # (…, key, location, numel)
    op, value, pos = ops[at - 1]
    assert op.name in ("BININT1", "BININT2", "BININT")
    width = {"BININT1": 1, "BININT2": 2, "BININT": 4}[op.name]
    signed = op.name == "BININT"
    return (
        pkl[: pos + 1]
        + (value + 1).to_bytes(width, "little", signed=signed)
        + pkl[pos + 1 + width :]
    )


@pytest.mark.parametrize("lean", [False, True], ids=["classic", "lean"])
def test_a_storage_larger_than_its_record_is_refused(tmp_path, lean):
    """torch.load(mmap=True) would slice the file by the declared size and read the next
    record's bytes; the mapped reader compares it with the record."""
    torch.save(_state(), tmp_path / "w.pth")
    bad = _rewrite_pickle(tmp_path / "w.pth", tmp_path / "bad.pth", _one_more_element)
    with pytest.raises(ValueError, match=r"declares \d+ bytes, its record holds \d+") as info:
        _build(bad, lean)
    assert str(bad) in str(info.value)


@pytest.mark.parametrize("lean", [False, True], ids=["classic", "lean"])
def test_two_tensors_of_one_name_after_the_ddp_prefix_are_refused(tmp_path, lean):
    state = _state()
    state["module.norm.weight"] = torch.zeros_like(state["norm.weight"])
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="two tensors are named 'norm.weight'"):
        _build(tmp_path / "w.pth", lean)


def _safetensors_with_header(path, edit_header, extra: bytes = b""):
    """Rewrite a safetensors file's JSON header (as text) and append ``extra`` bytes."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = edit_header(raw[8 : 8 + n].decode()).encode()
    path.write_bytes(len(header).to_bytes(8, "little") + header + raw[8 + n :] + extra)
    return path


def _same_bytes_twice(text: str) -> str:
    """norm.bias's entry points at norm.weight's bytes (both 192 float32)."""
    header = json.loads(text)
    header["norm.bias"]["data_offsets"] = header["norm.weight"]["data_offsets"]
    return json.dumps(header)


def _a_key_twice(text: str) -> str:
    """norm.weight's entry written a second time at the header's end."""
    again = json.dumps(json.loads(text)["norm.weight"])
    return text.rstrip()[:-1] + f', "norm.weight": {again}}}'


@pytest.mark.parametrize("lean", [False, True], ids=["classic", "lean"])
@pytest.mark.parametrize(
    "edit,extra,match",
    [
        (_same_bytes_twice, b"", "overlaps another tensor|unowned"),
        (lambda t: t, b"\0" * 64, r"end at byte \d+ of \d+ data bytes"),
        (_a_key_twice, b"", "'norm.weight' is given twice"),
    ],
    ids=["shared-bytes", "trailing-bytes", "duplicate-key"],
)  # fmt: skip
def test_a_safetensors_file_the_format_forbids_is_refused(tmp_path, lean, edit, extra, match):
    from safetensors.torch import save_file

    save_file(_state(), str(tmp_path / "w.safetensors"))
    path = _safetensors_with_header(tmp_path / "w.safetensors", edit, extra)
    with pytest.raises(ValueError, match=match):
        _build(path, lean)


def test_a_sharded_folder_is_checked_for_nan_as_a_single_file_is(tmp_path):
    from safetensors.torch import save_file

    state = _state()
    state["norm.weight"][3] = float("inf")
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(ValueError, match=r"NaN or infinite values in \['norm.weight'\]"):
        _build(tmp_path, lean=False)


@pytest.mark.parametrize("lean", [False, True], ids=["classic", "lean"])
def test_ddp_prefixes_are_removed_from_a_safetensors_file_as_timm_removes_them(tmp_path, lean):
    from safetensors.torch import save_file

    state = _state()
    save_file({f"module.{k}": v for k, v in state.items()}, str(tmp_path / "w.safetensors"))
    got = _build(tmp_path / "w.safetensors", lean).backbone.state_dict()
    cast = torch.bfloat16 if lean else torch.float32
    for k in ("norm.weight", "blocks.0.attn.qkv.weight"):
        torch.testing.assert_close(got[k], state[k].to(cast), rtol=0, atol=0)


def _saved(tmp_path, obj, name="w.pth", **kw):
    torch.save(obj, tmp_path / name, **kw)
    return tmp_path / name


def _grown_empty_tensor(pkl: bytes) -> bytes:
    """The first tensor, on an empty storage, given shape (4,) instead of (0,): torch's
    rebuild would grow the storage (uninitialised memory as weights)."""
    ops = list(pickletools.genops(pkl))
    at = next(i for i, (op, _, _) in enumerate(ops) if op.name == "BINPERSID")
    ints = [(v, pos) for op, v, pos in ops[at:] if op.name == "BININT1"]
    (offset, _), (size, pos) = ints[0], ints[1]
    assert offset == 0 and size == 0
    return pkl[: pos + 1] + bytes([4]) + pkl[pos + 2 :]


@pytest.mark.parametrize("lean", [False, True], ids=["classic", "lean"])
@pytest.mark.parametrize(
    "case,match",
    [
        ("bytearray", "names builtins.bytearray, which a checkpoint of weights does not need"),
        ("grown-empty", "is not on a storage read from the file's records"),
        ("huge-ints", "more than 1000 integers beyond 2"),
        ("member-twice", "is in the archive twice"),
        ("self-overlap", "overlaps itself"),
    ],
)
def test_a_torch_archive_that_needs_more_than_weights_is_refused(tmp_path, lean, case, match):
    """What torch's weights-only load would run or build: a huge allocation from a few
    bytes, weights of uninitialised memory, a dict whose keys all hash alike (quadratic),
    a record given twice, a view standing for far more elements than its storage."""
    ok = _saved(tmp_path, {"x": torch.empty(0)}, "ok.pth")
    bad = tmp_path / "bad.pth"
    if case == "bytearray":  # bytearray(10**9): on torch's list, 1 GB from 40 bytes
        bomb = b"\x80\x02cbuiltins\nbytearray\nJ\x00\xca\x9a;\x85R."
        _rewrite_pickle(ok, bad, lambda _: bomb)
    elif case == "grown-empty":
        _rewrite_pickle(ok, bad, _grown_empty_tensor)
    elif case == "huge-ints":
        keys = {k * (2**61 - 1): 0 for k in range(1, 1002)}
        _rewrite_pickle(ok, bad, lambda _: pickle.dumps(keys, protocol=2))
    elif case == "member-twice":
        with zipfile.ZipFile(ok) as a, zipfile.ZipFile(bad, "w") as b, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # zipfile's "Duplicate name"
            for m in [*a.infolist(), a.infolist()[-1]]:
                b.writestr(zipfile.ZipInfo(m.filename), a.read(m.filename))
    else:
        state = _state()
        state["pos_embed"] = torch.zeros(196).as_strided((1, 5, 192), (1, 1, 1))  # 960 on 196
        torch.save(state, bad)
    with pytest.raises(ValueError, match=match) as info:
        _build(bad, lean)
    assert str(bad) in str(info.value)


def test_a_torch_archive_loads_as_torch_loads_it(tmp_path):
    from dtl_kernels.models.torch_archive import read_mapped

    state = _state()
    state["tied"] = state["norm.weight"][2:10]  # a view of another tensor's storage
    state["bf16"] = state["norm.bias"].to(torch.bfloat16)
    state["u16"] = torch.tensor([1, 2, 3]).to(torch.uint16)  # an untyped storage (v3 rebuild)
    state["param"] = torch.nn.Parameter(torch.ones(2))
    path = _saved(tmp_path, {"state_dict": state, "epoch": 3, "dev": torch.device("cpu")})
    got = read_mapped(path).value["state_dict"]
    want = torch.load(path, weights_only=True)["state_dict"]
    assert list(got) == list(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and torch.equal(got[k], want[k]), k
    assert (
        got["tied"].untyped_storage().data_ptr() == got["norm.weight"].untyped_storage().data_ptr()
    )


def test_a_protocol_4_archive_is_one_error_naming_the_file(tmp_path):
    """torch's weights-only unpickler reads no FRAME (pickle protocol 4): neither can this."""
    from dtl_kernels.models.torch_archive import read_mapped

    path = _saved(tmp_path, {"w": torch.ones(2)}, pickle_protocol=4)
    with pytest.raises(ValueError, match="STACK_GLOBAL, which torch.save never writes") as info:
        read_mapped(path)
    assert str(path) in str(info.value)


def test_a_legacy_torch_file_is_scanned_as_an_archive_is(tmp_path):
    """A pre-1.6 (non-zip) file: the same pickle scan before torch.load runs it."""
    state = _state()
    torch.save(state, tmp_path / "ok.pth", _use_new_zipfile_serialization=False)
    got = create_model(VIT, "dtl", pretrained=str(tmp_path / "ok.pth"), **OPTS).backbone
    torch.testing.assert_close(got.state_dict()["norm.weight"], state["norm.weight"])
    raw = (tmp_path / "ok.pth").read_bytes()
    first = len(pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2))  # the magic number's pickle
    bomb = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2) + (
        b"\x80\x02cbuiltins\nbytearray\nJ\x00\xca\x9a;\x85R."
    )
    (tmp_path / "bad.pth").write_bytes(bomb + raw[first:])
    with pytest.raises(ValueError, match="names builtins.bytearray"):
        _build(tmp_path / "bad.pth", lean=False)
