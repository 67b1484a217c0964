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
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

_FLOAT = 1  # TensorProto.DataType.FLOAT
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


@dataclass
class OnnxNode:
    name: str
    op_type: str
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


@dataclass
class OnnxGraph:
    initializers: dict[str, torch.Tensor]
    nodes: list[OnnxNode]
    skipped: dict[str, str] = field(default_factory=dict)  # name → why it was not read


def _varint(buf: memoryview, pos: int) -> tuple[int, int]:
    value, shift = 0, 0
    while True:
        if pos >= len(buf):
            raise ValueError("truncated ONNX file (a varint runs past the end)")
        byte = buf[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if byte < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed ONNX file (varint longer than 10 bytes)")


def _fields(buf: memoryview):
    """(field number, wire type, value) of one message: ints for varint / fixed fields,
    memoryviews for length-delimited ones."""
    pos = 0
    while pos < len(buf):
        key, pos = _varint(buf, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buf, pos)
        elif wire == 1:
            value, pos = int.from_bytes(buf[pos : pos + 8], "little"), pos + 8
        elif wire == 2:
            size, pos = _varint(buf, pos)
            if pos + size > len(buf):
                raise ValueError("truncated ONNX file (a field runs past its message)")
            value, pos = buf[pos : pos + size], pos + size
        elif wire == 5:
            value, pos = int.from_bytes(buf[pos : pos + 4], "little"), pos + 4
        else:
            raise ValueError(f"malformed ONNX file (wire type {wire} in field {number})")
        yield number, wire, value


def _packed_varints(buf: memoryview) -> list[int]:
    out, pos = [], 0
    while pos < len(buf):
        v, pos = _varint(buf, pos)
        out.append(v)
    return out


def _tensor(buf: memoryview) -> tuple[str, torch.Tensor | str]:
    """(name, tensor), or (name, why it is not read)."""
    dims: list[int] = []
    name, dtype, raw, floats, location = "", 0, None, [], 0
    for number, wire, value in _fields(buf):
        if number == 1:
            dims += _packed_varints(value) if wire == 2 else [value]
        elif number == 2:
            dtype = value
        elif number == 4:  # float_data, packed or not
            floats.append(
                np.frombuffer(value, dtype="<f4")
                if wire == 2
                else np.array([struct.unpack("<f", value.to_bytes(4, "little"))[0]], "<f4")
            )
        elif number == 8:
            name = bytes(value).decode()
        elif number == 9:
            raw = value
        elif number == 14:
            location = value
    if location == _EXTERNAL:
        return name, "stored outside the file (external data is not read)"
    if dtype != _FLOAT:
        return name, f"data type {dtype}; only float32 (1) is read"
    data = np.frombuffer(raw, dtype="<f4") if raw is not None else np.concatenate(floats or [[]])
    count = int(np.prod(dims)) if dims else 1
    if data.size != count:
        raise ValueError(f"ONNX tensor {name!r}: {data.size} values for shape {tuple(dims)}")
    return name, torch.from_numpy(data.astype(np.float32).reshape(dims))


def _node(buf: memoryview) -> OnnxNode:
    node = OnnxNode("", "")
    for number, _, value in _fields(buf):
        if number == 1:
            node.inputs.append(bytes(value).decode())
        elif number == 2:
            node.outputs.append(bytes(value).decode())
        elif number == 3:
            node.name = bytes(value).decode()
        elif number == 4:
            node.op_type = bytes(value).decode()
    return node


def read_onnx(path: str | Path) -> OnnxGraph:
    """The float32 initializers (name → tensor, own memory) and nodes of an ONNX file."""
    data = memoryview(Path(path).read_bytes())
    graph = next((v for n, w, v in _fields(data) if n == 7 and w == 2), None)
    if graph is None:
        raise ValueError(f"{path}: no graph in this file (is it an ONNX model?)")
    out = OnnxGraph({}, [])
    for number, wire, value in _fields(graph):
        if number == 5 and wire == 2:
            name, tensor = _tensor(value)
            if isinstance(tensor, str):
                out.skipped[name] = tensor
            else:
                out.initializers[name] = tensor
        elif number == 1 and wire == 2:
            out.nodes.append(_node(value))
    return out
