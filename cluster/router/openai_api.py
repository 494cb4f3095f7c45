"""OpenAI-compatible request models and error bodies.

Bodies forbid unknown fields, so a misspelt parameter is a 400 naming it rather than silently
ignored. OpenAI parameters this server does not implement are declared, and accepted only at
their neutral value; anything else is a 400 that says the parameter is not supported.
"""

from __future__ import annotations

from typing import Any, ClassVar, Literal

from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, field_validator

from engine.sampling_params import SamplingParams

# Union members show up in pydantic error locations (e.g. `stop.list[str]`); they are not fields.
_TYPE_TAGS = {"str", "int", "float", "bool", "list", "dict", "none", "is-instance", "literal"}


class ApiError(Exception):
    """An error for the client, rendered as OpenAI's `{"error": {...}}` body."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.type = type
        self.code = code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status, headers=self.headers)


def error_body(message: str, type: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


def validation_error(exc: RequestValidationError) -> ApiError:
    """The first pydantic error as a 400 that names the offending parameter."""
    errors = list(exc.errors())
    if not errors:
        return ApiError(400, "invalid request body")
    err = errors[0]
    if err.get("type") == "json_invalid":
        detail = err.get("ctx", {}).get("error", err.get("msg", ""))
        return ApiError(400, f"the request body is not valid JSON: {detail}", code="invalid_json")
    param = _param_name(err.get("loc", ()))
    if param is None:  # the body as a whole
        return ApiError(
            400,
            "the request body must be a JSON object (Content-Type: application/json)",
            code="invalid_body",
        )
    if err.get("type") == "extra_forbidden":
        return ApiError(400, f"unknown parameter: {param}", param=param, code="unknown_parameter")
    message = str(err.get("msg", "invalid value"))
    message = message.removeprefix("Value error, ")
    return ApiError(400, f"{param}: {message}", param=param)


def _param_name(loc: tuple | list) -> str | None:
    """('body', 'messages', 0, 'content', 'str') -> 'messages[0].content'."""
    parts = list(loc)
    if parts and parts[0] == "body":
        parts = parts[1:]
    name = ""
    for part in parts:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in _TYPE_TAGS or "[" in str(part) or "-" in str(part):
            break
        else:
            name += f".{part}" if name else str(part)
    return name or None


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # OpenAI parameters declared but not implemented, with the value that means "off".
    UNSUPPORTED: ClassVar[dict[str, Any]] = {}

    def check_supported(self) -> None:
        for name, neutral in self.UNSUPPORTED.items():
            value = getattr(self, name)
            if value is not None and value != neutral:
                raise ApiError(
                    400,
                    f"{name}: not supported by this server",
                    param=name,
                    code="unsupported_parameter",
                )


class StreamOptions(_Body):
    include_usage: bool = False


class SamplingFields(_Body):
    """The sampling and streaming parameters both endpoints share."""

    model: str | None = Field(None, description="Must be the served model when given.")
    max_tokens: int | None = Field(None, description="Most tokens to generate.")
    temperature: float | None = Field(None, description="0 is greedy; default 1.")
    top_p: float | None = None
    top_k: int | None = Field(None, description="Extension: sample from the k likeliest tokens.")
    seed: int | None = None
    stop: str | list[str] | None = Field(None, description="Up to 16 stop strings.")
    ignore_eos: bool = Field(False, description="Extension: keep going after EOS.")
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, description="Choices to generate (at most the router's max_n).")
    user: str | None = Field(None, description="Accepted and ignored.")
    presence_penalty: float | None = Field(None, description="In [-2, 2]; default 0.")
    frequency_penalty: float | None = Field(None, description="In [-2, 2]; default 0.")
    logit_bias: dict[str, float] | None = None
    cache_salt: str | None = Field(
        None,
        description="Extension (vLLM's name): requests share prefix-cache KV only with requests "
        "that send the same salt (or none); a non-empty string.",
    )

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop: str | list[str] | None) -> str | list[str] | None:
        if isinstance(stop, list) and len(stop) > 16:
            raise ValueError("at most 16 stop strings")
        return stop

    def sampling_params(self, max_tokens: int) -> SamplingParams:
        """Raises SamplingParamsError naming the parameter that is out of range."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            temperature=1.0 if self.temperature is None else self.temperature,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_k=0 if self.top_k is None else self.top_k,
            seed=self.seed,
            max_tokens=max_tokens,
            stop=stop,
            ignore_eos=self.ignore_eos,
            presence_penalty=self.presence_penalty or 0.0,
            frequency_penalty=self.frequency_penalty or 0.0,
            logprobs=self.num_logprobs(),
            cache_salt=self.cache_salt,
        )

    def num_logprobs(self) -> int | None:
        """Top alternatives per token the client wants, or None for no logprobs."""
        return None

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields):
    prompt: str | list[int] | list[str] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = Field(
        None, ge=0, le=5, description="Logprobs of each token and of this many alternatives."
    )
    best_of: int | None = None
    suffix: str | None = None

    UNSUPPORTED: ClassVar[dict[str, Any]] = {
        "echo": False,
        "best_of": 1,
        "suffix": None,
        "logit_bias": {},
    }

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def single_prompt(self) -> str | list[int]:
        """The one prompt of the request (a batch of one is unwrapped)."""
        prompt = self.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise ApiError(
                    400, "prompt: only one prompt per request is supported", param="prompt"
                )
            prompt = prompt[0]
        return prompt  # type: ignore[return-value]


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def as_template_input(self) -> dict[str, str]:
        # Chat templates know "system"; OpenAI's newer "developer" role means the same.
        role = "system" if self.role == "developer" else self.role
        content = (
            self.content
            if isinstance(self.content, str)
            else "".join(part.text for part in self.content)
        )
        return {"role": role, "content": content}


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, description="Newer name of max_tokens.")
    logprobs: bool | None = Field(None, description="Return each output token's logprob.")
    top_logprobs: int | None = Field(
        None, ge=0, le=20, description="With logprobs: this many alternatives per token."
    )
    tools: list[dict] | None = None
    tool_choice: str | dict | None = None
    response_format: dict | None = None

    UNSUPPORTED: ClassVar[dict[str, Any]] = {
        "tools": [],
        "tool_choice": "none",
        "response_format": {"type": "text"},
        "logit_bias": {},
    }

    def check_supported(self) -> None:
        super().check_supported()
        if self.top_logprobs and not self.logprobs:
            raise ApiError(400, "top_logprobs: needs logprobs set to true", param="top_logprobs")

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    @property
    def max_tokens_param(self) -> tuple[str, int | None]:
        """(name, value) of the output limit the client set. max_completion_tokens is the newer
        name of max_tokens: both may be given only with the same value."""
        new, old = self.max_completion_tokens, self.max_tokens
        if new is not None and old is not None and new != old:
            raise ApiError(
                400,
                f"max_completion_tokens: {new} differs from max_tokens {old}; give one of them",
                param="max_completion_tokens",
            )
        if new is not None:
            return "max_completion_tokens", new
        return "max_tokens", old
