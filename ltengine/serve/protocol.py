"""OpenAI wire format: request bodies (validated here, before the engine sees them), responses, stream
chunks and error bodies. Fields that clients send by default are accepted at their defaults; a value
the engine cannot honour raises ``UnsupportedField`` (a 400 naming the field); unknown fields are
ignored, as vLLM and OpenAI-compatible servers do."""
from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from ..config import LazyConfig, SamplingParams

LAZY_OVERRIDES = ("fraction", "window", "policy")


class UnsupportedField(ValueError):
    """A request field set to a value the engine cannot honour (n != 1, logprobs, penalties...)."""

    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


class APIError(Exception):
    """An error with an HTTP status and an OpenAI error body."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers

    def body(self) -> dict:
        return error_body(self.message, self.type, self.param, self.code)


def error_body(message: str, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict:
    return {"error": {"message": message, "type": type, "param": param, "code": code}}


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class LazyOverride(BaseModel):
    """The ``lazy`` extra body field: per-request overrides of the server's LazyConfig."""

    model_config = ConfigDict(extra="forbid")
    fraction: Optional[float] = None
    window: Optional[int] = None
    policy: Optional[Union[str, list[int]]] = None


class _Common(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: Optional[float] = Field(default=None, ge=0, le=2)
    top_p: Optional[float] = Field(default=None, gt=0, le=1)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    # sent by many clients by default: accepted at their defaults only
    n: Optional[int] = 1
    presence_penalty: Optional[float] = 0.0
    frequency_penalty: Optional[float] = 0.0
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # extensions (vLLM names)
    top_k: Optional[int] = Field(default=None, ge=0)
    ignore_eos: bool = False
    lazy: Optional[LazyOverride] = None

    def check_supported(self) -> None:
        if self.n not in (None, 1):
            raise UnsupportedField("n", f"n={self.n} is not supported: this server returns one choice per request (n=1)")
        for name in ("presence_penalty", "frequency_penalty"):
            if getattr(self, name) not in (None, 0, 0.0):
                raise UnsupportedField(name, f"{name}={getattr(self, name)} is not supported; only 0 is")
        if self.logit_bias:
            raise UnsupportedField("logit_bias", "logit_bias is not supported")
        stop = [self.stop] if isinstance(self.stop, str) else (self.stop or [])
        if len(stop) > 4:
            raise UnsupportedField("stop", f"at most 4 stop sequences are allowed, got {len(stop)}")
        if any(not s for s in stop):
            raise UnsupportedField("stop", "stop sequences must be non-empty strings")
        if self.stream_options is not None and not self.stream:
            raise UnsupportedField("stream_options", "stream_options is only allowed with stream=true")

    def sampling(self, max_new_tokens: int) -> SamplingParams:
        """The engine's SamplingParams; OpenAI's default temperature is 1."""
        return SamplingParams(max_new_tokens=max_new_tokens,
                              temperature=1.0 if self.temperature is None else self.temperature,
                              top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k or 0,
                              seed=self.seed, stop=self.stop or (), ignore_eos=self.ignore_eos)

    def lazy_config(self, base: LazyConfig) -> LazyConfig | None:
        """The server's LazyConfig with this request's overrides; None when there are none."""
        if self.lazy is None:
            return None
        fields = {k: v for k, v in self.lazy.model_dump().items() if v is not None}
        if not fields:
            return None
        if isinstance(fields.get("policy"), list):
            fields["policy"] = tuple(fields["policy"])
        try:
            return LazyConfig(**{**base.__dict__, **fields})
        except ValueError as e:
            bad = next((k for k in LAZY_OVERRIDES if f".{k}" in str(e)), None)
            raise UnsupportedField(f"lazy.{bad}" if bad else "lazy", str(e)) from None


class CompletionRequest(_Common):
    prompt: Union[str, list[int], list[str], list[list[int]]]
    max_tokens: Optional[int] = Field(default=16, ge=1)  # OpenAI's default for completions
    echo: Optional[bool] = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs is not None:
            raise UnsupportedField("logprobs", "logprobs are not supported")
        if self.echo:
            raise UnsupportedField("echo", "echo is not supported")
        if self.best_of not in (None, 1):
            raise UnsupportedField("best_of", f"best_of={self.best_of} is not supported (only 1)")
        if self.suffix:
            raise UnsupportedField("suffix", "suffix is not supported")

    def single_prompt(self) -> str | list[int]:
        """The one prompt of the request (text or token ids); a batch of several is a 400."""
        p = self.prompt
        if isinstance(p, list) and p and isinstance(p[0], (str, list)):
            if len(p) != 1:
                raise UnsupportedField("prompt", f"a batch of {len(p)} prompts is not supported; send one per request")
            p = p[0]
        if isinstance(p, str) and not p:
            raise UnsupportedField("prompt", "prompt is empty")
        if isinstance(p, list) and not p:
            raise UnsupportedField("prompt", "prompt is an empty list of token ids")
        return p


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[str, list[TextPart]]] = None
    name: Optional[str] = None

    def as_template(self) -> dict:
        content = self.content or ""
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Common):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = None
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[dict[str, Any]] = None

    def check_supported(self) -> None:
        super().check_supported()
        if self.logprobs or self.top_logprobs:
            raise UnsupportedField("logprobs" if self.logprobs else "top_logprobs", "logprobs are not supported")
        if self.tools:
            raise UnsupportedField("tools", "tool calling is not supported")
        if self.tool_choice not in (None, "none", "auto"):
            raise UnsupportedField("tool_choice", "tool calling is not supported")
        if self.response_format and self.response_format.get("type") not in (None, "text"):
            raise UnsupportedField("response_format", f"response_format {self.response_format.get('type')!r} is not "
                                   "supported (only 'text')")

    @property
    def max_new_tokens(self) -> int | None:
        return self.max_completion_tokens or self.max_tokens


# ---------------------------------------------------------------------------------------------- responses
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "abort": "abort", "error": "error"}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def extension(out) -> dict:
    """The ``ltengine`` object of a response: which layers went lazy and the KV they saved."""
    s = out.stats
    return {"lazy_layers": list(out.lazy_layers), "num_layers": out.num_layers, "kv_saved": round(s.kv_saved, 4),
            "kv_bytes_after_prefill": s.kv_bytes_after_prefill, "full_kv_bytes": s.full_kv_bytes,
            "prefill_s": round(s.prefill_s, 4), "decode_s": round(s.decode_s, 4),
            "preemptions": getattr(s, "preemptions", 0)}


def completion_response(rid: str, model: str, out, chat: bool) -> dict:
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": out.text},
                  "finish_reason": FINISH[out.finish_reason], "logprobs": None}
    else:
        choice = {"index": 0, "text": out.text, "finish_reason": FINISH[out.finish_reason], "logprobs": None}
    return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": int(time.time()),
            "model": model, "choices": [choice], "usage": usage(out.stats.prompt_tokens, len(out.token_ids)),
            "ltengine": extension(out)}


def chunk(rid: str, model: str, created: int, chat: bool, text: str | None = None, role: bool = False,
          finish_reason: str | None = None, include_usage: bool = False) -> dict:
    """One stream chunk carrying ``text`` (and, on the last one, the finish reason)."""
    if chat:
        delta: dict = {}
        if role:
            delta["role"] = "assistant"
        if text is not None:
            delta["content"] = text
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    body = {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [choice]}
    if include_usage:
        body["usage"] = None  # OpenAI: null on every chunk but the last
    return body


def usage_chunk(rid: str, model: str, created: int, chat: bool, out) -> dict:
    return {"id": rid, "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage(out.stats.prompt_tokens, len(out.token_ids)),
            "ltengine": extension(out)}


def model_list(names: list[str], created: int) -> dict:
    return {"object": "list", "data": [{"id": n, "object": "model", "created": created, "owned_by": "ltengine"}
                                       for n in names]}
