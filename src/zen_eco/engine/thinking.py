"""Thinking mode: the `<think>…</think>` block some chat models (Qwen3, Zen-Eco) write before the answer.

Three pieces, each usable on its own:

- `resolve_thinking(messages, enable_thinking, thinking_budget)`: whether a chat turn thinks. An
  explicit `enable_thinking=False` (or `thinking_budget=0`) is a hard off; otherwise the latest
  `/think` or `/no_think` soft switch in the user messages decides, and thinking is on by default.
- `ThinkingBudget`: a token-level hook for `engine.generate.Sequence`. It counts the tokens
  generated after `<think>`; once `budget` of them are out and `</think>` has not come, it hands
  the sequence the ids of `BUDGET_CLOSE_TEXT` to force (run through the model as if generated,
  counted as output), and the model goes on with the answer. An early `</think>` ends it early.
- `ReasoningParser`: splits generated text into `reasoning` (inside the block) and `content`
  (after it), for a whole text or incrementally for a stream; both give the same split.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Sequence as Seq

from ..errors import ZenError

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
MAX_THINKING_BUDGET = 131072

# What Qwen3's authors append when a thinking budget runs out (their recommended close-out).
BUDGET_CLOSE_TEXT = (
    "\n\nConsidering the limited time by the user, I have to give the solution based on the thinking "
    "directly now.\n</think>\n\n"
)

_SWITCH = re.compile(r"(?<!\S)/(no_think|think)(?!\S)")


@dataclass(frozen=True)
class ThinkingTokens:
    open_id: int
    close_id: int


def thinking_tokens(tokenizer: Any) -> ThinkingTokens | None:
    """The ids of `<think>` and `</think>` when the tokenizer has both as single tokens, else None."""
    open_id, close_id = tokenizer.token_to_id(THINK_OPEN), tokenizer.token_to_id(THINK_CLOSE)
    if open_id is None or close_id is None:
        return None
    return ThinkingTokens(open_id, close_id)


def check_thinking_budget(budget: Any) -> int | None:
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, int) or not 0 <= budget <= MAX_THINKING_BUDGET:
        raise ZenError(f"thinking_budget must be an integer in [0, {MAX_THINKING_BUDGET}], got {budget!r}")
    return budget


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multi-part content: [{"type": "text", "text": ...}, ...]
        return " ".join(p.get("text", "") for p in content if isinstance(p, dict) and isinstance(p.get("text"), str))
    return ""


def soft_switch(messages: Seq[Any]) -> bool | None:
    """The latest `/think` (True) or `/no_think` (False) in the user messages; None if there is none."""
    for message in reversed(list(messages)):
        if not isinstance(message, dict) or message.get("role") != "user":
            continue
        found = _SWITCH.findall(_text_of(message.get("content")))
        if found:
            return found[-1] == "think"
    return None


def resolve_thinking(messages: Seq[Any], enable_thinking: bool | None = None, thinking_budget: int | None = None) -> bool:
    """Whether this turn thinks: hard off with enable_thinking=False or thinking_budget=0; else the
    latest soft switch in the user messages; else on."""
    if enable_thinking is False or thinking_budget == 0:
        return False
    switch = soft_switch(messages)
    return True if switch is None else switch


def prompt_opens_thinking(prompt_ids: Seq[int], tokens: ThinkingTokens, turn_end_ids: Seq[int] = ()) -> bool:
    """True when the prompt leaves a `<think>` open in its last turn (templates that start the
    assistant turn with `<think>`): the output then begins inside the thinking block."""
    ends = set(turn_end_ids)
    for token in reversed(list(prompt_ids)):
        if token == tokens.close_id or token in ends:
            return False
        if token == tokens.open_id:
            return True
    return False


class ThinkingBudget:
    """Token-level thinking budget for one sequence. `initial()` once, then `observe(token)` for every
    output token; both return the ids to force next (usually none)."""

    def __init__(self, budget: int, tokens: ThinkingTokens, close_ids: Seq[int], start_in_thinking: bool = False):
        self.budget = check_thinking_budget(budget)
        self.tokens = tokens
        self.close_ids = list(close_ids)
        self.state = "thinking" if start_in_thinking else "before"  # -> thinking -> (closing ->) done
        self.thinking_tokens = 0

    @classmethod
    def for_tokenizer(cls, tokenizer: Any, budget: int, start_in_thinking: bool = False) -> "ThinkingBudget | None":
        tokens = thinking_tokens(tokenizer)
        if tokens is None:
            return None
        return cls(budget, tokens, tokenizer.encode(BUDGET_CLOSE_TEXT, add_special_tokens=False), start_in_thinking)

    def _spent(self) -> list[int]:
        if self.thinking_tokens >= self.budget:
            self.state = "closing"
            return list(self.close_ids)
        return []

    def initial(self) -> list[int]:
        return self._spent() if self.state == "thinking" else []

    def observe(self, token: int) -> list[int]:
        if self.state == "before":
            if token == self.tokens.open_id:
                self.state = "thinking"
                return self._spent()
        elif self.state == "thinking":
            if token == self.tokens.close_id:
                self.state = "done"
            else:
                self.thinking_tokens += 1
                return self._spent()
        elif self.state == "closing" and token == self.tokens.close_id:
            self.state = "done"
        return []


class ReasoningParser:
    """Split generated text into reasoning and content, whole or as a stream.

    `feed(text)` returns `(reasoning_delta, content_delta)`; `finish()` returns what was held back.
    Cases: output that opens with `<think>` (after optional whitespace), output that starts inside
    the block (`start_in_thinking`: the prompt opened it), no block at all (everything is content),
    `enabled=False` (thinking off: everything is content), and output cut before `</think>`
    (everything is reasoning, content empty). The reasoning is stripped of surrounding whitespace
    and the content of the whitespace that follows `</think>`. Text that could still become a tag
    (or trailing whitespace inside the block) is held back until the next chunk decides it, so the
    deltas of any chunking concatenate to the split of the whole text.
    """

    def __init__(self, enabled: bool = True, start_in_thinking: bool = False,
                 open_tag: str = THINK_OPEN, close_tag: str = THINK_CLOSE) -> None:
        self.open_tag, self.close_tag = open_tag, close_tag
        self.state = "content" if not enabled else ("thinking" if start_in_thinking else "start")
        self._buf = ""
        self._reasoning_started = False
        self.reasoning = ""
        self.content = ""

    def _out(self, reasoning: str, content: str) -> tuple[str, str]:
        self.reasoning += reasoning
        self.content += content
        return reasoning, content

    def _reason(self, text: str) -> str:
        if not self._reasoning_started:
            text = text.lstrip()
            self._reasoning_started = bool(text)
        return text

    def feed(self, text: str) -> tuple[str, str]:
        buf = self._buf + text
        self._buf = ""
        reasoning = content = ""
        if self.state == "start":
            rest = buf.lstrip()
            if rest.startswith(self.open_tag):
                self.state, buf = "thinking", rest[len(self.open_tag):]
            elif self.open_tag.startswith(rest):  # whitespace and perhaps the start of the tag: wait
                self._buf = buf
                return "", ""
            else:
                self.state = "content"
        if self.state == "thinking":
            cut = buf.find(self.close_tag)
            if cut >= 0:
                reasoning = self._reason(buf[:cut].rstrip())
                self.state, buf = "after", buf[cut + len(self.close_tag):]
            else:
                hold = next((n for n in range(min(len(self.close_tag) - 1, len(buf)), 0, -1)
                             if buf.endswith(self.close_tag[:n])), 0)
                body = buf[: len(buf) - hold].rstrip()
                self._buf = buf[len(body):]
                return self._out(self._reason(body), "")
        if self.state == "after":
            buf = buf.lstrip()
            if buf:
                self.state = "content"
        if self.state == "content":
            content = buf
        return self._out(reasoning, content)

    def finish(self) -> tuple[str, str]:
        buf, self._buf = self._buf, ""
        if self.state == "thinking":  # cut off before </think>: all of it is reasoning
            return self._out(self._reason(buf).rstrip(), "")
        if self.state in ("start", "content"):
            return self._out("", buf)
        return "", ""


def split_reasoning(text: str, enabled: bool = True, start_in_thinking: bool = False) -> tuple[str, str]:
    """`(reasoning, content)` of a finished generation."""
    parser = ReasoningParser(enabled, start_in_thinking)
    parser.feed(text)
    parser.finish()
    return parser.reasoning, parser.content
