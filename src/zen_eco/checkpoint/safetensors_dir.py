"""Tensors from a Hugging Face checkpoint directory: config.json + *.safetensors (sharded or not).

Files are memory-mapped by `safetensors`; nothing is read until a tensor is asked for. Pickle
checkpoints (`pytorch_model.bin`) are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"


class SafetensorsSource:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        index_path = directory / INDEX_FILE
        if index_path.exists():
            try:
                weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
                files = sorted(set(weight_map.values()))
            except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as exc:
                raise CheckpointError(f"{index_path} is not a valid safetensors index: {exc!r}") from None
        else:
            weight_map = None
            files = sorted(p.name for p in directory.glob("*.safetensors"))
        if not files:
            pickles = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt*")]
            hint = f" (found {', '.join(pickles)}: pickle checkpoints are not loaded, convert them to safetensors)" if pickles else ""
            raise CheckpointError(f"no *.safetensors files in {directory}{hint}")
        self._handles = {}
        self._where: dict[str, str] = {}
        for name in files:
            path = directory / name
            if not path.is_file():
                raise CheckpointError(f"{directory} lists shard {name!r}, which is missing")
            try:
                handle = safe_open(str(path), framework="pt")
                keys = list(handle.keys())
            except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
                raise CheckpointError(f"{path} is not a valid safetensors file: {exc}") from None
            self._handles[name] = handle
            for key in keys:
                self._where[key] = name
        if weight_map is not None:
            missing = [k for k, f in weight_map.items() if self._where.get(k) != f]
            if missing:
                raise CheckpointError(f"{index_path} lists {len(missing)} tensors not in their shard, e.g. {missing[0]!r}")

    def names(self) -> set[str]:
        return set(self._where)

    def get(self, name: str) -> torch.Tensor:
        try:
            return self._handles[self._where[name]].get_tensor(name)
        except KeyError:
            raise CheckpointError(f"tensor {name!r} is not in {self.directory}") from None
        except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
            raise CheckpointError(f"cannot read tensor {name!r} from {self.directory}: {exc}") from None

    def close(self) -> None:
        self._handles.clear()
