"""Read GGUF files (versions 2 and 3) as untrusted input.

A GGUF file is: magic "GGUF", version (u32), tensor count (u64), KV count (u64),
KV metadata, tensor infos, padding to `general.alignment`, then tensor data.
Everything is little-endian.

The file may be hostile: every count and length is checked against the bytes that
are actually left *before* anything is allocated for it, so a 40-byte file claiming
2^64 tensors is rejected in microseconds. Every problem raises `CheckpointError`
naming the file, the problem and the bad value; no other exception type escapes.
"""

from __future__ import annotations

import mmap
import os
import stat
import struct
from dataclasses import dataclass
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from zen_eco.errors import CheckpointError

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4  # GGML_MAX_DIMS
MAX_ARRAY_DEPTH = 4  # arrays of arrays of ...; real files use depth 1
_INT64_MAX = 2**63 - 1
# Smallest possible encodings, used to bound counts before allocating anything:
# a KV is at least key length (8) + value type (4); a tensor info at least
# name length (8) + n_dims (4) + one dim (8) + type (4).
_MIN_KV_BYTES = 12
_MIN_TENSOR_INFO_BYTES = 24


@dataclass(frozen=True)
class GGMLType:
    name: str
    block_size: int  # elements per block
    type_size: int  # bytes per block


# ggml_type -> layout. Every type gguf-py knows, so we can at least size (and
# skip) tensors we cannot dequantize; anything else is an unknown type.
GGML_TYPES: dict[int, GGMLType] = {
    0: GGMLType("F32", 1, 4),
    1: GGMLType("F16", 1, 2),
    2: GGMLType("Q4_0", 32, 18),
    3: GGMLType("Q4_1", 32, 20),
    6: GGMLType("Q5_0", 32, 22),
    7: GGMLType("Q5_1", 32, 24),
    8: GGMLType("Q8_0", 32, 34),
    9: GGMLType("Q8_1", 32, 40),
    10: GGMLType("Q2_K", 256, 84),
    11: GGMLType("Q3_K", 256, 110),
    12: GGMLType("Q4_K", 256, 144),
    13: GGMLType("Q5_K", 256, 176),
    14: GGMLType("Q6_K", 256, 210),
    15: GGMLType("Q8_K", 256, 292),
    16: GGMLType("IQ2_XXS", 256, 66),
    17: GGMLType("IQ2_XS", 256, 74),
    18: GGMLType("IQ3_XXS", 256, 98),
    19: GGMLType("IQ1_S", 256, 50),
    20: GGMLType("IQ4_NL", 32, 18),
    21: GGMLType("IQ3_S", 256, 110),
    22: GGMLType("IQ2_S", 256, 82),
    23: GGMLType("IQ4_XS", 256, 136),
    24: GGMLType("I8", 1, 1),
    25: GGMLType("I16", 1, 2),
    26: GGMLType("I32", 1, 4),
    27: GGMLType("I64", 1, 8),
    28: GGMLType("F64", 1, 8),
    29: GGMLType("IQ1_M", 256, 56),
    30: GGMLType("BF16", 1, 2),
    34: GGMLType("TQ1_0", 256, 54),
    35: GGMLType("TQ2_0", 256, 66),
    39: GGMLType("MXFP4", 32, 17),
    40: GGMLType("NVFP4", 64, 36),
    41: GGMLType("Q1_0", 128, 18),
}


def ggml_type_name(ggml_type: int) -> str:
    """Human name of a ggml type, e.g. 'Q4_1', or 'unknown(99)'."""
    t = GGML_TYPES.get(ggml_type)
    return t.name if t is not None else f"unknown({ggml_type})"


class ValueType(IntEnum):
    """GGUF metadata value types."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# Fixed-size value types: (struct for a single value, numpy dtype for arrays).
_SCALARS: dict[int, tuple[struct.Struct, np.dtype]] = {
    ValueType.UINT8: (struct.Struct("<B"), np.dtype("<u1")),
    ValueType.INT8: (struct.Struct("<b"), np.dtype("<i1")),
    ValueType.UINT16: (struct.Struct("<H"), np.dtype("<u2")),
    ValueType.INT16: (struct.Struct("<h"), np.dtype("<i2")),
    ValueType.UINT32: (struct.Struct("<I"), np.dtype("<u4")),
    ValueType.INT32: (struct.Struct("<i"), np.dtype("<i4")),
    ValueType.FLOAT32: (struct.Struct("<f"), np.dtype("<f4")),
    ValueType.BOOL: (struct.Struct("<B"), np.dtype("<u1")),
    ValueType.UINT64: (struct.Struct("<Q"), np.dtype("<u8")),
    ValueType.INT64: (struct.Struct("<q"), np.dtype("<i8")),
    ValueType.FLOAT64: (struct.Struct("<d"), np.dtype("<f8")),
}
_VALUE_TYPES = frozenset(int(t) for t in ValueType)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")

# --- Expected types of well-known keys -------------------------------------
# A value's signature is (value type, array element type or None). Keys whose
# first segment is "*" match any architecture prefix ("llama.block_count").
Signature = tuple[int, int | None]
_INTS = (ValueType.UINT8, ValueType.INT8, ValueType.UINT16, ValueType.INT16,
         ValueType.UINT32, ValueType.INT32, ValueType.UINT64, ValueType.INT64)
STRING: frozenset[Signature] = frozenset({(ValueType.STRING, None)})
UINT32: frozenset[Signature] = frozenset({(ValueType.UINT32, None)})
INTEGER: frozenset[Signature] = frozenset((t, None) for t in _INTS)
FLOAT: frozenset[Signature] = frozenset({(ValueType.FLOAT32, None), (ValueType.FLOAT64, None)})
BOOL: frozenset[Signature] = frozenset({(ValueType.BOOL, None)})
STRING_ARRAY: frozenset[Signature] = frozenset({(ValueType.ARRAY, ValueType.STRING)})
INTEGER_ARRAY: frozenset[Signature] = frozenset((ValueType.ARRAY, t) for t in _INTS)
FLOAT_ARRAY: frozenset[Signature] = frozenset(
    {(ValueType.ARRAY, ValueType.FLOAT32), (ValueType.ARRAY, ValueType.FLOAT64)})

EXPECTED_TYPES: dict[str, frozenset[Signature]] = {
    "general.architecture": STRING,
    "general.alignment": UINT32,
    "general.name": STRING,
    "general.file_type": INTEGER,
    "general.quantization_version": INTEGER,
    "*.context_length": INTEGER,
    "*.block_count": INTEGER,
    "*.embedding_length": INTEGER,
    "*.vocab_size": INTEGER,
    # Some architectures (OpenELM) store these per layer.
    "*.feed_forward_length": INTEGER | INTEGER_ARRAY,
    "*.attention.head_count": INTEGER | INTEGER_ARRAY,
    "*.attention.head_count_kv": INTEGER | INTEGER_ARRAY,
    "*.attention.key_length": INTEGER,
    "*.attention.value_length": INTEGER,
    "*.attention.layer_norm_rms_epsilon": FLOAT,
    "*.rope.dimension_count": INTEGER,
    "*.rope.freq_base": FLOAT,
    "tokenizer.ggml.model": STRING,
    "tokenizer.ggml.pre": STRING,
    "tokenizer.ggml.tokens": STRING_ARRAY,
    "tokenizer.ggml.merges": STRING_ARRAY,
    "tokenizer.ggml.token_type": INTEGER_ARRAY,
    "tokenizer.ggml.scores": FLOAT_ARRAY,
    "tokenizer.ggml.bos_token_id": INTEGER,
    "tokenizer.ggml.eos_token_id": INTEGER,
    "tokenizer.ggml.unknown_token_id": INTEGER,
    "tokenizer.ggml.padding_token_id": INTEGER,
    "tokenizer.ggml.add_bos_token": BOOL,
    "tokenizer.ggml.add_eos_token": BOOL,
    "tokenizer.chat_template": STRING,
}


def _expected_signatures(key: str) -> frozenset[Signature] | None:
    exact = EXPECTED_TYPES.get(key)
    if exact is not None:
        return exact
    arch, dot, rest = key.partition(".")
    return EXPECTED_TYPES.get("*." + rest) if dot and arch != "general" else None


def _signature_name(sig: Signature) -> str:
    vtype, elem = sig
    if elem is None:
        return ValueType(vtype).name.lower()
    return f"array[{ValueType(elem).name.lower()}]"


# --- Public types -----------------------------------------------------------


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy/PyTorch order: ggml's ne reversed, (rows, cols)
    ggml_type: int
    offset: int  # absolute byte offset in the file
    nbytes: int


class _Cursor:
    """Bounds-checked little-endian reads from a byte buffer."""

    def __init__(self, buf: mmap.mmap, size: int, path: Path) -> None:
        self.buf = buf
        self.size = size
        self.path = path
        self.pos = 0

    def fail(self, problem: str) -> CheckpointError:
        return CheckpointError(f"{self.path}: {problem}")

    def remaining(self) -> int:
        return self.size - self.pos

    def need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise self.fail(
                f"truncated: {what} at byte {self.pos} needs {n} bytes, "
                f"only {self.size - self.pos} left (file is {self.size} bytes)")

    def scalar(self, fmt: struct.Struct, what: str) -> Any:
        self.need(fmt.size, what)
        (value,) = fmt.unpack_from(self.buf, self.pos)
        self.pos += fmt.size
        return value

    def u32(self, what: str) -> int:
        return self.scalar(_U32, what)

    def u64(self, what: str) -> int:
        return self.scalar(_U64, what)

    def string(self, what: str) -> str:
        n = self.u64(f"length of {what}")
        if n > self.size - self.pos:
            raise self.fail(f"{what} at byte {self.pos - 8} has length {n}, "
                            f"but only {self.size - self.pos} bytes are left")
        raw = self.buf[self.pos:self.pos + n]
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise self.fail(f"{what} at byte {self.pos} is not valid UTF-8 "
                            f"({e.reason} at {e.start}: {raw[e.start:e.start + 4]!r})") from None
        self.pos += n
        return text

    def strings(self, count: int, what: str) -> list[str]:
        # Hot path for 150K-token vocabularies: one unpack, one slice, one decode
        # per element, locals only.
        buf, size, pos = self.buf, self.size, self.pos
        unpack = _U64.unpack_from
        out: list[str] = []
        append = out.append
        i = 0
        try:
            for i in range(count):
                if pos + 8 > size:
                    self.pos = pos
                    self.need(8, f"length of {what}[{i}]")
                (n,) = unpack(buf, pos)
                pos += 8
                if n > size - pos:
                    raise self.fail(f"{what}[{i}] at byte {pos - 8} has length {n}, "
                                    f"but only {size - pos} bytes are left")
                append(buf[pos:pos + n].decode("utf-8"))
                pos += n
        except UnicodeDecodeError as e:
            raise self.fail(f"{what}[{i}] at byte {pos} is not valid UTF-8 ({e.reason})") from None
        self.pos = pos
        return out


# --- Parsing ----------------------------------------------------------------


def _short(text: str, limit: int = 80) -> str:
    """repr() of a name read from the file, cut so a hostile 1 GB key can't flood a message."""
    r = repr(text)
    return r if len(r) <= limit else r[:limit] + "..."


def _read_value(cur: _Cursor, vtype: int, what: str, depth: int) -> Any:
    if vtype == ValueType.STRING:
        return cur.string(what)
    if vtype == ValueType.ARRAY:
        return _read_array(cur, what, depth + 1)
    fmt = _SCALARS[vtype][0]  # caller checked vtype is valid
    value = cur.scalar(fmt, what)
    if vtype == ValueType.BOOL:
        if value not in (0, 1):
            raise cur.fail(f"{what} is a bool with byte value {value} (must be 0 or 1)")
        return bool(value)
    return value


def _read_array(cur: _Cursor, what: str, depth: int) -> list[Any]:
    if depth > MAX_ARRAY_DEPTH:
        raise cur.fail(f"{what}: arrays nested deeper than {MAX_ARRAY_DEPTH} levels")
    etype = cur.u32(f"element type of {what}")
    if etype not in _VALUE_TYPES:
        raise cur.fail(f"{what}: invalid array element type {etype} (valid: 0..12)")
    count = cur.u64(f"length of {what}")
    if etype in _SCALARS:
        min_size = _SCALARS[etype][1].itemsize
    else:
        min_size = 8 if etype == ValueType.STRING else 12
    if count > cur.remaining() // min_size:
        raise cur.fail(f"{what}: array length {count} of {ValueType(etype).name.lower()} needs at "
                       f"least {count * min_size} bytes, only {cur.remaining()} left")
    if count == 0:
        return []
    if etype in _SCALARS:
        dtype = _SCALARS[etype][1]
        arr = np.frombuffer(cur.buf, dtype=dtype, count=count, offset=cur.pos)
        cur.pos += count * dtype.itemsize
        if etype == ValueType.BOOL:
            if int(arr.max()) > 1:
                raise cur.fail(f"{what}: bool array holds byte value {int(arr.max())} (must be 0 or 1)")
            arr = arr.astype(bool)
        values = arr.tolist()
        del arr  # drop the export of the mmap buffer so close() can unmap
        return values
    if etype == ValueType.STRING:
        return cur.strings(count, what)
    return [_read_array(cur, f"{what}[{i}]", depth + 1) for i in range(count)]


def _read_header(cur: _Cursor) -> tuple[int, int, int]:
    cur.need(4, "magic")
    magic = cur.buf[0:4]
    cur.pos = 4
    if magic != GGUF_MAGIC:
        raise cur.fail(f"not a GGUF file: magic is {magic!r}, expected {GGUF_MAGIC!r}")
    version = cur.u32("version")
    swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
    if version not in SUPPORTED_VERSIONS and swapped in (1, 2, 3):
        raise cur.fail(f"big-endian GGUF (version {swapped} byte-swapped) is not supported")
    if version == 1:
        raise cur.fail("GGUF version 1 is not supported (only versions 2 and 3)")
    if version not in SUPPORTED_VERSIONS:
        raise cur.fail(f"unsupported GGUF version {version} (supported: 2, 3)")
    tensor_count = cur.u64("tensor count")
    kv_count = cur.u64("metadata KV count")
    # Bound the counts by what the rest of the file could hold, before any loop.
    left = cur.remaining()
    if kv_count > left // _MIN_KV_BYTES:
        raise cur.fail(f"metadata KV count {kv_count} cannot fit in the {left} bytes left")
    if tensor_count > left // _MIN_TENSOR_INFO_BYTES:
        raise cur.fail(f"tensor count {tensor_count} cannot fit in the {left} bytes left")
    if kv_count * _MIN_KV_BYTES + tensor_count * _MIN_TENSOR_INFO_BYTES > left:
        raise cur.fail(f"{kv_count} KVs and {tensor_count} tensor infos cannot fit "
                       f"in the {left} bytes left")
    return version, tensor_count, kv_count


def _read_metadata(cur: _Cursor, kv_count: int) -> tuple[dict[str, Any], dict[str, Signature]]:
    metadata: dict[str, Any] = {}
    signatures: dict[str, Signature] = {}
    for i in range(kv_count):
        key_pos = cur.pos
        key = cur.string(f"metadata key #{i}")
        k = _short(key)
        if key in metadata:
            raise cur.fail(f"duplicate metadata key {k} at byte {key_pos}")
        vtype = cur.u32(f"value type of {k}")
        if vtype not in _VALUE_TYPES:
            raise cur.fail(f"metadata {k} has invalid value type {vtype} (valid: 0..12)")
        elem = None
        if vtype == ValueType.ARRAY:
            # Peek the element type: it is part of the signature checked below.
            cur.need(4, f"element type of {k}")
            elem = _U32.unpack_from(cur.buf, cur.pos)[0]
            if elem not in _VALUE_TYPES:
                raise cur.fail(f"metadata {k}: invalid array element type {elem} (valid: 0..12)")
        sig: Signature = (vtype, elem)
        expected = _expected_signatures(key)
        if expected is not None and sig not in expected:
            allowed = " or ".join(sorted(_signature_name(s) for s in expected))
            raise cur.fail(f"metadata {k} has type {_signature_name(sig)}, expected {allowed}")
        metadata[key] = _read_value(cur, vtype, f"metadata {k}", depth=0)
        signatures[key] = sig
    return metadata, signatures


def _read_alignment(cur: _Cursor, metadata: dict[str, Any]) -> int:
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    # Type (uint32) was checked against EXPECTED_TYPES while reading.
    if alignment <= 0 or alignment & (alignment - 1):
        raise cur.fail(f"general.alignment is {alignment}, must be a power of two > 0")
    return alignment


def _read_tensor_info(cur: _Cursor, index: int, alignment: int) -> tuple[str, tuple[int, ...], int, int, int]:
    """One tensor info -> (name, shape, ggml_type, offset relative to data section, nbytes)."""
    name = cur.string(f"name of tensor #{index}")
    n = _short(name)
    if not name:
        raise cur.fail(f"tensor #{index} has an empty name")
    n_dims = cur.u32(f"n_dims of tensor {n}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise cur.fail(f"tensor {n} has n_dims {n_dims} (must be 1..{MAX_DIMS})")
    ne = [cur.u64(f"dim {d} of tensor {n}") for d in range(n_dims)]
    n_elements = 1
    for d, dim in enumerate(ne):
        if dim == 0 or dim > _INT64_MAX:  # ggml reads ne as int64: >= 2^63 is negative
            shown = dim if dim <= _INT64_MAX else dim - 2**64
            raise cur.fail(f"tensor {n} has dim {d} = {shown} (must be > 0)")
        n_elements *= dim
        if n_elements > _INT64_MAX:
            raise cur.fail(f"tensor {n} has dims {ne} whose product overflows int64")
    ggml_type = cur.u32(f"type of tensor {n}")
    layout = GGML_TYPES.get(ggml_type)
    if layout is None:
        raise cur.fail(f"tensor {n} has unknown ggml type {ggml_type}")
    if ne[0] % layout.block_size:
        raise cur.fail(f"tensor {n} ({layout.name}) has row length ne[0]={ne[0]}, "
                       f"not a multiple of the block size {layout.block_size}")
    nbytes = n_elements // layout.block_size * layout.type_size
    if nbytes > cur.size:
        raise cur.fail(f"tensor {n} with dims {ne} ({layout.name}) needs {nbytes} bytes, "
                       f"more than the whole file ({cur.size} bytes)")
    offset = cur.u64(f"data offset of tensor {n}")
    if offset % alignment:
        raise cur.fail(f"tensor {n} has data offset {offset}, "
                       f"not a multiple of the alignment {alignment}")
    return name, tuple(reversed(ne)), ggml_type, offset, nbytes


def _place_tensors(cur: _Cursor, infos: list[tuple[str, tuple[int, ...], int, int, int]],
                   data_start: int) -> dict[str, TensorInfo]:
    """Turn relative offsets absolute; check every tensor lies inside the file, no overlaps."""
    tensors: dict[str, TensorInfo] = {}
    for name, shape, ggml_type, rel, nbytes in infos:
        start = data_start + rel
        if start + nbytes > cur.size:
            raise cur.fail(f"tensor {_short(name)} data [{start}, {start + nbytes}) runs past the end "
                           f"of the file ({cur.size} bytes)")
        tensors[name] = TensorInfo(name, shape, ggml_type, start, nbytes)
    prev: TensorInfo | None = None
    for t in sorted(tensors.values(), key=lambda t: t.offset):
        if prev is not None and t.offset < prev.offset + prev.nbytes:
            raise cur.fail(f"tensor {_short(t.name)} data at byte {t.offset} overlaps tensor "
                           f"{_short(prev.name)} [{prev.offset}, {prev.offset + prev.nbytes})")
        prev = t
    return tensors


def _open_mmap(path: Path) -> tuple[mmap.mmap, int]:
    # stat before open: opening a FIFO would block.
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file") from None
    except OSError as e:
        raise CheckpointError(f"{path}: cannot stat: {e.strerror or e}") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path}: is a directory, expected a .gguf file")
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointError(f"{path}: not a regular file (mode {stat.filemode(st.st_mode)})")
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size == 0:
                raise CheckpointError(f"{path}: empty file (0 bytes), not a GGUF file")
            return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ), size
    except OSError as e:
        raise CheckpointError(f"{path}: cannot open: {e.strerror or e}") from None
    except ValueError as e:  # mmap on a file that shrank to nothing, etc.
        raise CheckpointError(f"{path}: cannot map: {e}") from None


class GGUFFile:
    """A parsed, validated GGUF file with its tensor data memory-mapped read-only."""

    path: Path
    version: int
    alignment: int
    metadata: dict[str, Any]
    tensors: dict[str, TensorInfo]  # in file order
    data_offset: int  # absolute start of the tensor data section

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._mm: mmap.mmap | None = None
        mm, size = _open_mmap(self.path)
        try:
            self._parse(_Cursor(mm, size, self.path))
        except BaseException:
            _close_quietly(mm)
            raise
        self._mm = mm

    def _parse(self, cur: _Cursor) -> None:
        self.version, tensor_count, kv_count = _read_header(cur)
        self.metadata, self._signatures = _read_metadata(cur, kv_count)
        self.alignment = _read_alignment(cur, self.metadata)
        infos: list[tuple[str, tuple[int, ...], int, int, int]] = []
        seen: set[str] = set()
        for i in range(tensor_count):
            info = _read_tensor_info(cur, i, self.alignment)
            if info[0] in seen:
                raise cur.fail(f"duplicate tensor name {_short(info[0])}")
            seen.add(info[0])
            infos.append(info)
        data_start = -(-cur.pos // self.alignment) * self.alignment
        self.data_offset = data_start
        self.tensors = _place_tensors(cur, infos, data_start)

    def value_type(self, key: str) -> tuple[int, int | None]:
        """(ValueType, array element ValueType or None) of a metadata key."""
        return self._signatures[key]

    def tensor_bytes(self, name: str) -> np.ndarray:
        """The raw bytes of a tensor: a read-only uint8 view into the mmap, no copy."""
        if self._mm is None:
            raise CheckpointError(f"{self.path}: file is closed")
        info = self.tensors.get(name)
        if info is None:
            raise CheckpointError(f"{self.path}: no tensor named {name!r} "
                                  f"(file has {len(self.tensors)} tensors)")
        return np.frombuffer(self._mm, dtype=np.uint8, count=info.nbytes, offset=info.offset)

    def drop_pages(self, name: str) -> None:
        """Unmap a tensor's pages from this process once its bytes have been copied out, so a loader
        that converts tensor by tensor does not hold the file and the converted model resident at
        once (the pages stay in the page cache; reading them again faults them back in)."""
        if self._mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        info = self.tensors[name]
        start = info.offset // mmap.PAGESIZE * mmap.PAGESIZE
        end = min(len(self._mm), info.offset + info.nbytes)
        if end > start:
            self._mm.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        if self._mm is not None:
            _close_quietly(self._mm)
            self._mm = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"GGUFFile({str(self.path)!r}, version={self.version}, "
                f"{len(self.metadata)} keys, {len(self.tensors)} tensors)")


def _close_quietly(mm: mmap.mmap) -> None:
    try:
        mm.close()
    except BufferError:
        # numpy views from tensor_bytes() are still alive; the mapping is
        # released when the last of them is garbage-collected.
        pass
