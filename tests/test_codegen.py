"""The code-generation check (benchmarks/codegen_check.py, ``make codegen-check``).

The parsers run everywhere on small made-up ptxas / nvdisasm texts. The compiles run
only where ``DTL_CODEGEN_TRITON`` names a folder holding the pinned Triton (``pip install
--target DIR triton==3.6.0``; its wheel carries ptxas and nvdisasm) and a C++ compiler is
present: one representative Triton kernel pair and the CUDA launch recorder, < 30 s. They
check that the report is made and read (registers, CSV columns), not that the gates pass.
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))
import codegen_sass  # noqa: E402

PTXAS_LOG = """\
ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_bwd_ups_kernel' for 'sm_90a'
ptxas info    : Function properties for _bwd_ups_kernel
    968 bytes stack frame, 996 bytes spill stores, 976 bytes spill loads
ptxas info    : Used 255 registers, used 1 barriers, 968 bytes cumulative stack size
ptxas info    : Compile time = 2473.516 ms
ptxas info    : Function properties for rows_block_callee
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Compiling entry function 'k2' for 'sm_90a'
ptxas info    : Function properties for k2
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 4096 bytes smem, 400 bytes cmem[0]
"""

# nvdisasm -c -gi style: a loop (.L_x_0 … @P0 BRA), an inline chain over two comment lines,
# barriers of the shift code (line 21), of a library routine it calls (standard.py) and of
# other code placed among it (line 15), and the trap loop that ends every kernel
SASS = """\
//--------------------- .text.k                  --------------------------
\t.section\t.text.k,"ax",@progbits
k:
\t//## File "/x/triton_kernels.py", line 10
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
\t//## File "/x/triton_kernels.py", line 20
        /*0010*/                   LDG.E R2, desc[UR4][R2.64] ;
\t//## File "/x/triton_kernels.py", line 21
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0030*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;
\t//## File "/x/triton/language/standard.py", line 293
        /*0040*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
\t//## File "/x/triton_kernels.py", line 15
        /*0050*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
\t//## File "/x/helper.h", line 5 inlined at "/x/triton_kernels.py", line 22
\t//## File "/x/triton_kernels.py", line 22
        /*0060*/                   SHFL.BFLY PT, R3, R2, 0x1, 0x1f ;
\t//## File "/x/triton_kernels.py", line 30
        /*0070*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0080*/                   MEMBAR.ALL.CTA ;
        /*0090*/              @P0 BRA `(.L_x_0) ;
        /*00a0*/                   EXIT ;
.L_x_1:
        /*00b0*/                   BRA `(.L_x_1);
"""


def test_parse_ptxas_log():
    res = codegen_sass.parse_ptxas_log(PTXAS_LOG)
    assert res["_bwd_ups_kernel"] == dict(  # not overwritten by its callee's properties
        regs=255, stack=968, spill_stores=996, spill_loads=976, smem_static=0
    )
    assert res["k2"]["regs"] == 40 and res["k2"]["smem_static"] == 4096


def test_parse_sass_loops_barriers_and_shift_code():
    (fn,) = codegen_sass.parse_sass(SASS).values()
    assert [i.addr for i in fn.instrs] == list(range(0, 0xC0, 0x10))
    chain = (("/x/helper.h", 5), ("/x/triton_kernels.py", 22), ("/x/triton_kernels.py", 22))
    assert fn.instrs[6].src == chain
    assert codegen_sass.loops(fn) == [(0x10, 0x90)]  # not the trap at the end
    m = codegen_sass.metrics(fn, [("triton_kernels.py", 20, 22)])
    assert (m["barriers"], m["barriers_main_loop"], m["barriers_shift"]) == (4, 4, 2)
    assert (m["hmma"], m["wgmma"], m["tensor_core"], m["shfl"]) == (1, 0, 1, 1)
    # a region reached only through the inline chain; a region with no code
    assert codegen_sass.shift_barriers(fn, [("helper.h", 5, 5)]) == 0
    assert codegen_sass.shift_barriers(fn, [("triton_kernels.py", 100, 200)]) is None


# a shift loop the compiler kept as a loop (its back edge is line 20): every barrier in it
# counts, also one whose line info points elsewhere
SASS_RUNTIME_LOOP = """\
\t.section\t.text.k2,"ax",@progbits
k2:
\t//## File "/x/triton_kernels.py", line 10
        /*0000*/                   MOV R1, c[0x0][0x28] ;
.L_x_0:
\t//## File "/x/triton_kernels.py", line 21
        /*0010*/                   LDG.E R2, desc[UR4][R2.64] ;
\t//## File "/x/triton_kernels.py", line 40
        /*0020*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
\t//## File "/x/triton_kernels.py", line 20
        /*0030*/              @P0 BRA `(.L_x_0) ;
        /*0040*/                   EXIT ;
"""


def test_shift_barriers_of_a_runtime_shift_loop():
    (fn,) = codegen_sass.parse_sass(SASS_RUNTIME_LOOP).values()
    assert codegen_sass.shift_barriers(fn, [("triton_kernels.py", 20, 22)]) == 1


def test_occupancy_sm90():
    # 255 registers × 8 warps: one CTA (the _bwd_ups_kernel)
    assert codegen_sass.occupancy(255, 256, 0)["ctas_per_sm"] == 1
    occ = codegen_sass.occupancy(72, 128, 33792)
    assert (occ["ctas_by_regs"], occ["ctas_by_threads"], occ["ctas_by_smem"]) == (7, 16, 6)
    assert occ["ctas_per_sm"] == 6
    assert codegen_sass.occupancy(16, 32, 0)["ctas_per_sm"] == 32  # the CTA limit


def _pinned_triton() -> Path:
    folder = os.environ.get("DTL_CODEGEN_TRITON")
    if not folder:
        pytest.skip("set DTL_CODEGEN_TRITON to a `pip install --target DIR triton==3.6.0`")
    path = Path(folder)
    if not (path / "triton" / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip(f"DTL_CODEGEN_TRITON={folder} holds no Triton with its bundled ptxas")
    return path


def test_codegen_check_triton_kernels(tmp_path):
    """Two Triton kernels of DTL+ k=3 in bf16, compiled by the pinned Triton for sm_90a."""
    pinned = _pinned_triton()
    import codegen_check

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(pinned), str(ROOT)]))
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")  # compile for real, not from a cache
    cmd = [sys.executable, str(ROOT / "benchmarks" / "codegen_check.py"), "--skip-cuda",
           "--cases", "vit-b-dtl+k3", "--dtypes", "bf16", "--kernels", "_bwd_kernel",
           "_bwd_finish_kernel", "--out", str(tmp_path / "codegen"),
           "--workdir", str(tmp_path / "work")]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    with open(tmp_path / "codegen.csv") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == codegen_check.COLUMNS
        rows = {r["kernel"]: r for r in reader}
    assert set(rows) == {"_bwd_kernel", "_bwd_finish_kernel"}
    taps, summ = rows["_bwd_kernel"], rows["_bwd_finish_kernel"]
    for r in rows.values():
        assert r["triton"] == codegen_check.PINNED_TRITON and r["arch"] == "sm_90a"
        assert 0 < int(r["regs"]) <= 255 and int(r["threads"]) == 128
        assert int(r["sass_instrs"]) > 0 and 1 <= int(r["ctas_per_sm"]) <= 32
        assert all(r[g] in ("PASS", "FAIL", "n/a") for g in codegen_check.GATES)
    # the shift loop (_dmix) is found in ∂T, whose dots are 16-bit; the sum has neither
    assert taps["barriers_shift"] != "" and taps["product16"] == "True"
    assert taps["gate_tensor_cores"] != "n/a" and int(taps["tensor_core"]) > 0
    assert summ["barriers_shift"] == "" and summ["gate_tensor_cores"] == "n/a"
    assert (tmp_path / "codegen.md").read_text().startswith("# Code-generation gates")


def test_cuda_launch_recorder(tmp_path):
    """The CUDA kernels a DTL+ shape launches, from the GPU's own plan (host build)."""
    _pinned_triton()  # the same opt-in as the compiles
    if not (shutil.which("g++") or shutil.which("c++")):
        pytest.skip("needs a C++20 compiler")
    import codegen_check
    import codegen_cuda

    exe = codegen_cuda.build_launch_recorder(tmp_path)
    backward = ["dt_rows_kernel", "du_rows_kernel", "dt_conv_kernel<3>", "du_conv_kernel<3>",
                "sum_partials_kernel"]  # fmt: skip
    # with 16-bit taps the prefix rows run inside the conv launch; fp32 keeps a rows launch
    for dtype, forward in (("bf16", ["fwd_conv_kernel<3>"]),
                           ("fp32", ["fwd_rows_kernel", "fwd_conv_kernel<3>"])):  # fmt: skip
        rows = codegen_cuda.launches(exe, codegen_check.CASES["vit-b-dtl+k3"], dtype)
        assert [codegen_cuda.pretty(name) for name, *_ in rows] == forward + backward, dtype
        assert all(
            smem <= 227 * 1024 and ctas > 0 and threads == 256 for _, smem, ctas, threads in rows
        )
    regions = codegen_cuda.shift_regions()
    assert len(regions) == 2 and all(lo < hi for _, lo, hi in regions)
