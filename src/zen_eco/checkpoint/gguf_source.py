"""A GGUF file as a model: metadata -> ModelConfig, tensors -> Hugging Face-named torch tensors.

llama.cpp's converter reorders the rows of Q and K for the `llama` architecture (its RoPE pairs
adjacent dimensions, Hugging Face's pairs the two halves); we undo that here so one model and one
RoPE serve every source. qwen2/qwen3/gemma3 files use the half-split layout already.

gemma3: llama.cpp's converter stores every RMSNorm weight as 1 + w (its kernel multiplies by the
weight, Gemma's by 1 + w); we subtract the 1 again, as transformers does, so the tensors we hand out
are Hugging Face's. What llama.cpp hard-codes rather than writes into the file (the sliding-window
period 6, the local RoPE base 10000, the attention scale) we fill in the same way.
"""

from __future__ import annotations

from dataclasses import replace
from functools import partial
from pathlib import Path
from typing import Any

import torch

from .. import kquant_kernel, q4_kernel
from ..config import ModelConfig
from ..errors import CheckpointError, ConfigError
from ..quant import KQuantPacked, Q4Weight, Q8BlockWeight
from .gguf_file import GGUFFile
from .gguf_quants import (KQUANT_TYPES, Q4_TYPES, Q5_TYPES, Q8_BLOCK_TYPES, dequantize, q4_codes, q5_codes,
                          q8_block_codes)
from .names import gguf_to_hf, hf_to_gguf

# The engine layouts a GGUF matrix can load into as stored: (its types, their decoder, the weight).
PACKED = {
    "int4": (Q4_TYPES, q4_codes, Q4Weight),
    "int5": (Q5_TYPES + Q4_TYPES, q5_codes, partial(Q4Weight, bits=5)),
    "int8 blocks": (Q8_BLOCK_TYPES, q8_block_codes, Q8BlockWeight),
    # the K-quants as stored: read by get_kquant, straight into the kernel's buffers
    **{kind: ((t,), None, None) for kind, t in KQUANT_TYPES.items()},
}

SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3", "gemma3")
# GGUF general.architecture -> our model_type, where they differ.
MODEL_TYPES = {"gemma3": "gemma3_text"}
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
    gemma: dict[str, Any] = {}
    if arch == "gemma3":
        gemma = _gemma3_fields(md, hidden, heads)
    return ModelConfig(
        model_type=MODEL_TYPES.get(arch, arch),
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
        **gemma,
    )


def _gemma3_fields(md: dict[str, Any], hidden: int, heads: int) -> dict[str, Any]:
    """The Gemma 3 config fields, from the file where it has them and llama.cpp's constants where not."""
    layers = _get(md, "gemma3.block_count", int)
    head_dim = _get(md, "gemma3.attention.key_length", int, hidden // heads if heads else 0)
    pattern = _get(md, "gemma3.attention.sliding_window_pattern", (int, list), 6)
    if isinstance(pattern, list):  # newer converters: one flag per layer, true = sliding
        if len(pattern) != layers or not all(isinstance(p, bool) for p in pattern):
            raise CheckpointError(f"GGUF metadata 'gemma3.attention.sliding_window_pattern' is malformed: {pattern!r}")
        sliding = pattern
    else:
        if pattern <= 0:
            raise CheckpointError(f"GGUF metadata 'gemma3.attention.sliding_window_pattern' must be positive: {pattern}")
        sliding = [bool((i + 1) % pattern) for i in range(layers)]
    fields: dict[str, Any] = dict(
        hidden_act="gelu_pytorch_tanh",
        sliding_window=_get(md, "gemma3.attention.sliding_window", int),
        layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
        rope_local_base_freq=float(_get(md, "gemma3.rope.freq_base_swa", (int, float), 10_000.0)),
        # llama.cpp scales queries by 1/sqrt(head_dim), except for the 27B model (62 layers), whose
        # query_pre_attn_scalar is hidden_size / heads.
        query_pre_attn_scalar=hidden // heads if layers == 62 and heads else head_dim,
    )
    cap = _get(md, "gemma3.final_logit_softcapping", (int, float), None)
    if cap is not None:
        fields["final_logit_softcapping"] = float(cap)
    return fields


def _unpermute_index(rows: int, n_heads: int) -> torch.Tensor:
    """Row order undoing llama.cpp's Q/K permutation: per head, (pairs, 2) -> (2, pairs)."""
    return torch.arange(rows).view(n_heads, rows // n_heads // 2, 2).transpose(1, 2).reshape(rows)


class GGUFSource:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.file = GGUFFile(path)
        self.metadata = self.file.metadata
        self.config = config_from_gguf(self.metadata, self.file.tensors)
        self.model_type = self.config.model_type
        unknown = [n for n in self.file.tensors
                   if gguf_to_hf(n, self.model_type) is None and n not in IGNORED_TENSORS]
        if unknown:
            raise CheckpointError(f"{path}: tensors this architecture does not have, e.g. {unknown[0]!r}")

    def names(self) -> set[str]:
        return {hf for n in self.file.tensors if (hf := gguf_to_hf(n, self.model_type)) is not None}

    def _lookup(self, name: str):
        gname = hf_to_gguf(name, self.model_type)
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
        self.file.drop_pages(gname)  # copied out: the file's pages need not stay resident beside it
        if self.config.gemma_norms and gname.endswith("norm.weight"):
            w = w - 1.0  # stored as 1 + w (see the module docstring)
        order = self._row_order(gname, w.shape[0])
        return w if order is None else w[order]

    def stores_as(self, layout: str, name: str) -> bool:
        """Whether tensor `name` is a matrix whose stored type maps onto `layout` (a key of PACKED)."""
        _, info = self._lookup(name)
        return info.ggml_type in PACKED[layout][0] and len(info.shape) == 2

    def matrix_shape(self, name: str) -> tuple[int, ...]:
        """The tensor's shape (rows, columns for a matrix), as stored."""
        return tuple(int(d) for d in self._lookup(name)[1].shape)

    def get_packed(self, layout: str, name: str,
                   codes_out: torch.Tensor | None = None) -> Q4Weight | Q8BlockWeight | None:
        """The tensor in `layout` (PACKED: "int4" Q4_0/Q4_1/Q4_K codes; "int5" those and the Q5 types as
        5-bit codes; "int8 blocks" `q8_block_codes`' types as int8 with block scales; the K-quants as
        stored: `get_kquant`), or None where its
        type does not map onto it. codes_out: a contiguous CPU tensor of the layout's code dtype and the
        matrix's shape (rows of a fused matrix) that the codes are decoded into, and that the weight holds."""
        if not self.stores_as(layout, name):
            return None
        if layout in KQUANT_TYPES:
            raise ValueError(f"{layout} matrices load through get_kquant")
        gname, info = self._lookup(name)
        _, decode, weight = PACKED[layout]
        order = self._row_order(gname, info.shape[0])
        direct = codes_out is not None and order is None  # a row permutation decodes first, then copies
        arrays = decode(self.file.tensor_bytes(gname), info.ggml_type, info.shape, what=f"{self.path}: {gname}",
                        codes_out=codes_out.numpy() if direct else None)
        self.file.drop_pages(gname)
        q = weight(*(None if a is None else torch.from_numpy(a) for a in arrays))
        if direct:
            return replace(q, codes=codes_out)
        if order is not None:
            q = q.permute_rows(order)
        if codes_out is not None:
            codes_out.copy_(q.codes)
            q = replace(q, codes=codes_out)
        return q

    def direct_type(self, name: str) -> int | None:
        """The ggml type of matrix `name` where it is Q4_0 (2), Q4_1 (3) or Q8_0 (8): blocks `get_direct` packs."""
        _, info = self._lookup(name)
        return info.ggml_type if info.ggml_type in q4_kernel.GGUF_BLOCKS and len(info.shape) == 2 else None

    def get_direct(self, name: str, out: tuple[torch.Tensor, torch.Tensor]) -> None:
        """A Q4_0 / Q4_1 / Q8_0 matrix straight into our kernel's buffers (`q4_kernel.pack_blocks`, one C pass over
        the file's blocks): `out` rows to fill, of `q4_kernel.empty_packed`'s shapes."""
        gname, info = self._lookup(name)
        n, k = (int(d) for d in info.shape)
        order = self._row_order(gname, n)
        try:
            bufs = q4_kernel.pack_blocks(info.ggml_type, self.file.tensor_bytes(gname), n, k,
                                         out if order is None else None)
        except ValueError as exc:
            raise CheckpointError(f"{self.path}: {gname}: {exc}") from None
        self.file.drop_pages(gname)
        if order is not None:  # a row permutation: both buffers are one row per weight row
            for o, b in zip(out, bufs):
                o.copy_(b[order])

    def get_kquant(self, kind: str, name: str, out: tuple[torch.Tensor, ...] | None = None) -> KQuantPacked | None:
        """The tensor as stored in our K-quant kernel's buffers (`kquant_kernel.pack_blocks`, one C pass over
        the file's blocks), or None where it is not a `kind` ("q4_k", "q5_k", "q6_k") matrix. out: buffers
        to fill (a fused matrix's rows; see kquant_kernel.empty_buffers)."""
        if not self.stores_as(kind, name):
            return None
        gname, info = self._lookup(name)
        n, k = (int(d) for d in info.shape)
        order = self._row_order(gname, n)
        bufs = kquant_kernel.pack_blocks(kind, self.file.tensor_bytes(gname), n, k, out if order is None else None)
        self.file.drop_pages(gname)
        if order is not None:  # a row permutation: every buffer is one row per weight row
            bufs = tuple(b[order] for b in bufs)
            if out is not None:
                for o, b in zip(out, bufs):
                    o.copy_(b)
                bufs = out
        return KQuantPacked(kind, bufs)

    def close(self) -> None:
        self.file.close()
