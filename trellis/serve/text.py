"""One choice's text as its tokens arrive (incremental detokenization and OpenAI's stop strings),
and the bytes of one token, which OpenAI's log-probabilities report."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence

from transformers import PreTrainedTokenizerBase

CONTEXT_TOKENS = 6  # prompt tokens decoded along with the answer, so its first word keeps its leading space


class TextStream:
    """Turns generated tokens into text deltas and ends the text at the first stop string.

    Tokens are decoded in a window that starts a few tokens back (vLLM's incremental
    detokenization), so a character split across tokens is released only once complete. As OpenAI
    does, the text ends just before the first stop string, which is not included; the text that
    could still be the start of one is held back until it is known not to be.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: Sequence[str] = (), context: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.stop = list(stop)
        self._hold = max((len(s) for s in self.stop), default=1) - 1  # chars that may begin a stop string
        self._ids = list(context[-CONTEXT_TOKENS:])
        self._prefix_offset = 0
        self._read_offset = len(self._ids)
        self._pending = ""  # decoded, not released yet
        self.text = ""  # released so far
        self.num_tokens = 0  # generated tokens consumed, up to the one that completed a stop string
        self.stopped = False  # a stop string was found

    def add(self, tokens: Sequence[int]) -> str:
        """Take new tokens; returns the text they release (maybe empty)."""
        released = ""
        for token in tokens:
            if self.stopped:
                break
            self._ids.append(int(token))
            self.num_tokens += 1
            self._pending += self._decode_new()
            released += self._release()
        return released

    def finish(self) -> str:
        """The text still held back, once no more tokens will come."""
        if self.stopped:
            return ""
        tail = self._decode(self._prefix_offset, len(self._ids))[len(self._decode(self._prefix_offset,
                                                                                     self._read_offset)):]
        self._read_offset = self._prefix_offset = len(self._ids)
        released, self._pending = self._pending + tail, ""
        self.text += released
        return released

    def _decode(self, start: int, end: int) -> str:
        return self.tokenizer.decode(self._ids[start:end], skip_special_tokens=True)

    def _decode_new(self) -> str:
        prefix = self._decode(self._prefix_offset, self._read_offset)
        full = self._decode(self._prefix_offset, len(self._ids))
        if len(full) <= len(prefix) or full.endswith("\ufffd"):  # nothing new, or a character still incomplete
            return ""
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        return full[len(prefix):]

    def _release(self) -> str:
        found = [i for i in (self._pending.find(s) for s in self.stop) if i >= 0]
        if found:
            released, self._pending, self.stopped = self._pending[:min(found)], "", True
        else:
            cut = max(len(self._pending) - self._hold, 0)
            released, self._pending = self._pending[:cut], self._pending[cut:]
        self.text += released
        return released


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE writes each byte as a printable character: the printable Latin-1
    bytes as themselves, the others as the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {chr(b): b for b in printable} | {chr(256 + i): b for i, b in enumerate(others)}


def _decodes_byte_level(decoder: dict | None) -> bool:
    """Whether a fast tokenizer's decoder (its JSON form; a ``Sequence`` lists others) is byte-level."""
    if not decoder:
        return False
    return decoder.get("type") == "ByteLevel" or any(_decodes_byte_level(d) for d in decoder.get("decoders") or ())


_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's token for a byte no piece covers


class TokenBytes:
    """The bytes of one token, and its ``text`` decoded alone, each worked out once per token (two
    threads may both work one out: the same value). Decoding a token alone gives U+FFFD for the
    part of a character it holds; OpenAI's ``bytes`` field carries the token's own bytes, so that a
    client can join a character split across tokens. Read from the token's string in the
    vocabulary where the tokenizer is byte-level BPE or SentencePiece with byte fallback; otherwise
    the decoded text's."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        decoder = json.loads(backend.to_str()).get("decoder") if backend is not None else None
        self._alphabet = _byte_level_alphabet() if _decodes_byte_level(decoder) else None
        self._special = set(tokenizer.all_special_ids)
        self._cache: dict[int, bytes] = {}
        self._texts: dict[int, str] = {}

    def __call__(self, token: int) -> bytes:
        if token not in self._cache:
            self._cache[token] = self._bytes(token)
        return self._cache[token]

    def text(self, token: int) -> str:
        """The token decoded alone, as log-probabilities list it."""
        if token not in self._texts:
            self._texts[token] = self.tokenizer.decode([token])
        return self._texts[token]

    def _bytes(self, token: int) -> bytes:
        text = self.text(token)
        if "\ufffd" not in text or token in self._special:
            return text.encode()
        piece = self.tokenizer.convert_ids_to_tokens(token)
        if (byte := _BYTE_FALLBACK.fullmatch(piece)) is not None:
            return bytes([int(byte.group(1), 16)])
        if self._alphabet is not None and all(c in self._alphabet for c in piece):
            return bytes(self._alphabet[c] for c in piece)
        return text.encode()
