"""The prompt GEMM (prompt_gemm) against float64 and the row kernel, for every weight layout.

Tolerance: the GEMM rounds x to bytes per block of 32 (conftest.as_rounded(x, 127)); its integer dot
products are exact, and only the float sums over blocks are rounded. So it equals the float64 product of x
as rounded to float32 rounding (1e-6 relative; a wrong code, plane, scale, offset or sum is off by > 1e-3).
The row kernel (15-16-bit x) is within 2e-4 of x itself (tests/test_q4_kernel.py); the two differ by the
rounding of x to bytes, ~3e-3 relative here and under 3e-2 with the outlier column below. Int8 with a scale
per row (WIDE) keeps x in 16 bits, as the row kernel rounds it: the two agree to float32 rounding (1e-6).
"""

from __future__ import annotations

import pytest
import torch
from conftest import as_rounded, random_block_weight

from zen_eco import native, q4_kernel
from zen_eco.quant import GEMM_MAX_ROWS, Int4Linear, Int8BlockLinear, native_max_rows, quantize_int4, quantize_int8

pytestmark = pytest.mark.skipif(not q4_kernel.gemm_available(), reason="the prompt GEMM needs AVX-512 VNNI")
BOUND, SAME, BYTES = 2e-4, 1e-6, 3e-2


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


# (name, build(n, k, gen) -> (run(x, gemm, out_dtype), float64 weight))
def _int4(group, bits=4):
    def build(n, k, gen):
        q = quantize_int4(torch.randn(n, k, generator=gen) * 0.05, group)
        if bits == 5:  # GGUF's Q5 codes: 0..31 with their fifth bit in the extra plane
            q.codes = torch.randint(0, 32, (n, k), dtype=torch.uint8, generator=gen)
            q.bits = 5
        packed, sz = q4_kernel.pack(q.codes, q.scale, q.offset)
        high = q4_kernel.pack_high(q.codes) if bits == 5 else None
        return (lambda x, gemm, dt: q4_kernel._q4_linear(x, packed, sz, group, dt, high, gemm=gemm)), q.dequantize().double()
    return build


def _int8_rows(n, k, gen):
    q = quantize_int8(torch.randn(n, k, generator=gen) * 0.05)
    scale = q.scale.float()
    return (lambda x, gemm, dt: q4_kernel._q8_linear(x, q.codes, scale, dt, gemm=gemm)), q.codes.double() * scale.double()[:, None]


def _int8_blocks(halves, offsets, offset_halves):
    def build(n, k, gen):
        q = random_block_weight(n, k, halves, offsets, offset_halves, gen, low=-128)  # -128: code + 128 = 0
        bs, flags = q4_kernel.pack_block_scales(q.scale, q.scale_b, q.offset, q.offset_b)
        return (lambda x, gemm, dt: q4_kernel._q8b_linear(x, q.codes, bs, flags, dt, gemm=gemm)), q.dequantize().double()
    return build


LAYOUTS = {"int4 g32": _int4(32), "int4 g64": _int4(64), "int4 g128": _int4(128), "int5 (Q5)": _int4(32, bits=5),
           "int8 per row": _int8_rows, "Q8_0": _int8_blocks(False, False, False),
           "Q6_K / Q3_K (per 16)": _int8_blocks(True, False, False), "Q5_K (offsets)": _int8_blocks(False, True, False),
           "per 16 + offsets": _int8_blocks(True, True, False), "Q2_K (both per 16)": _int8_blocks(True, True, True)}
WIDE = {"int8 per row"}  # x in 16 bits


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("rows", [8, 17, 40])
def test_gemm_gives_the_row_kernels_sums_for_every_layout(layout, rows):
    gen = torch.Generator().manual_seed(rows)
    run, w = LAYOUTS[layout](37, 640, gen)  # 37 rows of W: a panel of 8 with 3 past the end
    x = torch.randn(rows, 640, generator=gen)
    x[:, 5] *= 40  # an outlier column: blocks with very different scales
    gemm, row = run(x, True, torch.float32), run(x, False, torch.float32)
    assert _rel(row, x.double() @ w.t()) < BOUND
    if layout in WIDE:
        assert _rel(gemm, row) < SAME
    else:
        assert _rel(gemm, as_rounded(x, 127) @ w.t()) < SAME and _rel(gemm, row) < BYTES
    # bfloat16 in and out: the same sums, rounded once
    got = run(x.bfloat16(), True, torch.bfloat16)
    assert got.dtype == torch.bfloat16 and _rel(got, run(x.bfloat16(), True, torch.float32)) < 2**-8


def test_gemm_over_chunks_of_k_and_pieces_of_n():
    """300 rows: K = 1088 runs in two chunks (x's slice per chunk stays in L2); 16 rows of K = 4608: a chunk of
    at most 4096 columns (GM_KC) and one of 512, per-row int8 (16-bit x) too; N = 16390 at 512 rows: the float
    sums are made in pieces of N (GM_Y_BYTES)."""
    gen = torch.Generator().manual_seed(1)
    run, w = _int8_blocks(True, True, False)(45, 1088, gen)
    x = torch.randn(300, 1088, generator=gen)
    assert _rel(run(x, True, torch.float32), as_rounded(x, 127) @ w.t()) < SAME
    x = torch.randn(16, 4608, generator=gen)
    run, w = _int4(64)(20, 4608, gen)
    assert _rel(run(x, True, torch.float32), as_rounded(x, 127) @ w.t()) < SAME
    run, _ = _int8_rows(20, 4608, gen)
    assert _rel(run(x, True, torch.float32), run(x, False, torch.float32)) < SAME
    run, w = _int4(32)(16390, 64, gen)
    x = torch.randn(512, 64, generator=gen)
    got, want = run(x, True, torch.float32), as_rounded(x, 127) @ w.t()
    assert _rel(got, want) < SAME
    assert _rel(got[:, -10:], want[:, -10:]) < SAME  # the last piece's rows too


def test_gemm_results_do_not_depend_on_the_thread_count():
    gen = torch.Generator().manual_seed(2)
    run, _ = _int4(64)(50, 256, gen)
    x = torch.randn(33, 256, generator=gen)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run(x, True, torch.float32)
        torch.set_num_threads(2)
        assert torch.equal(run(x, True, torch.float32), one)
    finally:
        torch.set_num_threads(before)


def test_layers_take_the_gemm_for_prompts_between_its_limits():
    """Where the GEMM is built (and no AMX), a layer takes it from GEMM_MIN_ROWS up to GEMM_MAX_ROWS rows:
    a 100-row prompt gives the GEMM's numbers, fewer rows the row kernel's, more the dense GEMM's."""
    if native_max_rows() != GEMM_MAX_ROWS:
        pytest.skip("this CPU has AMX: prompts go to PyTorch's bf16 GEMM from NATIVE_MAX_ROWS rows")
    gen = torch.Generator().manual_seed(3)
    q = quantize_int4(torch.randn(24, 256, generator=gen) * 0.05, 32)
    layer = Int4Linear(q, None, torch.float32)
    x = torch.randn(100, 256, generator=gen)
    assert torch.equal(layer(x), q4_kernel._q4_linear(x, layer.packed, layer.scale_zero, 32, torch.float32, gemm=True))
    few = x[:q4_kernel.GEMM_MIN_ROWS - 1]
    assert torch.equal(layer(few), q4_kernel._q4_linear(few, layer.packed, layer.scale_zero, 32, torch.float32, gemm=False))
    many = torch.randn(GEMM_MAX_ROWS, 256, generator=gen)
    assert _rel(layer(many), many.double() @ q.dequantize().double().t()) < 1e-6  # float32 dense GEMM
    block = random_block_weight(24, 256, True, True, True, gen, low=-128)
    layer = Int8BlockLinear(block, None, torch.bfloat16)
    want = as_rounded(x.bfloat16(), 127) @ block.dequantize().double().t()
    assert _rel(layer(x.bfloat16()), want) < 2**-8  # the GEMM, bf16 out


def test_without_avx512_vnni_there_is_no_gemm(monkeypatch):
    """The AVX2 build: gemm_available() is False, the row kernel serves every row count, and the entry
    points say so (-2) instead of computing anything."""
    base = native.flags
    monkeypatch.setattr(native, "flags", lambda: base() + ["-DZEN_NO_VNNI"])
    q4_kernel.library.cache_clear()
    try:
        assert not q4_kernel.gemm_available()
        assert q4_kernel._entry(64, "q4", None).__name__ == "zen_q4_linear"
        assert q4_kernel.library().zen_q8b_gemm(16, 8, 32, None, 0, None, None, 0, None, 0, 1) == -2
    finally:
        monkeypatch.undo()
        q4_kernel.library.cache_clear()


def test_env_switch_turns_the_gemm_off(monkeypatch):
    monkeypatch.setenv("ZEN_ECO_GEMM", "0")
    assert not q4_kernel.gemm_available() and q4_kernel._entry(64, "q8b", None).__name__ == "zen_q8b_linear"
    monkeypatch.undo()
    assert q4_kernel._entry(64, "q8b", None).__name__ == "zen_q8b_gemm"
