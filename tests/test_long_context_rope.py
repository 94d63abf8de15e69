"""Logits at positions around 40K and 130K against transformers' Qwen3, for every RoPE scaling.

test_rope checks the RoPE tables; this checks the whole model uses them at depth. Both models hold
the same P cached positions (random K/V: no 130K-token prefill, which would take minutes on a CPU)
and then see the same new tokens at positions P, P+1, ... — transformers through `position_ids` and
a `DynamicCache` of length P, ours through a `KVCache` of length P (the model takes the start position
from `cache.length`). Five tokens are prefilled over the cache (the masked multi-token path), then two
are decoded one at a time (the single-query path).

Tolerance: 1e-5 max abs on fp32 logits of magnitude ~1. Both sides do the same float32 operations;
what differs is the order of sums (attention over 130K keys, matmuls) and cos/sin of angles up to
~1.3e5 rad (a last-bit difference in the library's range reduction), both ~1e-7 here (measured:
at most 3e-7; the prefill step is bit-identical). A wrong RoPE is far above it: the same check with
YaRN factor 4 instead of 5, or plain RoPE instead of a scaled one, moves the logits by 3e-2 to 1e-1
(asserted below, so the test cannot pass by being blind to positions).
"""

from __future__ import annotations

import copy
import inspect
from functools import cache
from typing import Any

import pytest
import torch

from zen_eco.checkpoint import load_weights, open_checkpoint
from zen_eco.config import THINKING_WINDOW, rope_scaling_for_window

transformers = pytest.importorskip("transformers")

TOL = 1e-5
POSITIONS = (40_000, 130_000)
VOCAB, LAYERS, KV_HEADS, HEAD_DIM = 256, 2, 2, 32

# (id, rope_theta, rope_scaling): every type rope.py implements, with the parameters of real configs.
CASES: list[tuple[str, float, dict[str, Any] | None]] = [
    # zen-eco-4b-thinking's scaling, from the same rule the preset uses: YaRN 5.0 over 32768.
    ("yarn-zen-eco-thinking", 1_000_000.0, rope_scaling_for_window(THINKING_WINDOW)),
    # Qwen3's documented 131K setting.
    ("yarn-qwen3-131k", 1_000_000.0, {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}),
    ("linear", 1_000_000.0, {"rope_type": "linear", "factor": 4.0}),
    # Llama 3.1's config.json values.
    ("llama3", 500_000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                           "original_max_position_embeddings": 8192}),
    ("default", 1_000_000.0, None),
]
SCALINGS = {name: (theta, scaling) for name, theta, scaling in CASES}

# transformers renamed `past_key_values` to `cache` in 5.2x; the wrapper hides it from co_varnames.
_CACHE_ARG = "cache" if "cache" in inspect.signature(transformers.Qwen3ForCausalLM.forward).parameters \
    else "past_key_values"


@cache
def _models(name: str, tmp_root: str):
    """transformers' Qwen3 (tiny, fp32, random) and ours loaded from its save_pretrained directory."""
    theta, scaling = SCALINGS[name]
    params = {**copy.deepcopy(scaling or {"rope_type": "default"}), "rope_theta": theta}
    # YaRN: max_position_embeddings = factor x original, as Qwen documents (transformers warns otherwise).
    max_pos = int(scaling["factor"] * scaling["original_max_position_embeddings"]) \
        if scaling and scaling["rope_type"] == "yarn" else THINKING_WINDOW
    config = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=LAYERS, num_attention_heads=4,
        num_key_value_heads=KV_HEADS, head_dim=HEAD_DIM,  # head_dim 32 != hidden_size // heads (16)
        max_position_embeddings=max_pos, rms_norm_eps=1e-6, tie_word_embeddings=True, rope_parameters=params)
    torch.manual_seed(0)
    ref = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():  # norms start at 1: perturb them so q/k-norm weights matter
        for pname, p in ref.named_parameters():
            if "norm" in pname:
                p.add_(torch.randn_like(p) * 0.2)
    path = f"{tmp_root}/{name}"
    ref.save_pretrained(path)
    ours = load_weights(open_checkpoint(path), dtype=torch.float32)
    return ref, ours


@cache
def _prefix(length: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer, the K and V (1, H_kv, length, D) both models find in their caches."""
    gen = torch.Generator().manual_seed(length)
    return [(torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=gen),
             torch.randn(1, KV_HEADS, length, HEAD_DIM, generator=gen)) for _ in range(LAYERS)]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("long_rope"))
    yield lambda name: _models(name, root)
    _models.cache_clear()
    _prefix.cache_clear()


STEPS = [torch.randint(0, VOCAB, (1, n), generator=torch.Generator().manual_seed(i)) for i, n in enumerate((5, 1, 1))]


def _logits_at(ref, ours, start: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(ours, reference) logits for each of STEPS, the first new token at position `start`."""
    ref_cache = transformers.DynamicCache(config=ref.config)
    our_cache = ours.new_cache(max_tokens=start + 64)
    our_cache.reserve(start)  # the protocol the model itself follows: reserve, write each layer, advance
    for layer, (k, v) in enumerate(_prefix(start)):
        ref_cache.update(k.clone(), v.clone(), layer)
        our_cache.update(layer, k, v)
    our_cache.advance(start)
    out, pos = [], start
    with torch.no_grad():
        for tokens in STEPS:
            n = tokens.shape[1]
            expect = ref(tokens, position_ids=torch.arange(pos, pos + n)[None], use_cache=True,
                         **{_CACHE_ARG: ref_cache}).logits
            out.append((ours(tokens, our_cache), expect))
            pos += n
    assert our_cache.length == ref_cache.get_seq_length() == pos
    return out


@pytest.mark.parametrize("start", POSITIONS, ids=lambda p: f"pos{p // 1000}K")
@pytest.mark.parametrize("name", list(SCALINGS))
def test_logits_match_transformers_at_depth(models, name, start):
    ref, ours = models(name)
    for step, (mine, expect) in enumerate(_logits_at(ref, ours, start)):
        assert mine.shape == expect.shape
        err = (mine - expect).abs().max().item()
        assert err < TOL, f"{name} at {start}, step {step}: max abs error {err:.2e}"


@pytest.mark.parametrize("ours_name,ref_name,start", [
    ("yarn-qwen3-131k", "yarn-zen-eco-thinking", 130_000),  # factor 4 where 5 is wanted
    ("default", "linear", 40_000),  # no scaling where linear is wanted
])
def test_a_wrong_rope_is_far_outside_the_tolerance(models, ours_name, ref_name, start):
    """The check above has the power to see RoPE at these positions (same weights, other scaling)."""
    ref, _ = models(ref_name)
    _, wrong = models(ours_name)
    errors = [(mine - expect).abs().max().item() for mine, expect in _logits_at(ref, wrong, start)]
    assert min(errors) > 1000 * TOL, errors
