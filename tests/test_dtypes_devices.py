"""The model in float32, bfloat16 and float16, on the CPU and (marked gpu) on CUDA.

Reference: our own float32 model, itself checked against transformers in test_model_parity.py.
Tolerance: half-precision matmuls round each product to 8 (bf16) or 11 (fp16) mantissa bits; over a
3-layer toy model the logits stay within 3% relative of fp32, and the argmax within a random
vocabulary of 256 mostly agrees.
"""

from __future__ import annotations

import pytest
import torch

from zen_eco.checkpoint import load_weights, open_checkpoint
from zen_eco.engine.generate import Sequence
from zen_eco.engine.sampling import SamplingParams
from zen_eco.init import init_checkpoint


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory):
    path = init_checkpoint("zen-eco-tiny", tmp_path_factory.mktemp("dt") / "tiny", dtype="float32", seed=3)
    return open_checkpoint(path)


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_tracks_float32(tiny_qwen3, dtype):
    ref = load_weights(tiny_qwen3, torch.float32)
    half = load_weights(tiny_qwen3, dtype)
    assert half.embed.weight.dtype == dtype
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        cache = half.new_cache()
        out = half(ids, cache)
        step = half(torch.tensor([[7]]), cache)
        ref_cache = ref.new_cache()
        expect = ref(ids, ref_cache)
        expect_step = ref(torch.tensor([[7]]), ref_cache)
    assert out.dtype == torch.float32  # logits are always returned in fp32
    assert _rel(out, expect) < 0.03 and _rel(step, expect_step) < 0.03


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_cpu(tiny_qwen3, dtype):
    cpu = load_weights(tiny_qwen3, torch.float32)
    gpu = load_weights(tiny_qwen3, dtype, device="cuda")
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expect, got = cpu(ids), gpu(ids.cuda()).cpu()
    assert _rel(got, expect) < (1e-4 if dtype == torch.float32 else 0.03)
    seq = Sequence(gpu, ids[0].tolist(), SamplingParams(temperature=0.7, seed=1), max_new_tokens=8)
    assert len([seq.step() for _ in range(8)]) == 8  # sampling runs with a CUDA generator
