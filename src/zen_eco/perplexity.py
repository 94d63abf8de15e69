"""Perplexity the way llama.cpp's `llama-perplexity` computes it, so the two can be compared.

The text is tokenized whole (with BOS first if the tokenizer adds one) and cut into consecutive,
non-overlapping windows of `ctx` tokens; a tail shorter than a window is dropped. Where the tokenizer
adds BOS, each window's first token is replaced by BOS. Each window runs with a fresh cache and is
scored on its second half only — the logits at positions ctx/2 .. ctx-2 against the tokens after
them, ctx - 1 - ctx/2 tokens per window — so every scored token has at least ctx/2 tokens of
context. PPL = exp(mean NLL); the ± is llama.cpp's: PPL x the standard error of the mean NLL.

Default text: WikiText-2's test split (`../shared/data/wikitext2_test.raw.gz` next to the repository),
its first 32,768 tokens (64 windows of 512), as the speed issue's quality targets specify.
"""

from __future__ import annotations

import gzip
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import torch

from .errors import ZenError

DEFAULT_CTX = 512  # llama-perplexity's default -c
DEFAULT_TOKENS = 32_768  # the first 32K tokens of the text: 64 windows of 512
_DATA = Path("shared") / "data" / "wikitext2_test.raw.gz"


@dataclass
class PerplexityResult:
    ppl: float
    error: float  # ± one standard error, as llama-perplexity prints it
    nll: float  # mean negative log-likelihood per scored token (nats)
    ctx: int
    windows: int
    scored_tokens: int

    def __str__(self) -> str:
        return (f"PPL = {self.ppl:.4f} +/- {self.error:.5f} ({self.windows} windows of {self.ctx} tokens, "
                f"{self.scored_tokens} scored)")


def default_text_path() -> Path:
    """WikiText-2 test, looked for in ../shared/data beside the repository (or the working directory)."""
    repo = Path(__file__).resolve().parents[2]  # src/zen_eco/perplexity.py -> the repository
    candidates = [repo.parent / _DATA, Path.cwd().parent / _DATA, Path.cwd() / _DATA]
    for path in candidates:
        if path.is_file():
            return path
    raise ZenError(f"no default text found (looked for {candidates[0]}); pass --text PATH")


def read_text(path: str | os.PathLike) -> str:
    """A text file, gzip-compressed or not, as UTF-8."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            gz = f.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rt", encoding="utf-8") if gz else open(path, encoding="utf-8")) as f:
            return f.read()
    except (OSError, UnicodeDecodeError, EOFError) as exc:
        raise ZenError(f"cannot read text from {path}: {exc}") from None


def score_windows(logits_fn: Callable[[list[int]], torch.Tensor], ids: Sequence[int], ctx: int,
                  bos_id: int | None = None, progress: bool = False) -> PerplexityResult:
    """Perplexity of `ids` over consecutive `ctx`-token windows. `logits_fn(window)` returns the
    (ctx, vocab) next-token logits of one window; `bos_id` (if not None) replaces each window's first token."""
    if ctx < 4 or ctx % 2:
        raise ZenError(f"ctx must be an even number >= 4, got {ctx}")
    windows = len(ids) // ctx
    if windows < 1:
        raise ZenError(f"the text has {len(ids)} tokens, fewer than one window of {ctx}")
    from .checkpoint.load import _progress

    first = ctx // 2
    total = total_sq = 0.0
    count = 0
    bar = _progress(progress, windows, f"perplexity, {windows} x {ctx} tokens")
    try:
        for w in range(windows):
            window = list(ids[w * ctx:(w + 1) * ctx])
            if bos_id is not None:
                window[0] = bos_id
            logits = logits_fn(window)[first:ctx - 1].float()  # (ctx - 1 - first, vocab)
            targets = torch.tensor(window[first + 1:], device=logits.device)
            nll = -torch.log_softmax(logits, dim=-1).gather(1, targets[:, None])[:, 0].double()
            total += nll.sum().item()
            total_sq += nll.square().sum().item()
            count += nll.numel()
            bar.advance()
    finally:
        bar.close()
    mean = total / count
    var = total_sq / count - mean * mean
    sem = math.sqrt(var / (count - 1)) if var > 0 and count > 1 else 0.0
    ppl = math.exp(mean)
    return PerplexityResult(ppl, ppl * sem, mean, ctx, windows, count)


def perplexity(model, text: str | None = None, ctx: int = DEFAULT_CTX, tokens: int | None = DEFAULT_TOKENS,
               progress: bool = False) -> PerplexityResult:
    """Perplexity of a loaded `zen_eco.ZenModel` on `text` (default: WikiText-2 test), over its first
    `tokens` tokens (None: all) in windows of `ctx`."""
    if ctx > model.context:
        raise ZenError(f"ctx {ctx} exceeds the model's context of {model.context}")
    if tokens is not None and tokens < ctx:
        raise ZenError(f"--tokens {tokens} is less than one window of {ctx}")
    if text is None:
        text = read_text(default_text_path())
    tok = model.tokenizer
    ids = tok.encode(text)  # whole, as llama-perplexity does: a cut text would end mid-token
    ids = ids if tokens is None else ids[:tokens]
    bos = tok.bos_token_id if tok.add_bos else None
    return score_windows(model.logits, ids, ctx, bos, progress)
