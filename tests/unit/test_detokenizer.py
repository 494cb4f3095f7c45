"""engine.detokenizer: streaming text equals one-shot decoding, partial characters are held,
stop strings end the text and are never half-emitted."""

from __future__ import annotations

import random
from collections.abc import Sequence
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from engine.detokenizer import PROMPT_CONTEXT_TOKENS, DetokenizerDelta, IncrementalDetokenizer
from engine.tokenizer import Tokenizer
from tests.unit.test_tokenizer import make_tiny_tokenizer_folder

INCOMPLETE = "\ufffd"
REAL_TEXTS = [
    "The quick brown fox jumps over the lazy dog.",
    "Unicode: café, naïve, 日本語のテキスト, 中文, emoji 🚀🎉👍🏽 and ZWJ 👩‍👩‍👧.",
    "한국어와 ελληνικά and math ∑∫√ mixed\nwith newlines\n\tand tabs.",
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Tokenizer:
    return Tokenizer.from_folder(make_tiny_tokenizer_folder(tmp_path_factory.mktemp("tiny")))


@pytest.fixture(scope="module")
def smollm(default_model_path: Path) -> Tokenizer:
    return Tokenizer.from_folder(default_model_path)


def stream(
    detok: IncrementalDetokenizer, ids: Sequence[int], chunks: Sequence[int] | None = None
) -> list[DetokenizerDelta]:
    """Push ids in chunks of the given sizes (default: one at a time), then flush."""
    deltas, start = [], 0
    for size in chunks or [1] * len(ids):
        deltas.append(detok.push(ids[start : start + size]))
        start += size
    assert start == len(ids)
    deltas.append(DetokenizerDelta(detok.flush(), detok.stopped))
    return deltas


def joined(deltas: Sequence[DetokenizerDelta]) -> str:
    return "".join(delta.text for delta in deltas)


def random_chunks(rng: random.Random, total: int) -> list[int]:
    chunks = []
    while total > 0:
        chunks.append(min(total, rng.randint(1, 4)))
        total -= chunks[-1]
    return chunks


# -- text equals one-shot decoding --------------------------------------------------------------


@pytest.mark.parametrize("text", REAL_TEXTS)
def test_real_text_streams_without_partial_characters(tiny: Tokenizer, text: str) -> None:
    ids = tiny.encode(text, add_special_tokens=False)
    assert len(ids) > len(text) // 2  # the tiny vocabulary splits most characters
    prompt = tiny.encode("Prefill is compute-bound; ")
    deltas = stream(IncrementalDetokenizer(tiny, prompt, []), ids)
    assert joined(deltas) == tiny.decode(ids) == text
    assert not any(INCOMPLETE in delta.text for delta in deltas)
    assert not any(delta.stopped for delta in deltas)


def test_multibyte_character_waits_for_its_last_byte(tiny: Tokenizer) -> None:
    ids = tiny.encode("🚀", add_special_tokens=False)
    assert len(ids) > 1  # one character over several byte-level tokens
    detok = IncrementalDetokenizer(tiny, [], [])
    assert [detok.push([i]).text for i in ids] == [""] * (len(ids) - 1) + ["🚀"]


@pytest.mark.parametrize("text", ["ok 🚀", "café", "日本"])
def test_output_cut_inside_a_character_never_ends_in_a_replacement_character(
    tiny: Tokenizer, text: str
) -> None:
    # max_tokens ends the request one token before the last character completes.
    ids = tiny.encode(text, add_special_tokens=False)
    cut = ids[:-1]
    assert tiny.decode(cut).endswith(INCOMPLETE)  # what one-shot decoding would show
    for chunks in ([1] * len(cut), [len(cut)]):
        deltas = stream(IncrementalDetokenizer(tiny, tiny.encode("Say: "), []), cut, chunks)
        assert joined(deltas) == text[:-1]
        assert not any(INCOMPLETE in delta.text for delta in deltas)


@pytest.mark.parametrize("seed", range(4))
def test_random_ids_tiny(tiny: Tokenizer, seed: int) -> None:
    # Random byte-level ids are mostly invalid UTF-8: the replacement characters must still come
    # out exactly as one-shot decoding places them, whatever the chunking and prompt -- except
    # at the very end, where a cut character is dropped.
    rng = random.Random(seed)
    for _ in range(200):
        ids = [rng.randrange(tiny.vocab_size) for _ in range(rng.randint(1, 40))]
        prompt = [rng.randrange(tiny.vocab_size) for _ in range(rng.randint(0, 8))]
        deltas = stream(IncrementalDetokenizer(tiny, prompt, []), ids, random_chunks(rng, len(ids)))
        assert joined(deltas) == tiny.decode(ids).rstrip(INCOMPLETE), (prompt, ids)


def test_sentencepiece_style_output_continues_the_prompt() -> None:
    # Metaspace decoders drop the space of a sequence's first token; with the prompt as context
    # the completion keeps it, so prompt + completion reads right.
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.Metaspace(prepend_scheme="first")
    backend.decoder = decoders.Metaspace(prepend_scheme="first")
    trainer = trainers.BpeTrainer(vocab_size=120, show_progress=False)
    backend.train_from_iterator(["The capital of France is Paris, a city."] * 3, trainer=trainer)
    tokenizer = Tokenizer(backend)
    prompt = tokenizer.encode("The capital of France is")
    output = tokenizer.encode("The capital of France is Paris, a city.")[len(prompt) :]
    assert tokenizer.decode(output) == "Paris, a city."
    deltas = stream(IncrementalDetokenizer(tokenizer, prompt, []), output)
    assert joined(deltas) == " Paris, a city."


def test_skip_special_tokens_false(tiny: Tokenizer) -> None:
    ids = [*tiny.encode("fox", add_special_tokens=False), tiny.token_to_id("</s>")]
    deltas = stream(IncrementalDetokenizer(tiny, [], [], skip_special_tokens=False), ids)
    assert joined(deltas) == "fox</s>"
    assert joined(stream(IncrementalDetokenizer(tiny, [], []), ids)) == "fox"


def test_decodes_a_bounded_window(tiny: Tokenizer) -> None:
    calls: list[int] = []

    class Counting:
        def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
            calls.append(len(ids))
            return tiny.decode(ids, skip_special_tokens)

    ids = tiny.encode(" ".join(REAL_TEXTS * 20), add_special_tokens=False)
    detok = IncrementalDetokenizer(Counting(), tiny.encode("prompt " * 50), [])
    assert joined(stream(detok, ids)) == tiny.decode(ids)
    assert max(calls) <= PROMPT_CONTEXT_TOKENS + 8  # a character spans at most 4 byte tokens
    assert len(calls) <= 2 * len(ids) + 2


# -- stop strings ---------------------------------------------------------------------------


def test_stop_string_spanning_tokens_is_never_half_emitted(tiny: Tokenizer) -> None:
    ids = tiny.encode("the fox said STOP, then more", add_special_tokens=False)
    detok = IncrementalDetokenizer(tiny, [], ["STOP"])
    emitted = ""
    for token_id in ids:
        delta = detok.push([token_id])
        emitted += delta.text
        assert "S" not in emitted  # not even the stop string's first letter, ever
        if delta.stopped:
            break
    assert emitted == "the fox said "
    assert detok.stopped and detok.matched_stop == "STOP"
    assert detok.push(tiny.encode("ignored")) == DetokenizerDelta("", True)
    assert detok.flush() == ""


def test_stop_string_prefix_is_released_when_it_does_not_complete(tiny: Tokenizer) -> None:
    detok = IncrementalDetokenizer(tiny, [], ["STOP"])
    first = detok.push(tiny.encode("go ST", add_special_tokens=False))
    assert first == DetokenizerDelta("go ", False)
    second = detok.push(tiny.encode("ART now", add_special_tokens=False))
    assert second == DetokenizerDelta("START now", False)
    detok.push(tiny.encode(" and ST", add_special_tokens=False))
    assert detok.flush() == "ST"  # held at the end of the request, released by flush


def test_stop_string_at_the_very_start(tiny: Tokenizer) -> None:
    ids = tiny.encode("END of it", add_special_tokens=False)
    deltas = stream(IncrementalDetokenizer(tiny, tiny.encode("prompt"), ["END"]), ids)
    assert joined(deltas) == ""
    assert deltas[-1].stopped


def test_earliest_of_several_stop_strings_wins(tiny: Tokenizer) -> None:
    text = "a long preamble ### then STOP"
    ids = tiny.encode(text, add_special_tokens=False)
    for stops in (["STOP", "###"], ["###", "STOP"], ["then", "###"], ["preamble", "pre"]):
        detok = IncrementalDetokenizer(tiny, [], stops)
        deltas = stream(detok, ids, [len(ids)] if "pre" in stops else None)
        first = min(stops, key=lambda stop: (text.index(stop), len(stop)))
        assert joined(deltas) == text[: text.index(first)], stops
        assert detok.matched_stop == first


def test_shorter_stop_completes_inside_a_longer_held_prefix(tiny: Tokenizer) -> None:
    # "abcX" is held as a possible "abcd"; the stop "bc" inside it must still end the text at "a".
    detok = IncrementalDetokenizer(tiny, [], ["abcd", "bc"])
    assert detok.push(tiny.encode("xa", add_special_tokens=False)) == DetokenizerDelta("x", False)
    delta = detok.push(tiny.encode("bcX", add_special_tokens=False))
    assert delta == DetokenizerDelta("a", True)
    assert detok.matched_stop == "bc"


def test_stop_string_inside_a_split_emoji(tiny: Tokenizer) -> None:
    text = "fast 🚀 then 🎉 party"
    ids = tiny.encode(text, add_special_tokens=False)
    deltas = stream(IncrementalDetokenizer(tiny, [], ["🎉"]), ids)
    assert joined(deltas) == "fast 🚀 then "
    assert deltas[-1].stopped


@pytest.mark.parametrize("seed", range(3))
def test_stop_strings_random_chunking(tiny: Tokenizer, seed: int) -> None:
    rng = random.Random(seed)
    text = REAL_TEXTS[1]
    ids = tiny.encode(text, add_special_tokens=False)
    for _ in range(50):
        start = rng.randrange(len(text) - 3)
        stop = text[start : start + rng.randint(1, 3)]
        deltas = stream(IncrementalDetokenizer(tiny, [], [stop]), ids, random_chunks(rng, len(ids)))
        assert joined(deltas) == text[: text.index(stop)], stop


def test_empty_stop_string_is_rejected(tiny: Tokenizer) -> None:
    with pytest.raises(ValueError, match="stop"):
        IncrementalDetokenizer(tiny, [], ["ok", ""])


# -- the default model ------------------------------------------------------------------------


def test_default_model_chat_answer(smollm: Tokenizer) -> None:
    prompt = smollm.apply_chat_template([{"role": "user", "content": "Say hi in three scripts"}])
    prompt_ids = smollm.encode(prompt, add_special_tokens=False)
    for text in REAL_TEXTS:
        ids = [*smollm.encode(text), *smollm.eos_token_ids]
        deltas = stream(IncrementalDetokenizer(smollm, prompt_ids, []), ids)
        assert joined(deltas) == smollm.decode(ids) == text
        assert not any(INCOMPLETE in delta.text for delta in deltas)


def test_default_model_random_ids(smollm: Tokenizer) -> None:
    rng = random.Random(7)
    for _ in range(200):
        ids = [rng.randrange(smollm.vocab_size) for _ in range(rng.randint(1, 30))]
        prompt = [rng.randrange(smollm.vocab_size) for _ in range(rng.randint(0, 8))]
        detok = IncrementalDetokenizer(smollm, prompt, ["\n\n"])
        deltas = stream(detok, ids, random_chunks(rng, len(ids)))
        full = smollm.decode(ids)
        expected = full.split("\n\n")[0] if "\n\n" in full else full.rstrip(INCOMPLETE)
        assert joined(deltas) == expected, (prompt, ids)
        assert deltas[-1].stopped == ("\n\n" in full)
