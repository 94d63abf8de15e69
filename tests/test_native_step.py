"""The whole-step C decode (engine.native_step) against the model's PyTorch forward.

Reference: our ordinary decode step (itself checked against transformers in test_model_parity.py and
test_gemma3.py). Tolerance for float32 models: logits and the K/V written within 2e-5 of the
reference's norm for dense weights: only float32 summation order differs (RMSNorm, attention, merges
across threads; measured ~1e-6). With int4/int8 matmuls 1e-3: each call rounds its activations to
int16 per block of 32, and an activation one float32 ulp apart in the two paths can round to the
next step (2^-15 of its block's largest), an error the q4 kernel bounds by 2e-4 per call
(test_q4_kernel.py), here independently in both paths and compounded over the layers and the head
(measured up to 2.6e-4; a wrong window, RoPE row or scale is off by > 1e-2).
bfloat16 models: the C step keeps every intermediate in float32 where the forward rounds each to
bf16, so it is held to the float32 model instead, and must be at least as close to it as the
bf16 forward is.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import rounds_x_to_bytes

from zen_eco import decode_kernel, kquant_kernel, kv_quant
from zen_eco.config import preset
from zen_eco.engine import native_step
from zen_eco.engine.graphs import decode_one
from zen_eco.errors import ContextLengthError
from zen_eco.init import random_model
from zen_eco.kv_cache import KVCache
from zen_eco.model import RMSNorm
from zen_eco.quant import (Int4Linear, Int8BlockLinear, Int8Embedding, Int8Linear, KQuantLinear, KQuantWeight, Q4Weight,
                           Q8BlockWeight, StackedLinear, quantize_int4, quantize_int8)

pytestmark = pytest.mark.skipif(decode_kernel.library() is None, reason="no C compiler for the native step")


def _config(kind: str):
    base = preset("llama-tiny")
    if kind == "llama":
        return base
    if kind == "qwen3":  # QK-norm, tied head, head_dim apart from hidden / heads
        return dataclasses.replace(base, model_type="qwen3", head_dim=32, tie_word_embeddings=True)
    if kind == "qwen2":  # q/k/v biases
        return dataclasses.replace(base, model_type="qwen2")
    if kind == "llama-bias":  # biases on q/k/v, o and the MLP
        return dataclasses.replace(base, attention_bias=True, mlp_bias=True)
    if kind == "gemma3":  # sliding layers (window 6) with their own RoPE, (1 + w) norms, post-norms, GELU, soft-cap
        return dataclasses.replace(
            base, model_type="gemma3_text", num_hidden_layers=3, head_dim=16, sliding_window=6,
            layer_types=["sliding_attention", "full_attention", "sliding_attention"], hidden_act="gelu_pytorch_tanh",
            query_pre_attn_scalar=20, rope_local_base_freq=10_000.0, tie_word_embeddings=True,
            final_logit_softcapping=30.0)
    raise ValueError(kind)


def _model(kind: str, quant: str = "none", dtype=torch.float32, seed: int = 0, head_dim: int | None = None):
    """A random model whose norms and biases are not at their identity (random_model leaves them so)."""
    config = _config(kind) if head_dim is None else dataclasses.replace(_config(kind), head_dim=head_dim)
    model = random_model(config, dtype=dtype, seed=seed, quant=quant)
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, RMSNorm):
                base = 0.0 if mod.unit_offset else 1.0
                mod.weight.copy_(base + 0.2 * torch.randn(mod.weight.shape, generator=gen))
            bias = getattr(mod, "bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(0.05 * torch.randn(bias.shape, generator=gen))
    return model


def _int8_layers(model):
    """Swap the first layer's matrices to the int8 kinds (q|k|v with a scale per 32 as Q8_0, down with a
    scale per 16 and offsets), its o to 5-bit codes (GGUF's Q5 types), the second layer's o and down to Q4_0's
    and Q5_0's codes, and the head to int8 per row (untied)."""
    gen = torch.Generator().manual_seed(7)
    block = model.layers[0]
    for parent, name in ((block.attn, "wqkv"), (block.mlp, "w_down")):
        lin = getattr(parent, name)
        n, k = lin.weight.shape if hasattr(lin, "weight") else (lin.out_features, lin.in_features)
        codes = torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen)
        draw = lambda: (torch.rand(n, k // 32, generator=gen) * 0.002).half().float()  # noqa: E731
        q = Q8BlockWeight(codes, draw(), *((draw(), draw() - 0.001) if name == "w_down" else (None, None)))
        setattr(parent, name, Int8BlockLinear(q, getattr(lin, "bias", None), model.dtype))
    n, k = block.attn.wo.out_features, block.attn.wo.in_features
    assert k % 32 == 0
    five = Q4Weight(torch.randint(0, 32, (n, k), dtype=torch.uint8, generator=gen),
                    (torch.rand(n, k // 32, generator=gen) * 0.004).half().float(),
                    (-0.06 * torch.rand(n, k // 32, generator=gen)).half().float(), bits=5)
    block.attn.wo = Int4Linear(five, getattr(block.attn.wo, "bias", None), model.dtype)
    # the second layer's o as Q4_0 and down as Q5_0 store them (zeros -8 / -16 scales: derived, not stored)
    second = model.layers[1]
    for parent, name, bits in ((second.attn, "wo", 4), (second.mlp, "w_down", 5)):
        lin = getattr(parent, name)
        n, k = lin.out_features, lin.in_features
        scale = (torch.rand(n, k // 32, generator=gen) * 0.004).half().float()
        q = Q4Weight(torch.randint(0, 2 ** bits, (n, k), dtype=torch.uint8, generator=gen), scale,
                     -(2 ** (bits - 1)) * scale, bits=bits)
        setattr(parent, name, Int4Linear(q, getattr(lin, "bias", None), model.dtype))
        assert getattr(parent, name).scale_zero.shape[1] == 1
    block.mlp.w_gate_up = Int8Linear(quantize_int8(torch.randn(block.mlp.w_gate_up.out_features,
                                                               block.mlp.w_gate_up.in_features, generator=gen) * 0.05),
                                     None, model.dtype)
    if not model.config.tie_word_embeddings:
        model.lm_head = Int8Linear(quantize_int8(model.lm_head.weight.detach().float()), None, model.dtype)
    return model


def _stacked_layers(model):
    """Every layer's q|k|v and gate|up as a StackedLinear (a GGUF mix's fused matrix whose parts share no
    layout): the first rows int4 (quantized from the layer's weights), the rest int8 with block scales,
    each part with its slice of the bias."""
    gen = torch.Generator().manual_seed(11)
    for block in model.layers:
        for parent, name in ((block.attn, "wqkv"), (block.mlp, "w_gate_up")):
            lin = getattr(parent, name)
            w, bias = lin.weight.detach().float(), getattr(lin, "bias", None)
            split = w.shape[0] - model.config.num_key_value_heads * model.config.head_dim
            codes = torch.randint(-127, 128, (w.shape[0] - split, w.shape[1]), dtype=torch.int8, generator=gen)
            tail = Q8BlockWeight(codes, (torch.rand(codes.shape[0], w.shape[1] // 32, generator=gen) * 0.002).half().float())
            biases = (None, None) if bias is None else bias.split((split, w.shape[0] - split))
            setattr(parent, name, StackedLinear([Int4Linear(quantize_int4(w[:split], 32), biases[0], model.dtype),
                                                 Int8BlockLinear(tail, biases[1], model.dtype)]))
    return model


def _cache(model, max_tokens: int = 64, block: int = 8) -> KVCache:
    cfg = model.config
    return KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, max_tokens, 1, model.dtype, "cpu",
                   block_size=block)


def _run(model, native: bool, prompt, tokens, cache):
    model.native_step = native
    out = []
    with torch.inference_mode():
        model(prompt, cache)
        for t in tokens:
            out.append(decode_one(model, cache, t))
    return out


def _inputs(model, prompt_len=5, steps=14, seed=3):
    gen = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    return (torch.randint(0, vocab, (1, prompt_len), generator=gen),
            torch.randint(0, vocab, (steps,), generator=gen).tolist())


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def _steps_agree(errors: torch.Tensor, tol: float, bytes_x: bool) -> None:
    """The C step's logits against the forward's, step by step (errors: relative distances): within tol, or where
    the quantized layers round x to bytes per block of 32 (AVX2, a step of max |x| / 127: conftest.rounds_x_to_bytes)
    most within 1e-4 (a wrong layout or scale is off everywhere) and every one within 2e-2: where the C step's
    norm and the forward's differ in the last bit, a value on a rounding boundary moves a whole step (at hidden 64,
    2 blocks a row, up to ~1e-2 of a step's logits)."""
    if bytes_x:
        assert errors.median() < 1e-4 and errors.max() < 2e-2, errors
    else:
        assert (errors < tol).all(), errors


@pytest.mark.parametrize("kind", ["llama", "qwen3", "qwen2", "llama-bias", "gemma3"])
@pytest.mark.parametrize("quant", ["none", "int4", "int8-kinds", "stacked"])
def test_float32_step_equals_the_forward(kind, quant):
    """14 steps after a 5-token prompt: the cache grows twice (blocks of 8) and Gemma's window (6) slides.
    "stacked": fused matrices as parts of two kinds (_stacked_layers), chained in the C step."""
    model = _model(kind, "int4" if quant == "int4" else "none")
    if quant == "int8-kinds":
        _int8_layers(model)
    if quant == "stacked":
        _stacked_layers(model)
    assert native_step.NativeStep.unsupported(model) is None
    prompt, tokens = _inputs(model)
    ref_cache, cache = _cache(model), _cache(model)
    ref = _run(model, False, prompt, tokens, ref_cache)
    got = _run(model, True, prompt, tokens, cache)
    assert native_step.applies(model, cache)
    assert all(a.shape == b.shape == (1, 1, model.config.vocab_size) for a, b in zip(got, ref))
    errors = torch.tensor([_rel(a, b) for a, b in zip(got, ref)])
    bytes_x = quant != "none" and rounds_x_to_bytes(1)  # an AVX2 host: see _steps_agree
    _steps_agree(errors, 2e-5 if quant == "none" else 1e-3, bytes_x)
    assert cache.length == ref_cache.length == 19 and cache.capacity == ref_cache.capacity
    for a, b in zip(cache.keys + cache.values, ref_cache.keys + ref_cache.values):
        assert _rel(a[:, :, :19], b[:, :, :19]) < (2e-2 if bytes_x else 2e-5 if quant == "none" else 1e-3)


@pytest.mark.parametrize("march", ["native", "x86-64-v3"])
def test_kquant_layers_and_tied_table_step_equals_the_forward(march, built_for):
    """Matrices as K-quants stored (KQuantLinear: q|k|v and gate|up Q4_K, o Q5_K, down Q6_K; K a multiple of
    256: hidden 256), the tied head/table Q6_K (Int8Embedding over the head), and in layer 0 a StackedLinear
    of a Q4_K q|k and a Q6_K v: the C step's LIN_KQ against the forward, as the other quantized kinds (1e-3);
    also as built for AVX2 without AVX-512 (x86-64-v3: the AVX2 K-quant loop and its bit-plane layout)."""
    built_for(march)
    if not kquant_kernel.available():
        pytest.skip("no K-quant loop in this build")
    cfg = dataclasses.replace(_config("qwen3"), hidden_size=256, intermediate_size=512, num_attention_heads=4,
                              num_key_value_heads=2, head_dim=64)
    model = random_model(cfg, dtype=torch.float32, seed=2)
    gen = torch.Generator().manual_seed(12)

    def kquant(kind, n, k):
        bits, sub = {"q4_k": (4, 32), "q5_k": (5, 32), "q6_k": (6, 16)}[kind]
        d = lambda: (torch.rand(n, k // 256, generator=gen) * 2e-4).half().float()  # noqa: E731
        codes = torch.randint(0, 2**bits, (n, k), dtype=torch.uint8, generator=gen)
        if kind == "q6_k":
            return KQuantWeight(kind, codes, torch.randint(-128, 128, (n, k // sub), dtype=torch.int8, generator=gen), d())
        six = lambda: torch.randint(0, 64, (n, k // sub), dtype=torch.uint8, generator=gen)  # noqa: E731
        return KQuantWeight(kind, codes, six(), d(), six(), d())

    kinds = {"wqkv": "q4_k", "wo": "q5_k", "w_gate_up": "q4_k", "w_down": "q6_k"}
    for i, block in enumerate(model.layers):
        for parent, name in ((block.attn, "wqkv"), (block.attn, "wo"), (block.mlp, "w_gate_up"), (block.mlp, "w_down")):
            n, k = getattr(parent, name).weight.shape
            setattr(parent, name, KQuantLinear(kquant(kinds[name], n, k), None, torch.float32))
        if i == 0:
            kv = cfg.num_key_value_heads * cfg.head_dim
            block.attn.wqkv = StackedLinear([KQuantLinear(kquant("q4_k", cfg.num_attention_heads * cfg.head_dim + kv, 256),
                                                          None, torch.float32),
                                             KQuantLinear(kquant("q6_k", kv, 256), None, torch.float32)])
    model.lm_head = KQuantLinear(kquant("q6_k", cfg.vocab_size, 256), None, torch.float32)
    model.embed = Int8Embedding(model.lm_head)
    assert native_step.NativeStep.unsupported(model) is None
    prompt, tokens = _inputs(model, steps=6)
    ref = _run(model, False, prompt, tokens, _cache(model))
    cache = _cache(model)
    got = _run(model, True, prompt, tokens, cache)
    assert native_step.applies(model, cache)
    for step, (a, b) in enumerate(zip(got, ref)):
        assert _rel(a, b) < 1e-3, f"step {step}: {_rel(a, b):.2e}"


@pytest.mark.parametrize("heads,kv_heads,head_dim", [(4, 4, 16), (6, 2, 64), (8, 1, 128), (5, 1, 256), (12, 4, 48)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_attention_over_long_caches_and_every_head_shape(heads, kv_heads, head_dim, dtype):
    """A 300-token prompt, then 3 steps: score tiles of 16 with a remainder, V tiles of 32, the cache
    split into token ranges across threads and merged; 1 to 8 queries per KV head (8: two groups of
    four) and head sizes with their own unrolled copies (64, 128, 256) or the general one (16, 48).
    float32 is held to 2e-5 as above; bfloat16 (the cache's rows bf16 in both paths, the step's
    arithmetic float32) to the bf16 forward's distance from float32 plus that margin."""
    cfg = dataclasses.replace(preset("llama-tiny"), num_attention_heads=heads, num_key_value_heads=kv_heads,
                              head_dim=head_dim)
    model = random_model(cfg, dtype=torch.float32, seed=5)
    prompt, tokens = _inputs(model, prompt_len=300, steps=3)
    ref = _run(model, False, prompt, tokens, _cache(model, 320, 64))
    if dtype == torch.float32:
        got = _run(model, True, prompt, tokens, _cache(model, 320, 64))
        assert max(_rel(a, b) for a, b in zip(got, ref)) < 2e-5
    else:
        half = model.to(torch.bfloat16)
        eager = _run(half, False, prompt, tokens, _cache(half, 320, 64))
        got = _run(half, True, prompt, tokens, _cache(half, 320, 64))
        for a, b, c in zip(got, eager, ref):
            assert _rel(a.float(), c) <= _rel(b.float(), c) + 2e-5


@pytest.mark.parametrize("quant", ["none", "int4"])
def test_bfloat16_cache_under_a_float32_model(quant):
    """Transformer.kv_dtype = bfloat16 (what zen_eco.load picks for an automatic float32 model): the plain
    caches hold bf16 rows, the forward reads them into float32 and the C step reads them as such, so the
    two agree as for a float32 cache (the tolerances above); both stay within bf16's rounding of the K/V
    (< 1e-2 here) of the float32 cache."""
    model = _model("qwen3", quant)
    prompt, tokens = _inputs(model, prompt_len=40, steps=6)
    ref = _run(model, False, prompt, tokens, model.new_cache(64))
    model.kv_dtype = torch.bfloat16
    try:
        cache, eager_cache = model.new_cache(64), model.new_cache(64)
        assert cache.dtype == torch.bfloat16 and model.dtype == torch.float32
        eager = _run(model, False, prompt, tokens, eager_cache)
        got = _run(model, True, prompt, tokens, cache)
        assert native_step.applies(model, cache)
    finally:
        model.kv_dtype = None
    tol = 2e-5 if quant == "none" else 1e-3
    for a, b, c in zip(got, eager, ref):
        assert _rel(a, b) < tol and _rel(b, c) < 1e-2 and _rel(a, c) < 1e-2
    assert max(_rel(b, c) for b, c in zip(eager, ref)) > 1e-6  # the rows were rounded


def test_avx2_build_step_equals_the_forward(built_for):
    """The step built for a CPU with AVX2 and no AVX-512 (ZEN_ECO_MARCH=x86-64-v3: attention and the GLU in
    plain C loops, the AVX2 matmul loops), held to the forward of the same build as above: int4 llama and
    Gemma (GELU, windows), Qwen3 with the int8 kinds, 5-bit codes and Q4_0 / Q5_0 codes (_int8_layers),
    and a 300-token cache of 4 queries per KV head at head_dim 128 in float32 and
    bf16 (the forward's bf16 distance from float32 plus the margin). The AVX2 decode loops round x to bytes
    (_steps_agree)."""
    built_for("x86-64-v3")
    for kind in ("llama", "gemma3", "int8-kinds"):
        model = _int8_layers(_model("qwen3")) if kind == "int8-kinds" else _model(kind, "int4")
        prompt, tokens = _inputs(model)
        ref = _run(model, False, prompt, tokens, _cache(model))
        got = _run(model, True, prompt, tokens, _cache(model))
        _steps_agree(torch.tensor([_rel(a, b) for a, b in zip(got, ref)]), 1e-3, True)
    cfg = dataclasses.replace(preset("llama-tiny"), num_attention_heads=8, num_key_value_heads=2, head_dim=128)
    model = random_model(cfg, dtype=torch.float32, seed=5)
    prompt, tokens = _inputs(model, prompt_len=300, steps=3)
    ref = _run(model, False, prompt, tokens, _cache(model, 320, 64))
    got = _run(model, True, prompt, tokens, _cache(model, 320, 64))
    assert max(_rel(a, b) for a, b in zip(got, ref)) < 2e-5
    half = model.to(torch.bfloat16)
    eager = _run(half, False, prompt, tokens, _cache(half, 320, 64))
    got = _run(half, True, prompt, tokens, _cache(half, 320, 64))
    for a, b, c in zip(got, eager, ref):
        assert _rel(a.float(), c) <= _rel(b.float(), c) + 2e-5


@pytest.mark.parametrize("kind", ["llama", "gemma3"])
def test_bfloat16_step_is_as_close_to_float32_as_the_forward(kind):
    ref_model = _model(kind)
    model = _model(kind, dtype=torch.bfloat16)
    with torch.no_grad():  # the same weights, rounded to bf16, in the float32 reference
        for p, q in zip(ref_model.parameters(), model.parameters()):
            p.copy_(q.float())
    prompt, tokens = _inputs(model, steps=10)
    ref = _run(ref_model, False, prompt, tokens, _cache(ref_model))
    eager = _run(model, False, prompt, tokens, _cache(model))
    fused = _run(model, True, prompt, tokens, _cache(model))
    err_eager = sum(_rel(e, r) for e, r in zip(eager, ref)) / len(ref)
    err_fused = sum(_rel(f, r) for f, r in zip(fused, ref)) / len(ref)
    assert err_fused < 0.02 and err_fused <= err_eager * 1.1, (err_fused, err_eager)


@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
@pytest.mark.parametrize("kv_format", ["int8", "k4v2"])
def test_quantized_kv_cache_keeps_its_attention_around_the_c_layers(kind, kv_format):
    """A kv_quant cache: C before and after each layer's attention, the cache's own attend between.
    A 420-token prompt (one prefill, the same in both) fills k4v2's codes past its 128 unquantized
    sink positions and 128+ residual ones. The steps' own K/V come from float32 values one ulp apart
    in the two paths, so an int8 code can land on the other side of a rounding boundary (a step is
    1/127 of a head's range): 1e-3. (k4v2 keeps those newest positions unquantized.)"""
    model = _model(kind)
    prompt, tokens = _inputs(model, prompt_len=420)
    caches = [model.new_cache(max_tokens=512, kv_format=kv_format) for _ in range(2)]
    ref = _run(model, False, prompt, tokens, caches[0])
    got = _run(model, True, prompt, tokens, caches[1])
    assert native_step.applies(model, caches[1])
    for step, (a, b) in enumerate(zip(got, ref)):
        assert _rel(a, b) < 1e-3, f"step {step}: {_rel(a, b):.2e}"
    assert caches[0].length == caches[1].length == 434 and caches[1].qlen > 128


@pytest.mark.parametrize("kind,dtype", [("qwen3", torch.float32), ("gemma3", torch.float32), ("qwen3", torch.bfloat16)])
@pytest.mark.parametrize("kv_format", ["int8", "int4", "k4v2", "int2"])
def test_quantized_kv_step_in_one_call_equals_the_two_call_step(kind, dtype, kv_format, monkeypatch):
    """zen_decode_step_kvq (the new token's K/V written into the window or quantized as an int8 row in C,
    kv_kernel called over the sink, each page and the window from C) against the two-call step (the
    cache's own write and attend between C calls): the same kernels on the same numbers in the same
    order, so the logits are equal bit for bit. Pages of 256 positions so that steps attend across two;
    a 100-token prompt and 180 steps write sink positions (the first 128, kept unquantized too) and
    cross key-group flushes (which take the two-call path)."""
    monkeypatch.setattr(kv_quant, "PAGE_TOKENS", 256)
    model = _model(kind, dtype=dtype, head_dim=64)  # a head size kv_kernel has
    prompt, tokens = _inputs(model, prompt_len=100, steps=180)
    calls = []
    real = native_step.NativeStep._one_call
    monkeypatch.setattr(native_step.NativeStep, "_one_call", lambda self, c, pos: calls.append(real(self, c, pos)) or calls[-1])
    got = _run(model, True, prompt, tokens, model.new_cache(max_tokens=300, kv_format=kv_format))
    one_call = sum(calls)
    monkeypatch.setattr(native_step.NativeStep, "_one_call", lambda self, c, pos: False)
    ref = _run(model, True, prompt, tokens, model.new_cache(max_tokens=300, kv_format=kv_format))
    assert len(calls) == 180 and one_call >= 170 and (kv_format == "int8" or one_call < 180)
    for step, (a, b) in enumerate(zip(got, ref)):
        assert torch.equal(a, b), f"step {step}: {_rel(a, b):.2e}"


def test_real_smollm2_greedy_text_is_the_forwards(smollm2_gguf_path):
    """SmolLM2-135M in float32 (Q4_1 layers, the head dense): greedy tokens identical to the forward's."""
    import zen_eco

    zm = zen_eco.load(str(smollm2_gguf_path), dtype="float32", threads=2)
    outs = []
    for flag in (False, True):
        zm.model.native_step = flag
        outs.append(zm.generate("The capital of France is", max_tokens=16, temperature=0).token_ids)
    assert outs[0] == outs[1] and len(outs[0]) == 16


def test_fallbacks_to_the_forward():
    model = _model("llama")
    assert native_step.applies(model, _cache(model))
    two = KVCache(2, 2, 16, 64, 2, torch.float32, "cpu")
    assert not native_step.applies(model, two)  # a batch of 2
    bf16_cache = KVCache(2, 2, 16, 64, 1, torch.bfloat16, "cpu")
    assert not native_step.applies(model, bf16_cache)  # cache dtype differs from the model's
    model.native_step = False
    assert not native_step.applies(model, _cache(model))
    model.native_step = True
    model.half()  # float16 weights: not a kind the C step reads
    assert not native_step.applies(model, KVCache(2, 2, 16, 64, 1, torch.float16, "cpu"))


def test_replaced_weights_are_noticed():
    """After `.to()` moves every tensor, the step is rebuilt instead of reading freed memory."""
    model = _model("llama", dtype=torch.bfloat16)
    prompt, tokens = _inputs(model, steps=3)
    _run(model, True, prompt, tokens, _cache(model))
    model.float()
    ref = _run(model, False, prompt, tokens, _cache(model))
    got = _run(model, True, prompt, tokens, _cache(model))
    assert all(_rel(a, b) < 2e-5 for a, b in zip(got, ref))


def test_context_overflow_is_refused_before_any_write():
    model = _model("llama")
    cache = _cache(model, max_tokens=6)
    prompt, tokens = _inputs(model, prompt_len=5, steps=1)
    _run(model, True, prompt, tokens, cache)
    with pytest.raises(ContextLengthError):
        decode_one(model, cache, 3)
    assert cache.length == 6


def test_env_switch_turns_it_off(monkeypatch):
    monkeypatch.setenv("ZEN_ECO_NATIVE_STEP", "0")
    decode_kernel.library.cache_clear()
    try:
        assert native_step.NativeStep.unsupported(_model("llama")) is not None
    finally:
        monkeypatch.undo()
        decode_kernel.library.cache_clear()
