"""ONNX files from others (``models/onnx_reader.py``): every field's wire type and every
length is checked before anything is allocated, so a tiny hostile file costs a small
multiple of its own size and ends in one ``ValueError`` naming the file and the field."""

from __future__ import annotations

import numpy as np
import pytest
from fuzz_kit import mutants, python_peak
from onnx_writer import _field, _key, _model, _node, _tensor, _varint

from dtl_kernels.models.onnx_reader import ENTRY_ALLOWANCE, MAX_DIMS, read_onnx

MIB = 2**20


def _initializer(tensor_body: bytes) -> bytes:
    return _field(7, _field(5, tensor_body))


HOSTILE = {
    # name (bytes) sent as a varint of 2^28: main allocated bytes(2^28)
    "name as a huge varint": (_initializer(_key(8, 0) + _varint(2**28)), "initializer[0].name"),
    "raw_data as a varint": (_initializer(_field(2, 1) + _key(9, 0) + _varint(5)), "raw_data"),
    "float_data as fixed64": (
        _initializer(_field(2, 1) + _key(4, 1) + b"\xff" * 8),
        "float_data: arrives as fixed64",
    ),
    "truncated fixed32 at the end": (
        _initializer(_field(2, 1) + _key(4, 5) + b"\x00\x00"),
        "float_data: truncated",
    ),
    "truncated fixed64 at the end": (
        _initializer(_field(2, 1) + _key(3, 1) + b"\x00\x00\x00"),
        "field 3: truncated",
    ),
    "a length beyond the file": (_key(7, 2) + _varint(2**40) + b"\x00", "model.graph: truncated"),
    "too many dimensions": (
        _initializer(_field(1, _varint(1) * (MAX_DIMS + 1)) + _field(2, 1)),
        "dims: more than",
    ),
    "a negative dimension": (
        _initializer(_field(1, _varint(2**64 - 1)) + _field(2, 1)),
        "negative or huge dimension",
    ),
    "a node name that is not UTF-8": (_field(7, _field(1, _field(3, b"\xff\xfe"))), "not UTF-8"),
    "two graphs": (_field(7, b"") + _field(7, b""), "2 graphs"),
    "two initializers of one name": (
        _field(7, _field(5, _field(8, b"w") + _field(2, 1) + _field(9, b"\x00" * 4)) * 2),
        "a second initializer named 'w'",
    ),
}


@pytest.mark.parametrize("case", HOSTILE, ids=list(HOSTILE))
def test_hostile_fields_are_one_error_naming_file_and_field(tmp_path, case):
    data, field = HOSTILE[case]
    path = tmp_path / "hostile.onnx"
    path.write_bytes(data)
    result, peak = python_peak(lambda: read_onnx(path))
    assert isinstance(result, ValueError), result
    assert str(path) in str(result) and field in str(result), str(result)
    assert peak < MIB, f"{len(data)}-byte file cost {peak} bytes"


def test_a_million_tiny_nodes_are_refused_before_they_cost_fifty_times_the_file(tmp_path):
    """A node of five bytes costs a few hundred as Python objects: past a flat allowance,
    one entry per BYTES_PER_ENTRY bytes of file (the allowance itself always reads)."""
    tiny = _field(1, _field(4, b"A"))  # a node with only an op_type: 5 bytes
    data = _field(7, tiny * 200_000)
    path = tmp_path / "tiny-nodes.onnx"
    path.write_bytes(data)
    result, peak = python_peak(lambda: read_onnx(path))
    assert isinstance(
        result, ValueError
    ) and "nodes, initializers and node names for a file of" in str(result)
    assert peak < 16 * len(data), f"{len(data)}-byte file cost {peak} bytes"
    path.write_bytes(_field(7, tiny * (ENTRY_ALLOWANCE // 2)))  # a node and its op_type
    assert len(read_onnx(path).nodes) == ENTRY_ALLOWANCE // 2
    many_inputs = _field(7, _field(1, _field(1, b"x") * 400_000))  # one node, 400 k names
    path.write_bytes(many_inputs)
    result, peak = python_peak(lambda: read_onnx(path))
    assert isinstance(result, ValueError) and "node names for a file of" in str(result)
    assert peak < 16 * len(many_inputs), f"{len(many_inputs)}-byte file cost {peak} bytes"


def _valid_model() -> bytes:
    rng = np.random.default_rng(0)
    tensors = [
        _tensor("a", rng.standard_normal((4, 6)).astype(np.float32)),
        _tensor("b", rng.standard_normal(5).astype(np.float32), raw=False, packed_dims=False),
        _tensor("onnx::MatMul_1", rng.standard_normal((3, 3)).astype(np.float32)),
        _tensor("c", np.zeros(2, np.float32), dtype=7),
    ]
    nodes = [_node("/x/MatMul", "MatMul", ["in", "onnx::MatMul_1"]), _node("/y", "Add", ["a"])]
    return _model(tensors, nodes)


def test_fuzzed_onnx_files_read_or_fail_cleanly_within_a_small_multiple_of_their_size(tmp_path):
    valid = _valid_model()
    path = tmp_path / "fuzzed.onnx"
    outcomes = {"read": 0, "refused": 0}
    for data in mutants(valid, count=400, seed=22):
        path.write_bytes(data)
        result, peak = python_peak(lambda: read_onnx(path))
        if isinstance(result, Exception):
            assert isinstance(result, ValueError), (data, repr(result))
            assert str(path) in str(result), str(result)
            outcomes["refused"] += 1
        else:
            for t in result.initializers.values():
                assert t.numel() * 4 <= len(data)
            outcomes["read"] += 1
        assert peak <= 64 * len(data) + 64 * 1024, (data, peak)
    assert outcomes["read"] > 20 and outcomes["refused"] > 20, outcomes  # both paths exercised
