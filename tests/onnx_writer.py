"""A minimal protobuf writer: just enough ONNX to test the reader
(``dtl_kernels.models.onnx_reader``) on hand-written files."""

from __future__ import annotations

import numpy as np


def _varint(v: int) -> bytes:
    out = bytearray()
    while True:
        byte, v = v & 0x7F, v >> 7
        out.append(byte | (0x80 if v else 0))
        if not v:
            return bytes(out)


def _key(number: int, wire: int) -> bytes:
    return _varint(number << 3 | wire)


def _field(number: int, payload: bytes | int) -> bytes:
    if isinstance(payload, int):
        return _varint(number << 3) + _varint(payload)
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _tensor(name, array, dtype=1, raw=True, packed_dims=True, external=False) -> bytes:
    dims = b"".join(_varint(d) for d in array.shape)
    msg = _field(1, dims) if packed_dims else b"".join(_field(1, d) for d in array.shape)
    msg += _field(2, dtype) + _field(8, name.encode())
    data = np.ascontiguousarray(array, dtype="<f4").tobytes()
    msg += _field(9, data) if raw else _field(4, data)  # float_data, packed
    if external:
        msg += _field(14, 1)
    return msg


def _node(name, op, inputs) -> bytes:
    return (
        b"".join(_field(1, i.encode()) for i in inputs)
        + _field(3, name.encode())
        + _field(4, op.encode())
    )


def _model(tensors: list[bytes], nodes: list[bytes] = ()) -> bytes:
    graph = b"".join(_field(1, n) for n in nodes) + b"".join(_field(5, t) for t in tensors)
    return _field(1, 8) + _field(7, graph)  # ir_version, graph
