"""Build a `tokenizers.Tokenizer` from the tokenizer metadata a GGUF file carries.

A GGUF has no tokenizer.json: it stores the vocabulary, the scores or merges, a type per token and
the special ids under llama.cpp's `tokenizer.ggml.*` keys. Two families matter for us:

* `gpt2`: byte-level BPE with an explicit merge list; how text is cut before merging (the
  pre-tokenizer regex) is named by `tokenizer.ggml.pre`.
* `llama`: SentencePiece-style BPE over scores, spaces written as U+2581, unknown characters
  spelled as `<0xNN>` byte tokens.

Our reference for "correct" is transformers' own GGUF tokenizer loading, so where llama.cpp and
transformers disagree we follow transformers (the differences are listed next to the code).
"""

from __future__ import annotations

from numbers import Integral, Real
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import BPE

from zen_eco.errors import TokenizerError

# Values of `tokenizer.ggml.token_type` (the same numbering SentencePiece uses).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

SPM_SPACE = "\u2581"

# Pre-tokenizer split regexes, as published by the models' authors (GPT-2, Llama 3, Qwen2).
_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# `tokenizer.ggml.pre` name -> split regex. SmolLM and StarCoder kept GPT-2's regex.
PRE_TOKENIZER_SPLITS: dict[str, str] = {
    "default": _GPT2_SPLIT,
    "gpt2": _GPT2_SPLIT,
    "smollm": _GPT2_SPLIT,
    "starcoder": _GPT2_SPLIT,
    "llama-bpe": _LLAMA3_SPLIT,
    "llama3": _LLAMA3_SPLIT,
    "llama-v3": _LLAMA3_SPLIT,
    "smaug-bpe": _LLAMA3_SPLIT,
    "qwen2": _QWEN2_SPLIT,
    "deepseek-r1-qwen": _QWEN2_SPLIT,
}

# Keys of `gguf_special_tokens` -> the metadata key holding that id.
_SPECIAL_ID_KEYS = {
    "bos_token_id": "tokenizer.ggml.bos_token_id",
    "eos_token_id": "tokenizer.ggml.eos_token_id",
    "eot_token_id": "tokenizer.ggml.eot_token_id",
    "eom_token_id": "tokenizer.ggml.eom_token_id",
    "unknown_token_id": "tokenizer.ggml.unknown_token_id",
    "padding_token_id": "tokenizer.ggml.padding_token_id",
    "sep_token_id": "tokenizer.ggml.seperator_token_id",  # llama.cpp's spelling
    "cls_token_id": "tokenizer.ggml.cls_token_id",
    "mask_token_id": "tokenizer.ggml.mask_token_id",
}


# --------------------------------------------------------------------------- metadata access


def _str(md: dict[str, Any], key: str, default: str | None = None) -> str | None:
    value = md.get(key, default)
    if value is not None and not isinstance(value, str):
        raise TokenizerError(f"GGUF metadata {key} must be a string, got {type(value).__name__} {value!r:.80}")
    return value


def _bool(md: dict[str, Any], key: str, default: bool) -> bool:
    value = md.get(key, default)
    if not isinstance(value, bool):
        raise TokenizerError(f"GGUF metadata {key} must be a bool, got {type(value).__name__} {value!r:.80}")
    return value


def _list(md: dict[str, Any], key: str, required: bool = True) -> list[Any] | None:
    value = md.get(key)
    if value is None:
        if required:
            raise TokenizerError(f"GGUF metadata has no {key}; cannot build a tokenizer without it")
        return None
    if hasattr(value, "tolist"):  # a numpy array from a reader: same values, plain Python
        value = value.tolist()
    if not isinstance(value, (list, tuple)):
        raise TokenizerError(f"GGUF metadata {key} must be an array, got {type(value).__name__}")
    return list(value)


def _tokens(md: dict[str, Any]) -> list[str]:
    tokens = _list(md, "tokenizer.ggml.tokens")
    assert tokens is not None
    if not tokens:
        raise TokenizerError("GGUF metadata tokenizer.ggml.tokens is empty")
    if set(map(type, tokens)) != {str}:  # the check in C; the loop below only to name the culprit
        for i, tok in enumerate(tokens):
            if not isinstance(tok, str):
                raise TokenizerError(f"GGUF token {i} is {type(tok).__name__} {tok!r:.40}, not a string")
    return tokens


def _token_types(md: dict[str, Any], n_tokens: int) -> list[int]:
    types = _list(md, "tokenizer.ggml.token_type", required=False)
    if types is None:  # old files: everything is an ordinary token
        return [NORMAL] * n_tokens
    if len(types) != n_tokens:
        raise TokenizerError(f"GGUF tokenizer.ggml.token_type has {len(types)} entries for {n_tokens} tokens")
    if set(map(type, types)) == {int} and NORMAL <= min(types) and max(types) <= BYTE:
        return types  # plain ints in range (as a GGUF reader gives them): checked without a Python loop
    for i, t in enumerate(types):
        if not isinstance(t, Integral) or isinstance(t, bool) or not NORMAL <= int(t) <= BYTE:
            raise TokenizerError(f"GGUF token_type[{i}] = {t!r} is not one of 1..6")
    return [int(t) for t in types]


def _token_id(md: dict[str, Any], key: str, n_tokens: int) -> int | None:
    value = md.get(key)
    if value is None:
        return None
    if not isinstance(value, Integral) or isinstance(value, bool):
        raise TokenizerError(f"GGUF metadata {key} must be an integer, got {value!r:.80}")
    value = int(value)
    # llama.cpp writes -1 (or the unsigned 0xFFFFFFFF) for "no such token"
    if value == -1 or value == 0xFFFFFFFF:
        return None
    if not 0 <= value < n_tokens:
        raise TokenizerError(f"GGUF metadata {key} = {value} is outside the vocabulary (size {n_tokens})")
    return value


# --------------------------------------------------------------------------- public API


def gguf_special_tokens(metadata: dict[str, Any]) -> dict[str, Any]:
    """The special ids, BOS/EOS flags and chat template a GGUF's metadata declares.

    Keys: bos/eos/eot/eom/unknown/padding/sep/cls/mask `_token_id` (int or None), `add_bos_token`,
    `add_eos_token` (bool, with the family's default when absent: BOS on for SentencePiece vocabs,
    as llama.cpp and transformers do) and `chat_template` (str or None).
    """
    n_tokens = len(_tokens(metadata))
    out: dict[str, Any] = {name: _token_id(metadata, key, n_tokens) for name, key in _SPECIAL_ID_KEYS.items()}
    model = _str(metadata, "tokenizer.ggml.model")
    add_bos = _bool(metadata, "tokenizer.ggml.add_bos_token", model == "llama")
    if add_bos and out["bos_token_id"] is None:
        if "tokenizer.ggml.add_bos_token" in metadata:
            raise TokenizerError("GGUF metadata sets tokenizer.ggml.add_bos_token but has no bos_token_id")
        add_bos = False  # only a default; nothing to add
    add_eos = _bool(metadata, "tokenizer.ggml.add_eos_token", False)
    if add_eos and out["eos_token_id"] is None:
        raise TokenizerError("GGUF metadata sets tokenizer.ggml.add_eos_token but has no eos_token_id")
    out["add_bos_token"] = add_bos
    out["add_eos_token"] = add_eos
    out["chat_template"] = _str(metadata, "tokenizer.chat_template")
    return out


def tokenizer_from_gguf(metadata: dict[str, Any]) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to the one the GGUF metadata describes.

    Control and unknown tokens (and the declared bos/eos/unk/pad ids) become special added tokens,
    user-defined ones plain added tokens, so `encode()` matches them whole inside text.
    """
    model = _str(metadata, "tokenizer.ggml.model")
    tokens = _tokens(metadata)
    types = _token_types(metadata, len(tokens))
    if model == "gpt2":
        tok = _byte_level_bpe(metadata, tokens)
    elif model == "llama":
        tok = _sentencepiece_bpe(metadata, tokens, types)
    else:
        raise TokenizerError(f"GGUF tokenizer.ggml.model {model!r} is not supported; supported: 'gpt2', 'llama'")
    specials = gguf_special_tokens(metadata)
    _add_special_tokens(tok, tokens, types, specials)
    _set_post_processor(tok, tokens, specials)
    return tok


# --------------------------------------------------------------------------- families


def _vocab(tokens: list[str]) -> dict[str, int]:
    # Some files repeat a token (padding placeholders). Like llama.cpp and transformers we let the
    # last id win; the earlier ids are never produced and decode to nothing.
    return {tok: i for i, tok in enumerate(tokens)}


def _parse_merges(raw: list[Any]) -> list[tuple[str, str]]:
    if set(map(type, raw)) <= {str}:  # the common case in bulk: each splits into two non-empty halves
        merges = [tuple(m.split(" ")) for m in raw]
        if set(map(len, merges)) <= {2} and all(left and right for left, right in merges):
            return merges
    merges = []
    for i, merge in enumerate(raw):
        parts = merge.split(" ") if isinstance(merge, str) else []
        if len(parts) != 2 or not all(parts):
            raise TokenizerError(f"GGUF merge {i} is {merge!r:.60}; expected two tokens separated by one space")
        merges.append((parts[0], parts[1]))
    return merges


def _byte_level_bpe(md: dict[str, Any], tokens: list[str]) -> Tokenizer:
    pre = _str(md, "tokenizer.ggml.pre", "default")
    assert pre is not None
    split = PRE_TOKENIZER_SPLITS.get(pre)
    if split is None:
        raise TokenizerError(
            f"GGUF tokenizer.ggml.pre {pre!r} is not a known pre-tokenizer; known: {sorted(PRE_TOKENIZER_SPLITS)}"
        )
    merges = _parse_merges(_list(md, "tokenizer.ggml.merges") or [])
    try:
        model = BPE(vocab=_vocab(tokens), merges=merges, fuse_unk=False, byte_fallback=False)
    except Exception as exc:  # the Rust side names the merge that refers to an unknown token
        raise TokenizerError(f"GGUF byte-level BPE vocabulary is inconsistent: {exc}") from exc
    tok = Tokenizer(model)
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(split), behavior="isolated"),
            # the regex already split the text; this only maps bytes to the BPE alphabet
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    return tok


def _sentencepiece_bpe(md: dict[str, Any], tokens: list[str], types: list[int]) -> Tokenizer:
    scores = _list(md, "tokenizer.ggml.scores", required=False)
    if scores is not None:
        if len(scores) != len(tokens):
            raise TokenizerError(f"GGUF tokenizer.ggml.scores has {len(scores)} entries for {len(tokens)} tokens")
        if not set(map(type, scores)) <= {float, int}:  # the bulk check in C; the loop names the culprit
            for i, s in enumerate(scores):
                if not isinstance(s, Real) or isinstance(s, bool):
                    raise TokenizerError(f"GGUF score {i} = {s!r:.40} is not a number")
    raw_merges = _list(md, "tokenizer.ggml.merges", required=False)
    if raw_merges is not None:
        merges = _parse_merges(raw_merges)
    elif scores is not None:
        merges = _merges_from_scores(tokens, [float(s) for s in scores], types)
    else:
        raise TokenizerError("GGUF SentencePiece vocabulary has neither tokenizer.ggml.scores nor merges")
    unk_id = _token_id(md, "tokenizer.ggml.unknown_token_id", len(tokens))
    try:
        model = BPE(
            vocab=_vocab(tokens),
            merges=merges,
            unk_token=tokens[unk_id] if unk_id is not None else None,
            fuse_unk=True,
            byte_fallback=True,  # characters outside the vocabulary become <0xNN> tokens
        )
    except Exception as exc:
        raise TokenizerError(f"GGUF SentencePiece vocabulary is inconsistent: {exc}") from exc
    tok = Tokenizer(model)
    # llama.cpp's default for SentencePiece vocabularies is to add the space prefix.
    # (transformers ignores this key and always adds it; for files saying False we follow the file.)
    prefix = _bool(md, "tokenizer.ggml.add_space_prefix", True)
    tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement=SPM_SPACE, prepend_scheme="first" if prefix else "never", split=False
    )
    steps = [decoders.Replace(SPM_SPACE, " "), decoders.ByteFallback(), decoders.Fuse()]
    if prefix:  # undo the space the encoder put in front
        steps.append(decoders.Strip(content=" ", left=1, right=0))
    tok.decoder = decoders.Sequence(steps)
    return tok


def _merges_from_scores(tokens: list[str], scores: list[float], types: list[int]) -> list[tuple[str, str]]:
    """Rank every way of building a token from two others by that token's score, best first.

    SentencePiece BPE merges the adjacent pair whose concatenation scores highest; an ordered
    merge list with the same preference makes the `tokenizers` BPE model do the same. Only
    ordinary tokens take part: control, byte and user-defined tokens are never merged into.
    """
    ordinary = {tok: i for i, tok in enumerate(tokens) if types[i] == NORMAL}
    ranked: list[tuple[float, int, int, str, str]] = []
    add = ranked.append
    for tok, i in ordinary.items():
        for cut in range(1, len(tok)):
            left = tok[:cut]
            if left in ordinary:  # most cuts stop here: the right half is only sliced for the others
                right = tok[cut:]
                if right in ordinary:
                    # higher score first; ties broken by vocabulary order, then by the longer left part
                    add((-scores[i], i, -cut, left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


# --------------------------------------------------------------------------- specials


def _add_special_tokens(tok: Tokenizer, tokens: list[str], types: list[int], specials: dict[str, Any]) -> None:
    declared = {
        specials[k]
        for k in ("bos_token_id", "eos_token_id", "eot_token_id", "eom_token_id", "unknown_token_id", "padding_token_id")
        if specials[k] is not None
    }
    special, plain = [], []
    for i, (text, kind) in enumerate(zip(tokens, types)):
        if kind not in (CONTROL, UNKNOWN, USER_DEFINED) and i not in declared:
            continue  # most of a vocabulary: nothing to add
        if not text or tok.token_to_id(text) != i:
            continue  # empty or a duplicate spelling: cannot be matched in text anyway
        if kind in (CONTROL, UNKNOWN) or i in declared:
            special.append(AddedToken(text, special=True, normalized=False))
        elif kind == USER_DEFINED:
            # llama.cpp matches these whole (e.g. <think>), but they are text, not control
            plain.append(AddedToken(text, special=False, normalized=False))
    if special:
        tok.add_special_tokens(special)
    if plain:
        tok.add_tokens(plain)


def _set_post_processor(tok: Tokenizer, tokens: list[str], specials: dict[str, Any]) -> None:
    """`[BOS] $A [EOS]` as the file's add_bos/add_eos flags say (pairs follow the same pattern)."""
    bos = tokens[specials["bos_token_id"]] if specials["add_bos_token"] else None
    eos = tokens[specials["eos_token_id"]] if specials["add_eos_token"] else None

    def template(seq: str, type_id: int) -> list[str]:
        parts = [f"{bos}:{type_id}"] if bos else []
        parts.append(f"${seq}:{type_id}")
        return parts + ([f"{eos}:{type_id}"] if eos else [])

    ids = [(t, specials[k]) for t, k in ((bos, "bos_token_id"), (eos, "eos_token_id")) if t]
    try:
        tok.post_processor = processors.TemplateProcessing(
            single=template("A", 0), pair=template("A", 0) + template("B", 1), special_tokens=ids
        )
    except Exception as exc:  # e.g. a BOS spelled with characters the template syntax reserves
        raise TokenizerError(f"cannot build the BOS/EOS template around {bos!r}/{eos!r}: {exc}") from exc
