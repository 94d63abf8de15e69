"""Open a checkpoint and turn its tensors into a ready `Transformer`.

The model is built on the meta device and each weight is assigned as it is converted, one layer at
a time, so peak memory stays near the final model size — also when quantizing while loading: each
matrix is read in float32, quantized and dropped before the next is read. Shapes are checked
against the config before anything is assigned: a checkpoint that lies about its shapes fails with
the tensor's name.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import Transformer
from ..quant import (Int8Embedding, KQuantPacked, Q4Packed, Q4Weight, Q8BlockWeight, Q8Packed, Q8Weight, QuantSpec,
                     int4_supported, parse_quant, quantized_linear)
from .. import kquant_kernel, q4_kernel
from .gguf_file import GGUF_MAGIC
from .gguf_quants import KQUANT_TYPES
from .names import internal_to_hf
from .quantized import QuantizedSource, read_quantization
from .resolve import resolve_model


class TensorSource(Protocol):
    def names(self) -> set[str]: ...
    def get(self, name: str) -> torch.Tensor: ...
    def close(self) -> None: ...


@dataclass
class Checkpoint:
    path: Path
    format: str  # "gguf" | "safetensors"
    config: ModelConfig
    source: TensorSource
    gguf_metadata: dict[str, Any] | None = None
    quantization: QuantSpec | None = None  # how a `zen-eco quantize` checkpoint stores its linears

    def tokenizer(self):
        from ..tokenizer import Tokenizer

        if self.gguf_metadata is not None:
            return Tokenizer.from_gguf_metadata(self.gguf_metadata)
        return Tokenizer.from_dir(self.path)

    def close(self) -> None:
        self.source.close()


def open_checkpoint(ref: str | os.PathLike | None) -> Checkpoint:
    path = resolve_model(ref)
    if path.is_dir():
        from .safetensors_dir import SafetensorsSource

        source = SafetensorsSource(path)  # first: a directory of pickles is refused as such
        config = ModelConfig.from_file(path / "config.json")
        spec = read_quantization(path)
        if spec is None:
            return Checkpoint(path, "safetensors", config, source)
        return Checkpoint(path, f"safetensors ({spec.name})", config, QuantizedSource(source, spec), quantization=spec)
    if not path.is_file():
        raise CheckpointError(f"{path} is neither a file nor a directory")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != GGUF_MAGIC:
        raise CheckpointError(
            f"{path} is not a GGUF file (starts with {magic!r}); pass a .gguf file or a Hugging Face directory"
        )
    from .gguf_source import GGUFSource

    source = GGUFSource(path)
    return Checkpoint(path, "gguf", source.config, source, source.metadata)


def _internal_tensors(config: ModelConfig):
    """Yield (internal name, HF names) for every tensor the model has, layer by layer."""
    table = internal_to_hf(config.model_type)
    for pattern, hf_patterns in table.items():
        if "{}" not in pattern:
            yield pattern, hf_patterns
    for layer in range(config.num_hidden_layers):
        for pattern, hf_patterns in table.items():
            if "{}" in pattern:
                yield pattern.format(layer), tuple(p.format(layer) for p in hf_patterns)


def load_weights(
    ckpt: Checkpoint,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = False,
    quant: str = "auto",
    packed_float32: bool = False,
) -> Transformer:
    """Build the model from `ckpt`.

    quant (see zen_eco.quant.QUANT_MODES):
      "auto"  a `zen-eco quantize` checkpoint loads as stored; a GGUF file's Q4_0/Q4_1/Q4_K layer matrices
              stay packed 4-bit, its Q5_0/Q5_1/Q5_K ones 5-bit (CPU), its Q8_0/Q3_K/Q2_K layer matrices (and
              Q6_K) and tied table int8 with their block scales (`Int8BlockLinear`), where our kernels run
              (CPU, bf16 activations; float32 ones too with `packed_float32`, see quant.int4_supported);
              where the CPU has AVX-512 VNNI or AVX2, Q4_K, Q5_K and Q6_K matrices (and a
              Q6_K table) as stored instead (`KQuantLinear`); a fused matrix whose parts' types share no
              layout (q, k Q4_K and v Q6_K) is a `StackedLinear` of each run of parts; everything else is
              `dtype`.
      "none"  every weight dequantized to `dtype`.
      "int8", "int4" (= "int4-g32"), "int4-g64", "int4-g128": the layers' linear matrices quantized
              while loading, an untied output head int8 (see QuantSpec). A quantized checkpoint only
              loads under its own spec (as stored) or "auto"/"none".
    Under "auto" and "none" the output head stays in `dtype`: in bf16 it is as fast as int8 here and
    keeps near-tied logits in order.
    """
    mode = parse_quant(quant)
    stored = ckpt.quantization
    if stored is not None and isinstance(mode, QuantSpec) and mode != stored:
        raise CheckpointError(f"{ckpt.path} is already quantized ({stored.name}); load it with quant "
                              f"'auto' (as stored) or 'none', not {quant!r}")
    config = ckpt.config
    device = torch.device(device)
    with torch.device("meta"), _no_random_init():
        model = Transformer(config)
    expected = dict(model.state_dict(keep_vars=True))
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    available = ckpt.source.names()
    table = dict(_internal_tensors(config))
    items = [(name, table[name]) for name in expected]  # KeyError = the name table misses a module: our bug
    gguf_packed = (mode == "auto" and hasattr(ckpt.source, "get_packed")
                   and int4_supported(device, dtype, packed_float32))
    use_stored = stored is not None and mode != "none"
    on_the_fly = mode if isinstance(mode, QuantSpec) and stored is None else None
    state: dict[str, torch.Tensor] = {}
    bar = _progress(progress, len(items), f"loading {ckpt.path.name}" + (f" as {mode.name}" if on_the_fly else ""))

    def read(name: str, hf_names: tuple[str, ...], to: torch.dtype = dtype, on: torch.device = device,
             owned: bool = False) -> torch.Tensor:
        absent = [h for h in hf_names if h not in available]
        if absent:
            raise CheckpointError(f"{ckpt.path}: tensor {absent[0]!r} is missing")
        parts = [ckpt.source.get(h) for h in hf_names]
        want = tuple(expected[name].shape)
        for hf_name, part, part_want in zip(hf_names, parts, _part_shapes(config, want, len(parts))):
            if tuple(part.shape) != part_want:  # each part on its own, before a fused cat can fail
                raise CheckpointError(
                    f"{ckpt.path}: {hf_name} has shape {tuple(part.shape)}, the config needs {part_want}"
                )
        if (owned or len(parts) > 1 or parts[0].dtype != to or on.type != "cpu") and hasattr(ckpt.source, "read"):
            # This tensor gets copied anyway: read it into owned memory instead of touching the mapping,
            # so the file's pages for it never become resident next to the copy.
            parts = [ckpt.source.read(h) for h in hf_names]
        tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
        if not tensor.is_floating_point():
            raise CheckpointError(f"{ckpt.path}: tensor {hf_names[0]!r} has non-float dtype {tensor.dtype}")
        return tensor.to(device=on, dtype=to)

    def quantized(name: str, hf_names: tuple[str, ...]) -> Q4Weight | Q8Weight | None:
        """This weight in its quantized form, or None if it stays float."""
        shape = tuple(expected[name].shape)
        if use_stored:
            return _stored_weight(ckpt, hf_names, shape)
        if gguf_packed and name.startswith("layers."):
            return (_packed_kquant(ckpt.source, hf_names, shape, available)
                    or _packed_q4(ckpt.source, hf_names, shape, available)
                    or _packed_q5(ckpt.source, hf_names, shape, available)
                    or _packed_stacked(ckpt.source, hf_names, shape, available)
                    or _packed_q8_blocks(ckpt.source, hf_names, shape, available))
        if gguf_packed and name == "embed.weight" and config.tie_word_embeddings:  # the tied table as stored
            return (_packed_kquant(ckpt.source, hf_names, shape, available)
                    or _packed_q8_blocks(ckpt.source, hf_names, shape, available))
        spec = (on_the_fly.for_weight(name, config.tie_word_embeddings, int8_head=device.type == "cpu")
                if on_the_fly is not None else None)
        if spec is None:
            return None
        w = read(name, hf_names, torch.float32, torch.device("cpu"), owned=True)  # checkpoint precision
        try:
            return spec.quantize(w)
        except ValueError as exc:
            raise CheckpointError(f"{ckpt.path}: cannot quantize {', '.join(hf_names)} {tuple(w.shape)} "
                                  f"to {spec.name}: {exc}") from None
        finally:
            del w
            release_freed_memory()

    try:
        for name, hf_names in items:
            bar.advance()
            if name in state:
                continue
            module_name, kind = name.rsplit(".", 1)
            weight = quantized(name, hf_names) if kind == "weight" and len(expected[name].shape) == 2 else None
            if isinstance(weight, Q8Weight) and module_name in ("embed", "lm_head") and device.type != "cpu":
                # a stored int8 head: float off the CPU, as for_weight(int8_head=False) decides
                state[name] = weight.dequantize().to(device, dtype)
                continue
            if weight is not None and module_name == "embed":  # a tied head's table, int8: one copy for both
                model.lm_head = quantized_linear(weight, None, dtype, device)
                model.embed = Int8Embedding(model.lm_head)
                state[name] = None
                continue
            if weight is not None:
                bias_name = module_name + ".bias"
                bias = read(bias_name, table[bias_name]) if bias_name in expected else None
                model.set_submodule(module_name, quantized_linear(weight, bias, dtype, device))
                state[bias_name] = state[name] = None  # done
                continue
            state[name] = read(name, hf_names)
    finally:
        bar.close()
    model.load_state_dict({k: v for k, v in state.items() if v is not None}, strict=False, assign=True)
    if config.tie_word_embeddings and not isinstance(model.embed, Int8Embedding):
        model.lm_head.weight = model.embed.weight
    for name, buffer in list(model.named_buffers(recurse=False)):  # RoPE frequencies (built on the CPU)
        setattr(model, name, buffer.to(device))
    leftover = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftover:
        raise CheckpointError(f"{ckpt.path}: no weights for {leftover[0]!r}")
    return model.eval()


def _stored_weight(ckpt: Checkpoint, hf_names: tuple[str, ...], shape: tuple[int, ...]) -> Q4Weight | Q8Weight | None:
    """The fused quantized weight of a `zen-eco quantize` checkpoint, or None where it stores floats."""
    parts = [ckpt.source.get_quantized(h) for h in hf_names]
    if all(p is None for p in parts):
        return None
    if (any(p is None for p in parts) or len({type(p) for p in parts}) > 1
            or len({getattr(p, "group_size", 0) for p in parts}) > 1):
        raise CheckpointError(f"{ckpt.path}: {', '.join(hf_names)} are not all stored alike")
    q = type(parts[0]).cat(parts)
    if tuple(q.codes.shape) != shape:
        raise CheckpointError(f"{ckpt.path}: {', '.join(hf_names)} hold {tuple(q.codes.shape)} codes, the config needs {shape}")
    return q


def _part_shapes(config: ModelConfig, want: tuple[int, ...], n: int) -> list[tuple[int, ...]]:
    """The shape each of the `n` Hugging Face tensors fused (along dim 0) into a `want`-shaped one must have."""
    if n == 1:
        return [want]
    if n == 3:  # q | k | v
        q, kv = config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim
        rows = (q, kv, kv)
    else:  # gate | up
        rows = (want[0] // n,) * n
    return [(r, *want[1:]) for r in rows]


def release_freed_memory() -> None:
    """Hand freed heap memory back to the OS (glibc's malloc_trim; a no-op elsewhere). glibc keeps
    freed blocks below its mmap threshold (which grows to 32 MB) in the heap, so the float
    temporaries of each quantized matrix would otherwise stay in RSS between the codes kept."""
    if _libc is not None:
        _libc.malloc_trim(0)


try:
    import ctypes

    _libc = ctypes.CDLL("libc.so.6")
    _libc.malloc_trim  # noqa: B018 - glibc only
except (OSError, AttributeError):
    _libc = None


@contextmanager
def _no_random_init():
    """Weights come from the checkpoint: skip drawing random ones. (On the meta device the first
    draw imports torch's Python reference kernels, which alone takes ~2 s of every load.)"""
    saved = {cls: cls.reset_parameters for cls in (nn.Linear, nn.Embedding)}
    for cls in saved:
        cls.reset_parameters = lambda self: None
    try:
        yield
    finally:
        for cls, reset in saved.items():
            cls.reset_parameters = reset


def _part_shapes_fit(source, hf_names, shape) -> list[tuple[int, ...]] | None:
    """The stored shapes of a fused matrix's parts, if they stack along rows into `shape` (else None)."""
    shapes = [source.matrix_shape(h) for h in hf_names]
    if sum(s[0] for s in shapes) != shape[0] or any(s[1:] != tuple(shape[1:]) for s in shapes):
        return None
    return shapes


def _packed(source, layout: str, cat, hf_names, shape, available):
    """The fused weight from every part in `layout` (`source.get_packed`), joined by `cat`, if each part's
    stored type maps onto it and the parts' shapes make the model's (both checked before any part is
    decoded). The parts' codes are decoded straight into their rows of the joined codes: joining them
    afterwards copied every code of a 4B model once more (~1.5-2 s of loading it)."""
    if any(h not in available or not source.stores_as(layout, h) for h in hf_names):
        return None
    shapes = _part_shapes_fit(source, hf_names, shape)
    if shapes is None:
        return None
    codes = torch.empty(shape, dtype=torch.int8 if layout == "int8 blocks" else torch.uint8)
    parts, at = [], 0
    for h, s in zip(hf_names, shapes):
        parts.append(source.get_packed(layout, h, codes_out=codes[at : at + s[0]]))
        at += s[0]
    return cat(parts, codes)


def _packed_q8_blocks(source, hf_names, shape, available) -> Q8BlockWeight | Q8Packed | None:
    """The fused weight as int8 blocks if every part's type maps onto them (`q8_block_codes`) and our
    kernel is built; all Q8_0: straight into its buffers (`_packed_direct`)."""
    if not q4_kernel.available():
        return None
    return (_packed_direct(source, hf_names, shape, available, (8,))
            or _packed(source, "int8 blocks", Q8BlockWeight.cat, hf_names, shape, available))


def _packed_stacked(source, hf_names, shape, available) -> list | None:
    """A fused matrix whose parts' types share no layout (Q4_K_M's q, k Q4_K next to v Q6_K: two K-quants
    as stored, or without their kernel 4-bit codes next to int8), as one weight per run of parts of the
    same family (`StackedLinear`): no part widens to another's layout. None where the parts share a family
    or some part maps onto none."""
    if not q4_kernel.available() or any(h not in available for h in hf_names):
        return None
    kquant = kquant_kernel.available()

    def family(h: str) -> str | None:
        stored = next((kind for kind in KQUANT_TYPES if kquant and source.stores_as(kind, h)), None)
        return stored or ("4/5-bit" if source.stores_as("int5", h) else "int8" if source.stores_as("int8 blocks", h)
                          else None)

    families = [family(h) for h in hf_names]
    if None in families or len(set(families)) == 1:
        return None
    shapes = _part_shapes_fit(source, hf_names, shape)
    if shapes is None:
        return None
    weights = []
    for _, run in groupby(range(len(hf_names)), key=lambda i: families[i]):
        run = list(run)
        names, rows = tuple(hf_names[i] for i in run), sum(shapes[i][0] for i in run)
        sub = (rows, *shape[1:])
        w = (_packed_kquant(source, names, sub, available) or _packed_q4(source, names, sub, available)
             or _packed_q5(source, names, sub, available) or _packed_q8_blocks(source, names, sub, available))
        if w is None:
            return None
        weights.append(w)
    return weights


def _packed_kquant(source, hf_names, shape, available) -> KQuantPacked | None:
    """The fused weight as stored if every part is one K-quant type (Q4_K, Q5_K or Q6_K) and our kernel for
    them is built (AVX-512 VNNI or AVX2; elsewhere Q4_K goes to int4, Q5_K to 5-bit codes, Q6_K to int8 blocks): each
    part's blocks packed straight into its rows of the fused buffers."""
    if not kquant_kernel.available() or any(h not in available for h in hf_names):
        return None
    kind = next((k for k in KQUANT_TYPES if source.stores_as(k, hf_names[0])), None)
    if kind is None or not all(source.stores_as(kind, h) for h in hf_names):
        return None
    shapes = _part_shapes_fit(source, hf_names, shape)
    if shapes is None or shape[1] % kquant_kernel.SUPER:
        return None
    bufs, at = kquant_kernel.empty_buffers(kind, *shape), 0
    for h, s in zip(hf_names, shapes):
        source.get_kquant(kind, h, out=tuple(b[at : at + s[0]] for b in bufs))
        at += s[0]
    return KQuantPacked(kind, bufs)


def _packed_q5(source, hf_names, shape, available) -> Q4Weight | None:
    """The fused weight with 5-bit codes if every part is stored as a Q5 type (or Q4, with some part
    Q5) in 32-column groups and our kernel is built (the only one that runs 5-bit codes)."""
    if not q4_kernel.available():
        return None
    return _packed(source, "int5", Q4Weight.cat, hf_names, shape, available)


def _packed_q4(source, hf_names, shape, available) -> Q4Weight | Q4Packed | None:
    """The fused 4-bit weight if every part is stored as Q4_0/Q4_1/Q4_K in groups of one size: where every part
    is Q4_0, or every part Q4_1, and our kernel is built, straight into its buffers (`_packed_direct`)."""
    direct = _packed_direct(source, hf_names, shape, available, (2, 3))
    if direct is not None:
        return direct
    cat = lambda parts, codes: Q4Weight.cat(parts, codes) if len({p.group_size for p in parts}) == 1 else None  # noqa: E731
    return _packed(source, "int4", cat, hf_names, shape, available)


def _packed_direct(source, hf_names, shape, available, types) -> Q4Packed | Q8Packed | None:
    """The fused weight in our kernel's buffers where every part is stored as one of `types` (ggml Q4_0 2, Q4_1 3,
    Q8_0 8), the same for all, and the kernel is built: each part's blocks packed straight into its rows, with no
    (N, K) codes in between (decoding a 4B Q4_0 file's codes to bytes and packing them again took ~5 of its 8 s
    of loading)."""
    if not q4_kernel.available() or any(h not in available for h in hf_names):
        return None
    kinds = {source.direct_type(h) for h in hf_names}
    shapes = _part_shapes_fit(source, hf_names, shape) if len(kinds) == 1 and kinds <= set(types) else None
    if shapes is None or shape[1] % q4_kernel.BLOCK:
        return None
    kind = kinds.pop()
    bufs, at = q4_kernel.empty_packed(kind, shape[0], shape[1]), 0
    for h, s in zip(hf_names, shapes):
        source.get_direct(h, out=tuple(b[at : at + s[0]] for b in bufs))
        at += s[0]
    return Q8Packed(*bufs) if kind == 8 else Q4Packed(*bufs)


class _progress:
    """A rich progress bar on stderr when asked for (and a no-op otherwise)."""

    def __init__(self, enabled: bool, total: int, label: str) -> None:
        self._bar = None
        if enabled:
            from rich.console import Console
            from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

            self._bar = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.percentage:>3.0f}%"),
                                 TimeElapsedColumn(), console=Console(stderr=True), transient=True)
            self._bar.start()
            self._task = self._bar.add_task(label, total=total)

    def advance(self) -> None:
        if self._bar is not None:
            self._bar.advance(self._task)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
