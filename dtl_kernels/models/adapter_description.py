"""What predicting with an adapter needs, as the file records it (schema
``dtl_kernels.adapter/3``): how to build the backbone again (``model``), the input
preprocessing it was trained with (``preprocessing``, timm's data config), the class names
in label order (``classes``) and the data it was trained on (``training``).

Every field comes from a file of someone else's: each is parsed with bounded nesting and
checked — types, lengths, ranges, the class count against the head — before anything is
built from it (:func:`check_description`). Older adapters lack them; each is then ``None``.
"""

from __future__ import annotations

import math
import re

from .._untrusted import escape_controls, has_control

# timm's interpolation and crop names (timm.data.transforms: str_to_interp_mode, crop modes)
INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "box", "hamming", "lanczos")
CROP_MODES = ("center", "squash", "border")
LIBRARIES = ("timm", "transformers")
# The backbone options an adapter may record: what changes the backbone's shape.
MODEL_OPTIONS = ("img_size", "dynamic_img_size", "in_chans")
MAX_SIZE = 2**14  # --img-size's limit, and of the side images are resized to before a crop
MAX_CHANNELS = 16
MAX_TEXT = 4096  # a path or a model name
MAX_CLASS_NAME = 256
_NAME = re.compile(r"[^\x00-\x1f\x7f]+")  # a timm name, a hub id or a local path: no controls


def check_description(fields: dict, num_classes: int, fail) -> dict:
    """The parsed ``model``, ``preprocessing``, ``classes`` and ``training`` of an adapter
    (``fields``: each parsed JSON or ``None``), each checked; ``fail(problem)`` raises."""
    return {
        "model": _model(fields.get("model"), fail),
        "preprocessing": _preprocessing(fields.get("preprocessing"), fail),
        "classes": _classes(fields.get("classes"), num_classes, fail),
        "training": _training(fields.get("training"), fail),
    }


def resize_side(side: int, crop_pct: float) -> int:
    """The side an image is resized to before timm's evaluation transform crops ``side``
    out of it (``timm.data.transforms_factory``: ``floor(side / crop_pct)``)."""
    return math.floor(side / crop_pct)


def _text(value, limit: int = MAX_TEXT) -> bool:
    return isinstance(value, str) and 0 < len(value) <= limit


def _whole(value, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 70 else text[:67] + "..."


def _mapping(value, field: str, keys: tuple[str, ...], fail) -> dict | None:
    if value is None:
        return None
    if not isinstance(value, dict):
        fail(f"metadata '{field}' is {_short(value)}, expected a mapping")
    unknown = sorted(set(value) - set(keys))
    if unknown:
        fail(f"metadata '{field}' has unknown fields {_short(unknown)}")
    return value


def _model(value, fail) -> dict | None:
    keys = ("library", "name", "options", "pretrained")
    m = _mapping(value, "model", keys, fail)
    if m is None:
        return None
    if m.get("library") not in LIBRARIES:
        fail(f"'model.library' is {_short(m.get('library'))}, expected one of {LIBRARIES}")
    if not (_text(m.get("name")) and _NAME.fullmatch(m["name"])):
        fail(f"'model.name' is {_short(m.get('name'))}, expected a model name")
    pretrained = m.get("pretrained")
    if pretrained is not None and not _text(pretrained):
        fail(f"'model.pretrained' is {_short(pretrained)}, expected a name or a path")
    options = _mapping(m.get("options") or {}, "model.options", MODEL_OPTIONS, fail)
    size = options.get("img_size")
    if size is not None and not (
        _whole(size, 1, MAX_SIZE)
        or (isinstance(size, list) and len(size) == 2 and all(_whole(v, 1, MAX_SIZE) for v in size))
    ):
        fail(f"'model.options.img_size' is {_short(size)}, expected a size in 1…{MAX_SIZE}")
    if not isinstance(options.get("dynamic_img_size", False), bool):
        fail(f"'model.options.dynamic_img_size' is {_short(options['dynamic_img_size'])}")
    if "in_chans" in options and not _whole(options["in_chans"], 1, MAX_CHANNELS):
        fail(f"'model.options.in_chans' is {_short(options['in_chans'])}")
    return {"library": m["library"], "name": m["name"], "options": dict(options),
            "pretrained": pretrained}  # fmt: skip


def _preprocessing(value, fail) -> dict | None:
    keys = ("input_size", "interpolation", "crop_pct", "crop_mode", "mean", "std")
    p = _mapping(value, "preprocessing", keys, fail)
    if p is None:
        return None
    size = p.get("input_size")
    if not (
        isinstance(size, list)
        and len(size) == 3
        and _whole(size[0], 1, MAX_CHANNELS)
        and all(_whole(v, 1, MAX_SIZE) for v in size[1:])
    ):
        fail(f"'preprocessing.input_size' is {_short(size)}, expected [channels, H, W]")
    if p.get("interpolation") not in INTERPOLATIONS:
        fail(f"'preprocessing.interpolation' is {_short(p.get('interpolation'))}, expected one "
             f"of {INTERPOLATIONS}")  # fmt: skip
    if not (_number(p.get("crop_pct")) and 0.05 <= p["crop_pct"] <= 1.0):
        fail(f"'preprocessing.crop_pct' is {_short(p.get('crop_pct'))}, expected 0.05…1")
    # each bounded alone, together they reached 327680 px a side (hundreds of GB an image)
    resized = resize_side(max(size[1:]), p["crop_pct"])
    if resized > MAX_SIZE:
        fail(f"'preprocessing' resizes images to {resized} px a side (input_size "
             f"{max(size[1:])} / crop_pct {p['crop_pct']:g}), more than {MAX_SIZE}")  # fmt: skip
    if p.get("crop_mode") not in CROP_MODES:
        fail(f"'preprocessing.crop_mode' is {_short(p.get('crop_mode'))}, expected one of "
             f"{CROP_MODES}")  # fmt: skip
    channels = size[0]
    for key, low in (("mean", -1e3), ("std", 1e-6)):
        v = p.get(key)
        if not (
            isinstance(v, list) and len(v) == channels and all(_number(x) for x in v)
            and all(low <= x <= 1e3 for x in v)
        ):  # fmt: skip
            fail(f"'preprocessing.{key}' is {_short(v)}, expected {channels} numbers in "
                 f"{low:g}…1000")  # fmt: skip
    return {k: p[k] for k in keys}


def _classes(value, num_classes: int, fail) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, list) or len(value) != num_classes:
        fail(f"metadata 'classes' is {_short(value)}, expected the names of the "
             f"{num_classes} classes")  # fmt: skip
    if not all(_text(c, MAX_CLASS_NAME) for c in value):
        fail(f"metadata 'classes' holds {_short(value)}: each name is text of 1…"
             f"{MAX_CLASS_NAME} characters")  # fmt: skip
    # a control character (written before names were checked, or by someone else) would
    # reach a terminal as an escape through dtl-predict: read as its escape sequence
    return [escape_controls(c) for c in value]


def class_names_problem(names: list) -> str | None:
    """What keeps ``names`` from being recorded as an adapter's class names (``None``:
    nothing): each text of 1…256 characters without control characters (they would reach
    a terminal as escapes through ``dtl-predict``). Names may repeat (ImageNet's do).
    Checked by ``save_adapter`` and by ``dtl-train`` before it trains."""
    if not all(_text(c, MAX_CLASS_NAME) for c in names):
        return f"each name is text of 1…{MAX_CLASS_NAME} characters"
    bad = [c for c in names if has_control(c)]
    if bad:
        return f"{bad[0]!r} holds a control character"
    return None


def _training(value, fail) -> dict | None:
    keys = ("dataset", "data_root", "test_split")
    t = _mapping(value, "training", keys, fail)
    if t is None:
        return None
    if not _text(t.get("dataset"), MAX_CLASS_NAME):
        fail(f"'training.dataset' is {_short(t.get('dataset'))}, expected a dataset name")
    for key in ("data_root", "test_split"):
        if t.get(key) is not None and not _text(t[key]):
            fail(f"'training.{key}' is {_short(t[key])}, expected a path or null")
    return {k: t.get(k) for k in keys}
