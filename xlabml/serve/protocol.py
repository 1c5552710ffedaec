"""The OpenAI-compatible request bodies (validated by pydantic) and OpenAI-style errors.

Requests carry OpenAI's field names and defaults. Sampling maps to ``xlabml.inference``: ``temperature`` (0 =
greedy), ``top_p``, ``max_tokens``, ``stop``, ``seed``, ``n``; extensions a client passes in ``extra_body``:
``top_k``, ``min_p``, ``repetition_penalty``. OpenAI fields this server cannot honour (``logprobs``,
``logit_bias``, penalties, tools, ``suffix``, ...) get a 400 naming the field when set to anything but their
neutral value; unknown fields are ignored, as OpenAI's own clients may send newer ones.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

ERROR_TYPES = {400: "invalid_request_error", 401: "invalid_request_error", 404: "invalid_request_error",
               405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               500: "server_error", 503: "server_error"}


class APIError(Exception):
    """A failure the client gets as an OpenAI-style JSON error with this HTTP status."""

    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.message, self.param, self.code)


def error_body(status: int, message: str, param: Optional[str] = None, code: Optional[str] = None) -> dict:
    kind = ERROR_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


Finite = Annotated[float, Field(allow_inf_nan=False)]


class StreamOptions(BaseModel):
    include_usage: bool = False


class _Sampling(BaseModel):
    """What completions and chat share."""

    model_config = ConfigDict(extra="ignore")

    model: str
    temperature: Optional[Annotated[Finite, Field(ge=0)]] = 1.0
    top_p: Optional[Annotated[Finite, Field(gt=0, le=1)]] = 1.0
    n: Optional[Annotated[int, Field(ge=1)]] = 1
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[Annotated[int, Field(ge=-(2 ** 63), lt=2 ** 64)]] = None
    user: Optional[str] = None
    # extensions (vLLM's names)
    top_k: Optional[Annotated[int, Field(ge=1)]] = None
    min_p: Optional[Annotated[Finite, Field(ge=0, le=1)]] = None
    repetition_penalty: Optional[Annotated[Finite, Field(gt=0)]] = None
    # OpenAI fields accepted only at their neutral value
    presence_penalty: Optional[Finite] = None
    frequency_penalty: Optional[Finite] = None
    logit_bias: Optional[dict[str, float]] = None

    def unsupported(self) -> dict[str, Any]:
        """Fields set to something this server cannot do: name -> value."""
        found = {}
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name):
                found[name] = getattr(self, name)
        if self.logit_bias:
            found["logit_bias"] = self.logit_bias
        return found

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4:
            raise APIError(400, f"stop has {len(stops)} strings; at most 4 are allowed", "stop")
        if any(not s for s in stops):
            raise APIError(400, "stop contains an empty string; expected non-empty strings", "stop")
        return stops

    def sampling(self) -> dict[str, Any]:
        """Keyword arguments of ``GenerationBatch.add`` (temperature 0 is greedy)."""
        return {"temperature": 1.0 if self.temperature is None else self.temperature,
                "top_p": self.top_p, "top_k": self.top_k, "min_p": self.min_p,
                "repetition_penalty": 1.0 if self.repetition_penalty is None else self.repetition_penalty}


PromptTokens = list[Annotated[int, Field(ge=0)]]


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str], PromptTokens, list[PromptTokens]]
    max_tokens: Optional[Annotated[int, Field(ge=0)]] = 16
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def unsupported(self) -> dict[str, Any]:
        found = super().unsupported()
        if self.logprobs is not None:
            found["logprobs"] = self.logprobs
        if self.best_of is not None and self.best_of != (self.n or 1):
            found["best_of"] = self.best_of
        if self.suffix:
            found["suffix"] = self.suffix
        return found


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[str, list[TextPart]]] = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(_Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: Optional[Annotated[int, Field(ge=0)]] = None
    max_completion_tokens: Optional[Annotated[int, Field(ge=0)]] = None
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    functions: Optional[list[Any]] = None
    response_format: Optional[dict[str, Any]] = None

    def unsupported(self) -> dict[str, Any]:
        found = super().unsupported()
        for name in ("logprobs", "top_logprobs", "tools", "functions"):
            if getattr(self, name):
                found[name] = getattr(self, name)
        if self.response_format and self.response_format.get("type") != "text":
            found["response_format"] = self.response_format
        return found
