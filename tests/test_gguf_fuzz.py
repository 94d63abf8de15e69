"""Fuzz: any mutation of a small valid GGUF either loads and dequantizes, or raises CheckpointError."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from zen_eco.checkpoint.gguf_file import GGUFFile
from zen_eco.checkpoint.gguf_quants import SUPPORTED_TYPES, dequantize
from zen_eco.errors import CheckpointError


@pytest.fixture(scope="module")
def seed_file(gguf_craft) -> bytes:
    """The small valid file, plus a Q4_1 tensor and a nested array, so mutations reach more code."""
    c = gguf_craft
    parts = c.parts()
    parts["kvs"].append(c.kv_array("x.nested", 9, 1, c.u32(6) + c.u64(2) + struct.pack("<2f", 1, 2)))
    parts["infos"].append(c.tensor_info("c.weight", [32, 1], 3, 96))
    parts["data"] += b"\0" * (96 - len(parts["data"])) + struct.pack("<2e", 0.5, -1.0) + bytes(range(16))
    return c.build(**parts)


# One mutation: (kind, position in [0, 1), payload).
_mutation = st.tuples(
    st.sampled_from(["flip", "overwrite", "insert", "delete", "truncate"]),
    st.floats(0, 1, exclude_max=True),
    st.binary(min_size=1, max_size=16),
)


def _mutate(data: bytes, mutations: list[tuple[str, float, bytes]]) -> bytes:
    buf = bytearray(data)
    for kind, where, payload in mutations:
        i = int(where * len(buf)) if buf else 0
        if kind == "flip" and buf:
            buf[i] ^= payload[0] or 0xFF
        elif kind == "overwrite":
            buf[i:i + len(payload)] = payload
        elif kind == "insert":
            buf[i:i] = payload
        elif kind == "delete":
            del buf[i:i + len(payload)]
        elif kind == "truncate":
            del buf[i:]
    return bytes(buf)


def _load_everything(path) -> None:
    with GGUFFile(path) as f:
        for info in f.tensors.values():
            if info.ggml_type in SUPPORTED_TYPES:
                out = dequantize(f.tensor_bytes(info.name), info.ggml_type, info.shape)
                assert out.shape == info.shape
                del out


@settings(max_examples=300, deadline=None, derandomize=True)
@given(mutations=st.lists(_mutation, min_size=1, max_size=4))
def test_mutated_file_loads_or_raises_checkpoint_error(tmp_path_factory, seed_file, mutations):
    path = tmp_path_factory.getbasetemp() / "fuzz.gguf"
    path.write_bytes(_mutate(seed_file, mutations))
    try:
        _load_everything(path)
    except CheckpointError:
        pass  # anything else propagates and fails the test


def test_seed_file_is_valid(tmp_path, seed_file):
    path = tmp_path / "seed.gguf"
    path.write_bytes(seed_file)
    _load_everything(path)
