"""Dequantize GGUF tensor data to float32 with numpy.

One small function per format, each turning an array of blocks
(n_blocks, bytes_per_block) uint8 into (n_blocks, block_size) float32.
Results are bit-identical to ggml's reference dequantization: every float
operation is done in float32 in the same order as ggml (fp16 scales are
widened to float32 first, then e.g. `(d * sc) * q - (dmin * m)`), and numpy
never fuses a multiply-add, so no step rounds differently.
"""

from __future__ import annotations

from typing import Callable

import numpy as np

from zen_eco.checkpoint import gguf_native
from zen_eco.checkpoint.gguf_file import GGML_TYPES, ggml_type_name
from zen_eco.errors import CheckpointError

BlockFn = Callable[[np.ndarray], np.ndarray]  # (n, type_size) uint8 -> (n, block_size) float32
_REGISTRY: dict[int, BlockFn] = {}


def _register(ggml_type: int) -> Callable[[BlockFn], BlockFn]:
    def add(fn: BlockFn) -> BlockFn:
        _REGISTRY[ggml_type] = fn
        return fn
    return add


# --- Bit-level helpers ------------------------------------------------------


def _f16(blocks: np.ndarray, at: int) -> np.ndarray:
    """The fp16 at byte `at` of every block, widened to float32: (n, 1)."""
    return np.ascontiguousarray(blocks[:, at:at + 2]).view(np.float16).astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 2k): all low nibbles, then all high nibbles (ggml's order)."""
    out = np.empty((qs.shape[0], 2 * qs.shape[1]), dtype=np.uint8)
    np.bitwise_and(qs, 0x0F, out=out[:, :qs.shape[1]])
    np.right_shift(qs, 4, out=out[:, qs.shape[1]:])
    return out


def _bits(packed: np.ndarray) -> np.ndarray:
    """(n, k) bytes -> (n, 8k) bits, bit i of the little-endian bit string at column i."""
    return np.unpackbits(packed, axis=1, bitorder="little")


def _k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K/Q5_K 12-byte packed 6-bit (scale, min) pairs -> two (n, 8) uint8 arrays.

    Sub-blocks 0..3 keep scale and min in the low 6 bits of bytes 0..3 / 4..7;
    sub-blocks 4..7 take their low 4 bits from the nibbles of bytes 8..11 and
    their top 2 bits from the top bits of bytes 0..3 / 4..7.
    """
    a, b, c = packed[:, 0:4], packed[:, 4:8], packed[:, 8:12]
    sc = np.concatenate([a & 0x3F, (c & 0x0F) | ((a >> 6) << 4)], axis=1)
    mn = np.concatenate([b & 0x3F, (c >> 4) | ((b >> 6) << 4)], axis=1)
    return sc, mn


# --- Plain float formats ----------------------------------------------------


@_register(0)
def _f32(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float32).copy()  # copy: own the memory, don't pin the mmap


@_register(1)
def _f16_blocks(blocks: np.ndarray) -> np.ndarray:
    return blocks.view(np.float16).astype(np.float32)


@_register(30)
def _bf16(blocks: np.ndarray) -> np.ndarray:
    # bf16 is the top half of a float32.
    return (blocks.view(np.uint16).astype(np.uint32) << 16).view(np.float32)


# --- 32-element block formats ---------------------------------------------


@_register(8)
def _q8_0(blocks: np.ndarray) -> np.ndarray:
    # d: f16 | qs: 32 x int8.  y = q * d
    out = blocks[:, 2:].view(np.int8).astype(np.float32)
    out *= _f16(blocks, 0)
    return out


@_register(2)
def _q4_0(blocks: np.ndarray) -> np.ndarray:
    # d: f16 | qs: 16 bytes of nibbles.  y = (q - 8) * d
    q = _nibbles(blocks[:, 2:]).view(np.int8) - np.int8(8)
    out = q.astype(np.float32)
    out *= _f16(blocks, 0)
    return out


@_register(3)
def _q4_1(blocks: np.ndarray) -> np.ndarray:
    # d: f16 | m: f16 | qs: 16 bytes of nibbles.  y = q * d + m
    out = _nibbles(blocks[:, 4:]).astype(np.float32)
    out *= _f16(blocks, 0)
    out += _f16(blocks, 2)
    return out


def _q5_values(blocks: np.ndarray, at: int) -> np.ndarray:
    """Q5_0 (at 2) / Q5_1 (at 4) blocks -> their 5-bit values uint8 (n, 32): qh's 32 high bits at byte
    `at`, then 16 bytes of nibbles."""
    if gguf_native.usable(blocks, at + 20):
        return gguf_native.nibbles(blocks, at + 4, at)[0]
    return _nibbles(blocks[:, at + 4:]) | (_bits(blocks[:, at:at + 4]) << 4)


@_register(6)
def _q5_0(blocks: np.ndarray) -> np.ndarray:
    # d: f16 | qh: 32 high bits | qs: 16 bytes of nibbles.  y = (q - 16) * d
    out = (_q5_values(blocks, 2).view(np.int8) - np.int8(16)).astype(np.float32)
    out *= _f16(blocks, 0)
    return out


@_register(7)
def _q5_1(blocks: np.ndarray) -> np.ndarray:
    # d: f16 | m: f16 | qh: 32 high bits | qs: 16 bytes of nibbles.  y = q * d + m
    out = _q5_values(blocks, 4).astype(np.float32)
    out *= _f16(blocks, 0)
    out += _f16(blocks, 2)
    return out


# --- K-quants: 256-element super-blocks --------------------------------------


def _q2_k_values(blocks: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q2_K blocks -> (values uint8 (n, 16, 16) in [0, 3], scale d * sc and min dmin * m float32 (n, 16))
    per sub-block of 16: w = scale * q - min. (`out` as in _q5_k_values.)"""
    # scales: 16 x (4-bit scale | 4-bit min) | qs: 64 bytes of 2-bit q | d: f16 | dmin: f16
    if gguf_native.usable(blocks, 84):
        return gguf_native.q2_k(blocks, out)
    n = blocks.shape[0]
    scales = blocks[:, 0:16]
    dl = _f16(blocks, 80) * (scales & 0x0F).astype(np.float32)  # (n, 16)
    ml = _f16(blocks, 82) * (scales >> 4).astype(np.float32)
    # Two halves of 128; each reads its 32 bytes four times, at shifts 0, 2, 4, 6.
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    q = (blocks[:, 16:80].reshape(n, 2, 1, 32) >> shifts) & 3  # (n, 2, 4, 32)
    return q.reshape(n, 16, 16), dl, ml


@_register(10)
def _q2_k(blocks: np.ndarray) -> np.ndarray:
    q, dl, ml = _q2_k_values(blocks)
    out = q.astype(np.float32)
    out *= dl[:, :, None]
    out -= ml[:, :, None]
    return out.reshape(-1, 256)


def _q3_k_values(blocks: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Q3_K blocks -> (values int8 (n, 16, 16) in [-4, 3], scale d * (sc - 32) float32 (n, 16)) per sub-block
    of 16. (`out` as in _q5_k_values.)"""
    # hmask: 32 bytes | qs: 64 bytes of 2-bit q | scales: 12 bytes of 6-bit | d: f16
    if gguf_native.usable(blocks, 110):
        return gguf_native.q3_k(blocks, out)
    n = blocks.shape[0]
    packed = blocks[:, 96:108]
    # Scale i: low 4 bits from nibbles of bytes 0..7 (low nibbles first),
    # high 2 bits from bytes 8..11 at shift 2 * (i // 4).
    low = _nibbles(packed[:, 0:8])  # (n, 16)
    high = (packed[:, 8:12].reshape(n, 1, 4) >> np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 4, 1)) & 3
    sc = (low | (high.reshape(n, 16) << 4)).view(np.int8) - np.int8(32)
    dl = _f16(blocks, 108) * sc.astype(np.float32)  # (n, 16)
    shifts = np.array([0, 2, 4, 6], dtype=np.uint8).reshape(1, 1, 4, 1)
    lo = ((blocks[:, 32:96].reshape(n, 2, 1, 32) >> shifts) & 3).reshape(n, 8, 32)
    # Group g = 4 * half + shift reads bit g of hmask; a CLEAR bit means "subtract 4".
    hbit = (blocks[:, 0:32].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    q = lo.view(np.int8) - ((hbit ^ 1) << 2).view(np.int8)
    return q.reshape(n, 16, 16), dl


@_register(11)
def _q3_k(blocks: np.ndarray) -> np.ndarray:
    q, dl = _q3_k_values(blocks)
    out = q.astype(np.float32)
    out *= dl[:, :, None]
    return out.reshape(blocks.shape[0], 256)


@_register(12)
def _q4_k(blocks: np.ndarray) -> np.ndarray:
    # d: f16 | dmin: f16 | scales: 12 bytes (8 x 6-bit scale, 8 x 6-bit min) | qs: 128 bytes
    n = blocks.shape[0]
    sc, mn = _k_scales(blocks[:, 4:16])
    d1 = _f16(blocks, 0) * sc.astype(np.float32)  # (n, 8)
    m1 = _f16(blocks, 2) * mn.astype(np.float32)
    # Four chunks of 32 bytes: 32 low nibbles (sub-block 2c), then 32 high (2c + 1).
    q = _nibbles(blocks[:, 16:144].reshape(n * 4, 32)).reshape(n, 8, 32)
    out = q.astype(np.float32)
    out *= d1[:, :, None]
    out -= m1[:, :, None]
    return out.reshape(n, 256)


def _q5_k_values(blocks: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Q5_K blocks -> (values uint8 (n, 8, 32) in [0, 31], d * sc, dmin * m float32 (n, 8)) per sub-block of 32.
    (`out`, here and in _q6_k_values: where the C decoder writes the values; numpy's are a new array.)"""
    # d: f16 | dmin: f16 | scales: 12 bytes | qh: 32 bytes | qs: 128 bytes
    if gguf_native.usable(blocks, 176):
        return gguf_native.k_quant(blocks, five=True, codes=out)
    n = blocks.shape[0]
    sc, mn = _k_scales(blocks[:, 4:16])
    d1 = _f16(blocks, 0) * sc.astype(np.float32)
    m1 = _f16(blocks, 2) * mn.astype(np.float32)
    low = _nibbles(blocks[:, 48:176].reshape(n * 4, 32)).reshape(n, 8, 32)
    # Sub-block s takes its 5th bit from bit s of qh[l].
    hbit = (blocks[:, 16:48].reshape(n, 1, 32) >> np.arange(8, dtype=np.uint8).reshape(1, 8, 1)) & 1
    return low | (hbit << 4), d1, m1


@_register(13)
def _q5_k(blocks: np.ndarray) -> np.ndarray:
    q, d1, m1 = _q5_k_values(blocks)
    out = q.astype(np.float32)
    out *= d1[:, :, None]
    out -= m1[:, :, None]
    return out.reshape(blocks.shape[0], 256)


def _q6_k_values(blocks: np.ndarray, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Q6_K blocks -> (values int8 (n, 16, 16) in [-32, 31], scale d * sc float32 (n, 16)) per sub-block of 16."""
    # ql: 128 bytes of low nibbles | qh: 64 bytes of 2-bit highs | scales: 16 x int8 | d: f16
    if gguf_native.usable(blocks, 210):
        return gguf_native.q6_k(blocks, out)
    n = blocks.shape[0]
    d16 = _f16(blocks, 208) * blocks[:, 192:208].view(np.int8).astype(np.float32)  # (n, 16)
    # Per half of 128 values, four groups of 32: the low nibbles of its ql bytes 0..31, of 32..63, then
    # their high nibbles; group g takes bits 2g..2g+1 of the half's 32 qh bytes as bits 4..5. In place,
    # a quarter-size temporary at a time: this table is the largest tensor of a Q4_K_M / Q5_K_M file.
    q = np.empty((n, 2, 4, 32), dtype=np.uint8)
    ql = blocks[:, 0:128].reshape(n, 2, 2, 32)
    qh = blocks[:, 128:192].reshape(n, 2, 32)
    np.bitwise_and(ql, 15, out=q[:, :, 0:2])
    np.right_shift(ql, 4, out=q[:, :, 2:4])
    high = np.empty((n, 2, 32), dtype=np.uint8)
    for g in range(4):
        np.right_shift(qh, 2 * g, out=high)
        np.bitwise_and(high, 3, out=high)
        np.left_shift(high, 4, out=high)
        np.bitwise_or(q[:, :, g], high, out=q[:, :, g])
    q = q.view(np.int8)
    q -= np.int8(32)
    return q.reshape(n, 16, 16), d16


@_register(14)
def _q6_k(blocks: np.ndarray) -> np.ndarray:
    q, d16 = _q6_k_values(blocks)
    out = q.astype(np.float32)
    out *= d16[:, :, None]
    return out.reshape(blocks.shape[0], 256)


SUPPORTED_TYPES: dict[int, str] = {t: GGML_TYPES[t].name for t in sorted(_REGISTRY)}

# Bound the float32 temporaries of one call: blocks are done in slices of this many.
_CHUNK_BLOCKS = 1 << 16


def dequantize(data: np.ndarray, ggml_type: int, shape: tuple[int, ...], *,
               what: str = "tensor") -> np.ndarray:
    """Raw GGUF tensor bytes -> float32 array of `shape` (numpy order, ne reversed).

    `what` names the tensor (and file) in error messages.
    """
    fn = _REGISTRY.get(ggml_type)
    if fn is None:
        supported = ", ".join(SUPPORTED_TYPES.values())
        raise CheckpointError(f"{what}: cannot dequantize ggml type {ggml_type_name(ggml_type)} "
                              f"(supported: {supported})")
    layout = GGML_TYPES[ggml_type]
    shape = tuple(shape)
    if not shape or any(not isinstance(s, (int, np.integer)) or s <= 0 for s in shape):
        raise CheckpointError(f"{what}: invalid shape {shape} (need positive dims)")
    if shape[-1] % layout.block_size:
        raise CheckpointError(f"{what}: row length {shape[-1]} is not a multiple of the "
                              f"{layout.name} block size {layout.block_size}")
    n_elements = int(np.prod(shape, dtype=object))
    n_blocks = n_elements // layout.block_size
    data = np.asarray(data)
    if data.dtype != np.uint8:
        raise CheckpointError(f"{what}: expected raw uint8 bytes, got dtype {data.dtype}")
    if data.size != n_blocks * layout.type_size:
        raise CheckpointError(f"{what}: {layout.name} shape {shape} needs "
                              f"{n_blocks * layout.type_size} bytes, got {data.size}")
    blocks = np.ascontiguousarray(data.reshape(n_blocks, layout.type_size))
    out = np.empty((n_blocks, layout.block_size), dtype=np.float32)
    # inf/NaN scales in a file are its own business; numpy must not warn about them.
    with np.errstate(all="ignore"):
        for start in range(0, n_blocks, _CHUNK_BLOCKS):
            stop = min(start + _CHUNK_BLOCKS, n_blocks)
            out[start:stop] = fn(blocks[start:stop])
    return out.reshape(shape)


# --- 4-bit weights kept packed -------------------------------------------------

Q4_TYPES = (2, 3, 12)  # Q4_0, Q4_1 (32-element blocks), Q4_K (256, as 8 sub-blocks of 32): a (scale, offset) per 32


def _matrix_blocks(data: np.ndarray, ggml_type: int, shape: tuple[int, ...], types: tuple[int, ...], label: str,
                   what: str) -> np.ndarray:
    """A (N, K) matrix's bytes as one row per block, after checking its type and size."""
    if ggml_type not in types or len(shape) != 2:
        raise CheckpointError(f"{what}: not a {label} matrix ({ggml_type_name(ggml_type)}, shape {tuple(shape)})")
    n, k = shape
    layout = GGML_TYPES[ggml_type]
    per = layout.block_size
    if k % per or data.size != n * (k // per) * layout.type_size:
        raise CheckpointError(f"{what}: {layout.name} shape {tuple(shape)} does not match its {data.size} bytes")
    return np.ascontiguousarray(data.reshape(n * k // per, layout.type_size))


def _codes(values: np.ndarray, n: int, k: int, out: np.ndarray | None) -> np.ndarray:
    """values as an (n, k) codes array: `out` itself when given (values already in it, or copied there)."""
    if out is None:
        return np.ascontiguousarray(values).reshape(n, k)
    if not np.may_share_memory(values, out):
        np.copyto(out, values.reshape(n, k))
    return out


def q4_codes(data: np.ndarray, ggml_type: int, shape: tuple[int, ...], *, what: str = "tensor",
             codes_out: np.ndarray | None = None):
    """Q4_0/Q4_1/Q4_K bytes of a (N, K) matrix -> (codes uint8 (N, K), scale f32 (N, K/32), offset f32
    (N, K/32)) with w = scale * code + offset, for kernels that keep the 4-bit codes (see zen_eco.quant).
    Q4_K's per-32 scale and offset are products d * sc and -dmin * m, exact in float32 (the native
    kernel stores them in float16: a rounding of at most 2^-11 relative). codes_out: a C-contiguous
    (N, K) array of the codes' dtype to decode them into (and return), e.g. rows of a fused matrix."""
    n, k = shape
    blocks = _matrix_blocks(data, ggml_type, shape, Q4_TYPES, "Q4_0/Q4_1/Q4_K", what)
    if ggml_type == 12 and gguf_native.usable(blocks, 144):  # the same numbers in one C pass
        codes, scale, m1 = gguf_native.k_quant(blocks, five=False, codes=codes_out)
        return _codes(codes, n, k, codes_out), scale.reshape(n, k // 32), (-m1).reshape(n, k // 32)
    if ggml_type == 12:  # Q4_K: w = d * sc * q - dmin * m per sub-block of 32 (see _q4_k)
        sc, mn = _k_scales(blocks[:, 4:16])
        scale = _f16(blocks, 0) * sc.astype(np.float32)
        offset = -(_f16(blocks, 2) * mn.astype(np.float32))
        codes = _nibbles(blocks[:, 16:144].reshape(-1, 32))
        return _codes(codes, n, k, codes_out), scale.reshape(n, k // 32), offset.reshape(n, k // 32)
    at = 2 if ggml_type == 2 else 4  # Q4_0: d | nibbles, w = d * (q - 8); Q4_1: d | m | nibbles, w = d * q + m
    if gguf_native.usable(blocks, at + 16):
        codes, *fields = gguf_native.nibbles(blocks, at, values=codes_out, scales=at // 2)
    else:
        codes, fields = _nibbles(blocks[:, at:]), [_f16(blocks, 0), _f16(blocks, 2)][: at // 2]
    d = fields[0][:, 0]
    offset = -8.0 * d if ggml_type == 2 else fields[1][:, 0]
    return _codes(codes, n, k, codes_out), d.reshape(n, k // 32), offset.astype(np.float32).reshape(n, k // 32)


Q5_TYPES = (6, 7, 13)  # Q5_0, Q5_1 (32-element blocks), Q5_K (256, as 8 sub-blocks of 32)


def q5_codes(data: np.ndarray, ggml_type: int, shape: tuple[int, ...], *, what: str = "tensor",
             codes_out: np.ndarray | None = None):
    """Q5_0/Q5_1/Q5_K (and Q4_0/Q4_1/Q4_K, whose codes are 5-bit codes too) bytes of a (N, K) matrix ->
    (codes uint8 (N, K) in [0, 31], scale f32 (N, K/32), offset f32 (N, K/32)) with w = scale * code +
    offset, for the 5-bit variant of the int4 layout (`quant.Q4Weight` with bits = 5): Q5_0 w = d * q - 16 d,
    Q5_1 w = d * q + m, Q5_K w = (d * sc) * q - (dmin * m), exact in float32 (ggml's own products).
    codes_out as in `q4_codes`."""
    n, k = shape
    if ggml_type in Q4_TYPES:
        return q4_codes(data, ggml_type, shape, what=what, codes_out=codes_out)
    blocks = _matrix_blocks(data, ggml_type, shape, Q5_TYPES, "Q5_0/Q5_1/Q5_K/Q4_x", what)
    rows = lambda a: np.ascontiguousarray(a, dtype=np.float32).reshape(n, k // 32)  # noqa: E731
    if ggml_type == 13:
        q, d1, m1 = _q5_k_values(blocks, codes_out)
        return _codes(q, n, k, codes_out), rows(d1), rows(-m1)
    at = 2 if ggml_type == 6 else 4  # Q5_0: d | qh | nibbles; Q5_1: d | m | qh | nibbles
    if gguf_native.usable(blocks, at + 20):
        q, *fields = gguf_native.nibbles(blocks, at + 4, at, values=codes_out, scales=at // 2)
    else:
        q, fields = _q5_values(blocks, at), [_f16(blocks, 0), _f16(blocks, 2)][: at // 2]
    offset = -16.0 * fields[0] if ggml_type == 6 else fields[1]
    return _codes(q, n, k, codes_out), rows(fields[0]), rows(offset)


KQUANT_TYPES = {"q4_k": 12, "q5_k": 13, "q6_k": 14}  # kept as stored (`kquant_codes`, quant.KQuantWeight)


def kquant_codes(data: np.ndarray, ggml_type: int, shape: tuple[int, ...], *, what: str = "tensor",
                 codes_out: np.ndarray | None = None):
    """Bytes of a (N, K) Q4_K / Q5_K / Q6_K matrix -> (codes uint8 (N, K), sub-scales (N, K / 16) int8 for Q6_K,
    (N, K / 32) uint8 for Q4_K / Q5_K, d float32 (N, K / 256), and for Q4_K / Q5_K their minimums uint8
    (N, K / 32) and dmin float32 (N, K / 256); else None, None): `quant.KQuantWeight`'s fields. Q6_K codes
    are its values + 32 (0..63). codes_out as in `q4_codes` (uint8)."""
    n, k = shape
    blocks = _matrix_blocks(data, ggml_type, shape, tuple(KQUANT_TYPES.values()), "Q4_K/Q5_K/Q6_K", what)
    if ggml_type == 14:
        q, _ = _q6_k_values(blocks, None if codes_out is None else codes_out.view(np.int8))
        q += np.int8(32)  # in place: values -32..31 -> codes 0..63
        sub = np.ascontiguousarray(blocks[:, 192:208]).view(np.int8).reshape(n, k // 16)
        return _codes(q.view(np.uint8), n, k, codes_out), sub, _f16(blocks, 208).reshape(n, k // 256), None, None
    if gguf_native.usable(blocks, 176 if ggml_type == 13 else 144):  # codes and the 6-bit values in one C pass
        q, sc, mn = gguf_native.k_quant(blocks, five=ggml_type == 13, codes=codes_out, raw=True)
    else:
        q = _q5_k_values(blocks)[0] if ggml_type == 13 else _nibbles(blocks[:, 16:144].reshape(-1, 32))
        sc, mn = _k_scales(blocks[:, 4:16])
    return (_codes(q, n, k, codes_out), sc.reshape(n, k // 32), _f16(blocks, 0).reshape(n, k // 256),
            mn.reshape(n, k // 32), _f16(blocks, 2).reshape(n, k // 256))


Q8_BLOCK_TYPES = (6, 8, 7, 13, 14, 11, 10, *Q4_TYPES)  # what `q8_block_codes` turns into int8 blocks


def q8_block_codes(data: np.ndarray, ggml_type: int, shape: tuple[int, ...], *, what: str = "tensor",
                   codes_out: np.ndarray | None = None):
    """Bytes of a (N, K) matrix -> (codes int8 (N, K), scale, scale_b, offset[, offset_b]), each (N, K/32)
    float32 or None, with w = scale * code (+ offset) per block of 32 columns, or per 16 where scale_b (the
    last 16 columns' scale) or offset_b is given; for `quant.Int8BlockLinear`. Q2_K: its values 0..3 with
    d * sc and -dmin * m per 16. Q8_0's int8 values and Q5_0's 5-bit values
    minus 16 with the file's d; Q5_1 (d, m) and Q5_K (d * sc, -dmin * m) with their 5-bit values 0..31;
    Q6_K (values -32..31) and Q3_K (-4..3) with d * sc per 16; Q4_0/Q4_1/Q4_K as `q4_codes` gives them
    (for a fused matrix whose other parts are not 4-bit). Scales and offsets are ggml's float32 products,
    so codes * scale (+ offset) equals `dequantize` bit for bit. codes_out as in `q4_codes` (int8)."""
    n, k = shape
    if ggml_type in Q4_TYPES + Q5_TYPES:  # their values as codes; Q5_0's minus 16 (w = d * (q - 16), no offset)
        q, scale, offset = q5_codes(data, ggml_type, shape, what=what,
                                    codes_out=None if codes_out is None else codes_out.view(np.uint8))
        q = q.view(np.int8)
        if ggml_type == 6:
            q -= np.int8(16)  # in place: q is ours, or codes_out
            return q, scale, None, None
        return q, scale, None, offset
    blocks = _matrix_blocks(data, ggml_type, shape, Q8_BLOCK_TYPES, "Q8_0/Q5_x/Q6_K/Q3_K/Q2_K/Q4_x", what)
    rows = lambda a: np.ascontiguousarray(a).reshape(n, k // 32)  # noqa: E731 - per-block values, row-major
    if ggml_type == 8 and gguf_native.usable(blocks, 34):
        codes, d = gguf_native.q8_0(blocks, codes_out)
        return _codes(codes, n, k, codes_out), rows(d), None, None
    if ggml_type == 8:  # Q8_0: d | 32 int8
        return _codes(blocks[:, 2:].view(np.int8), n, k, codes_out), rows(_f16(blocks, 0)), None, None
    if ggml_type == 10:  # w = (d * sc) * q - dmin * m per sub-block of 16
        q, d16, m16 = _q2_k_values(blocks, None if codes_out is None else codes_out.view(np.uint8))
        off = -m16
        return (_codes(q.view(np.int8), n, k, codes_out), rows(d16[:, 0::2]), rows(d16[:, 1::2]), rows(off[:, 0::2]),
                rows(off[:, 1::2]))
    if ggml_type == 14:  # w = (d * sc) * q per sub-block of 16
        q, d16 = _q6_k_values(blocks, codes_out)
    else:
        q, d16 = _q3_k_values(blocks, codes_out)
    return _codes(q, n, k, codes_out), rows(d16[:, 0::2]), rows(d16[:, 1::2]), None
