"""GGUFFile: agrees with gguf-py on a real file, rejects every crafted/corrupt file cleanly."""

from __future__ import annotations

import os
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest

from zen_eco.checkpoint.gguf_file import GGUFFile, TensorInfo
from zen_eco.errors import CheckpointError

gguf = pytest.importorskip("gguf")


def _write(tmp_path: Path, data: bytes, name: str = "t.gguf") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def _rejects(tmp_path: Path, data: bytes, match: str) -> CheckpointError:
    path = _write(tmp_path, data)
    with pytest.raises(CheckpointError, match=match) as info:
        GGUFFile(path)
    assert str(path) in str(info.value)  # the message names the file
    return info.value


# --- The real SmolLM2 file vs gguf-py ----------------------------------------


@pytest.fixture(scope="module")
def smol(smollm2_gguf_path):
    with GGUFFile(smollm2_gguf_path) as f:
        yield f


@pytest.fixture(scope="module")
def reader(smollm2_gguf_path):
    return gguf.GGUFReader(smollm2_gguf_path)


def test_real_file_metadata_matches_gguf_py(smol, reader):
    expected = {k: f for k, f in reader.fields.items() if not k.startswith("GGUF.")}
    assert list(smol.metadata) == list(expected)
    for key, field in expected.items():
        want = field.contents()
        got = smol.metadata[key]
        if isinstance(want, float):  # gguf-py hands back float32 values
            assert got == float(np.float32(want)), key
        else:
            assert got == want, key
        assert smol.value_type(key)[0] == field.types[0], key
    assert smol.version == 3
    assert smol.alignment == reader.alignment
    assert smol.data_offset == reader.data_offset


def test_real_file_tensor_infos_match_gguf_py(smol, reader):
    assert list(smol.tensors) == [t.name for t in reader.tensors]
    for t in reader.tensors:
        info = smol.tensors[t.name]
        assert info == TensorInfo(t.name, tuple(int(d) for d in reversed(t.shape)),
                                  int(t.tensor_type), int(t.data_offset), int(t.n_bytes))


def test_tensor_bytes_is_a_view_of_exact_length(smol, reader):
    t = reader.tensors[2]
    raw = smol.tensor_bytes(t.name)
    assert raw.dtype == np.uint8 and raw.shape == (t.n_bytes,)
    assert not raw.flags.owndata and not raw.flags.writeable
    assert np.array_equal(raw, t.data.reshape(-1).view(np.uint8))
    with pytest.raises(CheckpointError, match="no tensor named"):
        smol.tensor_bytes("nope")


def test_close_then_tensor_bytes_raises(smollm2_gguf_path):
    f = GGUFFile(smollm2_gguf_path)
    f.close()
    f.close()  # idempotent
    with pytest.raises(CheckpointError, match="closed"):
        f.tensor_bytes("token_embd.weight")


# --- The small hand-built file -----------------------------------------------


def test_valid_small_file(tmp_path, gguf_craft):
    with GGUFFile(_write(tmp_path, gguf_craft.valid())) as f:
        assert f.metadata == {
            "general.architecture": "llama",
            "general.alignment": 32,
            "llama.block_count": 1,
            "llama.rope.freq_base": 10000.0,
            "tokenizer.ggml.add_bos_token": True,
            "tokenizer.ggml.tokens": ["a", "bé"],
            "tokenizer.ggml.token_type": [1, 3],
        }
        assert f.tensors["a.weight"].shape == (2, 4)
        assert f.tensors["b.weight"].shape == (1, 32)
        assert f.tensors["b.weight"].nbytes == 34
        assert f.tensor_bytes("a.weight").view(np.float32).tolist() == [0.5 * i for i in range(8)]


def test_small_file_matches_gguf_py(tmp_path, gguf_craft):
    path = _write(tmp_path, gguf_craft.valid())
    reader = gguf.GGUFReader(path)
    with GGUFFile(path) as f:
        for t in reader.tensors:
            assert f.tensors[t.name].offset == t.data_offset
            assert f.tensors[t.name].nbytes == t.n_bytes


def test_nested_arrays_and_all_scalar_types(tmp_path, gguf_craft):
    c = gguf_craft
    parts = c.parts()
    inner = c.u32(4) + c.u64(2) + struct.pack("<2I", 7, 8)
    parts["kvs"] += [
        c.kv_array("x.nested", 9, 2, inner + c.u32(8) + c.u64(1) + c.string("z")),
        c.kv("x.i8", 1, struct.pack("<b", -3)),
        c.kv("x.u16", 2, struct.pack("<H", 65535)),
        c.kv("x.i16", 3, struct.pack("<h", -2)),
        c.kv("x.i32", 5, struct.pack("<i", -5)),
        c.kv("x.u64", 10, struct.pack("<Q", 2**64 - 1)),
        c.kv("x.i64", 11, struct.pack("<q", -(2**63))),
        c.kv("x.f64", 12, struct.pack("<d", 0.1)),
        c.kv_array("x.bools", 7, 3, b"\1\0\1"),
        c.kv_array("x.f32s", 6, 2, struct.pack("<2f", 1.5, -2.0)),
        c.kv_array("x.empty", 8, 0, b""),
    ]
    with GGUFFile(_write(tmp_path, c.build(**parts))) as f:
        m = f.metadata
        assert m["x.nested"] == [[7, 8], ["z"]]
        assert (m["x.i8"], m["x.u16"], m["x.i16"], m["x.i32"]) == (-3, 65535, -2, -5)
        assert (m["x.u64"], m["x.i64"], m["x.f64"]) == (2**64 - 1, -(2**63), 0.1)
        assert m["x.bools"] == [True, False, True]
        assert m["x.f32s"] == [1.5, -2.0]
        assert m["x.empty"] == []


def test_150k_string_vocabulary_parses_fast(tmp_path, gguf_craft):
    c = gguf_craft
    tokens = [f"tok{i}\u0120x" for i in range(150_000)]
    parts = c.parts()
    parts["kvs"][5] = c.kv_array("tokenizer.ggml.tokens", 8, len(tokens),
                                 b"".join(c.string(t) for t in tokens))
    path = _write(tmp_path, c.build(**parts))
    start = time.perf_counter()
    with GGUFFile(path) as f:
        elapsed = time.perf_counter() - start
        assert f.metadata["tokenizer.ggml.tokens"] == tokens
    assert elapsed < 1.0


# --- Crafted corruptions: counts and lengths ----------------------------------


def _peak_mib(fn) -> float:
    tracemalloc.start()
    try:
        fn()
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    return peak / 2**20


def test_tensor_count_2_64_rejected_without_allocating(tmp_path, gguf_craft):
    data = gguf_craft.build(**gguf_craft.parts(), n_tensors=2**64 - 1)
    path = _write(tmp_path, data)
    _rejects(tmp_path, data, "tensor count 18446744073709551615 cannot fit")
    assert _peak_mib(lambda: pytest.raises(CheckpointError, GGUFFile, path)) < 10


def test_kv_count_2_63_rejected(tmp_path, gguf_craft):
    _rejects(tmp_path, gguf_craft.build(**gguf_craft.parts(), n_kv=2**63), "KV count 9223372036854775808")


def test_string_length_larger_than_file(tmp_path, gguf_craft):
    c = gguf_craft
    parts = c.parts()
    parts["kvs"][0] = c.kv("general.architecture", 8, c.u64(2**63) + b"llama")
    path = _write(tmp_path, c.build(**parts))
    _rejects(tmp_path, c.build(**parts), "length 9223372036854775808")
    assert _peak_mib(lambda: pytest.raises(CheckpointError, GGUFFile, path)) < 10


@pytest.mark.parametrize("elem_type", [0, 8, 9])  # uint8, string, array
def test_array_length_larger_than_file(tmp_path, gguf_craft, elem_type):
    c = gguf_craft
    parts = c.parts()
    parts["kvs"].append(c.kv_array("x.huge", elem_type, 2**60, b"\0" * 16))
    path = _write(tmp_path, c.build(**parts))
    _rejects(tmp_path, c.build(**parts), "array length 1152921504606846976")
    assert _peak_mib(lambda: pytest.raises(CheckpointError, GGUFFile, path)) < 10


def test_invalid_array_element_type(tmp_path, gguf_craft):
    c = gguf_craft
    parts = c.parts()
    parts["kvs"].append(c.kv_array("x.bad", 13, 1, b"\0" * 8))
    _rejects(tmp_path, c.build(**parts), "invalid array element type 13")


def test_invalid_value_type(tmp_path, gguf_craft):
    c = gguf_craft
    parts = c.parts()
    parts["kvs"].append(c.kv("x.bad", 99, b"\0" * 8))
    _rejects(tmp_path, c.build(**parts), "invalid value type 99")


def test_nested_array_depth_limit(tmp_path, gguf_craft):
    c = gguf_craft
    payload = c.u32(0) + c.u64(0)
    for _ in range(10):
        payload = c.u32(9) + c.u64(1) + payload
    parts = c.parts()
    parts["kvs"].append(c.kv("x.deep", 9, payload))
    _rejects(tmp_path, c.build(**parts), "nested deeper")


def test_bool_out_of_range(tmp_path, gguf_craft):
    c = gguf_craft
    parts = c.parts()
    parts["kvs"][4] = c.kv("tokenizer.ggml.add_bos_token", 7, b"\2")
    _rejects(tmp_path, c.build(**parts), "byte value 2")


# --- Crafted corruptions: metadata types and values ----------------------------


def test_wrong_type_for_architecture(tmp_path, gguf_craft):
    c = gguf_craft
    parts = c.parts()
    parts["kvs"][0] = c.kv_u32("general.architecture", 7)
    _rejects(tmp_path, c.build(**parts), "'general.architecture' has type uint32, expected string")


def test_wrong_type_for_arch_prefixed_key(tmp_path, gguf_craft):
    c = gguf_craft
    parts = c.parts()
    parts["kvs"][2] = c.kv_str("llama.block_count", "30")
    _rejects(tmp_path, c.build(**parts), "'llama.block_count' has type string")


def test_alignment_must_be_uint32(tmp_path, gguf_craft):
    c = gguf_craft
    parts = c.parts()
    parts["kvs"][1] = c.kv("general.alignment", 10, c.u64(32))
    _rejects(tmp_path, c.build(**parts), "'general.alignment' has type uint64")


@pytest.mark.parametrize("alignment", [0, 3, 48])
def test_bad_alignment(tmp_path, gguf_craft, alignment):
    c = gguf_craft
    parts = c.parts()
    parts["kvs"][1] = c.kv_u32("general.alignment", alignment)
    _rejects(tmp_path, c.build(**parts), f"alignment is {alignment}, must be a power of two")


def test_invalid_utf8(tmp_path, gguf_craft):
    c = gguf_craft
    parts = c.parts()
    parts["kvs"][0] = c.kv_str("general.architecture", b"lla\xff\xfe")
    _rejects(tmp_path, c.build(**parts), "not valid UTF-8")


def test_invalid_utf8_in_string_array(tmp_path, gguf_craft):
    c = gguf_craft
    parts = c.parts()
    parts["kvs"][5] = c.kv_array("tokenizer.ggml.tokens", 8, 2, c.string("a") + c.string(b"\xc3"))
    _rejects(tmp_path, c.build(**parts), r"tokens'\[1\].*not valid UTF-8")


def test_duplicate_metadata_key(tmp_path, gguf_craft):
    c = gguf_craft
    parts = c.parts()
    parts["kvs"].append(c.kv_u32("llama.block_count", 2))
    _rejects(tmp_path, c.build(**parts), "duplicate metadata key 'llama.block_count'")


# --- Crafted corruptions: header ------------------------------------------------


def test_bad_magic(tmp_path, gguf_craft):
    _rejects(tmp_path, gguf_craft.build(**gguf_craft.parts(), magic=b"GGML"), "not a GGUF file")


@pytest.mark.parametrize("version,match", [(1, "version 1 is not supported"),
                                           (4, "unsupported GGUF version 4"),
                                           (0x03000000, "big-endian")])
def test_unsupported_version(tmp_path, gguf_craft, version, match):
    _rejects(tmp_path, gguf_craft.build(**gguf_craft.parts(), version=version), match)


def test_version_2_accepted(tmp_path, gguf_craft):
    with GGUFFile(_write(tmp_path, gguf_craft.build(**gguf_craft.parts(), version=2))) as f:
        assert f.version == 2


# --- Crafted corruptions: tensor infos ------------------------------------------


def _with_tensor(c, info: bytes, index: int = 1) -> bytes:
    parts = c.parts()
    parts["infos"][index] = info
    return c.build(**parts)


def test_dims_product_overflows_int64(tmp_path, gguf_craft):
    info = gguf_craft.tensor_info("b.weight", [32, 2**40, 2**40], 8, 32)
    _rejects(tmp_path, _with_tensor(gguf_craft, info), "overflows int64")


def test_dims_larger_than_file(tmp_path, gguf_craft):
    info = gguf_craft.tensor_info("b.weight", [32, 2**30], 8, 32)
    _rejects(tmp_path, _with_tensor(gguf_craft, info), "more than the whole file")


@pytest.mark.parametrize("dim,shown", [(0, "0"), (2**64 - 1, "-1")])
def test_zero_or_negative_dim(tmp_path, gguf_craft, dim, shown):
    info = gguf_craft.tensor_info("b.weight", [32, dim], 8, 32)
    _rejects(tmp_path, _with_tensor(gguf_craft, info), f"dim 1 = {shown} \\(must be > 0\\)")


@pytest.mark.parametrize("ne", [[], [32, 1, 1, 1, 1]])
def test_n_dims_out_of_range(tmp_path, gguf_craft, ne):
    info = gguf_craft.tensor_info("b.weight", ne, 8, 32)
    _rejects(tmp_path, _with_tensor(gguf_craft, info), f"n_dims {len(ne)} \\(must be 1..4\\)")


def test_row_not_multiple_of_block(tmp_path, gguf_craft):
    info = gguf_craft.tensor_info("b.weight", [16, 2], 8, 32)
    _rejects(tmp_path, _with_tensor(gguf_craft, info), "ne\\[0\\]=16, not a multiple of the block size 32")


def test_unknown_ggml_type(tmp_path, gguf_craft):
    info = gguf_craft.tensor_info("b.weight", [32, 1], 4, 32)  # 4 (old Q4_2) was removed
    _rejects(tmp_path, _with_tensor(gguf_craft, info), "unknown ggml type 4")


def test_offset_past_end(tmp_path, gguf_craft):
    info = gguf_craft.tensor_info("b.weight", [32, 1], 8, 64)
    _rejects(tmp_path, _with_tensor(gguf_craft, info), "runs past the end")


def test_huge_offset_past_end(tmp_path, gguf_craft):
    info = gguf_craft.tensor_info("b.weight", [32, 1], 8, 2**64 - 32)
    _rejects(tmp_path, _with_tensor(gguf_craft, info), "runs past the end")


def test_misaligned_offset(tmp_path, gguf_craft):
    info = gguf_craft.tensor_info("b.weight", [32, 1], 8, 33)
    _rejects(tmp_path, _with_tensor(gguf_craft, info), "offset 33, not a multiple of the alignment 32")


def test_overlapping_tensors(tmp_path, gguf_craft):
    info = gguf_craft.tensor_info("b.weight", [32, 1], 8, 0)  # on top of a.weight
    _rejects(tmp_path, _with_tensor(gguf_craft, info), "overlaps tensor")


def test_duplicate_tensor_name(tmp_path, gguf_craft):
    info = gguf_craft.tensor_info("a.weight", [32, 1], 8, 32)
    _rejects(tmp_path, _with_tensor(gguf_craft, info), "duplicate tensor name 'a.weight'")


# --- Truncation, garbage, and things that aren't files ---------------------------


def test_every_truncation_rejected(tmp_path, gguf_craft):
    data = gguf_craft.valid()
    path = tmp_path / "cut.gguf"
    for n in range(len(data)):
        path.write_bytes(data[:n])
        with pytest.raises(CheckpointError):
            GGUFFile(path)


def test_random_bytes_rejected(tmp_path):
    rng = np.random.default_rng(1)
    for i in range(50):
        data = rng.integers(0, 256, int(rng.integers(1, 4096)), dtype=np.uint8).tobytes()
        if i % 2:
            data = b"GGUF" + struct.pack("<I", 3) + data  # get past the magic
        _rejects(tmp_path, data, ".")


def test_empty_file(tmp_path):
    _rejects(tmp_path, b"", "empty file")


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="no such file"):
        GGUFFile(tmp_path / "missing.gguf")


def test_directory(tmp_path):
    with pytest.raises(CheckpointError, match="is a directory"):
        GGUFFile(tmp_path)


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no FIFOs here")
def test_fifo_is_not_a_regular_file(tmp_path):
    fifo = tmp_path / "pipe.gguf"
    os.mkfifo(fifo)
    with pytest.raises(CheckpointError, match="not a regular file"):
        GGUFFile(fifo)
