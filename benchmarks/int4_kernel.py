"""INT4 / INT8 matmul at decode (one row of x) from DRAM: our q4_kernel against PyTorch's packed CPU kernels.

    python benchmarks/int4_kernel.py            # zen-eco-4b's layer shapes, 1 and 2 threads
    python benchmarks/int4_kernel.py --int8-head --threads 2   # its tied 151,936 x 2,560 int8 head

Each kernel gets its own copies of the weight (enough of them to exceed ~800 MB, so every call reads
from DRAM, not from the last-level cache, as a decode step does), and the two are timed in turns,
8 rounds, on the same activations (bf16, as `--dtype auto` runs them here). Reported: weight bytes
read per second (codes + scales), best and median over rounds. The machine's own read bandwidth is
`benchmarks/long_context.py`'s first line.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from zen_eco import q4_kernel
from zen_eco.quant import Int4Linear, Int8Linear, Q4Weight, Q8Weight

SHAPES = [(6144, 2560), (2560, 4096), (19456, 2560), (2560, 9728)]  # zen-eco-4b: q|k|v, o, gate|up, down


def measure(n: int, k: int, group: int, threads: int, rounds: int = 8) -> dict:
    """group 0: int8 codes with a scale per row (Int8Linear); else int4 in groups of `group` (Int4Linear)."""
    torch.set_num_threads(threads)
    gen = torch.Generator().manual_seed(0)
    if group:
        q = Q4Weight(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=gen),
                     torch.full((n, k // group), 0.005), torch.full((n, k // group), -0.04))
        cls, bytes_per_weight, torch_backend = Int4Linear, 0.5 + 4 / group, "cpu"
    else:
        q = Q8Weight(torch.randint(-127, 128, (n, k), dtype=torch.int8, generator=gen), torch.full((n,), 3e-4))
        cls, bytes_per_weight, torch_backend = Int8Linear, 1.0, "torch"
    copies = max(2, int(8e8 // (n * k * bytes_per_weight)))
    layers = {name: [cls(q, None, torch.bfloat16, kernel=kernel) for _ in range(copies)]
              for name, kernel in (("torch", "torch"), ("zen-eco", True))}
    assert layers["zen-eco"][0].backend == "native" and layers["torch"][0].backend == torch_backend
    x = torch.randn(1, k, generator=gen).bfloat16()
    times = {name: [] for name in layers}
    for _ in range(rounds):
        for name, ls in layers.items():
            t = time.perf_counter()
            for layer in ls:
                layer(x)
            times[name].append((time.perf_counter() - t) / len(ls))
    nbytes = n * k * bytes_per_weight
    return {name: (nbytes / min(ts) / 1e9, nbytes / statistics.median(ts) / 1e9) for name, ts in times.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--group", type=int, default=32, choices=(32, 64, 128))
    p.add_argument("--threads", default="1,2")
    p.add_argument("--int8-head", action="store_true", help="Int8Linear on zen-eco-4b's tied head instead")
    args = p.parse_args()
    if not q4_kernel.available():
        raise SystemExit("q4_kernel could not be built here (no C compiler?)")
    print("| shape (N x K) | threads | PyTorch GB/s best / median | zen-eco GB/s best / median | ratio (medians) |")
    print("|---|---:|---:|---:|---:|")
    for threads in map(int, args.threads.split(",")):
        for n, k in [(151936, 2560)] if args.int8_head else SHAPES:
            r = measure(n, k, 0 if args.int8_head else args.group, threads)
            print(f"| {n} x {k} | {threads} | {r['torch'][0]:.1f} / {r['torch'][1]:.1f} | {r['zen-eco'][0]:.1f} / "
                  f"{r['zen-eco'][1]:.1f} | {r['zen-eco'][1] / r['torch'][1]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
