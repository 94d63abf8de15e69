"""The one name table: Hugging Face tensor names <-> GGUF tensor names <-> our module names.

`{}` stands for the layer index. Our model fuses q|k|v and gate|up, so one internal tensor can be
made of several Hugging Face tensors, concatenated along the output dimension in the listed order.

One table serves every architecture; `ARCH_OVERRIDES` lists where a family names things differently.
Gemma has a norm before and after both attention and the MLP: Hugging Face calls the one on
attention's output `post_attention_layernorm` (the name llama gives the norm *before* the MLP) and the
one before the MLP `pre_feedforward_layernorm`; llama.cpp keeps `ffn_norm` for the norm before the MLP
in both families and adds `post_attention_norm` / `post_ffw_norm` (names as in a llama.cpp gemma3 GGUF).
"""

from __future__ import annotations

# HF name -> GGUF name (llama.cpp's tensor naming).
HF_TO_GGUF: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{}.input_layernorm.weight": "blk.{}.attn_norm.weight",
    "model.layers.{}.self_attn.q_proj.weight": "blk.{}.attn_q.weight",
    "model.layers.{}.self_attn.k_proj.weight": "blk.{}.attn_k.weight",
    "model.layers.{}.self_attn.v_proj.weight": "blk.{}.attn_v.weight",
    "model.layers.{}.self_attn.q_proj.bias": "blk.{}.attn_q.bias",
    "model.layers.{}.self_attn.k_proj.bias": "blk.{}.attn_k.bias",
    "model.layers.{}.self_attn.v_proj.bias": "blk.{}.attn_v.bias",
    "model.layers.{}.self_attn.o_proj.weight": "blk.{}.attn_output.weight",
    "model.layers.{}.self_attn.o_proj.bias": "blk.{}.attn_output.bias",
    "model.layers.{}.self_attn.q_norm.weight": "blk.{}.attn_q_norm.weight",
    "model.layers.{}.self_attn.k_norm.weight": "blk.{}.attn_k_norm.weight",
    "model.layers.{}.post_attention_layernorm.weight": "blk.{}.ffn_norm.weight",
    "model.layers.{}.mlp.gate_proj.weight": "blk.{}.ffn_gate.weight",
    "model.layers.{}.mlp.up_proj.weight": "blk.{}.ffn_up.weight",
    "model.layers.{}.mlp.down_proj.weight": "blk.{}.ffn_down.weight",
    "model.layers.{}.mlp.gate_proj.bias": "blk.{}.ffn_gate.bias",
    "model.layers.{}.mlp.up_proj.bias": "blk.{}.ffn_up.bias",
    "model.layers.{}.mlp.down_proj.bias": "blk.{}.ffn_down.bias",
}

# internal name -> the HF names it is made of.
INTERNAL_TO_HF: dict[str, tuple[str, ...]] = {
    "embed.weight": ("model.embed_tokens.weight",),
    "norm.weight": ("model.norm.weight",),
    "lm_head.weight": ("lm_head.weight",),
    "layers.{}.attn_norm.weight": ("model.layers.{}.input_layernorm.weight",),
    "layers.{}.attn.wqkv.weight": tuple(f"model.layers.{{}}.self_attn.{p}_proj.weight" for p in "qkv"),
    "layers.{}.attn.wqkv.bias": tuple(f"model.layers.{{}}.self_attn.{p}_proj.bias" for p in "qkv"),
    "layers.{}.attn.wo.weight": ("model.layers.{}.self_attn.o_proj.weight",),
    "layers.{}.attn.wo.bias": ("model.layers.{}.self_attn.o_proj.bias",),
    "layers.{}.attn.q_norm.weight": ("model.layers.{}.self_attn.q_norm.weight",),
    "layers.{}.attn.k_norm.weight": ("model.layers.{}.self_attn.k_norm.weight",),
    "layers.{}.mlp_norm.weight": ("model.layers.{}.post_attention_layernorm.weight",),
    "layers.{}.mlp.w_gate_up.weight": ("model.layers.{}.mlp.gate_proj.weight", "model.layers.{}.mlp.up_proj.weight"),
    "layers.{}.mlp.w_gate_up.bias": ("model.layers.{}.mlp.gate_proj.bias", "model.layers.{}.mlp.up_proj.bias"),
    "layers.{}.mlp.w_down.weight": ("model.layers.{}.mlp.down_proj.weight",),
    "layers.{}.mlp.w_down.bias": ("model.layers.{}.mlp.down_proj.bias",),
}


# model_type -> (HF name -> GGUF name, internal name -> HF names) entries that replace or add to the
# tables above for that architecture.
ARCH_OVERRIDES: dict[str, tuple[dict[str, str], dict[str, tuple[str, ...]]]] = {
    "gemma3_text": (
        {
            "model.layers.{}.post_attention_layernorm.weight": "blk.{}.post_attention_norm.weight",
            "model.layers.{}.pre_feedforward_layernorm.weight": "blk.{}.ffn_norm.weight",
            "model.layers.{}.post_feedforward_layernorm.weight": "blk.{}.post_ffw_norm.weight",
        },
        {
            "layers.{}.mlp_norm.weight": ("model.layers.{}.pre_feedforward_layernorm.weight",),
            "layers.{}.attn_post_norm.weight": ("model.layers.{}.post_attention_layernorm.weight",),
            "layers.{}.mlp_post_norm.weight": ("model.layers.{}.post_feedforward_layernorm.weight",),
        },
    ),
}


def hf_to_gguf_table(model_type: str | None = None) -> dict[str, str]:
    """HF name -> GGUF name patterns for one architecture."""
    table = dict(HF_TO_GGUF)
    if model_type in ARCH_OVERRIDES:
        table.update(ARCH_OVERRIDES[model_type][0])
    return table


def internal_to_hf(model_type: str | None = None) -> dict[str, tuple[str, ...]]:
    """internal name -> HF name patterns for one architecture."""
    table = dict(INTERNAL_TO_HF)
    if model_type in ARCH_OVERRIDES:
        table.update(ARCH_OVERRIDES[model_type][1])
    return table


def layer_pattern(name: str) -> tuple[str, int | None]:
    """'model.layers.7.mlp.up_proj.weight' -> ('model.layers.{}.mlp.up_proj.weight', 7)."""
    parts = name.split(".")
    for i, part in enumerate(parts):
        if part.isdigit() and i > 0 and parts[i - 1] in ("layers", "blk"):
            parts[i] = "{}"
            return ".".join(parts), int(part)
    return name, None


_TABLES: dict[str | None, tuple[dict[str, str], dict[str, str]]] = {}


def _tables(model_type: str | None) -> tuple[dict[str, str], dict[str, str]]:
    if model_type not in _TABLES:
        forward = hf_to_gguf_table(model_type)
        backward = {v: k for k, v in forward.items()}
        assert len(backward) == len(forward), f"GGUF names for {model_type} are not one-to-one"
        _TABLES[model_type] = forward, backward
    return _TABLES[model_type]


def gguf_to_hf(name: str, model_type: str | None = None) -> str | None:
    pattern, layer = layer_pattern(name)
    hf = _tables(model_type)[1].get(pattern)
    if hf is None:
        return None
    return hf.format(layer) if layer is not None else hf


def hf_to_gguf(name: str, model_type: str | None = None) -> str | None:
    pattern, layer = layer_pattern(name)
    gg = _tables(model_type)[0].get(pattern)
    if gg is None:
        return None
    return gg.format(layer) if layer is not None else gg
