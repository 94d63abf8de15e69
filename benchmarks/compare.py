"""zen-eco against transformers and llama.cpp on the same model, prompt ids, token counts and threads.

    python benchmarks/compare.py [MODEL] [-t THREADS] [-p 512] [-n 128] [--dtype bfloat16]
                                 [--engines zen-eco,transformers,llama.cpp]

MODEL is a GGUF file (transformers reads it with `gguf_file=`, llama.cpp natively), a Hugging Face
directory (zen-eco and transformers only), or `default`. Each engine runs in its own subprocess (so
peak RSS is its own), one after the other in the same invocation; all decode greedily with their KV
cache for exactly the same token counts, and report the best of `--repeats` runs after a warm-up.
Prints a markdown table with each engine's ratio to zen-eco, and each engine's decode bandwidth: the
bytes its step reads per token (its own weights as it stores them, once; K/V at the mean context of
the timed tokens in its cache's dtype) times its decode tok/s, as a share of this machine's read
bandwidth at the same thread count (a float32 sum over 1 GiB, measured in the same run after the
engines). llama.cpp is optional: it needs
`pip install llama-cpp-python` (compiles llama.cpp, ~10 min on 2 cores) and is skipped without it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time


def hf_worker(model_ref: str, prompt_tokens: int, gen_tokens: int, threads: int, dtype: str, repeats: int) -> dict:
    import torch
    import transformers

    from zen_eco.bench import peak_rss_mb, prompt_ids
    from zen_eco.checkpoint import resolve_model

    torch.set_num_threads(threads)
    path = resolve_model(model_ref)
    torch_dtype = getattr(torch, dtype)
    t0 = time.perf_counter()
    if path.is_file():
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype)
    model.eval()
    load_s = time.perf_counter() - t0
    ids = torch.tensor([prompt_ids(prompt_tokens, model.config.vocab_size)])
    best_prefill = best_decode = float("inf")
    with torch.inference_mode():
        for run in range(repeats + 1):
            t0 = time.perf_counter()
            out = model(ids, use_cache=True)
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            t1 = time.perf_counter()
            past = out.past_key_values
            for _ in range(gen_tokens):
                out = model(token, past_key_values=past, use_cache=True)
                past = out.past_key_values
                token = out.logits[:, -1].argmax(-1, keepdim=True)
            t2 = time.perf_counter()
            if run:
                best_prefill, best_decode = min(best_prefill, t1 - t0), min(best_decode, t2 - t1)
    return {"engine": f"transformers {transformers.__version__}", "dtype": dtype, "threads": threads,
            "prefill_tok_s": prompt_tokens / best_prefill, "decode_tok_s": gen_tokens / best_decode,
            "ttft_ms": best_prefill * 1000, "peak_rss_mb": peak_rss_mb(), "load_s": load_s,
            "decode_bytes_per_token": _hf_decode_bytes(model, prompt_tokens + gen_tokens / 2)}


def _hf_decode_bytes(model, context: float) -> float:
    """Weights read per decode step (every tensor once; the input embedding only where tied to the
    head) plus its bf16/fp16 K/V at `context` positions."""
    embed = model.get_input_embeddings().weight
    tied = embed.data_ptr() == model.get_output_embeddings().weight.data_ptr()
    sizes = {t.data_ptr(): t.numel() * t.element_size() for t in model.parameters()}
    if not tied:
        sizes.pop(embed.data_ptr())
    cfg = model.config.get_text_config()
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv = cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2 * embed.element_size()
    return sum(sizes.values()) + context * kv


def _gguf_decode_bytes(path, context: float) -> float:
    """What llama.cpp reads per decode step of a GGUF file: every tensor as stored (token_embd only
    where no separate output head exists) plus its default f16 K/V at `context` positions (a sliding layer's
    window only: llama.cpp keeps just that for them)."""
    from zen_eco.checkpoint import open_checkpoint
    from zen_eco.checkpoint.gguf_file import GGUFFile

    with GGUFFile(path) as f:
        sizes = {name: info.nbytes for name, info in f.tensors.items()}
    if "output.weight" in sizes:
        sizes.pop("token_embd.weight", None)
    cfg = open_checkpoint(path).config
    kv = cfg.num_key_value_heads * cfg.head_dim * 2 * 2  # K and V in f16
    return sum(sizes.values()) + kv * cfg.attended_positions(context)


def llamacpp_worker(model_ref: str, prompt_tokens: int, gen_tokens: int, threads: int, repeats: int) -> dict:
    import llama_cpp

    from zen_eco.bench import peak_rss_mb, prompt_ids
    from zen_eco.checkpoint import resolve_model

    path = resolve_model(model_ref)
    t0 = time.perf_counter()
    llm = llama_cpp.Llama(str(path), n_ctx=prompt_tokens + gen_tokens + 16, n_batch=prompt_tokens,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    load_s = time.perf_counter() - t0
    ids = prompt_ids(prompt_tokens, llm.n_vocab())
    import numpy as np

    def greedy() -> int:  # the last position's logits, straight from the llama.cpp context
        return int(np.ctypeslib.as_array(llama_cpp.llama_get_logits(llm.ctx), shape=(llm.n_vocab(),)).argmax())

    best_prefill = best_decode = float("inf")
    for run in range(repeats + 1):
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        token = greedy()
        t1 = time.perf_counter()
        for _ in range(gen_tokens):
            llm.eval([token])
            token = greedy()
        t2 = time.perf_counter()
        if run:
            best_prefill, best_decode = min(best_prefill, t1 - t0), min(best_decode, t2 - t1)
    return {"engine": f"llama.cpp (llama-cpp-python {llama_cpp.__version__})", "dtype": "file's own",
            "threads": threads, "prefill_tok_s": prompt_tokens / best_prefill, "decode_tok_s": gen_tokens / best_decode,
            "ttft_ms": best_prefill * 1000, "peak_rss_mb": peak_rss_mb(), "load_s": load_s,
            "decode_bytes_per_token": _gguf_decode_bytes(path, prompt_tokens + gen_tokens / 2)}


def _run(cmd: list[str]) -> dict:
    out = subprocess.run(cmd, capture_output=True, text=True)
    if out.returncode:
        sys.exit(f"failed: {' '.join(cmd)}\n{out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure(model: str, engines: list[str], threads: int, prompt_tokens: int, gen_tokens: int, repeats: int,
            dtype: str) -> tuple[list[dict], float]:
    """Each engine's results on `model`, one subprocess after another, then this machine's read bandwidth at
    `threads` (bytes/s, by the wall clock, after the engines, in the same run)."""
    sizes = ["--prompt-tokens", str(prompt_tokens), "--gen-tokens", str(gen_tokens), "--repeats", str(repeats)]
    results = []
    for engine in engines:
        if engine == "zen-eco":
            results.append(_run([sys.executable, "-m", "zen_eco.cli", "bench", model, "-t", str(threads),
                                 "--dtype", dtype, "--json", "-p", str(prompt_tokens),
                                 "-n", str(gen_tokens), "-r", str(repeats)]))
        elif engine in ("transformers", "llama.cpp"):
            results.append(_run([sys.executable, __file__, model, "-t", str(threads), "--dtype", dtype,
                                 "--worker", engine, *sizes]))
        else:
            sys.exit(f"unknown engine {engine!r}; use zen-eco, transformers, llama.cpp")
    # In a process of its own: a caller that forks later engines (benchmarks/suite.py) must stay small, since
    # Linux counts the parent's peak RSS into a child's ru_maxrss when the child execs.
    probe = f"import json; from zen_eco.bench import read_bandwidth; print(json.dumps(read_bandwidth({threads})[0]))"
    return results, _run([sys.executable, "-c", probe])


def print_table(results: list[dict], bandwidth: float) -> None:
    """The markdown table: one row per engine, then zen-eco's ratio to each other engine."""
    print("| engine | weights | prefill tok/s | decode tok/s | decode GB/s (of bandwidth) | first token ms | peak RSS MB | load s |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in results:
        used = r["decode_bytes_per_token"] * r["decode_tok_s"]
        print(f"| {r['engine']} | {r.get('weights', r['dtype'])} | {r['prefill_tok_s']:.1f} | {r['decode_tok_s']:.1f} | "
              f"{used / 1e9:.1f} ({used / bandwidth:.0%}) | {r['ttft_ms']:.0f} | {r['peak_rss_mb']:.0f} | {r['load_s']:.1f} |")
    ours = next((r for r in results if r["engine"] == "zen-eco"), None)
    if ours is not None:
        for r in results:
            if r is not ours:
                print(f"| **zen-eco / {r['engine'].split(' ')[0]}** | | {ours['prefill_tok_s'] / r['prefill_tok_s']:.2f}x | "
                      f"{ours['decode_tok_s'] / r['decode_tok_s']:.2f}x | | {r['ttft_ms'] / ours['ttft_ms']:.2f}x faster | "
                      f"{ours['peak_rss_mb'] / r['peak_rss_mb']:.2f}x | |")


def available_engines(engines: list[str]) -> list[str]:
    """`engines` less llama.cpp where llama-cpp-python is not installed (said on stderr)."""
    if "llama.cpp" in engines and importlib.util.find_spec("llama_cpp") is None:
        print("llama.cpp skipped: pip install llama-cpp-python to include it", file=sys.stderr)
        return [e for e in engines if e != "llama.cpp"]
    return engines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("-p", "--prompt-tokens", type=int, default=512)
    ap.add_argument("-n", "--gen-tokens", type=int, default=128)
    ap.add_argument("-r", "--repeats", type=int, default=3)
    ap.add_argument("--dtype", default="bfloat16", help="dtype for both engines")
    ap.add_argument("--engines", default="zen-eco,transformers,llama.cpp",
                    help="comma-separated; llama.cpp is skipped when llama-cpp-python is not installed")
    ap.add_argument("--worker", choices=["transformers", "llama.cpp"], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker == "transformers":
        print(json.dumps(hf_worker(args.model, args.prompt_tokens, args.gen_tokens, args.threads, args.dtype, args.repeats)))
        return
    if args.worker == "llama.cpp":
        print(json.dumps(llamacpp_worker(args.model, args.prompt_tokens, args.gen_tokens, args.threads, args.repeats)))
        return
    engines = available_engines([e.strip() for e in args.engines.split(",") if e.strip()])
    results, bandwidth = measure(args.model, engines, args.threads, args.prompt_tokens, args.gen_tokens,
                                 args.repeats, args.dtype)
    kernels = next((r.get("cpu_kernels") for r in results if r["engine"] == "zen-eco"), None)
    print(f"model: {args.model}  threads: {args.threads}  prompt: {args.prompt_tokens}  decode: {args.gen_tokens}  "
          f"read bandwidth: {bandwidth / 1e9:.1f} GB/s" + (f"  zen-eco kernels: {kernels}" if kernels else ""))
    print_table(results, bandwidth)


if __name__ == "__main__":
    main()
