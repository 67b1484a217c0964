"""Reading compiled kernels: ``ptxas -v`` logs, SASS from ``nvdisasm``, sm_90 occupancy.

Used by ``codegen_check.py`` for both the Triton and the CUDA C++ kernels; nothing here
needs a GPU or knows about the side op.

Loops. A SASS loop is a backward branch: a ``BRA`` whose target label lies at or before
the branch (the ``BRA`` to itself that ends every kernel is a trap, not a loop). Its body
is the address range [target, branch]; back edges to the same target make one loop.
``main loop`` = the loop with the most instructions, i.e. the kernel's outer tile / chunk /
item loop (nested loops lie inside it). Barriers are counted statically (each ``BAR.*``
instruction once, also inside a nested loop).

Shift loop. The caller names source regions (file, first line, last line) that hold the
per-shift ``(a, b)`` code. The SASS instructions whose line info (any frame of the
``inlined at`` chain) falls in a region are that region's code; its barriers are the
``BAR.*`` instructions between the region's first and last instruction inside the
smallest loop that holds at least half of them, except those whose line info points to
other lines of the region's file (code the compiler placed among the shift code; a
barrier of a library routine the shift code calls, e.g. ``tl.sum``, counts). When that
loop is the shift loop itself (a runtime loop: its back-edge branch is region code), every
barrier in its body counts. That counts
the barriers a fully unrolled shift loop executes per outer iteration (the compiler's
reductions and layout changes in it) without counting the barriers that fence the stages
before and after it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

# sm_90 (H100 / H200) limits, per SM unless said otherwise (CUDA occupancy calculator, cc 9.0)
SM90 = dict(
    threads=2048,
    regs=65536,
    ctas=32,
    smem=228 * 1024,  # shared memory per SM; a CTA may use up to 227 KB
    smem_reserved=1024,  # the driver reserves 1 KB per CTA (shown as SHARED:1024 in cubins)
    reg_unit=256,  # registers are allocated per warp in units of 256
    smem_unit=128,
)

TENSOR_CORE_OPS = ("HMMA", "HGMMA", "IMMA", "IGMMA", "QGMMA", "BMMA", "BGMMA", "WGMMA")


def _ceil_to(x: int, unit: int) -> int:
    return -(-x // unit) * unit


def occupancy(regs: int, threads: int, smem: int, arch: dict = SM90) -> dict:
    """CTAs per SM allowed by registers, threads and shared memory (``smem``: static +
    dynamic bytes of one CTA, without the reserved 1 KB, which is added here)."""
    warps = -(-threads // 32)
    regs_per_warp = _ceil_to(max(regs, 1) * 32, arch["reg_unit"])
    by_regs = (arch["regs"] // regs_per_warp) // warps
    by_threads = arch["threads"] // (warps * 32)
    per_cta_smem = _ceil_to(smem + arch["smem_reserved"], arch["smem_unit"])
    by_smem = arch["smem"] // per_cta_smem
    return dict(
        ctas_by_regs=by_regs,
        ctas_by_threads=by_threads,
        ctas_by_smem=by_smem,
        ctas_per_sm=min(by_regs, by_threads, by_smem, arch["ctas"]),
    )


# --------------------------------------------------------------------------------------
# ptxas -v
# --------------------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '([^']+)'")
_PROPS_FOR = re.compile(r"Function properties for (\S+)")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def parse_ptxas_log(text: str) -> dict[str, dict]:
    """``{function: {regs, stack, spill_stores, spill_loads, smem_static}}`` from the
    output of ``ptxas -v`` (also as printed by ``nvcc -Xptxas -v``)."""
    out: dict[str, dict] = {}
    cur = None  # the entry function being compiled
    props_of = None  # whose properties the next "… bytes stack frame" line gives
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            cur = out.setdefault(m.group(1), dict(smem_static=0))
        elif m := _PROPS_FOR.search(line):
            # a non-inlined callee's properties follow its caller's: never the entry's
            props_of = out.get(m.group(1)) if m.group(1) in out else None
        elif cur is None:
            continue
        elif m := _PROPS.search(line):
            if props_of is not None:
                props_of.update(stack=int(m[1]), spill_stores=int(m[2]), spill_loads=int(m[3]))
        elif m := _USED.search(line):
            cur["regs"] = int(m[1])
            if s := _SMEM.search(line):
                cur["smem_static"] = int(s[1])
    return out


# --------------------------------------------------------------------------------------
# SASS (nvdisasm -c -gi)
# --------------------------------------------------------------------------------------


@dataclass
class Instr:
    addr: int
    op: str  # opcode with modifiers, e.g. "BAR.SYNC.DEFER_BLOCKING"
    text: str
    src: tuple = ()  # ((file, line), …): the line info, innermost frame first
    target: str | None = None  # branch target label


@dataclass
class Function:
    name: str
    instrs: list = field(default_factory=list)
    labels: dict = field(default_factory=dict)  # label → address


_SECTION = re.compile(r"^\s*\.section\s+\.text\.(\S+?),")
_LABEL = re.compile(r"^(\.L\w+):")
_LINEINFO = re.compile(r'"([^"]+)", line (\d+)')
_INSTR = re.compile(r"/\*([0-9a-f]+)\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")
_TARGET = re.compile(r"`\((\.L\w+)\)")


def parse_sass(text: str) -> dict[str, Function]:
    """Functions of ``nvdisasm -c -gi`` output: instructions with their line info."""
    funcs: dict[str, Function] = {}
    fn: Function | None = None
    src: tuple = ()
    chain_open = False  # the last line was line info: a further one extends the chain
    pending: list[str] = []
    for line in text.splitlines():
        if m := _SECTION.match(line):
            fn = funcs.setdefault(m.group(1), Function(m.group(1)))
            src, pending, chain_open = (), [], False
            continue
        if fn is None:
            continue
        if line.lstrip().startswith("//##"):
            # an inline chain spans consecutive comment lines, innermost call first
            frames = tuple((f, int(n)) for f, n in _LINEINFO.findall(line))
            src = src + frames if chain_open else frames
            chain_open = True
        elif m := _LABEL.match(line):
            pending.append(m.group(1))
        elif m := _INSTR.search(line):
            ins = Instr(int(m[1], 16), m[2], m[2] + m[3], src)
            chain_open = False
            if t := _TARGET.search(m[3]):
                ins.target = t.group(1)
            for label in pending:
                fn.labels[label] = ins.addr
            pending = []
            fn.instrs.append(ins)
    return funcs


def is_barrier(op: str) -> bool:
    """A CTA barrier (``BAR.SYNC``, ``BAR.RED``, ``BAR.ARV`` …); not MEMBAR / DEPBAR."""
    return op.startswith("BAR.") or op == "BAR"


def loops(fn: Function) -> list[tuple[int, int]]:
    """(first, last) address of each loop body; nested loops appear separately."""
    ends: dict[int, int] = {}
    for ins in fn.instrs:
        if ins.op.startswith("BRA") and ins.target in fn.labels:
            start = fn.labels[ins.target]
            if start < ins.addr:  # start == addr: the trap `BRA` to itself
                ends[start] = max(ends.get(start, start), ins.addr)
    return sorted(ends.items())


def _count(fn: Function, lo: int, hi: int, pred) -> int:
    return sum(1 for i in fn.instrs if lo <= i.addr <= hi and pred(i.op))


def in_regions(ins: Instr, regions) -> bool:
    """Whether any frame of the instruction's line info lies in one of the regions
    ((file suffix, first line, last line), …)."""
    return any(
        f.endswith(suffix) and lo <= n <= hi for f, n in ins.src for suffix, lo, hi in regions
    )


def shift_barriers(fn: Function, regions, body_loops=None) -> int | None:
    """Barriers inside the shift code (see the module docstring), summed over the regions;
    None when no instruction comes from a region."""
    body_loops = loops(fn) if body_loops is None else body_loops
    total, found = 0, False
    for region in regions:
        addrs = [i.addr for i in fn.instrs if in_regions(i, [region])]
        if not addrs:
            continue
        found = True
        # the smallest loop that holds at least half of the region's instructions
        held = [(hi - lo, lo, hi) for lo, hi in body_loops
                if 2 * sum(lo <= a <= hi for a in addrs) >= len(addrs)]  # fmt: skip
        lo, hi = min(held)[1:] if held else (min(addrs), max(addrs))
        back_edge = next((i for i in fn.instrs if i.addr == hi), None)
        if held and back_edge is not None and in_regions(back_edge, [region]):
            # the loop is the shift loop itself (not unrolled): all its barriers count
            total += _count(fn, lo, hi, is_barrier)
            continue
        inside = [a for a in addrs if lo <= a <= hi]
        first, last = min(inside), max(inside)
        total += sum(
            1
            for i in fn.instrs
            if first <= i.addr <= last and is_barrier(i.op) and _owned(i, region)
        )
    return total if found else None


def _owned(ins: Instr, region) -> bool:
    """Whether an instruction may belong to the region's code: its line info is in the
    region, or only in other files (a library routine such as ``tl.sum`` that the region
    calls). Lines of the region's file outside the region are other code of the kernel
    that the compiler placed among the region's instructions."""
    suffix = region[0]
    return in_regions(ins, [region]) or not any(f.endswith(suffix) for f, _ in ins.src)


def metrics(fn: Function, shift_regions=()) -> dict:
    """Static counts of one kernel's SASS (see the module docstring for the loop rules)."""
    body_loops = loops(fn)
    main = max(body_loops, key=lambda r: _count(fn, r[0], r[1], lambda _: True), default=None)

    def count(pred):
        return sum(1 for i in fn.instrs if pred(i.op))

    return dict(
        sass_instrs=len(fn.instrs),
        loops=len(body_loops),
        main_loop_instrs=_count(fn, *main, lambda _: True) if main else 0,
        barriers=count(is_barrier),
        barriers_main_loop=_count(fn, *main, is_barrier) if main else 0,
        barriers_shift=shift_barriers(fn, shift_regions, body_loops) if shift_regions else None,
        hmma=count(lambda op: op.startswith("HMMA")),
        wgmma=count(lambda op: op.split(".")[0] in ("HGMMA", "WGMMA", "QGMMA", "IGMMA")),
        tensor_core=count(lambda op: op.split(".")[0] in TENSOR_CORE_OPS),
        shfl=count(lambda op: op.startswith("SHFL")),
        local_ld_st=count(lambda op: op.startswith(("LDL", "STL"))),
    )
