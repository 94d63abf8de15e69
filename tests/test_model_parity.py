"""Our decoder against transformers' own Qwen3 / Llama on tiny random configs.

The checkpoint is written by transformers' `save_pretrained` and read by our loader, so the name
table, the q|k|v and gate|up fusing and the model are all checked together.
Tolerance: fp32 logits within 1e-4 max abs. Both sides compute the same ops in fp32; what remains is
summation order in matmuls/attention (~1e-6 relative), far below 1e-4 at these logit scales (~1).
"""

from __future__ import annotations

import pytest
import torch

from zen_eco.checkpoint import load_weights, open_checkpoint
from zen_eco.engine.generate import Sequence
from zen_eco.engine.sampling import SamplingParams

transformers = pytest.importorskip("transformers")

TOL = 1e-4
# transformers >= 5.2x renamed `past_key_values` to `cache`; accept both.
_HF_CACHE_ARG = "cache" if "cache" in transformers.Qwen3ForCausalLM.forward.__code__.co_varnames else "past_key_values"


def _hf_cache(out):
    return getattr(out, "cache", None) or out.past_key_values


def _hf_config(kind: str):
    common = dict(vocab_size=256, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    if kind == "qwen3":
        return transformers.Qwen3Config(head_dim=24, rms_norm_eps=1e-6, tie_word_embeddings=True,
                                        rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, **common)
    if kind == "qwen2":
        return transformers.Qwen2Config(tie_word_embeddings=False, **common)
    if kind == "llama":
        return transformers.LlamaConfig(tie_word_embeddings=False, rms_norm_eps=1e-5, **common)
    raise ValueError(kind)


def _make(kind: str, tmp_path, safe_serialization_shards: str | None = None):
    torch.manual_seed(0)
    cfg = _hf_config(kind)
    ref = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # random init leaves norms at 1 and biases at 0: perturb them so they matter
        for name, p in ref.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.2)
    kwargs = {"max_shard_size": safe_serialization_shards} if safe_serialization_shards else {}
    ref.save_pretrained(tmp_path, **kwargs)
    ours = load_weights(open_checkpoint(tmp_path), dtype=torch.float32)
    return ref, ours


@pytest.mark.parametrize("kind", ["qwen3", "llama", "qwen2"])
def test_prefill_and_cached_decode_logits_match(kind, tmp_path):
    ref, ours = _make(kind, tmp_path)
    torch.manual_seed(1)
    prompt = torch.randint(0, 256, (1, 11))
    with torch.no_grad():
        hf_out = ref(prompt, use_cache=True)
        cache = ours.new_cache()
        mine = ours(prompt, cache)
        assert (mine - hf_out.logits).abs().max().item() < TOL
        past = _hf_cache(hf_out)
        for step in range(16):
            tok = torch.randint(0, 256, (1, 1))
            hf_out = ref(tok, **{_HF_CACHE_ARG: past}, use_cache=True)
            past = _hf_cache(hf_out)
            mine = ours(tok, cache)
            err = (mine - hf_out.logits).abs().max().item()
            assert err < TOL, f"step {step}: max abs error {err}"


@pytest.mark.parametrize("kind", ["qwen3", "llama"])
def test_greedy_continuation_identical(kind, tmp_path):
    ref, ours = _make(kind, tmp_path)
    prompt = [5, 17, 42, 99, 3, 250, 7]
    with torch.no_grad():
        hf = ref.generate(torch.tensor([prompt]), max_new_tokens=32, do_sample=False, min_new_tokens=32,
                          pad_token_id=0, eos_token_id=None)
    expected = hf[0, len(prompt):].tolist()
    seq = Sequence(ours, prompt, SamplingParams.greedy(), max_new_tokens=32)
    got = [seq.step()[0] for _ in range(32)]
    assert got == expected


def test_sharded_checkpoint_loads_identically(tmp_path):
    ref, ours = _make("llama", tmp_path, safe_serialization_shards="50KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    x = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert (ours(x) - ref(x).logits).abs().max().item() < TOL


def test_chunked_prefill_over_cache_matches_one_shot(tmp_path):
    """Prefill in two pieces (the second attends to the cached first) = one full prefill."""
    _, ours = _make("qwen3", tmp_path)
    x = torch.randint(0, 256, (1, 20))
    with torch.no_grad():
        full = ours(x)
        cache = ours.new_cache()
        ours(x[:, :13], cache)
        tail = ours(x[:, 13:], cache)
    assert (tail - full[:, 13:]).abs().max().item() < TOL
