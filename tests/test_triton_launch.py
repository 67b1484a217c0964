"""Direct Triton launches (``dtl_kernels.ops.triton_launch``) pass what Triton's JIT passes.

No GPU: a worker process runs the Triton launchers on CPU tensors with Triton's driver
replaced by a recorder (``benchmarks/triton_fake_driver.py``): every kernel compiles for
sm_90 for real, and each launch's arguments (grid, stream, kernel handle, metadata, bound
arguments) are recorded instead of launched. Run with the venv's Triton; also with the GPU
machine's pinned Triton where ``DTL_CODEGEN_TRITON`` names it (as ``test_codegen.py``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------------------
# The worker (a subprocess: Triton's driver is swapped for the whole process)
# --------------------------------------------------------------------------------------


def _via(call) -> str:
    """``jit`` when Triton's JIT made the launch (it passes its hook chains), else ``direct``."""
    return "jit" if call[1][7] is not None else "direct"


def _same_bound_args(a, b) -> bool:
    """The arguments after the launcher's nine header items: the same objects / values."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=False):
        if x is y:
            continue
        if type(x) is not type(y) or hasattr(x, "data_ptr") or x != y:
            return False
    return True


def _same_structure(a, b) -> bool:
    """Two launches of one spec: equal values, tensors of equal shape / stride / dtype /
    alignment (fresh outputs are other tensors)."""
    if len(a) != len(b):
        return False
    for x, y in zip(a, b, strict=False):
        if hasattr(x, "data_ptr"):
            if (x.shape, x.stride(), x.dtype, x.data_ptr() % 16) != (
                y.shape, y.stride(), y.dtype, y.data_ptr() % 16
            ):  # fmt: skip
                return False
        elif type(x) is not type(y) or x != y:
            return False
    return True


def _worker() -> dict:
    import torch
    import triton
    from triton import knobs

    sys.path.insert(0, str(ROOT / "benchmarks"))
    from triton_fake_driver import FakeCudaDriver, fake_cuda_driver

    from dtl_kernels.ops import step, triton_kernels, triton_launch
    from dtl_kernels.ops import triton_side as ts

    torch.manual_seed(0)
    report = {"triton": triton.__version__, "enabled": triton_launch.ENABLED,
              "launcher path": ts.LAUNCHER_PATH}  # fmt: skip
    ops_only = os.environ.get("DTL_TEST_OPS_ONLY") == "1"  # section 8 alone
    if not triton_launch.ENABLED:
        return report
    y, taps, ups = torch.randn(2, 5, 16), torch.randn(2, 5, 4), torch.randn(16, 4)
    with fake_cuda_driver() as fake:
        if not ops_only:  # (the launches do not depend on how the ops are registered)
            # 1. A direct launch passes exactly what the JIT passed for the same launch
            seen = []
            real_launch = ts._launch

            def spy(cfg, args, consts):
                seen.append((cfg, args, consts))
                real_launch(cfg, args, consts)

            ts._launch = spy
            ts._SPECS.clear()
            ts.side_fwd(y, taps, ups, None, 0, 0, 0, 100.0)
            ts._launch = real_launch
            cfg, args, consts = seen[0]
            jit_call = fake.calls[-1]
            triton_launch.launch(getattr(triton_kernels, cfg["kernel"]), cfg, args, consts)
            direct = fake.calls[-1]
            head_j, head_d = jit_call[1][:9], direct[1][:9]
            report["replay"] = {
                "vias": [_via(jit_call), _via(direct)],
                "header equal": head_j[:6] == head_d[:6],
                "stream": head_d[3],
                "direct metadata and hooks": list(head_d[6:]),
                "jit hooks idle": all(getattr(h, "calls", None) == [] for h in head_j[7:]),
                "bound args identical": _same_bound_args(jit_call[1][9:], direct[1][9:]),
                "bound args": len(direct[1]) - 9,
                "kernel params": len(getattr(triton_kernels, cfg["kernel"]).params),
            }

            # 2. Forward and backward twice, DTL in float32 and DTL+ k = 3 in the autocast mix
            cases = {
                "dtl fp32": (y, taps, ups, None, 0, 0, 0),
                "dtl+ k3 mix": (
                    torch.randn(2, 5, 16),
                    torch.randn(2, 5, 4).bfloat16(),
                    torch.randn(16, 4).bfloat16(),
                    torch.randn(16, 1, 3, 3),
                    2,
                    2,
                    1,
                ),  # fmt: skip
            }
            for name, (yy, tt, uu, w, gh, gw, npre) in cases.items():
                ts._SPECS.clear()
                fake.calls.clear()
                for _ in range(2):
                    ts.side_fwd(yy, tt, uu, w, gh, gw, npre, 100.0)
                    ts.side_bwd(yy, tt, uu, w, gh, gw, npre, 100.0)
                calls = fake.calls
                half = len(calls) // 2
                report[name] = {
                    "launches": [f"{c[0]}:{_via(c)}" for c in calls],
                    "second pass as the first": all(
                        a[0] == b[0]
                        and a[1][:6] == b[1][:6]
                        and _same_structure(a[1][9:], b[1][9:])
                        for a, b in zip(calls[:half], calls[half:], strict=False)
                    ),
                }

            # 3. Another alignment of an input: the JIT specialises again, then direct
            ts._SPECS.clear()
            fake.calls.clear()
            ts.side_fwd(y, taps, ups, None, 0, 0, 0, 100.0)
            flat = torch.empty(y.numel() + 1)
            shifted = flat[1:].view(y.shape)  # 4 bytes off: not 16-byte aligned
            shifted.copy_(y)
            ts.side_fwd(shifted, taps, ups, None, 0, 0, 0, 100.0)
            ts.side_fwd(shifted, taps, ups, None, 0, 0, 0, 100.0)
            ts.side_fwd(y, taps, ups, None, 0, 0, 0, 100.0)
            calls = fake.calls
            report["alignment"] = {
                "vias": [_via(c) for c in calls],
                "other kernel for the shifted input": calls[1][1][4] != calls[0][1][4],
                "same kernel again": calls[2][1][4] == calls[1][1][4]
                and calls[3][1][4] == calls[0][1][4],
            }

            # 4. A launch hook (a profiler) is handed every launch: the JIT makes them all
            ts._SPECS.clear()
            fake.calls.clear()
            hooked, handed = [], 0
            knobs.runtime.launch_enter_hook.add(hooked.append)
            try:
                for _ in range(3):
                    ts.side_fwd(y, taps, ups, None, 0, 0, 0, 100.0)
                    enter = fake.calls[-1][1][7]
                    handed += enter is not None and hooked.append in enter.calls
            finally:
                knobs.runtime.launch_enter_hook.remove(hooked.append)
            for _ in range(2):
                ts.side_fwd(y, taps, ups, None, 0, 0, 0, 100.0)
            report["hook"] = {"vias": [_via(c) for c in fake.calls], "hook handed": handed}

            # 5. TRITON_DEBUG on: the JIT every time (it compiles with debug); an instrumentation
            # mode (the JIT's compile key) makes the settings non-default too
            ts._SPECS.clear()
            fake.calls.clear()
            knobs.runtime.debug = True
            try:
                for _ in range(2):
                    ts.side_fwd(y, taps, ups, None, 0, 0, 0, 100.0)
            finally:
                knobs.runtime.debug = False
            saved_mode = knobs.compilation.instrumentation_mode
            knobs.compilation.instrumentation_mode = "consan"
            instrumented_default = triton_launch._jit_settings_default()
            knobs.compilation.instrumentation_mode = saved_mode
            report["debug"] = {
                "vias": [_via(c) for c in fake.calls],
                "instrumented counts as default": instrumented_default,
                "default again": triton_launch._jit_settings_default(),
            }

            # 6. The JIT's cache dropped: a remembered kernel stays loaded (Triton 3.8 unloads a
            # collected kernel's module), and launches go on with the same handle
            import gc

            ts._SPECS.clear()
            fake.calls.clear()
            fake.unloaded.clear()
            for _ in range(2):
                ts.side_fwd(y, taps, ups, None, 0, 0, 0, 100.0)
            spec = ts._launch_spec("triton_side_forward", y, taps, ups, None, 0, 0, 0, 100.0)
            (kept,) = spec[1]["fwd"][triton_launch.CACHE_KEY].kernels.values()
            module = kept[-1].module
            triton_kernels._fwd_kernel.device_caches.clear()
            gc.collect()
            ts.side_fwd(y, taps, ups, None, 0, 0, 0, 100.0)
            calls = fake.calls
            report["cache dropped"] = {
                "vias": [_via(c) for c in calls],
                "same handle": calls[2][1][4] == calls[1][1][4],
                "its module unloaded": module in fake.unloaded,
            }

            # 7. Switched off: the JIT every time
            ts._SPECS.clear()
            fake.calls.clear()
            with triton_launch.jit_only():
                for _ in range(2):
                    ts.side_fwd(y, taps, ups, None, 0, 0, 0, 100.0)
            report["enabled after"] = triton_launch.ENABLED
            report["disabled"] = {"vias": [_via(c) for c in fake.calls]}

        # 8. Through the ops, as a model's walk calls them (bench_host.py's Triton
        # providers): the recorder registers the launchers as the ops' CPU kernels too
        ts._SPECS.clear()
        fake.calls.clear()
        yy, uu = y.clone().requires_grad_(), ups.clone().requires_grad_()
        out, _ = step.side_step(yy, torch.zeros_like(taps), [], [], 0, uu, None, None, 0,
                                100.0, "triton")  # fmt: skip
        out.sum().backward()
        with torch.no_grad():
            step.side_step_(y, taps.clone(), [], [], 0, ups, None, None, 0, 100.0, "triton")
        report["ops"] = {"launches": [c[0] for c in fake.calls],
                         "grads": [yy.grad is not None, uu.grad is not None]}  # fmt: skip
    report["fake stream"] = FakeCudaDriver.STREAM
    # and afterwards CPU tensors are refused again (no interpreter in this process)
    try:
        step.side_step_(y, taps.clone(), [], [], 0, ups, None, None, 0, 100.0, "triton")
        report["refused after"] = "not refused"
    except RuntimeError as e:
        report["refused after"] = "CUDA tensors" in str(e)
    # nothing compiled under the fake driver is left for a real launch to find
    report["left behind"] = {
        "specs": len(ts._SPECS),
        "jit caches": sum(
            len(v.device_caches)
            for v in vars(triton_kernels).values()
            if hasattr(v, "device_caches")
        ),  # fmt: skip
    }
    return report


# --------------------------------------------------------------------------------------
# pytest side
# --------------------------------------------------------------------------------------


def _run_worker(pythonpath: list[str], tmp_path, **extra_env: str) -> dict:
    pytest.importorskip("triton")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(pythonpath), PYTHONWARNINGS="ignore")
    env.pop("TRITON_INTERPRET", None)
    env.pop("DTL_KERNELS_TRITON_DIRECT", None)
    env.pop("DTL_KERNELS_DIRECT", None)
    env.update(extra_env)
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    proc = subprocess.run(
        [sys.executable, __file__, "--worker"], env=env, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    # nothing compiled under the fake driver is unloaded through the real one at exit
    # (Triton 3.8 unloads a collected kernel's module through the active driver)
    assert "Exception ignored" not in proc.stderr, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _check(report: dict) -> None:
    if not report["enabled"]:
        pytest.skip(f"direct launches are not checked for Triton {report['triton']}")
    replay = report["replay"]
    assert replay["vias"] == ["jit", "direct"]
    assert replay["header equal"] and replay["jit hooks idle"]
    assert replay["stream"] == report["fake stream"]
    assert replay["direct metadata and hooks"] == [None, None, None]
    assert replay["bound args identical"]
    assert replay["bound args"] == replay["kernel params"]  # every parameter, constexprs too
    fwd, bwd, finish = "_fwd_kernel", "_bwd_kernel", "_bwd_finish_kernel"
    dtl = report["dtl fp32"]
    assert dtl["launches"] == [f"{fwd}:jit", f"{bwd}:jit", f"{finish}:jit",
                               f"{fwd}:direct", f"{bwd}:direct", f"{finish}:direct"]  # fmt: skip
    assert dtl["second pass as the first"]
    mix = report["dtl+ k3 mix"]
    assert mix["launches"] == ["_fwd_conv_kernel:jit", f"{bwd}:jit", f"{finish}:jit",
                               "_fwd_conv_kernel:direct", f"{bwd}:direct",
                               f"{finish}:direct"]  # fmt: skip
    assert mix["second pass as the first"]
    align = report["alignment"]
    assert align["vias"] == ["jit", "jit", "direct", "direct"]
    assert align["other kernel for the shifted input"] and align["same kernel again"]
    # with the hook gone, the next launch goes through the JIT once more (nothing was kept
    # while the hook was there), then directly
    assert report["hook"] == {"vias": ["jit"] * 4 + ["direct"], "hook handed": 3}
    assert report["disabled"]["vias"] == ["jit", "jit"] and report["enabled after"]
    assert report["ops"] == {"launches": [fwd, bwd, finish, fwd], "grads": [True, True]}
    assert report["refused after"] is True
    assert report["debug"] == {"vias": ["jit", "jit"], "instrumented counts as default": False,
                               "default again": True}  # fmt: skip
    assert report["cache dropped"] == {"vias": ["jit", "direct", "direct"], "same handle": True,
                                       "its module unloaded": False}  # fmt: skip
    assert report["left behind"] == {"specs": 0, "jit caches": 0}


def test_direct_launches_pass_what_the_jit_passes(tmp_path):
    _check(_run_worker([str(ROOT)], tmp_path))


def test_the_same_without_the_bridge(tmp_path):
    """The launchers registered through torch.library (``_C_bind`` left out) instead of the
    bridge: the recorder's CPU kernels come and go the same way (the launches themselves
    do not depend on the registration: the first test checks them)."""
    report = _run_worker([str(ROOT)], tmp_path, DTL_KERNELS_DIRECT="0", DTL_TEST_OPS_ONLY="1")
    assert report["launcher path"] == "torch.library"
    if not report["enabled"]:
        pytest.skip(f"direct launches are not checked for Triton {report['triton']}")
    fwd, bwd, finish = "_fwd_kernel", "_bwd_kernel", "_bwd_finish_kernel"
    assert report["ops"] == {"launches": [fwd, bwd, finish, fwd], "grads": [True, True]}
    assert report["refused after"] is True


def test_direct_launches_with_the_gpu_machines_triton(tmp_path):
    folder = os.environ.get("DTL_CODEGEN_TRITON")
    if not folder:
        pytest.skip("set DTL_CODEGEN_TRITON to a `pip install --target DIR triton==3.6.0`")
    report = _run_worker([folder, str(ROOT)], tmp_path)
    assert report["triton"].startswith("3.6")
    _check(report)


# --------------------------------------------------------------------------------------
# On a GPU (make gpu-check's pytest stage): the direct launches give the JIT's bits
# --------------------------------------------------------------------------------------


def _need_gpu():
    pytest.importorskip("triton")
    import torch

    if os.environ.get("TRITON_INTERPRET") == "1":
        pytest.skip("this process runs Triton interpreted")
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU (none visible): the direct launches are not run here")
    from dtl_kernels.ops import triton_launch

    if not triton_launch.ENABLED:
        pytest.skip("direct launches are off (Triton version or DTL_KERNELS_TRITON_DIRECT)")


def _gpu_case(k: int, y_dtype, side_dtype, shifted: bool = False):
    """ViT-B/16-like rows at batch 2: y (2, 197, 768), K = 24; DTL+ on the 14×14 grid."""
    import torch

    g = torch.Generator(device="cuda").manual_seed(0)
    shape = (2, 197, 768)
    if shifted:  # y one element past an aligned start: another specialisation
        y = torch.empty(2 * 197 * 768 + 1, device="cuda", dtype=y_dtype)[1:].view(shape)
        y.copy_(torch.randn(shape, generator=g, device="cuda"))
    else:
        y = torch.randn(shape, generator=g, device="cuda").to(y_dtype)
    taps = torch.randn(2, 197, 24, generator=g, device="cuda").to(side_dtype)
    ups = (0.1 * torch.randn(768, 24, generator=g, device="cuda")).to(side_dtype)
    w = (0.2 * torch.randn(768, 1, k, k, generator=g, device="cuda")).to(y_dtype) if k else None
    return (y, taps, ups, w, 14, 14, 1, 100.0) if k else (y, taps, ups, None, 0, 0, 0, 100.0)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "k,y_dtype,side_dtype,shifted",
    [
        (0, "float32", "float32", False),
        (0, "float32", "bfloat16", False),
        (0, "bfloat16", "bfloat16", True),
        (3, "float32", "bfloat16", False),
        (5, "bfloat16", "bfloat16", True),
    ],
)
def test_gpu_direct_launches_give_the_jits_bits(k, y_dtype, side_dtype, shifted, monkeypatch):
    """Forward and (deterministic) backward through the JIT, then the same calls launched
    directly (the first call of the spec fills, the next two are direct): the same bits."""
    _need_gpu()
    import torch

    from dtl_kernels.ops import triton_launch
    from dtl_kernels.ops import triton_side as ts

    monkeypatch.setenv("DTL_KERNELS_DETERMINISTIC", "1")  # a backward with fixed order
    args = _gpu_case(k, getattr(torch, y_dtype), getattr(torch, side_dtype), shifted)
    ts._SPECS.clear()
    with triton_launch.jit_only():
        want = (ts.side_fwd(*args), *ts.side_bwd(*args))
    ts._SPECS.clear()
    runs = [(ts.side_fwd(*args), *ts.side_bwd(*args)) for _ in range(3)]
    torch.cuda.synchronize()
    spec = ts._launch_spec("triton_side_forward", *args)
    assert len(spec[1]["fwd"][triton_launch.CACHE_KEY].kernels) == 1  # it did launch directly
    for got in runs:
        assert all(torch.equal(a, b) for a, b in zip(want, got, strict=True))


@pytest.mark.gpu
def test_gpu_direct_launches_on_a_side_stream_and_in_a_cuda_graph():
    """A direct launch goes to the current stream: on a side stream, and captured into a
    CUDA graph whose replay then follows new input values."""
    _need_gpu()
    import torch

    from dtl_kernels.ops import triton_side as ts

    args = _gpu_case(3, torch.float32, torch.bfloat16)
    ts._SPECS.clear()
    want = ts.side_fwd(*args)  # through the JIT: fills
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        torch.cuda._sleep(100_000_000)  # the side stream is busy for a while …
        y_late = args[0] * 1  # … before it writes this input
        on_side = ts.side_fwd(y_late, *args[1:])  # direct: must run after, on this stream
    torch.cuda.current_stream().wait_stream(stream)
    assert torch.equal(on_side, want)  # a launch on another stream would read y_late early
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ts.side_fwd(*args)
    y = args[0]
    y.mul_(0.5)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(captured, ts.side_fwd(*args))
    assert not torch.equal(captured, want)


if __name__ == "__main__" and sys.argv[1:] == ["--worker"]:
    print(json.dumps(_worker()))
