"""Render Hugging Face style Jinja2 chat templates, safely.

Templates come from model files we did not write, so they run in Jinja's immutable sandbox and
any reach for Python internals is an error (TokenizerError), not a silently empty string.
The environment mirrors the one transformers gives templates (trim_blocks, lstrip_blocks,
loop controls, `raise_exception`, `strftime_now`, a `tojson` that keeps non-ASCII) so that a
template renders the same text here as there.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension
from jinja2.sandbox import ImmutableSandboxedEnvironment

from zen_eco.errors import TokenizerError


class _GenerationTag(Extension):
    """`{% generation %}...{% endgeneration %}`: transformers uses it to mark assistant text for
    training masks; for rendering it is a no-op wrapper around its body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.Scope(body, lineno=lineno)


class _Sandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        # The stock sandbox returns an Undefined that only fails when used further, so
        # `{{ x.__class__ }}` would render as "". Refuse at the first unsafe access instead.
        raise TokenizerError(f"chat template tried to access unsafe attribute {attribute!r} of {type(obj).__name__}")


def _raise_exception(message: str) -> None:
    raise TokenizerError(f"chat template raised an error: {message}")


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: Any = None, sort_keys: bool = False) -> str:
    # Jinja's builtin tojson HTML-escapes and forces ASCII; templates expect plain JSON.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> jinja2.Environment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols", _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env


def normalize_messages(messages: Any) -> list[dict[str, Any]]:
    """Check a conversation's shape and flatten `[{"type": "text", "text": ...}]` content to a string.

    Returns new dicts; the caller's messages are not modified.
    """
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TokenizerError(f"messages must be a list of dicts, got {type(messages).__name__}")
    out = []
    for i, msg in enumerate(messages):
        if not isinstance(msg, Mapping):
            raise TokenizerError(f"message {i} must be a dict with 'role' and 'content', got {type(msg).__name__}")
        role = msg.get("role")
        if not isinstance(role, str) or not role:
            raise TokenizerError(f"message {i} has role {role!r}; it must be a non-empty string")
        msg = dict(msg)
        content = msg.get("content")
        if isinstance(content, str):
            pass
        elif content is None and "tool_calls" in msg:  # an assistant turn that only calls tools
            pass
        elif isinstance(content, Sequence) and not isinstance(content, (str, bytes)):
            msg["content"] = "".join(_text_part(part, i, j) for j, part in enumerate(content))
        else:
            raise TokenizerError(
                f"message {i} ({role}) has content {content!r:.60}; it must be a string or a list of text parts"
            )
        out.append(msg)
    return out


def _text_part(part: Any, i: int, j: int) -> str:
    if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
        raise TokenizerError(f"message {i} content part {j} is {part!r:.60}; only {{'type': 'text', 'text': str}} parts are supported")
    return part["text"]


class ChatTemplate:
    """A compiled chat template. Compiling checks the syntax; rendering checks the messages."""

    def __init__(self, source: str) -> None:
        if not isinstance(source, str) or not source.strip():
            raise TokenizerError(f"chat template must be a non-empty string, got {source!r:.60}")
        self.source = source
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateSyntaxError as exc:
            raise TokenizerError(f"chat template has a syntax error at line {exc.lineno}: {exc.message}") from exc

    def render(
        self,
        messages: Any,
        add_generation_prompt: bool = True,
        bos_token: str = "",
        eos_token: str = "",
        **kwargs: Any,
    ) -> str:
        """The prompt text for `messages`, ending with the assistant header if `add_generation_prompt`."""
        context = {
            "tools": None,
            "documents": None,
            **kwargs,
            "messages": normalize_messages(messages),
            "add_generation_prompt": add_generation_prompt,
            "bos_token": bos_token,
            "eos_token": eos_token,
        }
        try:
            return self._template.render(**context)
        except TokenizerError:
            raise
        except Exception as exc:  # SecurityError, UndefinedError, a TypeError from template arithmetic...
            raise TokenizerError(f"chat template failed to render: {type(exc).__name__}: {exc}") from exc
