"""Weight-only quantized linear layers (INT4 group-wise, INT8 per output channel) and their quantizers.

At batch 1 a decoder is bound by reading its weights, and PyTorch's bf16 matmul on a CPU reaches
only part of the memory bandwidth. Packed int4 and int8 kernels read 4x / 2x fewer bytes. On the
CPU, INT4 layers use our `q4_kernel` (int16 activations, integer dot products: as fast as PyTorch's
packed kernel and ~60x more exact than its bf16 activations, for any activation dtype); where it
cannot be built, PyTorch's `_weight_int4pack_mm_for_cpu` (fast only with bf16 activations).

- `Int4Linear`: 4-bit codes in groups of `group_size` along the input dimension,
  w = (code - 8) * scale + zero, one (scale, zero) per group and output row. GGUF Q4_0
  (w = d * (q - 8)) and Q4_1 (w = d * q + m) map onto it without requantizing: scale = d, and
  zero = 0 or m + 8d. `q4_kernel` holds scales and minimums in float16 (exact for GGUF and for our
  quantizers); PyTorch's kernels in the activation dtype (bf16: a rounding of ~2^-9 relative). GGUF's
  Q5 types keep their fifth bits in an extra plane (`bits` = 5, our kernel only).
- `Int8Linear`: symmetric int8 codes, w = code * scale, one scale per output row; on the CPU our
  kernel (`q4_kernel.matmul_int8`, the same int16-activation scheme), else `_weight_int8pack_mm`.
- `Int8BlockLinear`: int8 codes with a float16 scale per block of 32 columns (or per 16) and optional
  offsets: GGUF's Q8_0 and Q5_0 (whose 5-bit codes minus 16 are int8) kept as stored, Q5_1 / Q5_K /
  Q6_K / Q3_K with their values as codes, on our kernel (`matmul_int8_blocks`).
  On AVX2 without AVX-512 VNNI the native int8 layers keep their codes in our kernel's panels of 8 blocks
  (`q4_kernel.pack_int8`); `column_codes` gives rows back in column order (dense weights, tied tables).

Kernels: CPU `q4_kernel` (else `_weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm`); CUDA `_weight_int4pack_mm`
(bf16, "tinygemm"; each layer's packing is checked once against the plain math on a test row).
Everywhere else — CUDA int8, other devices, dtypes or shapes — a layer keeps portable codes and
casts / dequantizes its weight for each call: correct everywhere, a memory saving but no speed-up
(on an H200 an int8 layer is 3-6x slower than bf16 this way, and `_weight_int8pack_mm` slower still,
so on CUDA the output head stays float under --quant). The CUDA paths ran on an H200 (tests marked
`gpu`, benchmarks/gpu.py).

The packed kernels are made for few rows (decode). For a prompt, our kernel switches to its prompt
GEMM (`prompt_gemm`: x in bytes, 16 bits for per-row int8; 2-4x faster per row) where the CPU has AVX-512 VNNI, up to
`native_max_rows()` rows (GEMM_MAX_ROWS; NATIVE_MAX_ROWS for the row kernel alone or a CPU with AMX
tiles, whose bf16 GEMM is faster still), and PyTorch's packed kernels up to `DENSE_MIN_ROWS` (bf16;
2 rows for other dtypes, whose kernels are far slower per row). From there a CPU layer dequantizes its
weight for that one call and uses the dense GEMM; the dense copy lives only for the call, in a buffer
each thread reuses (`q4_kernel.dequantize_int4(..., reuse=True)`: a fresh one cost more in page
faults than the dequantization).

Quantizers (`quantize_int4`, `quantize_int8`) are round-to-nearest over each group's min/max (int4)
or each row's absolute max (int8). They round scales to float16 first — the precision a quantized
checkpoint stores — and compute codes against the rounded scales, so quantizing while loading and
loading a written checkpoint give bit-identical layers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from . import kquant_kernel, q4_kernel
from .errors import CheckpointError

# Rows from which our kernel's layers dequantize for the dense GEMM where the prompt GEMM is not built or
# the CPU has AMX (native_max_rows). There it was faster from ~24-32 rows on (benchmarks/prompt_rows.py),
# but it reads bf16-rounded weights: at 32, SmolLM2's greedy answer to a 37-token prompt
# (tests/test_cli.py) stopped being "Paris". Kept where whole prompts go dense.
NATIVE_MAX_ROWS = 112
# ... and where it is built: with x in bytes (one instruction per 64 multiply-adds) 2.5x faster than the dense
# GEMM at 64 rows, 1.2-1.3x at 256, level at 512 (benchmarks/prompt_rows.py, AVX-512 VNNI without AMX, 2 threads;
# Q6_K 0.8-1.0x there). So a prefill chunk (generate.PREFILL_CHUNK, 512) stays on it: no bf16-rounded weights and
# no dense copy (a 512-token prompt of zen-eco-4b Q4_0 runs at the same speed either way, 60 MB less peak RSS).
GEMM_MAX_ROWS = 1024
# ... and where the kernel has AVX2 prompt tiles (x in bytes per block of 32; no prompt GEMM; the dense GEMM
# float32 where the CPU has no bf16): K-quants (kquant_kernel.loop() "avx2" / "avx-vnni"), int8 and int4
# (q4_kernel.word_rows()). The AVX2 build on an AMD EPYC, 2 threads, tiles against dequantize + float32 GEMM:
# Q4_K on 9728 x 2560, 64 rows 14-20 vs 39-61 ms, 512 rows 135-176 vs 157-226 (Q6_K 153-225 vs 165-204); Q8_0
# on the same, 128 rows 41 vs 75, 512 rows 129 vs 199, 2048 rows 528 vs 660; a 512-token prompt of zen-eco-4b
# Q4_K_M 18.3-19.2 tok/s dense, 20.2-22.3 on the tiles. So a prefill chunk (generate.PREFILL_CHUNK, 512)
# never goes dense, and no float32 copy of a weight is made.
AVX2_DENSE_ROWS = 1024
DENSE_MIN_ROWS = 128  # measured on SmolLM2's 3072x576 gate|up: packed ~30 us/row, unpack + GEMM ~4 ms flat
SCALE_DTYPE = torch.float16  # how scales and minimums are stored (as GGUF's Q4_1/Q8_0 do)
GROUP_SIZES = (32, 64, 128)  # int4 group sizes the CPU and CUDA kernels both take
_QUANT_ELEMENTS = 2**24  # weights quantized at once


@dataclass
class Q4Weight:
    """A 4-bit weight: w[r, c] = scale[r, c // group] * codes[r, c] + offset[r, c // group]; with bits = 5
    (GGUF's Q5_0 / Q5_1 / Q5_K) the codes span [0, 31] and only our CPU kernel runs it."""

    codes: torch.Tensor  # (N, K) uint8 in [0, 2**bits - 1]
    scale: torch.Tensor  # (N, K // group) float32
    offset: torch.Tensor  # (N, K // group) float32
    bits: int = 4

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scale.shape[1]

    def dequantize(self) -> torch.Tensor:
        g = self.group_size
        n, k = self.codes.shape
        w = self.codes.float().view(n, k // g, g) * self.scale[..., None] + self.offset[..., None]
        return w.view(n, k)

    def permute_rows(self, index: torch.Tensor) -> "Q4Weight":
        return Q4Weight(self.codes[index], self.scale[index], self.offset[index], self.bits)

    @staticmethod
    def cat(parts: list["Q4Weight"], codes: torch.Tensor | None = None) -> "Q4Weight":
        """Rows of parts one after another. codes: their codes already joined (the loader decodes each
        part into its rows of one tensor), taken as they are."""
        return Q4Weight(torch.cat([p.codes for p in parts]) if codes is None else codes,
                        *(torch.cat([getattr(p, f) for p in parts]) for f in ("scale", "offset")), max(p.bits for p in parts))


@dataclass
class Q8Weight:
    """An 8-bit weight: w[r, c] = scale[r] * codes[r, c]."""

    codes: torch.Tensor  # (N, K) int8 in [-127, 127]
    scale: torch.Tensor  # (N,) float32

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scale[:, None]

    @staticmethod
    def cat(parts: list["Q8Weight"]) -> "Q8Weight":
        return Q8Weight(torch.cat([p.codes for p in parts]), torch.cat([p.scale for p in parts]))


@dataclass
class Q8BlockWeight:
    """An 8-bit weight with scales per block of input columns: w[r, c] = scale[r, c // 32] * codes[r, c]
    (+ offset[r, c // 32]); where `scale_b` is given, `scale` holds the scale of each block's first 16
    columns and `scale_b` of its last 16, and likewise `offset_b` for the offsets. GGUF's Q8_0 and Q5_0
    (w = d * (q - 16): int8 codes in [-16, 15]) as stored; Q5_1, Q5_K (offsets), Q6_K, Q3_K (a scale per
    16), Q2_K (a scale and an offset per 16) with the products d * sc as scales."""

    codes: torch.Tensor  # (N, K) int8
    scale: torch.Tensor  # (N, K // 32) float32
    scale_b: torch.Tensor | None = None  # (N, K // 32) float32: the last 16 columns' scale
    offset: torch.Tensor | None = None  # (N, K // 32) float32
    offset_b: torch.Tensor | None = None  # (N, K // 32) float32: the last 16 columns' offset (needs offset)

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        halves = torch.stack([self.scale, self.scale if self.scale_b is None else self.scale_b], -1)
        w = self.codes.float().view(n, k // 32, 2, 16) * halves[..., None]
        if self.offset is not None:
            w = w + torch.stack([self.offset, self.offset if self.offset_b is None else self.offset_b], -1)[..., None]
        return w.view(n, k)

    def permute_rows(self, order: torch.Tensor) -> "Q8BlockWeight":
        pick = lambda t: None if t is None else t[order]  # noqa: E731
        return Q8BlockWeight(self.codes[order], self.scale[order], pick(self.scale_b), pick(self.offset),
                             pick(self.offset_b))

    @staticmethod
    def cat(parts: list["Q8BlockWeight"], codes: torch.Tensor | None = None) -> "Q8BlockWeight":
        """Rows of parts one after another; a part without second-half scales or offsets gets its own
        scale / offset / zeros where another part has them. codes: as in Q4Weight.cat."""
        halves = any(p.scale_b is not None for p in parts)
        offsets = any(p.offset is not None for p in parts)
        offset_halves = any(p.offset_b is not None for p in parts)
        offset = lambda p: torch.zeros_like(p.scale) if p.offset is None else p.offset  # noqa: E731
        return Q8BlockWeight(
            torch.cat([p.codes for p in parts]) if codes is None else codes, torch.cat([p.scale for p in parts]),
            torch.cat([p.scale if p.scale_b is None else p.scale_b for p in parts]) if halves else None,
            torch.cat([offset(p) for p in parts]) if offsets else None,
            torch.cat([offset(p) if p.offset_b is None else p.offset_b for p in parts]) if offset_halves else None)


@dataclass
class KQuantWeight:
    """GGUF's K-quants as stored (kind "q4_k", "q5_k", "q6_k"), ggml's float32 products: Q6_K
    w[r, c] = (d[r, c // 256] * sub_scale[r, c // 16]) * (codes[r, c] - 32); Q4_K / Q5_K
    w[r, c] = (d * sub_scale[r, c // 32]) * codes[r, c] - dmin * sub_min[r, c // 32]. Our CPU kernel only
    (`kquant_kernel`)."""

    kind: str
    codes: torch.Tensor  # (N, K) uint8: [0, 15], [0, 31], [0, 63]
    sub_scale: torch.Tensor  # Q6_K (N, K // 16) int8; Q4_K / Q5_K (N, K // 32) uint8 in [0, 63]
    d: torch.Tensor  # (N, K // 256) float32 (float16 values)
    sub_min: torch.Tensor | None = None  # Q4_K / Q5_K: (N, K // 32) uint8 in [0, 63]
    dmin: torch.Tensor | None = None  # Q4_K / Q5_K: (N, K // 256) float32 (float16 values)

    def dequantize(self) -> torch.Tensor:
        n, k = self.codes.shape
        sub = k // self.sub_scale.shape[1]
        per = lambda t: t.repeat_interleave(kquant_kernel.SUPER // sub, 1)  # noqa: E731 - per 256 -> per sub-block
        scale = (per(self.d) * self.sub_scale.float())[..., None]
        q = self.codes.float().view(n, k // sub, sub)
        if self.kind == "q6_k":
            return (scale * (q - 32)).view(n, k)
        return (scale * q - (per(self.dmin) * self.sub_min.float())[..., None]).view(n, k)

    def permute_rows(self, order: torch.Tensor) -> "KQuantWeight":
        pick = lambda t: None if t is None else t[order]  # noqa: E731
        return KQuantWeight(self.kind, self.codes[order], self.sub_scale[order], self.d[order], pick(self.sub_min),
                            pick(self.dmin))

    @staticmethod
    def cat(parts: list["KQuantWeight"], codes: torch.Tensor | None = None) -> "KQuantWeight | None":
        """Rows of parts one after another (None where their kinds differ); codes: as in Q4Weight.cat."""
        if len({p.kind for p in parts}) != 1:
            return None
        join = lambda f: None if getattr(parts[0], f) is None else torch.cat([getattr(p, f) for p in parts])  # noqa: E731
        return KQuantWeight(parts[0].kind, join("codes") if codes is None else codes, join("sub_scale"), join("d"),
                            join("sub_min"), join("dmin"))

    def packed(self) -> "KQuantPacked":
        return KQuantPacked(self.kind, kquant_kernel.pack(self.kind, self.codes, self.sub_scale, self.d, self.sub_min,
                                                          self.dmin))


@dataclass
class KQuantPacked:
    """A K-quant weight in our kernel's buffers (`kquant_kernel.pack`: packed, high, sub_scales, d), as
    `KQuantWeight.packed()` gives it or straight from a GGUF file's blocks (`kquant_kernel.pack_blocks`,
    what loading does: no (N, K) codes in between)."""

    kind: str
    buffers: tuple[torch.Tensor, ...]

    @property
    def shape(self) -> tuple[int, int]:
        return self.buffers[0].shape[0], self.buffers[0].shape[1] * 2

    def dequantize(self) -> torch.Tensor:
        return kquant_kernel.dequantize(self.kind, *self.buffers, torch.float32)


@dataclass
class Q4Packed:
    """A 4-bit weight in groups of 32 in our kernel's buffers already (`q4_kernel.pack`'s packed and scale_zero), as
    loading decodes GGUF's Q4_0 / Q4_1 blocks (`q4_kernel.pack_blocks`): no (N, K) codes in between."""

    packed: torch.Tensor  # (N, K / 2) uint8
    scale_zero: torch.Tensor  # (N, 1 or 2, K / 32 rounded up to eights) float16
    group_size = 32
    bits = 4

    @property
    def shape(self) -> tuple[int, int]:
        return self.packed.shape[0], self.packed.shape[1] * 2

    def weight(self) -> Q4Weight:
        """The same weight as codes, scales and offsets (for a layer off our kernel)."""
        groups = self.shape[1] // self.group_size
        scale = self.scale_zero[:, 0, :groups].float()
        offset = self.scale_zero[:, 1, :groups].float() if self.scale_zero.shape[1] == 2 else -8 * scale
        return Q4Weight(q4_kernel.unpack(self.packed, self.group_size), scale, offset)

    def dequantize(self) -> torch.Tensor:
        return self.weight().dequantize()


@dataclass
class Q8Packed:
    """A Q8_0 weight in our kernel's buffers already (`q4_kernel.pack_int8`'s codes, `pack_block_scales`' one plane
    of float16 scales), as loading decodes GGUF's Q8_0 blocks (`q4_kernel.pack_blocks`): no copy in between."""

    codes: torch.Tensor  # (N, K) int8 in the kernel's order
    block_scales: torch.Tensor  # (N, 1, K / 32 rounded up to eights) float16

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.codes.shape)

    def weight(self) -> Q8BlockWeight:
        """The same weight with codes in column order and float32 scales (for a layer off our kernel)."""
        return Q8BlockWeight(q4_kernel.unpack_int8(self.codes), self.block_scales[:, 0, : self.shape[1] // 32].float())

    def dequantize(self) -> torch.Tensor:
        return self.weight().dequantize()


def _stored(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded to the stored scale precision, back in float32."""
    out = x.to(SCALE_DTYPE).float()
    if not torch.isfinite(out).all():
        raise ValueError(f"weights beyond the range of {SCALE_DTYPE} scales (or not finite)")
    return out


def _row_chunks(w: torch.Tensor) -> list[torch.Tensor]:
    # ~16M elements at a time: bounds the float temporaries of a large matrix to ~64 MB each
    return list(w.split(max(1, _QUANT_ELEMENTS // w.shape[1])))


def _joined(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def quantize_int4(w: torch.Tensor, group_size: int) -> Q4Weight:
    """Asymmetric round-to-nearest per group of `group_size` input columns: scale = (max - min) / 15."""
    n, k = w.shape
    if group_size not in GROUP_SIZES or k % group_size:
        raise ValueError(f"group size {group_size} must be one of {GROUP_SIZES} and divide {k} columns")
    codes, scales, mins = [], [], []
    for rows in _row_chunks(w):
        g = rows.float().view(rows.shape[0], k // group_size, group_size)
        lo, hi = torch.aminmax(g, dim=-1)
        scale, lo = _stored((hi - lo) / 15), _stored(lo)
        q = (g - lo[..., None]).div_(torch.where(scale > 0, scale, 1.0)[..., None]).round_().clamp_(0, 15)
        codes.append(q.to(torch.uint8).view(rows.shape[0], k))
        scales.append(scale)
        mins.append(lo)
        del q
    return Q4Weight(_joined(codes), _joined(scales), _joined(mins))


def quantize_int8(w: torch.Tensor) -> Q8Weight:
    """Symmetric round-to-nearest per output row: scale = max |w| / 127."""
    codes, scales = [], []
    for rows in _row_chunks(w):
        rows = rows.float()
        lo, hi = torch.aminmax(rows, dim=1)
        scale = _stored(torch.maximum(-lo, hi) / 127)
        q = (rows / torch.where(scale > 0, scale, 1.0)[:, None]).round_().clamp_(-127, 127)
        codes.append(q.to(torch.int8))
        scales.append(scale)
        del q
    return Q8Weight(_joined(codes), _joined(scales))


@dataclass(frozen=True)
class QuantSpec:
    """What quant="int8" / "int4[-gN]" asks for. Applies to the layers' linear matrices; the output
    head always gets int8 (int4 there visibly changes greedy output). A tied head's table is also the
    embedding: it is stored once, int8, and the lookup reads its rows (`Int8Embedding`); an untied
    model's embedding stays float (a lookup reads few rows)."""

    bits: int  # 8 or 4
    group_size: int | None = None  # int4: input columns per (scale, min); int8: None, one scale per row

    @property
    def name(self) -> str:
        return "int8" if self.bits == 8 else f"int4-g{self.group_size}"

    def quantize(self, w: torch.Tensor) -> "Q4Weight | Q8Weight":
        return quantize_int8(w) if self.bits == 8 else quantize_int4(w, self.group_size)

    def for_weight(self, name: str, tied: bool = False, int8_head: bool = True) -> "QuantSpec | None":
        """The spec the model weight `name` (our module naming) gets under this one; None: it stays float.
        tied: the model's head is its embedding (then "embed.weight" is the head's table).
        int8_head=False keeps the head (and a tied table) float: on CUDA, where PyTorch has no fast int8
        matmul for one row (zen-eco-4b's head on an H200: bf16 0.19 ms, `_weight_int8pack_mm` 1.7 ms,
        cast codes 1.2 ms; docs/benchmarks.md "GPU")."""
        module, _, kind = name.rpartition(".")
        if kind != "weight":
            return None
        if module == "lm_head" or module == "embed" and tied:  # lm_head: only asked for when untied
            return HEAD_SPEC if int8_head else None
        parts = module.split(".", 2)
        return self if parts[0] == "layers" and len(parts) == 3 and parts[2] in LAYER_LINEARS else None


HEAD_SPEC = QuantSpec(8)
LAYER_LINEARS = ("attn.wqkv", "attn.wo", "mlp.w_gate_up", "mlp.w_down")  # our fused layer matrices
QUANT_MODES = ("auto", "none", "int8", "int4", "int4-g64", "int4-g128")  # "int4" = "int4-g32"


def parse_quant(mode: str, group_size: int | None = None) -> "str | QuantSpec":
    """'auto' | 'none' | a QuantSpec from 'int8', 'int4', 'int4-gN' (or 'int4' with `group_size`)."""
    text = str(mode).strip().lower()
    if text in ("auto", "none", "int8"):
        if group_size is not None:
            raise CheckpointError(f"a group size applies to int4 only, not to {mode!r}")
        return QuantSpec(8) if text == "int8" else text
    m = re.fullmatch(r"int4(?:-g(\d+))?", text)
    if m is None:
        raise CheckpointError(f"unknown quant mode {mode!r}; use one of {', '.join(QUANT_MODES)}")
    size = int(m[1]) if m[1] else group_size or GROUP_SIZES[0]
    if m[1] and group_size is not None and group_size != size:
        raise CheckpointError(f"{mode!r} and group size {group_size} disagree")
    if size not in GROUP_SIZES:
        raise CheckpointError(f"int4 group size {size} is not supported; use one of {', '.join(map(str, GROUP_SIZES))}")
    return QuantSpec(4, size)


def quantized_linear(weight: "Q4Weight | Q4Packed | Q8Weight | Q8BlockWeight | Q8Packed | list",
                     bias: torch.Tensor | None, dtype: torch.dtype, device: torch.device | str,
                     kernel: bool | str = True) -> nn.Module:
    """The layer for `weight`; a list of weights (consecutive row ranges of one matrix) makes a
    `StackedLinear` of one layer each, the bias split to match."""
    if isinstance(weight, list):
        rows = [w.shape[0] if isinstance(w, (KQuantPacked, Q4Packed, Q8Packed)) else w.codes.shape[0] for w in weight]
        biases = bias.split(rows) if bias is not None else [None] * len(weight)
        return StackedLinear([quantized_linear(w, b, dtype, device, kernel) for w, b in zip(weight, biases)])
    cls = {Q4Weight: Int4Linear, Q4Packed: Int4Linear, Q8Weight: Int8Linear, Q8BlockWeight: Int8BlockLinear,
           Q8Packed: Int8BlockLinear, KQuantWeight: KQuantLinear, KQuantPacked: KQuantLinear}[type(weight)]
    return cls(weight, bias, dtype, device, kernel)


def pack_nibbles(codes: torch.Tensor) -> torch.Tensor:
    """(N, K) uint8 codes in [0, 15] -> (N, K/2) bytes: column 2j in the low nibble, 2j + 1 in the high one."""
    return codes[:, 0::2] | (codes[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of `pack_nibbles`: (N, K/2) bytes -> (N, K) codes."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).view(packed.shape[0], -1)


def int4_supported(device: torch.device, dtype: torch.dtype, float32: bool = False) -> bool:
    """Whether quant="auto" keeps a GGUF's quantized weights packed: on the CPU with bf16 activations, where
    a fast kernel (ours, else PyTorch's) exists; with float32 activations where `float32` says so (the
    dtype was picked automatically, on a CPU without native bf16: most AVX2 machines) and our kernel runs
    (PyTorch's packed kernel is ~30x slower with float32 input). A model asked for in float32 stays dense
    float32 — the exact reference that parity tests and `--dtype float32` users expect."""
    device = torch.device(device)
    if device.type != "cpu":
        return False
    if dtype == torch.float32 and float32:
        return q4_kernel.available()
    if dtype != torch.bfloat16:
        return False
    return q4_kernel.available() or hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


@lru_cache(maxsize=None)
def native_max_rows() -> int:
    """Rows from which a layer on our kernel takes the dense GEMM: GEMM_MAX_ROWS where the prompt GEMM is
    built, else (or on a CPU with AMX tiles, whose bf16 GEMM is several times faster) NATIVE_MAX_ROWS."""
    return GEMM_MAX_ROWS if q4_kernel.gemm_available() and not _cpu_has_amx() else NATIVE_MAX_ROWS


def _int_native_rows() -> int:
    """native_rows of an int8 / int4 layer on our kernel: AVX2_DENSE_ROWS where it has the AVX2 prompt tiles."""
    return AVX2_DENSE_ROWS if q4_kernel.word_rows() else native_max_rows()


def _cpu_has_amx() -> bool:
    try:
        return " amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def _dense_min_rows(dtype: torch.dtype) -> int:
    return DENSE_MIN_ROWS if dtype == torch.bfloat16 else 2


def _int4_backend(device: torch.device, dtype: torch.dtype, n: int, k: int, group: int, kernel: bool | str) -> str:
    if kernel is False:
        return "dense"
    if (kernel is True and device.type == "cpu" and k % q4_kernel.BLOCK == 0 and group % q4_kernel.BLOCK == 0
            and q4_kernel.available()):
        return "native"
    if device.type == "cpu" and n % 16 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
        return "cpu"
    if device.type == "cuda" and dtype == torch.bfloat16 and n % 8 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm"):
        return "cuda"
    return "dense"


def _cuda_packed(weight: Q4Weight, scales_zeros: torch.Tensor, device: torch.device) -> torch.Tensor | None:
    """tinygemm's packing of `weight` for `_weight_int4pack_mm`, or None where the kernel refuses this
    shape or GPU, or disagrees with the plain math on a test row (then the layer uses the fallback)."""
    k = weight.codes.shape[1]
    tiles = next((t for t in (8, 4, 2) if k % (t * 16) == 0), None)  # inner k-tiles: K % (16 * tiles) == 0
    if tiles is None:
        return None
    x = torch.randn(1, k, generator=torch.Generator().manual_seed(0)).to(device, scales_zeros.dtype)
    try:
        # its input: (N, K/2) bytes with column 2j in the high nibble
        hi_first = (weight.codes[:, 0::2] << 4) | weight.codes[:, 1::2]
        packed = torch.ops.aten._convert_weight_to_int4pack(hi_first.to(device), tiles)
        got = torch.ops.aten._weight_int4pack_mm(x, packed, weight.group_size, scales_zeros).float()
    except (RuntimeError, NotImplementedError):
        return None
    ref = x.float() @ weight.dequantize().to(device).t()
    return packed if (got - ref).norm() <= 0.02 * ref.norm() else None


def _unpack_cpu(packed: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """(N, K) uint8 codes back from PyTorch's private CPU int4 packing: rows go in blocks of 64, and
    each block is bytes [K/2][2][32] where byte (kp, parity, r) holds column 2*kp + parity of row r
    in its low nibble and of row r + 32 in its high nibble."""
    p = packed.view(n // 64, k // 2, 2, 32)
    halves = torch.stack((p & 15, p >> 4), dim=1)  # (N/64, 2, K/2, 2, 32)
    return halves.permute(0, 1, 4, 2, 3).reshape(n, k)


@lru_cache(maxsize=None)
def _cpu_layout_known(k: int) -> bool:
    """Whether `_unpack_cpu` reads this PyTorch's packing right for K = k: checked once per K on
    random codes (the packing depends on shapes, not values), as the layout is private."""
    codes = torch.randint(0, 16, (128, k), dtype=torch.uint8, generator=torch.Generator().manual_seed(k))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
    return torch.equal(_unpack_cpu(packed, 128, k), codes)


class _QuantizedLinear(nn.Module):
    """What Int4Linear and Int8Linear share: y = x W^T (+ b) over any leading dims; `_matmul` takes
    the (rows, in_features) view and returns (rows, out_features)."""

    in_features: int
    out_features: int

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._matmul(x.reshape(-1, self.in_features)).view(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


class Int4Linear(_QuantizedLinear):
    """y = x W^T (+ b) for a 4-bit `Q4Weight`. backend: "native" (our `q4_kernel`, the CPU default),
    "cpu" / "cuda" (PyTorch's packed kernels) or "dense" (portable nibble codes, dequantized per
    call). kernel: True = the best available, "torch" = PyTorch's kernels only, False = "dense"."""

    def __init__(self, weight: "Q4Weight | Q4Packed", bias: torch.Tensor | None, dtype: torch.dtype,
                 device: torch.device | str = "cpu", kernel: bool | str = True) -> None:
        super().__init__()
        device = torch.device(device)
        n, k = weight.shape if isinstance(weight, Q4Packed) else weight.codes.shape
        self.in_features, self.out_features, self.group_size = k, n, weight.group_size
        self.dtype = dtype  # of activations and outputs
        self.backend = _int4_backend(device, dtype, n, k, weight.group_size, kernel)
        self.native_rows = _int_native_rows()  # a prompt from this many rows on: the dense GEMM
        self.bits = weight.bits
        if self.bits != 4 and self.backend != "native":
            raise ValueError(f"{self.bits}-bit codes run on our CPU kernel only (here: {self.backend})")
        self.register_buffer("bias", None if bias is None else bias.to(device, dtype))
        if isinstance(weight, Q4Packed):
            if self.backend == "native":  # in our kernel's buffers already
                self.register_buffer("packed", weight.packed)
                self.register_buffer("scale_zero", weight.scale_zero)
                self.register_buffer("high", None)
                self.can_unpack = True
                return
            weight = weight.weight()
        if self.backend == "native":  # our kernel's layout: codes by blocks of 32, float16 scale and zero
            # pack keeps the low four bits; 5-bit codes' fifth bits go to `high`. Zeros that are all -8 (5-bit:
            # -16) times the scale (GGUF's Q4_0 / Q5_0) are not stored: the kernel derives them
            mid = torch.equal(weight.offset, -(2 ** (self.bits - 1)) * weight.scale)
            packed, scale_zero = q4_kernel.pack(weight.codes, weight.scale, None if mid else weight.offset, self.bits)
            self.register_buffer("packed", packed)
            self.register_buffer("scale_zero", scale_zero)
            self.register_buffer("high", q4_kernel.pack_high(weight.codes) if self.bits == 5 else None)
            self.can_unpack = self.bits == 4
            return
        self.register_buffer("high", None)  # 5-bit codes: native only
        zero = weight.offset + 8 * weight.scale
        # (K // group, N, 2): the kernels' layout for per-group (scale, zero)
        scales_zeros = torch.stack([weight.scale, zero], -1).transpose(0, 1).contiguous().to(device, dtype)
        packed = None
        if self.backend == "cpu":
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.codes.to(torch.int32).contiguous(), 1)
        elif self.backend == "cuda":
            packed = _cuda_packed(weight, scales_zeros, device)
        if packed is None:
            self.backend, packed = "dense", pack_nibbles(weight.codes)
        self.register_buffer("packed", packed.to(device))
        self.register_buffer("scales_zeros", scales_zeros)
        self.can_unpack = self.backend == "dense" or self.backend == "cpu" and n % 64 == 0 and _cpu_layout_known(k)

    def _unpack_codes(self) -> torch.Tensor:
        """The (N, K) uint8 codes back from `packed` (where `can_unpack`)."""
        if self.backend == "native":
            return q4_kernel.unpack(self.packed, self.group_size)
        if self.backend == "dense":
            return unpack_nibbles(self.packed)
        return _unpack_cpu(self.packed, self.out_features, self.in_features)

    def dense_weight(self, dtype: torch.dtype, reuse: bool = False) -> torch.Tensor:
        """(N, K) weight in `dtype`: (code - 8) * scale + zero, from the stored buffers. reuse: for one
        matmul, in a buffer the next such call overwrites (q4_kernel.dequantize_int4)."""
        n, k, g = self.out_features, self.in_features, self.group_size
        if self.backend == "native":  # one C pass: w = code * scale + zero in float32, rounded once
            direct = dtype in (torch.float32, torch.bfloat16)
            w = q4_kernel.dequantize_int4(self.packed, self.scale_zero, g, dtype if direct else torch.float32, self.high,
                                          reuse=reuse and direct)
            return w if direct else w.to(dtype)
        scale, zero = self.scales_zeros.to(dtype).unbind(-1)  # (K/g, N) each
        scale, zero = scale.t().contiguous()[..., None], zero.t().contiguous()[..., None]  # (N, K/g, 1)
        codes = self._unpack_codes().view(n, k // g, g).to(dtype)
        return torch.addcmul(zero - 8 * scale, codes, scale).reshape(n, k)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.backend == "native":
            if x2.shape[0] < self.native_rows:
                return q4_kernel.matmul(x2, self.packed, self.scale_zero, self.group_size, self.dtype, self.high)
            return F.linear(x2.to(self.dtype), self.dense_weight(self.dtype, reuse=True))
        x2 = x2.to(self.dtype)
        if self.backend == "dense" or (self.can_unpack and x2.shape[0] >= _dense_min_rows(x2.dtype)):
            return F.linear(x2, self.dense_weight(x2.dtype))
        if self.backend == "cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_zeros)
        return torch.ops.aten._weight_int4pack_mm(x2, self.packed, self.group_size, self.scales_zeros)


class _Int8Codes(_QuantizedLinear):
    """What Int8Linear and Int8BlockLinear share: `codes` (N, K) int8, in our kernel's order on backend "native"
    (q4_kernel.pack_int8: panels of 8 blocks on AVX2), else in column order."""

    codes: torch.Tensor
    backend: str

    def column_codes(self, rows=slice(None)) -> torch.Tensor:
        """Rows `rows` of the codes in column order."""
        return q4_kernel.unpack_int8(self.codes[rows]) if self.backend == "native" else self.codes[rows]


class Int8Linear(_Int8Codes):
    """y = x W^T (+ b) for an 8-bit `Q8Weight`. For few rows on the CPU: our kernel (`q4_kernel.matmul_int8`,
    backend "native"; activations rounded per block of 32 to int16 (AVX2: int8), float32 scales) or PyTorch's
    `_weight_int8pack_mm` ("torch", also what kernel="torch" asks for); else ("dense") (x @ codes^T) * scale
    with the codes cast to the activation dtype for the call."""

    def __init__(self, weight: Q8Weight, bias: torch.Tensor | None, dtype: torch.dtype,
                 device: torch.device | str = "cpu", kernel: bool | str = True) -> None:
        super().__init__()
        device = torch.device(device)
        self.out_features, self.in_features = weight.codes.shape
        self.register_buffer("scales", weight.scale.to(device, dtype))  # (N,)
        self.register_buffer("bias", None if bias is None else bias.to(device, dtype))
        self.native_rows = _int_native_rows()  # a prompt from this many rows on: the dense GEMM
        # CPU only: PyTorch's CUDA version (2.9+) gives each output to one thread walking K with
        # uncoalesced loads (pytorch#190529 rewrites it), slower than cuBLAS on the cast codes.
        if (kernel is True and device.type == "cpu" and self.in_features % q4_kernel.BLOCK == 0
                and q4_kernel.available()):
            self.backend = "native"  # ~2x PyTorch's on zen-eco-4b's head (docs/benchmarks.md)
            self.register_buffer("scales_f32", weight.scale.to(device, torch.float32), persistent=False)
        elif kernel and device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
            self.backend = "torch"
        else:
            self.backend = "dense"
        codes = weight.codes.to(device).contiguous()  # (N, K) int8; our kernel's order (q4_kernel.pack_int8)
        self.register_buffer("codes", q4_kernel.pack_int8(codes) if self.backend == "native" else codes)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.column_codes().to(dtype) * self.scales.to(dtype)[:, None]

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.backend == "native" and x2.shape[0] < self.native_rows:
            return q4_kernel.matmul_int8(x2, self.codes, self.scales_f32, self.scales.dtype)
        x2 = x2.to(self.scales.dtype)
        if self.backend == "torch" and x2.shape[0] < _dense_min_rows(x2.dtype):
            return torch.ops.aten._weight_int8pack_mm(x2, self.codes, self.scales)
        return F.linear(x2, self.column_codes().to(x2.dtype)) * self.scales  # the per-row scale can wait until after


class Int8BlockLinear(_Int8Codes):
    """y = x W^T (+ b) for a `Q8BlockWeight` (int8 codes, float16 scales per block of 32 columns or per 16,
    optional offsets: a GGUF file's Q8_0 / Q5_0 kept as stored, 1.06 bytes a weight instead of bf16's 2;
    Q5_1 / Q5_K / Q6_K / Q3_K 1.09-1.13 bytes, their scale products rounded to float16, at most 2^-11
    relative). On the CPU our kernel (`q4_kernel.matmul_int8_blocks`) below native_max_rows() rows; else
    the weight is dequantized for the call (prompts: the dense GEMM; other devices: correct, no speed-up)."""

    def __init__(self, weight: "Q8BlockWeight | Q8Packed", bias: torch.Tensor | None, dtype: torch.dtype,
                 device: torch.device | str = "cpu", kernel: bool | str = True) -> None:
        super().__init__()
        device = torch.device(device)
        self.out_features, self.in_features = weight.codes.shape
        self.dtype = dtype
        native = kernel is True and device.type == "cpu" and q4_kernel.available()
        if isinstance(weight, Q8Packed) and native:  # in our kernel's buffers already
            codes, (scales, self.block_flags) = weight.codes, (weight.block_scales, 0)
        else:
            weight = weight.weight() if isinstance(weight, Q8Packed) else weight
            codes = weight.codes.to(device).contiguous()  # (N, K) int8; our kernel's order (q4_kernel.pack_int8)
            codes = q4_kernel.pack_int8(codes) if native else codes
            scales, self.block_flags = q4_kernel.pack_block_scales(weight.scale, weight.scale_b, weight.offset,
                                                                   weight.offset_b)
        self.register_buffer("codes", codes)
        self.register_buffer("block_scales", scales.to(device))  # (N, planes, nb padded) f16
        self.register_buffer("bias", None if bias is None else bias.to(device, dtype))
        self.native_rows = _int_native_rows()  # a prompt from this many rows on: the dense GEMM
        self.backend = "native" if native else "dense"

    def dense_weight(self, dtype: torch.dtype, reuse: bool = False) -> torch.Tensor:
        """(N, K) weight in `dtype`; reuse: as `Int4Linear.dense_weight`."""
        if self.backend == "native" and dtype in (torch.float32, torch.bfloat16):  # one C pass, rounded once
            return q4_kernel.dequantize_int8_blocks(self.codes, self.block_scales, self.block_flags, dtype, reuse)
        return _block_rows(self.column_codes(), self.block_scales, self.block_flags, dtype)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.backend == "native" and x2.shape[0] < self.native_rows:
            return q4_kernel.matmul_int8_blocks(x2, self.codes, self.block_scales, self.block_flags, self.dtype)
        return F.linear(x2.to(self.dtype), self.dense_weight(self.dtype, reuse=True))


# Rows from which a K-quant layer dequantizes for the dense GEMM where the prompt GEMM is not built or is
# turned off (ZEN_ECO_GEMM=0): its row kernel against dequantize + bf16 GEMM for Q6_K on 2560 x 9728
# (zen-eco-4b's down), 2 threads of an AMD EPYC (benchmarks/prompt_rows.py): 16 rows 9.5 vs 13.8 ms,
# 24 rows 14.2 vs 14.4, 32 rows 17.8 vs 13.7.
KQUANT_DENSE_ROWS = 24


class KQuantLinear(_QuantizedLinear):
    """y = x W^T (+ b) for a `KQuantWeight` (GGUF's Q4_K / Q5_K / Q6_K kept as stored: 0.58 / 0.70 / 0.82
    bytes a weight, against our int4 layout's 0.63 for Q4_K and int8 blocks' 1.13 for Q6_K): our CPU kernel
    (`kquant_kernel.matmul`, AVX-512 VNNI: row tiles, the prompt GEMM from GEMM_MIN_ROWS; AVX2: row tiles)
    below native_max_rows() rows (KQUANT_DENSE_ROWS without the prompt GEMM, AVX2_DENSE_ROWS with
    the AVX2 loop), else the weight dequantized for the call (`kquant_kernel.dequantize`) and the dense GEMM.
    Loaders make one only where `kquant_kernel.available()`."""

    def __init__(self, weight: "KQuantWeight | KQuantPacked", bias: torch.Tensor | None, dtype: torch.dtype,
                 device: torch.device | str = "cpu", kernel: bool | str = True) -> None:
        super().__init__()
        if not (kernel is True and torch.device(device).type == "cpu" and kquant_kernel.available()):
            raise ValueError("K-quant weights as stored run on our CPU kernel only (AVX-512 VNNI or AVX2)")
        weight = weight if isinstance(weight, KQuantPacked) else weight.packed()
        self.out_features, self.in_features = weight.shape
        self.kind, self.dtype, self.backend = weight.kind, dtype, "native"
        # a prompt from this many rows on: the dense GEMM (with the prompt GEMM or the AVX2 tiles as the int
        # layers'; with neither, sooner)
        if q4_kernel.gemm_available() or q4_kernel.word_rows():
            self.native_rows = _int_native_rows()
        else:
            self.native_rows = min(native_max_rows(), KQUANT_DENSE_ROWS)
        for name, t in zip(("packed", "high", "sub_scales", "d"), weight.buffers):
            self.register_buffer(name, t)
        self.register_buffer("bias", None if bias is None else bias.to(device, dtype))

    def _kernel_buffers(self) -> tuple[torch.Tensor, ...]:
        return self.packed, self.high, self.sub_scales, self.d

    def dense_weight(self, dtype: torch.dtype, reuse: bool = False) -> torch.Tensor:
        """(N, K) weight in `dtype`; reuse: as `Int4Linear.dense_weight`."""
        return self.dense_rows(None, dtype, reuse)

    def dense_rows(self, rows: torch.Tensor | None, dtype: torch.dtype, reuse: bool = False) -> torch.Tensor:
        """Rows `rows` (an index tensor; None: all) of the weight in `dtype` (a tied embedding's lookups)."""
        direct = dtype in (torch.float32, torch.bfloat16)
        w = kquant_kernel.dequantize(self.kind, *self._kernel_buffers(), dtype if direct else torch.float32, rows,
                                     reuse and direct)
        return w if direct else w.to(dtype)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if x2.shape[0] < self.native_rows:
            return kquant_kernel.matmul(x2, self.kind, *self._kernel_buffers(), self.dtype)
        return F.linear(x2.to(self.dtype), self.dense_weight(self.dtype, reuse=True))


class StackedLinear(nn.Module):
    """One fused layer matrix (q|k|v, gate|up) held as consecutive row ranges of different kinds:
    y = [part_0(x), part_1(x), ...]. A GGUF file may store a fused matrix's parts in types that share
    no layout — Q4_K_M's q and k in Q4_K, v in Q6_K in half the layers. One int8 matrix for all of them
    read 1.8x the bytes of the 4-bit parts at every token (zen-eco-4b: 6.6 MB a layer); as parts, each
    keeps its own codes. The native decode step runs the parts back to back into one output row."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        if len({p.in_features for p in parts}) != 1:
            raise ValueError("stacked parts must share in_features")
        self.parts = nn.ModuleList(parts)
        self.in_features = parts[0].in_features
        self.out_features = sum(p.out_features for p in parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([part(x) for part in self.parts], dim=-1)


class Int8Embedding(nn.Module):
    """The embedding of a model whose tied output head is an `Int8Linear` (row i is codes[i] * scale[i])
    or an `Int8BlockLinear` (block scales), read from the head's own buffers, so the
    vocabulary table exists once, in int8 (for zen-eco-4b 0.39 GB instead of 0.78 GB in bf16); or a
    `KQuantLinear` (a Q6_K table as stored: 0.32 GB), whose rows it dequantizes from the head's buffers."""

    def __init__(self, head: "Int8Linear | Int8BlockLinear | KQuantLinear") -> None:
        super().__init__()
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        # the head itself (not registered as a submodule: its buffers stay the head's, once in a state dict)
        object.__setattr__(self, "kquant", head if isinstance(head, KQuantLinear) else None)
        if self.kquant is not None:
            self.dtype = head.dtype
            return
        self.register_buffer("codes", head.codes)  # the same tensors, not copies
        self.column_codes = head.column_codes  # its rows in column order (the kernel's may differ: pack_int8)
        self.blocks = isinstance(head, Int8BlockLinear)
        self.block_flags = head.block_flags if self.blocks else 0
        self.register_buffer("scales", head.block_scales if self.blocks else head.scales)
        self.dtype = head.dtype if self.blocks else head.scales.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.kquant is not None:  # computed in float32, rounded once
            return self.kquant.dense_rows(ids, torch.float32).view(*ids.shape, -1).to(self.dtype)
        if self.blocks:  # few rows: computed in float32, rounded once
            return _block_rows(self.column_codes(ids), self.scales[ids], self.block_flags, torch.float32).to(self.dtype)
        return self.column_codes(ids).to(self.dtype) * self.scales[ids].unsqueeze(-1)


def _block_rows(picked: torch.Tensor, block_scales: torch.Tensor, flags: int, dtype: torch.dtype) -> torch.Tensor:
    """Rows (..., K) of an int8 weight with block scales in column order, and their block scales (`Int8BlockLinear`'s
    rows and flags), in `dtype`."""
    nb = picked.shape[-1] // 32
    planes = block_scales[..., :nb].to(dtype)  # (..., planes, nb)
    halves = planes[..., : 1 + (flags & q4_kernel.HALVES), :]  # first and (where stored) last 16 columns' scale
    w = picked.view(*picked.shape[:-1], nb, 2, 16).to(dtype) * halves.movedim(-2, -1)[..., None]
    if flags & q4_kernel.OFFSET_HALVES:  # the last two planes: each half's offset
        w = w + planes[..., -2:, :].movedim(-2, -1)[..., None]
    elif flags & q4_kernel.OFFSETS:
        w = w + planes[..., -1, :, None, None]
    return w.view(picked.shape)
