"""Batched decode and the continuous-batching scheduler.

Reference: our single-sequence path, which test_model_parity / test_gemma3 check against
transformers to 1e-4. A batched step must give each row the logits it would get alone: fp32, same
ops per row except that the projections see B rows at once (a different GEMM blocking), so we allow
1e-5 absolute at logit scales of ~1.
"""

from __future__ import annotations

import threading
import time

import pytest
import torch

from zen_eco.api import ZenModel
from zen_eco.config import ModelConfig
from zen_eco.engine.generate import Sequence, step_batch
from zen_eco.engine.sampling import SamplingParams
from zen_eco.engine.scheduler import QueueFull, Request, Scheduler, SchedulerStopped
from zen_eco.model import Transformer

TOL = 1e-5


def _tiny(kind: str) -> Transformer:
    torch.manual_seed(0)
    common = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256)
    if kind == "qwen3":
        cfg = ModelConfig(model_type="qwen3", **common)
    else:  # sliding-window layers with their own RoPE, to check per-row windows and positions
        cfg = ModelConfig(model_type="gemma3_text", sliding_window=5, rope_local_base_freq=10_000.0,
                          layer_types=["sliding_attention", "full_attention", "sliding_attention"],
                          query_pre_attn_scalar=16, **common)
    model = Transformer(cfg).float().eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    return model


@pytest.mark.parametrize("kind", ["qwen3", "gemma3"])
@torch.inference_mode()
def test_batched_decode_step_equals_each_row_alone(kind):
    model = _tiny(kind)
    torch.manual_seed(1)
    prompts = [torch.randint(0, 128, (1, n)) for n in (3, 11, 7)]  # different lengths: different positions
    alone, batched = [], []
    for p in prompts:
        for caches in (alone, batched):
            c = model.new_cache()
            model(p, c)
            caches.append(c)
    for step in range(6):  # past the sliding window of 5 for every row
        tokens = torch.randint(0, 128, (3, 1))
        expected = torch.cat([model(tokens[b : b + 1], alone[b]) for b in range(3)])
        got = model(tokens, batched)
        assert got.shape == (3, 1, 128)
        assert (got - expected).abs().max().item() < TOL, step
    assert [c.length for c in batched] == [3 + 6, 11 + 6, 7 + 6]


def test_batched_forward_rejects_mismatched_inputs():
    model = _tiny("qwen3")
    caches = [model.new_cache(), model.new_cache()]
    with pytest.raises(ValueError, match="one token per cache"):
        model(torch.zeros(2, 2, dtype=torch.long), caches)
    with pytest.raises(ValueError, match="one token per cache"):
        model(torch.zeros(3, 1, dtype=torch.long), caches)


# ------------------------------------------------------------------ on the bundled SmolLM2

PROMPTS = ["Once upon a time", "The capital of France is", "def fibonacci(n):", "1, 2, 3, 4,"]


@pytest.fixture(scope="module")
def alone(zm):
    """Greedy 12-token continuation of each prompt, generated on its own."""
    return [ZenModel(zm.model, zm.tokenizer, zm.path).generate(p, max_tokens=12, temperature=0).token_ids
            for p in PROMPTS]


def test_step_batch_greedy_equals_sequences_alone(zm, alone):
    seqs = [Sequence(zm.model, zm.tokenizer.encode(p), SamplingParams.greedy(), 12) for p in PROMPTS]
    for s in seqs:
        s.prefill()
    while any(not s.finished for s in seqs):
        step_batch([s for s in seqs if not s.finished])
    assert [s.output_ids for s in seqs] == alone


def _run(scheduler: Scheduler, request: Request) -> list:
    return list(scheduler.submit(request))


def test_scheduler_serves_concurrent_requests_like_single_runs(zm, alone):
    sched = Scheduler(zm.model, zm.tokenizer, max_batch=4, prefill_chunk=4).start()
    try:
        results: dict[int, list] = {}
        handles = [sched.submit(Request(zm.tokenizer.encode(p), SamplingParams.greedy(), 12)) for p in PROMPTS]
        threads = [threading.Thread(target=lambda i=i, h=h: results.__setitem__(i, list(h)))
                   for i, h in enumerate(handles)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert [[c.token for c in results[i]] for i in range(4)] == alone
        # They shared decode steps: far fewer steps than tokens generated.
        assert sched.steps < sum(len(a) for a in alone) / 2
        assert all(results[i][-1].finish_reason == "length" for i in range(4))
        assert sched.active == 0 and sched.queue_depth == 0
    finally:
        sched.stop()


def test_scheduler_reuses_a_cached_prefix(zm):
    sched = Scheduler(zm.model, zm.tokenizer, max_batch=2).start()
    try:
        first = zm.tokenizer.encode("Here is a long shared system prompt about cooking pasta well. Question one")
        second = zm.tokenizer.encode("Here is a long shared system prompt about cooking pasta well. Question two")
        _run(sched, Request(first, SamplingParams.greedy(), 4))
        chunks = _run(sched, Request(second, SamplingParams.greedy(), 4))
        shared = next(i for i, (a, b) in enumerate(zip(first, second)) if a != b)
        assert chunks[0].reused_prompt_tokens == shared > 5
    finally:
        sched.stop()


def test_scheduler_cancel_frees_the_slot_and_queue_bounds(zm):
    sched = Scheduler(zm.model, zm.tokenizer, max_batch=1, max_queue=1).start()
    try:
        ids = zm.tokenizer.encode(PROMPTS[0])
        running = sched.submit(Request(ids, SamplingParams.greedy(), 200))
        assert running.get(timeout=30) is not None  # it is generating
        queued = sched.submit(Request(ids, SamplingParams.greedy(), 3))
        with pytest.raises(QueueFull, match="queue is full"):
            sched.submit(Request(ids, SamplingParams.greedy(), 3))
        running.cancel()
        rest = list(running)
        assert len(rest) < 150  # stopped long before its 200 tokens
        assert len(list(queued)) == 3  # the freed slot went to the queued request
        deadline = time.time() + 10
        while sched.active and time.time() < deadline:
            time.sleep(0.01)
        assert sched.active == 0 and sched.pool.busy == 0
    finally:
        sched.stop()


def test_scheduler_stop_ends_unfinished_requests(zm):
    sched = Scheduler(zm.model, zm.tokenizer, max_batch=1).start()
    ids = zm.tokenizer.encode(PROMPTS[1])
    h = sched.submit(Request(ids, SamplingParams.greedy(), 500))
    assert h.get(timeout=30) is not None
    t0 = time.perf_counter()
    sched.stop()
    assert time.perf_counter() - t0 < 5
    with pytest.raises(SchedulerStopped):
        list(h)
    with pytest.raises(SchedulerStopped):
        sched.submit(Request(ids, SamplingParams.greedy(), 3))
