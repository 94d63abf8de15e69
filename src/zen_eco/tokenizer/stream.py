"""Incremental detokenisation: turn generated ids into text as they arrive.

Decoding one id at a time is wrong twice over: a multi-byte character can be split across byte
tokens (decoding half of it gives U+FFFD), and decoders such as SentencePiece's drop the leading
space of whatever they are given. So we keep two offsets into the ids: `prefix` starts a short
window of already-emitted context, `read` marks where emitted text ends. Each step decodes the
window with and without the new ids and emits the difference, once it no longer ends in an
incomplete character. The window keeps decoding in context (spaces stay right) while its cost
stays independent of the length of the generation.
"""

from __future__ import annotations

from tokenizers import Tokenizer

from zen_eco.errors import TokenizerError

_REPLACEMENT = "\ufffd"


class StreamDecoder:
    """`add(id)` returns the text that id completes; `flush()` the rest. Together they equal
    `tokenizer.decode(all_ids)`."""

    def __init__(self, backend: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._backend = backend
        self._skip = skip_special_tokens
        self._vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # everything before this index has been emitted

    @property
    def ids(self) -> list[int]:
        """Every id added so far."""
        return list(self._ids)

    def _decode(self, ids: list[int]) -> str:
        return self._backend.decode(ids, skip_special_tokens=self._skip)

    def add(self, token_id: int) -> str:
        """Append one id and return the newly finalised text (possibly "")."""
        if isinstance(token_id, bool) or not isinstance(token_id, int) or not 0 <= token_id < self._vocab_size:
            raise TokenizerError(f"token id {token_id!r} is not in the vocabulary (size {self._vocab_size})")
        self._ids.append(token_id)
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        # Hold back while the tail is an unfinished character (it decodes as U+FFFD); a real
        # U+FFFD that never completes comes out with the next character or in flush().
        if len(after) > len(before) and not after.endswith(_REPLACEMENT) and after.startswith(before):
            self._prefix, self._read = self._read, len(self._ids)
            return after[len(before) :]
        return ""

    def flush(self) -> str:
        """End the stream: return whatever is still held back (an unfinished character comes out
        as U+FFFD, as in a full decode) and reset, so the decoder can start a new stream."""
        before = self._decode(self._ids[self._prefix : self._read])
        after = self._decode(self._ids[self._prefix :])
        self._ids, self._prefix, self._read = [], 0, 0
        return after[len(before) :] if after.startswith(before) else after
