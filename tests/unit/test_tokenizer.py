"""engine.tokenizer: a tiny trained tokenizer for most checks, the default model against
transformers for exactness."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers import decoders, models, pre_tokenizers, trainers

from engine.tokenizer import ChatMessageError, ChatTemplateError, Tokenizer

CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content']"
    " + '<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}"
    "{% endif %}"
)
TRAINING_TEXT = [
    "The quick brown fox jumps over the lazy dog.",
    "Prefill is compute-bound; decode is memory-bound.",
    "Stop strings may span token boundaries: STOP, END, ###.",
    "Unicode: café, naïve, 日本語のテキスト, 中文, emoji 🚀🎉👍🏽.",
]
SPECIAL_TOKENS = ["<s>", "</s>", "<pad>", "<|im_start|>", "<|im_end|>"]


def make_tiny_tokenizer_folder(folder: Path, **config_overrides: object) -> Path:
    """A byte-level BPE with ~300 tokens trained on four sentences, saved as an HF folder.

    Its vocabulary is so small that CJK and emoji characters split across several tokens.
    An override of None leaves that key out of tokenizer_config.json.
    """
    backend = BackendTokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(TRAINING_TEXT, trainer=trainer)
    folder.mkdir(parents=True, exist_ok=True)
    backend.save(str(folder / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": {"content": "</s>", "special": True, "__type": "AddedToken"},
        "pad_token": "<pad>",
        "add_bos_token": True,
        "chat_template": CHATML,
        **config_overrides,
    }
    config = {key: value for key, value in config.items() if value is not None}
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    generation = {"bos_token_id": 0, "eos_token_id": [4, 1]}
    (folder / "generation_config.json").write_text(json.dumps(generation))
    return folder


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_tiny_tokenizer_folder(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny(tiny_folder: Path) -> Tokenizer:
    return Tokenizer.from_folder(tiny_folder)


# -- the tiny tokenizer ------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "hello fox", *TRAINING_TEXT, "unseen words ✨ 한국어"])
def test_encode_decode_round_trip(tiny: Tokenizer, text: str) -> None:
    ids = tiny.encode(text, add_special_tokens=False)
    assert tiny.decode(ids) == text


def test_add_bos_token_from_config(tiny: Tokenizer) -> None:
    assert tiny.bos_token_id == 0
    assert tiny.encode("fox")[0] == 0
    assert tiny.encode("fox", add_special_tokens=False)[0] != 0
    assert tiny.decode(tiny.encode("fox")) == "fox"
    assert tiny.decode(tiny.encode("fox"), skip_special_tokens=False) == "<s>fox"


def test_no_add_bos_token_keeps_tokenizer_json_post_processor(tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_folder(make_tiny_tokenizer_folder(tmp_path, add_bos_token=False))
    assert tokenizer.encode("fox") == tokenizer.encode("fox", add_special_tokens=False)


def test_special_token_ids(tiny: Tokenizer) -> None:
    # generation_config lists [4, 1]; the tokenizer's eos (</s> = 1) is already among them.
    assert tiny.eos_token_ids == (4, 1)
    assert tiny.pad_token_id == 2
    assert tiny.vocab_size == 300
    assert len(tiny.id_to_token) == 300
    assert tiny.id_to_token[3] == "<|im_start|>"
    assert tiny.token_to_id("<|im_end|>") == 4


def test_eos_from_tokenizer_config_when_no_generation_config(tmp_path: Path) -> None:
    folder = make_tiny_tokenizer_folder(tmp_path)
    (folder / "generation_config.json").unlink()
    assert Tokenizer.from_folder(folder).eos_token_ids == (1,)


def test_eos_token_id_int(tmp_path: Path) -> None:
    folder = make_tiny_tokenizer_folder(tmp_path)
    (folder / "generation_config.json").write_text('{"eos_token_id": 4}')
    assert Tokenizer.from_folder(folder).eos_token_ids == (4, 1)


def test_chat_template_renders_chatml(tiny: Tokenizer) -> None:
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    expected = "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    assert tiny.apply_chat_template(messages, add_generation_prompt=False) == expected
    assert tiny.apply_chat_template(messages) == expected + "<|im_start|>assistant\n"
    ids = tiny.encode(tiny.apply_chat_template(messages), add_special_tokens=False)
    assert ids[0] == tiny.token_to_id("<|im_start|>")


def test_named_chat_templates(tmp_path: Path) -> None:
    templates = [
        {"name": "tool_use", "template": "TOOLS {{ tools | tojson }}"},
        {"name": "default", "template": "{{ bos_token }}{{ messages[0]['content'] }}"},
    ]
    tokenizer = Tokenizer.from_folder(make_tiny_tokenizer_folder(tmp_path, chat_template=templates))
    messages = [{"role": "user", "content": "hi"}]
    assert tokenizer.chat_template_names == ("tool_use", "default")
    assert tokenizer.apply_chat_template(messages) == "<s>hi"
    tools = [{"name": "f", "description": "<b>&'"}]
    rendered = tokenizer.apply_chat_template(messages, tools=tools, template_name="tool_use")
    assert rendered == 'TOOLS [{"name": "f", "description": "<b>&\'"}]'  # not HTML-escaped
    with pytest.raises(ChatTemplateError, match="no chat template named 'nope'"):
        tokenizer.apply_chat_template(messages, template_name="nope")


def test_chat_template_jinja_file(tmp_path: Path) -> None:
    folder = make_tiny_tokenizer_folder(tmp_path, chat_template=None)
    (folder / "chat_template.jinja").write_text("{{ messages | length }}")
    tokenizer = Tokenizer.from_folder(folder)
    assert tokenizer.apply_chat_template([{"role": "user", "content": "x"}]) == "1"


def test_missing_chat_template(tmp_path: Path) -> None:
    tokenizer = Tokenizer.from_folder(make_tiny_tokenizer_folder(tmp_path, chat_template=None))
    with pytest.raises(ChatTemplateError, match="no chat template"):
        tokenizer.apply_chat_template([{"role": "user", "content": "x"}])


def test_template_helpers_and_whitespace_control(tmp_path: Path) -> None:
    template = (
        "{% for m in messages %}\n"
        "  {% if m.role == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}\n"
        "  {% generation %}[{{ m.content }}]{% endgeneration %}\n"
        "  {% if loop.index == 2 %}{% break %}{% endif %}\n"
        "{% endfor %}{{ strftime_now('%Y') | length }}"
    )
    tokenizer = Tokenizer.from_folder(make_tiny_tokenizer_folder(tmp_path, chat_template=template))
    user = {"role": "user", "content": "a"}
    # trim_blocks + lstrip_blocks: block tags leave no whitespace behind; break stops the loop.
    assert tokenizer.apply_chat_template([user, user, user]) == "[a][a]4"
    with pytest.raises(ChatTemplateError, match="no tools here"):
        tokenizer.apply_chat_template([user, {"role": "tool", "content": "r"}])


def test_sandbox_refuses_mutation(tmp_path: Path) -> None:
    template = "{% set _ = messages.append(messages[0]) %}{{ messages | length }}"
    tokenizer = Tokenizer.from_folder(make_tiny_tokenizer_folder(tmp_path, chat_template=template))
    with pytest.raises(ChatTemplateError):
        tokenizer.apply_chat_template([{"role": "user", "content": "a"}])


@pytest.mark.parametrize(
    ("messages", "problem"),
    [
        ([], "messages: must be a non-empty list"),
        ("hi", "messages: must be a non-empty list"),
        (["hi"], r"messages\[0\]: must be an object, got str"),
        ([{"role": "bot", "content": "x"}], r"messages\[0\]\.role: must be one of .* got 'bot'"),
        ([{"content": "x"}], r"messages\[0\]\.role: .* got None"),
        (
            [{"role": "user", "content": "x"}, {"role": "user", "content": ["x"]}],
            r"messages\[1\]\.content: must be a string, got list",
        ),
        ([{"role": "user"}], r"messages\[0\]\.content: must be a string, got NoneType"),
    ],
)
def test_invalid_messages(tiny: Tokenizer, messages: object, problem: str) -> None:
    with pytest.raises(ChatMessageError, match=problem):
        tiny.apply_chat_template(messages)  # type: ignore[arg-type]
    assert issubclass(ChatMessageError, ValueError)


def test_tiny_matches_transformers(tmp_path: Path) -> None:
    # Without add_bos_token: transformers 5 ignores that flag when tokenizer.json exists.
    transformers = pytest.importorskip("transformers")
    folder = make_tiny_tokenizer_folder(tmp_path, add_bos_token=None)
    tiny = Tokenizer.from_folder(folder)
    reference = transformers.AutoTokenizer.from_pretrained(str(folder))
    for text in TRAINING_TEXT:
        assert tiny.encode(text) == reference.encode(text)
        assert tiny.decode(tiny.encode(text)) == reference.decode(reference.encode(text))
    messages = [{"role": "user", "content": "日本語?"}, {"role": "assistant", "content": "🚀"}]
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tiny.apply_chat_template(messages) == expected


# -- the default model, against transformers ----------------------------------------------------

CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [
        {"role": "system", "content": "You answer in one word."},
        {"role": "user", "content": "Largest planet?"},
    ],
    [
        {"role": "user", "content": "Hi!"},
        {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "Translate 'cat' into 日本語 and add an emoji 🐱."},
    ],
    [{"role": "user", "content": "  leading and trailing spaces \n\n"}],
]
TEXTS = [
    "Hello, world!",
    " leading space and    runs of spaces",
    "Unicode: café, 日本語, 中文, emoji 🚀🎉👍🏽",
    "<|im_start|>user\nspecial tokens inside text<|im_end|>\n",
    "code:\n\tdef f(x):\n\t\treturn x ** 2\n",
]


@pytest.fixture(scope="module")
def smollm(default_model_path: Path) -> Tokenizer:
    return Tokenizer.from_folder(default_model_path)


@pytest.fixture(scope="module")
def smollm_reference(default_model_path: Path) -> object:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(default_model_path))


def test_default_model_special_tokens(smollm: Tokenizer) -> None:
    assert smollm.eos_token_ids == (2,)  # <|im_end|>
    assert smollm.bos_token_id == 1  # <|im_start|>
    assert smollm.vocab_size == 49152
    assert smollm.id_to_token[2] == "<|im_end|>"


@pytest.mark.parametrize("text", TEXTS)
def test_default_model_encode_decode_match_transformers(
    smollm: Tokenizer, smollm_reference: object, text: str
) -> None:
    ids = smollm.encode(text)
    assert ids == smollm_reference.encode(text)  # type: ignore[attr-defined]
    assert ids == smollm.encode(text, add_special_tokens=False)  # SmolLM2 adds no BOS
    for skip in (True, False):
        expected = smollm_reference.decode(ids, skip_special_tokens=skip)  # type: ignore[attr-defined]
        assert smollm.decode(ids, skip_special_tokens=skip) == expected


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_default_model_chat_template_matches_transformers(
    smollm: Tokenizer, smollm_reference: object, messages: list, add_generation_prompt: bool
) -> None:
    expected = smollm_reference.apply_chat_template(  # type: ignore[attr-defined]
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    assert smollm.apply_chat_template(messages, add_generation_prompt) == expected
