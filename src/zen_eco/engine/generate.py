"""The engine: prefill + cached decode over token ids, and a text stream on top.

`Sequence` knows nothing about text: it takes prompt ids, owns (or reuses) a KV cache and yields one
sampled token per `step()`. A server steps many of them; `stream_generate` steps one and turns its
tokens into text chunks with stop strings, never splitting a UTF-8 character.

A `Sequence` can also be told tokens to emit instead of sampling (`force(ids)`: they are run through
the model as if generated and count as output). The thinking budget uses it: a `ThinkingBudget`
hook watches every output token and queues `</think>`'s close-out when the budget is spent, so any
loop that steps sequences (this one or a server's) enforces it.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Iterator, Protocol, Sequence as Seq

import torch

from ..errors import ContextLengthError, ZenError
from ..kv_cache import KVCache
from ..model import Transformer
from .graphs import decode_one
from .sampling import Sampler, SamplingParams
from .thinking import (ReasoningParser, ThinkingBudget, check_thinking_budget, prompt_opens_thinking,
                       thinking_tokens)

class Constraint(Protocol):
    """Structured output: which tokens may come next. `mask` returns the logits with disallowed
    tokens at -inf (it sees every sampled step); `accept` is told each token the sequence emits
    (sampled or forced), in order."""

    def mask(self, logits: torch.Tensor) -> torch.Tensor: ...
    def accept(self, token: int) -> None: ...


PREFILL_CHUNK = 512  # bounds the (T x S) attention scores and activations of one prefill call


def check_context(prompt_tokens: int, max_new_tokens: int, context: int) -> None:
    if prompt_tokens == 0:
        raise ZenError("the prompt is empty: give at least one token")
    if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ZenError(f"max_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if prompt_tokens + max_new_tokens > context:
        raise ContextLengthError(
            f"the prompt has {prompt_tokens} tokens and {max_new_tokens} new tokens were asked for: "
            f"{prompt_tokens + max_new_tokens} exceeds the context of {context} tokens"
        )


class Sequence:
    """One generation: prompt ids in, sampled ids out, one per `step()`."""

    def __init__(
        self,
        model: Transformer,
        prompt_ids: Seq[int],
        params: SamplingParams | None = None,
        max_new_tokens: int = 256,
        stop_token_ids: Seq[int] = (),
        cache: KVCache | None = None,
        context: int | None = None,
        thinking: ThinkingBudget | None = None,
        constraint: "Constraint | None" = None,
        top_logprobs: int = 0,
        token_count: int | None = None,
    ) -> None:
        self.model = model
        # ids from token_count up are rows of a padded embedding table (Qwen3: 151,936 rows for 151,669
        # tokens) with no token behind them: never chosen, whatever the weights say.
        self.token_count = token_count if token_count is not None and token_count < model.config.vocab_size else None
        self.prompt_ids = list(prompt_ids)
        self.params = params or SamplingParams()
        self.context = context or model.config.max_position_embeddings
        check_context(len(self.prompt_ids), max_new_tokens, self.context)
        self.max_new_tokens = max_new_tokens
        self.stop_token_ids = set(stop_token_ids)
        self.cache = cache if cache is not None else model.new_cache(max_tokens=self.context)
        self.sampler = Sampler(self.params, model.config.vocab_size, self.prompt_ids, model.device)
        self.output_ids: list[int] = []
        self.finish_reason: str | None = None
        self.reused_tokens = 0
        self._logits: torch.Tensor | None = None
        self.thinking = thinking  # a hook that may queue forced tokens after each output token
        self._forced: deque[int] = deque(thinking.initial() if thinking is not None else ())
        self.forced_tokens = 0  # output tokens that were forced rather than sampled
        self._pending: list[int] | None = None  # prompt tokens still to prefill
        self.constraint = constraint  # restricts which tokens may be sampled (structured output)
        self.top_logprobs = top_logprobs  # record this many most likely tokens at each step
        self.last_top_logprobs: list[tuple[int, float]] = []

    def force(self, ids: Seq[int]) -> None:
        """Queue tokens that the next steps emit instead of sampling (in order)."""
        self._forced.extend(ids)

    def _begin_feed(self, ids: list[int]) -> int:
        """Start making the cache hold `ids`, keeping the prefix it already holds; returns its length.
        `_feed_chunk` then runs the rest through the model."""
        cache = self.cache
        cache.owner = None  # while the cache is being rewritten nobody owns it
        common = 0
        for a, b in zip(cache.token_ids, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one token must run, for its logits
        cache.trim(common)
        self._pending = ids[common:]
        self._logits = None
        return common

    def _feed_chunk(self, max_tokens: int = PREFILL_CHUNK) -> bool:
        """Run up to `max_tokens` pending tokens; True once all ran and the next-token logits are set."""
        chunk, self._pending = self._pending[:max_tokens], self._pending[max_tokens:]
        logits = self.model(torch.tensor([chunk], device=self.model.device), self.cache, last_only=True)
        self.cache.token_ids.extend(chunk)
        if self._pending:
            return False
        self._logits = logits[0, -1]
        self.cache.owner = self
        return True

    def _feed(self, ids: list[int]) -> int:
        common = self._begin_feed(ids)
        while not self._feed_chunk():
            pass
        return common

    @torch.inference_mode()
    def prefill(self) -> None:
        """Run the prompt through the model, reusing whatever prefix the cache already holds."""
        self.reused_tokens = self._feed(self.prompt_ids)

    @torch.inference_mode()
    def prefill_step(self, max_tokens: int = PREFILL_CHUNK) -> bool:
        """Prefill at most `max_tokens` prompt tokens; True once the prompt is in (a scheduler
        interleaves these chunks with other sequences' decode steps)."""
        if self._logits is not None:
            return True
        if self._pending is None:
            self.reused_tokens = self._begin_feed(self.prompt_ids)
        return self._feed_chunk(max_tokens)

    @property
    def prefilled(self) -> bool:
        return self._logits is not None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    def _choose(self) -> tuple[int, float]:
        """Pick the next token (forced or sampled), record it and decide whether generation ends."""
        if self._logits is None:
            self.prefill()
        if self.finished:
            raise ZenError("this sequence has finished")
        logits = self._logits
        if self.token_count is not None:
            logits = logits.clone()
            logits[self.token_count:] = -torch.inf
        if self.top_logprobs:
            values, ids = torch.log_softmax(logits.float(), dim=-1).topk(self.top_logprobs)
            self.last_top_logprobs = list(zip(ids.tolist(), values.tolist()))
        if self._forced:
            token = self._forced.popleft()
            logprob = float(torch.log_softmax(logits.float(), dim=-1)[token])
            self.forced_tokens += 1
        else:
            token, logprob = self.sampler(logits if self.constraint is None else self.constraint.mask(logits))
        if self.constraint is not None:
            self.constraint.accept(token)
        self.sampler.accept(token)
        self.output_ids.append(token)
        if self.thinking is not None:
            self._forced.extend(self.thinking.observe(token))
        if token in self.stop_token_ids:
            self.finish_reason = "stop"
        elif len(self.output_ids) >= self.max_new_tokens:
            self.finish_reason = "length"
        return token, logprob

    @torch.inference_mode()
    def step(self) -> tuple[int, float]:
        """Sample the next token (and run it through the model unless generation ends with it)."""
        return step_batch([self])[0]

    def stop(self, reason: str = "stop") -> None:
        self.finish_reason = reason


@torch.inference_mode()
def step_batch(seqs: Seq[Sequence]) -> list[tuple[int, float]]:
    """One decode step for several sequences: each picks its next token with its own sampler, then
    the ones still going run their tokens through the model together (one pass over the weights for
    all of them; each row attends to its own cache). Returns each sequence's (token, logprob)."""
    picked = [s._choose() for s in seqs]
    batch = []
    for s, (token, _) in zip(seqs, picked):
        if s.finished:
            continue
        if s.cache.owner is not s:
            # Sequences may share one cache (the API's prefix-reuse cache): if another one used it
            # since our last step, bring our tokens back (reusing the common prefix).
            s._feed(s.prompt_ids + s.output_ids)
        else:
            batch.append(s)
    if batch:
        model = batch[0].model
        caches = [s.cache for s in batch]
        for c in caches:
            c.owner = None
        if len(batch) == 1:
            logits = decode_one(model, caches[0], batch[0].output_ids[-1])
        else:
            logits = model(torch.tensor([[s.output_ids[-1]] for s in batch], device=model.device), caches)
        for b, s in enumerate(batch):
            s.cache.token_ids.append(s.output_ids[-1])
            s._logits = logits[b, -1]
            s.cache.owner = s
    return picked


@dataclass
class GenerationChunk:
    """One piece of a streamed generation."""

    text: str  # new text since the previous chunk (may be empty while a character or stop string is pending)
    token: int | None  # the token this chunk came from (None for the final flush)
    logprob: float | None
    finish_reason: str | None  # None while generating; "stop" (EOS or stop string) or "length" at the end
    prompt_tokens: int
    generation_tokens: int
    prompt_tps: float  # prompt tokens per second of prefill
    generation_tps: float  # generated tokens per second of decode, after the first token
    time_to_first_token: float  # seconds from the call to the first sampled token
    reused_prompt_tokens: int = 0  # prompt tokens served from the KV cache (prefix reuse)
    reasoning: str = ""  # the part of `text` inside the <think> block (tags and surrounding whitespace left out)
    content: str = ""  # the part of `text` that is the answer (all of it when the model does not think)
    top_logprobs: list[tuple[int, float]] = field(default_factory=list)  # (id, logprob), most likely first


@dataclass
class _StopMatcher:
    """Finds stop strings in streamed text, holding back any tail that might become one."""

    stops: list[str]
    text: str = ""
    emitted: int = 0
    hit: bool = field(default=False)

    def feed(self, new: str) -> str:
        self.text += new
        search_from = max(0, self.emitted - max((len(s) for s in self.stops), default=0))
        cut = min((i for s in self.stops if (i := self.text.find(s, search_from)) >= 0), default=-1)
        if cut >= 0:
            self.hit = True
            out, self.emitted = self.text[self.emitted : cut], cut
            return out
        hold = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self.text)), 0, -1):
                if self.text.endswith(s[:n]):
                    hold = max(hold, n)
                    break
        end = max(self.emitted, len(self.text) - hold)
        out, self.emitted = self.text[self.emitted : end], end
        return out

    def flush(self) -> str:
        out, self.emitted = self.text[self.emitted :], len(self.text)
        return out


class Generation:
    """One request from prompt ids to text chunks: a `Sequence` plus its detokenizer, stop strings,
    reasoning/content split and timings. `stream_generate` steps one; a server's scheduler prefills
    and steps many (`step_batch` over their `.seq`) and hands each token to its `chunk()`."""

    def __init__(self, model: Transformer, tokenizer, prompt_ids: Seq[int], params: SamplingParams | None = None,
                 max_new_tokens: int = 256, stop: Seq[str] = (), cache: KVCache | None = None,
                 context: int | None = None, enable_thinking: bool | None = None,
                 thinking_budget: int | None = None, constraint: Constraint | None = None,
                 top_logprobs: int = 0) -> None:
        self.t0 = time.perf_counter()
        tokens = thinking_tokens(tokenizer)
        start_in_thinking = tokens is not None and prompt_opens_thinking(prompt_ids, tokens, tokenizer.eos_token_ids)
        self.parser = ReasoningParser(enabled=tokens is not None and (enable_thinking is not False or start_in_thinking),
                                      start_in_thinking=start_in_thinking)
        budget = None
        check_thinking_budget(thinking_budget)
        if thinking_budget is not None and tokens is not None:
            budget = ThinkingBudget.for_tokenizer(tokenizer, thinking_budget, start_in_thinking)
        self.seq = Sequence(model, prompt_ids, params, max_new_tokens, tokenizer.eos_token_ids, cache, context, budget,
                            constraint, top_logprobs, tokenizer.vocab_size)
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True)
        self.matcher = _StopMatcher([s for s in stop if s])
        self.prompt_tps = 0.0
        self.ttft: float | None = None
        self._t_first = 0.0

    def prefill_done(self) -> None:
        """Record prefill speed (call once the sequence is prefilled)."""
        elapsed = time.perf_counter() - self.t0
        self.prompt_tps = (len(self.seq.prompt_ids) - self.seq.reused_tokens) / max(elapsed, 1e-9)

    def chunk(self, token: int, logprob: float) -> GenerationChunk:
        """The text chunk for a token the sequence just produced (may end the sequence on a stop string)."""
        seq = self.seq
        now = time.perf_counter()
        if self.ttft is None:
            self.ttft, self._t_first = now - self.t0, now
        n = len(seq.output_ids)
        gen_tps = (n - 1) / (now - self._t_first) if n > 1 else 0.0
        matcher = self.matcher
        text = "" if token in seq.stop_token_ids else matcher.feed(self.decoder.add(token))
        if matcher.hit:
            seq.stop("stop")
        if seq.finished and not matcher.hit:
            # an unfinished character cut off by the token limit is dropped, not sent as U+FFFD
            text += matcher.feed(self.decoder.flush().rstrip("\ufffd"))
            text += "" if matcher.hit else matcher.flush()
        reasoning, content = self.parser.feed(text)
        if seq.finished:
            rest = self.parser.finish()
            reasoning, content = reasoning + rest[0], content + rest[1]
        return GenerationChunk(
            text, token, logprob, seq.finish_reason, len(seq.prompt_ids), n, self.prompt_tps, gen_tps, self.ttft,
            seq.reused_tokens, reasoning, content, seq.last_top_logprobs,
        )


def stream_generate(
    model: Transformer,
    tokenizer,
    prompt_ids: Seq[int],
    params: SamplingParams | None = None,
    max_new_tokens: int = 256,
    stop: Seq[str] = (),
    cache: KVCache | None = None,
    context: int | None = None,
    enable_thinking: bool | None = None,
    thinking_budget: int | None = None,
) -> Iterator[GenerationChunk]:
    """Stream the answer to `prompt_ids` as text chunks.

    For a tokenizer with `<think>`/`</think>`, every chunk also splits its text into `reasoning` and
    `content` (`enable_thinking=False`: all content, unless the prompt itself opened `<think>`), and
    `thinking_budget=N` caps the thinking at N tokens (see `engine.thinking`)."""
    gen = Generation(model, tokenizer, prompt_ids, params, max_new_tokens, stop, cache, context,
                     enable_thinking, thinking_budget)
    gen.seq.prefill()
    gen.prefill_done()
    while not gen.seq.finished:
        yield gen.chunk(*gen.seq.step())
