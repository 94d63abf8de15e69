"""Rotary position embeddings (RoPE): frequencies, cos/sin tables, and applying them.

The one home for RoPE in zen-eco. Supported `rope_scaling` types: default (no scaling), linear
(position interpolation), llama3 (Llama 3.1 band-wise scaling) and yarn (YaRN, arXiv:2309.00071).

Numerics: frequencies are built in float32 with the same operation order as the reference
(transformers), because cos/sin are taken of angles up to ~1.6e5 rad, where a one-ulp change in a
float32 frequency moves the angle by ~1e-2. Bit-identical frequencies are the only safe choice.
The rotary dim is always `config.head_dim` (Qwen3-4B has head_dim 128 != hidden_size // heads).
"""

from __future__ import annotations

import math
from typing import Any

import torch

from .config import ModelConfig
from .errors import ConfigError

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")
# Known to exist in config.json files, but not implemented here yet; named in the error message.
UNSUPPORTED_ROPE_TYPES = ("dynamic", "longrope", "proportional")


def _base_inv_freq(theta: float, dim: int) -> torch.Tensor:
    """Unscaled RoPE frequencies theta^(-2i/dim), i = 0 .. dim/2 - 1, in float32."""
    exponents = torch.arange(0, dim, 2, dtype=torch.int64).to(torch.float32) / dim
    return 1.0 / (theta ** exponents)


def _number(params: dict[str, Any], key: str, rope_type: str, default: float | None = None) -> float:
    """A required (or defaulted) positive numeric field of rope_scaling, with a clear error."""
    value = params.get(key, default)
    if value is None:
        raise ConfigError(f"rope_scaling of type {rope_type!r} needs {key!r}; got keys {sorted(params)}")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise ConfigError(f"rope_scaling[{key!r}] must be a positive number, got {value!r}")
    return value


def _llama3_inv_freq(inv_freq: torch.Tensor, params: dict[str, Any], config: ModelConfig) -> torch.Tensor:
    """Llama 3.1: keep short wavelengths, divide long ones by `factor`, blend linearly in between."""
    factor = _number(params, "factor", "llama3")
    low = _number(params, "low_freq_factor", "llama3")
    high = _number(params, "high_freq_factor", "llama3")
    old_ctx = _number(params, "original_max_position_embeddings", "llama3", config.max_position_embeddings)
    if high == low:
        raise ConfigError(f"llama3 rope_scaling needs high_freq_factor != low_freq_factor (both {low})")
    wavelen = 2 * math.pi / inv_freq
    long_wavelen, short_wavelen = old_ctx / low, old_ctx / high
    # blend weight 0 at the long-wavelength edge, 1 at the short one
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > long_wavelen, inv_freq / factor, blended)
    return torch.where(wavelen < short_wavelen, inv_freq, scaled)


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(s) + 1 (1 when not extending)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _yarn_inv_freq(config: ModelConfig, params: dict[str, Any], dim: int) -> tuple[torch.Tensor, float]:
    """YaRN "NTK-by-parts": interpolate low frequencies by `factor`, keep high ones, ramp between."""
    theta = config.rope_theta
    old_ctx = _number(params, "original_max_position_embeddings", "yarn", config.max_position_embeddings)
    # DeepSeek-style configs leave factor out and let the context ratio stand in for it.
    factor = params.get("factor")
    factor = config.max_position_embeddings / old_ctx if factor is None else _number(params, "factor", "yarn")

    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)
    # 0/None fall back to the paper's defaults, as the reference does.
    beta_fast = params.get("beta_fast") or 32
    beta_slow = params.get("beta_slow") or 1

    def pair_index(rotations: float) -> float:
        # Index of the dim pair that turns `rotations` times over the original context:
        # solve old_ctx / (2*pi*theta^(2i/dim)) = rotations for i.
        return (dim * math.log(old_ctx / (rotations * 2 * math.pi))) / (2 * math.log(theta))

    lo, hi = pair_index(beta_fast), pair_index(beta_slow)
    if params.get("truncate", True):
        lo, hi = math.floor(lo), math.ceil(hi)
    lo, hi = max(lo, 0), min(hi, dim - 1)
    if lo == hi:
        hi += 0.001  # avoid dividing by zero in the ramp

    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - lo) / (hi - lo)).clamp(0, 1)
    keep = 1 - ramp  # 1: keep the original (high) frequency, 0: fully interpolate
    freqs = theta ** (torch.arange(0, dim, 2).to(torch.float32) / dim)
    extrapolated = 1.0 / freqs
    interpolated = 1.0 / (factor * freqs)
    return interpolated * (1 - keep) + extrapolated * keep, float(attention_factor)


def rope_init(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """inverse frequencies (head_dim // 2,) float32 and the attention scaling factor applied to cos/sin."""
    dim = config.head_dim
    if dim is None or dim % 2:
        raise ConfigError(f"RoPE needs an even head_dim, got {dim!r}")
    params = dict(config.rope_scaling or {})
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        note = " (not supported yet)" if rope_type in UNSUPPORTED_ROPE_TYPES else ""
        raise ConfigError(
            f"unknown rope type {rope_type!r}{note}; supported: {', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    # Partial rotary would change the rotary dim; we always rotate the whole head, so refuse it.
    if params.get("partial_rotary_factor", 1.0) != 1.0:
        raise ConfigError(f"partial_rotary_factor {params['partial_rotary_factor']!r} is not supported")

    if rope_type == "yarn":
        return _yarn_inv_freq(config, params, dim)
    inv_freq = _base_inv_freq(config.rope_theta, dim)
    if rope_type == "linear":
        # Dividing frequencies by `factor` == dividing positions by it (position interpolation).
        inv_freq = inv_freq / _number(params, "factor", "linear")
    elif rope_type == "llama3":
        inv_freq = _llama3_inv_freq(inv_freq, params, config)
    return inv_freq, 1.0


def rope_cos_sin(
    inv_freq: torch.Tensor, attention_scaling: float, positions: torch.Tensor, dtype: torch.dtype
) -> tuple[torch.Tensor, torch.Tensor]:
    """positions: (T,) or (B, T) int64 -> cos, sin of shape (T, head_dim) or (B, T, head_dim), computed in float32 then cast to dtype. Layout: frequencies duplicated over the two halves (rotate_half convention)."""
    # Angles in float32 (position x frequency): positions up to 2^24 are exact in float32.
    angles = positions[..., None].to(torch.float32) * inv_freq.to(device=positions.device, dtype=torch.float32)
    angles = torch.cat((angles, angles), dim=-1)
    cos, sin = angles.cos(), angles.sin()
    if attention_scaling != 1.0:  # YaRN's temperature; skipping the multiply by 1.0 changes nothing
        cos, sin = cos * attention_scaling, sin * attention_scaling
    return cos.to(dtype), sin.to(dtype)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, H, T, D); cos/sin broadcastable (T, D) or (B, 1, T, D) — rotate-half (GPT-NeoX)
    convention: x*cos + rotate_half(x)*sin, where rotate_half(x1, x2) = (-x2, x1)."""
    return apply_rope_rolled(x, cos, signed_sin(sin))


def signed_sin(sin: torch.Tensor) -> torch.Tensor:
    """sin with its first half negated, for `apply_rope_rolled` (computed once per forward)."""
    first, second = sin.chunk(2, dim=-1)
    return torch.cat((-first, second), dim=-1)


def apply_rope_rolled(x: torch.Tensor, cos: torch.Tensor, sin_signed: torch.Tensor) -> torch.Tensor:
    """`apply_rope` with the sin table already signed (the model builds it once per forward).

    rotate_half(x) * sin = cat(-x2, x1) * cat(s1, s2) = roll(x, D/2) * cat(-s1, s2): the sign moves
    from the data to the table, so each layer does one roll instead of chunk, negate and cat.
    """
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin_signed
