"""A GGUF file as a model: metadata -> ModelConfig, tensors -> Hugging Face-named torch tensors.

llama.cpp's converter reorders the rows of Q and K for the `llama` architecture (its RoPE pairs
adjacent dimensions, Hugging Face's pairs the two halves); we undo that here so one model and one
RoPE serve every source. qwen2/qwen3 files use the half-split layout already.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..quant import Q4Weight
from .gguf_file import GGUFFile
from .gguf_quants import Q4_TYPES, dequantize, q4_codes
from .names import gguf_to_hf, hf_to_gguf

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
# Tensors some converters add that our model derives itself.
IGNORED_TENSORS = ("rope_freqs.weight",)


def _get(md: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = ...) -> Any:
    if key not in md:
        if default is ...:
            raise CheckpointError(f"GGUF metadata lacks {key!r}")
        return default
    value = md[key]
    if not isinstance(value, kind) or isinstance(value, bool) and kind is not bool:
        raise CheckpointError(f"GGUF metadata {key!r} has the wrong type: {value!r}")
    return value


def config_from_gguf(md: dict[str, Any], tensors: dict[str, Any]) -> ModelConfig:
    arch = _get(md, "general.architecture", str)
    if arch not in SUPPORTED_ARCHITECTURES:
        raise ConfigError(f"unknown architecture {arch!r} in GGUF; supported: {', '.join(SUPPORTED_ARCHITECTURES)}")
    if "token_embd.weight" not in tensors:
        raise CheckpointError("GGUF has no token_embd.weight tensor")
    heads = _get(md, f"{arch}.attention.head_count", int)
    hidden = _get(md, f"{arch}.embedding_length", int)
    rope_scaling = None
    scaling_type = _get(md, f"{arch}.rope.scaling.type", str, "none")
    if scaling_type not in ("none", ""):
        rope_scaling = {"rope_type": scaling_type, "factor": float(_get(md, f"{arch}.rope.scaling.factor", (int, float)))}
        orig = _get(md, f"{arch}.rope.scaling.original_context_length", int, None)
        if orig is not None:
            rope_scaling["original_max_position_embeddings"] = orig
    eos = _get(md, "tokenizer.ggml.eos_token_id", int, None)
    return ModelConfig(
        model_type=arch,
        vocab_size=tensors["token_embd.weight"].shape[0],
        hidden_size=hidden,
        intermediate_size=_get(md, f"{arch}.feed_forward_length", int),
        num_hidden_layers=_get(md, f"{arch}.block_count", int),
        num_attention_heads=heads,
        num_key_value_heads=_get(md, f"{arch}.attention.head_count_kv", int, heads),
        head_dim=_get(md, f"{arch}.attention.key_length", int, hidden // heads if heads else 0),
        max_position_embeddings=_get(md, f"{arch}.context_length", int),
        rms_norm_eps=float(_get(md, f"{arch}.attention.layer_norm_rms_epsilon", (int, float))),
        rope_theta=float(_get(md, f"{arch}.rope.freq_base", (int, float), 10_000.0)),
        rope_scaling=rope_scaling,
        tie_word_embeddings="output.weight" not in tensors,
        attention_bias=arch != "qwen2" and "blk.0.attn_q.bias" in tensors,
        bos_token_id=_get(md, "tokenizer.ggml.bos_token_id", int, None),
        eos_token_id=eos,
    )


def _unpermute_index(rows: int, n_heads: int) -> torch.Tensor:
    """Row order undoing llama.cpp's Q/K permutation: per head, (pairs, 2) -> (2, pairs)."""
    return torch.arange(rows).view(n_heads, rows // n_heads // 2, 2).transpose(1, 2).reshape(rows)


class GGUFSource:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = GGUFFile(path)
        self.metadata = self.file.metadata
        self.config = config_from_gguf(self.metadata, self.file.tensors)
        unknown = [n for n in self.file.tensors if gguf_to_hf(n) is None and n not in IGNORED_TENSORS]
        if unknown:
            raise CheckpointError(f"{path}: tensors this architecture does not have, e.g. {unknown[0]!r}")

    def names(self) -> set[str]:
        return {hf for n in self.file.tensors if (hf := gguf_to_hf(n)) is not None}

    def _lookup(self, name: str):
        gname = hf_to_gguf(name)
        info = self.file.tensors.get(gname) if gname else None
        if info is None:
            raise CheckpointError(f"tensor {name!r} ({gname}) is not in {self.path}")
        return gname, info

    def _row_order(self, gname: str, rows: int) -> torch.Tensor | None:
        if self.config.model_type != "llama":
            return None
        if ".attn_q." in gname:
            return _unpermute_index(rows, self.config.num_attention_heads)
        if ".attn_k." in gname:
            return _unpermute_index(rows, self.config.num_key_value_heads)
        return None

    def get(self, name: str) -> torch.Tensor:
        gname, info = self._lookup(name)
        w = torch.from_numpy(dequantize(self.file.tensor_bytes(gname), info.ggml_type, info.shape,
                                        what=f"{self.path}: {gname}"))
        order = self._row_order(gname, w.shape[0])
        return w if order is None else w[order]

    def is_quantized(self, name: str) -> bool:
        """Whether the file stores this tensor in a quantized (not plain float) format."""
        return self._lookup(name)[1].ggml_type not in (0, 1, 30)  # F32, F16, BF16

    def get_q4(self, name: str) -> Q4Weight | None:
        """The tensor's 4-bit codes, scales and offsets if it is stored as Q4_0/Q4_1, else None."""
        gname, info = self._lookup(name)
        if info.ggml_type not in Q4_TYPES or len(info.shape) != 2:
            return None
        codes, scale, offset = q4_codes(self.file.tensor_bytes(gname), info.ggml_type, info.shape,
                                        what=f"{self.path}: {gname}")
        q = Q4Weight(torch.from_numpy(codes), torch.from_numpy(scale), torch.from_numpy(offset))
        order = self._row_order(gname, info.shape[0])
        return q if order is None else q.permute_rows(order)

    def close(self) -> None:
        self.file.close()
