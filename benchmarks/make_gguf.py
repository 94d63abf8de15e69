"""Write a random-initialised Zen-Eco model as a GGUF file that llama.cpp and zen-eco both load.

    python benchmarks/make_gguf.py --preset zen-eco-4b --type q8_0 -o /tmp/zen-eco-4b-q8_0.gguf [--seed 0]
    python benchmarks/make_gguf.py --preset zen-eco-4b --type q4_0 -o /tmp/zen-eco-4b-q4_0.gguf
    python benchmarks/make_gguf.py --preset zen-eco-4b --type q4_k_m -o /tmp/zen-eco-4b-q4_k_m.gguf   # needs llama-cpp-python
    python benchmarks/compare.py /tmp/zen-eco-4b-q8_0.gguf

Why: speed comparisons against llama.cpp need the real model's shape in a format both engines read,
and the trained weights are not needed to measure speed. This script writes a file with Zen-Eco's
exact shape (any qwen3 preset of `zen_eco.config`) and its real tokenizer, with weights drawn from
a fixed seed, so the same command always writes the same file.

What the file holds, all through gguf-py (the `gguf` package) as a library:
  * architecture "qwen3" with the hyperparameter keys llama.cpp reads for it, general.file_type and
    the quantization version;
  * the Qwen3 tokenizer zen-eco builds offline (`zen_eco.tokenizer.qwen`), as a byte-level BPE
    ("gpt2" model, "qwen2" pre-tokenizer): tokens in id order, padded to vocab_size with unused
    "[PADn]" entries, their types, the merges, bos/eos/pad ids, no BOS added, our chat template;
  * weights: matrices N(0, 0.02) (a typical initialiser scale, so activations stay finite through
    all layers), RMSNorm weights 1 + N(0, 0.1) in F32 (not exactly 1, so that a norm applied to the
    wrong tensor shows up in a logit comparison). Matrices are Q8_0 or Q4_0; with q4_0 the token
    embedding (also the output head: the presets tie them) stays Q8_0, because llama.cpp's own
    quantizer keeps that table at higher precision too (Q6_K, which gguf-py cannot write).
    q4_k_m and q5_k_m (llama.cpp's own mixes: Q4_K / Q5_K matrices, Q6_K for the table and for half of
    the v and down matrices), q2_k and q3_k_m (Q2_K / Q3_K matrices with some Q4_K / Q5_K) are written as Q8_0 first and then requantized by llama.cpp's quantizer
    (`llama_model_quantize` through llama-cpp-python, the optional extra), since gguf-py has no K-quant
    encoder: ~3 minutes more for zen-eco-4b on 2 cores.

Q/K row order: llama.cpp applies RoPE to qwen3 in the NEOX layout (dimension i pairs with i + d/2),
the same as Hugging Face, so its converter stores qwen3 Q/K rows unpermuted (it permutes only for
`llama`), and zen-eco's loader reads qwen3 rows as stored. We draw the rows directly in that layout.

Memory stays bounded: each tensor is drawn and quantized in chunks of rows and written right away
(the header is written first from the planned shapes), so at most one quantized tensor (the
embedding table, ~0.4 GB for zen-eco-4b at Q8_0) is held at a time: peak RSS stays under 1 GB.
On one core zen-eco-4b takes ~2 minutes: Q8_0 4.28 GB in 110 s, Q4_0 2.46 GB in 91 s.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import tokenizers

from zen_eco.config import ModelConfig, preset
from zen_eco.errors import ConfigError
from zen_eco.tokenizer.qwen import QWEN3_CHAT_TEMPLATE, qwen3_tokenizer

ARCH = gguf.MODEL_ARCH.QWEN3
ARCH_NAME = gguf.MODEL_ARCH_NAMES[ARCH]  # "qwen3"
Q = gguf.GGMLQuantizationType
# --type -> (type of the layer matrices, type of the embedding table, general.file_type)
WEIGHT_TYPES: dict[str, tuple[gguf.GGMLQuantizationType, gguf.GGMLQuantizationType, gguf.LlamaFileType]] = {
    "q8_0": (Q.Q8_0, Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "q4_0": (Q.Q4_0, Q.Q8_0, gguf.LlamaFileType.MOSTLY_Q4_0),
}
# --type -> llama.cpp's file type (llama_ftype), for the mixes its quantizer makes from the Q8_0 file
LLAMA_CPP_TYPES = {"q4_k_m": 15, "q5_k_m": 17, "q2_k": 10, "q3_k_m": 12}  # LLAMA_FTYPE_MOSTLY_Q4_K_M, _Q5_K_M, _Q2_K, _Q3_K_M
MATRIX_STD = 0.02
NORM_NOISE_STD = 0.1
CHUNK_ELEMENTS = 1 << 24  # 64 MiB of float32 drawn at a time
PAD_TOKEN = "<|endoftext|>"  # Qwen3's padding token


@dataclass(frozen=True)
class TensorPlan:
    """One tensor of the file: its GGUF name, numpy shape (rows = output features) and storage type."""

    name: str
    shape: tuple[int, ...]
    qtype: gguf.GGMLQuantizationType

    @property
    def is_norm(self) -> bool:
        return len(self.shape) == 1

    @property
    def stored_shape(self) -> tuple[int, ...]:
        """Shape of the array handed to the writer: bytes per row for quantized tensors."""
        if self.qtype == Q.F32:
            return self.shape
        return gguf.quants.quant_shape_to_byte_shape(self.shape, self.qtype)

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.stored_shape)) * (4 if self.qtype == Q.F32 else 1)


def _tensor_name(kind: gguf.MODEL_TENSOR, layer: int | None = None) -> str:
    if kind not in gguf.MODEL_TENSORS[ARCH]:
        raise AssertionError(f"gguf-py has no {kind.name} tensor for {ARCH_NAME}")
    base = gguf.TENSOR_NAMES[kind]
    return (base.format(bid=layer) if layer is not None else base) + ".weight"


def tensor_plan(cfg: ModelConfig, weight_type: str,
                overrides: dict[str, gguf.GGMLQuantizationType] | None = None) -> list[TensorPlan]:
    """Every tensor of a qwen3 model in file order: embedding, the layers, final norm, untied head.
    overrides: a storage type per kind of layer matrix ("attn_v", "ffn_up", ...: the GGUF name's middle
    part), for files that mix types within a fused matrix as llama.cpp's _M mixes do."""
    matrix_type, embed_type, _ = WEIGHT_TYPES[weight_type]
    overrides = overrides or {}
    T = gguf.MODEL_TENSOR
    h, d, ffn = cfg.hidden_size, cfg.head_dim, cfg.intermediate_size
    q_dim, kv_dim = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    plan = [TensorPlan(_tensor_name(T.TOKEN_EMBD), (cfg.vocab_size, h), embed_type)]
    for i in range(cfg.num_hidden_layers):
        layer = [
            (T.ATTN_NORM, (h,)), (T.ATTN_Q, (q_dim, h)), (T.ATTN_K, (kv_dim, h)), (T.ATTN_V, (kv_dim, h)),
            (T.ATTN_OUT, (h, q_dim)), (T.ATTN_Q_NORM, (d,)), (T.ATTN_K_NORM, (d,)), (T.FFN_NORM, (h,)),
            (T.FFN_GATE, (ffn, h)), (T.FFN_UP, (ffn, h)), (T.FFN_DOWN, (h, ffn)),
        ]
        plan += [TensorPlan(_tensor_name(kind, i), shape,
                            Q.F32 if len(shape) == 1 else overrides.get(_tensor_name(kind, i).split(".")[2], matrix_type))
                 for kind, shape in layer]
    plan.append(TensorPlan(_tensor_name(T.OUTPUT_NORM), (h,), Q.F32))
    if not cfg.tie_word_embeddings:
        plan.append(TensorPlan(_tensor_name(T.OUTPUT), (cfg.vocab_size, h), embed_type))
    return plan


# ---------------------------------------------------------------------------- weights


def _rng(seed: int, name: str) -> np.random.Generator:
    # One stream per tensor, keyed by its name: a tensor's values do not depend on the others.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def float_chunks(plan: TensorPlan, seed: int) -> Iterator[np.ndarray]:
    """The tensor's float32 values, a block of whole rows at a time."""
    rng = _rng(seed, plan.name)
    if plan.is_norm:
        yield (1.0 + NORM_NOISE_STD * rng.standard_normal(plan.shape, dtype=np.float32)).astype(np.float32)
        return
    rows, cols = plan.shape
    step = max(1, CHUNK_ELEMENTS // cols)
    for start in range(0, rows, step):
        chunk = rng.standard_normal((min(step, rows - start), cols), dtype=np.float32)
        chunk *= MATRIX_STD
        yield chunk


def stored_tensor(plan: TensorPlan, seed: int) -> np.ndarray:
    """The tensor as the file stores it: float32, or the quantized blocks as uint8 rows."""
    # Quantization works block by block within a row, so quantizing row chunks equals quantizing the whole.
    parts = [gguf.quants.quantize(chunk, plan.qtype) for chunk in float_chunks(plan, seed)]
    out = parts[0] if len(parts) == 1 else np.concatenate(parts)
    assert out.shape == plan.stored_shape and out.nbytes == plan.nbytes, (plan, out.shape)
    return out


# ---------------------------------------------------------------------------- metadata


def check_config(cfg: ModelConfig) -> None:
    if cfg.model_type != "qwen3":
        raise ValueError(f"only qwen3 configs can be written (llama.cpp arch {ARCH_NAME!r}); got {cfg.model_type!r}")
    if cfg.attention_bias or cfg.mlp_bias:
        raise ValueError("biases are not written; qwen3 configs have none")


def add_hyperparameters(writer: gguf.GGUFWriter, cfg: ModelConfig, weight_type: str, name: str) -> None:
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_key_length(cfg.head_dim)
    writer.add_value_length(cfg.head_dim)
    writer.add_rope_freq_base(cfg.rope_theta)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    if cfg.rope_scaling is not None:
        add_rope_scaling(writer, cfg.rope_scaling)
    writer.add_file_type(WEIGHT_TYPES[weight_type][2])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_rope_scaling(writer: gguf.GGUFWriter, scaling: dict[str, Any]) -> None:
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in ("yarn", "linear"):
        raise ValueError(f"rope scaling {kind!r} cannot be written; yarn and linear can")
    writer.add_rope_scaling_type(gguf.RopeScalingType(kind))
    writer.add_rope_scaling_factor(float(scaling["factor"]))
    if "original_max_position_embeddings" in scaling:
        writer.add_rope_scaling_orig_ctx_len(int(scaling["original_max_position_embeddings"]))


def vocab_entries(tok: tokenizers.Tokenizer, vocab_size: int) -> tuple[list[str], list[int]]:
    """Token strings (byte-level spelling) and GGUF token types for ids 0..vocab_size-1.

    Added tokens are CONTROL when special or spelled like a control token (<|...|>: Qwen3's
    fill-in-the-middle and repo markers are not special, but llama.cpp warns about and retypes
    control-looking tokens that are not CONTROL, so real Qwen3 GGUFs mark them CONTROL too), and
    USER_DEFINED otherwise (e.g. <think>: matched whole but printed as text). Ids past the tokenizer
    are "[PADn]" placeholders of type UNUSED: the embedding table has rows for them, no text does.
    """
    by_id = {i: t for t, i in tok.get_vocab(with_added_tokens=False).items()}
    added = tok.get_added_tokens_decoder()
    if max([*by_id, *added]) >= vocab_size:
        raise ValueError(f"the tokenizer has ids past vocab_size {vocab_size}")
    T = gguf.TokenType
    tokens: list[str] = []
    types: list[int] = []
    for i in range(vocab_size):
        if i in added:
            text = added[i].content
            tokens.append(text)
            control = added[i].special or (text.startswith("<|") and text.endswith("|>"))
            types.append(T.CONTROL if control else T.USER_DEFINED)
        elif i in by_id:
            tokens.append(by_id[i])
            types.append(T.NORMAL)
        else:
            tokens.append(f"[PAD{i}]")
            types.append(T.UNUSED)
    return tokens, types


def bpe_merges(tok: tokenizers.Tokenizer) -> list[str]:
    """The BPE model's merges as "left right" strings, in priority order."""
    merges = json.loads(tok.to_str())["model"]["merges"]
    out = [m if isinstance(m, str) else " ".join(m) for m in merges]  # older tokenizers wrote strings
    # Byte-level spellings never contain a plain space, so the one space separates the pair unambiguously.
    assert all(m.count(" ") == 1 for m in out)
    return out


def add_tokenizer(writer: gguf.GGUFWriter, cfg: ModelConfig, tok: tokenizers.Tokenizer) -> None:
    tokens, types = vocab_entries(tok, cfg.vocab_size)
    writer.add_tokenizer_model("gpt2")  # llama.cpp's name for byte-level BPE with a merge list
    writer.add_tokenizer_pre("qwen2")  # Qwen2/Qwen3's split regex (single digits)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(bpe_merges(tok))
    if cfg.bos_token_id is not None:
        writer.add_bos_token_id(cfg.bos_token_id)
    if cfg.eos_token_ids:
        writer.add_eos_token_id(cfg.eos_token_ids[0])  # <|im_end|>: the instruct model's end of turn
    pad = tok.token_to_id(PAD_TOKEN)
    if pad is not None:
        writer.add_pad_token_id(pad)
    writer.add_add_bos_token(False)  # Qwen3 prompts start without BOS
    writer.add_chat_template(QWEN3_CHAT_TEMPLATE)


# ---------------------------------------------------------------------------- writing


def write_gguf(cfg: ModelConfig, path: str | os.PathLike, weight_type: str = "q8_0", seed: int = 0,
               name: str = "zen-eco", on_tensor: Callable[[TensorPlan], None] | None = None,
               overrides: dict[str, gguf.GGMLQuantizationType] | None = None) -> Path:
    """Write `cfg` with random weights to `path` (via a temporary file, renamed when complete).

    on_tensor is called after each tensor is written (for progress display); overrides: see tensor_plan
    (gguf-py's types only)."""
    check_config(cfg)
    if weight_type in LLAMA_CPP_TYPES:
        if overrides:
            raise ValueError(f"{weight_type} is llama.cpp's own mix: no per-matrix overrides")
        return _requantize(cfg, Path(path), weight_type, seed, name, on_tensor)
    if weight_type not in WEIGHT_TYPES:
        raise ValueError(f"unknown type {weight_type!r}; use one of {', '.join([*WEIGHT_TYPES, *LLAMA_CPP_TYPES])}")
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    plan = tensor_plan(cfg, weight_type, overrides)
    writer = gguf.GGUFWriter(partial, ARCH_NAME)
    try:
        add_hyperparameters(writer, cfg, weight_type, f"{name} (random init, seed {seed}, {weight_type})")
        add_tokenizer(writer, cfg, qwen3_tokenizer())
        for t in plan:
            stored = np.dtype(np.float32 if t.qtype == Q.F32 else np.uint8)
            writer.add_tensor_info(t.name, t.stored_shape, stored, t.nbytes, raw_dtype=t.qtype)
        # Header, metadata and tensor table first; then each tensor's data as soon as it exists.
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in plan:
            writer.write_tensor_data(stored_tensor(t, seed))
            if on_tensor is not None:
                on_tensor(t)
    except BaseException:
        writer.close()
        partial.unlink(missing_ok=True)
        raise
    writer.close()
    os.replace(partial, path)
    return path


def _requantize(cfg: ModelConfig, path: Path, weight_type: str, seed: int, name: str,
                on_tensor: Callable[[TensorPlan], None] | None) -> Path:
    """The Q8_0 file, then llama.cpp's quantizer to `weight_type` (one of LLAMA_CPP_TYPES)."""
    try:
        import llama_cpp
    except ImportError:
        raise ValueError(f"--type {weight_type} needs llama-cpp-python (pip install -e '.[llamacpp]'): "
                         "gguf-py cannot write K-quants") from None
    source = write_gguf(cfg, path.with_name(path.name + ".q8_0.partial"), "q8_0", seed, name, on_tensor)
    partial = path.with_name(path.name + ".partial")
    try:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = LLAMA_CPP_TYPES[weight_type]
        params.allow_requantize = True  # from Q8_0: the file's weights are random draws, not a trained model
        params.nthread = os.cpu_count() or 1
        if llama_cpp.llama_model_quantize(str(source).encode(), str(partial).encode(), params) != 0:
            raise ValueError(f"llama.cpp could not quantize {source} to {weight_type}")
        os.replace(partial, path)
    finally:
        source.unlink(missing_ok=True)
        partial.unlink(missing_ok=True)
    return path


def _progress_printer(plan: list[TensorPlan]) -> Callable[[TensorPlan], None]:
    """A callback printing one line per finished layer (and for the embedding and the head)."""
    total = sum(t.nbytes for t in plan)
    done = 0
    start = time.perf_counter()

    def report(t: TensorPlan) -> None:
        nonlocal done
        done += t.nbytes
        if t.name.startswith("blk.") and not t.name.endswith(".ffn_down.weight"):
            return
        label = t.name.rsplit(".", 2)[0] if t.name.startswith("blk.") else t.name
        elapsed = time.perf_counter() - start
        print(f"{label:<22} {done / 2**30:6.2f} / {total / 2**30:.2f} GiB  {100 * done / total:5.1f}%  "
              f"{elapsed:6.1f} s", file=sys.stderr, flush=True)

    return report


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="zen-eco-4b", help="a qwen3 preset of zen_eco.config (default zen-eco-4b)")
    ap.add_argument("--type", dest="weight_type", choices=sorted([*WEIGHT_TYPES, *LLAMA_CPP_TYPES]), default="q8_0")
    ap.add_argument("-o", "--output", required=True, type=Path)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    try:
        cfg = preset(args.preset)
        check_config(cfg)
        t0 = time.perf_counter()
        write_gguf(cfg, args.output, args.weight_type, args.seed, name=args.preset,
                   on_tensor=_progress_printer(tensor_plan(cfg, "q8_0" if args.weight_type in LLAMA_CPP_TYPES
                                                           else args.weight_type)))
    except (ValueError, ConfigError) as exc:
        raise SystemExit(f"error: {exc}") from None
    size = args.output.stat().st_size
    print(f"wrote {args.output}: {cfg.num_parameters() / 1e9:.2f} B parameters, {size / 1e9:.2f} GB, "
          f"{time.perf_counter() - t0:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
