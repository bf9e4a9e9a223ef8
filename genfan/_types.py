"""The data genfan passes around: messages, requests, completions, stream events and usage.

All are pydantic v2 models. Requests and completions are frozen so that one request can be
shared by many concurrent backend calls without copies.
"""

from __future__ import annotations

import builtins
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, Literal, TypeAlias

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = [
    "CacheTTL",
    "ChatRequest",
    "Completion",
    "FinishReason",
    "JsonValue",
    "LogprobStats",
    "Message",
    "RateLimitInfo",
    "ResponseFormat",
    "Role",
    "StreamEnd",
    "StreamEvent",
    "TextDelta",
    "TokenLogprob",
    "ToolCall",
    "ToolCallDelta",
    "ToolSpec",
    "Usage",
]

JsonValue: TypeAlias = Any
Role = Literal["system", "user", "assistant", "tool"]
#: How long a provider keeps a cached prompt prefix (Anthropic's ``cache_control`` TTLs).
CacheTTL = Literal["5m", "1h"]
FinishReason = Literal["stop", "length", "tool_calls", "content_filter", "error", "unknown"]

_frozen = ConfigDict(frozen=True, extra="forbid", defer_build=True)


class ToolCall(BaseModel):
    """A tool call the model asked for: ``arguments`` is the JSON text the model produced."""

    model_config = _frozen

    id: str
    name: str
    arguments: str = "{}"

    def parsed_arguments(self) -> dict[str, JsonValue]:
        """The arguments as a dict; raises ``ValueError`` if the model wrote invalid JSON."""
        value = json.loads(self.arguments or "{}")
        if not isinstance(value, dict):
            raise ValueError(f"tool call arguments must be a JSON object, got {self.arguments!r}")
        return value


class Message(BaseModel):
    """One chat message.

    Use the constructors `system`, `user`, `assistant` and `tool`.

    ``cache_control`` marks the end of a prompt prefix the provider should cache (everything
    up to and including this message), for ``"5m"`` or ``"1h"``: Anthropic's ``cache_control``
    breakpoint (at most 4 per request). Later requests that start with the same prefix read it
    at about a tenth of the input price; writing it costs 1.25x (2x for an hour). Providers
    that cache on their own (OpenAI caches prefixes of 1,024 tokens and more) ignore it.
    """

    model_config = _frozen

    role: Role
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None
    name: str | None = None
    cache_control: CacheTTL | None = None

    @classmethod
    def system(cls, content: str, *, cache_control: CacheTTL | None = None) -> Message:
        return cls(role="system", content=content, cache_control=cache_control)

    @classmethod
    def user(cls, content: str, *, cache_control: CacheTTL | None = None) -> Message:
        return cls(role="user", content=content, cache_control=cache_control)

    @classmethod
    def assistant(cls, content: str | None = None, tool_calls: Sequence[ToolCall] = ()) -> Message:
        return cls(role="assistant", content=content, tool_calls=tuple(tool_calls))

    @classmethod
    def tool(cls, content: str, *, tool_call_id: str, name: str | None = None) -> Message:
        return cls(role="tool", content=content, tool_call_id=tool_call_id, name=name)


class ToolSpec(BaseModel):
    """A tool the model may call: its name, description and JSON schema of its arguments."""

    model_config = _frozen

    name: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    description: str = ""
    parameters: dict[str, JsonValue] = Field(
        default_factory=lambda: {"type": "object", "properties": {}}
    )


class ResponseFormat(BaseModel):
    """Ask for plain text, any JSON object, or JSON matching a schema."""

    model_config = _frozen

    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: dict[str, JsonValue] | None = None
    name: str = "response"
    strict: bool = True

    @classmethod
    def from_model(cls, model: builtins.type[BaseModel], *, strict: bool = True) -> ResponseFormat:
        """A JSON-schema response format from a pydantic model."""
        return cls(
            type="json_schema",
            json_schema=model.model_json_schema(),
            name=model.__name__,
            strict=strict,
        )

    @classmethod
    def from_type(cls, output_type: Any) -> ResponseFormat:
        """The JSON-schema response format ``output_type=`` sends: for a pydantic model or any
        type pydantic's ``TypeAdapter`` takes (``list[City]``, a ``Literal``...), in the
        strict-compatible form OpenAI's structured outputs accept where the type allows it,
        non-object types wrapped as ``{"response": ...}``; ``str``: plain text."""
        from ._output import output_spec

        spec = output_spec(output_type)
        if spec is None or spec.response_format is None:
            return cls()
        return spec.response_format


class ChatRequest(BaseModel):
    """One chat-completion request, shared unchanged by every backend of a fan-out.

    ``model`` is optional: a backend has its own default model, and a fan-out target may override
    it. ``timeout`` is the per-call limit in seconds. ``logprobs=True`` asks the backend for the
    log-probability of every generated token (`Completion.logprobs`); a backend that
    cannot report them answers without.
    """

    model_config = _frozen

    messages: tuple[Message, ...]
    model: str | None = None
    temperature: Annotated[float, Field(ge=0.0, le=2.0)] | None = None
    top_p: Annotated[float, Field(gt=0.0, le=1.0)] | None = None
    max_tokens: Annotated[int, Field(gt=0)] | None = None
    stop: tuple[str, ...] = ()
    seed: int | None = None
    tools: tuple[ToolSpec, ...] = ()
    tool_choice: Literal["auto", "none", "required"] | str | None = None
    response_format: ResponseFormat | None = None
    timeout: Annotated[float, Field(gt=0.0)] | None = None
    metadata: dict[str, str] = Field(default_factory=dict)
    logprobs: bool = False

    @field_validator("messages")
    @classmethod
    def _not_empty(cls, v: tuple[Message, ...]) -> tuple[Message, ...]:
        if not v:
            raise ValueError("a request needs at least one message")
        return v

    @classmethod
    def from_prompt(cls, prompt: str, *, system: str | None = None, **fields: Any) -> ChatRequest:
        """A request with one user message (and an optional system prompt)."""
        messages = [Message.user(prompt)]
        if system is not None:
            messages.insert(0, Message.system(system))
        return cls(messages=tuple(messages), **fields)

    def with_system(self, system: str) -> ChatRequest:
        """A copy whose system prompt is ``system`` (replacing any existing one)."""
        rest = tuple(m for m in self.messages if m.role != "system")
        return self.model_copy(update={"messages": (Message.system(system), *rest)})

    def with_overrides(self, **changes: Any) -> ChatRequest:
        """A copy with the given fields replaced (``None`` values are ignored)."""
        changes = {k: v for k, v in changes.items() if v is not None}
        if not changes:
            return self
        return self.model_validate({**self.model_dump(exclude_defaults=True), **changes})

    @property
    def prompt(self) -> str:
        """The text of the last user message (empty if there is none)."""
        for message in reversed(self.messages):
            if message.role == "user":
                return message.content or ""
        return ""


class Usage(BaseModel):
    """Token counts, and their cost in USD when the backend's price is known.

    Attributes:
        input_tokens: every prompt token, the cached ones included (as OpenAI counts them;
            Anthropic's three counts are added up).
        output_tokens: every generated token, reasoning tokens included.
        cache_read_tokens: the part of ``input_tokens`` read from the provider's prompt cache
            (billed at its cache-read price, about a tenth of the input price).
        cache_write_tokens: the part of ``input_tokens`` written to the prompt cache (billed
            at its cache-write price: 1.25x the input price at Anthropic).
        reasoning_tokens: the part of ``output_tokens`` spent thinking (not in the text).
        cost: USD, from the ``genai-prices`` table or the backend's ``price=``; ``None``:
            unknown (a model the table does not know, with no ``price=``).
    """

    model_config = _frozen

    input_tokens: int = 0
    output_tokens: int = 0
    cost: float | None = None
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def __add__(self, other: Usage) -> Usage:
        cost: float | None
        if self.cost is None and other.cost is None:
            cost = None
        else:
            cost = (self.cost or 0.0) + (other.cost or 0.0)
        return Usage(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cost=cost,
            cache_read_tokens=self.cache_read_tokens + other.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
            reasoning_tokens=self.reasoning_tokens + other.reasoning_tokens,
        )


class RateLimitInfo(BaseModel):
    """Quota a provider reported in its rate-limit response headers (``None``: not reported).

    ``reset_*`` are seconds from when the response was received until the quota refills.
    """

    model_config = _frozen

    limit_requests: int | None = None
    limit_tokens: int | None = None
    remaining_requests: int | None = None
    remaining_tokens: int | None = None
    reset_requests: float | None = None
    reset_tokens: float | None = None


class TokenLogprob(BaseModel):
    """One generated token and its natural-log probability under the model."""

    model_config = _frozen

    token: str
    logprob: float


class LogprobStats(BaseModel):
    """Summary statistics of a run of token log-probabilities (natural log).

    Attributes:
        tokens: how many tokens.
        total: their sum (the log-probability of the whole text).
        mean: the mean per token (``exp(mean)`` is the geometric-mean token probability).
        min: the least likely token's.
        tail_mean: the mean over the least likely 10% of tokens (at least one): low when the
            model was unsure somewhere, however confident elsewhere.
    """

    model_config = _frozen

    tokens: int
    total: float
    mean: float
    min: float
    tail_mean: float

    @property
    def probability(self) -> float:
        """The geometric-mean token probability, ``exp(mean)``, in 0..1."""
        return math.exp(self.mean)

    @property
    def perplexity(self) -> float:
        """``exp(-mean)``: 1 for a text the model was sure of, larger when unsure."""
        return math.exp(-self.mean)

    @classmethod
    def of(cls, logprobs: Iterable[float]) -> LogprobStats | None:
        """The statistics of ``logprobs`` (``None`` when there are none)."""
        values = [v if math.isfinite(v) else -100.0 for v in logprobs]
        if not values:
            return None
        tail = sorted(values)[: max(1, len(values) // 10)]
        total = math.fsum(values)
        return cls(
            tokens=len(values),
            total=total,
            mean=total / len(values),
            min=min(values),
            tail_mean=math.fsum(tail) / len(tail),
        )


class Completion(BaseModel):
    """One backend's answer.

    Attributes:
        latency: seconds from sending the request to the full answer.
        ttft: seconds to the first token, when the answer was streamed.
        logprobs: each generated token with its log-probability, when the request asked for
            them (``ChatRequest(logprobs=True)``) and the backend reports them; else ``None``.
    """

    model_config = _frozen

    text: str = ""
    tool_calls: tuple[ToolCall, ...] = ()
    finish_reason: FinishReason = "stop"
    usage: Usage = Field(default_factory=Usage)
    model: str = ""
    backend: str = ""
    latency: float = 0.0
    ttft: float | None = None
    rate_limit: RateLimitInfo | None = None
    logprobs: tuple[TokenLogprob, ...] | None = None

    @property
    def logprob_stats(self) -> LogprobStats | None:
        """Summary statistics of `logprobs` (``None`` without them)."""
        if not self.logprobs:
            return None
        return LogprobStats.of(t.logprob for t in self.logprobs)

    def parse_json(self) -> JsonValue:
        """The text parsed as JSON (raises ``ValueError`` when it is not JSON)."""
        return json.loads(self.text)


class TextDelta(BaseModel):
    """A piece of streamed text."""

    model_config = _frozen
    type: Literal["text"] = "text"
    text: str


class ToolCallDelta(BaseModel):
    """A piece of a streamed tool call; pieces with the same ``index`` belong together."""

    model_config = _frozen
    type: Literal["tool_call"] = "tool_call"
    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""


class StreamEnd(BaseModel):
    """The last event of a stream: the whole completion, with usage when the backend sent it."""

    model_config = _frozen
    type: Literal["end"] = "end"
    completion: Completion


StreamEvent = Annotated[TextDelta | ToolCallDelta | StreamEnd, Field(discriminator="type")]


def usage_total(usages: Mapping[str, Usage] | Sequence[Usage]) -> Usage:
    """Sum usages."""
    items = usages.values() if isinstance(usages, Mapping) else usages
    total = Usage()
    for u in items:
        total = total + u
    return total
