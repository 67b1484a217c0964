"""Triton launches that skip ``JITFunction.run`` once a launch's kernel is known.

``kernel[grid](*args, **constexprs)`` binds and specialises every argument, builds a cache
key and looks the compiled kernel up on every call: 11-14 µs of host time per launch for
this package's 11-21-argument kernels (Triton 3.6 and 3.8, on the CPU with the launch
itself stubbed: ``benchmarks/triton_launch_cost.py``) -- about as much as the rest of an
add-back's launcher. But ``triton_side`` plans every launch per launch spec (shapes,
strides, dtypes, device, scalars), and a spec fixes each argument's specialisation except
its tensors' 16-byte alignment. So a planned launch goes through the JIT the first time
per alignment pattern (the JIT compiles, checks and loads the kernel, and returns it) and
afterwards calls that compiled kernel's launcher with the arguments the JIT would pass
(``tests/test_triton_launch.py`` compares them, argument by argument).

The JIT keeps every launch whenever a direct call could differ from it: launch hooks
registered (profilers such as proton read them), ``TRITON_DEBUG``, an instrumentation mode,
pre-run hooks, a Triton whose launcher convention was not checked here
(:data:`CHECKED_TRITON`), Triton's interpreter, or ``DTL_KERNELS_TRITON_DIRECT=0`` (read
once, at import). Skipped per launch, as for any launch of an already compiled kernel: the
JIT's check that the module globals a kernel read have not changed since it compiled
(this package's kernels read none that change).
"""

from __future__ import annotations

import contextlib
import os

import torch

try:
    import triton
    from triton import knobs
    from triton.runtime import driver
except ImportError:  # triton_side reports the missing backend
    triton = knobs = driver = None

#: Triton versions whose ``CompiledKernel.run(gridX, gridY, gridZ, stream, function,
#: packed_metadata, launch_metadata, enter_hook, exit_hook, *bound_args)`` convention was
#: checked against ``JITFunction.run`` (3.6: the GPU machine's; 3.8: this venv's).
CHECKED_TRITON = ((3, 6), (3, 8))

#: the key of a planned launch's :class:`CompiledLaunches` (owned by the plan)
CACHE_KEY = "compiled"


class CompiledLaunches:
    """The compiled kernels of one planned launch, by its tensors' alignment pattern."""

    __slots__ = ("positions", "kernels")

    def __init__(self):
        self.positions: tuple | None = None  # where ``args`` holds tensors
        self.kernels: dict = {}  # alignment mask → what a direct launch needs


def _version(text: str) -> tuple[int, int]:
    parts = text.split(".")
    try:
        return int(parts[0]), int(parts[1])
    except (IndexError, ValueError):
        return (0, 0)


ENABLED = (
    triton is not None
    and _version(triton.__version__) in CHECKED_TRITON
    and os.environ.get("DTL_KERNELS_TRITON_DIRECT", "1") not in ("", "0")
)


@contextlib.contextmanager
def jit_only():
    """Every launch inside goes through Triton's JIT (to compare with the direct launches:
    ``benchmarks/bench_step.py``'s ``dtl_jit``, the tests); :data:`ENABLED` is restored."""
    global ENABLED
    saved, ENABLED = ENABLED, False
    try:
        yield
    finally:
        ENABLED = saved


def _jit_settings_default() -> bool:
    """Nothing that the JIT reads per launch is set: no launch hook (Triton 3.x keeps them
    in ``HookChain``s; profilers such as proton register one), no ``TRITON_DEBUG``, no
    instrumentation mode, no stage-inspection hook (3.8). These enter the JIT's compile key
    or its launch, so while any is set every launch goes through the JIT -- and since
    kernels are only remembered while none is, a remembered kernel is the one the JIT
    would pick now."""
    rt = knobs.runtime
    for hook in (rt.launch_enter_hook, rt.launch_exit_hook):
        if hook is not None and getattr(hook, "calls", None) != []:
            return False
    return (
        not rt.debug
        and not knobs.compilation.instrumentation_mode
        and getattr(rt, "add_stages_inspection_hook", None) is None
    )


def _alignment(args: tuple, positions: tuple) -> int:
    """Bit mask of which tensor arguments start 16-byte aligned (what the JIT specialises)."""
    mask = 1
    for i in positions:
        mask = (mask << 1) | (args[i].data_ptr() % 16 == 0)
    return mask


def launch(kernel, cfg: dict, args: tuple, consts: dict) -> None:
    """Launch ``kernel`` (a ``@triton.jit`` function) as ``kernel[cfg["grid"]](*args,
    *cfg["args"], **{**cfg["meta"], **consts})``: ``args`` the launcher's tensors and
    sizes, ``cfg`` one planned launch (its grid, trailing arguments, constexprs and
    options), ``consts`` the launcher's constexprs (they override the plan's).

    Where ``cfg`` holds a :class:`CompiledLaunches` under :data:`CACHE_KEY`, the compiled
    kernels are kept there (they live as long as the plan: one per device and spec), and
    launches after the first reuse its ``cfg["args"]`` and ``consts`` as bound then: both
    must be fixed per ``cfg`` (in ``triton_side`` they follow from the launch spec)."""
    known = cfg.get(CACHE_KEY) if ENABLED else None
    if known is not None and _jit_settings_default():
        if known.positions is not None:
            entry = known.kernels.get(_alignment(args, known.positions))
            if entry is not None:
                run, function, packed, grid, tail, current_device, current_stream, _ = entry
                stream = current_stream(current_device())
                run(*grid, stream, function, packed, None, None, None, *args, *tail)
                return
        full = (*args, *cfg["args"])
        keywords = {**cfg["meta"], **consts}
        compiled = kernel[cfg["grid"]](*full, **keywords)
        _remember(known, kernel, cfg["grid"], args, full, keywords, compiled)
        return
    kernel[cfg["grid"]](*args, *cfg["args"], **{**cfg["meta"], **consts})


def _remember(known: CompiledLaunches, kernel, grid, args, full, keywords, compiled) -> None:
    """Keep what the JIT just launched, with the bound arguments after ``args``: the plan's
    trailing arguments, then the constexprs and defaults in the kernel's parameter order,
    as the JIT binds them."""
    try:
        if kernel.pre_run_hooks or kernel.debug:
            return  # the JIT runs or reads these per launch: keep it
        run = compiled.run  # the launcher (its handles were loaded by the launch just made)
        function, packed = compiled.function, compiled.packed_metadata
        rest = kernel.params[len(full) :]
        tail = full[len(args) :] + tuple(
            keywords[p.name] if p.name in keywords else p.default for p in rest
        )
        active = driver.active
        current = (active.get_current_device, active.get_current_stream)
    except AttributeError:  # another Triton's objects: the JIT keeps every launch
        return
    positions = tuple(i for i, a in enumerate(args) if isinstance(a, torch.Tensor))
    if known.positions is None:
        known.positions = positions
    elif known.positions != positions:
        return  # not the same launch after all: keep the JIT
    grid3 = (*grid, 1, 1)[:3]
    # the compiled kernel itself too: it owns the loaded module (Triton 3.8 unloads it when
    # the kernel is collected, e.g. after the JIT's cache is cleared)
    entry = (run, function, packed, grid3, tail, *current, compiled)
    known.kernels[_alignment(args, positions)] = entry
