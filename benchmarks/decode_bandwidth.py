"""How fast the one-row (decode) kernels read a weight: GB/s of codes and scales, int4, int8 blocks, K-quants.

    python benchmarks/decode_bandwidth.py [--threads 1,2] [--matrices 8]

Eight distinct 9728 x 2560 matrices (zen-eco-4b's up matrix's shape; together larger than the L3, so every
call reads from DRAM), int4 in groups of 32 (`q4_kernel.matmul`), int8 with a scale per block of 32
(`q4_kernel.matmul_int8_blocks`) and Q4_K / Q6_K as stored (`kquant_kernel.matmul`, where built), one bf16 row of x
each; the bytes the kernel reads (codes, scales)
over the median time of 5 passes. Against `compare.py`'s read bandwidth it says whether a kernel keeps
up with memory (int8 near it) or runs out of arithmetic first.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from zen_eco import kquant_kernel, q4_kernel
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
    int4, int8, q4k, q6k = [], [], [], []
    for _ in range(args.matrices):
        q = quantize_int4(torch.randn(N, K, generator=gen) * 0.02, 32)
        int4.append(q4_kernel.pack(q.codes, q.scale, q.offset))
        codes = torch.randint(-30, 30, (N, K), dtype=torch.int8, generator=gen)
        scales = q4_kernel.pack_block_scales(torch.rand(N, K // 32, generator=gen) * 0.01)
        int8.append((q4_kernel.pack_int8(codes), *scales))
        if kquant_kernel.available():
            six = lambda: torch.randint(0, 64, (N, K // 32), dtype=torch.uint8, generator=gen)  # noqa: E731
            d = lambda: torch.rand(N, K // 256, generator=gen) * 1e-3  # noqa: E731
            q4k.append(kquant_kernel.pack("q4_k", torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen), six(),
                                          d(), six(), d()))
            q6k.append(kquant_kernel.pack("q6_k", torch.randint(0, 64, (N, K), dtype=torch.uint8, generator=gen),
                                          torch.randint(-128, 128, (N, K // 16), dtype=torch.int8, generator=gen), d()))
    x = torch.randn(1, K, generator=gen).bfloat16()
    cases = {
        "int4 g32": (int4, lambda w: q4_kernel.matmul(x, w[0], w[1], 32, torch.bfloat16)),
        "int8 blocks": (int8, lambda w: q4_kernel.matmul_int8_blocks(x, w[0], w[1], w[2], torch.bfloat16)),
        "q4_k": (q4k, lambda w: kquant_kernel.matmul(x, "q4_k", *w, torch.bfloat16)),
        "q6_k": (q6k, lambda w: kquant_kernel.matmul(x, "q6_k", *w, torch.bfloat16)),
    }
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for name, (weights, run) in cases.items():
            if not weights:
                continue
            nbytes = sum(t.numel() * t.element_size() for w in weights for t in w if isinstance(t, torch.Tensor))
            times = []
            for _ in range(5):
                t = time.perf_counter()
                for w in weights:
                    run(w)
                times.append(time.perf_counter() - t)
            print(f"threads {threads} {name}: {nbytes / statistics.median(times) / 1e9:.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
