"""Open a checkpoint and turn its tensors into a ready `Transformer`.

The model is built on the meta device and each weight is assigned as it is converted, one layer at
a time, so peak memory stays near the final model size. Shapes are checked against the config
before anything is assigned: a checkpoint that lies about its shapes fails with the tensor's name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

from ..config import ModelConfig
from ..errors import CheckpointError
from ..model import Transformer
from ..rope import rope_init
from .names import INTERNAL_TO_HF
from .resolve import resolve_model

GGUF_MAGIC = b"GGUF"


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

        config = ModelConfig.from_file(path / "config.json")
        return Checkpoint(path, "safetensors", config, SafetensorsSource(path))
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
    for pattern, hf_patterns in INTERNAL_TO_HF.items():
        if "{}" not in pattern:
            yield pattern, hf_patterns
    for layer in range(config.num_hidden_layers):
        for pattern, hf_patterns in INTERNAL_TO_HF.items():
            if "{}" in pattern:
                yield pattern.format(layer), tuple(p.format(layer) for p in hf_patterns)


def load_weights(
    ckpt: Checkpoint,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    progress: bool = False,
) -> Transformer:
    config = ckpt.config
    with torch.device("meta"):
        model = Transformer(config)
    expected = dict(model.state_dict(keep_vars=True))
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    available = ckpt.source.names()
    table = dict(_internal_tensors(config))
    items = [(name, table[name]) for name in expected]  # KeyError = the name table misses a module: our bug
    state: dict[str, torch.Tensor] = {}
    bar = _progress(progress, len(items), f"loading {ckpt.path.name}")
    try:
        for name, hf_names in items:
            absent = [h for h in hf_names if h not in available]
            if absent:
                raise CheckpointError(f"{ckpt.path}: tensor {absent[0]!r} is missing")
            parts = [ckpt.source.get(h) for h in hf_names]
            tensor = parts[0] if len(parts) == 1 else torch.cat(parts, dim=0)
            want = tuple(expected[name].shape)
            if tuple(tensor.shape) != want:
                raise CheckpointError(
                    f"{ckpt.path}: {' + '.join(hf_names)} has shape {tuple(tensor.shape)}, the config needs {want}"
                )
            if not tensor.is_floating_point():
                raise CheckpointError(f"{ckpt.path}: tensor {hf_names[0]!r} has non-float dtype {tensor.dtype}")
            state[name] = tensor.to(device=device, dtype=dtype)
            bar.advance()
    finally:
        bar.close()
    model.load_state_dict(state, strict=False, assign=True)
    if config.tie_word_embeddings:
        model.lm_head.weight = model.embed.weight
    inv_freq, model.attention_scaling = rope_init(config)
    model.inv_freq = inv_freq.to(device)
    leftover = [n for n, p in model.named_parameters() if p.is_meta]
    if leftover:
        raise CheckpointError(f"{ckpt.path}: no weights for {leftover[0]!r}")
    return model.eval()


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
