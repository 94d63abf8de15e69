"""Packed 4-bit / 8-bit linear layers against the dense weights they stand for.

References: the GGUF file's own Q4_1 values dequantized bit-exactly by gguf-py (for q4_codes) and
a float32 matmul over those values (for Int4Linear). Tolerances: the packed kernels take bf16
activations and hold scales in bf16 (2^-9 relative rounding), so outputs match to ~1% relative.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import rounds_x_to_bytes

from zen_eco import q4_kernel
from zen_eco.checkpoint import load_weights, open_checkpoint
from zen_eco.checkpoint.gguf_file import GGUFFile
from zen_eco.checkpoint.gguf_quants import q4_codes
from zen_eco.quant import DENSE_MIN_ROWS, Int4Linear, Int8BlockLinear, Int8Embedding, Q4Weight, int4_supported

gguf = pytest.importorskip("gguf")
needs_int4 = pytest.mark.skipif(not int4_supported(torch.device("cpu"), torch.bfloat16),
                                reason="no CPU int4 kernel in this PyTorch")


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_q4_codes_reproduce_gguf_reference(smollm2_gguf_path):
    with GGUFFile(smollm2_gguf_path) as f:
        for name in ("blk.0.attn_q.weight", "blk.3.ffn_down.weight"):
            info = f.tensors[name]
            codes, scale, offset = q4_codes(f.tensor_bytes(name), info.ggml_type, info.shape)
            ref = gguf.quants.dequantize(np.asarray(f.tensor_bytes(name)), gguf.GGMLQuantizationType(info.ggml_type))
            ours = Q4Weight(torch.from_numpy(codes), torch.from_numpy(scale), torch.from_numpy(offset)).dequantize()
            # w = d*q + m in both; only the association order may differ (1 ulp)
            assert torch.allclose(ours, torch.from_numpy(ref).reshape(info.shape), rtol=0, atol=1e-6)


BACKENDS = [pytest.param("torch", marks=needs_int4), True]  # PyTorch's packed kernel; the best one (ours)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int4_linear_matches_dense_matmul(backend):
    torch.manual_seed(0)
    n, k, g = 96, 128, 32
    q = Q4Weight(torch.randint(0, 16, (n, k), dtype=torch.uint8), torch.rand(n, k // g) * 0.02,
                 torch.randn(n, k // g) * 0.05)
    bias = torch.randn(n)
    layer = Int4Linear(q, bias, torch.bfloat16, kernel=backend)
    x = torch.randn(3, 5, k)
    ref = x @ q.dequantize().t() + bias
    assert layer(x.bfloat16()).shape == (3, 5, n)
    assert _rel(layer(x.bfloat16()), ref) < 0.02


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [64, 192, 960])
def test_prompt_path_unpacks_the_same_weight(n, backend):
    """Many rows go through unpack + dense GEMM, few through the packed kernel: same weight either way.
    PyTorch packs int4 for its CPU kernel in a private layout that depends on its build's kernels (its AVX2
    one differs from its AVX-512 one, e.g. under ATEN_CPU_CAPABILITY=avx2): where `_unpack_cpu` does not read
    it, the layer must not unpack and prompts keep the packed kernel."""
    from zen_eco import quant

    torch.manual_seed(n)
    k, g = 256, 32
    q = Q4Weight(torch.randint(0, 16, (n, k), dtype=torch.uint8), torch.rand(n, k // g) * 0.02,
                 torch.randn(n, k // g) * 0.05)
    layer = Int4Linear(q, None, torch.bfloat16, kernel=backend)
    if backend == "torch" and not quant._cpu_layout_known(k):
        assert not layer.can_unpack
    else:
        assert layer.can_unpack
        assert torch.equal(layer._unpack_codes(), q.codes)
        # dense_weight rounds (code - 8) * scale + zero to bf16 once: within bf16's 2^-8 relative step
        assert torch.allclose(layer.dense_weight(torch.float32), q.dequantize(), rtol=2**-7, atol=1e-3)
    x = torch.randn(DENSE_MIN_ROWS + 3, k).bfloat16()
    many = layer(x)  # dense path
    few = torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])  # packed kernel, one row at a time
    assert _rel(many, few) < 0.01


@needs_int4
def test_rows_not_in_blocks_of_64_keep_the_packed_kernel():
    q = Q4Weight(torch.randint(0, 16, (96, 64), dtype=torch.uint8), torch.rand(96, 2), torch.randn(96, 2))
    layer = Int4Linear(q, None, torch.bfloat16, kernel="torch")
    assert not layer.can_unpack
    x = torch.randn(DENSE_MIN_ROWS * 2, 64)
    assert _rel(layer(x.bfloat16()), x @ q.dequantize().t()) < 0.02


@needs_int4
def test_packed_default_model_tracks_fp32(smollm2_gguf_path):
    """quant='auto' (int4 from the file's Q4_1 codes and the tied table from its Q8_0 codes, both on our
    kernel; bf16 activations, fp32 residual) vs exact fp32.

    Bound: next-token agreement on >= 90% of positions of a 48-token text, and logits within 5%
    relative — the size of bf16 activation rounding over 30 layers, measured ~2%.
    """
    ckpt = open_checkpoint(smollm2_gguf_path)
    packed = load_weights(ckpt, torch.bfloat16, quant="auto")
    exact = load_weights(ckpt, torch.float32, quant="none")
    assert isinstance(packed.layers[0].mlp.w_down, Int4Linear) and isinstance(packed.lm_head, Int8BlockLinear)
    assert isinstance(packed.embed, Int8Embedding) and packed.embed.codes is packed.lm_head.codes  # one table
    tok = ckpt.tokenizer()
    ids = torch.tensor([tok.encode("The quick brown fox jumps over the lazy dog. Paris is the capital of France, "
                                   "and Berlin is the capital of Germany. Water boils at 100 degrees")])
    with torch.no_grad():
        a, b = packed(ids), exact(ids)
    assert (a.argmax(-1) == b.argmax(-1)).float().mean().item() >= 0.9
    assert _rel(a, b) < 0.05


@needs_int4
def test_float32_activations_keep_the_packed_weights_only_when_auto_picked_them(smollm2_gguf_path):
    """On a CPU without native bf16 (most AVX2 machines) dtype 'auto' is float32; quant='auto' still keeps
    the file's blocks packed there (packed_float32), while an explicit float32 stays the dense reference.

    Bound: the packed model with float32 activations (x rounded to 15-16 bits per block of 32 on our
    kernel: relative error ~5e-5 per matmul; bytes where it rounds x to bytes (a prompt on the GEMM, AVX2 hosts):
    ~5e-3) against the dense float32 model on the same codes: logits within 1e-3 relative (bytes: 8e-2, measured
    4e-2, logits moving by up to 1.6) and the same next token wherever the dense model's top two logits are
    more than 2 apart (15-16 bits: everywhere; bytes flip position 1's near tie, 0.06 apart)."""
    if not q4_kernel.available():
        pytest.skip("no C compiler here")
    ckpt = open_checkpoint(smollm2_gguf_path)
    packed = load_weights(ckpt, torch.float32, quant="auto", packed_float32=True)
    dense = load_weights(ckpt, torch.float32, quant="auto")
    assert isinstance(packed.layers[0].mlp.w_down, Int4Linear) and isinstance(packed.lm_head, Int8BlockLinear)
    assert not any(isinstance(m, (Int4Linear, Int8BlockLinear)) for m in dense.modules())
    assert packed.dtype == torch.float32
    text = "The quick brown fox jumps over the lazy dog. Paris is the capital of"
    ids = torch.tensor([ckpt.tokenizer().encode(text)])
    with torch.no_grad():
        a, b = packed(ids), dense(ids)
    top = b.topk(2, -1).values
    clear = top[..., 0] - top[..., 1] > (2.0 if rounds_x_to_bytes(ids.shape[1]) else 0.0)
    assert int(clear.sum()) >= 5 and torch.equal(a.argmax(-1)[clear], b.argmax(-1)[clear])
    assert _rel(a, b) < (8e-2 if rounds_x_to_bytes(ids.shape[1]) else 1e-3)


@needs_int4
def test_auto_dtype_without_native_bf16_loads_float32_with_packed_weights(smollm2_gguf_path):
    """The real detection: oneDNN capped at AVX2 (ONEDNN_MAX_CPU_ISA) reports no native bf16, so
    zen_eco.load's dtype 'auto' picks float32; the weights stay packed and the KV cache keeps bf16 rows."""
    if not q4_kernel.available() or platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("no C compiler here, or not x86 (ONEDNN_MAX_CPU_ISA)")
    code = ("import zen_eco; from zen_eco.quant import Int4Linear; "
            f"m = zen_eco.load({str(smollm2_gguf_path)!r}, threads=1).model; "
            "print(m.dtype, sum(isinstance(x, Int4Linear) for x in m.modules()), m.new_cache(8).dtype)")
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["torch.float32", "120", "torch.bfloat16"]  # the KV rows as a bf16 model's


def test_which_weights_quantize_under_a_spec():
    """Layer matrices get the spec, the head int8 (untied: lm_head; tied: the shared table), unless
    int8_head=False (CUDA: the head stays float); norms, biases and an untied embedding stay float."""
    from zen_eco.quant import HEAD_SPEC, QuantSpec

    spec = QuantSpec(4, 64)
    assert spec.for_weight("layers.3.mlp.w_down.weight") is spec
    assert spec.for_weight("layers.3.mlp.w_down.bias") is None
    assert spec.for_weight("layers.3.attn_norm.weight") is None
    assert spec.for_weight("lm_head.weight") is HEAD_SPEC
    assert spec.for_weight("embed.weight") is None and spec.for_weight("embed.weight", tied=True) is HEAD_SPEC
    assert spec.for_weight("lm_head.weight", int8_head=False) is None
    assert spec.for_weight("embed.weight", tied=True, int8_head=False) is None
    assert spec.for_weight("layers.0.attn.wqkv.weight", int8_head=False) is spec
