"""Tokenizer and chat templates from a Hugging Face model folder, without torch or transformers.

Reads tokenizer.json (through the `tokenizers` package), tokenizer_config.json (special tokens,
add_bos_token/add_eos_token, chat_template) and generation_config.json (eos_token_id), and renders
chat templates the way transformers does: a sandboxed jinja2 environment with trim_blocks and
lstrip_blocks, `raise_exception`, `strftime_now` and a `tojson` filter that does not HTML-escape.

Chat prompts already contain the special tokens the template wants, so encode them with
`encode(prompt, add_special_tokens=False)`.

`clean_up_tokenization_spaces` is ignored: decoding is the backend's raw decode, which is what
transformers does for BPE tokenizers too (it skips that clean-up for BPE).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as BackendTokenizer
from tokenizers.processors import TemplateProcessing

CHAT_ROLES = ("system", "user", "assistant", "tool")
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "pad_token", "unk_token")


class ChatMessageError(ValueError):
    """The chat messages are malformed; the message names the offending entry."""


class ChatTemplateError(ValueError):
    """The model has no usable chat template, or the template refused the conversation."""


class Tokenizer:
    """Text <-> token ids and chat prompts for one model; safe to share between threads."""

    def __init__(
        self,
        backend: BackendTokenizer,
        *,
        special_tokens: Mapping[str, str | None] | None = None,
        chat_templates: Mapping[str, str] | None = None,
        eos_token_ids: Sequence[int] = (),
    ) -> None:
        self._backend = backend
        self._special_tokens = {key: (special_tokens or {}).get(key) for key in _SPECIAL_TOKEN_KEYS}
        self._chat_templates = dict(chat_templates or {})
        self._compiled: dict[str, jinja2.Template] = {}
        eos_ids = list(eos_token_ids)
        eos_id = self.token_to_id(self._special_tokens["eos_token"])
        if eos_id is not None:
            eos_ids.append(eos_id)
        self._eos_token_ids = tuple(dict.fromkeys(eos_ids))  # dedupe, keep order

    @classmethod
    def from_folder(cls, path: str | Path) -> Tokenizer:
        folder = Path(path)
        backend = BackendTokenizer.from_file(str(folder / "tokenizer.json"))
        config = _read_json(folder / "tokenizer_config.json")
        generation = _read_json(folder / "generation_config.json")
        special = {key: _token_content(config.get(key)) for key in _SPECIAL_TOKEN_KEYS}
        _apply_bos_eos_settings(backend, config, special)
        templates = _chat_templates(config.get("chat_template"), folder / "chat_template.jinja")
        eos = generation.get("eos_token_id")
        eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        return cls(backend, special_tokens=special, chat_templates=templates, eos_token_ids=eos_ids)

    # -- ids and text --------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        return self._backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str | None) -> int | None:
        return None if token is None else self._backend.token_to_id(token)

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        """Every id that ends generation: generation_config's eos ids, then the tokenizer's eos."""
        return self._eos_token_ids

    @property
    def bos_token_id(self) -> int | None:
        return self.token_to_id(self._special_tokens["bos_token"])

    @property
    def pad_token_id(self) -> int | None:
        return self.token_to_id(self._special_tokens["pad_token"])

    @property
    def vocab_size(self) -> int:
        """Number of token ids the tokenizer knows, added tokens included."""
        return self._backend.get_vocab_size(with_added_tokens=True)

    @cached_property
    def id_to_token(self) -> tuple[str, ...]:
        """Token string of every id (index = id); "" where the vocabulary has a hole."""
        return tuple(self._backend.id_to_token(i) or "" for i in range(self.vocab_size))

    # -- chat ----------------------------------------------------------------------------------

    @property
    def chat_template_names(self) -> tuple[str, ...]:
        return tuple(self._chat_templates)

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        *,
        tools: list[dict[str, Any]] | None = None,
        template_name: str | None = None,
    ) -> str:
        """Render the conversation into the prompt text the model was trained on."""
        validate_messages(messages)
        template = self._template(template_name)
        context = {
            **self._special_tokens,
            "messages": messages,
            "add_generation_prompt": add_generation_prompt,
            "tools": tools,
            "documents": None,
        }
        try:
            return template.render(context)
        except jinja2.TemplateError as error:
            raise ChatTemplateError(f"chat template: {error}") from error

    def _template(self, name: str | None) -> jinja2.Template:
        if not self._chat_templates:
            raise ChatTemplateError("this model has no chat template; send a plain prompt instead")
        if name is None:
            name = (
                "default" if "default" in self._chat_templates else next(iter(self._chat_templates))
            )
        if name not in self._chat_templates:
            known = ", ".join(self._chat_templates)
            raise ChatTemplateError(f"no chat template named {name!r} (have: {known})")
        if name not in self._compiled:
            self._compiled[name] = _sandbox().from_string(self._chat_templates[name])
        return self._compiled[name]


def validate_messages(messages: object) -> None:
    """Raise ChatMessageError naming the first entry that is not {role: known, content: str}."""
    if not isinstance(messages, list) or not messages:
        raise ChatMessageError("messages: must be a non-empty list")
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ChatMessageError(f"{where}: must be an object, got {type(message).__name__}")
        role = message.get("role")
        if role not in CHAT_ROLES:
            raise ChatMessageError(
                f"{where}.role: must be one of {', '.join(CHAT_ROLES)}; got {role!r}"
            )
        content = message.get("content")
        if not isinstance(content, str):
            raise ChatMessageError(
                f"{where}.content: must be a string, got {type(content).__name__}"
            )


# -- folder reading helpers ------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def _token_content(value: object) -> str | None:
    # Special tokens are saved either as strings or as serialized AddedToken objects.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _chat_templates(value: object, jinja_file: Path) -> dict[str, str]:
    """Named templates: a plain string is "default"; a list holds {name, template} entries."""
    if isinstance(value, str):
        return {"default": value}
    if isinstance(value, list):
        return {entry["name"]: entry["template"] for entry in value}
    if jinja_file.is_file():  # transformers >= 4.50 may save the template beside the config
        return {"default": jinja_file.read_text(encoding="utf-8")}
    return {}


def _apply_bos_eos_settings(
    backend: BackendTokenizer, config: Mapping[str, Any], special: Mapping[str, str | None]
) -> None:
    """An explicit add_bos_token/add_eos_token replaces tokenizer.json's post-processor, as in
    transformers 4's Llama-style tokenizers: the config states the model author's intent.
    (transformers 5 ignores both flags when tokenizer.json exists.) Without them,
    tokenizer.json's post-processor decides."""
    if "add_bos_token" not in config and "add_eos_token" not in config:
        return
    bos, eos = special["bos_token"], special["eos_token"]
    add_bos = bool(config.get("add_bos_token")) and bos is not None
    add_eos = bool(config.get("add_eos_token")) and eos is not None
    single = [*([f"{bos}:0"] if add_bos else []), "$A:0", *([f"{eos}:0"] if add_eos else [])]
    pair = [*single, *([f"{bos}:1"] if add_bos else []), "$B:1", *([f"{eos}:1"] if add_eos else [])]
    tokens = [(t, backend.token_to_id(t)) for t, on in ((bos, add_bos), (eos, add_eos)) if on]
    backend.post_processor = TemplateProcessing(
        single=" ".join(single), pair=" ".join(pair), special_tokens=tokens
    )


# -- the sandbox -----------------------------------------------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` marks assistant text for training masks in
    transformers; for serving it renders its body unchanged."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(
    value: object,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # jinja's own tojson HTML-escapes (<, >, &, '), which would change the prompt text.
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _sandbox() -> ImmutableSandboxedEnvironment:
    # Chat templates come with downloaded models: untrusted code, hence the immutable sandbox.
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[jinja2.ext.loopcontrols, _GenerationBlock],
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env
