"""Model configuration: one typed dataclass whose field names are config.json's.

`ModelConfig.from_dict` accepts a Hugging Face config.json (qwen3, qwen2, llama, gemma3_text), in
either RoPE spelling (`rope_theta` + `rope_scaling`, or the newer `rope_parameters`, also Gemma 3's
per-layer-type form), and drops keys it does not use. Presets live in `PRESETS`, each citing where
its numbers come from.

Long context (when YaRN is on). Qwen3 — and so Zen-Eco — was pretrained on 32,768-token sequences
and ships with 40,960 positions of plain RoPE (32K context + 8K of output). Longer windows need RoPE
scaling, and Qwen documents static YaRN for it (QwenLM/Qwen3 docs, "Enabling Long Context": factor 4.0
over original_max_position_embeddings 32768 for 131,072 tokens). Static YaRN rescales every position,
short prompts included, which Qwen notes may cost quality on short texts; so the rule, written out in
`rope_scaling_for_window`, is the one Qwen gives for vLLM, SGLang and transformers:
  * a window of at most 40,960 positions keeps plain RoPE (`zen-eco-4b`);
  * a longer window switches YaRN on with original_max_position_embeddings 32768 and
    factor = window / 32768, so factor x original covers the window exactly (131,072 -> 4.0, as Qwen
    documents; 32K prompt + 128K thinking = 163,840 -> 5.0, `zen-eco-4b-thinking`), and
    max_position_embeddings = window (what Qwen's own config.json example sets; transformers 4.52.3,
    Qwen's docs note, took the factor from max_position_embeddings / original: the same number then).
A larger rope base (rope_theta) would also cover 160K, but only for a model trained at that base:
the weights were trained at 1e6, and YaRN is the extension Qwen validated for them without training.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

# model_type -> how that family differs from a plain llama block. Everything else is shared.
#   qk_norm:     RMSNorm over each query/key head before RoPE
#   gemma_norms: RMSNorm weights stored as offsets from 1 (the scale is 1 + w), and a second norm on
#                each sublayer's output before it joins the residual stream (four norms per layer)
#   embed_scale: token embeddings multiplied by sqrt(hidden_size)
ARCHITECTURES: dict[str, dict[str, bool]] = {
    "qwen3": {"qk_norm": True, "gemma_norms": False, "embed_scale": False},
    "qwen2": {"qk_norm": False, "gemma_norms": False, "embed_scale": False},
    "llama": {"qk_norm": False, "gemma_norms": False, "embed_scale": False},
    # Gemma 3's text decoder (also the language model inside the multimodal `gemma3` checkpoints).
    # Its other differences are config fields: GELU-tanh MLP, query_pre_attn_scalar, sliding-window
    # layers with their own RoPE base, final logit soft-capping (unset in Gemma 3).
    "gemma3_text": {"qk_norm": True, "gemma_norms": True, "embed_scale": True},
}
ACTIVATIONS = ("silu", "swish", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")
# Fields only some architectures use: left out of to_dict() while unset, so configs we write for the
# other families stay as they were.
_OPTIONAL_FIELDS = ("query_pre_attn_scalar", "sliding_window", "layer_types", "rope_local_base_freq",
                    "final_logit_softcapping")


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
    hidden_act: str = "silu"  # "silu" | "gelu_pytorch_tanh" (Gemma's config.json calls it hidden_activation)
    # Attention logits are scaled by query_pre_attn_scalar ** -0.5 (None: head_dim ** -0.5).
    query_pre_attn_scalar: float | None = None
    # Per layer "full_attention" or "sliding_attention" (None: all full). A sliding layer attends to
    # the last `sliding_window` positions only, itself included.
    sliding_window: int | None = None
    layer_types: list[str] | None = None
    rope_local_base_freq: float | None = None  # RoPE base of sliding layers (None: rope_theta, same scaling)
    # cap * tanh(logits / cap) on the output logits. (Gemma 3 configs also carry attn_logit_softcapping,
    # but transformers' and llama.cpp's Gemma 3 never apply it; neither do we, so it is not read.)
    final_logit_softcapping: float | None = None
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
        if self.hidden_act not in ACTIVATIONS:
            raise ConfigError(f"unsupported hidden_act {self.hidden_act!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.model_type == "gemma3_text":  # transformers' Gemma3TextConfig defaults
            if self.query_pre_attn_scalar is None:
                self.query_pre_attn_scalar = 256
            if self.rope_local_base_freq is None:
                self.rope_local_base_freq = 10_000.0
        if self.layer_types is not None:
            if not isinstance(self.layer_types, list) or len(self.layer_types) != self.num_hidden_layers:
                raise ConfigError(f"layer_types must list one type per layer ({self.num_hidden_layers}), "
                                  f"got {self.layer_types!r}")
            bad = [t for t in self.layer_types if t not in LAYER_TYPES]
            if bad:
                raise ConfigError(f"unknown layer type {bad[0]!r}; supported: {', '.join(LAYER_TYPES)}")
            if "sliding_attention" in self.layer_types and (
                    not isinstance(self.sliding_window, int) or isinstance(self.sliding_window, bool)
                    or self.sliding_window <= 0):
                raise ConfigError(f"sliding layers need a positive integer sliding_window, got {self.sliding_window!r}")
        for name in ("query_pre_attn_scalar", "rope_local_base_freq", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0):
                raise ConfigError(f"{name} must be a positive number or null, got {value!r}")
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
    def gemma_norms(self) -> bool:
        return ARCHITECTURES[self.model_type]["gemma_norms"]

    @property
    def embed_scale(self) -> float | None:
        """What token embeddings are multiplied by (None: nothing)."""
        return self.hidden_size**0.5 if ARCHITECTURES[self.model_type]["embed_scale"] else None

    @property
    def attention_scale(self) -> float | None:
        """Softmax scale of attention logits (None: the usual head_dim ** -0.5)."""
        return None if self.query_pre_attn_scalar is None else self.query_pre_attn_scalar**-0.5

    def layer_window(self, layer: int) -> int | None:
        """How many positions (itself included) layer `layer` attends to; None: all before it."""
        if self.layer_types is not None and self.layer_types[layer] == "sliding_attention":
            return self.sliding_window
        return None

    def attended_positions(self, context: float) -> float:
        """Positions a decode step at `context` cached ones attends, summed over the layers (a sliding layer's
        window at most): what it reads of a KV cache, in positions."""
        return sum(min(context, self.layer_window(i) or context) for i in range(self.num_hidden_layers))

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
        per_layer = attn + mlp + (4 if self.gemma_norms else 2) * h  # RMSNorm weights
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
        if data["model_type"] == "gemma3":
            raise ConfigError("model_type 'gemma3' is the multimodal Gemma 3 wrapper; only its text decoder "
                              "(model_type 'gemma3_text', or a gemma3 GGUF file) is supported")
        if data.get("use_bidirectional_attention"):
            raise ConfigError("use_bidirectional_attention (an encoder-style model) is not supported")
        if "hidden_activation" in data:  # Gemma's name for it (older Gemma configs carry both; this one rules)
            data["hidden_act"] = data.pop("hidden_activation")
        if data["model_type"] == "gemma3_text" and data.get("layer_types") is None:
            # Older Gemma 3 configs give a period instead: every `pattern`-th layer is global.
            pattern = data.get("sliding_window_pattern", data.get("_sliding_window_pattern", 6))
            if not isinstance(pattern, int) or isinstance(pattern, bool) or pattern <= 0:
                raise ConfigError(f"sliding_window_pattern must be a positive integer, got {pattern!r}")
            layers = data.get("num_hidden_layers", cls.num_hidden_layers)
            if isinstance(layers, int):
                data["layer_types"] = ["sliding_attention" if (i + 1) % pattern else "full_attention"
                                       for i in range(layers)]
        # Newer transformers write RoPE settings as one dict; fold it into the classic two fields.
        params = data.pop("rope_parameters", None)
        if isinstance(params, dict) and isinstance(params.get("full_attention"), dict):
            # Per layer type (Gemma 3): full-attention layers carry the scaling, sliding ones only a base.
            local = params.get("sliding_attention") or {}
            if local.get("rope_type", local.get("type", "default")) != "default":
                raise ConfigError(f"RoPE scaling on sliding-window layers is not supported: {local!r}")
            if "rope_theta" in local:
                data["rope_local_base_freq"] = local["rope_theta"]
            params = params["full_attention"]
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
        for name in _OPTIONAL_FIELDS:
            if out[name] is None:
                del out[name]
        if self.model_type == "gemma3_text":
            out["hidden_activation"] = out.pop("hidden_act")
            out["rope_parameters"] = {
                "full_attention": {"rope_type": "default", **(self.rope_scaling or {}), "rope_theta": self.rope_theta},
                "sliding_attention": {"rope_type": "default", "rope_theta": self.rope_local_base_freq},
            }
            del out["rope_theta"], out["rope_scaling"], out["rope_local_base_freq"]
        out["architectures"] = [ARCH_CLASS[self.model_type]]
        return out


ARCH_CLASS = {"qwen3": "Qwen3ForCausalLM", "qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM",
              "gemma3_text": "Gemma3ForCausalLM"}


def _preset(**kw: Any) -> ModelConfig:
    return ModelConfig(**copy.deepcopy(kw))  # a config of its own: editing it leaves PRESETS alone


# Qwen3's pretraining sequence length (YaRN's original_max_position_embeddings) and the positions its
# config.json serves with plain RoPE (32K prompt + 8K output). QwenLM/Qwen3 docs, "Enabling Long Context".
QWEN3_NATIVE_CONTEXT = 32_768
QWEN3_PLAIN_ROPE_POSITIONS = 40_960


def rope_scaling_for_window(window: int, native: int = QWEN3_NATIVE_CONTEXT,
                            plain_limit: int = QWEN3_PLAIN_ROPE_POSITIONS) -> dict[str, Any] | None:
    """The RoPE scaling a model pretrained on `native` tokens needs for a `window`-token context.

    None (plain RoPE) up to `plain_limit` positions; beyond it static YaRN with factor window / native,
    so that factor x native == window (see the module docstring for why).
    """
    if not isinstance(window, int) or isinstance(window, bool) or window <= 0:
        raise ConfigError(f"context window must be a positive integer, got {window!r}")
    if window <= plain_limit:
        return None
    return {"rope_type": "yarn", "factor": window / native, "original_max_position_embeddings": native}


# Each preset cites its source. zen-eco-4b is Qwen3-4B's shape (Qwen/Qwen3-4B config.json);
# the tiny ones exist so tests and benchmarks run in seconds.
# Qwen/Qwen3-4B config.json: 36 layers, hidden 2560, 32/8 heads, head_dim 128, ffn 9728,
# vocab 151936, rope_theta 1e6, tied embeddings, eps 1e-6, 40960 positions (32K usable context).
_ZEN_ECO_4B: dict[str, Any] = dict(
    model_type="qwen3", vocab_size=151936, hidden_size=2560, intermediate_size=9728,
    num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
    max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1_000_000.0,
    tie_word_embeddings=True, bos_token_id=151643, eos_token_id=[151645, 151643],
    torch_dtype="bfloat16",
)
# A 32K prompt plus the largest thinking budget (131,072 tokens, the engine's thinking_budget limit).
THINKING_WINDOW = QWEN3_NATIVE_CONTEXT + 131_072  # 163,840

PRESETS: dict[str, dict[str, Any]] = {
    "zen-eco-4b": _ZEN_ECO_4B,
    # The same weights' shape with positions for THINKING_WINDOW tokens: past 40,960, so by
    # rope_scaling_for_window YaRN is on, factor 163,840 / 32,768 = 5.0 over the 32K-trained base
    # (attention factor 0.1 ln 5 + 1 = 1.161). Same parameters; only RoPE and the window differ.
    "zen-eco-4b-thinking": {
        **_ZEN_ECO_4B, "max_position_embeddings": THINKING_WINDOW,
        "rope_scaling": rope_scaling_for_window(THINKING_WINDOW),
    },
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
