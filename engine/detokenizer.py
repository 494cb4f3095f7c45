"""Incremental detokenization with stop strings, for streaming generated text.

Text per step comes from decoding a short window of recent tokens, not the whole output (the
prefix/read offsets of vLLM and TGI). The window starts with a few tokens already read, as
context, so decoders that treat the first token of a sequence specially (SentencePiece's leading
space) decode the new ones as they would mid-text; `read_offset` marks where the unread tokens
begin. When new text comes out, the window slides to start at the tokens just read and older
tokens are dropped, so the cost of a step does not grow with the output.

Byte-level BPE tokens can end in the middle of a UTF-8 character; the decoder then yields U+FFFD.
Such text is held until the character completes. A request that ends inside a character (cut by
max_tokens, say) ends without it: `flush()` drops the trailing U+FFFD, so streamed text never
ends in a broken character (the tokens still count as generated).

The prompt's last tokens are decoded as context, so the output is the continuation of the prompt
text. For byte-level tokenizers (Llama 3, SmolLM2, GPT-2 style) that equals decoding the output ids
on their own; for SentencePiece-style ones it keeps the space between prompt and completion (where
decoding the output alone would drop it).

Stop strings are matched in the generated text only. Text that could be the start of a stop string
is held back, so nothing emitted is ever retracted; on a match the output ends just before it.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

# Enough context for every decoder we know of to decode the first new token as it would mid-text.
PROMPT_CONTEXT_TOKENS = 5
_INCOMPLETE = "\ufffd"  # what byte-level decoders yield for a partial UTF-8 character


class Decoder(Protocol):
    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...


@dataclass(frozen=True)
class DetokenizerDelta:
    """New text since the last call; `stopped` once a stop string was found (text ends before)."""

    text: str
    stopped: bool


class IncrementalDetokenizer:
    """Turns a request's generated token ids into text, step by step. One per request."""

    def __init__(
        self,
        tokenizer: Decoder,
        prompt_token_ids: Sequence[int],
        stop: Sequence[str] = (),
        skip_special_tokens: bool = True,
    ) -> None:
        if any(not s for s in stop):
            raise ValueError("stop: stop strings must be non-empty")
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stops = tuple(dict.fromkeys(stop))
        self._window = list(prompt_token_ids[-PROMPT_CONTEXT_TOKENS:])
        self._read_text = self._decode(self._window)
        if self._read_text.endswith(_INCOMPLETE):
            # The prompt ends inside a character (ids sent by a client): its bytes would merge
            # with the output's, so decode the output on its own instead.
            self._window, self._read_text = [], ""
        self._read_offset = len(self._window)  # window[:read_offset] is context already read
        self._held = ""  # decoded text not yet emitted: it may begin a stop string
        self._stopped = False
        self._matched_stop: str | None = None

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def matched_stop(self) -> str | None:
        """The stop string that ended the output, if any (OpenAI's `stop_reason`)."""
        return self._matched_stop

    def push(self, new_token_ids: Sequence[int]) -> DetokenizerDelta:
        """Add newly generated tokens; return the text that is now safe to show."""
        if self._stopped:
            return DetokenizerDelta("", True)
        self._window.extend(new_token_ids)
        return self._emit(self._decode_new(final=False), final=False)

    def flush(self) -> str:
        """At the end of the request: everything still held, less a character whose last bytes
        never came (where decoding all the ids at once would end in U+FFFD)."""
        if self._stopped:
            return ""
        return self._emit(self._decode_new(final=True), final=True).text

    def _decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip_special)

    def _decode_new(self, final: bool) -> str:
        """Text of the tokens after read_offset, or "" while it ends in a partial character."""
        window_text = self._decode(self._window)
        if window_text.endswith(_INCOMPLETE):
            if not final:
                return ""
            window_text = window_text.rstrip(_INCOMPLETE)  # the request ended inside it
        if len(window_text) <= len(self._read_text):
            return ""
        new_text = window_text[len(self._read_text) :]
        # The tokens just read become the next step's context; older ones are done with.
        del self._window[: self._read_offset]
        self._read_offset = len(self._window)
        self._read_text = self._decode(self._window)
        return new_text

    def _emit(self, new_text: str, final: bool) -> DetokenizerDelta:
        text = self._held + new_text
        match = _earliest_stop(text, self._stops)
        if match is not None:
            index, stop = match
            self._held = ""
            self._stopped = True
            self._matched_stop = stop
            return DetokenizerDelta(text[:index], True)
        keep = 0 if final else _longest_stop_prefix_suffix(text, self._stops)
        self._held = text[len(text) - keep :]
        return DetokenizerDelta(text[: len(text) - keep], False)


def _earliest_stop(text: str, stops: Sequence[str]) -> tuple[int, str] | None:
    """(index, stop) of the stop string occurring first in text. On a tie the shortest wins: it
    is the one that completes first when tokens come one at a time, so the result does not
    depend on how the tokens were chunked (the text is the same either way)."""
    best: tuple[int, str] | None = None
    for stop in stops:
        index = text.find(stop)
        if index < 0:
            continue
        if best is None or (index, len(stop)) < (best[0], len(best[1])):
            best = (index, stop)
    return best


def _longest_stop_prefix_suffix(text: str, stops: Sequence[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of some stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest
