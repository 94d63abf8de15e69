"""Perplexity of zen-eco (unquantized, INT8, INT4) and of llama.cpp on the same GGUF file and text.

    python benchmarks/perplexity.py [MODEL] [--ctx 512] [--tokens 32768] [-t 2] [--text PATH]
        [--configs none:float32,int8:bfloat16,int4:bfloat16] [--no-llama]

Both sides follow llama-perplexity's method (zen_eco.perplexity): consecutive non-overlapping
ctx-token windows of the tokenized text, BOS in each window's first slot where the vocabulary adds
one, each window scored on its second half. llama.cpp (llama-cpp-python, `logits_all=True`) tokenizes
with its own tokenizer and returns its own logits; the NLL sum over them is the same code as ours,
so the figures differ only by what the engines compute. Each config is `QUANT:DTYPE` as the CLI's
--quant and --dtype take them. Prints a markdown table: PPL, ±, change vs the first config, and vs
llama.cpp.
"""

from __future__ import annotations

import argparse
import importlib.util
import time

import torch

from zen_eco.perplexity import DEFAULT_CTX, DEFAULT_TOKENS, default_text_path, read_text, score_windows


def ours(model_ref: str, quant: str, dtype: str, text: str, ctx: int, tokens: int) -> tuple:
    import zen_eco
    from zen_eco.perplexity import perplexity

    zm = zen_eco.load(model_ref, dtype=dtype, quant=quant)
    t0 = time.perf_counter()
    result = perplexity(zm, text, ctx, tokens, progress=True)
    ids = zm.tokenizer.encode(text)[:tokens]
    return result, time.perf_counter() - t0, ids


def llama(model_ref: str, text: str, ctx: int, tokens: int, threads: int) -> tuple:
    import llama_cpp

    from zen_eco.checkpoint import resolve_model

    llm = llama_cpp.Llama(str(resolve_model(model_ref)), n_ctx=ctx, n_batch=ctx, n_ubatch=ctx, logits_all=True,
                          n_threads=threads, n_threads_batch=threads, verbose=False)
    # add_bos=True means "add special tokens the vocabulary asks for", as llama-perplexity tokenizes
    ids = llm.tokenize(text.encode("utf-8"), add_bos=True, special=False)[:tokens]
    adds_bos = llm.tokenize(b"a", add_bos=True) != llm.tokenize(b"a", add_bos=False)

    def logits(window: list[int]) -> torch.Tensor:
        llm.reset()
        llm.eval(window)
        return torch.from_numpy(llm.scores[: len(window)].copy())

    t0 = time.perf_counter()
    result = score_windows(logits, ids, ctx, llm.token_bos() if adds_bos else None, progress=True)
    return result, time.perf_counter() - t0, ids, llama_cpp.__version__


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default="default")
    ap.add_argument("--ctx", type=int, default=DEFAULT_CTX)
    ap.add_argument("--tokens", type=int, default=DEFAULT_TOKENS)
    ap.add_argument("-t", "--threads", type=int, default=2)
    ap.add_argument("--text", default=None, help="default: ../shared/data/wikitext2_test.raw.gz")
    ap.add_argument("--configs", default="none:float32,none:bfloat16,auto:bfloat16,int8:bfloat16,int8:float32,"
                                         "int4:bfloat16,int4-g64:bfloat16")
    ap.add_argument("--no-llama", action="store_true", help="skip llama.cpp")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    text = read_text(args.text or default_text_path())
    rows, our_ids = [], None
    for config in args.configs.split(","):
        quant, dtype = config.split(":")
        result, seconds, our_ids = ours(args.model, quant, dtype, text, args.ctx, args.tokens)
        rows.append((f"zen-eco --quant {quant} --dtype {dtype}", result, seconds))
        print(f"{rows[-1][0]}: {result} [{seconds:.0f} s]", flush=True)
    ref = None
    if not args.no_llama and importlib.util.find_spec("llama_cpp") is not None:
        ref, seconds, ids, version = llama(args.model, text, args.ctx, args.tokens, args.threads)
        same = sum(a == b for a, b in zip(ids, our_ids))
        print(f"llama.cpp: {ref} [{seconds:.0f} s]; token ids equal to ours at {same} of {len(ids)} positions")
        rows.append((f"llama.cpp (llama-cpp-python {version})", ref, seconds))
    base = rows[0][1]
    print(f"\n| engine and weights | PPL | ± | vs {rows[0][0].removeprefix('zen-eco ')} |"
          + (" vs llama.cpp |" if ref else "") + " seconds |")
    print("|---|---:|---:|---:|" + ("---:|" if ref else "") + "---:|")
    for name, r, seconds in rows:
        vs_ref = f" {100 * (r.ppl / ref.ppl - 1):+.2f}% |" if ref else ""
        print(f"| {name} | {r.ppl:.4f} | {r.error:.4f} | {100 * (r.ppl / base.ppl - 1):+.2f}% |{vs_ref} {seconds:.0f} |")


if __name__ == "__main__":
    main()
