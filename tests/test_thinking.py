"""Thinking mode: the reasoning parser, soft switches, the token-level thinking budget, per-mode
sampling defaults and the CLI flags.

Engine tests use a *scripted model*: the real tiny Qwen3 (`zen-eco-tiny`, random weights) runs so
the KV cache and shapes are real, and its logits are then replaced so that the next token follows
a script that behaves like a Qwen3 that never closes its thinking: at the start of an assistant
turn it opens `<think>`, inside the block it writes " hmm" forever (or closes after `close_after`
tokens), after `</think>` it writes "\n\n" then ANSWER then `<|im_end|>`.
"""

from __future__ import annotations

import math
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import zen_eco
from zen_eco.api import ZenModel
from zen_eco.engine.generate import Sequence
from zen_eco.engine.sampling import NON_THINKING_DEFAULTS, THINKING_DEFAULTS, SamplingParams, params_for_mode
from zen_eco.engine.thinking import (
    BUDGET_CLOSE_TEXT, ReasoningParser, ThinkingBudget, resolve_thinking, soft_switch, split_reasoning,
)
from zen_eco.errors import ZenError
from zen_eco.init import init_checkpoint
from zen_eco.tokenizer.qwen import QWEN3_CHAT_TEMPLATE

OPEN, CLOSE, IM_START, IM_END = 151667, 151668, 151644, 151645
NL, NLNL = 198, 271
HMM = 87501  # " hmm"
ANSWER_TEXT = " Paris is the capital."
CLOSE_OUT_TEXT = "Considering the limited time by the user, I have to give the solution based on the thinking directly now."
Q = [{"role": "user", "content": "What is the capital of France?"}]


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    return init_checkpoint("zen-eco-tiny", tmp_path_factory.mktemp("think") / "tiny", dtype="float32")


@pytest.fixture(scope="module")
def tiny(tiny_dir) -> ZenModel:
    return zen_eco.load(tiny_dir, dtype="float32", device="cpu")


class ScriptedModel(torch.nn.Module):
    """The real model underneath (cache, shapes, dtypes), with every position's logits replaced by a
    one-hot choice of `policy(context_ids)`."""

    def __init__(self, inner, answer: list[int], close_after: int | None = None) -> None:
        super().__init__()
        self.inner, self.config = inner, inner.config
        self.answer, self.close_after = answer, close_after

    @property
    def device(self):
        return self.inner.device

    @property
    def dtype(self):
        return self.inner.dtype

    def new_cache(self, *args, **kwargs):
        return self.inner.new_cache(*args, **kwargs)

    def policy(self, ids: list[int]) -> int:
        turn = ids[len(ids) - ids[::-1].index(IM_START):] if IM_START in ids else ids
        if OPEN not in turn:
            return OPEN
        after_open = turn[len(turn) - turn[::-1].index(OPEN):]
        if CLOSE not in after_open:  # still thinking
            if self.close_after is not None and len(after_open) >= self.close_after:
                return CLOSE
            return HMM
        after = after_open[len(after_open) - after_open[::-1].index(CLOSE):]
        if not after:
            return NLNL
        while after and after[0] in (NL, NLNL):
            after = after[1:]
        return self.answer[len(after)] if len(after) < len(self.answer) else IM_END

    def forward(self, tokens, cache=None, last_only=False):
        prior = list(cache.token_ids) if cache is not None else []
        logits = self.inner(tokens, cache, last_only).clone()
        ids = prior + tokens[0].tolist()
        ends = [len(ids)] if last_only else range(len(prior) + 1, len(ids) + 1)
        for j, end in enumerate(ends):
            logits[0, j].fill_(-1e9)
            logits[0, j, self.policy(ids[:end])] = 0.0
        return logits


def scripted(tiny: ZenModel, close_after: int | None = None) -> ZenModel:
    answer = tiny.tokenizer.encode(ANSWER_TEXT, add_special_tokens=False)
    return ZenModel(ScriptedModel(tiny.model, answer, close_after), tiny.tokenizer, tiny.path)


def close_out_ids(tok) -> list[int]:
    return tok.encode(BUDGET_CLOSE_TEXT, add_special_tokens=False)


# --------------------------------------------------------------------------- the parser


CASES = [
    # (text, enabled, start_in_thinking, reasoning, content)
    ("<think>\nLet me see.\n</think>\n\nParis.", True, False, "Let me see.", "Paris."),
    ("  <think>a</think>b", True, False, "a", "b"),
    ("Let me see.\n</think>\n\nParis.", True, True, "Let me see.", "Paris."),  # the prompt opened <think>
    ("\n</think>\n\nParis.", True, True, "", "Paris."),
    ("<think>\n\n</think>\n\nParis.", True, False, "", "Paris."),
    ("Paris.", True, False, "", "Paris."),  # no block: all content
    ("  Paris <think>x</think>", True, False, "", "  Paris <think>x</think>"),  # a tag later is content
    ("<think>x</think>y", False, False, "", "<think>x</think>y"),  # thinking off: all content
    ("<think>\nstill thinking about it\n", True, False, "still thinking about it", ""),  # cut before </think>
    ("thinking and cut </thi", True, True, "thinking and cut </thi", ""),
    ("<thi", True, False, "", "<thi"),
    ("", True, False, "", ""),
    ("<think>a\n\n b </think>c </think> d", True, False, "a\n\n b", "c </think> d"),
]


@pytest.mark.parametrize("text,enabled,start,reasoning,content", CASES)
def test_parser_splits_whole_texts(text, enabled, start, reasoning, content):
    assert split_reasoning(text, enabled, start) == (reasoning, content)


@pytest.mark.parametrize("text,enabled,start,reasoning,content", CASES)
def test_parser_stream_deltas_concatenate_to_the_whole_split(text, enabled, start, reasoning, content):
    rng = random.Random(len(text))
    chunkings = [[text[:i], text[i:j], text[j:]] for i in range(len(text) + 1) for j in range(i, len(text) + 1, 3)]
    chunkings.append(list(text))  # one character at a time: every tag split across chunks
    for _ in range(20):
        cuts = sorted(rng.sample(range(len(text) + 1), min(4, len(text) + 1)))
        chunkings.append([text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])])
    for chunks in chunkings:
        parser = ReasoningParser(enabled, start)
        deltas = [parser.feed(c) for c in chunks] + [parser.finish()]
        assert "".join(r for r, _ in deltas) == reasoning, chunks
        assert "".join(c for _, c in deltas) == content, chunks


def test_parser_holds_back_only_what_could_become_a_tag():
    p = ReasoningParser()
    assert p.feed("<th") == ("", "")  # might be <think>: held
    assert p.feed("ink>\n") == ("", "")  # whitespace at the start of the reasoning is dropped
    assert p.feed("I think\n") == ("I think", "")  # trailing whitespace held: it may end the block
    assert p.feed("so") == ("\nso", "")
    p = ReasoningParser()
    p.feed("<think>\nabc")
    assert p.reasoning == "abc"
    assert p.feed(" </thi") == ("", "")  # might be </think>: held
    assert p.feed("nk>\n\nAns") == ("", "Ans")
    assert p.feed("wer") == ("", "wer")


# --------------------------------------------------------------------------- soft switches


def test_soft_switches_latest_wins():
    u = lambda s: {"role": "user", "content": s}  # noqa: E731
    a = {"role": "assistant", "content": "ok"}
    assert soft_switch([u("hi")]) is None
    assert soft_switch([u("hi /no_think")]) is False
    assert soft_switch([u("/no_think hi /think")]) is True
    assert soft_switch([u("/think"), a, u("and now /no_think")]) is False
    assert soft_switch([u("/no_think"), a, u("no switch here")]) is False  # an earlier turn's switch holds
    assert soft_switch([u("/no_think"), a, u("again /think")]) is True
    assert soft_switch([{"role": "system", "content": "/no_think"}, u("hi")]) is None  # user messages only
    assert soft_switch([u("a path/no_think or /thinking")]) is None  # whole words only
    assert soft_switch([u([{"type": "text", "text": "x /no_think"}])]) is False
    assert resolve_thinking([u("hi")]) is True
    assert resolve_thinking([u("hi /think")], enable_thinking=False) is False  # hard switch wins
    assert resolve_thinking([u("hi /no_think")], enable_thinking=True) is False  # the message is more specific
    assert resolve_thinking([u("hi /think")], thinking_budget=0) is False


def test_switches_reach_the_rendered_prompt(tiny, monkeypatch):
    zm = scripted(tiny)
    seen = []
    encode_chat = tiny.tokenizer.encode_chat

    def spy(messages, add_generation_prompt=True, **kw):
        seen.append(kw.get("enable_thinking"))
        return encode_chat(messages, add_generation_prompt, **kw)

    monkeypatch.setattr(zm.tokenizer, "encode_chat", spy)
    turns = [
        ([{"role": "user", "content": "hi"}], {}, True),
        ([{"role": "user", "content": "hi /no_think"}], {}, False),
        ([{"role": "user", "content": "hi /no_think"}, {"role": "assistant", "content": "x"},
          {"role": "user", "content": "more /think"}], {}, True),
        ([{"role": "user", "content": "hi /think"}], {"enable_thinking": False}, False),
        ([{"role": "user", "content": "hi"}], {"thinking_budget": 0}, False),
        ([{"role": "user", "content": "hi"}], {"template_kwargs": {"enable_thinking": False}}, False),
    ]
    for messages, kw, expected in turns:
        r = zm.chat(messages, max_tokens=4, temperature=0, **kw)
        assert seen[-1] is expected
        prompt = tiny.tokenizer.apply_chat_template(messages, enable_thinking=expected)
        assert prompt.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n") is (not expected)
        assert r.prompt_tokens == len(tiny.tokenizer.encode(prompt, add_special_tokens=False))
        assert (r.reasoning != "") is expected  # the scripted model thinks only when the prompt lets it


# --------------------------------------------------------------------------- the budget


@pytest.mark.parametrize("budget", [1, 5])
def test_budget_forces_the_close_out_after_exactly_n_thinking_tokens(tiny, budget):
    zm = scripted(tiny)
    tok = zm.tokenizer
    answer = tok.encode(ANSWER_TEXT, add_special_tokens=False)
    r = zm.chat(Q, max_tokens=64, temperature=0, thinking_budget=budget)
    assert r.token_ids == [OPEN] + [HMM] * budget + close_out_ids(tok) + answer + [IM_END]
    assert r.finish_reason == "stop" and r.generation_tokens == len(r.token_ids)  # forced tokens count
    assert r.reasoning == ("hmm" + " hmm" * (budget - 1)) + "\n\n" + CLOSE_OUT_TEXT
    assert r.content == ANSWER_TEXT.lstrip()
    assert r.text == "<think>" + " hmm" * budget + BUDGET_CLOSE_TEXT + ANSWER_TEXT
    # without a budget the model never stops thinking: cut at max_tokens, all reasoning, no content
    r = zm.chat(Q, max_tokens=10, temperature=0)
    assert r.token_ids == [OPEN] + [HMM] * 9 and r.finish_reason == "length"
    assert r.reasoning == "hmm" + " hmm" * 8 and r.content == ""


def test_budget_with_sampling_and_the_sampler_sees_forced_tokens(tiny):
    zm = scripted(tiny)
    r = zm.chat(Q, max_tokens=64, seed=3, thinking_budget=3)  # per-mode defaults: T 0.6, top-k 20 ...
    assert r.token_ids[:4] == [OPEN, HMM, HMM, HMM]
    assert r.token_ids[4:4 + len(close_out_ids(zm.tokenizer))] == close_out_ids(zm.tokenizer)
    assert CLOSE_OUT_TEXT in r.reasoning and r.content == ANSWER_TEXT.lstrip()


def test_budget_zero_behaves_like_thinking_off(tiny):
    zm = scripted(tiny)
    answer = zm.tokenizer.encode(ANSWER_TEXT, add_special_tokens=False)
    zero = zm.chat(Q, max_tokens=32, temperature=0, thinking_budget=0)
    off = zm.chat(Q, max_tokens=32, temperature=0, enable_thinking=False)
    assert zero.token_ids == off.token_ids == answer + [IM_END]
    assert zero.prompt_tokens == off.prompt_tokens
    assert (zero.reasoning, zero.content) == (off.reasoning, off.content) == ("", ANSWER_TEXT)


def test_an_early_close_ends_thinking_early(tiny):
    zm = scripted(tiny, close_after=3)
    answer = zm.tokenizer.encode(ANSWER_TEXT, add_special_tokens=False)
    r = zm.chat(Q, max_tokens=64, temperature=0, thinking_budget=10)
    assert r.token_ids == [OPEN, HMM, HMM, HMM, CLOSE, NLNL] + answer + [IM_END]
    assert CLOSE_OUT_TEXT not in r.text
    assert (r.reasoning, r.content) == ("hmm hmm hmm", ANSWER_TEXT.lstrip())


@pytest.mark.parametrize("budget", [None, 0, 4])
def test_streaming_and_non_streaming_agree(tiny, budget):
    zm = scripted(tiny)
    n = 40 if budget else 12
    whole = zm.chat(Q, max_tokens=n, temperature=0, thinking_budget=budget)
    chunks = list(zm.chat(Q, max_tokens=n, temperature=0, thinking_budget=budget, stream=True))
    assert [c.token for c in chunks] == whole.token_ids
    assert "".join(c.text for c in chunks) == whole.text
    assert "".join(c.reasoning for c in chunks) == whole.reasoning
    assert "".join(c.content for c in chunks) == whole.content
    # forced tokens report their log-probability under the model (here ~ -1e9: the script wanted " hmm")
    assert all(c.logprob is not None and math.isfinite(c.logprob) for c in chunks)
    if budget:
        # the reasoning arrives before the content, and both as they are generated
        first_content = next(i for i, c in enumerate(chunks) if c.content)
        assert not any(c.reasoning for c in chunks[first_content:])
        assert sum(1 for c in chunks if c.reasoning) >= budget


def test_a_prompt_that_opens_think_starts_inside_the_block(tiny):
    """Templates that open <think> in the prompt: the output begins inside thinking, the budget
    counts from the first generated token, and the parser reads it as reasoning."""
    zm = scripted(tiny)
    tok = zm.tokenizer
    answer = tok.encode(ANSWER_TEXT, add_special_tokens=False)
    prompt = tok.encode_chat(Q, enable_thinking=True) + [OPEN, NL]
    r = zm.generate(prompt, max_tokens=64, temperature=0, thinking_budget=2)
    assert r.token_ids == [HMM, HMM] + close_out_ids(tok) + answer + [IM_END]
    assert r.reasoning == "hmm hmm\n\n" + CLOSE_OUT_TEXT and r.content == ANSWER_TEXT.lstrip()
    r = zm.generate(prompt, max_tokens=64, temperature=0, thinking_budget=0)
    assert r.token_ids == close_out_ids(tok) + answer + [IM_END]
    assert r.reasoning == CLOSE_OUT_TEXT


def test_a_server_stepping_sequences_gets_the_budget(tiny):
    zm = scripted(tiny)
    tok = zm.tokenizer
    prompt = tok.encode_chat(Q, enable_thinking=True)
    seq = Sequence(zm.model, prompt, SamplingParams.greedy(), 40, tok.eos_token_ids,
                   thinking=ThinkingBudget.for_tokenizer(tok, 2))
    while not seq.finished:
        seq.step()
    n = 3 + len(close_out_ids(tok))
    assert seq.output_ids[:n] == [OPEN, HMM, HMM] + close_out_ids(tok)
    assert seq.forced_tokens == len(close_out_ids(tok)) and seq.thinking.state == "done"


def test_bad_budgets_are_refused(tiny):
    for bad in (-1, 131073, 1.5, True, "3"):
        with pytest.raises(ZenError, match="thinking_budget"):
            tiny.chat(Q, max_tokens=4, thinking_budget=bad)


# --------------------------------------------------------------------------- sampling defaults


def test_per_mode_sampling_defaults(tiny, monkeypatch):
    import zen_eco.api as api

    seen = []
    real = api.stream_generate
    monkeypatch.setattr(api, "stream_generate", lambda m, t, ids, params, *a, **k: seen.append(params) or real(m, t, ids, params, *a, **k))
    zm = scripted(tiny)
    pick = lambda p: {k: getattr(p, k) for k in THINKING_DEFAULTS}  # noqa: E731
    zm.chat(Q, max_tokens=2)
    assert pick(seen[-1]) == THINKING_DEFAULTS == {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "min_p": 0.0}
    zm.chat([{"role": "user", "content": "hi /no_think"}], max_tokens=2)
    assert pick(seen[-1]) == NON_THINKING_DEFAULTS == {"temperature": 0.7, "top_p": 0.8, "top_k": 20, "min_p": 0.0}
    zm.chat(Q, max_tokens=2, enable_thinking=False, temperature=0.3, seed=1)  # given fields win, the rest per mode
    assert pick(seen[-1]) == NON_THINKING_DEFAULTS | {"temperature": 0.3} and seen[-1].seed == 1
    zm.chat(Q, max_tokens=2, sampling=SamplingParams())  # an explicit SamplingParams is used as is
    assert seen[-1] == SamplingParams()
    # a model without <think> keeps SamplingParams' own defaults
    assert params_for_mode(None) == SamplingParams()
    no_think = type("Tok", (), {"token_to_id": staticmethod(lambda t: None)})()
    assert ZenModel(tiny.model, no_think, "x").thinking_mode(Q) is None


# --------------------------------------------------------------------------- the CLI


def zen(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    return subprocess.run([sys.executable, "-m", "zen_eco.cli", *args], capture_output=True, text=True,
                          timeout=180, env=env, input=stdin)


@pytest.fixture(scope="module")
def opens_think_dir(tiny_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint with a template that opens <think> in the prompt (as Qwen3-Thinking-2507
    and DeepSeek-R1 do), so that even random weights start inside the thinking block."""
    import shutil

    d = tmp_path_factory.mktemp("opens") / "tiny"
    shutil.copytree(tiny_dir, d)
    tail = "{%- if enable_thinking is defined and enable_thinking is false -%}"
    assert tail in QWEN3_CHAT_TEMPLATE
    template = QWEN3_CHAT_TEMPLATE.replace(tail, "{%- if enable_thinking is not defined or enable_thinking -%}"
                                           "{{- '<think>' ~ NL -}}{%- endif -%}" + tail)
    (d / "chat_template.jinja").write_text(template, encoding="utf-8")
    return d


def test_cli_thinking_flags(tiny_dir, opens_think_dir):
    """`run` on random weights whose template opens <think>: check the structure, not the text."""
    base = ["-m", str(opens_think_dir), "--temp", "0", "-n", "32", "--dtype", "float32", "-v"]
    shown = zen("run", "Hello", "--thinking-budget", "3", *base)
    assert shown.returncode == 0, shown.stderr
    # piped: the thinking between <think> lines, with the close-out the budget forced, then the answer
    assert shown.stdout.startswith("<think>\n"), shown.stdout
    assert CLOSE_OUT_TEXT + "\n</think>\n" in shown.stdout  # (random weights: the answer may be blank)
    hidden = zen("run", "Hello", "--think", "--thinking-budget", "3", "--hide-thinking", *base)
    assert hidden.returncode == 0, hidden.stderr
    assert "<think>" not in hidden.stdout and CLOSE_OUT_TEXT not in hidden.stdout
    assert hidden.stdout.strip() == shown.stdout.split("\n</think>\n", 1)[1].strip()  # the same answer, alone
    prompt = lambda p: int(re.search(r"prompt (\d+) tok", p.stderr).group(1))  # noqa: E731
    off = zen("run", "Hello", "--no-think", *base, "-n", "1")
    assert off.returncode == 0, off.stderr
    assert prompt(off) == prompt(shown) + 2  # "<think>\n" (2 tokens) out, "<think>\n\n</think>\n\n" (4) in
    bad = zen("run", "Hello", "--thinking-budget", "-2", "-m", str(tiny_dir))
    assert bad.returncode == 1 and bad.stderr.strip().startswith("error:") and "thinking_budget" in bad.stderr


def test_cli_chat_keeps_only_the_answers(opens_think_dir):
    proc = zen("chat", "-m", str(opens_think_dir), "--temp", "0", "-n", "30", "--dtype", "float32",
               "--thinking-budget", "2", stdin="Hi there\nAgain /no_think\n/exit\n")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(">>>") == 3 and "Traceback" not in proc.stderr
    assert proc.stdout.count(CLOSE_OUT_TEXT) == 1  # turn 1 thinks (budget 2); turn 2 says /no_think
    stats = re.findall(r"prompt (\d+) tok .*?generated (\d+) tok", proc.stderr)
    assert len(stats) == 2, proc.stderr
