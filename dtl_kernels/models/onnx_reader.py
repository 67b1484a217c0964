"""Read the weights and node names of an ONNX file without the ``onnx`` package.

An ONNX file is one protobuf message (``ModelProto``). Weight import needs only a few of its
fields, so this module decodes the protobuf wire format directly (varints and
length-delimited fields) instead of adding a dependency:

    ModelProto.graph (7) → GraphProto
    GraphProto.node (1) → NodeProto: input (1), output (2), name (3), op_type (4)
    GraphProto.initializer (5) → TensorProto: dims (1), data_type (2), float_data (4),
                                  name (8), raw_data (9), data_location (14)

Float32 tensors stored inside the file are read (what exporters write for weights); others
(int64 shape constants, external data) are listed in ``OnnxGraph.skipped`` with the reason,
for the caller to raise on if it needs one of them.

Every byte is untrusted: each known field must arrive in its wire type, fixed-width values
and declared lengths are checked against the bytes that remain before anything is read or
allocated, and nothing is allocated beyond a small multiple of the file's size (tensor data
is at most the file's bytes; a shape has at most :data:`MAX_DIMS` entries; past
:data:`ENTRY_ALLOWANCE`, one node, initializer or node name per :data:`BYTES_PER_ENTRY`
bytes). A malformed
file is one ``ValueError`` naming the file and the field.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

_FLOAT = 1  # TensorProto.DataType.FLOAT
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL
MAX_DIMS = 32  # ONNX tensors have a handful of dimensions; more is a malformed file
# Each node, initializer or node input/output name kept costs ~100 bytes or more of Python
# objects; one of a few bytes in the file could make a small file cost 50 × its size. Real
# entries take tens of bytes or more: past a flat allowance, one per 32 bytes of file.
ENTRY_ALLOWANCE, BYTES_PER_ENTRY = 10_000, 32

_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5
_WIRE_NAMES = {_VARINT: "varint", _FIXED64: "fixed64", _BYTES: "bytes", _FIXED32: "fixed32"}
# message → field number → (name, wire types it may arrive in); unknown fields are skipped
_MODEL = {7: ("graph", (_BYTES,))}
_GRAPH = {1: ("node", (_BYTES,)), 5: ("initializer", (_BYTES,))}
_NODE = {
    1: ("input", (_BYTES,)),
    2: ("output", (_BYTES,)),
    3: ("name", (_BYTES,)),
    4: ("op_type", (_BYTES,)),
}
_TENSOR = {
    1: ("dims", (_VARINT, _BYTES)),  # repeated int64, packed or not
    2: ("data_type", (_VARINT,)),
    4: ("float_data", (_FIXED32, _BYTES)),  # repeated float, packed or not
    8: ("name", (_BYTES,)),
    9: ("raw_data", (_BYTES,)),
    14: ("data_location", (_VARINT,)),
}


@dataclass(slots=True, frozen=True)
class OnnxNode:
    """A node's name, operator and the names of its inputs and outputs (tuples: a file of
    many small nodes costs a small multiple of its size)."""

    name: str
    op_type: str
    inputs: tuple[str, ...] = ()
    outputs: tuple[str, ...] = ()


@dataclass
class OnnxGraph:
    initializers: dict[str, torch.Tensor]
    nodes: list[OnnxNode]
    skipped: dict[str, str] = field(default_factory=dict)  # name → why it was not read


class _Malformed(Exception):
    """A problem at one field; :func:`read_onnx` adds the file's name."""


def _varint(buf: memoryview, pos: int, where: str) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise _Malformed(f"{where}: truncated (a varint runs past the end)")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise _Malformed(f"{where}: malformed varint (longer than 10 bytes)")


def _fields(buf: memoryview, where: str, schema: dict):
    """``(name, wire type, value)`` of one message: ints for varint / fixed fields,
    memoryviews for length-delimited ones. A known field in another wire type, a value or
    a length that runs past the message are :class:`_Malformed`, before anything is read."""
    pos, end = 0, len(buf)
    while pos < end:
        key, pos = _varint(buf, pos, where)
        number, wire = key >> 3, key & 7
        name, allowed = schema.get(number, (f"field {number}", None))
        at = f"{where}.{name}"
        if allowed is not None and wire not in allowed:
            expected = " or ".join(_WIRE_NAMES[w] for w in allowed)
            got = _WIRE_NAMES.get(wire, f"wire type {wire}")
            raise _Malformed(f"{at}: arrives as {got}, expected {expected}")
        if wire == _VARINT:
            value, pos = _varint(buf, pos, at)
        elif wire in (_FIXED64, _FIXED32):
            width = 8 if wire == _FIXED64 else 4
            if pos + width > end:
                raise _Malformed(f"{at}: truncated ({_WIRE_NAMES[wire]} value runs past the end)")
            value, pos = int.from_bytes(buf[pos : pos + width], "little"), pos + width
        elif wire == _BYTES:
            size, pos = _varint(buf, pos, at)
            if size > end - pos:
                raise _Malformed(
                    f"{at}: truncated (declares {size} bytes, {end - pos} remain in its message)"
                )
            value, pos = buf[pos : pos + size], pos + size
        else:
            raise _Malformed(f"{at}: unsupported wire type {wire}")
        yield name, wire, value


def _text(value: memoryview, where: str) -> str:
    try:
        return bytes(value).decode("utf-8")
    except UnicodeDecodeError:
        raise _Malformed(f"{where}: not UTF-8 text") from None


def _add_dims(dims: list[int], value, wire: int, where: str) -> None:
    """Append one ``dims`` field (a varint, or packed varints) to ``dims``; more than
    :data:`MAX_DIMS` in all is malformed (found before more are stored)."""
    if wire == _VARINT:
        dims.append(value)
    else:
        pos = 0
        while pos < len(value) and len(dims) <= MAX_DIMS:
            v, pos = _varint(value, pos, where)
            dims.append(v)
    if len(dims) > MAX_DIMS:
        raise _Malformed(f"{where}: more than {MAX_DIMS} dimensions")


def _tensor(buf: memoryview, where: str, reasons: dict) -> tuple[str, torch.Tensor | str]:
    """(name, tensor), or (name, why it is not read; one string per reason in ``reasons``)."""
    dims: list[int] = []
    name, dtype, raw, location = "", 0, None, 0
    floats = bytearray()  # float_data, little-endian float32 bytes (at most the file's size)
    for key, wire, value in _fields(buf, where, _TENSOR):
        at = f"{where}.{key}"
        if key == "dims":
            _add_dims(dims, value, wire, at)
        elif key == "data_type":
            dtype = value
        elif key == "float_data":
            if wire == _BYTES and len(value) % 4:
                raise _Malformed(f"{at}: {len(value)} bytes is not a whole number of floats")
            floats += value if wire == _BYTES else value.to_bytes(4, "little")
        elif key == "name":
            name = _text(value, at)
        elif key == "raw_data":
            raw = value
        elif key == "data_location":
            location = value
    if location == _EXTERNAL:
        return name, "stored outside the file (external data is not read)"
    if dtype != _FLOAT:
        return name, reasons.setdefault(dtype, f"data type {dtype}; only float32 (1) is read")
    if any(d >= 2**63 for d in dims):
        raise _Malformed(f"{where} {name!r}.dims: a negative or huge dimension in {dims}")
    data = raw if raw is not None else memoryview(floats)
    if len(data) % 4:
        raise _Malformed(f"{where} {name!r}.raw_data: {len(data)} bytes is not a whole number "
                         "of float32 values")  # fmt: skip
    count = math.prod(dims)  # Python ints: no overflow
    if len(data) // 4 != count:
        raise _Malformed(
            f"{where} {name!r}: {len(data) // 4} values for shape {tuple(dims)} ({count} values)"
        )
    values = np.frombuffer(data, dtype="<f4").astype(np.float32)  # own memory, native order
    return name, torch.from_numpy(values.reshape(dims))


class _Budget:
    """How many more entries (nodes, initializers, names of a node) a file may hold."""

    def __init__(self, size: int):
        self.most = self.left = ENTRY_ALLOWANCE + size // BYTES_PER_ENTRY
        self.size = size

    def take(self, where: str) -> None:
        self.left -= 1
        if self.left < 0:
            raise _Malformed(f"{where}: more than {self.most} nodes, initializers and node "
                             f"names for a file of {self.size} bytes")  # fmt: skip


def _node(buf: memoryview, where: str, budget: _Budget) -> OnnxNode | None:
    """The node, or ``None`` when it has none of the fields read here."""
    found: dict[str, list[str]] = {"input": [], "output": [], "name": [], "op_type": []}
    for key, _, value in _fields(buf, where, _NODE):
        if key in found:  # attributes, domain, doc string: not needed
            budget.take(f"{where}.{key}")
            found[key].append(_text(value, f"{where}.{key}"))
    if not any(found.values()):
        return None
    last = {k: found[k][-1] if found[k] else "" for k in ("name", "op_type")}
    return OnnxNode(last["name"], last["op_type"], tuple(found["input"]), tuple(found["output"]))


def read_onnx(path: str | Path) -> OnnxGraph:
    """The float32 initializers (name → tensor, own memory) and nodes of an ONNX file.

    ``ValueError`` naming the file and the field for a malformed or truncated file."""
    data = memoryview(Path(path).read_bytes())
    try:
        graphs = [v for key, _, v in _fields(data, "model", _MODEL) if key == "graph"]
        if not graphs:
            raise ValueError(f"{path}: no graph in this file (is it an ONNX model?)")
        if len(graphs) > 1:
            raise _Malformed(f"model.graph: {len(graphs)} graphs, expected one")
        out = OnnxGraph({}, [])
        counts, reasons, budget = {"node": 0, "initializer": 0}, {}, _Budget(len(data))
        for key, _, value in _fields(graphs[0], "model.graph", _GRAPH):
            if key not in counts:
                continue
            where = f"model.graph.{key}[{counts[key]}]"
            counts[key] += 1
            budget.take(where)
            if key == "initializer":
                name, tensor = _tensor(value, where, reasons)
                if name in out.initializers or name in out.skipped:  # which one is meant?
                    raise _Malformed(f"{where}: a second initializer named {name[:80]!r}")
                if isinstance(tensor, str):
                    out.skipped[name] = tensor
                else:
                    out.initializers[name] = tensor
            elif (node := _node(value, where, budget)) is not None:
                out.nodes.append(node)
    except _Malformed as exc:
        raise ValueError(f"{path}: malformed ONNX file: {exc}") from None
    return out
