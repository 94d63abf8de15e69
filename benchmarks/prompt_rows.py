"""A quantized layer's prompt matmul three ways: the row kernel, the prompt GEMM, the dense GEMM.

    python benchmarks/prompt_rows.py --threads 1,2

For a (9728 x 2560) weight (zen-eco-4b's up matrix's shape), int8 with a scale per block of 32 (Q8_0) and int4 in groups
of 32, for 2 to 512 rows of bf16 activations: our row kernel (`zen_*_linear`, what decode runs), our
prompt GEMM (`prompt_gemm`, where AVX-512 VNNI is built) and dequantizing into the reused buffer for a
bf16 `F.linear` (PyTorch's GEMM: what a layer did for long prompts before the prompt GEMM, and still
does where it is not built); and K-quants as stored (`kquant_kernel`, where built): Q4_K on the same shape,
Q6_K on the transposed one (2560 x 9728, the down matrix that Q4_K_M stores Q6_K), row kernel, GEMM and
dense; median ms of 5 calls each, in turns. `--dtype float32`: float32 activations and a float32 dense GEMM
(what `--dtype auto` gives on CPUs without native bf16, most AVX2 ones).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from zen_eco import kquant_kernel, q4_kernel
from zen_eco.quant import Int4Linear, Int8BlockLinear, KQuantLinear, KQuantWeight, Q8BlockWeight, quantize_int4

N, K = 9728, 2560


def _median_ms(fn, rounds: int = 5) -> float:
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rows", default="2,4,8,16,32,64,128,512")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"],
                   help="the activations' (and the dense GEMM's) dtype: float32 is what an AVX2 CPU's model runs in")
    args = p.parse_args()
    dt = getattr(torch, args.dtype)
    if not q4_kernel.available():
        raise SystemExit("the C kernel cannot be built here")
    gen = torch.Generator().manual_seed(0)
    scales = lambda: torch.rand(N, K // 32, generator=gen) * 0.01  # noqa: E731
    int8 = Int8BlockLinear(Q8BlockWeight(torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen), scales()),
                           None, dt)  # Q8_0's layout: a scale per block of 32
    int4 = Int4Linear(quantize_int4(torch.randn(N, K, generator=gen) * 0.02, 32), None, dt)
    kquant = {}
    if kquant_kernel.available():
        six = lambda: torch.randint(0, 64, (N, K // 32), dtype=torch.uint8, generator=gen)  # noqa: E731
        d = lambda rows, cols: torch.rand(rows, cols // 256, generator=gen) * 1e-3  # noqa: E731
        kquant["q4_k"] = (K, KQuantLinear(KQuantWeight("q4_k", torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen),
                                                        six(), d(N, K), six(), d(N, K)), None, dt))
        kquant["q6_k"] = (N, KQuantLinear(KQuantWeight("q6_k", torch.randint(0, 64, (K, N), dtype=torch.uint8, generator=gen),
                                                        torch.randint(-128, 128, (K, N // 16), dtype=torch.int8, generator=gen),
                                                        d(K, N)), None, dt))
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        for m in (int(r) for r in args.rows.split(",")):
            x = torch.randn(m, K, generator=gen).to(dt)
            row = {
                "int8 row": lambda: q4_kernel._q8b_linear(x, int8.codes, int8.block_scales, int8.block_flags,
                                                          dt, gemm=False),
                "int8 gemm": lambda: q4_kernel._q8b_linear(x, int8.codes, int8.block_scales, int8.block_flags,
                                                           dt, gemm=True),
                "int8 dense": lambda: F.linear(x, int8.dense_weight(dt, reuse=True)),
                "int4 row": lambda: q4_kernel._q4_linear(x, int4.packed, int4.scale_zero, 32, dt, gemm=False),
                "int4 gemm": lambda: q4_kernel._q4_linear(x, int4.packed, int4.scale_zero, 32, dt, gemm=True),
                "int4 dense": lambda: F.linear(x, int4.dense_weight(dt, reuse=True)),
            }
            for kind, (cols, layer) in kquant.items():
                xk = torch.randn(m, cols, generator=gen).to(dt)
                bufs = (kquant_kernel.KINDS[kind], layer.packed, layer.high, layer.sub_scales, layer.d, dt)
                row[f"{kind} row"] = lambda xk=xk, bufs=bufs: kquant_kernel._kq_linear(xk, *bufs, gemm=False)
                if q4_kernel.gemm_available():
                    row[f"{kind} gemm"] = lambda xk=xk, bufs=bufs: kquant_kernel._kq_linear(xk, *bufs, gemm=True)
                row[f"{kind} dense"] = lambda xk=xk, layer=layer: F.linear(xk, layer.dense_weight(dt, reuse=True))
            if not q4_kernel.gemm_available():
                del row["int8 gemm"], row["int4 gemm"]
            if m > 128 and q4_kernel.gemm_available():  # the row kernel, which layers leave to the GEMM: minutes
                del row["int8 row"], row["int4 row"]
                for kind in kquant:
                    row.pop(f"{kind} row", None)
            cells = "  ".join(f"{name} {_median_ms(fn):6.1f}" for name, fn in row.items())
            print(f"threads {threads} rows {m:3d}: {cells}  (ms)", flush=True)


if __name__ == "__main__":
    main()
