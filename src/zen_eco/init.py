"""`zen-eco init`: a random-initialised checkpoint of a preset, in Hugging Face format.

Weights are drawn layer by layer (normal, std 0.02 as transformers initialises; norms at 1) and
written in shards of at most ~2 GB, so a 4B model never needs more than one shard in memory.
Presets with Qwen3's vocabulary also get Qwen3's tokenizer files, so the directory loads and runs.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .api import DTYPES
from .config import ModelConfig, preset
from .errors import ZenError
from .tokenizer.qwen import qwen3_ranks_file, write_qwen3_tokenizer

QWEN3_PADDED_VOCAB = 151936  # Qwen3's embedding rows: 151,669 tokens padded up

SHARD_BYTES = 2 * 1024**3


def _hf_tensors(cfg, layer: int | None, gen: torch.Generator, dtype: torch.dtype):
    h, d, i = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d

    def normal(*shape):
        return (torch.randn(*shape, generator=gen) * 0.02).to(dtype)

    if layer is None:
        out = {"model.embed_tokens.weight": normal(cfg.vocab_size, h), "model.norm.weight": torch.ones(h, dtype=dtype)}
        if not cfg.tie_word_embeddings:
            out["lm_head.weight"] = normal(cfg.vocab_size, h)
        return out
    p = f"model.layers.{layer}."
    out = {
        p + "input_layernorm.weight": torch.ones(h, dtype=dtype),
        p + "post_attention_layernorm.weight": torch.ones(h, dtype=dtype),
        p + "self_attn.q_proj.weight": normal(q, h), p + "self_attn.k_proj.weight": normal(kv, h),
        p + "self_attn.v_proj.weight": normal(kv, h), p + "self_attn.o_proj.weight": normal(h, q),
        p + "mlp.gate_proj.weight": normal(i, h), p + "mlp.up_proj.weight": normal(i, h),
        p + "mlp.down_proj.weight": normal(h, i),
    }
    if cfg.qk_norm:
        out[p + "self_attn.q_norm.weight"] = torch.ones(d, dtype=dtype)
        out[p + "self_attn.k_norm.weight"] = torch.ones(d, dtype=dtype)
    if cfg.qkv_bias:
        for name, n in (("q", q), ("k", kv), ("v", kv)):
            out[p + f"self_attn.{name}_proj.bias"] = torch.zeros(n, dtype=dtype)
    if cfg.o_bias:
        out[p + "self_attn.o_proj.bias"] = torch.zeros(h, dtype=dtype)
    return out


def init_checkpoint(preset_name: str, output: str | Path, dtype: str = "bfloat16", seed: int = 0,
                    progress: bool = False) -> Path:
    from safetensors.torch import save_file

    from .checkpoint.load import _progress

    cfg = preset(preset_name)
    if dtype not in DTYPES:
        raise ZenError(f"unknown dtype {dtype!r}; use {', '.join(DTYPES)}")
    # Presets with Qwen3's (padded) vocabulary get Qwen3's tokenizer; find it before writing weights.
    qwen_vocab = cfg.vocab_size == QWEN3_PADDED_VOCAB
    if qwen_vocab:
        qwen3_ranks_file()
    torch_dtype = DTYPES[dtype]
    out = Path(output)
    if out.exists() and any(out.iterdir()):
        raise ZenError(f"{out} exists and is not empty; choose a new directory")
    out.mkdir(parents=True, exist_ok=True)
    gen = torch.Generator().manual_seed(seed)
    shards: list[dict[str, torch.Tensor]] = [{}]
    sizes = [0]
    weight_map: dict[str, str] = {}
    files: list[str] = []

    def flush():
        name = f"model-{len(files) + 1:05d}.safetensors"
        save_file(shards[-1], str(out / name), metadata={"format": "pt"})
        files.append(name)
        for k in shards[-1]:
            weight_map[k] = name
        shards[-1], sizes[-1] = {}, 0

    bar = _progress(progress, cfg.num_hidden_layers + 1, f"writing {preset_name}")
    try:
        for layer in [None, *range(cfg.num_hidden_layers)]:
            for name, t in _hf_tensors(cfg, layer, gen, torch_dtype).items():
                if sizes[-1] + t.nbytes > SHARD_BYTES and shards[-1]:
                    flush()
                shards[-1][name] = t
                sizes[-1] += t.nbytes
            bar.advance()
        flush()
    finally:
        bar.close()
    if len(files) == 1:
        (out / files[0]).rename(out / "model.safetensors")
    else:
        total = sum((out / f).stat().st_size for f in files)
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config = cfg.to_dict() | {"torch_dtype": dtype if dtype in ("float32", "bfloat16", "float16") else str(torch_dtype).split(".")[1]}
    (out / "config.json").write_text(json.dumps(config, indent=2))
    if qwen_vocab:
        write_qwen3_tokenizer(out)
        ids = {"bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id, "pad_token_id": 151643}
        (out / "generation_config.json").write_text(json.dumps(ids, indent=2))
    return out


def random_model(config: str | ModelConfig, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 seed: int = 0, quant: str = "none", kernel: bool | str = True):
    """A `Transformer` of a preset (or config) with random weights made directly on `device`, no
    checkpoint written: for benchmarks where writing and reading gigabytes would dominate (a lent GPU
    machine) and for tests. Weights as `init_checkpoint` draws them (normal, std 0.02; norms at their
    identity; biases 0), though not the same numbers. quant "int8" / "int4[-gN]": each layer matrix is
    quantized as soon as it is drawn, so one float matrix exists at a time; embeddings and the output
    head stay in `dtype`. kernel: as `quant.Int4Linear`'s (False: portable codes, dequantized per call)."""
    from torch import nn

    from .model import RMSNorm, Transformer
    from .quant import LAYER_LINEARS, QuantSpec, parse_quant, quantized_linear

    cfg = preset(config) if isinstance(config, str) else config
    device = torch.device(device)
    spec = parse_quant(quant)
    with torch.device("meta"):
        model = Transformer(cfg)
    gen = torch.Generator(device).manual_seed(seed)
    done: set[str] = set()
    for name, param in list(model.named_parameters()):
        if name in done:
            continue
        module_name, _, kind = name.rpartition(".")
        module = model.get_submodule(module_name)
        if isinstance(module, RMSNorm):
            value = torch.zeros if module.unit_offset else torch.ones
            module.weight = nn.Parameter(value(param.shape, dtype=dtype, device=device), requires_grad=False)
            continue
        if kind == "bias":
            setattr(module, kind, nn.Parameter(torch.zeros(param.shape, dtype=dtype, device=device), requires_grad=False))
            continue
        w = torch.randn(param.shape, generator=gen, device=device) * 0.02
        if isinstance(spec, QuantSpec) and module_name.split(".", 2)[-1] in LAYER_LINEARS:
            bias = None if module.bias is None else torch.zeros(module.out_features, dtype=dtype, device=device)
            model.set_submodule(module_name, quantized_linear(spec.quantize(w), bias, dtype, device, kernel))
            done.add(module_name + ".bias")
        else:
            setattr(module, kind, nn.Parameter(w.to(dtype), requires_grad=False))
        del w
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    for name, buffer in list(model.named_buffers(recurse=False)):  # RoPE frequencies (built on the CPU)
        setattr(model, name, buffer.to(device))
    return model.eval()
