"""`zen-eco quantize`: write a weight-only INT8 / INT4 checkpoint of a Hugging Face directory.

The output is a Hugging Face directory in the format `checkpoint/quantized.py` describes (codes +
float16 scales in safetensors, `quantization_config` in config.json), with the tokenizer files
copied, and it loads without re-quantizing: the same layers, bit for bit, as `--quant` on the
original. Tensors are read one at a time into owned memory and a matrix is float32 only while it is
quantized, so memory holds the quantized output (one shard at most) and one float matrix.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from .checkpoint import open_checkpoint
from .checkpoint.load import _internal_tensors, _progress, release_freed_memory
from .checkpoint.names import internal_to_hf
from .checkpoint.quantized import quantization_config
from .checkpoint.safetensors_dir import INDEX_FILE, SafetensorsWriter
from .errors import CheckpointError
from .quant import LAYER_LINEARS, Q4Weight, QuantSpec, pack_nibbles, parse_quant

# Files a model directory needs besides its weights and config (tokenizer, chat template, generation defaults).
_COPIED = ("*.json", "*.jinja", "*.txt", "*.model", "*.tiktoken", "tokenizer*")
_NOT_COPIED = {"config.json", INDEX_FILE}


def quantize_checkpoint(model: str | os.PathLike | None, output: str | os.PathLike, to: str | QuantSpec,
                        group_size: int | None = None, progress: bool = False) -> Path:
    """Quantize `model` (a Hugging Face directory or Hub id) to `to` ("int8", "int4", "int4-g64", ...;
    `group_size` is the other spelling of the int4 group) and write it to `output`. Returns `output`."""
    spec = to if isinstance(to, QuantSpec) else parse_quant(to, group_size)
    if not isinstance(spec, QuantSpec):
        raise CheckpointError(f"cannot quantize to {to!r}; use int8, int4 (group 32), int4-g64 or int4-g128")
    out = Path(output)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise CheckpointError(f"{out} exists and is not empty; choose a new directory")
    ckpt = open_checkpoint(model)
    try:
        plan = _plan(ckpt, spec)
        created = not out.exists()
        out.mkdir(parents=True, exist_ok=True)
        try:
            _write(ckpt, spec, plan, out, progress)
        except BaseException:
            shutil.rmtree(out, ignore_errors=True)  # no half-written checkpoint left behind
            if not created:
                out.mkdir()
            raise
    finally:
        ckpt.close()
    return out


def _plan(ckpt, spec: QuantSpec) -> list[tuple[str, QuantSpec | None]]:
    """(HF tensor name, the spec it is quantized with or None) for every tensor to write, layer by layer;
    refuses what cannot be quantized before anything is written."""
    if ckpt.format == "gguf":
        raise CheckpointError(f"{ckpt.path} is a GGUF file; `zen-eco quantize` reads Hugging Face directories "
                              f"(load a GGUF with --quant int8|int4 instead)")
    if ckpt.quantization is not None:
        raise CheckpointError(f"{ckpt.path} is already quantized ({ckpt.quantization.name}); quantize the original")
    config, available = ckpt.config, ckpt.source.names()
    plan: list[tuple[str, QuantSpec | None]] = []
    for internal, hf_names in _internal_tensors(config):
        if internal == "lm_head.weight" and config.tie_word_embeddings:
            continue  # the embedding serves as the head
        tensor_spec = spec.for_weight(internal, config.tie_word_embeddings)
        for name in hf_names:
            if name not in available:
                if tensor_spec is not None or internal in ("embed.weight", "norm.weight"):
                    raise CheckpointError(f"{ckpt.path}: tensor {name!r} is missing")
                continue  # a bias or norm this architecture does not have
            if tensor_spec is not None:
                shape = tuple(ckpt.source.get(name).shape)  # memory-mapped: reads the header only
                k = shape[-1]
                if len(shape) != 2 or tensor_spec.group_size and k % tensor_spec.group_size:
                    raise CheckpointError(f"{ckpt.path}: {name} {shape} cannot be quantized to {tensor_spec.name}: "
                                          f"the group size must divide its {k} input features")
            plan.append((name, tensor_spec))
    return plan


def _write(ckpt, spec: QuantSpec, plan, out: Path, progress: bool) -> None:
    writer = SafetensorsWriter(out)
    bar = _progress(progress, len(plan), f"quantizing {ckpt.path.name} to {spec.name}")
    try:
        for name, tensor_spec in plan:
            tensor = ckpt.source.read(name)  # owned memory: the mapped file pages stay untouched
            if tensor_spec is None:
                writer.add(name, tensor)
            else:
                prefix = name.removesuffix(".weight")
                try:
                    q = tensor_spec.quantize(tensor)
                except ValueError as exc:
                    raise CheckpointError(f"{ckpt.path}: cannot quantize {name}: {exc}") from None
                del tensor
                release_freed_memory()
                if isinstance(q, Q4Weight):
                    writer.add(prefix + ".qweight", pack_nibbles(q.codes))
                    writer.add(prefix + ".mins", q.offset.half())
                else:
                    writer.add(prefix + ".qweight", q.codes)
                writer.add(prefix + ".scales", q.scale.half())
            bar.advance()
        writer.close()
    finally:
        bar.close()
    raw = json.loads((ckpt.path / "config.json").read_text(encoding="utf-8"))
    table = internal_to_hf(ckpt.config.model_type)
    modules = [h.format("*").removesuffix(".weight") for m in LAYER_LINEARS for h in table[f"layers.{{}}.{m}.weight"]]
    head = [name.removesuffix(".weight") for name, tensor_spec in plan  # the head's table, tied or not
            if tensor_spec is not None and name in ("lm_head.weight", "model.embed_tokens.weight")]
    raw["quantization_config"] = quantization_config(spec, modules, head)
    (out / "config.json").write_text(json.dumps(raw, indent=2))
    for pattern in _COPIED:
        for f in ckpt.path.glob(pattern):
            if f.is_file() and f.name not in _NOT_COPIED and not (out / f.name).exists():
                shutil.copy2(f, out / f.name)
