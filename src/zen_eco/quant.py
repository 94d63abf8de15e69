"""Weight-only 4-bit linear layers on PyTorch's packed CPU kernel.

At batch 1 a decoder is bound by reading its weights, and PyTorch's bf16 matmul on a CPU reaches
only part of the memory bandwidth. Its packed int4 kernel reads 4x fewer bytes and runs near
memory speed — with bf16 activations (with fp32 activations it is ~20x slower).

- `Int4Linear`: 4-bit codes in groups of `group_size` along the input dimension,
  w = (code - 8) * scale + zero, one (scale, zero) per group and output row. GGUF Q4_0
  (w = d * (q - 8)) and Q4_1 (w = d * q + m) map onto it without requantizing: scale = d, and
  zero = 0 or m + 8d. Scales are held in the activation dtype (bf16), a rounding of ~2^-9 relative.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


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

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape[:-1]
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(x.reshape(-1, self.in_features), self.packed,
                                                         self.group_size, self.scales_zeros)
        out = out.view(*shape, self.out_features)
        return out if self.bias is None else out + self.bias
