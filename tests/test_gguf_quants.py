"""dequantize(): bit-identical to gguf-py's reference for every supported type."""

from __future__ import annotations

import time

import numpy as np
import pytest

from zen_eco.checkpoint.gguf_file import GGML_TYPES, GGUFFile
from zen_eco.checkpoint.gguf_quants import SUPPORTED_TYPES, dequantize
from zen_eco.errors import CheckpointError

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as ref_dequantize  # noqa: E402

# Byte offsets of the fp16 scale/min fields inside one block, per type.
FP16_FIELDS = {2: [0], 3: [0, 2], 6: [0], 7: [0, 2], 8: [0],
               10: [80, 82], 11: [108], 12: [0, 2], 13: [0, 2], 14: [208]}


def _reference(raw: np.ndarray, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    rows = raw.reshape(int(np.prod(shape[:-1])), -1)
    return ref_dequantize(rows, gguf.GGMLQuantizationType(ggml_type)).reshape(shape)


def _same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float32 and a.shape == b.shape and np.array_equal(
        a.view(np.uint32), b.view(np.uint32))


def test_supported_types():
    assert set(SUPPORTED_TYPES.values()) == {"F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0",
                                             "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K"}


@pytest.mark.parametrize("ggml_type", sorted(SUPPORTED_TYPES), ids=SUPPORTED_TYPES.get)
def test_random_blocks_bit_identical(ggml_type):
    layout = GGML_TYPES[ggml_type]
    rng = np.random.default_rng(ggml_type)
    n_blocks = 96
    blocks = rng.integers(0, 256, (n_blocks, layout.type_size), dtype=np.uint8)
    # Random but finite fp16 scales, including tiny and large ones.
    for at in FP16_FIELDS.get(ggml_type, []):
        scales = (rng.uniform(-1, 1, n_blocks) * 10.0 ** rng.integers(-6, 4, n_blocks)).astype(np.float16)
        blocks[:, at:at + 2] = scales.view(np.uint8).reshape(n_blocks, 2)
    shape = (3, n_blocks * layout.block_size // 3)
    got = dequantize(blocks.reshape(-1), ggml_type, shape)
    assert _same_bits(got, _reference(blocks, ggml_type, shape))
    if ggml_type in FP16_FIELDS:
        assert np.isfinite(got).all()


@pytest.mark.parametrize("name,ggml_type", [("F32", 0), ("F16", 1), ("BF16", 30)])
def test_float_types_keep_nan_and_inf_bits(name, ggml_type):
    # Every fp16/bf16 bit pattern, including NaN payloads and infinities.
    if ggml_type == 0:
        raw = np.random.default_rng(0).integers(0, 2**32, 4096, dtype=np.uint32).view(np.uint8)
    else:
        raw = np.arange(2**16, dtype=np.uint16).view(np.uint8)
    shape = (raw.size // GGML_TYPES[ggml_type].type_size,)
    assert _same_bits(dequantize(raw, ggml_type, shape), _reference(raw, ggml_type, shape).astype(np.float32))


def test_every_smollm2_tensor_bit_identical(smollm2_gguf_path):
    with GGUFFile(smollm2_gguf_path) as f:
        for info in f.tensors.values():
            raw = f.tensor_bytes(info.name)
            got = dequantize(raw, info.ggml_type, info.shape)
            want = _reference(raw, info.ggml_type, info.shape).astype(np.float32, copy=False)
            assert _same_bits(got, want), info.name
            assert not np.may_share_memory(got, raw)  # owns its memory, does not pin the mmap


def test_smollm2_dequantizes_in_a_few_seconds(smollm2_gguf_path):
    with GGUFFile(smollm2_gguf_path) as f:
        start = time.perf_counter()
        n = sum(dequantize(f.tensor_bytes(t.name), t.ggml_type, t.shape).size for t in f.tensors.values())
        elapsed = time.perf_counter() - start
    assert n > 130e6
    assert elapsed < 10.0, f"{n / 1e6:.0f}M weights took {elapsed:.1f}s"


def test_unsupported_type_names_it_and_lists_supported():
    raw = np.zeros(66, dtype=np.uint8)
    with pytest.raises(CheckpointError, match=r"IQ2_XXS \(supported: F32, F16, Q4_0.*Q6_K, BF16\)"):
        dequantize(raw, 16, (256,))
    with pytest.raises(CheckpointError, match=r"unknown\(999\)"):
        dequantize(raw, 999, (256,))


@pytest.mark.parametrize("nbytes,shape,match", [
    (33, (32,), "needs 34 bytes, got 33"),
    (34, (16, 2), "not a multiple of the Q8_0 block size"),
    (34, (0, 32), "invalid shape"),
    (34, (), "invalid shape"),
])
def test_size_and_shape_mismatch(nbytes, shape, match):
    with pytest.raises(CheckpointError, match=match):
        dequantize(np.zeros(nbytes, dtype=np.uint8), 8, shape)


def test_non_byte_input_rejected():
    with pytest.raises(CheckpointError, match="uint8"):
        dequantize(np.zeros(8, dtype=np.float32), 0, (8,))


@pytest.mark.parametrize("ggml_type", [2, 3, 6, 7, 8, 10, 11, 12, 13, 14], ids=SUPPORTED_TYPES.get)
def test_c_decoders_equal_numpy(ggml_type, monkeypatch):
    """gguf_native's one-pass C decoders (what loading uses) give the numpy functions' arrays bit for bit,
    on random blocks whose float16 fields take every kind of value (subnormal, inf, NaN included); both
    decode into a caller's array as they return codes."""
    from zen_eco.checkpoint import gguf_native
    from zen_eco.checkpoint.gguf_quants import Q4_TYPES, Q5_TYPES, q4_codes, q5_codes, q8_block_codes

    if gguf_native.library() is None:
        pytest.skip("no C compiler here")
    layout = GGML_TYPES[ggml_type]
    rows, per_row = 6, 2
    raw = np.random.default_rng(ggml_type).integers(0, 256, (rows * per_row, layout.type_size), dtype=np.uint8)
    shape = (rows, per_row * layout.block_size)
    decoders = [q8_block_codes] + [q5_codes] * (ggml_type in Q4_TYPES + Q5_TYPES) + [q4_codes] * (ggml_type in Q4_TYPES)

    def run():
        out = []
        for f in decoders:
            got = f(raw.reshape(-1), ggml_type, shape)
            # decoding into a caller's array (the rows of a fused matrix): the same codes, in that array
            into = np.full((rows + 2, shape[1]), 7, dtype=got[0].dtype)
            again = f(raw.reshape(-1), ggml_type, shape, codes_out=into[1:-1])
            assert np.shares_memory(again[0], into) and (into[[0, -1]] == 7).all()
            assert np.array_equal(again[0], got[0])
            out += [a for a in got + again[:1] if a is not None]
        if ggml_type in (6, 7, 10, 11, 13, 14):  # dequantize goes through the same value helpers
            out.append(dequantize(raw.reshape(-1), ggml_type, shape))
        return out

    with np.errstate(all="ignore"):
        native = run()
        monkeypatch.setattr(gguf_native, "usable", lambda blocks, size: False)
        reference = run()
    assert len(native) == len(reference) > 0
    for a, b in zip(native, reference):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert np.array_equal(np.ascontiguousarray(a).view(np.uint8), np.ascontiguousarray(b).view(np.uint8))
