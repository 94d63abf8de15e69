"""Our 4-bit matmul kernel (q4_kernel) against float64 matmuls over weights dequantized by gguf-py.

Tolerance: the kernel rounds each block of 32 activations to int16 against its largest |x|
(a step of 2^-15 of it) and sums the integer products exactly; the relative error of an output is
then ~2^-15 / sqrt(3), measured 3e-5 to 6e-5 on these shapes. The bound 2e-4 leaves room for
rounding in float32 accumulation; a wrong nibble, group or scale is off by > 1e-2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import as_rounded, kernel_reference, random_block_weight, rounds_x_to_bytes

from zen_eco import native, q4_kernel
from zen_eco.checkpoint.gguf_file import GGUFFile
from zen_eco.checkpoint.gguf_quants import q4_codes, q5_codes, q8_block_codes
from zen_eco.quant import (AVX2_DENSE_ROWS, NATIVE_MAX_ROWS, Int4Linear, Int8BlockLinear, Int8Embedding, Int8Linear,
                           Q4Packed, Q4Weight, Q8BlockWeight, Q8Packed, quantize_int4, quantize_int8)

gguf = pytest.importorskip("gguf")
needs_kernel = pytest.mark.skipif(not q4_kernel.available(), reason="no C compiler for the native kernel")
BOUND = 2e-4


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _close(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, bits: int = 4, bias=None) -> bool:
    """got = x W^T (+ bias) as this build's kernel computes it (conftest.kernel_reference: x as rounded)."""
    ref, tol = kernel_reference(x, w, bits)
    return _rel(got, ref if bias is None else ref + bias.double()) < tol


def _avx2(flags: list[str]) -> list[str]:  # the AVX2 loops (most x86 CPUs): no AVX-512 VNNI
    return flags + ["-DZEN_NO_VNNI"]


def _portable(flags: list[str]) -> list[str]:  # the plain C loops (CPUs without AVX2)
    return [f for f in flags if not f.startswith(("-march", "-mno-"))] + ["-march=x86-64"]


def _built_with(monkeypatch, flags, run):
    """run() with the kernel rebuilt under flags(native.flags()) (then the usual build again)."""
    base = native.flags
    monkeypatch.setattr(native, "flags", lambda: flags(base()))
    q4_kernel.library.cache_clear()
    try:
        return run()
    finally:
        monkeypatch.undo()
        q4_kernel.library.cache_clear()


@pytest.mark.parametrize("in_c", [True, False], ids=["C", "torch"])
def test_pack_round_trips_and_puts_columns_j_and_j_plus_16_in_one_byte(in_c, monkeypatch):
    if in_c and not q4_kernel.available():
        pytest.skip("no C compiler here")
    if not in_c:
        monkeypatch.setattr(q4_kernel, "library", lambda: None)
    codes = torch.randint(0, 32, (5, 64), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    scale, zero = torch.rand(5, 2), torch.rand(5, 2)
    packed, scale_zero = q4_kernel.pack(codes, scale, zero, bits=5)  # their low four bits
    low = codes & 15
    assert packed.shape == (5, 32) and scale_zero.dtype == torch.float16
    assert scale_zero.shape == (5, 2, 8) and not scale_zero[:, :, 2:].any()  # padded to whole eights of groups
    assert torch.equal(scale_zero[:, 0, :2], scale.half()) and torch.equal(scale_zero[:, 1, :2], zero.half())
    assert torch.equal(packed[:, 3] & 15, low[:, 3]) and torch.equal(packed[:, 3] >> 4, low[:, 19])
    assert torch.equal(packed[:, 16 + 3] >> 4, low[:, 32 + 19])
    assert torch.equal(q4_kernel.unpack(packed, 32, bits=5), low)


@needs_kernel
def test_real_q4_1_tensors_against_gguf_py(smollm2_gguf_path):
    """SmolLM2's own Q4_1 matrices (group 32; K = 576 has 18 groups: two of 8 and a tail of 2)."""
    gen = torch.Generator().manual_seed(1)
    with GGUFFile(smollm2_gguf_path) as f:
        for name in ("blk.0.attn_q.weight", "blk.2.ffn_down.weight", "blk.5.ffn_up.weight"):
            info = f.tensors[name]
            codes, scale, offset = q4_codes(f.tensor_bytes(name), info.ggml_type, info.shape)
            ref_w = gguf.quants.dequantize(np.asarray(f.tensor_bytes(name)), gguf.GGMLQuantizationType(info.ggml_type))
            ref_w = torch.from_numpy(ref_w).reshape(info.shape).double()
            packed, sz = q4_kernel.pack(torch.from_numpy(codes), torch.from_numpy(scale), torch.from_numpy(offset))
            for rows in (1, 3, 4, 6, 9):  # tiles of 4 rows of x, with remainders
                x = torch.randn(rows, info.shape[1], generator=gen)
                got = q4_kernel.matmul(x, packed, sz, 32)
                assert got.shape == (rows, info.shape[0])
                assert _close(got, x, ref_w), (name, rows)


@needs_kernel
@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_pack_straight_into_the_buffers(kind):
    """`pack_blocks`: a Q4_0 / Q4_1 / Q8_0 matrix's blocks (random values quantized by gguf-py; K = 576: 18 blocks,
    a panel of 2 at the end) into the kernel's buffers: their weight equals gguf-py's dequantization bit for bit,
    and a wrong byte count is refused."""
    qtype = gguf.GGMLQuantizationType[kind]
    rng = np.random.default_rng(2)
    blocks = gguf.quants.quantize((rng.standard_normal((37, 576)) * 0.05).astype(np.float32), qtype)
    codes, scales = q4_kernel.pack_blocks(int(qtype), blocks, 37, 576)
    assert scales.shape == (37, 2 if kind == "Q4_1" else 1, 24)
    ref = torch.from_numpy(gguf.quants.dequantize(blocks, qtype)).reshape(37, 576)
    got = (q4_kernel.dequantize_int8_blocks(codes, scales, 0, torch.float32) if kind == "Q8_0"
           else q4_kernel.dequantize_int4(codes, scales, 32, torch.float32))
    assert torch.equal(got, ref)
    for kernel in (True, False):  # on our kernel as they are; off it, through codes in column order
        layer = (Int8BlockLinear(Q8Packed(codes, scales), None, torch.float32, kernel=kernel) if kind == "Q8_0"
                 else Int4Linear(Q4Packed(codes, scales), None, torch.float32, kernel=kernel))
        assert layer.backend == ("native" if kernel else "dense")
        assert torch.equal(layer.dense_weight(torch.float32), ref)
    with pytest.raises(ValueError, match="are not the blocks"):
        q4_kernel.pack_blocks(int(qtype), blocks[:, 1:], 37, 576)


@needs_kernel
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("k", [256, 640, 1152])  # 8, 20 and 36 groups of 32: tails of 0 to 7 groups
def test_groups_and_tails(group, k):
    if k % group:
        pytest.skip("K not a multiple of the group")
    gen = torch.Generator().manual_seed(k + group)
    q = quantize_int4(torch.randn(40, k, generator=gen) * 0.05, group)
    packed, sz = q4_kernel.pack(q.codes, q.scale, q.offset)
    x = torch.randn(5, k, generator=gen)
    assert _close(q4_kernel.matmul(x, packed, sz, group), x, q.dequantize())


@needs_kernel
@pytest.mark.parametrize("group", [32, 64, 128])
@pytest.mark.parametrize("k", [160, 640, 1152])
def test_one_row_decode_loop(group, k):
    """One row of x (decode) takes its own loop over four rows of W at a time; N = 42 ends in a group of
    two rows. K = 160 and 1,152 end in a partial four of blocks (the int4 loop's masked tail). All
    three weight kinds, against float64."""
    if k % group:
        pytest.skip("K not a multiple of the group")
    gen = torch.Generator().manual_seed(k * group)
    x = torch.randn(1, k, generator=gen)
    q = quantize_int4(torch.randn(42, k, generator=gen) * 0.05, group)
    packed, sz = q4_kernel.pack(q.codes, q.scale, q.offset)
    assert _close(q4_kernel.matmul(x, packed, sz, group), x, q.dequantize())
    q8 = quantize_int8(torch.randn(42, k, generator=gen) * 0.05)
    codes = q4_kernel.pack_int8(q8.codes)
    assert _close(q4_kernel.matmul_int8(x, codes, q8.scale), x, q8.dequantize())
    block = (torch.rand(42, k // 32, generator=gen) * 0.01).half().float()
    dense = (q8.codes.double().view(42, -1, 32) * block.double()[..., None]).view(42, k)
    got = q4_kernel.matmul_int8_blocks(x, codes, *q4_kernel.pack_block_scales(block))
    assert _close(got, x, dense)


def _five_bit(n, k, gen):
    """Random 5-bit codes with float16-exact scales and offsets per 32 columns (GGUF's Q5 types)."""
    return Q4Weight(torch.randint(0, 32, (n, k), dtype=torch.uint8, generator=gen),
                    (torch.rand(n, k // 32, generator=gen) * 0.01).half().float(),
                    ((torch.rand(n, k // 32, generator=gen) - 0.5) * 0.2).half().float(), bits=5)


@pytest.mark.parametrize("in_c", [True, False], ids=["C", "torch"])
def test_fifth_bits_are_packed_where_the_kernel_reads_them(in_c, monkeypatch):
    """Per row, per four blocks: 64 bits for the columns in the low nibbles (bit p: block p // 16,
    column p % 16), then 64 for those in the high nibbles (column 16 + p % 16); a partial four is padded.
    The C packer (what loading uses) and the torch one agree on random codes."""
    if in_c and not q4_kernel.available():
        pytest.skip("no C compiler here")
    if in_c:
        rand = torch.randint(0, 32, (7, 1152), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
        got = q4_kernel.pack_high(rand)
        portable = _built_with(monkeypatch, _portable, lambda: q4_kernel.available() and q4_kernel.pack_high(rand))
        assert portable is not False and torch.equal(got, portable)  # the plain C loop
        with monkeypatch.context() as m:
            m.setattr(q4_kernel, "library", lambda: None)
            assert torch.equal(got, q4_kernel.pack_high(rand))
    else:
        monkeypatch.setattr(q4_kernel, "library", lambda: None)
    codes = torch.zeros(2, 160, dtype=torch.uint8)  # 5 blocks: one whole four and a partial one
    codes[0, 32 * 2 + 3] = 16  # block 2, column 3: low-nibble mask, bit 2 * 16 + 3
    codes[0, 32 * 1 + 16 + 5] = 31  # block 1, column 21: high-nibble mask, bit 16 + 5
    codes[1, 32 * 4 + 31] = 17  # block 4 (second four), column 31: its high mask, bit 15
    high = q4_kernel.pack_high(codes)
    assert high.shape == (2, 32) and high.dtype == torch.uint8
    as_int = lambda row, at: int.from_bytes(bytes(high[row, at:at + 8].tolist()), "little")  # noqa: E731
    assert (as_int(0, 0), as_int(0, 8), as_int(0, 16), as_int(0, 24)) == (1 << 35, 1 << 21, 0, 0)
    assert (as_int(1, 0), as_int(1, 8), as_int(1, 16), as_int(1, 24)) == (0, 0, 0, 1 << 15)


@needs_kernel
@pytest.mark.parametrize("k", [160, 640, 1152])  # 5, 20, 36 blocks: partial fours and 16-block tails
def test_five_bit_codes_against_float64(k):
    """GGUF's Q5 types as int4 codes plus a plane of fifth bits: one row (the decode loop) and several,
    the layer's dense weight (exact in float32, rounded once to bf16) and the decode step's view of it."""
    gen = torch.Generator().manual_seed(k + 5)
    q = _five_bit(42, k, gen)
    layer = Int4Linear(q, None, torch.float32)
    assert layer.backend == "native" and layer.bits == 5 and layer.high is not None
    ref_w = q.dequantize().double()
    for rows in (1, 3, 5):
        x = torch.randn(rows, k, generator=gen)
        assert _close(layer(x), x, ref_w, bits=5), rows
    assert torch.equal(layer.dense_weight(torch.float32), q.dequantize())
    assert torch.equal(layer.dense_weight(torch.bfloat16), q.dequantize().bfloat16())
    with pytest.raises(ValueError, match="5-bit"):
        Int4Linear(q, None, torch.float32, kernel=False)


@needs_kernel
def test_five_bit_codes_portable_and_avx2_paths(monkeypatch):
    if not any(f.startswith("-march") for f in native.flags()):
        pytest.skip("not an x86-64 build")
    gen = torch.Generator().manual_seed(8)
    q = _five_bit(24, 160, gen)
    packed, sz = q4_kernel.pack(q.codes, q.scale, q.offset, bits=5)
    high = q4_kernel.pack_high(q.codes)
    x = torch.randn(3, 160, generator=gen)

    def run():
        return [q4_kernel.matmul(x[:rows], packed, sz, 32, high=high) for rows in (1, 3)]

    fast = run()
    ref = x.double() @ q.dequantize().double().t()
    assert _rel(fast[1], ref) < BOUND
    for flags in (_avx2, _portable):
        other = _built_with(monkeypatch, flags, run)
        assert _rel(other[1], fast[1]) < 1e-6 and _rel(other[0], ref[:1]) < BOUND


@needs_kernel
@pytest.mark.parametrize("rows, levels", [(3, 32767), (1, 16383)])
def test_an_activation_outlier_costs_only_its_groups_precision(rows, levels):
    """Each x is rounded to the nearest multiple of its block's step (max |x| / levels: 16 bits for
    several rows, 15 for the one-row decode loop, whose int8 planes hold x as 128 h + l), so
    |error| <= sum_c |w_c| * step_c / 2 per output, plus float32 rounding."""
    gen = torch.Generator().manual_seed(3)
    k, group = 512, 32
    levels = 127 if rounds_x_to_bytes(rows) else levels  # AVX2: bytes, the same bound
    q = quantize_int4(torch.randn(48, k, generator=gen) * 0.05, group)
    packed, sz = q4_kernel.pack(q.codes, q.scale, q.offset)
    x = torch.randn(rows, k, generator=gen)
    x[:, 3] = 400.0
    w = q.dequantize().double()
    step = x.abs().view(rows, -1, group).amax(-1).double().repeat_interleave(group, -1) / levels
    bound = (step / 2) @ w.abs().t()
    ref = x.double() @ w.t()
    err = (q4_kernel.matmul(x, packed, sz, group).double() - ref).abs()
    assert (err <= bound * 1.001 + 1e-6 * ref.abs()).all()
    assert (err[:, :] > 0).any()


@needs_kernel
def test_zero_and_extreme_activations():
    q = quantize_int4(torch.randn(16, 128) * 0.05, 32)
    packed, sz = q4_kernel.pack(q.codes, q.scale, q.offset)
    assert torch.equal(q4_kernel.matmul(torch.zeros(2, 128), packed, sz, 32), torch.zeros(2, 16))
    x = torch.full((1, 128), 3e4)
    assert _rel(q4_kernel.matmul(x, packed, sz, 32), x.double() @ q.dequantize().double().t()) < BOUND


@needs_kernel
def test_portable_c_path_gives_the_same_numbers(monkeypatch):
    """The plain-loop branch (CPUs without AVX2) built here with AVX2 turned off: equal within float
    reassociation."""
    if not any(f.startswith("-march") for f in native.flags()):
        pytest.skip("not an x86-64 build")
    q = quantize_int4(torch.randn(24, 640) * 0.05, 64)
    x = torch.randn(3, 640)
    q8 = quantize_int8(torch.randn(24, 640) * 0.05)

    def run():  # packed by the build that runs
        return (q4_kernel.matmul(x, *q4_kernel.pack(q.codes, q.scale, q.offset), 64),
                q4_kernel.matmul_int8(x, q4_kernel.pack_int8(q8.codes), q8.scale))

    fast = run()
    portable = _built_with(monkeypatch, _portable, run)
    if rounds_x_to_bytes(3):  # an AVX2 host rounds x to bytes, the plain loops to 16 bits
        assert _close(fast[0], x, q.dequantize()) and _close(fast[1], x, q8.dequantize())
        assert _rel(portable[0], x.double() @ q.dequantize().double().t()) < BOUND
    else:
        assert _rel(portable[0], fast[0]) < 1e-6 and _rel(portable[1], fast[1]) < 1e-6


@needs_kernel
def test_layer_uses_the_kernel_for_few_rows_and_the_dense_gemm_where_prompts_go_dense():
    q = quantize_int4(torch.randn(64, 256) * 0.05, 32)
    layer = Int4Linear(q, torch.randn(64), torch.float32)
    assert layer.backend == "native"
    ref = lambda x: x.double() @ q.dequantize().double().t() + layer.bias.double()  # noqa: E731
    few, many = torch.randn(2, 7, 256), torch.randn(NATIVE_MAX_ROWS, 256)
    assert layer(few).shape == (2, 7, 64) and _close(layer(few), few, q.dequantize(), bias=layer.bias)
    assert _close(layer(many), many, q.dequantize(), bias=layer.bias)  # the prompt GEMM or tiles, or dense
    layer.native_rows = NATIVE_MAX_ROWS  # as without the prompt GEMM (or with AMX): prompts go dense
    assert _rel(layer(many), ref(many)) < 1e-6  # dense float32 GEMM
    # a prompt's dense weight (one C pass): the float32 value, rounded once to bfloat16
    assert torch.equal(layer.dense_weight(torch.float32), q.dequantize())
    assert torch.equal(layer.dense_weight(torch.bfloat16), q.dequantize().bfloat16())
    assert torch.equal(layer.dense_weight(torch.float16), q.dequantize().half())  # other dtypes: PyTorch ops
    assert Int4Linear(q, None, torch.float32, kernel=False).backend == "dense"


def test_env_switch_turns_the_kernel_off(monkeypatch):
    monkeypatch.setenv("ZEN_ECO_NATIVE_Q4", "0")
    q4_kernel.library.cache_clear()
    try:
        assert not q4_kernel.available()
        q = Q4Weight(torch.randint(0, 16, (64, 64), dtype=torch.uint8), torch.rand(64, 2), torch.rand(64, 2))
        assert Int4Linear(q, None, torch.bfloat16).backend != "native"
    finally:
        monkeypatch.undo()
        q4_kernel.library.cache_clear()


@needs_kernel
@pytest.mark.parametrize("k", [576, 2560])  # 18 blocks of 32 (a tail of 2) and 80
def test_int8_kernel_against_float64(k):
    """The 8-bit variant (Int8Linear's CPU kernel): int8 codes, a float32 scale per row, the same int16
    activations; measured ~2e-5 relative."""
    gen = torch.Generator().manual_seed(k)
    q = quantize_int8(torch.randn(70, k, generator=gen) * 0.05)
    ref_w = q.codes.double() * q.scale.double()[:, None]
    for rows in (1, 3, 5):
        x = torch.randn(rows, k, generator=gen)
        got = q4_kernel.matmul_int8(x, q4_kernel.pack_int8(q.codes), q.scale)
        assert got.shape == (rows, 70) and _close(got, x, ref_w)
    layer = Int8Linear(q, None, torch.float32)
    assert layer.backend == "native"
    assert _close(layer(x), x, ref_w)
    assert Int8Linear(q, None, torch.float32, kernel="torch").backend in ("torch", "dense")


# --------------------------------------------------------------------------- int8 with a scale per block (Q8_0, Q5_0)


LAYOUTS = {"per 32": (False, False, False), "per 16": (True, False, False), "offsets": (False, True, False),
           "per 16 + offsets": (True, True, False), "per 16 + offsets per 16": (True, True, True)}


@needs_kernel
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("k", [576, 640])  # 18 blocks (padded to 24 scales) and 20
def test_int8_block_kernel_against_float64(k, layout):
    """GGUF-style int8 weights (a float16 scale per block of 32 as Q8_0, per 16 columns as Q6_K, offsets
    as Q5_K, both per 16 as Q2_K) through `matmul_int8_blocks`, 1 row (the decode loop) and several: the same int16
    activations as the other kernels, so the same bound."""
    gen = torch.Generator().manual_seed(k)
    q = random_block_weight(70, k, *LAYOUTS[layout], gen)
    ref_w = q.dequantize().double()
    for rows in (1, 3, 5):
        x = torch.randn(rows, k, generator=gen)
        got = q4_kernel.matmul_int8_blocks(x, q4_kernel.pack_int8(q.codes),
                                           *q4_kernel.pack_block_scales(q.scale, q.scale_b, q.offset, q.offset_b))
        assert got.shape == (rows, 70) and _close(got, x, ref_w)
    layer = Int8BlockLinear(q, torch.randn(70), torch.float32)
    assert layer.backend == "native" and torch.equal(layer.dense_weight(torch.float32), q.dequantize())
    assert torch.equal(layer.dense_weight(torch.bfloat16), q.dequantize().bfloat16())  # rounded once
    ref = lambda x: x.double() @ ref_w.t() + layer.bias.double()  # noqa: E731
    few, many = torch.randn(2, 3, k, generator=gen), torch.randn(NATIVE_MAX_ROWS, k, generator=gen)
    assert _close(layer(few), few, ref_w, bias=layer.bias) and _close(layer(many), many, ref_w, bias=layer.bias)
    layer.native_rows = NATIVE_MAX_ROWS  # as without the prompt GEMM (or with AMX): prompts go dense
    assert _rel(layer(many), ref(many)) < 1e-6  # dense GEMM for a prompt
    assert _close(layer(few[:1, :1]), few[:1, :1], ref_w, bias=layer.bias)
    assert Int8BlockLinear(q, None, torch.float32, kernel=False).backend == "dense"
    # a tied table: the embedding reads the head's rows, as stored
    emb = Int8Embedding(layer)
    ids = torch.tensor([[0, 69, 5]])
    assert emb.codes is layer.codes and torch.equal(emb(ids), q.dequantize()[ids])


def test_int8_block_weights_join_across_layouts():
    """A fused matrix whose parts are stored differently (Q4_K_M's q, k as Q4_K and v as Q6_K): the
    joined weight has every part's values."""
    gen = torch.Generator().manual_seed(5)
    parts = [random_block_weight(8, 64, *LAYOUTS[name], gen) for name in ("offsets", "per 32", "per 16")]
    joined = Q8BlockWeight.cat(parts)
    assert joined.scale_b is not None and joined.offset is not None and joined.offset_b is None
    assert torch.equal(joined.dequantize(), torch.cat([p.dequantize() for p in parts]))
    parts.append(random_block_weight(8, 64, *LAYOUTS["per 16 + offsets per 16"], gen))  # and a Q2_K part
    joined = Q8BlockWeight.cat(parts)
    assert joined.offset_b is not None
    assert torch.equal(joined.dequantize(), torch.cat([p.dequantize() for p in parts]))
    assert torch.equal(joined.dequantize(), torch.cat([p.dequantize() for p in parts]))


@needs_kernel
def test_int8_block_kernel_portable_path(monkeypatch):
    if not any(f.startswith("-march") for f in native.flags()):
        pytest.skip("not an x86-64 build")
    gen = torch.Generator().manual_seed(3)
    weights = [random_block_weight(24, 576, *LAYOUTS[name], gen) for name in LAYOUTS]
    x = torch.randn(3, 576, generator=gen)

    def run():  # packed by the build that runs
        return [q4_kernel.matmul_int8_blocks(x[:rows], q4_kernel.pack_int8(q.codes),
                                             *q4_kernel.pack_block_scales(q.scale, q.scale_b, q.offset, q.offset_b))
                for q in weights for rows in (1, 3)]

    fast = run()
    portable = _built_with(monkeypatch, _portable, run)
    for i, (a, b) in enumerate(zip(portable, fast)):
        if rounds_x_to_bytes(1):  # an AVX2 host rounds x to bytes, the plain loops to 16 bits
            q, rows = weights[i // 2], (1, 3)[i % 2]
            w = q.dequantize().double()
            assert _close(b, x[:rows], w) and _rel(a, x[:rows].double() @ w.t()) < BOUND
        else:
            assert _rel(a, b) < 1e-6


@needs_kernel
@pytest.mark.parametrize("build", [("x86-64-v3",), ("x86-64-v3", "-mavx512vnni", "-mavx512vl"), ("native",)],
                         ids=["avx2", "avx2+vpdpbusd", "native"])
def test_avx2_prompt_tiles(build, built_for):
    """Prompts on AVX2 (q4_kernel.word_rows(): from 4 rows of x) of int8 and int4 / int5 weights: x rounded to
    bytes per block of 32, W read in 8-block words, byte products by vpmaddubsw (or AVX-VNNI's vpdpbusd, here
    in its AVX-512 VNNI + VL encoding). Every int8 block layout, per-row scales (Int8Linear), INT4 in groups of
    32 / 64 / 128, 5-bit codes, last word groups of 3, 5, 2 and 4 blocks (K = 96, 160, 576, 640; from 5 on
    a whole group), an odd number of rows of W, row
    counts around the tiles of 4 and across a chunk of x's rows (K = 2560: 100 rows a chunk): equal to the
    float64 product of x *as rounded* with the weight to 1e-6 (offsets and zeros take the sums of x as
    rounded). The largest codes (-128) against x at +-127 keep vpmaddubsw's pair sums below 2^15, and 31 in
    two words' sums. AVX-512 VNNI builds keep their own loops (0 rows)."""
    built_for(*build)
    if build == ("native",) and q4_kernel.gemm_available():
        assert q4_kernel.word_rows() == 0
        return
    assert q4_kernel.word_rows() == 4
    gen = torch.Generator().manual_seed(7)

    def check(got, x, w):
        assert _rel(got, as_rounded(x, 127) @ w.double().t()) < 1e-6
        assert 1e-3 < _rel(got, x.double() @ w.double().t()) < 2e-2  # x in bytes, not int16

    for k, n, rows_list in ((96, 3, (4,)), (160, 11, (4, 5, 7)), (576, 70, (4, 9)), (640, 5, (6,)), (2560, 9, (101,))):
        for layout in LAYOUTS.values():
            q = random_block_weight(n, k, *layout, gen, low=-128)
            planes = q4_kernel.pack_block_scales(q.scale, q.scale_b, q.offset, q.offset_b)
            for rows in rows_list:
                x = torch.randn(rows, k, generator=gen)
                check(q4_kernel.matmul_int8_blocks(x, q4_kernel.pack_int8(q.codes), *planes), x, q.dequantize())
        q8 = quantize_int8(torch.randn(n, k, generator=gen) * 0.05)
        x = torch.randn(rows_list[-1], k, generator=gen)
        check(q4_kernel.matmul_int8(x, q4_kernel.pack_int8(q8.codes), q8.scale), x,
              q8.codes.double() * q8.scale.double()[:, None])
        for group in (32, 64, 128):
            if k % group == 0:
                q4 = quantize_int4(torch.randn(n, k, generator=gen) * 0.05, group)
                check(q4_kernel.matmul(x, *q4_kernel.pack(q4.codes, q4.scale, q4.offset), group), x, q4.dequantize())
        f16 = lambda t: t.half().float()  # noqa: E731  (the kernel's scales and zeros are float16)
        q5 = Q4Weight(torch.randint(0, 32, (n, k), dtype=torch.uint8, generator=gen),
                      f16(torch.rand(n, k // 32, generator=gen)), f16(torch.rand(n, k // 32, generator=gen) - 0.5),
                      bits=5)
        q5.codes[0] = 31
        high = q4_kernel.pack_high(q5.codes)
        check(q4_kernel.matmul(x, *q4_kernel.pack(q5.codes, q5.scale, q5.offset, 5), 32, high=high), x, q5.dequantize())
    # bfloat16 in and out (read and rounded as they are), and any thread count: the same numbers
    q = random_block_weight(37, 576, *LAYOUTS["offsets"], gen)
    planes = q4_kernel.pack_block_scales(q.scale, q.scale_b, q.offset, q.offset_b)
    x = torch.randn(9, 576, generator=gen).bfloat16()
    codes = q4_kernel.pack_int8(q.codes)
    y = q4_kernel.matmul_int8_blocks(x, codes, *planes, out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    assert torch.equal(y, q4_kernel.matmul_int8_blocks(x.float(), codes, *planes).bfloat16())
    threads = torch.get_num_threads()
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            assert torch.equal(q4_kernel.matmul_int8_blocks(x, codes, *planes, out_dtype=torch.bfloat16), y)
    finally:
        torch.set_num_threads(threads)
    extreme = q4_kernel.pack_int8(torch.full((6, 256), -128, dtype=torch.int8))
    for sign in (1.0, -1.0):
        x = torch.full((4, 256), sign * 3.0)
        got = q4_kernel.matmul_int8_blocks(x, extreme, *q4_kernel.pack_block_scales(torch.ones(6, 8)))
        assert torch.equal(got, torch.full((4, 6), -sign * 3.0 * 128 * 256))
    layer = Int8BlockLinear(random_block_weight(64, 256, *LAYOUTS["per 32"], gen), None, torch.float32)
    assert layer.native_rows == AVX2_DENSE_ROWS  # a 512-row prefill chunk stays on the tiles
    int4 = Int4Linear(quantize_int4(torch.randn(64, 256, generator=gen), 32), None, torch.float32)
    assert int4.native_rows == AVX2_DENSE_ROWS


@needs_kernel
@pytest.mark.parametrize("build", [("x86-64-v3",), ("x86-64-v3", "-mavx512vnni", "-mavx512vl"), ("native",)],
                         ids=["avx2", "avx2+vpdpbusd", "native"])
def test_avx2_int4_panels(build, built_for):
    """On AVX2 without AVX-512 VNNI, rows of 4-bit codes in groups of 32, 64 or 128 are packed in panels of 8
    blocks (word w of block i of a panel of L blocks at byte 4 (w L + i)), and 1-3 rows of x take the panel loop
    (x in bytes per block of 32, a block summed in one lane; tiles of 4 rows of W for one row of x, 2 for two or
    three). K = 32, 96, 160, 576, 640, 2560 end in panels of 1, 3, 5, 2, 4 blocks and none; N = 13 ends in a
    partial tile. Every output equals the float64 product of x as rounded with the weight to 1e-6, zeros stored or
    derived (Q4_0), 1-5 rows (4 and 5: the prompt tiles, reading the panels); the dense weight equals the weight
    exactly and `unpack` inverts `pack`. 5-bit codes, other group sizes and AVX-512 VNNI builds keep blocks in
    order."""
    built_for(*build)
    avx2 = build != ("native",) or not q4_kernel.gemm_available()
    assert [q4_kernel.paneled(g) for g in (32, 64, 128)] == [avx2] * 3
    assert not q4_kernel.paneled(32, bits=5) and not q4_kernel.paneled(256)
    gen = torch.Generator().manual_seed(12)
    codes = torch.randint(0, 16, (1, 576), dtype=torch.uint8, generator=gen)
    packed = q4_kernel.pack(codes, torch.ones(1, 18), None)[0][0]
    for b, w, at in ((17, 3, 284), (9, 2, 196)):  # the last panel (2 blocks, i = 1); a whole one (i = 1)
        want = codes[0, b * 32 + 4 * w: b * 32 + 4 * w + 4] | codes[0, b * 32 + 16 + 4 * w: b * 32 + 20 + 4 * w] << 4
        where = at if avx2 else b * 16 + 4 * w
        assert torch.equal(packed[where:where + 4], want)
    for k in (32, 96, 160, 576, 640, 2560):
        for group in (32, 64, 128):
            if k % group:
                continue
            q = quantize_int4(torch.randn(13, k, generator=gen) * 0.05, group)
            for mid in (False, True):
                if mid:
                    q = Q4Weight(q.codes, q.scale, -8 * q.scale)
                packed, sz = q4_kernel.pack(q.codes, q.scale, None if mid else q.offset)
                assert sz.shape[1] == (1 if mid else 2) and torch.equal(q4_kernel.unpack(packed, group), q.codes)
                w = q4_kernel.dequantize_int4(packed, sz, group, torch.float32)
                assert torch.equal(w, q.dequantize())
                for rows in (1, 2, 3, 4, 5):
                    x = torch.randn(rows, k, generator=gen)
                    got, ref = q4_kernel.matmul(x, packed, sz, group), x.double() @ w.double().t()
                    if avx2:
                        assert _rel(got, as_rounded(x, 127) @ w.double().t()) < 1e-6
                        assert 1e-4 < _rel(got, ref) < 2e-2  # x in bytes, not int16
                    else:
                        assert _rel(got, ref) < BOUND
    layer = Int4Linear(q, None, torch.float32)
    x = torch.randn(1, 2560, generator=gen).bfloat16()
    y = q4_kernel.matmul(x, layer.packed, layer.scale_zero, 128, out_dtype=torch.bfloat16)
    assert torch.equal(y, layer(x.float()).bfloat16()) and torch.equal(layer._unpack_codes(), q.codes)
    threads = torch.get_num_threads()
    try:
        for t in (1, 3):
            torch.set_num_threads(t)
            assert torch.equal(q4_kernel.matmul(x, layer.packed, layer.scale_zero, 128, out_dtype=torch.bfloat16), y)
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("build", [("x86-64-v3",), ("x86-64-v3", "-mavx512vnni", "-mavx512vl"), ("native",)],
                         ids=["avx2", "avx2+vpdpbusd", "native"])
def test_avx2_int8_panels(build, built_for):
    """On AVX2 without AVX-512 VNNI every row of int8 codes is kept in panels of 8 blocks (`pack_int8`: word w of
    block i of a panel of L blocks at byte 4 (w L + i)) and 1-3 rows of x take the panel loop (x in bytes per
    block of 32, vpmaddubsw(|w|, sign(x, w)) or vpdpbusd, a block summed in one lane). Every block layout (scales
    per 32 or 16 columns, offsets per 32 or 16) and per-row scales, K with last panels of 1-5 blocks or none,
    N = 13, 1-5 rows of x (4 and 5: the prompt tiles, reading the panels), codes down to -128: equal to the
    float64 product of x as rounded to 1e-6; the dense weight exact; the layers' dense weights and their tied
    tables (Int8Embedding) read the rows back in column order. Where AVX-512 VNNI is built, codes stay in order."""
    built_for(*build)
    avx2 = build != ("native",) or not q4_kernel.gemm_available()
    assert q4_kernel.int8_paneled() == avx2
    gen = torch.Generator().manual_seed(13)
    codes = torch.randint(-128, 128, (2, 576), dtype=torch.int8, generator=gen)
    packed = q4_kernel.pack_int8(codes)
    assert torch.equal(q4_kernel.unpack_int8(packed), codes)
    for b, w, at in ((17, 7, 572), (9, 5, 420)):  # the last panel (2 blocks, i = 1); a whole one (i = 1)
        where = at if avx2 else b * 32 + 4 * w
        assert torch.equal(packed[1, where:where + 4], codes[1, b * 32 + 4 * w: b * 32 + 4 * w + 4])
    for k in (32, 96, 160, 576, 640):
        for layout in LAYOUTS.values():
            q = random_block_weight(13, k, *layout, gen, low=-128)
            codes = q4_kernel.pack_int8(q.codes)
            planes = q4_kernel.pack_block_scales(q.scale, q.scale_b, q.offset, q.offset_b)
            w = q4_kernel.dequantize_int8_blocks(codes, *planes, torch.float32)
            assert torch.equal(w, q.dequantize())
            q8 = quantize_int8(torch.randn(13, k, generator=gen))
            w8 = q8.codes.double() * q8.scale.double()[:, None]
            for rows in (1, 2, 3, 4, 5):
                x = torch.randn(rows, k, generator=gen)
                for got, dense in ((q4_kernel.matmul_int8_blocks(x, codes, *planes), w.double()),
                                   (q4_kernel.matmul_int8(x, q4_kernel.pack_int8(q8.codes), q8.scale), w8)):
                    if avx2:
                        assert _rel(got, as_rounded(x, 127) @ dense.t()) < 1e-6
                    else:
                        assert _rel(got, x.double() @ dense.t()) < BOUND
    ids = torch.tensor([[0, 12, 5]])
    head = Int8BlockLinear(q, None, torch.float32)
    assert torch.equal(head.dense_weight(torch.float32, reuse=False), q.dequantize())
    assert torch.equal(Int8Embedding(head)(ids)[0], q.dequantize()[ids[0]])
    head = Int8Linear(q8, None, torch.float32)
    assert torch.equal(head.dense_weight(torch.float32), q8.dequantize())
    assert torch.equal(Int8Embedding(head)(ids)[0], q8.dequantize()[ids[0]])
    x = torch.randn(1, q8.codes.shape[1], generator=gen)
    assert torch.equal(head(x), q4_kernel.matmul_int8(x, head.codes, head.scales_f32))


@needs_kernel
@pytest.mark.parametrize("build", ["native", "x86-64-v3", "portable"])
def test_q4_0_and_q5_0_zeros_are_derived_not_stored(build, built_for, monkeypatch):
    """GGUF's Q4_0 / Q5_0 (w = d (q - 8), d (q - 16)): an Int4Linear whose zeros are all -8 (5-bit: -16) times
    the scales keeps the scales only (scale_zero (N, 1, ...): 18 bytes per 32 weights read instead of 20), and
    every path (one row, the row tiles, the AVX2 prompt tiles or the prompt GEMM, the dense weight) gives
    exactly what the same weight with its zeros stored gives. Any other zero keeps the plane."""
    run = lambda fn: fn()  # noqa: E731
    if build == "portable":
        run = lambda fn: _built_with(monkeypatch, _portable, fn)  # noqa: E731
    elif build == "x86-64-v3":
        built_for(build)
    gen = torch.Generator().manual_seed(4)
    for bits in (4, 5):
        scale = (torch.rand(37, 8, generator=gen) * 0.01).half().float()
        q = Q4Weight(torch.randint(0, 2 ** bits, (37, 256), dtype=torch.uint8, generator=gen), scale,
                     -(2 ** (bits - 1)) * scale, bits=bits)
        layer = Int4Linear(q, None, torch.float32)
        assert layer.scale_zero.shape[1] == 1
        stored = q4_kernel.pack(q.codes, q.scale, q.offset, bits)[1]
        assert stored.shape[1] == 2
        xs = [torch.randn(rows, 256, generator=gen) for rows in (1, 3, 5, 16)]

        def outputs(derived: bool):  # packed by the build that runs
            packed, sz = q4_kernel.pack(q.codes, q.scale, None if derived else q.offset, bits)
            return ([q4_kernel.matmul(x, packed, sz, 32, high=layer.high) for x in xs]
                    + [q4_kernel.dequantize_int4(packed, sz, 32, torch.float32, layer.high)])

        mid, full = run(lambda: outputs(True)), run(lambda: outputs(False))
        for a, b in zip(mid, full):
            assert torch.equal(a, b)
        assert torch.equal(full[-1], q.dequantize())
        off = Q4Weight(q.codes, scale, q.offset + 1e-3 * scale, bits=bits)
        assert Int4Linear(off, None, torch.float32).scale_zero.shape[1] == 2


def test_int8_block_codes_equal_gguf_py(smollm2_gguf_path):
    """Q8_0 (SmolLM2's tied table), random Q5_0 / Q8_0 / Q5_1 matrices quantized by gguf-py, and random
    bytes as Q5_K / Q6_K / Q3_K / Q2_K / Q4_K blocks (gguf-py has no K-quant quantizer; any bytes with a finite
    d are valid blocks): codes x scales (+ offsets) equal gguf-py's dequantization bit for bit."""
    f = GGUFFile(smollm2_gguf_path)
    info = f.tensors["token_embd.weight"]
    data = f.tensor_bytes("token_embd.weight")
    q = Q8BlockWeight(*(None if a is None else torch.from_numpy(a) for a in q8_block_codes(data, info.ggml_type, info.shape)))
    expect = gguf.quants.dequantize(data, gguf.GGMLQuantizationType(info.ggml_type)).reshape(info.shape)
    assert np.array_equal(q.dequantize().numpy(), expect)
    rng = np.random.default_rng(0)
    T = gguf.GGMLQuantizationType
    for kind in (T.Q5_0, T.Q8_0, T.Q5_1, T.Q5_K, T.Q6_K, T.Q3_K, T.Q2_K, T.Q4_K):
        n, k = 16, 512
        block, size = gguf.GGML_QUANT_SIZES[kind]
        if kind in (T.Q5_0, T.Q8_0, T.Q5_1):
            raw = gguf.quants.quantize((rng.standard_normal((n, k)) * 0.05).astype(np.float32), kind)
        else:
            raw = rng.integers(0, 256, (n * k // block, size), dtype=np.uint8)
            d = (rng.random((n * k // block, 2)) * 0.01).astype(np.float16).view(np.uint8)
            at = {T.Q5_K: [0, 2], T.Q4_K: [0, 2], T.Q6_K: [208], T.Q3_K: [108], T.Q2_K: [80, 82]}[kind]
            for i, off in enumerate(at):  # d (and dmin) finite
                raw[:, off:off + 2] = d[:, 2 * i:2 * i + 2]
            raw = raw.reshape(n, -1)
        arrays = q8_block_codes(raw, int(kind), (n, k))
        codes, scale, scale_b = arrays[:3]
        got = Q8BlockWeight(*(None if a is None else torch.from_numpy(a) for a in arrays))
        assert np.array_equal(got.dequantize().numpy(), gguf.quants.dequantize(raw, kind).reshape(n, k)), kind.name
        assert (scale_b is not None) == (kind in (T.Q6_K, T.Q3_K, T.Q2_K)), kind.name
        assert (got.offset_b is not None) == (kind == T.Q2_K), kind.name
        if kind in (T.Q5_0, T.Q5_1, T.Q5_K):  # and as 5-bit codes (`q5_codes`)
            five = Q4Weight(*map(torch.from_numpy, q5_codes(raw, int(kind), (n, k))), bits=5)
            assert np.array_equal(five.dequantize().numpy(), gguf.quants.dequantize(raw, kind).reshape(n, k)), kind.name
            assert five.codes.max() <= 31
        lowest = {T.Q5_0: -16, T.Q8_0: -127, T.Q6_K: -32, T.Q3_K: -4}.get(kind, 0)
        assert codes.min() >= lowest and codes.max() <= {T.Q8_0: 127, T.Q6_K: 31, T.Q3_K: 3, T.Q2_K: 3, T.Q4_K: 15}.get(kind, 31)




@needs_kernel
def test_prompt_weights_are_dequantized_into_one_reused_buffer(monkeypatch):
    """A prompt's dense matmul dequantizes into this thread's buffer (no fresh tensor's page faults each
    call): the same memory for the next weight, the same values as a new tensor; a weight above
    REUSE_BYTES (an output head) gets a tensor of its own; other threads their own buffer."""
    gen = torch.Generator().manual_seed(2)
    q8 = random_block_weight(64, 256, *LAYOUTS["per 16 + offsets"], gen)
    planes, flags = q4_kernel.pack_block_scales(q8.scale, q8.scale_b, q8.offset)
    q4 = quantize_int4(torch.randn(48, 256, generator=gen), 32)
    packed, sz = q4_kernel.pack(q4.codes, q4.scale, q4.offset)
    a = q4_kernel.dequantize_int8_blocks(q8.codes, planes, flags, torch.bfloat16, reuse=True)
    assert torch.equal(a, q4_kernel.dequantize_int8_blocks(q8.codes, planes, flags, torch.bfloat16))
    ptr = a.data_ptr()  # the next weight is smaller (bf16 48 x 256): it fits the buffer
    b = q4_kernel.dequantize_int4(packed, sz, 32, torch.bfloat16, reuse=True)
    assert b.data_ptr() == ptr and torch.equal(b, q4_kernel.dequantize_int4(packed, sz, 32, torch.bfloat16))
    import threading
    other = []
    t = threading.Thread(target=lambda: other.append(q4_kernel.dequantize_int4(packed, sz, 32, torch.bfloat16, reuse=True)))
    t.start(), t.join()
    assert other[0].data_ptr() != ptr and torch.equal(other[0], b)
    monkeypatch.setattr(q4_kernel, "REUSE_BYTES", 1024)
    c = q4_kernel.dequantize_int4(packed, sz, 32, torch.bfloat16, reuse=True)
    assert c.data_ptr() != ptr and torch.equal(c, b)
