"""The real SmolLM2-135M Q4_1 GGUF through our loader against transformers reading the same file.

transformers dequantizes with gguf-py and un-permutes llama Q/K itself; we do both our own way.
Tolerance: fp32 logits within 1e-3 max abs (logits reach ~30; both sides run the same fp32 ops
over bit-identical weights, so only summation order differs — measured difference is ~1e-5).
"""

from __future__ import annotations

import pytest
import torch

from zen_eco.checkpoint import load_weights, open_checkpoint

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")


@pytest.fixture(scope="module")
def both(smollm2_gguf_path):
    ours = load_weights(open_checkpoint(smollm2_gguf_path), dtype=torch.float32)
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm2_gguf_path.parent), gguf_file=smollm2_gguf_path.name, dtype=torch.float32).eval()
    return ours, ref


def test_logits_match_transformers_on_same_gguf(both):
    ours, ref = both
    ids = torch.tensor([[1, 504, 3458, 314, 260, 1345, 28, 506, 2088, 30, 216, 4]])
    with torch.no_grad():
        err = (ours(ids) - ref(ids).logits).abs().max().item()
    assert err < 1e-3, err


def test_config_from_gguf_metadata(both):
    cfg = both[0].config
    assert (cfg.model_type, cfg.num_hidden_layers, cfg.hidden_size, cfg.num_attention_heads,
            cfg.num_key_value_heads, cfg.vocab_size, cfg.tie_word_embeddings) == ("llama", 30, 576, 9, 3, 49152, True)
