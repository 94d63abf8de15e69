"""Tensors from a Hugging Face checkpoint directory: config.json + *.safetensors (sharded or not).

`safetensors` validates each file's header and memory-maps it: `get()` returns tensors backed by
the file's pages, read on first touch. A tensor the loader changes anyway (fused with others, or
cast to another dtype) is instead `read()` with plain file I/O into memory it owns, so its mapped
pages are never touched and the process does not hold the same bytes twice (peak RSS ~ model size).
Pickle checkpoints (`pytorch_model.bin`) are refused: loading them can run arbitrary code.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import CheckpointError

INDEX_FILE = "model.safetensors.index.json"
_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
           "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
           "BOOL": torch.bool}


def _header(path: Path) -> tuple[dict, int]:
    """The JSON header and the offset where tensor data starts (safe_open has validated both)."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(size)), 8 + size


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
        self._headers: dict[str, tuple[dict, int]] = {}
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
            self._headers[name] = _header(path)
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

    def read(self, name: str) -> torch.Tensor:
        """The tensor in memory it owns, read with file I/O (its mapped pages stay untouched)."""
        shard = self._where.get(name)
        if shard is None:
            raise CheckpointError(f"tensor {name!r} is not in {self.directory}")
        header, base = self._headers[shard]
        info = header[name]
        dtype = _DTYPES.get(info["dtype"])
        if dtype is None:
            raise CheckpointError(f"tensor {name!r} has unsupported dtype {info['dtype']}; supported: {', '.join(_DTYPES)}")
        begin, end = info["data_offsets"]
        out = torch.empty(info["shape"], dtype=dtype)
        buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
        with open(self.directory / shard, "rb") as f:
            f.seek(base + begin)
            got = f.readinto(buf) if buf is not None else 0
        if got != end - begin:
            raise CheckpointError(f"{self.directory / shard}: tensor {name!r} is truncated ({got} of {end - begin} bytes)")
        return out

    def close(self) -> None:
        self._handles.clear()


class SafetensorsWriter:
    """Writes tensors in the order given into shards of at most `shard_bytes` (`model.safetensors` when
    one is enough, else `model-0000N.safetensors` + the index), so only one shard is ever in memory."""

    def __init__(self, directory: Path, shard_bytes: int = 2 * 1024**3) -> None:
        self.directory, self.shard_bytes = directory, shard_bytes
        self._shard: dict[str, torch.Tensor] = {}
        self._size = 0
        self._files: list[str] = []
        self._weight_map: dict[str, str] = {}

    def add(self, name: str, tensor: torch.Tensor) -> None:
        if self._shard and self._size + tensor.nbytes > self.shard_bytes:
            self._flush()
        self._shard[name] = tensor.contiguous()
        self._size += tensor.nbytes

    def _flush(self) -> None:
        from safetensors.torch import save_file

        name = f"model-{len(self._files) + 1:05d}.safetensors"
        save_file(self._shard, str(self.directory / name), metadata={"format": "pt"})
        self._files.append(name)
        self._weight_map.update(dict.fromkeys(self._shard, name))
        self._shard, self._size = {}, 0

    def close(self) -> None:
        self._flush()
        if len(self._files) == 1:
            (self.directory / self._files[0]).rename(self.directory / "model.safetensors")
            return
        total = sum((self.directory / f).stat().st_size for f in self._files)
        (self.directory / INDEX_FILE).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": self._weight_map}, indent=2))
