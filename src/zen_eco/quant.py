"""Weight-only 4-bit linear layers on PyTorch's packed CPU kernel.

At batch 1 a decoder is bound by reading its weights, and PyTorch's bf16 matmul on a CPU reaches
only part of the memory bandwidth. Its packed int4 kernel reads 4x fewer bytes and runs near
memory speed — with bf16 activations (with fp32 activations it is ~20x slower).

- `Int4Linear`: 4-bit codes in groups of `group_size` along the input dimension,
  w = (code - 8) * scale + zero, one (scale, zero) per group and output row. GGUF Q4_0
  (w = d * (q - 8)) and Q4_1 (w = d * q + m) map onto it without requantizing: scale = d, and
  zero = 0 or m + 8d. Scales are held in the activation dtype (bf16), a rounding of ~2^-9 relative.

The packed kernel is made for few rows (decode). For a prompt it is compute-bound and slow, so from
`DENSE_MIN_ROWS` rows on a layer unpacks its weight to bf16 for that one call and uses the dense
GEMM (which uses the CPU's matrix units); the bf16 copy lives only for the call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

DENSE_MIN_ROWS = 128  # measured on SmolLM2's 3072x576 gate|up: packed ~30 us/row, unpack + GEMM ~4 ms flat


@dataclass
class Q4Weight:
    """A 4-bit weight as stored in a GGUF file: w[r, c] = scale[r, c // group] * codes[r, c] + offset[r, c // group]."""

    codes: torch.Tensor  # (N, K) uint8 in [0, 15]
    scale: torch.Tensor  # (N, K // group) float32
    offset: torch.Tensor  # (N, K // group) float32

    @property
    def group_size(self) -> int:
        return self.codes.shape[1] // self.scale.shape[1]

    def dequantize(self) -> torch.Tensor:
        g = self.group_size
        n, k = self.codes.shape
        w = self.codes.float().view(n, k // g, g) * self.scale[..., None] + self.offset[..., None]
        return w.view(n, k)

    def permute_rows(self, index: torch.Tensor) -> "Q4Weight":
        return Q4Weight(self.codes[index], self.scale[index], self.offset[index])

    @staticmethod
    def cat(parts: list["Q4Weight"]) -> "Q4Weight":
        return Q4Weight(*(torch.cat([getattr(p, f) for p in parts]) for f in ("codes", "scale", "offset")))


def int4_supported(device: torch.device, dtype: torch.dtype) -> bool:
    return device.type == "cpu" and dtype == torch.bfloat16 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")


class Int4Linear(nn.Module):
    def __init__(self, weight: Q4Weight, bias: torch.Tensor | None, dtype: torch.dtype) -> None:
        super().__init__()
        n, k = weight.codes.shape
        self.in_features, self.out_features, self.group_size = k, n, weight.group_size
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(weight.codes.to(torch.int32).contiguous(), 1)
        zero = weight.offset + 8 * weight.scale
        self.register_buffer("packed", packed)
        # (K // group, N, 2): the kernel's layout for per-group (scale, zero)
        self.register_buffer("scales_zeros", torch.stack([weight.scale, zero], -1).transpose(0, 1).contiguous().to(dtype))
        self.register_buffer("bias", None if bias is None else bias.to(dtype))
        # The unpacking below reads PyTorch's private packed layout: use it only if it round-trips.
        self.can_unpack = n % 64 == 0 and torch.equal(self._unpack_codes(), weight.codes)

    def _unpack_codes(self) -> torch.Tensor:
        """The (N, K) uint8 codes back from the CPU packing: rows go in blocks of 64, and each block is
        bytes [K/2][2][32] where byte (kp, parity, r) holds column 2*kp + parity of row r in its low
        nibble and of row r + 32 in its high nibble."""
        n, k = self.out_features, self.in_features
        p = self.packed.view(n // 64, k // 2, 2, 32)
        halves = torch.stack((p & 15, p >> 4), dim=1)  # (N/64, 2, K/2, 2, 32)
        return halves.permute(0, 1, 4, 2, 3).reshape(n, k)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """(N, K) weight in `dtype`: (code - 8) * scale + zero, from the packed buffers."""
        n, k, g = self.out_features, self.in_features, self.group_size
        scale, zero = self.scales_zeros.to(dtype).unbind(-1)  # (K/g, N) each
        scale, zero = scale.t().contiguous()[..., None], zero.t().contiguous()[..., None]  # (N, K/g, 1)
        codes = self._unpack_codes().view(n, k // g, g).to(dtype)
        return torch.addcmul(zero - 8 * scale, codes, scale).reshape(n, k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if self.can_unpack and x2.shape[0] >= DENSE_MIN_ROWS:
            out = F.linear(x2, self.dense_weight(x.dtype))
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.packed, self.group_size, self.scales_zeros)
        out = out.view(*shape, self.out_features)
        return out if self.bias is None else out + self.bias
