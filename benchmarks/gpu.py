"""zen-eco-4b on one NVIDIA GPU: bf16 and INT4, time to first token and decode tok/s, CUDA graphs on/off.

    bash benchmarks/gpu.sh                      # the gpu-marked tests, then this with its defaults
    python benchmarks/gpu.py --weights bf16,int4-g128 -p 128 -n 128 --hf --compile bf16 --json gpu.json

The model has random weights made on the GPU (`zen_eco.init.random_model`; INT4 layers quantized as
they are drawn, embedding and tied head in bf16): the speed of a dense decoder does not depend on
the values, and writing and reading an 8 GB checkpoint would cost more than the measurement.

For each weights setting:
- build s: making the model on the GPU (not a checkpoint load);
- TTFT: a `-p`-token prompt prefilled and its first greedy token taken (synchronized), best of `-r`;
- decode tok/s (`zen-eco bench`'s measure: greedy, fed back, `-n` tokens, best of `-r` after a warm-up)
  with CUDA graphs and without;
- engine tok/s: `Sequence` stepping with greedy sampling (the path `zen-eco run` and the server take:
  sampler, logprob, bookkeeping), graphs on;
- graph record ms: recording the decode step once (paid per process and per 256 tokens of growth);
- GB/token: weight bytes read per decode step (+ KV, small at this depth), and the bandwidth that
  implies as a fraction of the copy bandwidth measured first (bytes read + written per second).
--compile adds the decode step compiled by torch.compile inside the graph (and its compile time);
--hf adds transformers' Qwen3ForCausalLM (bf16, eager `generate`, its default) on the same config;
--profile prints the kernels of one eager decode step (count and GPU time by kind);
--micro times one activation row against each layer shape: bf16, INT4 tinygemm, INT8 two ways.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
import traceback

import torch

from zen_eco.bench import measure, prompt_ids
from zen_eco.engine.generate import Sequence
from zen_eco.engine.graphs import DecodeGraph
from zen_eco.engine.sampling import SamplingParams
from zen_eco.init import random_model

from long_context import weight_bytes  # benchmarks/ is on the path when a script here runs

GB = 1e9
DEVICE = "cuda"  # --dry-run: "cpu", to check this script's logic on a machine without a GPU


def sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


class _Event:
    """torch.cuda.Event's timing on the GPU; a wall clock in a dry run."""

    def __init__(self) -> None:
        self.event = torch.cuda.Event(enable_timing=True) if DEVICE == "cuda" else None

    def record(self) -> None:
        if self.event is None:
            self.t = time.perf_counter()
        else:
            self.event.record()

    def elapsed_ms(self, end: "_Event") -> float:
        if self.event is None:
            return (end.t - self.t) * 1000
        end.event.synchronize()
        return self.event.elapsed_time(end.event)


def copy_bandwidth(gib: float = 2.0, repeats: int = 20) -> float:
    """Device-to-device copy, bytes read + written per second (median of `repeats`)."""
    a = torch.empty(int(gib * 2**30) // 2, dtype=torch.bfloat16, device=DEVICE).normal_()
    b = torch.empty_like(a)
    times = []
    for _ in range(repeats + 3):
        start, end = _Event(), _Event()
        start.record()
        b.copy_(a)
        end.record()
        times.append(start.elapsed_ms(end) / 1000)
    del a, b
    return 2 * gib * 2**30 / statistics.median(times[3:])


def read_bytes_per_token(model) -> int:
    """A decode step reads every weight once, except the embedding, of which it reads one row (a tied
    table is read whole by the head)."""
    emb = model.embed.weight
    tied = model.lm_head.weight is emb
    return weight_bytes(model) - (0 if tied else emb.numel() * emb.element_size())


def engine_tok_s(model, ids: list[int], gen_tokens: int, repeats: int) -> float:
    """Greedy `Sequence` steps over one reused cache (the API keeps one): tokens/s after the first."""
    cache = model.new_cache(max_tokens=len(ids) + gen_tokens + 1)
    best = float("inf")
    for run in range(repeats + 1):
        seq = Sequence(model, ids, SamplingParams.greedy(), max_new_tokens=gen_tokens, cache=cache)
        seq.step()  # prefill + first token
        sync()
        t0 = time.perf_counter()
        for _ in range(gen_tokens - 1):
            seq.step()
        sync()
        if run:
            best = min(best, time.perf_counter() - t0)
    return (gen_tokens - 1) / best


@torch.inference_mode()
def record_ms(model, ids: list[int], compile: bool = False) -> float:
    """Time to prepare (record) the decode step once, after a prefill of `ids`."""
    cache = model.new_cache(max_tokens=len(ids) + 8)
    model(torch.tensor([ids], device=DEVICE), cache)
    graph = DecodeGraph(model, cache, compile=compile)
    sync()
    t0 = time.perf_counter()
    graph(ids[-1])
    sync()
    return (time.perf_counter() - t0) * 1000


@torch.inference_mode()
def compiled_decode(model, ids: list[int], gen_tokens: int, repeats: int) -> dict:
    """Decode with the step compiled (torch.compile, default mode) and recorded as a graph."""
    cache = model.new_cache(max_tokens=len(ids) + gen_tokens + 1)
    graph = DecodeGraph(model, cache, compile=True)
    prompt = torch.tensor([ids], device=DEVICE)
    best, first = float("inf"), None
    for run in range(repeats + 1):
        cache.trim(0)
        token = int(model(prompt, cache, last_only=True)[0, -1].argmax())
        sync()
        t0 = time.perf_counter()
        for _ in range(gen_tokens):
            token = int(graph(token)[0, -1].argmax())
        sync()
        elapsed = time.perf_counter() - t0
        if run == 0:
            first = elapsed  # includes compiling and recording
        else:
            best = min(best, elapsed)
    return {"compiled_decode_tok_s": gen_tokens / best, "compile_and_record_s": first - best}


@torch.inference_mode()
def profile_step(model, ids: list[int], compile: bool = False) -> None:
    from torch.profiler import ProfilerActivity, profile

    cache = model.new_cache(max_tokens=len(ids) + 8)
    model(torch.tensor([ids], device=DEVICE), cache)
    graph = DecodeGraph(model, cache, record=False, compile=compile)
    graph(ids[-1])
    sync()
    on_gpu = DEVICE == "cuda"
    with profile(activities=[ProfilerActivity.CUDA if on_gpu else ProfilerActivity.CPU]) as prof:
        graph(ids[-2])
        sync()
    # GPU: the kernels; dry run: the top-level operators
    kernels = [e for e in prof.events() if (e.device_type.name == "CUDA" if on_gpu else e.cpu_parent is None)]
    total = sum(e.device_time for e in kernels)
    by_name: dict[str, list[float]] = {}
    for e in kernels:
        by_name.setdefault(e.name[:70], []).append(e.device_time)
    print(f"  {'compiled' if compile else 'eager'} step: {len(kernels)} kernels, {total / 1000:.2f} ms of kernel time")
    for name, ts in sorted(by_name.items(), key=lambda kv: -sum(kv[1]))[:14]:
        print(f"    {sum(ts) / 1000:7.3f} ms  x{len(ts):4d}  {name}")


SHAPES = [(6144, 2560), (2560, 4096), (19456, 2560), (2560, 9728), (151936, 2560)]  # q|k|v, o, gate|up, down, head


@torch.inference_mode()
def matmul_micro(repeats: int = 50) -> list[dict]:
    """One activation row times each zen-eco-4b weight shape: bf16 F.linear, INT4 tinygemm (g128,
    g32), INT8 on `_weight_int8pack_mm` and on cast codes. Weight GB/s (codes + scales) per kind;
    enough copies of each weight to exceed the L2 cache, used in turns."""
    import torch.nn.functional as F

    from zen_eco.quant import Int4Linear, Int8Linear, quantize_int4, quantize_int8

    rows = []
    for n, k in SHAPES:
        w = torch.randn(n, k, device=DEVICE) * 0.02
        x = torch.randn(1, k, device=DEVICE, dtype=torch.bfloat16)
        kinds = {"bf16": lambda: w.bfloat16()}
        for g in (128, 32):
            kinds[f"int4-g{g}"] = lambda g=g: Int4Linear(quantize_int4(w, g), None, torch.bfloat16, DEVICE)
        q8 = quantize_int8(w)
        kinds["int8-pack"] = lambda: ("pack", Int8Linear(q8, None, torch.bfloat16, DEVICE))
        kinds["int8-cast"] = lambda: Int8Linear(q8, None, torch.bfloat16, DEVICE)
        row = {"shape": f"{n}x{k}"}
        for kind, make in kinds.items():
            try:
                first = make()
                copies = [first] + [make() for _ in range(max(1, int(2.5e8 // (n * k))) - 1)]  # ~250 MB+
                if kind == "bf16":
                    fns = [lambda t=t: F.linear(x, t) for t in copies]
                    nbytes = n * k * 2
                elif kind == "int8-pack":
                    fns = [lambda m=m[1]: torch.ops.aten._weight_int8pack_mm(x, m.codes, m.scales) for m in copies]
                    nbytes = n * k + n * 2
                else:
                    fns = [lambda m=m: m(x) for m in copies]
                    nbytes = sum(b.numel() * b.element_size() for b in copies[0].buffers())
                    if kind.startswith("int4"):
                        row[kind + "_backend"] = copies[0].backend
                for f in fns:
                    f()
                sync()
                start, end = _Event(), _Event()
                start.record()
                for i in range(repeats):
                    fns[i % len(fns)]()
                end.record()
                seconds = start.elapsed_ms(end) / 1000 / repeats
                row[kind] = round(nbytes / seconds / GB, 1)
                row[kind + "_us"] = round(seconds * 1e6, 1)
            except Exception as exc:
                row[kind] = f"failed: {exc}"[:200]
            finally:
                copies = fns = first = None
        rows.append(row)
        print(f"  {row}", flush=True)
        w = None
        if DEVICE == "cuda":
            torch.cuda.empty_cache()
    return rows


def hf_baseline(preset: str, ids: list[int], gen_tokens: int, repeats: int) -> dict:
    import transformers

    from zen_eco.config import preset as get_preset

    cfg = get_preset(preset)
    hf_cfg = transformers.Qwen3Config(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads, head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings)
    with torch.device(DEVICE):
        model = transformers.Qwen3ForCausalLM(hf_cfg).to(torch.bfloat16).eval()
    prompt = torch.tensor([ids], device=DEVICE)

    def run(n: int) -> float:
        sync()
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=0)
        sync()
        return time.perf_counter() - t0

    run(4)
    first = min(run(1) for _ in range(repeats))
    full = min(run(gen_tokens) for _ in range(repeats))
    model = None
    return {"hf_ttft_ms": first * 1000, "hf_decode_tok_s": (gen_tokens - 1) / (full - first)}


def build(preset: str, weights: str):
    """weights: "bf16", "int8", "int4-gN"; "/dense" after a quantized one keeps portable codes that the
    step dequantizes (what torch.compile can fuse into the matmul) instead of the packed kernels."""
    quant, _, variant = weights.partition("/")
    return random_model(preset, torch.bfloat16, DEVICE, quant="none" if quant == "bf16" else quant,
                        kernel=variant != "dense")


def optional(row: dict, key: str, fn) -> None:
    """Run an optional stage; a failure is recorded under `key` and the rest goes on."""
    try:
        fn()
    except Exception:
        row[key] = traceback.format_exc(limit=4)
        print(row[key], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="zen-eco-4b")
    ap.add_argument("--weights", default="bf16,int4-g128,int4-g32", help="comma-separated: bf16, int8, int4-gN")
    ap.add_argument("-p", "--prompt-tokens", type=int, default=128)
    ap.add_argument("-n", "--gen-tokens", type=int, default=128)
    ap.add_argument("-r", "--repeats", type=int, default=3)
    ap.add_argument("--hf", action="store_true", help="also time transformers' eager generate (bf16)")
    ap.add_argument("--compile", default="", help="weights settings to also time with the step torch.compile'd "
                    "(comma-separated; compiling takes a while, so this runs last)")
    ap.add_argument("--profile", action="store_true", help="print one eager decode step's kernels")
    ap.add_argument("--micro", action="store_true", help="also time single matmuls of each layer shape per kernel")
    ap.add_argument("--json", help="write the results here")
    ap.add_argument("--dry-run", action="store_true", help="run the logic on the CPU (use a small --preset)")
    args = ap.parse_args()
    global DEVICE
    if args.dry_run:
        DEVICE, name = "cpu", "CPU dry run"
    elif not torch.cuda.is_available():
        sys.exit("benchmarks/gpu.py needs a CUDA GPU (or --dry-run)")
    else:
        name = torch.cuda.get_device_properties(0).name
    bandwidth = copy_bandwidth(0.25 if args.dry_run else 2.0)
    print(f"{name}, torch {torch.__version__}; copy bandwidth {bandwidth / 1e12:.2f} TB/s", flush=True)
    results = {"device": name, "torch": torch.__version__, "copy_bandwidth_tb_s": bandwidth / 1e12,
               "preset": args.preset, "prompt_tokens": args.prompt_tokens, "gen_tokens": args.gen_tokens, "runs": []}

    def save():
        if args.json:
            with open(args.json, "w") as f:
                json.dump(results, f, indent=1)

    if args.micro:
        print("matmul at one row, weight GB/s:", flush=True)
        results["micro"] = matmul_micro()
        save()
    for weights in [w for w in args.weights.split(",") if w]:
        row: dict = {"weights": weights}
        results["runs"].append(row)
        try:
            t0 = time.perf_counter()
            model = build(args.preset, weights)
            sync()
            row["build_s"] = time.perf_counter() - t0
            ids = prompt_ids(args.prompt_tokens, model.config.vocab_size)
            row["gb_per_token"] = read_bytes_per_token(model) / GB
            row["backends"] = sorted({getattr(m, "backend", "") for m in model.modules()} - {""})
            model.cuda_graphs = False
            eager = measure(model, ids, args.gen_tokens, args.repeats)
            model.cuda_graphs = True
            graphs = measure(model, ids, args.gen_tokens, args.repeats)
            row.update(ttft_ms=min(eager["ttft_ms"], graphs["ttft_ms"]), prefill_tok_s=graphs["prefill_tok_s"],
                       eager_decode_tok_s=eager["decode_tok_s"], graph_decode_tok_s=graphs["decode_tok_s"])
            row["bandwidth_fraction"] = row["gb_per_token"] * GB * row["graph_decode_tok_s"] / bandwidth
            row["engine_tok_s"] = engine_tok_s(model, ids, args.gen_tokens, args.repeats)
            row["graph_record_ms"] = record_ms(model, ids)
            print(f"  {weights}: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})}",
                  flush=True)
            save()
            if args.profile:
                optional(row, "profile_error", lambda: profile_step(model, ids))
        except Exception:  # one setting failing must not lose the others' figures
            row["error"] = traceback.format_exc(limit=4)
            print(row["error"], flush=True)
        finally:
            model = None
            gc.collect()
            if DEVICE == "cuda":
                torch.cuda.empty_cache()
            save()
    if args.hf:
        try:
            from zen_eco.config import preset as get_preset

            ids = prompt_ids(args.prompt_tokens, get_preset(args.preset).vocab_size)
            results["hf"] = hf_baseline(args.preset, ids, args.gen_tokens, args.repeats)
            print(f"  transformers: {results['hf']}", flush=True)
        except Exception:
            results["hf_error"] = traceback.format_exc(limit=4)
            print(results["hf_error"], flush=True)
        save()

    for weights in args.compile.split(",") if args.compile else []:  # last: compiling takes a while
        row = next((r for r in results["runs"] if r["weights"] == weights), None)
        if row is None:
            row = {"weights": weights}
            results["runs"].append(row)

        def compiled():
            model = build(args.preset, weights)
            ids = prompt_ids(args.prompt_tokens, model.config.vocab_size)
            row["gb_per_token"] = read_bytes_per_token(model) / GB
            row.update(compiled_decode(model, ids, args.gen_tokens, args.repeats))
            row["compiled_bandwidth_fraction"] = row["gb_per_token"] * GB * row["compiled_decode_tok_s"] / bandwidth
            model.compile_decode = True
            row["compiled_engine_tok_s"] = engine_tok_s(model, ids, args.gen_tokens, args.repeats)
            print(f"  {weights} compiled: {json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in row.items()})}",
                  flush=True)
            if args.profile:
                profile_step(model, ids, compile=True)

        optional(row, "compile_error", compiled)
        gc.collect()
        save()
    print(f"\n{args.preset} on {name}: prompt {args.prompt_tokens}, decode {args.gen_tokens} (best of {args.repeats})")
    print(f"{'weights':16} {'GB/tok':>7} {'TTFT ms':>8} {'eager t/s':>10} {'graph t/s':>10} {'engine t/s':>10} "
          f"{'BW frac':>8} {'compiled':>9} {'c engine':>9} {'compile s':>8}")
    nan = float("nan")
    for r in results["runs"]:
        if "gb_per_token" not in r:
            print(f"{r['weights']:12} failed")
            continue
        print(f"{r['weights']:16} {r['gb_per_token']:7.2f} {r.get('ttft_ms', nan):8.1f} {r.get('eager_decode_tok_s', nan):10.1f} "
              f"{r.get('graph_decode_tok_s', nan):10.1f} {r.get('engine_tok_s', nan):10.1f} {r.get('bandwidth_fraction', nan):8.2f} "
              f"{r.get('compiled_decode_tok_s', nan):9.1f} {r.get('compiled_engine_tok_s', nan):9.1f} "
              f"{r.get('compile_and_record_s', nan):8.1f}")
    if "hf" in results:
        print(f"transformers bf16 eager: TTFT {results['hf']['hf_ttft_ms']:.1f} ms, decode {results['hf']['hf_decode_tok_s']:.1f} tok/s")


if __name__ == "__main__":
    main()
