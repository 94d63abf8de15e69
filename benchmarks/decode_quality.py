"""What the decode path's quantization costs: teacher-forced decode against the dense float32 model.

    python benchmarks/decode_quality.py [MODEL] [--quant auto] [--dtype auto] [--segments 3] [--steps 256]

Perplexity (`zen-eco perplexity`) scores prompts, so it measures the prompt kernels only. This feeds WikiText-2
one token a step, as generation does (a 64-token prompt, then `--steps` single-token steps, `--segments` times
from tokens 2000, 6000, 10000, ...), through the model loaded with `--quant` / `--dtype` and through the same
file dequantized to float32 (`--quant none`), and reports the decode NLL of both, the mean KL of the
quantized next-token distribution from the dense one and how often their top tokens agree.
"""

from __future__ import annotations

import argparse

import torch

import zen_eco
from zen_eco.perplexity import default_text_path, read_text

PROMPT = 64


@torch.inference_mode()
def decode_logits(model: str | None, quant: str, dtype: str, segments: int,
                  steps: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per segment: (steps, vocab) float32 next-token logits and the (steps,) tokens that followed."""
    zm = zen_eco.load(model, quant=quant, dtype=dtype, device="cpu")
    ids = zm.tokenizer.encode(read_text(default_text_path()))
    out = []
    for s in range(segments):
        seq = ids[2000 + 4000 * s: 2000 + 4000 * s + PROMPT + steps]
        if len(seq) < PROMPT + steps:
            raise SystemExit(f"the text has too few tokens for {segments} segments")
        cache = zm.model.new_cache(max_tokens=len(seq))
        logits = [zm.model(torch.tensor([seq[:PROMPT]]), cache)[0, -1:].float()]
        logits += [zm.model(torch.tensor([[t]]), cache)[0].float() for t in seq[PROMPT:-1]]
        out.append((torch.cat(logits), torch.tensor(seq[PROMPT:])))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model", nargs="?", default=None, help="a GGUF file or model directory (default: the bundled one)")
    p.add_argument("--quant", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--segments", type=int, default=3)
    p.add_argument("--steps", type=int, default=256)
    p.add_argument("-t", "--threads", type=int, default=None)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    got = decode_logits(args.model, args.quant, args.dtype, args.segments, args.steps)
    ref = decode_logits(args.model, "none", "float32", args.segments, args.steps)
    logp = torch.cat([torch.log_softmax(g, -1) for g, _ in got])
    ref_logp = torch.cat([torch.log_softmax(r, -1) for r, _ in ref])
    targets = torch.cat([t for _, t in got])
    nll, ref_nll = (float(torch.nn.functional.nll_loss(lp, targets)) for lp in (logp, ref_logp))
    kl = float((ref_logp.exp() * (ref_logp - logp)).sum(-1).mean())
    agree = float((logp.argmax(-1) == ref_logp.argmax(-1)).float().mean())
    print(f"{len(targets)} decode steps: NLL {nll:.4f} (dense float32 {ref_nll:.4f}, "
          f"{100 * (nll / ref_nll - 1):+.2f}%), KL {kl:.5f}, top-1 agreement {100 * agree:.1f}%")


if __name__ == "__main__":
    main()
