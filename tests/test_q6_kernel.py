"""GGUF's Q6_K kept as stored (q6_kernel, quant.Q6KLinear).

References: gguf-py's `dequantize` for the file's values (bit-identical: our decode keeps ggml's float32
product d * sc), and float64 matmuls of those values for the kernel. Kernel tolerance 2e-4 relative L2:
x is rounded to 15-bit integers per block of 32 (a step of 2^-14 of the block's largest |x|, as the int4
decode loop), measured ~8e-5 on random data; a sub-scale or a bit plane read for the wrong block or half
is off by > 1e-2.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from zen_eco import q4_kernel, q6_kernel
from zen_eco.checkpoint.gguf_quants import q6k_codes
from zen_eco.quant import Q6K_DENSE_ROWS, Int8Embedding, Q6KLinear, Q6KWeight, native_max_rows

gguf = pytest.importorskip("gguf")
pytestmark = pytest.mark.skipif(not q6_kernel.available(), reason="the Q6_K kernel needs AVX-512 VNNI")

KERNEL_TOL = 2e-4


def _random_blocks(n_blocks: int, seed: int) -> np.ndarray:
    """Random Q6_K blocks (210 bytes: ql, qh, 16 int8 sub-scales, fp16 d) with finite d over 4 decades."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (n_blocks, 210), dtype=np.uint8)
    d = (rng.uniform(0.1, 1, n_blocks) * 10.0 ** rng.integers(-6, -2, n_blocks)).astype(np.float16)
    blocks[:, 208:210] = d.view(np.uint8).reshape(n_blocks, 2)
    return blocks


def _weight(n: int, k: int, seed: int = 0) -> tuple[Q6KWeight, torch.Tensor]:
    """A random Q6_K matrix as our weight, and gguf-py's float32 values of the same bytes."""
    blocks = _random_blocks(n * k // 256, seed)
    ref = gguf.quants.dequantize(blocks.reshape(n, -1), gguf.GGMLQuantizationType.Q6_K).reshape(n, k)
    codes, sub, d = q6k_codes(blocks.reshape(-1), 14, (n, k))
    return Q6KWeight(*(torch.from_numpy(np.ascontiguousarray(a)) for a in (codes, sub, d))), torch.from_numpy(ref)


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def test_codes_and_both_dequantizations_are_bit_identical_to_gguf():
    w, ref = _weight(6, 512)
    assert w.codes.dtype == torch.uint8 and int(w.codes.max()) <= 63 and w.sub_scale.dtype == torch.int8
    assert torch.equal(w.dequantize(), ref)
    bufs = q6_kernel.pack(w.codes, w.sub_scale, w.d)
    assert torch.equal(q6_kernel.dequantize(*bufs, torch.float32), ref)
    assert torch.equal(q6_kernel.dequantize(*bufs, torch.bfloat16), ref.bfloat16())
    rows = torch.tensor([[5, 0], [2, 2]])
    assert torch.equal(q6_kernel.dequantize(*bufs, torch.float32, rows=rows), ref[rows.view(-1)])
    with pytest.raises(IndexError):
        q6_kernel.dequantize(*bufs, torch.float32, rows=torch.tensor([6]))


def test_codes_decode_into_a_given_array():
    blocks = _random_blocks(4, 3)
    out = np.zeros((2, 512), np.uint8)
    codes, _, _ = q6k_codes(blocks.reshape(-1), 14, (2, 512), codes_out=out)
    assert codes is out and out.max() > 0


@pytest.mark.parametrize("n,k", [(37, 256), (40, 768), (9, 2560)])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
def test_kernel_matches_float64(n, k, m):
    """K of one super-block (a half-filled step of 16 blocks), 3 and 10; N not a multiple of the decode
    loop's four rows; 1 row of x (the decode tiles) and 2-9 (tiles of 1 row of W x up to 4 of x)."""
    w, ref = _weight(n, k, seed=n + k)
    bufs = q6_kernel.pack(w.codes, w.sub_scale, w.d)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    want = x.double() @ ref.double().T
    assert _rel(q6_kernel.matmul(x, *bufs), want) < KERNEL_TOL
    y = q6_kernel.matmul(x.bfloat16(), *bufs, torch.bfloat16)
    assert y.dtype == torch.bfloat16 and _rel(y, x.bfloat16().double() @ ref.double().T) < 1e-2


@pytest.mark.parametrize("m", [1, 3])
def test_an_activation_outlier_costs_only_its_blocks_precision(m):
    """x is rounded per block of 32 to multiples of max |x| / 16383, so |error| <= sum_c |w_c| step_c / 2
    per output (plus float32 rounding): an outlier coarsens its own block only."""
    w, ref = _weight(20, 512, seed=9)
    bufs = q6_kernel.pack(w.codes, w.sub_scale, w.d)
    x = torch.randn(m, 512, generator=torch.Generator().manual_seed(4))
    x[:, 3] = 400.0
    step = x.abs().view(m, -1, 32).amax(-1).double().repeat_interleave(32, -1) / 16383
    want = x.double() @ ref.double().T
    err = (q6_kernel.matmul(x, *bufs).double() - want).abs()
    assert (err <= (step / 2) @ ref.double().abs().T * 1.001 + 1e-6 * want.abs()).all()
    assert (err > 0).any()


@pytest.mark.skipif(not q4_kernel.gemm_available(), reason="no prompt GEMM here")
@pytest.mark.parametrize("n,k,m", [(37, 256, 12), (40, 768, 17), (130, 512, 40)])
def test_prompt_gemm_matches_float64_and_the_row_kernel(n, k, m):
    """The prompt GEMM's Q6_K panels (16-bit x: half the row kernel's rounding) against the same float64
    reference, and against the row tiles within both kernels' rounding."""
    w, ref = _weight(n, k, seed=n * k)
    bufs = q6_kernel.pack(w.codes, w.sub_scale, w.d)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k))
    gemm = q6_kernel._q6k_linear(x, *bufs, torch.float32, gemm=True)
    assert _rel(gemm, x.double() @ ref.double().T) < KERNEL_TOL
    assert _rel(gemm, q6_kernel._q6k_linear(x, *bufs, torch.float32, gemm=False)) < KERNEL_TOL


def test_threads_give_identical_results():
    w, _ = _weight(64, 1024)
    bufs = q6_kernel.pack(w.codes, w.sub_scale, w.d)
    x = torch.randn(3, 1024)
    saved = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append((q6_kernel.matmul(x[:1], *bufs), q6_kernel.matmul(x, *bufs)))
    finally:
        torch.set_num_threads(saved)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_layer_dispatch_bias_and_tied_embedding():
    w, ref = _weight(24, 512, seed=5)
    bias = torch.randn(24)
    layer = Q6KLinear(w, bias, torch.float32)
    assert layer.native_rows == (native_max_rows() if q4_kernel.gemm_available() else Q6K_DENSE_ROWS)
    for m in (1, q4_kernel.GEMM_MIN_ROWS, layer.native_rows - 1, layer.native_rows):  # row tiles, GEMM, dense
        x = torch.randn(2, m, 512)
        assert _rel(layer(x), x.double() @ ref.double().T + bias.double()) < KERNEL_TOL
    embed = Int8Embedding(layer)
    ids = torch.tensor([[3, 23], [0, 3]])
    assert torch.equal(embed(ids), ref[ids])
    assert "q6k" not in dict(embed.named_modules()) and not list(embed.buffers())  # the head's buffers, once
    with pytest.raises(ValueError, match="Q6_K"):
        Q6KLinear(w, None, torch.float32, kernel=False)


def test_rows_must_be_whole_super_blocks():
    with pytest.raises(ValueError, match="256"):
        q6_kernel.pack(torch.zeros(2, 288, dtype=torch.uint8), torch.zeros(2, 18, dtype=torch.int8), torch.ones(2, 1))
