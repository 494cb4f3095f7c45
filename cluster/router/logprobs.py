"""OpenAI's logprobs shapes from the per-token logprobs the instances send.

Instances send, per generated token, `[logprob, [[token_id, logprob], ...]]` (the alternatives
likeliest first). Completions show them as `{tokens, token_logprobs, top_logprobs, text_offset}`,
chat as `{content: [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}]}`.
A token's text is what it adds after other text (so a SentencePiece word keeps its leading
space); its bytes are the UTF-8 bytes it stands for, which differ from its text when it ends
inside a character (the text then holds U+FFFD, as the generated text would).
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Protocol

from engine.outputs import TokenLogprobs
from engine.tokenizer import Tokenizer

# JSON has no -Infinity; OpenAI reports impossible tokens with this value.
_NEG_INF_LOGPROB = -9999.0
_REPLACEMENT = "\ufffd"
_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _byte_level_alphabet() -> dict[str, int]:
    """Byte-level BPE (GPT-2 and its descendants) writes each byte as one character: printable
    Latin-1 bytes as themselves, every other byte as a code point from 256 up, in byte order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    alphabet: dict[str, int] = {}
    shifted = 0
    for byte in range(256):
        if byte in printable:
            alphabet[chr(byte)] = byte
        else:
            alphabet[chr(256 + shifted)] = byte
            shifted += 1
    return alphabet


_BYTE_LEVEL = _byte_level_alphabet()


class TokenTexts:
    """Text and bytes of single tokens, computed once per token id. One per router."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self._tokenizer = tokenizer
        self._cache: dict[int, tuple[str, list[int]]] = {}
        # Decoders drop the leading space of a sequence's first word (SentencePiece), so each
        # token is decoded after a context token and the context's text is cut off.
        context = tokenizer.encode("a", add_special_tokens=False)
        self._context = context if len(context) == 1 else []
        self._context_text = tokenizer.decode(self._context, skip_special_tokens=False)

    def text(self, token_id: int) -> str:
        return self.get(token_id)[0]

    def get(self, token_id: int) -> tuple[str, list[int]]:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._compute(token_id)
        return cached

    def _compute(self, token_id: int) -> tuple[str, list[int]]:
        decoded = self._tokenizer.decode([*self._context, token_id], skip_special_tokens=False)
        if not decoded.startswith(self._context_text):  # a decoder that merged the two
            decoded = self._tokenizer.decode([token_id], skip_special_tokens=False)
        else:
            decoded = decoded[len(self._context_text) :]
        if _REPLACEMENT not in decoded:
            return decoded, list(decoded.encode())
        raw = self._raw_bytes(token_id)
        return decoded, list(raw if raw is not None else decoded.encode())

    def _raw_bytes(self, token_id: int) -> bytes | None:
        """The bytes of a token that is part of a character, from its vocabulary entry."""
        vocab = self._tokenizer.id_to_token
        piece = vocab[token_id] if 0 <= token_id < len(vocab) else ""
        fallback = _BYTE_FALLBACK.fullmatch(piece)
        if fallback is not None:  # SentencePiece byte fallback: <0xE2>
            return bytes([int(fallback.group(1), 16)])
        if piece and all(char in _BYTE_LEVEL for char in piece):
            return bytes(_BYTE_LEVEL[char] for char in piece)
        return None


class LogprobsFormatter(Protocol):
    """Turns the logprobs of some tokens of one choice into the endpoint's shape."""

    def format(
        self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs | None]
    ) -> dict: ...


def _finite(logprob: float) -> float:
    return logprob if math.isfinite(logprob) else _NEG_INF_LOGPROB


class CompletionLogprobs:
    """The legacy completions object. One per choice: text offsets count on across chunks."""

    def __init__(self, texts: TokenTexts) -> None:
        self._texts = texts
        self._offset = 0

    def format(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs | None]) -> dict:
        tokens: list[str] = []
        token_logprobs: list[float | None] = []
        top_logprobs: list[dict[str, float] | None] = []
        offsets: list[int] = []
        for token_id, entry in zip(token_ids, logprobs, strict=True):
            text = self._texts.text(token_id)
            tokens.append(text)
            offsets.append(self._offset)
            self._offset += len(text)
            if entry is None:  # an instance sent this token without logprobs
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            logprob, top = entry
            token_logprobs.append(_finite(logprob))
            alternatives: dict[str, float] = {}
            for alt_id, alt_logprob in top:
                # Two ids with the same text: the likelier (earlier) one keeps the entry.
                alternatives.setdefault(self._texts.text(alt_id), _finite(alt_logprob))
            top_logprobs.append(alternatives)
        return {
            "tokens": tokens,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
            "text_offset": offsets,
        }


class ChatLogprobs:
    """The chat object `{content: [...]}`; tokens that came without logprobs are left out."""

    def __init__(self, texts: TokenTexts) -> None:
        self._texts = texts

    def format(self, token_ids: Sequence[int], logprobs: Sequence[TokenLogprobs | None]) -> dict:
        content = []
        for token_id, entry in zip(token_ids, logprobs, strict=True):
            if entry is None:
                continue
            logprob, top = entry
            content.append(
                {
                    **self._token(token_id, logprob),
                    "top_logprobs": [self._token(i, lp) for i, lp in top],
                }
            )
        return {"content": content}

    def _token(self, token_id: int, logprob: float) -> dict:
        text, raw = self._texts.get(token_id)
        return {"token": text, "logprob": _finite(logprob), "bytes": raw}
