"""Adapter files from others (``models/adapters.py``, ``models/adapter_description.py``):
every size, count and hyper-parameter of the metadata (what it records for predicting too:
model, preprocessing, class names, training data) is bounded — by sane limits, by the
file's own tensor shapes, by the backbone — before a model is built from it, through every
entry point (``model_from_adapter``, ``MultiTaskDTL``, ``load_adapter``,
``from_pretrained``); a hostile file ends in one
:class:`AdapterError` naming the file and the field, without a large allocation."""

from __future__ import annotations

import copy
import json
import random

import pytest
import torch
from fuzz_kit import AllocationGuard, mutants
from safetensors import safe_open
from safetensors.torch import save_file
from timm.models.vision_transformer import VisionTransformer

from dtl_kernels import (
    AdapterError,
    create_model,
    from_pretrained,
    load_adapter,
    model_from_adapter,
    save_adapter,
)
from dtl_kernels.models.multitask import MultiTaskDTL

MIB = 2**20


def small_backbone() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(
        img_size=32, patch_size=16, embed_dim=32, depth=4, num_heads=2, num_classes=0
    ).eval()


@pytest.fixture(scope="module")
def backbone() -> VisionTransformer:
    return small_backbone()


@pytest.fixture(scope="module")
def good(backbone, tmp_path_factory):
    """A valid DTL+ adapter (rank 2, k 3, 3 classes, adapt_from 2) of ``backbone``."""
    model = create_model(copy.deepcopy(backbone), "dtl+", num_classes=3, adapt_from=2)
    return save_adapter(model, tmp_path_factory.mktemp("adapters") / "good.safetensors")


def rewrite(src, dst, config_text=None, edit=None):
    with safe_open(str(src), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    config = json.loads(meta["config"])
    if edit is not None:
        edit(config)
    meta["config"] = config_text if config_text is not None else json.dumps(config)
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _set(path: str, value):
    def edit(config):
        *parents, last = path.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[last] = value

    return edit


HOSTILE = {
    "num_classes 2^22": (_set("num_classes", 2**22), "'num_classes'"),
    "num_classes 2^40": (_set("num_classes", 2**40), "'num_classes'"),
    "conv_kernel 10^6": (_set("csn.conv_kernel", 10**6), "'csn.conv_kernel'"),
    "conv_kernel larger than the file's": (_set("csn.conv_kernel", 9), "'csn.conv_kernel'"),
    "rank 2^40": (_set("csn.rank", 2**40), "'csn.rank'"),
    "rank larger than the file's": (_set("csn.rank", 3), "'csn.rank'"),
    "beta NaN": (_set("csn.beta", float("nan")), "'csn.beta'"),
    "an option the file may not set": (_set("csn.train_backbone", True), "unknown fields"),
    "tap_from beyond the backbone": (_set("csn.tap_from", 60000), "tap_from"),
}


def fresh_entry_points(path):
    """Each way an adapter file becomes a model, on its own copy of the backbone."""
    yield "model_from_adapter", lambda: model_from_adapter(path, small_backbone())
    yield "MultiTaskDTL", lambda: MultiTaskDTL(small_backbone(), {"task": path})
    model = create_model(small_backbone(), "dtl+", num_classes=3, adapt_from=2)
    yield "load_adapter", lambda: load_adapter(model, path)


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_metadata_is_refused_before_the_model_is_built(good, tmp_path, case):
    edit, field = HOSTILE[case]
    path = rewrite(good, tmp_path / "hostile.safetensors", edit=edit)
    for entry, build in fresh_entry_points(path):
        with AllocationGuard(path.stat().st_size + MIB):
            with pytest.raises(AdapterError) as info:
                build()
        assert str(path) in str(info.value) and field in str(info.value), (entry, info.value)


def test_deeply_nested_config_is_an_adapter_error(good, tmp_path):
    deep = '{"method": "dtl+", "x": ' + "[" * 100_000 + "]" * 100_000 + "}"
    path = rewrite(good, tmp_path / "deep.safetensors", config_text=deep)
    for entry, build in fresh_entry_points(path):
        with pytest.raises(AdapterError, match="nested too deeply") as info:
            build()
        assert str(path) in str(info.value), entry


HOSTILE_VALUES = (2**40, 2**22, 10**6, -1, 0, 1, 3, 2.5, float("nan"), float("inf"), None,
                  True, "x", [], {}, [[[[[[]]]]]], {"rank": 2})  # fmt: skip


def _structural_mutant(good_config: dict, rng: random.Random) -> dict:
    config = copy.deepcopy(good_config)
    for _ in range(rng.randint(1, 3)):
        node = config
        while isinstance(node.get(key := rng.choice(sorted(node) + ["extra"])), dict):
            node = node[key]
            if rng.random() < 0.3:
                break
        node[key] = rng.choice(HOSTILE_VALUES)
    return config


def _check(path, outcome: dict) -> None:
    with AllocationGuard(path.stat().st_size + MIB):
        try:
            model_from_adapter(path, small_backbone())
            outcome["loaded"] += 1
        except AdapterError as exc:
            assert str(path) in str(exc), str(exc)
            outcome["refused"] += 1


def test_fuzzed_adapters_load_or_fail_cleanly(good, tmp_path):
    outcome = {"loaded": 0, "refused": 0}
    rng = random.Random(22)
    with safe_open(str(good), framework="pt") as f:
        good_config = json.loads(f.metadata()["config"])
    path = tmp_path / "fuzzed.safetensors"
    for _ in range(120):  # the metadata's values
        mutant = _structural_mutant(good_config, rng)
        rewrite(good, path, config_text=json.dumps(mutant))
        _check(path, outcome)
    for in_place in (False, True):  # the file's bytes: any edit, then edits in place
        for data in mutants(good.read_bytes(), count=60, seed=22, in_place=in_place):
            path.write_bytes(data)
            _check(path, outcome)
    assert outcome["loaded"] > 10 and outcome["refused"] > 100, outcome


# -- what predicting needs (schema /3): model, preprocessing, classes, training data -----------
def rewrite_field(src, dst, field: str, text: str):
    """``src`` with metadata ``field`` replaced by ``text`` (JSON, or anything)."""
    with safe_open(str(src), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    meta[field] = text
    save_file(tensors, str(dst), metadata=meta)
    return dst


def _prep(**change) -> str:
    prep = {"input_size": [3, 32, 32], "interpolation": "bicubic", "crop_pct": 1.0,
            "crop_mode": "squash", "mean": [0.5] * 3, "std": [0.5] * 3}  # fmt: skip
    return json.dumps({**prep, **change})


def _model(**change) -> str:
    model = {"library": "timm", "name": "vit_tiny_patch16_224", "options": {}, "pretrained": None}
    return json.dumps({**model, **change})


PREP, MODEL, CLASSES = "preprocessing", "model", "classes"
HOSTILE_DESCRIPTION = {
    "2^20 class names": (CLASSES, json.dumps(["c"] * 2**20), "'classes'"),
    "a class name of 10^6 characters": (CLASSES, json.dumps(["a" * 10**6, "b", "c"]), "'classes'"),
    "class names that are not text": (CLASSES, json.dumps([1, 2, 3]), "'classes'"),
    "an image of 2^30 pixels a side": (PREP, _prep(input_size=[3, 2**30, 2**30]),
                                       "'preprocessing.input_size'"),
    "1000 channels": (PREP, _prep(input_size=[1000, 32, 32]), "'preprocessing.input_size'"),
    "a NaN mean": (PREP, _prep(mean=[float("nan")] * 3), "'preprocessing.mean'"),
    "a zero std": (PREP, _prep(std=[0, 1, 1]), "'preprocessing.std'"),
    "a crop of nothing": (PREP, _prep(crop_pct=0.0), "'preprocessing.crop_pct'"),
    "a resize to 327680 px a side": (PREP, _prep(input_size=[3, 2**14, 2**14], crop_pct=0.05),
                                     "'preprocessing' resizes images to 327680 px a side"),
    "an unknown filter": (PREP, _prep(interpolation="evil"), "'preprocessing.interpolation'"),
    "an unknown preprocessing field": (PREP, _prep(extra=1), "unknown fields"),
    "preprocessing nested deeply": (PREP, "[" * 100_000 + "]" * 100_000, "nested too deeply"),
    "a model name with control characters": (MODEL, _model(name="vit\n\x00"), "'model.name'"),
    "a model name of 10^6 characters": (MODEL, _model(name="v" * 10**6), "'model.name'"),
    "an unknown library": (MODEL, _model(library="pickle"), "'model.library'"),
    "an img_size of 2^40": (MODEL, _model(options={"img_size": 2**40}),
                            "'model.options.img_size'"),
    "a model option the file may not set": (MODEL, _model(options={"num_classes": 10**9}),
                                            "unknown fields"),
    "a data root of 10^5 characters": ("training", json.dumps({"dataset": "folder",
                                       "data_root": "x" * 10**5}), "'training.data_root'"),
}  # fmt: skip


@pytest.mark.parametrize("case", HOSTILE_DESCRIPTION, ids=list(HOSTILE_DESCRIPTION))
def test_hostile_description_is_refused_before_the_model_is_built(good, tmp_path, case):
    field, text, named = HOSTILE_DESCRIPTION[case]
    path = rewrite_field(good, tmp_path / "hostile.safetensors", field, text)
    entries = [*fresh_entry_points(path), ("from_pretrained", lambda: from_pretrained(path))]
    for entry, build in entries:
        with AllocationGuard(path.stat().st_size + MIB):
            with pytest.raises(AdapterError) as info:
                build()
        assert str(path) in str(info.value) and named in str(info.value), (entry, info.value)


def test_fuzzed_descriptions_load_or_fail_cleanly(good, tmp_path):
    outcome = {"loaded": 0, "refused": 0}
    rng = random.Random(20)
    path = tmp_path / "fuzzed.safetensors"
    training = {"dataset": "folder", "data_root": None, "test_split": "test"}
    fields = {PREP: json.loads(_prep()), MODEL: json.loads(_model()), "training": training}
    for n in range(66):  # every 11th keeps the field valid: the file itself still loads
        field = rng.choice(sorted(fields))
        value = fields[field] if n % 11 == 0 else _structural_mutant(fields[field], rng)
        rewrite_field(good, path, field, json.dumps(value))
        _check(path, outcome)
    assert outcome["loaded"] >= 6 and outcome["refused"] > 40, outcome


@pytest.mark.parametrize("shape", [(), (2,), (2, 3, 4)], ids=["0-d", "1-d", "3-d"])
def test_a_side_network_tensor_of_the_wrong_rank_is_named(good, tmp_path, shape):
    """A csn.down / csn.up tensor that is not a matrix: the error names the rank field and
    the tensor (a 0-d one was reported as an unreadable file, 'tuple index out of range')."""
    with safe_open(str(good), framework="pt") as f:
        meta, tensors = dict(f.metadata()), {k: f.get_tensor(k) for k in f.keys()}
    name = sorted(k for k in tensors if k.startswith("csn.down."))[0]
    tensors[name] = torch.zeros(shape)
    path = tmp_path / "rank.safetensors"
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(AdapterError, match=f"'csn.rank'.*{name}"):
        model_from_adapter(path, small_backbone())
