"""Model configuration: one typed dataclass whose field names are config.json's.

`ModelConfig.from_dict` accepts a Hugging Face config.json (qwen3, qwen2, llama), in either RoPE
spelling (`rope_theta` + `rope_scaling`, or the newer `rope_parameters`), and drops keys it does
not use. Presets live in `PRESETS`, each citing where its numbers come from.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError

# model_type -> what that family's attention looks like. Everything else is shared.
ARCHITECTURES: dict[str, dict[str, bool]] = {
    "qwen3": {"qk_norm": True},
    "qwen2": {"qk_norm": False},
    "llama": {"qk_norm": False},
}


@dataclass
class ModelConfig:
    model_type: str = "qwen3"
    vocab_size: int = 151936
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 36
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    head_dim: int | None = None  # None -> hidden_size // num_attention_heads (wrong for Qwen3-4B, so it is explicit there)
    max_position_embeddings: int = 40960
    rms_norm_eps: float = 1e-6
    rope_theta: float = 1_000_000.0
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "yarn"|"linear"|"llama3"|"dynamic", "factor": ...}
    tie_word_embeddings: bool = True
    attention_bias: bool = False  # bias on q/k/v/o (llama, qwen3); qwen2 always has q/k/v bias and no o bias
    mlp_bias: bool = False
    hidden_act: str = "silu"
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    torch_dtype: str | None = None  # dtype the checkpoint was saved in; informational

    def __post_init__(self) -> None:
        if self.model_type not in ARCHITECTURES:
            raise ConfigError(
                f"unknown architecture {self.model_type!r}; supported: {', '.join(sorted(ARCHITECTURES))}"
            )
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.hidden_act not in ("silu", "swish"):
            raise ConfigError(f"unsupported hidden_act {self.hidden_act!r}; supported: silu")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError(
                f"num_attention_heads ({self.num_attention_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_key_value_heads})"
            )

    # Derived flags: the model reads these, never model_type.
    @property
    def qk_norm(self) -> bool:
        return ARCHITECTURES[self.model_type]["qk_norm"]

    @property
    def qkv_bias(self) -> bool:
        return self.model_type == "qwen2" or self.attention_bias

    @property
    def o_bias(self) -> bool:
        return self.model_type != "qwen2" and self.attention_bias

    @property
    def eos_token_ids(self) -> list[int]:
        if self.eos_token_id is None:
            return []
        return [self.eos_token_id] if isinstance(self.eos_token_id, int) else list(self.eos_token_id)

    def num_parameters(self) -> int:
        """Exact parameter count of the model this config builds (tied embeddings counted once)."""
        h, d, i = self.hidden_size, self.head_dim, self.intermediate_size
        q, kv = self.num_attention_heads * d, self.num_key_value_heads * d
        attn = h * (q + 2 * kv) + q * h
        attn += (q + 2 * kv) if self.qkv_bias else 0
        attn += h if self.o_bias else 0
        attn += 2 * d if self.qk_norm else 0
        mlp = 3 * h * i + ((2 * i + h) if self.mlp_bias else 0)
        per_layer = attn + mlp + 2 * h  # two RMSNorm weights
        embed = self.vocab_size * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return embed + self.num_hidden_layers * per_layer + h + head

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> "ModelConfig":
        if not isinstance(raw, dict):
            raise ConfigError(f"config must be a JSON object, got {type(raw).__name__}")
        data = dict(raw)
        if "model_type" not in data:
            arch = (data.get("architectures") or [None])[0]
            raise ConfigError(f"config.json has no model_type (architectures={arch!r})")
        # Newer transformers write RoPE settings as one dict; fold it into the classic two fields.
        params = data.pop("rope_parameters", None)
        if isinstance(params, dict):
            params = dict(params)
            if "rope_theta" in params:
                data["rope_theta"] = params.pop("rope_theta")
            rope_type = params.get("rope_type", params.get("type", "default"))
            data["rope_scaling"] = None if rope_type == "default" else params
        if "dtype" in data and "torch_dtype" not in data:
            data["torch_dtype"] = data["dtype"]
        names = {f.name for f in dataclasses.fields(cls)}
        try:
            return cls(**{k: v for k, v in data.items() if k in names})
        except TypeError as exc:
            raise ConfigError(f"bad config: {exc}") from None

    @classmethod
    def from_file(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError(f"no config.json at {path}") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{path} is not valid JSON: {exc}") from None
        return cls.from_dict(raw)

    def to_dict(self) -> dict[str, Any]:
        """config.json as transformers writes it for this architecture."""
        out = dataclasses.asdict(self)
        out["architectures"] = [ARCH_CLASS[self.model_type]]
        return out


ARCH_CLASS = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}


def _preset(**kw: Any) -> ModelConfig:
    return ModelConfig(**kw)


# Each preset cites its source. zen-eco-4b is Qwen3-4B's shape (Qwen/Qwen3-4B config.json);
# the tiny ones exist so tests and benchmarks run in seconds.
PRESETS: dict[str, dict[str, Any]] = {
    # Qwen/Qwen3-4B config.json: 36 layers, hidden 2560, 32/8 heads, head_dim 128, ffn 9728,
    # vocab 151936, rope_theta 1e6, tied embeddings, eps 1e-6, 40960 positions (32K usable context).
    "zen-eco-4b": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
        num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
        max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=[151645, 151643],
        torch_dtype="bfloat16",
    ),
    # Test-size qwen3 with the real Qwen3 vocabulary, so the real tokenizer can drive it.
    "zen-eco-tiny": dict(
        model_type="qwen3", vocab_size=151936, hidden_size=64, intermediate_size=128,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        max_position_embeddings=4096, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
        tie_word_embeddings=True, bos_token_id=151643, eos_token_id=[151645, 151643],
        torch_dtype="float32",
    ),
    # Test-size llama (untied head, GQA), the SmolLM2 family's layout at toy scale.
    "llama-tiny": dict(
        model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=160,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        max_position_embeddings=2048, rms_norm_eps=1e-5, rope_theta=10_000.0,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, torch_dtype="float32",
    ),
}


def preset(name: str) -> ModelConfig:
    try:
        return _preset(**PRESETS[name])
    except KeyError:
        raise ConfigError(f"{name!r} is not a preset; presets: {', '.join(PRESETS)}") from None
