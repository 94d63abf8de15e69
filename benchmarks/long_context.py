"""Long context on a CPU: zen-eco-4b-thinking (INT4 weights) decoding at 4K / 32K / 160K cached tokens.

    python benchmarks/long_context.py            # every KV format x depth, then the quality table
    python benchmarks/long_context.py --formats k4v2 --depths 163840 -n 16 -t 2 --group 128 --no-quality

The model has random weights built in memory, never in bf16: each layer matrix is an `Int4Linear`
made straight from random 4-bit codes (`--group` 128: 1.93 GB for the 36 layers; 32: 2.27 GB), plus the tied
151,936 x 2,560 embedding / output head as `--quant int4` loads it: one int8 table with a scale per
row (0.39 GB), read by the head (`Int8Linear`) and by the embedding lookup (`Int8Embedding`). The KV
cache is filled directly with random K/V (N(0, 1), the scale of RMS-normed keys) through the cache's
own `write`/`update`, 4,096 positions at a time, for layer 0, whose storage is then copied to the
other 35 layers — no 160K-token prefill.
Then 16 tokens are decoded and timed one by one (the mean leaves out the first).

Each (format, depth) runs in a fresh subprocess, so its peak RSS (ru_maxrss) is its own. A
combination whose estimated footprint (weights + KV bytes + 1 GiB) exceeds the memory available now
is skipped and says so (bf16 at 160K needs ~24 GB of KV alone).

The bound: every decode step reads all weights once (int4 codes + scales, and the int8 head) and
every cached K/V byte once, so latency >= (weight bytes + KV bytes) / read bandwidth, the bandwidth
measured here first (a 1 GiB float32 array summed with the same threads).

Quality (unless --no-quality): the same formats on real small models (default: the bundled
SmolLM2-135M; --quality-models adds e.g. a Gemma-3-270M GGUF), fp32, against their full-precision
cache: logits of 256 teacher-forced decode steps after a 1,024-token WikiText-2 prompt (max |difference|,
KL, top-1 agreement, NLL) and perplexity over 8 windows of 2,048 tokens.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

FILL_CHUNK = 4096
MiB = 1 << 20


# --------------------------------------------------------------------------- the model


def build_int4_model(preset: str = "zen-eco-4b-thinking", group: int = 32, seed: int = 0):
    """A Transformer of `preset` whose layer matrices are Int4Linear from random codes, built on the
    meta device so no float copy of a matrix ever exists (peak ~ the final size plus one matrix)."""
    from torch import nn

    from zen_eco.config import preset as get_preset
    from zen_eco.model import RMSNorm, Transformer
    from zen_eco.quant import LAYER_LINEARS, Int8Embedding, Int8Linear, Q4Weight, Q8Weight, quantized_linear

    cfg = get_preset(preset)
    gen = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        model = Transformer(cfg)
    codes: dict[tuple[int, int], torch.Tensor] = {}  # one random matrix per shape: speed does not depend on values
    for name in [f"layers.{i}.{m}" for i in range(cfg.num_hidden_layers) for m in LAYER_LINEARS]:
        shape = tuple(model.get_submodule(name).weight.shape)
        if shape not in codes:
            codes[shape] = torch.randint(0, 16, shape, dtype=torch.uint8, generator=gen)
        # (code - 7.5) * scale: uniform on +-0.037, std 0.021 (an init-sized weight)
        scale = torch.full((shape[0], shape[1] // group), 0.005)
        q4 = Q4Weight(codes[shape], scale, -7.5 * scale)
        model.set_submodule(name, quantized_linear(q4, None, torch.bfloat16, "cpu"))
    codes.clear()
    # the tied vocabulary table as `--quant int4` loads it: int8 codes + a scale per row, shared by the
    # output head (Int8Linear) and the embedding lookup (Int8Embedding)
    assert cfg.tie_word_embeddings
    table = torch.randint(-127, 128, (cfg.vocab_size, cfg.hidden_size), dtype=torch.int8, generator=gen)
    model.lm_head = Int8Linear(Q8Weight(table, torch.full((cfg.vocab_size,), 0.02 / 64)), None, torch.bfloat16)
    model.embed = Int8Embedding(model.lm_head)
    for module in model.modules():
        if isinstance(module, RMSNorm):
            module.weight = nn.Parameter(torch.ones(module.weight.shape[0], dtype=torch.bfloat16), requires_grad=False)
    left = [n for n, p in model.named_parameters() if p.is_meta]
    assert not left, f"still on the meta device: {left[:3]}"
    return model.eval()


def weight_bytes(model) -> int:
    """Bytes a decode step reads from the weights: every tensor once (the tied int8 table is the
    head's, read whole; the embedding lookup reads one row of it)."""
    seen, total = set(), 0
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.data_ptr() not in seen and "inv_freq" not in name:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


# --------------------------------------------------------------------------- one configuration (child)


def fill(cache, depth: int, seed: int = 1) -> None:
    """Make `cache` hold `depth` positions of random K/V through its own protocol (reserve, write,
    advance), layer 0 only; then copy layer 0's storage into every other layer (a decode step's
    speed does not depend on the values, and quantizing 36 layers x 160K positions takes minutes)."""
    from zen_eco.kv_quant import QuantizedKVCache

    gen = torch.Generator().manual_seed(seed)
    shape = (cache.batch_size, cache.num_kv_heads, FILL_CHUNK, cache.head_dim)
    pool = [torch.randn(shape, generator=gen).to(cache.dtype) for _ in range(4)]  # N(0, 1): RMS-normed keys' scale
    write = getattr(cache, "write", None) or cache.update
    cache.reserve(depth)  # one growth to the full depth (a real run grows block by block)
    for i, start in enumerate(range(0, depth, FILL_CHUNK)):
        n = min(FILL_CHUNK, depth - start)
        write(0, pool[i % 4][:, :, :n], pool[(i + 1) % 4][:, :, :n])
        cache.advance(n)
    pairs = []  # (layer l's tensor, layer 0's)
    if isinstance(cache, QuantizedKVCache):
        for page in cache.pages:
            pairs += [(d, s) for layer in range(1, cache.num_layers) for d, s in zip(page[layer], page[0])]
        buffers = (cache.res_k, cache.res_v, cache.sink_k, cache.sink_v)
    else:
        buffers = (cache.keys, cache.values)
    pairs += [(b[layer], b[0]) for b in buffers for layer in range(1, len(b))]
    for dst, src in pairs:
        if dst is not None:
            dst.copy_(src)


@torch.inference_mode()
def run_one(kv_format: str, depth: int, gen_tokens: int, threads: int, group: int = 32) -> dict:
    from zen_eco.checkpoint.load import release_freed_memory
    from zen_eco.engine.graphs import decode_one

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    model = build_int4_model(group=group)
    release_freed_memory()  # the build's temporaries: freed, but glibc keeps ~0.25 GiB of them resident
    build_s = time.perf_counter() - t0
    cache = model.new_cache(max_tokens=depth + gen_tokens + 1, kv_format=kv_format)
    t0 = time.perf_counter()
    fill(cache, depth)
    release_freed_memory()
    fill_s = time.perf_counter() - t0
    kv_bytes = cache.nbytes()
    token = 1000
    times, cpu = [], []
    for _ in range(gen_tokens):  # decode_one: the step `zen-eco run` takes (one C call for a bf16 cache)
        t, c = time.perf_counter(), time.process_time()
        logits = decode_one(model, cache, token)
        token = int(logits[0, -1].argmax())
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    return {
        "kv_cache": kv_format, "depth": depth, "threads": threads, "gen_tokens": gen_tokens, "group": group,
        "ms_per_token": 1000 * statistics.mean(times[1:] or times), "ms_first": 1000 * times[0],
        "ms_best": 1000 * min(times), "cpu_ms_per_token": 1000 * statistics.mean(cpu[1:] or cpu),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "kv_mb": kv_bytes / MiB, "weights_mb": weight_bytes(model) / MiB, "build_s": build_s, "fill_s": fill_s,
    }


# --------------------------------------------------------------------------- quality on the default model


@torch.inference_mode()
def quality(formats: list[str], threads: int, model: str | None = None, prompt: int = 1024, steps: int = 256,
            ctx: int = 2048, windows: int = 8) -> list[dict]:
    """Each format against the full-precision cache of `model` (default: the bundled SmolLM2), fp32.
    Decode: WikiText-2 tokens 2000.. as a `prompt`-token prefill then `steps` teacher-forced decode
    steps, the way generation fills a cache (so int4/int2 quantize key groups as their window moves);
    the logits of every step compared. Perplexity: `windows` windows of `ctx` tokens, each one prefill,
    scored on its second half (llama-perplexity's method)."""
    import zen_eco
    from zen_eco.perplexity import default_text_path, read_text, score_windows

    torch.set_num_threads(threads)
    zm = zen_eco.load(model, dtype="float32", device="cpu")
    ids = zm.tokenizer.encode(read_text(default_text_path()))
    seq = ids[2000 : 2000 + prompt + steps]

    def decode(fmt: str) -> torch.Tensor:
        cache = zm.model.new_cache(max_tokens=len(seq), kv_format=fmt)
        out = [zm.model(torch.tensor([seq[:prompt]]), cache)[0, -1:]]
        out += [zm.model(torch.tensor([[t]]), cache)[0] for t in seq[prompt:-1]]
        return torch.cat(out)  # (steps, vocab): the next-token logits after positions prompt - 1 ..

    def ppl(fmt: str) -> float:
        def logits(window):
            return zm.model(torch.tensor([window]), zm.model.new_cache(max_tokens=len(window), kv_format=fmt))[0]

        bos = zm.tokenizer.bos_token_id if zm.tokenizer.add_bos else None
        return score_windows(logits, ids[: windows * ctx], ctx, bos).ppl

    base = decode("bf16")
    targets = torch.tensor(seq[prompt:])
    rows = []
    for fmt in ["bf16", *[f for f in formats if f != "bf16"]]:
        got = base if fmt == "bf16" else decode(fmt)
        logp, ref = torch.log_softmax(got, -1), torch.log_softmax(base, -1)
        rows.append({
            "model": Path(zm.path).name, "kv_cache": fmt, "max_abs_logit_diff": float((got - base).abs().max()),
            "mean_abs_logit_diff": float((got - base).abs().mean()),
            "kl": float((ref.exp() * (ref - logp)).sum(-1).mean()),
            "top1_agree": float((got.argmax(-1) == base.argmax(-1)).float().mean()),
            "decode_nll": float(torch.nn.functional.nll_loss(logp, targets)),
            "ppl": ppl(fmt), "ppl_ctx": ctx,
        })
    return rows


# --------------------------------------------------------------------------- driver


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--formats", default="bf16,int8,int4,k4v2,int2")
    p.add_argument("--depths", default="4096,32768,163840")
    p.add_argument("-n", "--gen-tokens", type=int, default=16)
    p.add_argument("-t", "--threads", type=int, default=2)
    p.add_argument("--group", type=int, default=128, choices=(32, 64, 128),
                   help="INT4 group size of the layer weights (128: 4.25 bits a weight with the float16 scales)")
    p.add_argument("--no-quality", action="store_true", help="skip the quality table on the default model")
    p.add_argument("--only-quality", action="store_true", help="only the quality table (no 4B runs)")
    p.add_argument("--quality-models", default="default", help="comma-separated model refs for the quality table")
    p.add_argument("--json", help="also write every result to this file")
    p.add_argument("--child", nargs=2, metavar=("FORMAT", "DEPTH"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child[0], int(args.child[1]), args.gen_tokens, args.threads, args.group)))
        return

    import psutil

    from zen_eco.bench import read_bandwidth
    from zen_eco.config import preset
    from zen_eco.kv_quant import bytes_per_token, check_kv_format

    formats = [check_kv_format(f) for f in args.formats.split(",")]
    depths = [] if args.only_quality else [int(d) for d in args.depths.split(",")]
    cfg = preset("zen-eco-4b-thinking")
    bw, bw_cpu = read_bandwidth(args.threads, repeats=7) if depths else (float("nan"), float("nan"))
    print(f"read bandwidth ({args.threads} threads): {bw / 1e9:.2f} GB/s by the wall clock, {bw_cpu / 1e9:.2f} GB/s "
          f"by CPU time; load average {os.getloadavg()[0]:.1f}", flush=True)
    results = {"bandwidth_gb_s": bw / 1e9, "bandwidth_cpu_gb_s": bw_cpu / 1e9, "threads": args.threads,
               "runs": [], "skipped": [], "quality": []}
    weights_est = 3.1e9
    for fmt in formats:
        for depth in depths:
            kv = bytes_per_token(fmt, cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim) * depth
            avail = psutil.virtual_memory().available
            if weights_est + kv + (1 << 30) > avail:
                why = f"needs ~{(weights_est + kv) / 1e9:.1f} GB (KV {kv / 1e9:.1f} GB), {avail / 1e9:.1f} GB available"
                print(f"{fmt:>5} @ {depth:>6}: skipped, {why}", flush=True)
                results["skipped"].append({"kv_cache": fmt, "depth": depth, "why": why})
                continue
            cmd = [sys.executable, __file__, "--child", fmt, str(depth), "-n", str(args.gen_tokens), "-t", str(args.threads),
                   "--group", str(args.group)]
            load = os.getloadavg()[0]
            out = subprocess.run(cmd, capture_output=True, text=True)
            if out.returncode != 0:
                print(f"{fmt:>5} @ {depth:>6}: failed\n{out.stderr[-2000:]}", flush=True)
                results["skipped"].append({"kv_cache": fmt, "depth": depth, "why": f"failed: {out.stderr[-300:]}"})
                continue
            r = json.loads(out.stdout.strip().splitlines()[-1])
            r["bound_ms"] = 1000 * (r["weights_mb"] + r["kv_mb"]) * MiB / bw
            r["x_bound"] = r["ms_per_token"] / r["bound_ms"]
            # CPU time per token / threads against the CPU-time bandwidth: the figures a quiet machine would show
            r["cpu_bound_ms"] = 1000 * (r["weights_mb"] + r["kv_mb"]) * MiB / bw_cpu
            r["cpu_x_bound"] = r["cpu_ms_per_token"] / args.threads / r["cpu_bound_ms"]
            r["load_before"] = load
            results["runs"].append(r)
            print(f"{fmt:>5} @ {depth:>6}: {r['ms_per_token']:8.1f} ms/token (best {r['ms_best']:.1f}), bound "
                  f"{r['bound_ms']:7.1f} ms -> {r['x_bound']:.2f}x; CPU {r['cpu_ms_per_token'] / args.threads:.1f} ms "
                  f"per thread vs {r['cpu_bound_ms']:.1f} -> {r['cpu_x_bound']:.2f}x; peak RSS {r['peak_rss_mb'] / 1024:.2f} GiB "
                  f"(KV {r['kv_mb'] / 1024:.2f} GiB, weights {r['weights_mb'] / 1024:.2f} GiB); fill {r['fill_s']:.0f} s, "
                  f"load avg {load:.1f}", flush=True)
    if not args.no_quality:
        for model in args.quality_models.split(","):
            for q in quality(formats, args.threads, None if model == "default" else model):
                results["quality"].append(q)
                print(f"quality {q['model']} {q['kv_cache']:>5}: max|dlogit| {q['max_abs_logit_diff']:.3f}, mean "
                      f"{q['mean_abs_logit_diff']:.4f}, KL {q['kl']:.5f}, top-1 {100 * q['top1_agree']:.1f}%, decode NLL "
                      f"{q['decode_nll']:.4f}, PPL {q['ppl']:.3f} (ctx {q['ppl_ctx']})", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
