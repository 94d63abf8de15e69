"""Presets and the long-context rule: when YaRN is on, and the zen-eco-4b-thinking preset it yields."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pytest
import torch

from zen_eco.config import (
    PRESETS,
    QWEN3_NATIVE_CONTEXT,
    THINKING_WINDOW,
    ModelConfig,
    preset,
    rope_scaling_for_window,
)
from zen_eco.engine.thinking import MAX_THINKING_BUDGET
from zen_eco.errors import ConfigError
from zen_eco.info import describe
from zen_eco.rope import rope_init

YARN_5 = {"rope_type": "yarn", "factor": 5.0, "original_max_position_embeddings": 32768}


@pytest.mark.parametrize("window,factor", [
    (4096, None), (32_768, None),
    (40_960, None),  # Qwen3's shipped window: plain RoPE (zen-eco-4b)
    (40_961, 40_961 / 32_768),
    (65_536, 2.0),  # Qwen's docs: "typical context 65,536 -> factor 2.0"
    (131_072, 4.0),  # Qwen's documented 131K setting
    (163_840, 5.0),  # 32K prompt + 128K thinking
])
def test_yarn_rule(window, factor):
    scaling = rope_scaling_for_window(window)
    if factor is None:
        assert scaling is None
    else:
        assert scaling == {"rope_type": "yarn", "factor": factor, "original_max_position_embeddings": 32768}
        assert scaling["factor"] * scaling["original_max_position_embeddings"] == window


@pytest.mark.parametrize("window", [0, -1, 1.5e5, True, "160K"])
def test_yarn_rule_rejects_bad_windows(window):
    with pytest.raises(ConfigError, match="positive integer"):
        rope_scaling_for_window(window)


def test_thinking_preset_covers_prompt_plus_budget():
    base, thinking = preset("zen-eco-4b"), preset("zen-eco-4b-thinking")
    assert THINKING_WINDOW == QWEN3_NATIVE_CONTEXT + MAX_THINKING_BUDGET == 163_840
    assert thinking.max_position_embeddings == THINKING_WINDOW
    assert thinking.rope_scaling == YARN_5 == rope_scaling_for_window(THINKING_WINDOW)
    # the non-thinking preset follows the same rule: its 40,960 positions keep plain RoPE
    assert base.rope_scaling is None == rope_scaling_for_window(base.max_position_embeddings)
    # same weights: nothing but the window and RoPE differ
    differ = {k for k, v in base.to_dict().items() if thinking.to_dict()[k] != v}
    assert differ == {"max_position_embeddings", "rope_scaling"}
    assert thinking.num_parameters() == base.num_parameters() == 4_022_468_096

    inv_freq, attention = rope_init(thinking)
    assert inv_freq.shape == (64,)  # head_dim 128, not hidden_size // heads
    assert attention == pytest.approx(0.1 * math.log(5.0) + 1)
    # YaRN keeps the fastest frequencies and divides the slowest by the factor
    base_freq, _ = rope_init(base)
    assert inv_freq[0] == base_freq[0]
    torch.testing.assert_close(inv_freq[-1], base_freq[-1] / 5.0)


def test_presets_hand_out_copies():
    cfg = preset("zen-eco-4b-thinking")
    cfg.rope_scaling["factor"] = 1.0
    cfg.eos_token_id.append(0)
    assert preset("zen-eco-4b-thinking").rope_scaling == YARN_5
    assert preset("zen-eco-4b").eos_token_id == [151645, 151643]


def test_thinking_config_json_reads_the_same_in_transformers():
    """The config.json `init` writes for the preset gives transformers the same RoPE, bit for bit."""
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = preset("zen-eco-4b-thinking")
    hf = transformers.Qwen3Config.from_dict(cfg.to_dict())
    assert hf.max_position_embeddings == THINKING_WINDOW
    ref_freq, ref_attention = ROPE_INIT_FUNCTIONS["yarn"](hf)
    inv_freq, attention = rope_init(cfg)
    assert torch.equal(inv_freq, ref_freq.float())
    assert attention == pytest.approx(ref_attention, rel=1e-12)
    assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_info_describes_the_thinking_preset():
    text = describe("zen-eco-4b-thinking")
    assert "context           163840" in text
    assert "rope              theta 1e+06, yarn (factor 5, original_max_position_embeddings 32768)" in text
    assert "kv cache, full    24.16 GB in bf16 at 163,840 tokens" in text
    assert "rope              theta 1e+06, default\n" in describe("zen-eco-4b")


def test_info_command_on_the_thinking_preset():
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    proc = subprocess.run([sys.executable, "-m", "zen_eco.cli", "info", "zen-eco-4b-thinking"],
                          capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "4,022,468,096 (4.02B)" in proc.stdout and "yarn (factor 5," in proc.stdout


def test_init_writes_a_yarn_checkpoint_both_loaders_agree_on(tmp_path, monkeypatch):
    """`init` of a YaRN preset (the thinking preset's RoPE at test size; the 4B one writes 8 GB):
    the directory loads in our loader and in transformers with the same rotary frequencies."""
    transformers = pytest.importorskip("transformers")
    from zen_eco.checkpoint import load_weights, open_checkpoint
    from zen_eco.init import init_checkpoint

    tiny = {**PRESETS["zen-eco-tiny"], "vocab_size": 512,  # not Qwen's vocabulary: no tokenizer to build
            "max_position_embeddings": THINKING_WINDOW, "rope_scaling": rope_scaling_for_window(THINKING_WINDOW)}
    monkeypatch.setitem(PRESETS, "tiny-thinking", tiny)
    out = init_checkpoint("tiny-thinking", tmp_path / "ckpt", dtype="float32")

    written = json.loads((out / "config.json").read_text())
    assert written["rope_scaling"] == YARN_5 and written["max_position_embeddings"] == THINKING_WINDOW
    ours = load_weights(open_checkpoint(out), dtype=torch.float32)
    assert ours.config.rope_scaling == YARN_5
    ref = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    rotary = ref.model.rotary_emb
    assert torch.equal(ours.inv_freq, rotary.inv_freq.float())
    assert ours.attention_scaling == pytest.approx(rotary.attention_scaling, rel=1e-12)
    x = torch.randint(0, 512, (1, 7), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert (ours(x) - ref(x).logits).abs().max().item() < 1e-4
