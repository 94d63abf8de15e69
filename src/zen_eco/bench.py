"""`zen-eco bench`: prefill tok/s, decode tok/s, time to first token and peak RSS of one model.

The prompt is `prompt_tokens` random ids drawn with a fixed seed (the same ids every run, so two
engines can be given identical input; `prompt_ids()` is shared with benchmarks/). Decoding feeds
the greedy token back and never stops early, so every run decodes exactly `gen_tokens` tokens.
Each figure is the best of `repeats` runs after one warm-up: the machine's noise only ever slows a
run down.
"""

from __future__ import annotations

import json
import resource
import time

import torch

BENCH_SEED = 1234


def prompt_ids(n: int, vocab_size: int, seed: int = BENCH_SEED) -> list[int]:
    gen = torch.Generator().manual_seed(seed)
    # stay below 1000 ids from the top: special tokens live there in most vocabularies
    return torch.randint(0, max(vocab_size - 1000, vocab_size // 2), (n,), generator=gen).tolist()


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


@torch.inference_mode()
def measure(model, ids: list[int], gen_tokens: int, repeats: int) -> dict[str, float]:
    from .engine import native_step
    from .engine.generate import PREFILL_CHUNK
    from .engine.graphs import decode_one, graphs_apply

    device = model.device
    prompt = torch.tensor([ids], device=device)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    best_prefill, best_ttft, best_decode = float("inf"), float("inf"), float("inf")
    warmup_s = 0.0
    # One cache for every run, emptied between them, as a server or the API reuses theirs: on CUDA
    # the decode step recorded as a graph in run 0 (the warm-up) is replayed by the timed runs.
    cache = model.new_cache(max_tokens=len(ids) + gen_tokens + 1)
    for run in range(repeats + 1):  # run 0 warms up allocators and kernels
        cache.trim(0)
        sync()
        t0 = time.perf_counter()
        for at in range(0, len(ids), PREFILL_CHUNK):  # in the chunks `zen-eco run`, chat and serve prefill in
            logits = model(prompt[:, at : at + PREFILL_CHUNK], cache, last_only=True)
        token = int(logits[0, -1].argmax())
        sync()
        t1 = time.perf_counter()
        for _ in range(gen_tokens):
            logits = decode_one(model, cache, token)
            token = int(logits[0, -1].argmax())
        sync()
        t2 = time.perf_counter()
        if not run:
            warmup_s = t2 - t0  # the cold start: includes recording a graph, or compiling the step
        else:
            best_prefill = min(best_prefill, t1 - t0)
            best_ttft = min(best_ttft, t1 - t0)
            best_decode = min(best_decode, t2 - t1)
    return {
        "prefill_tok_s": len(ids) / best_prefill,
        "decode_tok_s": gen_tokens / best_decode,
        "ttft_ms": best_ttft * 1000,
        "peak_rss_mb": peak_rss_mb(),
        "warmup_s": warmup_s,
        "static_step": graphs_apply(model, cache),  # decode took the recordable / compilable step
        "native_step": not graphs_apply(model, cache) and native_step.applies(model, cache),  # ... or one C call
    }


def weight_bytes_per_token(model) -> int:
    """Bytes of weights one decode step reads: every tensor once, the embedding table only where it
    is also the head (tied) — a lookup reads one row of it."""
    sizes = {}
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        if not name.startswith("embed.") and "inv_freq" not in name:
            sizes[t.data_ptr()] = t.numel() * t.element_size()
    return sum(sizes.values())


def kv_bytes_read(model, kv_format: str, context: float) -> float:
    """Bytes of K/V one decode step reads at `context` cached positions: every layer over all of them, a
    sliding layer over its window."""
    from .kv_quant import bytes_per_token

    cfg = model.config
    per_layer = bytes_per_token(kv_format, 1, cfg.num_key_value_heads, cfg.head_dim, model.kv_dtype or model.dtype)
    return per_layer * cfg.attended_positions(context)


READ_PROBE = r"""
#include <stdint.h>
#include <string.h>
typedef uint64_t u64x8 __attribute__((vector_size(64)));
/* The xor of every 8-byte word of p[0, chunks * 4096), 4 KB per task over `threads` OpenMP threads:
   four independent 64-byte loads per step, each chunk prefetched two chunks ahead. */
uint64_t zen_read(const uint8_t *p, int64_t chunks, int threads) {
    uint64_t out = 0;
    #pragma omp parallel for num_threads(threads) schedule(static) reduction(^:out)
    for (int64_t c = 0; c < chunks; c++) {
        const uint8_t *q = p + c * 4096;
        u64x8 a = {0}, b = a, d = a, e = a, x;
        for (int i = 0; i < 4096; i += 256) {
            __builtin_prefetch(q + 2 * 4096 + i, 0, 2);
            __builtin_prefetch(q + 2 * 4096 + i + 128, 0, 2);
            memcpy(&x, q + i, 64), a ^= x;
            memcpy(&x, q + i + 64, 64), b ^= x;
            memcpy(&x, q + i + 128, 64), d ^= x;
            memcpy(&x, q + i + 192, 64), e ^= x;
        }
        a ^= b ^ d ^ e;
        for (int k = 0; k < 8; k++) out ^= a[k];
    }
    return out;
}
"""


def read_probe():
    """READ_PROBE compiled, `zen_read(pointer, chunks of 4 KB, threads)` typed; None without a C compiler."""
    import ctypes

    from . import native

    lib = native.build("read_probe", READ_PROBE)
    if lib is not None:
        lib.zen_read.restype = ctypes.c_uint64
        lib.zen_read.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    return lib


def read_bandwidth(threads: int, gib: float = 1.0, repeats: int = 5) -> tuple[float, float]:
    """Bytes per second that `threads` threads read from memory (the best of `repeats` passes over an
    array far bigger than the last-level cache), by the wall clock and by this process's CPU time
    (which a machine shared with other work inflates less). The pass is a small C loop (READ_PROBE:
    wide loads, software prefetch), which reads ~30% faster here than torch.sum did, so that kernels
    are not measured against a slower reader than themselves; torch.sum where no C compiler is found."""
    torch.set_num_threads(threads)
    a = torch.ones(int(gib * (1 << 30)) // 4096 * 1024)  # whole 4 KB chunks
    lib = read_probe()

    def one_pass() -> None:
        if lib is None:
            a.sum()
        else:
            lib.zen_read(a.data_ptr(), a.nbytes // 4096, threads)

    one_pass()

    def timed(clock) -> float:
        t0 = clock()
        one_pass()
        return clock() - t0

    wall = min(timed(time.perf_counter) for _ in range(repeats))
    cpu = min(timed(time.process_time) for _ in range(repeats))
    return a.numel() * 4 / wall, a.numel() * 4 * threads / cpu


def cpu_kernels() -> str:
    """Which of our C loops this process's build runs on the CPU: kquant_kernel.loop()'s name ("avx512-vnni",
    "avx-vnni", "avx2"), else "plain C" (no AVX2) or "pytorch" (no C compiler, or ZEN_ECO_NATIVE=0)."""
    from . import kquant_kernel, q4_kernel

    return kquant_kernel.loop() or ("plain C" if q4_kernel.available() else "pytorch")


def weights_summary(model) -> str:
    """'int4 x120 + int8 x1 + bfloat16': how many linear layers run on the 4-bit (5-bit), K-quant and 8-bit
    kernels (the tied table counts once, as the head), and the dtype of the rest."""
    from .quant import Int4Linear, Int8BlockLinear, Int8Linear, KQuantLinear

    kinds = (("int4", lambda m: isinstance(m, Int4Linear) and m.bits == 4),
             ("int5", lambda m: isinstance(m, Int4Linear) and m.bits == 5),
             *((kind, lambda m, kind=kind: isinstance(m, KQuantLinear) and m.kind == kind)
               for kind in ("q4_k", "q5_k", "q6_k")),
             ("int8", lambda m: isinstance(m, (Int8Linear, Int8BlockLinear))))
    counts = [(name, sum(map(test, model.modules()))) for name, test in kinds]
    parts = [f"{name} x{n}" for name, n in counts if n]
    return " + ".join([*parts, str(model.dtype).removeprefix("torch.")])


def run_bench(model_ref: str, prompt_tokens: int, gen_tokens: int, threads: int | None, dtype: str,
              device: str, repeats: int, json_out: bool, quant: str = "auto", kv_cache: str = "bf16",
              cuda_graphs: bool = True, compile: bool = False, native_step: bool = True) -> dict:
    from .api import freeze_heap, load_model, pick_device, set_threads
    from .checkpoint import open_checkpoint
    from .errors import ZenError
    from .kv_quant import check_kv_format

    if prompt_tokens < 1 or gen_tokens < 1 or repeats < 1:
        raise ZenError("prompt tokens, gen tokens and repeats must all be >= 1")
    set_threads(threads)
    kv_cache = check_kv_format(kv_cache)
    dev = pick_device(device)
    t0 = time.perf_counter()
    ckpt = open_checkpoint(model_ref)
    model = load_model(ckpt, dtype, dev, quant=quant)
    load_s = time.perf_counter() - t0
    freeze_heap()  # as the CLI does after loading
    model.kv_format = kv_cache
    model.cuda_graphs = cuda_graphs
    model.compile_decode = compile
    model.native_step = native_step
    if prompt_tokens + gen_tokens + 1 > model.config.max_position_embeddings:
        raise ZenError(f"{prompt_tokens} + {gen_tokens} tokens exceed the model's context")
    figures = measure(model, prompt_ids(prompt_tokens, model.config.vocab_size), gen_tokens, repeats)
    static, native = figures.pop("static_step"), figures.pop("native_step")
    result = {
        "engine": "zen-eco",
        "model": str(ckpt.path),
        "dtype": str(model.dtype).removeprefix("torch."),
        "weights": weights_summary(model),
        "kv_cache": kv_cache,
        # what a plain cache stores its rows in: bf16 under a float32 that dtype "auto" picked (Transformer.kv_dtype)
        "kv_dtype": str(model.kv_dtype or model.dtype).removeprefix("torch."),
        "device": str(dev),
        "cpu_kernels": cpu_kernels() if dev.type == "cpu" else None,
        "cuda_graphs": static and cuda_graphs and dev.type == "cuda",
        "compiled": static and compile,
        "native_step": native,
        "threads": torch.get_num_threads(),
        "prompt_tokens": prompt_tokens,
        "gen_tokens": gen_tokens,
        "load_s": load_s,
        # what a decode step reads at the mean context of the timed tokens (for bandwidth use)
        "decode_bytes_per_token": weight_bytes_per_token(model) + kv_bytes_read(model, kv_cache, prompt_tokens + gen_tokens / 2),
        **figures,
    }
    if json_out:
        print(json.dumps(result))
    else:
        from rich.console import Console
        from rich.table import Table

        where = result["device"] + (f" {result['cpu_kernels']}" if result["cpu_kernels"] else "")
        table = Table(title=f"zen-eco bench — {ckpt.path.name} ({result['weights']}, KV {kv_cache}, {where}, "
                            f"{result['threads']} threads)")
        for col in ("prefill tok/s", "decode tok/s", "first token ms", "peak RSS MB", "load s"):
            table.add_column(col, justify="right")
        table.add_row(f"{result['prefill_tok_s']:.1f}", f"{result['decode_tok_s']:.1f}", f"{result['ttft_ms']:.0f}",
                      f"{result['peak_rss_mb']:.0f}", f"{load_s:.1f}")
        Console().print(table)
    return result
