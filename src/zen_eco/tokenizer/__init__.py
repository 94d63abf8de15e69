"""Tokenizers for the models we run: from a Hugging Face directory or from GGUF metadata.

`Tokenizer` wraps a `tokenizers.Tokenizer` (the Rust backend does the work) and adds what a
chat runtime needs on top: the ids that end generation, the chat template, BOS handling for
rendered prompts, and streaming detokenisation.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import processors

from zen_eco.errors import TokenizerError
from zen_eco.tokenizer.chat import ChatTemplate
from zen_eco.tokenizer.gguf_vocab import gguf_special_tokens, tokenizer_from_gguf
from zen_eco.tokenizer.stream import StreamDecoder

__all__ = ["ChatTemplate", "StreamDecoder", "Tokenizer", "gguf_special_tokens", "tokenizer_from_gguf"]

# End-of-turn markers of common chat formats. A chat model stops on its turn marker even when
# the file names a different EOS (e.g. <|endoftext|>), so we stop on any of these that the
# model's template actually writes.
_END_OF_TURN = ("<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endofturn|>")


class Tokenizer:
    """Encode/decode text, render chat prompts, and know when generation has ended."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        bos_token_id: int | None = None,
        eos_token_ids: Iterable[int] = (),
        chat_template: str | None = None,
    ) -> None:
        self.backend = backend
        self.vocab_size: int = backend.get_vocab_size(with_added_tokens=True)
        self.bos_token_id = bos_token_id
        self.chat_template: ChatTemplate | None = ChatTemplate(chat_template) if chat_template else None
        ids: list[int] = []
        for i in list(eos_token_ids) + self._template_end_of_turn_ids():
            if i not in ids:
                ids.append(self._check_id(i))
        self.eos_token_ids: list[int] = ids
        # What encode() really does, rather than what a config claims: the post-processor decides.
        probe = backend.encode("", add_special_tokens=True).ids
        self.add_bos: bool = bos_token_id is not None and probe[:1] == [bos_token_id]

    # ------------------------------------------------------------------ constructors

    @classmethod
    def from_gguf_metadata(cls, metadata: dict[str, Any]) -> Tokenizer:
        """Build from GGUF metadata (plain Python values, as a GGUF reader returns them)."""
        backend = tokenizer_from_gguf(metadata)
        special = gguf_special_tokens(metadata)
        eos = [special[k] for k in ("eos_token_id", "eot_token_id", "eom_token_id") if special[k] is not None]
        return cls(backend, special["bos_token_id"], eos, special["chat_template"])

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Build from a Hugging Face model directory: tokenizer.json, plus tokenizer_config.json
        (chat template, bos/eos, add_bos_token), chat_template.jinja and generation_config.json
        when present."""
        path = Path(path)
        tok_file = path / "tokenizer.json"
        if not tok_file.is_file():
            raise TokenizerError(f"no tokenizer.json in {path}")
        try:
            backend = tokenizers.Tokenizer.from_file(str(tok_file))
        except Exception as exc:
            raise TokenizerError(f"cannot load {tok_file}: {exc}") from exc
        config = _read_json(path / "tokenizer_config.json")

        bos_id = _config_token_id(backend, config, "bos_token")
        eos_ids = [i for i in [_config_token_id(backend, config, "eos_token")] if i is not None]
        gen_eos = _read_json(path / "generation_config.json").get("eos_token_id")
        for i in gen_eos if isinstance(gen_eos, list) else [gen_eos]:
            if isinstance(i, int) and not isinstance(i, bool) and i not in eos_ids:
                eos_ids.append(i)

        for flag in ("add_bos_token", "add_eos_token"):
            if flag in config and not isinstance(config[flag], bool):
                raise TokenizerError(f"{flag} in tokenizer_config.json is {config[flag]!r}, not a bool")
        if isinstance(config.get("add_bos_token"), bool) or config.get("add_eos_token") is True:
            _apply_bos_eos_flags(backend, config, bos_id, eos_ids[0] if eos_ids else None)

        return cls(backend, bos_id, eos_ids, _dir_chat_template(path, config))

    # ------------------------------------------------------------------ tokens

    @property
    def bos_token(self) -> str | None:
        return self.id_to_token(self.bos_token_id) if self.bos_token_id is not None else None

    @property
    def eos_token(self) -> str | None:
        return self.id_to_token(self.eos_token_ids[0]) if self.eos_token_ids else None

    def token_to_id(self, token: str) -> int | None:
        return self.backend.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
            return None
        return self.backend.id_to_token(i)

    def _check_id(self, i: Any) -> int:
        if isinstance(i, bool) or not isinstance(i, int) or not 0 <= i < self.vocab_size:
            raise TokenizerError(f"token id {i!r} is not in the vocabulary (size {self.vocab_size})")
        return i

    def _template_end_of_turn_ids(self) -> list[int]:
        if self.chat_template is None:
            return []
        found = [self.token_to_id(t) for t in _END_OF_TURN if t in self.chat_template.source]
        return [i for i in found if i is not None]

    # ------------------------------------------------------------------ text

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`. Special tokens written in the text (e.g. `<|im_start|>`) are
        recognised as such; `add_special_tokens` adds the BOS/EOS the tokenizer is set up for."""
        if not isinstance(text, str):
            raise TokenizerError(f"can only encode a str, got {type(text).__name__}")
        if not text.isascii():
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:  # a lone surrogate, e.g. from a JSON "\ud800" escape
                raise TokenizerError(f"the text is not valid Unicode: {exc.reason} at position {exc.start}") from None
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        ids = [self._check_id(i) for i in ids]
        return self.backend.decode(ids, skip_special_tokens=skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = False) -> StreamDecoder:
        return StreamDecoder(self.backend, skip_special_tokens)

    # ------------------------------------------------------------------ chat

    def apply_chat_template(self, messages: Any, add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The prompt text for a conversation, rendered with the model's chat template."""
        if self.chat_template is None:
            raise TokenizerError("this tokenizer has no chat template; pass a plain prompt instead")
        kwargs.setdefault("bos_token", self.bos_token or "")
        kwargs.setdefault("eos_token", self.eos_token or "")
        return self.chat_template.render(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def encode_chat(self, messages: Any, add_generation_prompt: bool = True, **kwargs: Any) -> list[int]:
        """Ids of the rendered chat prompt, with exactly one BOS when the tokenizer adds one.

        Templates often write the BOS text themselves; encoding that with special tokens on would
        double it. So we encode the text as is and put BOS in front only if it is not there yet.
        (An EOS flag is deliberately ignored: a prompt must not end the turn it asks for.)
        """
        ids = self.encode(self.apply_chat_template(messages, add_generation_prompt, **kwargs), False)
        if self.add_bos and ids[:1] != [self.bos_token_id]:
            ids.insert(0, self.bos_token_id)
        return ids


# ---------------------------------------------------------------------- from_dir helpers


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} must hold a JSON object, got {type(data).__name__}")
    return data


def _config_token_id(backend: tokenizers.Tokenizer, config: dict[str, Any], key: str) -> int | None:
    value = config.get(key)
    if isinstance(value, dict):  # older configs store AddedToken dicts
        value = value.get("content")
    if value is None:
        return None
    if not isinstance(value, str):
        raise TokenizerError(f"{key} in tokenizer_config.json is {value!r:.60}, not a token string")
    token_id = backend.token_to_id(value)
    if token_id is None:
        raise TokenizerError(f"{key} {value!r} from tokenizer_config.json is not in the vocabulary")
    return token_id


def _dir_chat_template(path: Path, config: dict[str, Any]) -> str | None:
    jinja_file = path / "chat_template.jinja"
    if jinja_file.is_file():  # newer transformers save the template on its own; it wins
        return jinja_file.read_text(encoding="utf-8")
    chat_json = _read_json(path / "chat_template.json")
    template = chat_json.get("chat_template", config.get("chat_template"))
    if isinstance(template, list):  # named templates: [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default")
    if template is not None and not isinstance(template, str):
        raise TokenizerError(f"chat_template in {path} is {type(template).__name__}, not a string")
    return template


def _apply_bos_eos_flags(
    backend: tokenizers.Tokenizer, config: dict[str, Any], bos_id: int | None, eos_id: int | None
) -> None:
    """Make the post-processor follow explicit add_bos_token/add_eos_token flags, as transformers
    does, when tokenizer.json's post-processor disagrees with them."""
    probe = backend.encode("x", add_special_tokens=True).ids
    plain = backend.encode("x", add_special_tokens=False).ids
    has_bos = bos_id is not None and probe[: 1] == [bos_id] and plain[:1] != [bos_id]
    has_eos = eos_id is not None and probe[-1:] == [eos_id] and plain[-1:] != [eos_id]
    want_bos = config.get("add_bos_token", has_bos)
    want_eos = config.get("add_eos_token", has_eos)
    if (want_bos, want_eos) == (has_bos, has_eos):
        return
    if (want_bos and bos_id is None) or (want_eos and eos_id is None):
        raise TokenizerError("tokenizer_config.json asks to add a BOS/EOS token but names none")
    bos = backend.id_to_token(bos_id) if want_bos and bos_id is not None else None
    eos = backend.id_to_token(eos_id) if want_eos and eos_id is not None else None
    single = ([f"{bos}:0"] if bos else []) + ["$A:0"] + ([f"{eos}:0"] if eos else [])
    pair = single + ([f"{bos}:1"] if bos else []) + ["$B:1"] + ([f"{eos}:1"] if eos else [])
    ids = [(t, i) for t, i in ((bos, bos_id), (eos, eos_id)) if t]
    backend.post_processor = processors.TemplateProcessing(single=single, pair=pair, special_tokens=ids)
