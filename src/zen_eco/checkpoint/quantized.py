"""Quantized checkpoints (written by `zen-eco quantize`): the format, and reading it back.

A Hugging Face directory whose linear layers are stored as codes + scales in a plain, portable
layout (not PyTorch's private packed one), described by `quantization_config` in config.json.
Format "zen-eco", version 1. P is a linear layer's Hugging Face name without ".weight"
(e.g. `model.layers.0.self_attn.q_proj`), N its output and K its input features:

    int4, asymmetric, groups of g input columns:
      P.qweight  uint8    (N, K/2)  two codes per byte: column 2j in the low nibble, 2j+1 in the high one
      P.scales   float16  (N, K/g)
      P.mins     float16  (N, K/g)  w[r, c] = scales[r, c // g] * code[r, c] + mins[r, c // g]
                                    (the kernels' form: (code - 8) * scale + zero, zero = min + 8 * scale)
    int8, symmetric, one scale per output row:
      P.qweight  int8     (N, K)
      P.scales   float16  (N,)      w[r, c] = scales[r] * qweight[r, c]

The output head is int8 whatever `bits` says; when it is tied, its table is the embedding, stored
once as `model.embed_tokens.qweight` + `.scales`. Every other tensor (an untied model's embedding,
norms, biases) keeps its name and dtype. config.json gains:

    "quantization_config": {"quant_method": "zen-eco", "version": 1, "bits": 4, "group_size": 32,
                            "symmetric": false, "scale_dtype": "float16",
                            "modules": ["model.layers.*.self_attn.q_proj", ...],  # at `bits`
                            "int8_modules": ["lm_head"]}  # the head: "model.embed_tokens" when tied

Loading one gives the same layers, bit for bit, as quantizing the original while loading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from ..errors import CheckpointError
from ..quant import GROUP_SIZES, SCALE_DTYPE, Q4Weight, Q8Weight, QuantSpec, unpack_nibbles

QUANT_METHOD = "zen-eco"
FORMAT_VERSION = 1
_SUFFIXES = (".qweight", ".scales", ".mins")


def quantization_config(spec: QuantSpec, modules: list[str], int8_modules: list[str]) -> dict[str, Any]:
    return {"quant_method": QUANT_METHOD, "version": FORMAT_VERSION, "bits": spec.bits,
            "group_size": spec.group_size, "symmetric": spec.bits == 8,
            "scale_dtype": str(SCALE_DTYPE).removeprefix("torch."), "modules": modules, "int8_modules": int8_modules}


def read_quantization(directory: Path) -> QuantSpec | None:
    """The QuantSpec a checkpoint directory was written with, None if it is not quantized."""
    try:
        qc = json.loads((directory / "config.json").read_text(encoding="utf-8")).get("quantization_config")
    except (OSError, ValueError, AttributeError):
        return None  # ModelConfig.from_file reports a missing or broken config.json
    if qc is None:
        return None
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    if method != QUANT_METHOD:
        raise CheckpointError(f"{directory}: quantization {method!r} is not supported; zen-eco loads "
                              f"checkpoints written by `zen-eco quantize` (quant_method {QUANT_METHOD!r})")
    if qc.get("version") != FORMAT_VERSION:
        raise CheckpointError(f"{directory}: zen-eco quantization version {qc.get('version')!r} is not "
                              f"supported; this zen-eco reads version {FORMAT_VERSION}")
    bits, group = qc.get("bits"), qc.get("group_size")
    if bits == 8 and group is None:
        return QuantSpec(8)
    if bits == 4 and group in GROUP_SIZES:
        return QuantSpec(4, group)
    raise CheckpointError(f"{directory}: quantization_config has bits={bits!r}, group_size={group!r}; "
                          f"supported: bits 8 (no group) or bits 4 with group_size in {GROUP_SIZES}")


class QuantizedSource:
    """A quantized directory's tensors under their float names: `get_quantized` gives the stored codes,
    `get`/`read` the dequantized float32 weight (quant="none")."""

    def __init__(self, inner, spec: QuantSpec) -> None:
        self.inner = inner
        self.spec = spec
        self.directory = inner.directory
        raw = self._raw = inner.names()
        self._quantized = {n.removesuffix(".qweight") + ".weight" for n in raw if n.endswith(".qweight")}
        self._names = {n for n in raw if not n.endswith(_SUFFIXES)} | self._quantized

    def names(self) -> set[str]:
        return set(self._names)

    def get_quantized(self, name: str) -> Q4Weight | Q8Weight | None:
        if name not in self._quantized:
            return None
        p = name.removesuffix(".weight")
        codes, scales = self.inner.read(p + ".qweight"), self.inner.read(p + ".scales")
        n = codes.shape[0] if codes.dim() == 2 else -1
        if codes.dtype == torch.int8 and (self.spec.bits == 8 or p in ("lm_head", "model.embed_tokens")):
            if tuple(scales.shape) != (n,) or not scales.is_floating_point():
                raise CheckpointError(f"{self.directory}: {p}.scales has shape {tuple(scales.shape)} {scales.dtype}, "
                                      f"int8 needs ({n},) float")
            return Q8Weight(codes, scales.float())
        if codes.dtype == torch.uint8 and self.spec.bits == 4:
            mins = self.inner.read(p + ".mins") if p + ".mins" in self._raw else None
            k, g = 2 * codes.shape[-1], self.spec.group_size
            if k % g:
                raise CheckpointError(f"{self.directory}: {p} has {k} input features, not a multiple of group size {g}")
            want = (n, k // g)
            for t, what in ((scales, "scales"), (mins, "mins")):
                if t is None or tuple(t.shape) != want or not t.is_floating_point() or n < 0:
                    got = "missing" if t is None else f"{tuple(t.shape)} {t.dtype}"
                    raise CheckpointError(f"{self.directory}: {p}.{what} is {got}; int4-g{self.spec.group_size} "
                                          f"codes of shape {tuple(codes.shape)} need {want} float")
            return Q4Weight(unpack_nibbles(codes), scales.float(), mins.float())
        raise CheckpointError(f"{self.directory}: {p}.qweight is {codes.dtype}, which a {self.spec.name} "
                              f"checkpoint does not store")

    def get(self, name: str) -> torch.Tensor:
        q = self.get_quantized(name)
        return self.inner.get(name) if q is None else q.dequantize()

    def read(self, name: str) -> torch.Tensor:
        q = self.get_quantized(name)
        return self.inner.read(name) if q is None else q.dequantize()

    def close(self) -> None:
        self.inner.close()
