"""zen_eco.rope against transformers' Qwen3 RoPE (the reference we must match)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch

from zen_eco.config import ModelConfig
from zen_eco.errors import ConfigError
from zen_eco.rope import apply_rope, rope_cos_sin, rope_init

transformers = pytest.importorskip("transformers")
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # noqa: E402
from transformers.models.qwen3.modeling_qwen3 import (  # noqa: E402
    Qwen3RotaryEmbedding,
    apply_rotary_pos_emb,
)

# Qwen3-4B's attention shape: head_dim 128 while hidden_size // heads == 80, so code that derives
# the rotary dim from hidden_size would produce 40 frequencies instead of 64 and fail here.
SHAPE = dict(hidden_size=2560, num_attention_heads=32, num_key_value_heads=8, head_dim=128)
MAX_POS = 40960
POSITIONS = [0, 1, 4095, 32767, 40000, 131071, 163839]

# (id, rope_theta, rope_scaling) — None is the plain, unscaled RoPE.
CASES: list[tuple[str, float, dict[str, Any] | None]] = [
    ("none", 1_000_000.0, None),
    ("default", 10_000.0, {"rope_type": "default"}),
    ("linear", 10_000.0, {"rope_type": "linear", "factor": 4.0}),
    ("linear-legacy-key", 1_000_000.0, {"type": "linear", "factor": 2.0}),
    ("llama3", 500_000.0, {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}),
    # Qwen3's documented long-context setting (Qwen3 model cards: factor 4 over 32768).
    ("yarn-qwen3", 1_000_000.0, {"rope_type": "yarn", "factor": 4.0,
                                 "original_max_position_embeddings": 32768}),
    ("yarn-legacy-key", 1_000_000.0, {"type": "yarn", "factor": 4.0,
                                      "original_max_position_embeddings": 32768}),
    ("yarn-no-truncate", 1_000_000.0, {"rope_type": "yarn", "factor": 4.0, "truncate": False,
                                       "original_max_position_embeddings": 32768}),
    ("yarn-betas", 10_000.0, {"rope_type": "yarn", "factor": 8.0, "beta_fast": 16, "beta_slow": 2,
                              "original_max_position_embeddings": 4096}),
    ("yarn-mscale", 10_000.0, {"rope_type": "yarn", "factor": 40.0, "mscale": 1.0,
                               "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096}),
    # No factor: the context ratio MAX_POS / original (10) stands in for it (DeepSeek-style).
    ("yarn-no-factor", 10_000.0, {"rope_type": "yarn", "factor": None,
                                  "original_max_position_embeddings": 4096}),
    ("yarn-attention-factor", 1_000_000.0, {"rope_type": "yarn", "factor": 4.0, "attention_factor": 1.25,
                                            "original_max_position_embeddings": 32768}),
]


def ours(theta: float, scaling: dict[str, Any] | None) -> ModelConfig:
    return ModelConfig(model_type="qwen3", max_position_embeddings=MAX_POS, rope_theta=theta,
                       rope_scaling=copy.deepcopy(scaling), **SHAPE)


def reference(theta: float, scaling: dict[str, Any] | None) -> "transformers.Qwen3Config":
    # transformers 5.x keeps theta and scaling in one `rope_parameters` dict.
    params = {**copy.deepcopy(scaling or {"rope_type": "default"}), "rope_theta": theta}
    return transformers.Qwen3Config(max_position_embeddings=MAX_POS, rope_parameters=params, **SHAPE)


@pytest.mark.parametrize("theta,scaling", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_rope_init_matches_transformers(theta: float, scaling: dict[str, Any] | None) -> None:
    inv_freq, scale = rope_init(ours(theta, scaling))
    ref_config = reference(theta, scaling)
    rope_type = ref_config.rope_parameters["rope_type"]
    init_fn = ROPE_INIT_FUNCTIONS.get(rope_type, Qwen3RotaryEmbedding.compute_default_rope_parameters)
    ref_inv_freq, ref_scale = init_fn(ref_config)

    assert inv_freq.dtype == torch.float32 and inv_freq.shape == (64,)
    # Bit-exact: a one-ulp frequency error becomes ~1e-2 of angle at position 1.6e5.
    assert torch.equal(inv_freq, ref_inv_freq.to(torch.float32))
    assert scale == pytest.approx(ref_scale, rel=1e-12, abs=0)


@pytest.mark.parametrize("theta,scaling", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_cos_sin_matches_transformers(theta: float, scaling: dict[str, Any] | None) -> None:
    inv_freq, scale = rope_init(ours(theta, scaling))
    positions = torch.tensor([POSITIONS], dtype=torch.int64)  # (1, T)
    ref = Qwen3RotaryEmbedding(reference(theta, scaling))
    x = torch.zeros(1, len(POSITIONS), 128)  # only its dtype/device matter to the reference
    ref_cos, ref_sin = ref(x, positions)

    cos, sin = rope_cos_sin(inv_freq, scale, positions, torch.float32)
    assert cos.shape == sin.shape == (1, len(POSITIONS), 128)
    # atol 1e-5, not exact: angles reach ~1.6e5 rad, where a float32 ulp of the angle is ~0.016,
    # so float32 cos/sin of such angles are only as good as the argument; different vectorized
    # cos/sin code paths (shape-dependent) may still differ in the last bits of the result.
    torch.testing.assert_close(cos, ref_cos, atol=1e-5, rtol=0)
    torch.testing.assert_close(sin, ref_sin, atol=1e-5, rtol=0)

    # The unbatched (T,) form gives the same table.
    cos1, sin1 = rope_cos_sin(inv_freq, scale, positions[0], torch.float32)
    assert cos1.shape == (len(POSITIONS), 128)
    torch.testing.assert_close(cos1, cos[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(sin1, sin[0], atol=1e-5, rtol=0)


def test_cos_sin_casts_to_requested_dtype() -> None:
    inv_freq, scale = rope_init(ours(1_000_000.0, None))
    cos32, _ = rope_cos_sin(inv_freq, scale, torch.arange(8), torch.float32)
    cos16, sin16 = rope_cos_sin(inv_freq, scale, torch.arange(8), torch.bfloat16)
    assert cos16.dtype == sin16.dtype == torch.bfloat16
    assert torch.equal(cos16, cos32.to(torch.bfloat16))  # computed in float32, cast once at the end


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_apply_rope_matches_transformers(dtype: torch.dtype) -> None:
    gen = torch.Generator().manual_seed(0)
    batch, heads, kv_heads, seq, dim = 2, 4, 2, 5, 128
    q = torch.randn(batch, heads, seq, dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, seq, dim, generator=gen).to(dtype)
    positions = torch.tensor([[0, 1, 2, 3, 4], [7, 100, 4095, 32767, 40000]])
    inv_freq, scale = rope_init(ours(1_000_000.0, {"rope_type": "yarn", "factor": 4.0,
                                                   "original_max_position_embeddings": 32768}))
    cos, sin = rope_cos_sin(inv_freq, scale, positions, dtype)  # (B, T, D)
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)  # unsqueezes to (B, 1, T, D) itself

    assert torch.equal(apply_rope(q, cos[:, None], sin[:, None]), ref_q)
    assert torch.equal(apply_rope(k, cos[:, None], sin[:, None]), ref_k)
    # A shared (T, D) table broadcasts over batch and heads.
    assert torch.equal(apply_rope(q, cos[0], sin[0])[0], ref_q[0])


def test_apply_rope_preserves_norm_and_relative_angle() -> None:
    # Rotation is orthogonal, and q·k depends only on the position difference.
    inv_freq, _ = rope_init(ours(10_000.0, None))
    gen = torch.Generator().manual_seed(1)
    q, k = torch.randn(2, 1, 1, 1, 128, generator=gen, dtype=torch.float64)
    def rot(x: torch.Tensor, pos: int) -> torch.Tensor:
        cos, sin = rope_cos_sin(inv_freq, 1.0, torch.tensor([pos]), torch.float64)
        return apply_rope(x, cos, sin)
    torch.testing.assert_close(rot(q, 37).norm(), q.norm())
    # Angles are formed in float32 (~1e-5 rad of error at position 100), hence the tolerance.
    torch.testing.assert_close((rot(q, 10) * rot(k, 3)).sum(), (rot(q, 107) * rot(k, 100)).sum(),
                               atol=1e-4, rtol=0)


@pytest.mark.parametrize("rope_type", ["dynamic", "longrope", "su", "nonsense"])
def test_unknown_rope_type_raises(rope_type: str) -> None:
    with pytest.raises(ConfigError) as err:
        rope_init(ours(10_000.0, {"rope_type": rope_type, "factor": 2.0}))
    message = str(err.value)
    assert repr(rope_type) in message
    for supported in ("default", "linear", "llama3", "yarn"):
        assert supported in message


def test_legacy_type_key_is_checked_too() -> None:
    with pytest.raises(ConfigError, match="'dynamic'.*not supported"):
        rope_init(ours(10_000.0, {"type": "dynamic", "factor": 2.0}))


@pytest.mark.parametrize("scaling", [
    {"rope_type": "linear"},
    {"rope_type": "linear", "factor": 0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0},
    {"rope_type": "default", "partial_rotary_factor": 0.5},
])
def test_bad_scaling_parameters_raise(scaling: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        rope_init(ours(10_000.0, scaling))
