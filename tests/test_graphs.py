"""The recordable decode step (engine.graphs) against the ordinary cached decode.

On the CPU `DecodeGraph(record=False)` runs the exact code a CUDA graph records (token and position
from device tensors, K/V written by index_copy_, attention over the whole allocated capacity under a
mask), so these tests check its logic; the `gpu` tests check recording and replay on CUDA.
Reference: our ordinary decode step, itself checked against transformers (test_model_parity.py,
test_gemma3.py). Tolerance: fp32 logits within 1e-5 max abs: the static step attends over extra
masked positions (weight exactly 0), so only the summation order can differ.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from zen_eco.config import preset
from zen_eco.engine.generate import Sequence
from zen_eco.engine.graphs import _COMPILED, DecodeGraph, decode_one, graphs_apply
from zen_eco.engine.sampling import SamplingParams
from zen_eco.init import random_model
from zen_eco.kv_cache import KVCache
from zen_eco.kv_quant import make_kv_cache

TOL = 1e-5


def _gemma_like():
    """Sliding-window layers (window 6) beside global ones, Gemma norms and GELU, a small vocabulary."""
    cfg = dataclasses.replace(
        preset("llama-tiny"), model_type="gemma3_text", num_hidden_layers=3, head_dim=16, sliding_window=6,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"], hidden_act="gelu_pytorch_tanh",
        query_pre_attn_scalar=20, rope_local_base_freq=10_000.0, tie_word_embeddings=True)
    return cfg


def _cache(model, block: int, max_tokens: int = 256, device="cpu") -> KVCache:
    cfg = model.config
    return KVCache(cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, max_tokens, 1, model.dtype,
                   device, block_size=block)


def _compare_graphs(model, prompt_len: int, steps: int, block: int, compile: bool):
    """The static step, compiled or not, against the eager static step."""
    gen = torch.Generator().manual_seed(9)
    prompt = torch.randint(0, model.config.vocab_size, (1, prompt_len), generator=gen)
    tokens = torch.randint(0, model.config.vocab_size, (steps,), generator=gen).tolist()
    a, b = _cache(model, block), _cache(model, block)
    with torch.inference_mode():
        model(prompt, a)
        model(prompt, b)
        ref, graph = DecodeGraph(model, a, record=False), DecodeGraph(model, b, record=False, compile=compile)
        for step, token in enumerate(tokens):
            err = (graph(token) - ref(token)).abs().max().item()
            assert err < TOL, f"step {step}: max abs error {err}"
    return graph


def _compare(model, prompt_len: int, steps: int, block: int, trim_to: int | None = None):
    gen = torch.Generator().manual_seed(5)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, prompt_len), generator=gen)
    tokens = torch.randint(0, vocab, (steps,), generator=gen).tolist()
    ref_cache, static_cache = _cache(model, block), _cache(model, block)
    with torch.inference_mode():
        model(prompt, ref_cache)
        model(prompt, static_cache)
        if trim_to is not None:  # stale K/V past the trim point must be masked, not read
            ref_cache.trim(trim_to)
            static_cache.trim(trim_to)
        graph = DecodeGraph(model, static_cache, record=False)
        for step, token in enumerate(tokens):
            expect = model(torch.tensor([[token]]), ref_cache)
            got = graph(token)
            err = (got - expect).abs().max().item()
            assert err < TOL, f"step {step}: max abs error {err}"
    assert static_cache.length == ref_cache.length
    for a, b in zip(static_cache.keys + static_cache.values, ref_cache.keys + ref_cache.values):
        assert (a[:, :, : ref_cache.length] - b[:, :, : ref_cache.length]).abs().max() < TOL
    return graph


def test_static_step_equals_cached_decode_across_growth():
    model = random_model("zen-eco-tiny", seed=1)
    graph = _compare(model, prompt_len=20, steps=40, block=16)
    # capacities 32, 48, 64: one step (a graph, on CUDA) prepared per capacity the cache grew to
    assert graph.prepared == 3


def test_static_step_sliding_window_layers():
    model = random_model(_gemma_like(), seed=2)
    _compare(model, prompt_len=9, steps=20, block=8)  # every step is past the window of 6


def test_static_step_after_trim_ignores_stale_positions():
    model = random_model("llama-tiny", seed=3)
    _compare(model, prompt_len=30, steps=12, block=16, trim_to=11)


def test_compiled_static_step_equals_eager_across_growth():
    """The step through torch.compile (what `compile=True` records on CUDA): same logits within 1e-5
    (inductor may reorder fp32 sums), and one compile for every capacity (the capacity is marked
    dynamic; a recompile per 256 tokens of growth would cost ~35 s each on zen-eco-4b)."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    model = random_model("zen-eco-tiny", seed=8)
    graph = _compare_graphs(model, prompt_len=20, steps=30, block=16, compile=True)
    assert graph.prepared == 3 and counters["stats"]["unique_graphs"] == 1


def test_static_step_applies_to_plain_batch1_caches_on_cuda_or_compiled():
    model = random_model("llama-tiny")
    cfg = model.config
    assert not graphs_apply(model, _cache(model, 16))  # CPU, not compiled: the ordinary step
    model.compile_decode = True
    assert graphs_apply(model, _cache(model, 16))  # compiled: the static step, on any device
    assert not graphs_apply(model, KVCache(2, 2, 16, 64, batch_size=2))
    model.compile_decode = False
    quantized = make_kv_cache("int8", cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim, 64, 1,
                              model.dtype, "cpu")
    assert not graphs_apply(model, quantized)
    # on the CPU without the C step (test_native_step.py) decode_one is the ordinary forward, bit for bit
    model.native_step = False
    a, b = _cache(model, 16), _cache(model, 16)
    with torch.inference_mode():
        model(torch.tensor([[1, 2, 3]]), a)
        model(torch.tensor([[1, 2, 3]]), b)
        assert torch.equal(decode_one(model, a, 7), model(torch.tensor([[7]]), b))
    assert a.decode_graph is None


# --------------------------------------------------------------------------- CUDA

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("config,quant", [("zen-eco-tiny", "none"), ("gemma", "none"), ("zen-eco-tiny", "int4")])
def test_cuda_graph_replay_equals_eager_static_step(config, quant):
    """Replays of the recorded step give the eager static step's logits (the same kernels), across
    growth (re-recording), sliding windows and INT4 layers (tinygemm, bf16)."""
    cfg = _gemma_like() if config == "gemma" else preset(config)
    dtype = torch.float32 if quant == "none" else torch.bfloat16
    model = random_model(cfg, dtype, "cuda", seed=4, quant=quant)
    gen = torch.Generator().manual_seed(6)
    prompt = torch.randint(0, cfg.vocab_size, (1, 20), generator=gen).cuda()
    tokens = torch.randint(0, cfg.vocab_size, (40,), generator=gen).tolist()
    eager_cache, graph_cache = _cache(model, 16, device="cuda"), _cache(model, 16, device="cuda")
    with torch.inference_mode():
        model(prompt, eager_cache)
        model(prompt, graph_cache)
        eager, recorded = DecodeGraph(model, eager_cache, record=False), DecodeGraph(model, graph_cache)
        for step, token in enumerate(tokens):
            expect = eager(token).clone()
            got = recorded(token)
            assert (got - expect).abs().max().item() < 1e-5, f"step {step}"
    assert recorded.graph is not None and recorded.prepared == 3


@pytest.mark.gpu
@cuda
def test_cuda_compiled_graph_matches_eager_static_step():
    model = random_model("zen-eco-tiny", torch.float32, "cuda", seed=10)
    eager_cache, graph_cache = _cache(model, 16, device="cuda"), _cache(model, 16, device="cuda")
    gen = torch.Generator().manual_seed(11)
    prompt = torch.randint(0, 1000, (1, 20), generator=gen).cuda()
    with torch.inference_mode():
        model(prompt, eager_cache)
        model(prompt, graph_cache)
        eager, recorded = DecodeGraph(model, eager_cache, record=False), DecodeGraph(model, graph_cache, compile=True)
        for step in range(30):
            expect = eager(step + 3).clone()
            assert (recorded(step + 3) - expect).abs().max().item() < 1e-4, f"step {step}"
    assert recorded.graph is not None and recorded.prepared == 3


@pytest.mark.gpu
@cuda
def test_cuda_greedy_generation_same_with_and_without_graphs():
    """The engine's path: graphs on and off give the same greedy tokens (fp32, so rounding cannot
    flip a near tie), past a growth of the cache."""
    model = random_model("zen-eco-tiny", torch.float32, "cuda", seed=7)
    prompt = list(range(1000, 1030))
    outs = []
    for graphs in (False, True):
        model.cuda_graphs = graphs
        seq = Sequence(model, prompt, SamplingParams.greedy(), max_new_tokens=300)  # grows past 256
        outs.append([seq.step()[0] for _ in range(300)])
        assert (seq.cache.decode_graph is not None) == graphs
    assert outs[0] == outs[1]


def test_load_with_compile_generates_what_eager_does(tmp_path):
    """The user-facing knob: zen_eco.load(compile=True) on the CPU decodes through the compiled static
    step (Sequence -> decode_one) and gives the eager model's greedy text, token for token."""
    import zen_eco
    from zen_eco.init import init_checkpoint

    path = init_checkpoint("zen-eco-tiny", tmp_path / "tiny", dtype="float32", seed=12)
    eager = zen_eco.load(path, dtype="float32", device="cpu")
    compiled = zen_eco.load(path, dtype="float32", device="cpu", compile=True)
    assert compiled.model.compile_decode and not eager.model.compile_decode
    kwargs = dict(max_tokens=24, temperature=0, enable_thinking=False)
    a = eager.generate("Tell me about the sea", **kwargs)
    b = compiled.generate("Tell me about the sea", **kwargs)
    assert compiled.model in _COMPILED and eager.model not in _COMPILED  # it really took the compiled step
    assert a.text == b.text and a.generation_tokens == b.generation_tokens == 24
    # the compiled wrapper is not a submodule: the model's modules and weights are as loaded
    assert [n for n, _ in compiled.model.named_modules()] == [n for n, _ in eager.model.named_modules()]
    assert compiled.model.state_dict().keys() == eager.model.state_dict().keys()
