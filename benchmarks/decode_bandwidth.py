"""How fast the one-row (decode) kernels read a weight: GB/s of codes and scales, int4 and int8 blocks.

    python benchmarks/decode_bandwidth.py [--threads 1,2] [--matrices 8]

Eight distinct 9728 x 2560 matrices (zen-eco-4b's up matrix's shape; together larger than the L3, so every
call reads from DRAM), int4 in groups of 32 (`q4_kernel.matmul`) and int8 with a scale per block of 32
(`q4_kernel.matmul_int8_blocks`), one bf16 row of x each; the bytes the kernel reads (codes, scales)
over the median time of 5 passes. Against `compare.py`'s read bandwidth it says whether a kernel keeps
up with memory (int8 near it) or runs out of arithmetic first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from zen_eco import q4_kernel
from zen_eco.quant import quantize_int4

N, K = 9728, 2560


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--matrices", type=int, default=8)
    args = p.parse_args()
    if not q4_kernel.available():
        raise SystemExit("the C kernel cannot be built here")
    gen = torch.Generator().manual_seed(0)
    int4, int8 = [], []
    for _ in range(args.matrices):
        q = quantize_int4(torch.randn(N, K, generator=gen) * 0.02, 32)
        int4.append(q4_kernel.pack(q.codes, q.scale, q.offset))
        codes = torch.randint(-30, 30, (N, K), dtype=torch.int8, generator=gen)
        int8.append((codes, *q4_kernel.pack_block_scales(torch.rand(N, K // 32, generator=gen) * 0.01)))
    x = torch.randn(1, K, generator=gen).bfloat16()
    cases = {
        "int4 g32": (int4, lambda w: q4_kernel.matmul(x, w[0], w[1], 32, torch.bfloat16)),
        "int8 blocks": (int8, lambda w: q4_kernel.matmul_int8_blocks(x, w[0], w[1], w[2], torch.bfloat16)),
    }
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name, (weights, run) in cases.items():
            nbytes = sum(w[0].numel() * w[0].element_size() + w[1].numel() * w[1].element_size() for w in weights)
            times = []
            for _ in range(5):
                t = time.perf_counter()
                for w in weights:
                    run(w)
                times.append(time.perf_counter() - t)
            print(f"threads {threads} {name}: {nbytes / statistics.median(times) / 1e9:.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
