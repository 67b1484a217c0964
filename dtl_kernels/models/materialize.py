"""A backbone built on the meta device, given real tensors in the dtype it will train in
(issue 21): no float32 copy of frozen weights ever exists.

``create_model(name, backbone_dtype=torch.bfloat16)`` builds the timm backbone on the meta
device (shapes, no memory), wraps it (the CSN and the head are built as always: float32,
the published init), then :func:`materialize_backbone` gives every backbone tensor its
memory on the target device: frozen floating parameters directly in ``dtype``, anything
trainable in its own dtype. The values come from a checkpoint, mapped and converted one
tensor at a time (:mod:`.weight_files`; the parameter *is* the converted tensor, as
``load_state_dict(assign=True)`` makes it), or from timm's own initialisation run in
``dtype`` on the device (random weights, for benchmarks). Buffers timm computes rather than
saves (rotary tables, Swin's relative indices) are recomputed on the device.

Host memory while building a backbone of ``P`` parameters into ``dtype`` on the CPU: the
``P`` weights in ``dtype``, plus one checkpoint tensor in its file's dtype at a time (and
whatever timm's key filter recomputes); on a GPU the host holds one tensor at a time.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .backbone_files import fitted_state
from .weight_files import open_weights

# checkpoint formats read tensor by tensor (Google's .npz is read whole by timm)
LAZY_SUFFIXES = (".safetensors", ".json", ".pth", ".pt", ".bin", ".tar", ".ckpt")
_BATCH_BYTES = 256 * 2**20  # converted tensors handed to load_state_dict together


def lean_reason(backbone: nn.Module, weights) -> str | None:
    """Why ``backbone`` (built on the meta device) cannot be materialised here, or ``None``.

    ``weights``: a checkpoint path, or ``None`` for random weights (which need timm's
    ``init_weights(needs_reset=...)``). Every computed (non-persistent) buffer must have a
    module that recomputes it (timm's ``init_non_persistent_buffers``)."""
    if weights is None:
        init = getattr(backbone, "init_weights", None)
        if not callable(init) or "needs_reset" not in inspect.signature(init).parameters:
            return f"{type(backbone).__name__} has no init_weights(needs_reset=...)"
    elif not str(weights).lower().endswith(LAZY_SUFFIXES) and not Path(weights).is_dir():
        return f"{weights} is not read tensor by tensor"
    for name, module in backbone.named_modules():
        computed = {
            b for b in module._non_persistent_buffers_set if module._buffers.get(b) is not None
        }
        if computed and not callable(getattr(module, "init_non_persistent_buffers", None)):
            return f"{name or 'the backbone'} has computed buffers {sorted(computed)}"
    return None


def materialize_backbone(
    backbone: nn.Module,
    dtype: torch.dtype | None,
    device: torch.device | str,
    weights=None,
) -> None:
    """Give every meta tensor of ``backbone`` memory on ``device`` and its values.

    Args:
        backbone: built on the meta device (parameters already real, e.g. a new trainable
            classifier, are kept as they are).
        dtype: the dtype of frozen floating parameters (``None``: their own).
        device: where the tensors live.
        weights: a checkpoint (:func:`.weight_files.open_weights`), or ``None``: timm's
            random initialisation, run in ``dtype`` on ``device``.
    """
    device = torch.device(device)
    if weights is None:
        _random(backbone, dtype, device)
    else:
        _load(backbone, dtype, device, weights)
    _recompute_buffers(backbone, device)
    left = [n for n, t in (*backbone.named_parameters(), *backbone.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError(f"{type(backbone).__name__}: no values for {left[:10]}")


def _target_dtype(t: torch.Tensor, dtype: torch.dtype | None) -> torch.dtype:
    """Frozen floating parameters go to ``dtype``; trainable ones and buffers keep theirs
    (:func:`dtl_kernels.memory.set_backbone_dtype` casts floating buffers afterwards)."""
    frozen = isinstance(t, nn.Parameter) and not t.requires_grad
    return dtype if dtype is not None and frozen and t.is_floating_point() else t.dtype


def _empty(module: nn.Module, dtype, device, names=None) -> None:
    """Uninitialised memory for ``module``'s own meta tensors (``names``: only these)."""
    for store in (module._parameters, module._buffers):
        for name, t in store.items():
            if t is None or not t.is_meta or (names is not None and name not in names):
                continue
            new = torch.empty_like(t, device=device, dtype=_target_dtype(t, dtype))
            store[name] = nn.Parameter(new, t.requires_grad) if isinstance(t, nn.Parameter) else new


def _random(backbone: nn.Module, dtype, device) -> None:
    """timm's own initialisation, in ``dtype`` on ``device``; tensors that were already
    real (a classifier the wrapper made) keep their values."""
    kept = {n: t.detach().clone() for n, t in backbone.state_dict(keep_vars=True).items()
            if not t.is_meta}  # fmt: skip
    for module in backbone.modules():
        _empty(module, dtype, device)
    low = [p for p in backbone.parameters() if p.is_floating_point() and p.dtype != torch.float32]
    with torch.no_grad(), _Float32Init(low):
        backbone.init_weights(needs_reset=True)
    with torch.no_grad():
        own = backbone.state_dict(keep_vars=True)
        for n, t in kept.items():
            own[n].copy_(t)


class _Float32Init(TorchDispatchMode):
    """Initialisers run in float32 on tensors kept in a lower dtype, one tensor at a time.

    timm initialises a tensor with a chain of in-place operations (``trunc_normal_``:
    uniform, erfinv, scale, shift, clamp). Run in bfloat16, the uniform draws within 2⁻⁸
    of ±1 round to ±1 and erfinv sends them to the clamp: 0.4 % of the weights would be
    ±2. Here every in-place operation on one of ``tensors`` runs on a float32 shadow of it
    (made when the chain starts, from the tensor's values) and is written back rounded; the
    shadow lives until an operation touches another tensor, so the chain is computed in
    float32 and rounded once, as an float32 init cast afterwards, at the cost of one tensor
    in float32."""

    def __init__(self, tensors: list[torch.Tensor]):
        super().__init__()
        self._low = {_key(t) for t in tensors}
        self._shadow: tuple[tuple, torch.Tensor] | None = None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        target = args[0] if args and isinstance(args[0], torch.Tensor) else None
        schema = func._schema
        inplace = bool(schema.arguments) and schema.arguments[0].alias_info is not None and (
            schema.arguments[0].alias_info.is_write
        )  # fmt: skip
        if target is None or not inplace or _key(target) not in self._low:
            return func(*args, **kwargs)
        key = _key(target)
        if self._shadow is None or self._shadow[0] != key:
            self._shadow = (key, target.float())
        shadow = self._shadow[1]
        func(shadow, *args[1:], **kwargs)
        target.copy_(shadow)
        return target


def _key(t: torch.Tensor) -> tuple:
    """Which memory ``t`` is (the same parameter seen through the dispatcher)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), t.dtype)


def _load(backbone: nn.Module, dtype, device, path) -> None:
    """The checkpoint's tensors converted one at a time and assigned as the parameters
    (``load_state_dict(assign=True)``, in batches of about :data:`_BATCH_BYTES`); each
    tensor's file pages are released once converted. A parameter the checkpoint does not
    hold (a classifier head, which DTL replaces) gets its module's ``reset_parameters``."""
    weights = open_weights(path)
    state = fitted_state(weights.tensors, backbone, path)
    own = backbone.state_dict(keep_vars=True)
    batch, size = {}, 0
    for name in list(state):
        src = state.pop(name)
        target = own[name]
        batch[name] = src.to(device=device, dtype=_target_dtype(target, dtype), copy=True)
        weights.release(src)
        if batch[name].is_floating_point() and not torch.isfinite(batch[name]).all():
            raise ValueError(f"{path}: {name} holds NaN or infinite values (in "
                             f"{batch[name].dtype}: beyond its range?)")  # fmt: skip
        size += batch[name].nbytes
        del src
        if size >= _BATCH_BYTES:
            backbone.load_state_dict(batch, strict=False, assign=True)
            batch, size = {}, 0
    if batch:
        backbone.load_state_dict(batch, strict=False, assign=True)
    del weights, state, batch
    for module in backbone.modules():  # what the checkpoint lacks (heads): a fresh init
        own_params = {n: p for n, p in module._parameters.items() if p is not None}
        missing = [n for n, p in own_params.items() if p.is_meta]
        if missing:
            reset = getattr(module, "reset_parameters", None)
            if not callable(reset) or len(missing) < len(own_params):  # would reset loaded ones
                raise ValueError(f"{path} does not hold {missing} of {type(module).__name__}")
            _empty(module, dtype, device, set(missing))
            with torch.no_grad():
                reset()


def _recompute_buffers(backbone: nn.Module, device) -> None:
    """Buffers timm computes from the configuration (not saved): memory, then values."""
    for module in backbone.modules():
        if callable(getattr(module, "init_non_persistent_buffers", None)):
            _empty(module, None, device)
            module.init_non_persistent_buffers()
