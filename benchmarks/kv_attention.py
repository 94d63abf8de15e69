"""Decode attention over each KV cache format, one layer of zen-eco-4b's shape, from DRAM.

    python benchmarks/kv_attention.py                       # every format, 4K and 32K, 2 threads
    python benchmarks/kv_attention.py --formats k4v2 --depths 32768 --threads 1,2

A cache of `--layers` layers (8 KV heads, 32 query heads, head_dim 128; enough layers that a step
reads from DRAM, not the last-level cache) is filled with random K/V to each depth; then one decode
step's `attend` (store the new token, attend over everything: sinks, codes, residual window) is timed
per layer, best of 5 rounds. (bf16 is the plain cache's SDPA attend, as the PyTorch step runs it; the C
step has its own bf16 attention, measured by long_context.py.) Reported: ms per layer, the same times 36 layers (the model's attention
share of a step), and ns per position and KV head per thread. `long_context.py` measures whole steps.
"""

from __future__ import annotations

import argparse
import time

import torch

from zen_eco import kv_quant

KV_HEADS, REP, HEAD_DIM, MODEL_LAYERS = 8, 4, 128, 36


@torch.inference_mode()
def measure(fmt: str, depth: int, threads: int, layers: int, rounds: int = 5) -> dict:
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    cache = kv_quant.make_kv_cache(fmt, layers, KV_HEADS, HEAD_DIM, depth + 8, dtype=torch.bfloat16)
    cache.reserve(depth + 1)
    write = getattr(cache, "write", cache.update)  # bf16: a plain KVCache
    for start in range(0, depth, 4096):
        n = min(4096, depth - start)
        for layer in range(layers):
            write(layer, torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=gen).bfloat16(),
                        torch.randn(1, KV_HEADS, n, HEAD_DIM, generator=gen).bfloat16())
        cache.advance(n)
    q = torch.randn(1, KV_HEADS * REP, HEAD_DIM, generator=gen).bfloat16()
    k, v = (torch.randn(1, KV_HEADS, 1, HEAD_DIM, generator=gen).bfloat16() for _ in range(2))
    best = float("inf")
    for _ in range(rounds):
        t = time.perf_counter()
        for layer in range(layers):
            cache.attend(layer, q, k, v, None, None)
        best = min(best, (time.perf_counter() - t) / layers)
    return {"kv_cache": fmt, "depth": depth, "threads": threads, "ms_per_layer": 1e3 * best,
            "ms_per_step_36_layers": 1e3 * best * MODEL_LAYERS,
            "ns_per_position_head_thread": best / (depth * KV_HEADS) * 1e9 * threads}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="bf16,int8,int4,k4v2,int2")
    p.add_argument("--depths", default="4096,32768")
    p.add_argument("--threads", default="2")
    p.add_argument("--layers", type=int, default=0, help="cache layers (default: enough for ~1 GB)")
    args = p.parse_args()
    for depth in (int(d) for d in args.depths.split(",")):
        for fmt in args.formats.split(","):
            per_layer = kv_quant.bytes_per_token(fmt, 1, KV_HEADS, HEAD_DIM) * depth
            layers = args.layers or max(2, min(36, int(1e9 // per_layer)))
            for threads in (int(t) for t in args.threads.split(",")):
                r = measure(fmt, depth, threads, layers)
                print(f"{fmt:>5} depth {depth:>6} threads {threads}: {r['ms_per_layer']:.2f} ms/layer, "
                      f"x36 {r['ms_per_step_36_layers']:.0f} ms, {r['ns_per_position_head_thread']:.1f} ns per "
                      f"position and KV head per thread ({layers} layers)", flush=True)


if __name__ == "__main__":
    main()
