"""A stand-in for Triton's CUDA driver, so that Triton's JIT runs where there is no GPU.

``kernel[grid](...)`` then does everything it does on a GPU machine up to the launch:
binds and specialises the arguments, compiles for the target for real (Triton's own
``ptxas``) and loads the "binary"; the launcher it builds records its arguments instead of
calling ``cuLaunchKernel``. Used to time Triton's host path per launch
(``triton_launch_cost.py``) and to check that a direct launch passes what the JIT passes
(``tests/test_triton_launch.py``). The tensors may be CPU tensors: only their data pointers
and dtypes are read.
"""

from __future__ import annotations

import contextlib
import gc
import itertools

import torch


class Recorder:
    """A launcher: keeps every call's arguments in ``FakeCudaDriver.calls`` (or, for
    timing, nothing)."""

    def __init__(self, calls: list | None, name: str):
        self.calls, self.name = calls, name

    def __call__(self, *args):
        if self.calls is not None:
            self.calls.append((self.name, args))


class FakeCudaDriver:
    """What ``JITFunction.run`` and ``CompiledKernel`` ask of ``triton.runtime.driver.active``
    (Triton 3.6 and 3.8), for one made-up sm_``arch`` device 0 with stream handle 7."""

    STREAM = 7

    def __init__(self, arch: int = 90, keep_calls: bool = True):
        from triton.backends.compiler import GPUTarget

        self.target = GPUTarget("cuda", arch, 32)
        self.keep_calls = keep_calls
        self.calls: list = []  # (kernel name, launcher arguments) per launch
        self.unloaded: list = []  # module handles Triton unloaded (3.8: a kernel collected)
        self.loaded: set = set()  # module handles given out
        handles = itertools.count(1000)
        unloaded, loaded = self.unloaded, self.loaded

        class Utils:
            @staticmethod
            def load_binary(name, kernel, shared, device):
                # (module, function, registers, spills, max threads per block)
                module = next(handles)
                loaded.add(module)
                return module, next(handles), 64, 0, 1024

            @staticmethod
            def unload_module(module):
                unloaded.append(module)

            @staticmethod
            def get_device_properties(device):
                return {"max_shared_mem": 232448, "multiprocessor_count": 132}

        self.utils = Utils()

    def launcher_cls(self, src, metadata):
        return Recorder(self.calls if self.keep_calls else None, metadata.name)

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return self.STREAM

    def get_current_target(self):
        return self.target

    def get_active_torch_device(self):
        return torch.device("cpu")

    def is_active(self):
        return True


@contextlib.contextmanager
def fake_cuda_driver(arch: int = 90, keep_calls: bool = True):
    """Make Triton's JIT compile for sm_``arch`` and record its launches (yields the driver;
    ``keep_calls=False``: forget them); ``triton_side``'s launchers accept CPU tensors
    meanwhile. On exit the kernels compiled meanwhile are forgotten (the JIT caches of
    ``triton_kernels`` and ``triton_side``'s launch specs): a real launch later in the
    process never reaches a recorder."""
    from triton.runtime import driver

    from dtl_kernels.ops import triton_kernels
    from dtl_kernels.ops import triton_side as ts

    fake = FakeCudaDriver(arch, keep_calls)
    saved = ts._require_launchable, driver._active  # reset_active() would look for a GPU
    driver.set_active(fake)
    ts._require_launchable = lambda x: None
    ts._register_launchers(cpu=True)  # the ops take CPU tensors meanwhile
    try:
        yield fake
    finally:
        ts._register_launchers(cpu=ts._CPU)
        # forget the kernels compiled meanwhile while the fake driver is still active, and
        # mark every kernel it loaded as unloaded first (wherever it is still held): Triton
        # 3.8 unloads a collected kernel's module through the driver active then, which
        # must never get these made-up handles
        for obj in gc.get_objects():
            if (
                type(obj).__name__ == "CompiledKernel"
                and getattr(obj, "module", None) in fake.loaded
            ):
                obj.module = None
        ts._SPECS.clear()
        for value in vars(triton_kernels).values():  # the kernels' JIT caches
            caches = getattr(value, "device_caches", None)
            if caches is not None:
                caches.clear()
        gc.collect()
        ts._require_launchable, driver._active = saved
