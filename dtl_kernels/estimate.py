"""Will it fit? Peak training memory predicted without running a step.

:func:`estimate_memory` copies the model as *fake* tensors (shapes and dtypes, no data:
``torch._subclasses.fake_tensor``), then runs two training steps on them — forward, cross
entropy, backward, AdamW step, ``zero_grad(set_to_none=True)``, as ``dtl-train`` does —
while a dispatch mode follows every tensor storage from its creation to its release. The
peak of the live bytes is the prediction, split into what holds it: the parameters, their
gradients, the optimizer state and the activations (everything else a step creates:
tensors saved for backward, gradients of activations, temporaries). The same kernels decide
what is saved (the fused side op's own fake kernel, the attention kernel of the device), so
the simulation follows the memory options (``trunk_dtype``, ``checkpoint_tail``,
``backbone_dtype``) and the precision without a model of them.

A model built on the meta device (``create_model(..., device="meta")``: shapes only, for a
model larger than this machine) is simulated on the CPU, or on ``device=``, without ever
being materialised; its prediction is the materialised model's.

It counts tensor memory, as ``torch.cuda.max_memory_allocated`` does on a GPU: not the
allocator's slack, library workspaces (cuBLAS, oneDNN) or the framework itself; not the
input batch (data) either, nor temporaries a kernel allocates inside itself that its fake
kernel does not (the Triton backward's partial sums, ≤ 10 % of a block output). On this
CPU the measured peak of the process's resident set during two real steps is within the
tested bounds of the prediction (``tests/test_estimate.py``).
"""

from __future__ import annotations

import copy
import weakref
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .optim import adamw

_GiB = 2**30


@dataclass
class MemoryEstimate:
    """Predicted peak training memory in bytes.

    ``parameters``: every parameter (frozen ones included); ``gradients``: the trainable
    parameters' gradients; ``optimizer_state``: AdamW's two moments; ``activations``: the
    rest of the step's peak (saved activations, gradients of activations, temporaries).
    ``peak`` is their sum at the peak of the live bytes; ``training_peak`` is ``peak``
    without the parameters (what a step adds to a loaded model).
    """

    parameters: int
    gradients: int
    optimizer_state: int
    activations: int
    batch_size: int
    image_size: int
    precision: str
    details: dict = field(default_factory=dict)

    @property
    def peak(self) -> int:
        return self.parameters + self.training_peak

    @property
    def training_peak(self) -> int:
        return self.gradients + self.optimizer_state + self.activations

    def __str__(self) -> str:
        rows = [
            ("parameters", self.parameters),
            ("gradients", self.gradients),
            ("optimizer state (AdamW)", self.optimizer_state),
            ("activations and temporaries", self.activations),
            ("peak", self.peak),
        ]
        head = (
            f"estimated training memory: batch {self.batch_size}, {self.image_size} px, "
            f"{self.precision}"
        )
        return "\n".join(
            [head]
            + [f"  {name:28s} {n / 2**20:10.1f} MiB ({n / _GiB:.2f} GiB)" for name, n in rows]
        )


class _LiveBytes(TorchDispatchMode):
    """Bytes of the tensor storages alive now and at the peak (each storage once). The
    storages that exist when it starts (parameters, inputs) are not counted."""

    def __init__(self, known: list[torch.Tensor]):
        super().__init__()
        self._known = weakref.WeakSet(t.untyped_storage() for t in known)
        self._seen: weakref.WeakSet = weakref.WeakSet()
        self.live = 0
        self.peak = 0
        self.at_peak: dict[str, int] = {}
        self.probe = None  # () -> dict of named live parts, sampled at each new peak

    def _free(self, nbytes: int) -> None:
        self.live -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in pytree.tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            if st in self._seen or st in self._known:
                continue
            self._seen.add(st)
            nbytes = st.nbytes()
            self.live += nbytes
            weakref.finalize(st, self._free, nbytes)
            if self.live > self.peak:
                self.peak = self.live
                if self.probe is not None:
                    self.at_peak = self.probe()
        return out


def _step_device(model: nn.Module, device: torch.device | str | None) -> torch.device:
    """The device the simulated step runs on: ``device`` (``cpu:0`` is the CPU: CPU tensors
    carry no index), else the model's; a model with real tensors must be on it (``cuda``
    names the device of a model on ``cuda:1``), one built on meta goes anywhere (default:
    the CPU)."""
    want = None if device is None else torch.device(device)
    if want is not None and want.type == "meta":
        raise ValueError("device: the simulated step needs a real device type (cpu, cuda)")
    if want is not None and want.type == "cpu":
        want = torch.device("cpu")
    tensors = (*model.parameters(), *model.buffers())
    real = {t.device for t in tensors if not t.is_meta}
    if not real:
        return want or torch.device("cpu")
    if len(real) > 1:
        names = ", ".join(sorted(str(d) for d in real))
        raise ValueError(f"the model's tensors are on several devices ({names}): "
                         "estimate_memory simulates a step on one")  # fmt: skip
    (have,) = real
    if want is not None and (
        want.type != have.type or (want.index is not None and want.index != have.index)
    ):
        raise ValueError(f"the model's tensors are on {have}, not on device={want}: build it "
                         "there or on 'meta'")  # fmt: skip
    return have


def _fake_copy(model: nn.Module, device: torch.device):
    """``(mode, fake)``: a copy of ``model`` whose tensors are fake (shapes, dtypes, no
    data). Tensors on the meta device (a model built with ``device="meta"``) become fake
    tensors on ``device``, the device the simulated step runs on."""
    from torch._subclasses.fake_tensor import FakeCopyMode, FakeTensorMode

    mode = FakeTensorMode(allow_non_fake_inputs=False)
    memo = {}  # deepcopy takes these in place of the meta tensors
    for t in (*model.parameters(), *model.buffers()):
        if t.is_meta and id(t) not in memo:
            with mode:
                f = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
            memo[id(t)] = nn.Parameter(f, t.requires_grad) if isinstance(t, nn.Parameter) else f
    with FakeCopyMode(mode):
        fake = copy.deepcopy(model, memo)
    return mode, fake


def _bytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        st = t.untyped_storage()
        if id(st) not in seen:  # (kept alive by `tensors` while counting)
            seen.add(id(st))
            total += st.nbytes()
    return total


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _image_size(image_size) -> tuple[int, int]:
    """``(H, W)`` from ``H`` or ``(H, W)``: positive ints, else ``ValueError``."""
    size = (image_size, image_size) if not isinstance(image_size, (tuple, list)) else image_size
    if len(size) != 2 or not all(_positive_int(v) for v in size):
        raise ValueError(f"image_size must be a positive int or (H, W), got {image_size!r}")
    return int(size[0]), int(size[1])


def estimate_memory(
    model: nn.Module,
    batch_size: int,
    image_size: int | tuple[int, int],
    precision: str = "fp32",
    num_classes: int | None = None,
    in_channels: int | None = None,
    channels_last: bool = False,
    grad_accum: int = 1,
    device: torch.device | str | None = None,
) -> MemoryEstimate:
    """Predict the peak memory of training ``model`` (as ``dtl-train`` does: AdamW,
    cross entropy) on ``(batch_size, 3, H, W)`` images, without running it.

    Args:
        model: a DTL / baseline model (any ``nn.Module`` mapping images to logits). Only
            its shapes are read; its weights are not copied (fake tensors).
        image_size: ``H`` (square) or ``(H, W)``.
        precision: ``"fp32"``, ``"bf16"`` or ``"fp16"`` (autocast, as ``--precision``).
        num_classes: the logits' width (default: read from the model; given, it must be
            the model's).
        in_channels: image channels (default: read from the model's patch / stem
            convolution or its config, else 3).
        channels_last: feed the images in channels-last layout (as ``dtl-train`` does for
            CNNs).
        grad_accum: micro-batches of ``batch_size`` images whose gradients add up before
            each optimizer step (``dtl-train --grad-accum``, which trains on micro-batches
            of ``--batch-size / grad_accum``).
        device: the device the simulated step runs on, whose kernels decide what is saved
            (default: the model's; the CPU for a model built on the meta device, e.g.
            ``create_model(..., device="meta")``, whose tensors the copy then places there).
    Returns:
        :class:`MemoryEstimate` (bytes; ``print`` it for a table in GiB).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    h, w = _image_size(image_size)
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels),
                        ("grad_accum", grad_accum)):  # fmt: skip
        if value is not None and not _positive_int(value):
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if not isinstance(channels_last, bool):  # "no" would read as True
        raise TypeError(f"channels_last must be True or False, got {channels_last!r:.40}")
    autocast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
    if precision not in autocast:
        raise ValueError(f"precision must be one of {list(autocast)}, got {precision!r}")
    param = next(model.parameters(), None)
    if param is None:
        raise ValueError("the model has no parameters: nothing to train")
    device = _step_device(model, device)
    mode, fake = _fake_copy(model, device)
    fake.train()
    params = list(fake.parameters())
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ValueError("the model has no trainable parameters")
    channels = in_channels or _in_channels(model)
    if batch_size * channels * h * w > MAX_IMAGE_ELEMENTS:  # Python ints: no overflow here
        raise ValueError(
            f"a ({batch_size}, {channels}, {h}, {w}) image batch has more than "
            f"{MAX_IMAGE_ELEMENTS:.3g} elements: too large for a tensor's sizes"
        )
    layout = torch.channels_last if channels_last else torch.contiguous_format
    with mode:
        images = torch.randn(batch_size, channels, h, w, device=device)
        images = images.contiguous(memory_format=layout)
        optimizer = adamw(trainable, lr=1e-3)
    tracker = _LiveBytes(params + list(fake.buffers()) + [images])

    def parts() -> dict:
        grads = [p.grad for p in trainable if p.grad is not None]
        state = [v for s in optimizer.state.values() for v in s.values() if v.dim() > 0]
        return {"gradients": _bytes(grads), "optimizer_state": _bytes(state)}

    tracker.probe = parts
    dtype = autocast[precision]
    with mode, tracker:
        for _ in range(2):  # the second step has the optimizer state
            ctx = (
                torch.autocast(device.type, dtype=dtype)
                if dtype
                else torch.autocast(device.type, enabled=False)
            )
            # as dtl-train's Stepper: one backward each; a third micro-batch holds what the
            # second held (gradients allocated), so two give the peak of any number
            for _ in range(min(grad_accum, 2)):
                with ctx:
                    logits = _logits(fake, images)
                    _check_width(logits, num_classes)
                    target = torch.zeros(batch_size, dtype=torch.long, device=device)
                    loss = F.cross_entropy(logits.float(), target)
                loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            del logits, loss
    at_peak = tracker.at_peak
    grads, state = at_peak.get("gradients", 0), at_peak.get("optimizer_state", 0)
    return MemoryEstimate(
        parameters=_bytes(params),
        gradients=grads,
        optimizer_state=state,
        activations=max(0, tracker.peak - grads - state),
        batch_size=batch_size,
        image_size=h if h == w else (h, w),
        precision=precision,
        details={"trainable_parameters": sum(p.numel() for p in trainable)},
    )


#: the most elements the simulated image batch may have (its bytes must fit an int64)
MAX_IMAGE_ELEMENTS = 2**58


def _logits(model: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``model(images)``, a ``(batch, classes)`` tensor, or a ``ValueError`` saying the model
    is not one that maps images to logits (the error it raised chained)."""
    shape = tuple(images.shape)
    try:
        logits = model(images)
    except (RuntimeError, ValueError, TypeError, IndexError) as e:
        raise ValueError(
            f"estimate_memory: the model's forward failed on a {shape} image batch "
            f"({type(e).__name__}: {e}); it takes a model that maps images to logits"
        ) from e
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or logits.shape[0] != shape[0]:
        got = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"estimate_memory: the model must map {shape} images to "
                         f"({shape[0]}, classes) logits, got {got}")  # fmt: skip
    return logits


def _in_channels(model: nn.Module) -> int:
    """The image channels the model takes: its config (Hugging Face), its patch embedding
    or stem convolution (timm), else its first convolution, else 3."""
    bb = getattr(model, "backbone", model)
    config = getattr(bb, "config", None)
    if isinstance(getattr(config, "num_channels", None), int):
        return config.num_channels
    for path in ("patch_embed.proj", "conv_stem", "conv1", "stem.0"):
        try:
            conv = bb.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(conv, nn.Conv2d):
            return conv.in_channels
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return first.in_channels if first is not None else 3


def _check_width(logits: torch.Tensor, num_classes: int | None) -> None:
    """A ``num_classes`` the model does not output would be ignored: refused instead."""
    if num_classes is not None and logits.shape[-1] != num_classes:
        raise ValueError(f"num_classes={num_classes}, but the model outputs "
                         f"{logits.shape[-1]} logits")  # fmt: skip
