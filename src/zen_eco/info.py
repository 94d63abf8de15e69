"""`zen-eco info`: what a model or preset is, without loading its weights."""

from __future__ import annotations

from collections import Counter

from .config import PRESETS, ModelConfig, preset


def _window_lines(cfg: ModelConfig) -> list[str]:
    windows = [cfg.layer_window(i) for i in range(cfg.num_hidden_layers)]
    sliding = [w for w in windows if w is not None]
    if not sliding:
        return []
    return [f"sliding window    {sliding[0]} tokens in {len(sliding)} of {len(windows)} layers"]


def _rope_line(cfg: ModelConfig) -> str:
    """`theta 1e+06, default` or, when scaled, the type and its parameters as config.json spells them."""
    rope = dict(cfg.rope_scaling or {"rope_type": "default"})
    kind = rope.pop("rope_type", rope.pop("type", "default"))
    params = ", ".join(f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in rope.items())
    return f"theta {cfg.rope_theta:g}, {kind}" + (f" ({params})" if params else "")


def _config_lines(cfg: ModelConfig) -> list[str]:
    n = cfg.num_parameters()
    kv_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * cfg.head_dim * 2  # K and V, 2 bytes each
    return [
        f"architecture      {cfg.model_type}",
        f"parameters        {n:,} ({n / 1e9:.2f}B)",
        f"layers            {cfg.num_hidden_layers}",
        f"hidden size       {cfg.hidden_size}",
        f"ffn size          {cfg.intermediate_size}",
        f"attention heads   {cfg.num_attention_heads} query / {cfg.num_key_value_heads} key-value, head_dim {cfg.head_dim}",
        f"qk-norm           {cfg.qk_norm}",
        f"vocabulary        {cfg.vocab_size}",
        f"context           {cfg.max_position_embeddings}",
        f"rope              {_rope_line(cfg)}",
        f"tied embeddings   {cfg.tie_word_embeddings}",
        *_window_lines(cfg),
        f"kv cache / token  {kv_token:,} bytes in bf16",
        f"kv cache, full    {kv_token * cfg.max_position_embeddings / 1e9:.2f} GB in bf16 at {cfg.max_position_embeddings:,} tokens",
    ]


def describe(ref: str) -> str:
    if ref in PRESETS:
        return "\n".join([f"preset            {ref}"] + _config_lines(preset(ref)))
    from .checkpoint import open_checkpoint

    ckpt = open_checkpoint(ref)
    try:
        lines = [f"path              {ckpt.path}", f"format            {ckpt.format}"] + _config_lines(ckpt.config)
        if ckpt.gguf_metadata is not None:
            from .checkpoint.gguf_file import ggml_type_name as type_name

            types = Counter(type_name(t.ggml_type) for t in ckpt.source.file.tensors.values())
            lines.append("tensor types      " + ", ".join(f"{k} x{v}" for k, v in types.most_common()))
            name = ckpt.gguf_metadata.get("general.name")
            if name:
                lines.insert(0, f"name              {name}")
        try:
            tok = ckpt.tokenizer()
            lines.append(f"tokenizer         {tok.vocab_size} tokens, chat template: {'yes' if tok.chat_template else 'no'}")
        except Exception as exc:  # info still useful without a tokenizer
            lines.append(f"tokenizer         unavailable ({exc})")
        return "\n".join(lines)
    finally:
        ckpt.close()
