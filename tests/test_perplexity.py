"""Perplexity as llama-perplexity computes it (zen_eco.perplexity).

References: a scripted logits function whose answer we know (uniform logits: PPL = vocabulary size)
or check with numpy, and an independent hand loop — the model called directly on each window,
`F.cross_entropy` over the second half — on the real SmolLM2 GGUF. (That our fp32 logits equal
transformers' on this file to ~1e-5 is test_gguf_model's job.) Tolerance for the hand loop: 1e-4
relative; both run the same fp32 forward, only the chunked cache path and summation order differ.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import zen_eco
from zen_eco.errors import ZenError
from zen_eco.perplexity import default_text_path, perplexity, read_text, score_windows


def _random_logits(vocab: int):
    """Logits determined by each window's tokens; records the windows it was given."""
    seen: list[list[int]] = []

    def fn(window: list[int]) -> torch.Tensor:
        seen.append(list(window))
        return torch.randn(len(window), vocab, generator=torch.Generator().manual_seed(sum(window) + len(seen)))

    return fn, seen


def test_windows_bos_and_scored_half_match_numpy():
    ids = [(3 + i) % 50 for i in range(10 * 16 + 7)]  # 10 windows of 16 and a 7-token tail that is dropped
    fn, seen = _random_logits(50)
    result = score_windows(fn, ids, 16, bos_id=1)
    assert len(seen) == 10 and result.windows == 10
    for w, window in enumerate(seen):
        assert window == [1] + ids[w * 16 + 1:(w + 1) * 16]  # BOS replaces the first token; no overlap
    assert result.scored_tokens == 10 * (16 - 1 - 8)  # positions 8..14 predict tokens 9..15
    nll = []
    for w, window in enumerate(seen):
        logits = torch.randn(16, 50, generator=torch.Generator().manual_seed(sum(window) + w + 1)).double().numpy()
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        nll += [-logp[i, window[i + 1]] for i in range(8, 15)]
    nll = np.array(nll)
    assert math.isclose(result.ppl, math.exp(nll.mean()), rel_tol=1e-6)
    # llama-perplexity's estimate: PPL * sqrt(var(nll) / (n - 1)), var over the population
    assert math.isclose(result.error, result.ppl * math.sqrt(nll.var() / (len(nll) - 1)), rel_tol=1e-5)


def test_uniform_logits_give_the_vocabulary_size():
    result = score_windows(lambda w: torch.zeros(len(w), 77), list(range(64)), 32)
    assert math.isclose(result.ppl, 77, rel_tol=1e-6) and result.error == 0


def test_refusals():
    with pytest.raises(ZenError, match="fewer than one window"):
        score_windows(lambda w: torch.zeros(len(w), 5), [1] * 10, 16)
    with pytest.raises(ZenError, match="even number"):
        score_windows(lambda w: torch.zeros(len(w), 5), [1] * 40, 15)
    with pytest.raises(ZenError, match="cannot read text"):
        read_text("/nonexistent/wiki.txt")


def test_default_text_is_wikitext2():
    try:
        path = default_text_path()
    except ZenError:
        pytest.skip("../shared/data is not beside this checkout")
    text = read_text(path)
    assert path.name == "wikitext2_test.raw.gz" and len(text.encode()) == 1_290_590  # README of shared/data


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf_path):
    return zen_eco.load(smollm2_gguf_path, dtype="float32", quant="none")


def test_smollm2_matches_a_hand_loop(smollm2):
    text = read_text(default_text_path())[:2000] if _has_default_text() else "The tower is 324 metres tall. " * 40
    ctx, windows = 32, 3
    result = perplexity(smollm2, text, ctx=ctx, tokens=ctx * windows + 5)
    ids = smollm2.tokenizer.encode(text)
    assert not smollm2.tokenizer.add_bos  # SmolLM2's GGUF adds no BOS: windows are the raw tokens
    losses = []
    with torch.no_grad():
        for w in range(windows):
            window = torch.tensor([ids[w * ctx:(w + 1) * ctx]])
            logits = smollm2.model(window)[0]
            losses.append(F.cross_entropy(logits[ctx // 2:-1], window[0, ctx // 2 + 1:], reduction="none"))
    expect = math.exp(torch.cat(losses).double().mean().item())
    assert result.windows == windows and result.scored_tokens == windows * (ctx - 1 - ctx // 2)
    assert math.isclose(result.ppl, expect, rel_tol=1e-4), (result.ppl, expect)
    assert 1 < result.ppl < 200 and 0 < result.error < result.ppl


def _has_default_text() -> bool:
    try:
        default_text_path()
        return True
    except ZenError:
        return False


def test_cli_prints_ppl(tmp_path):
    from typer.testing import CliRunner

    from zen_eco.cli import app

    text = tmp_path / "t.txt"
    text.write_text("Paris is the capital and most populous city of France. " * 30)
    result = CliRunner().invoke(app, ["perplexity", "--ctx", "32", "--tokens", "96", "--text", str(text),
                                      "--dtype", "float32"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("PPL = ") and "3 windows of 32 tokens, 45 scored" in result.stdout
