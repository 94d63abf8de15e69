"""The arithmetic floor of integer decode attention on this CPU: how fast `vpdpbusd` (AVX-512 VNNI, 64
byte products per instruction) runs, and what that allows per (position, KV head).

    python benchmarks/vnni_floor.py                  # 1 and 2 threads, zen-eco-4b's shape
    python benchmarks/vnni_floor.py --threads 2 --rep 4 --head-dim 128

An integer path (kv_kernel's KIVI and int8 formats) multiplies every code once per query of its KV
head, for keys and for values: 2 x rep x head_dim byte products per (position, KV head), i.e.
2 x rep x head_dim / 64 instructions, whatever the bit width. Timed here: 16 independent accumulator
chains of the memory-broadcast form kv_kernel uses (`vpdpbusd m32{1to16}`), per thread. Printed: ns per
instruction, the floor in ns per (position, KV head) and thread, and the read rate in GB/s that this
floor allows each format over all threads (bytes per position and KV head, scales left out): where that
is below the machine's read bandwidth, a step at depth is bound by arithmetic, not memory.
"""

from __future__ import annotations

import argparse
import ctypes

import torch

from zen_eco import native

C_SOURCE = r"""
#include <stdint.h>
#include <omp.h>
#include <time.h>

static double now(void) { struct timespec t; clock_gettime(CLOCK_MONOTONIC, &t); return t.tv_sec + t.tv_nsec * 1e-9; }

/* ns per vpdpbusd (zmm, broadcast memory operand) per thread, 16 chains; -1 without AVX-512 VNNI */
double zen_vnni_ns(int64_t steps, int threads) {
#if defined(__AVX512VNNI__)
    double worst = 0.0;
    #pragma omp parallel num_threads(threads) reduction(max:worst)
    {
        typedef int32_t v16i __attribute__((vector_size(64)));
        v16i a[16], x = {3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31, 33};
        int32_t q[16];
        for (int i = 0; i < 16; i++) { q[i] = i + 1; a[i] = x * i; }
        const double t0 = now();
        for (int64_t n = 0; n < steps; n++)
            for (int i = 0; i < 16; i++) __asm__ volatile("vpdpbusd %1%{1to16%}, %2, %0" : "+v"(a[i]) : "m"(q[i]), "v"(x));
        const double dt = now() - t0;
        int32_t sink = 0;
        for (int i = 0; i < 16; i++) sink += a[i][0];
        __asm__ volatile("" : : "r"(sink));
        worst = dt / (steps * 16.0) * 1e9;
    }
    return worst;
#else
    (void)steps, (void)threads;
    return -1.0;
#endif
}
"""

# bytes of codes per (position, KV head) at head_dim d: keys + values
FORMAT_BYTES = {"int8": lambda d: 2 * d, "int4": lambda d: d, "k4v2": lambda d: d * 3 // 4, "int2": lambda d: d // 2}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rep", type=int, default=4, help="query heads per KV head (zen-eco-4b: 32 / 8)")
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--steps", type=int, default=20_000_000)
    args = ap.parse_args()
    lib = native.build("vnni_floor", C_SOURCE)
    if lib is None:
        raise SystemExit("no C compiler here")
    lib.zen_vnni_ns.restype = ctypes.c_double
    lib.zen_vnni_ns.argtypes = [ctypes.c_int64, ctypes.c_int]
    per_pair = 2 * args.rep * args.head_dim / 64  # instructions per (position, KV head)
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        lib.zen_vnni_ns(args.steps // 10, threads)  # warm-up (clocks)
        ns = lib.zen_vnni_ns(args.steps, threads)
        if ns < 0:
            raise SystemExit("this build has no AVX-512 VNNI")
        floor = per_pair * ns
        rates = ", ".join(f"{f} {b(args.head_dim) * threads / floor:.1f}" for f, b in FORMAT_BYTES.items())
        print(f"threads {threads}: {ns:.3f} ns per vpdpbusd; {per_pair:.0f} per (position, KV head) at rep "
              f"{args.rep}, head_dim {args.head_dim}: floor {floor:.2f} ns per pair and thread; "
              f"GB/s of codes that allows: {rates}")


if __name__ == "__main__":
    main()
