"""Prices: what a call costs in USD, for known models without any configuration.

The prices come from [genai-prices](https://github.com/pydantic/genai-prices), the table
pydantic maintains (input, output, cache reads, cache writes, long-context tiers, by provider
and by API URL). A model is looked up once per process and its prices kept as a
[`Price`][genfan.cost.Price], so pricing a completion is a few float operations (about a
microsecond), not a table walk.

A backend says what a request would cost with an optional ``price_for(request) -> Price | None``
method; [`backend_price`][genfan.cost.backend_price] finds it structurally, through the guards
and wrappers around a backend (their ``inner`` or ``provider``), so a guarded backend needs no
forwarding code. The HTTP providers price their model from the table (``price=`` overrides it);
the in-process engine costs 0 unless priced.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal
from typing import Any, Literal

from .._errors import CallCancelledError, ConfigurationError
from .._types import ChatRequest, Usage

__all__ = [
    "DEFAULT_OUTPUT_TOKENS",
    "MaxCostError",
    "Price",
    "PriceLike",
    "backend_price",
    "estimate_cost",
    "estimate_input_tokens",
    "lookup_price",
]

#: Output tokens assumed by `estimate_cost` for a request with no ``max_tokens`` (and a backend
#: with no default of its own): set ``max_tokens`` for a tight estimate.
DEFAULT_OUTPUT_TOKENS = 4096

_PER = 1_000_000.0


@dataclass(frozen=True, kw_only=True, slots=True)
class Price:
    """A model's prices in USD per million tokens.

    Attributes:
        input: an uncached input token.
        output: an output token (reasoning tokens included, unless ``reasoning`` is set).
        cache_read: an input token read from the prompt cache (``None``: the input price).
        cache_write: an input token written to the prompt cache (``None``: the input price).
        reasoning: a reasoning token (``None``: the output price).
        above: long-context tiers, ``((start, price), ...)``: a request with more than
            ``start`` input tokens pays ``price`` for all its tokens (Anthropic's and Google's
            "cliff" pricing).
        model: the model's id in the price table (``None`` for a price given by hand).

    Raises:
        ConfigurationError: a price that is negative or not a finite number.
    """

    input: float
    output: float
    cache_read: float | None = None
    cache_write: float | None = None
    reasoning: float | None = None
    above: tuple[tuple[int, Price], ...] = ()
    model: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        for name in ("input", "output", "cache_read", "cache_write", "reasoning"):
            value = getattr(self, name)
            if value is None and name not in ("input", "output"):
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not (math.isfinite(value) and value >= 0)
            ):
                raise ConfigurationError(
                    f"price {name} must be a finite number of USD per 1M tokens >= 0, got {value!r}"
                )

    @classmethod
    def of(cls, value: PriceLike) -> Price:
        """A price from what ``price=`` takes: a `Price`, ``(input, output)`` USD per 1M
        tokens, or a mapping of `Price`'s fields (``{"input": 3, "output": 15,
        "cache_read": 0.3}``, as a TOML table gives).

        Raises:
            ConfigurationError: anything else, or a bad number.
        """
        if isinstance(value, Price):
            return value
        if isinstance(value, Mapping):
            unknown = set(value) - {"input", "output", "cache_read", "cache_write", "reasoning"}
            if unknown or not {"input", "output"} <= set(value):
                raise ConfigurationError(
                    "a price table needs input and output (USD per 1M tokens) and may have "
                    f"cache_read, cache_write, reasoning; got keys {sorted(value)}"
                )

            def opt(key: str) -> float | None:
                return None if value.get(key) is None else _number(key, value[key])

            return cls(
                input=_number("input", value["input"]),
                output=_number("output", value["output"]),
                cache_read=opt("cache_read"),
                cache_write=opt("cache_write"),
                reasoning=opt("reasoning"),
            )
        if isinstance(value, tuple | list) and len(value) == 2:
            return cls(input=_number("input", value[0]), output=_number("output", value[1]))
        raise ConfigurationError(
            "price must be (USD per 1M input tokens, USD per 1M output tokens), both >= 0, "
            f"or a genfan.cost.Price; got {value!r}"
        )

    def cost(self, usage: Usage) -> float:
        """USD for ``usage``: cached input at the cache prices, reasoning at its price."""
        return self.cost_of(
            usage.input_tokens,
            usage.output_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            reasoning_tokens=usage.reasoning_tokens,
        )

    def cost_of(
        self,
        input_tokens: int,
        output_tokens: int,
        *,
        cache_read_tokens: int = 0,
        cache_write_tokens: int = 0,
        reasoning_tokens: int = 0,
    ) -> float:
        """USD for these counts (as in `Usage`: the input includes the cached tokens, the
        output the reasoning tokens)."""
        p = self._tier(input_tokens) if self.above else self
        uncached = max(input_tokens - cache_read_tokens - cache_write_tokens, 0)
        reasoning = min(reasoning_tokens, output_tokens)
        total = (
            uncached * p.input
            + cache_read_tokens * (p.input if p.cache_read is None else p.cache_read)
            + cache_write_tokens * (p.input if p.cache_write is None else p.cache_write)
            + (output_tokens - reasoning) * p.output
            + reasoning * (p.output if p.reasoning is None else p.reasoning)
        )
        return total / _PER

    def estimate(self, input_tokens: int, output_tokens: int) -> float:
        """USD for ``input_tokens`` uncached input and ``output_tokens`` output tokens."""
        p = self._tier(input_tokens)
        return (input_tokens * p.input + output_tokens * p.output) / _PER

    def priced(self, usage: Usage) -> Usage:
        """``usage`` with its ``cost`` filled in from this price."""
        return usage.model_copy(update={"cost": self.cost(usage)})

    def _tier(self, input_tokens: int) -> Price:
        for start, price in reversed(self.above):
            if input_tokens > start:
                return price
        return self


PriceLike = Price | tuple[float, float] | Mapping[str, float]
"""What ``price=`` takes: a [`Price`][genfan.cost.Price], ``(input, output)`` USD per 1M
tokens, or a mapping of `Price`'s fields."""


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigurationError(
            f"price {name} must be a number of USD per 1M tokens >= 0, got {value!r}"
        )
    return float(value)


# -- the table ---------------------------------------------------------------------------------

_lock = threading.Lock()
_found: dict[tuple[str, str | None, str | None], Price | None] = {}


def lookup_price(
    model: str, *, provider: str | None = None, base_url: str | None = None
) -> Price | None:
    """The price of ``model`` in the genai-prices table, or ``None`` when it has none.

    The provider is found from ``base_url`` (``https://api.openai.com/v1``,
    ``https://openrouter.ai/api/v1``...) when the table knows that API, else from ``provider``
    (``"openai"``, ``"anthropic"``, ...). A model is never priced at another provider's rates: a
    local server with an unknown URL and a model that is not ``provider``'s is ``None``.

    Prices are looked up once per process, at the prices in force at that time (the table
    records price changes by date); results are cached.

    Args:
        model: the model name as the API takes it (``"gpt-4o-mini"``,
            ``"claude-sonnet-4-5-20250929"``; dated and aliased names match).
        provider: the table's provider id.
        base_url: the API root the backend calls.
    """
    key = (model, provider, base_url)
    try:
        return _found[key]
    except KeyError:
        pass
    with _lock:
        if key not in _found:
            _found[key] = _lookup(model, provider, base_url)
        return _found[key]


def _lookup(model: str, provider: str | None, base_url: str | None) -> Price | None:
    from genai_prices import data_snapshot

    snapshot = data_snapshot.get_snapshot()
    info: Any = None
    if base_url is not None:
        try:
            _, info = snapshot.find_provider_model(model, None, None, base_url)
        except LookupError:
            info = None
    if info is None and provider is not None:
        try:
            _, info = snapshot.find_provider_model(model, None, provider, None)
        except LookupError:
            info = None
    if info is None:
        return None
    return _from_table(info.get_prices(datetime.now(tz=UTC)), info.id)


def _from_table(prices: Any, model_id: str) -> Price | None:
    """A `Price` from genai-prices' ``ModelPrice`` (``None`` without token prices)."""
    raw: dict[str, Any] = {
        "input": getattr(prices, "input_mtok", None),
        "output": getattr(prices, "output_mtok", None),
        "cache_read": getattr(prices, "cache_read_mtok", None),
        "cache_write": getattr(prices, "cache_write_mtok", None),
        "reasoning": getattr(prices, "output_reasoning_mtok", None),
    }
    if raw["input"] is None and raw["output"] is None:
        return None
    starts = sorted({t.start for v in raw.values() if hasattr(v, "tiers") for t in v.tiers})

    def at(value: Any, start: int | None) -> float | None:
        if value is None:
            return None
        if isinstance(value, Decimal | int | float):
            return float(value)
        price = value.base
        for tier in value.tiers:  # sorted by start
            if start is not None and start >= tier.start:
                price = tier.price
        return float(price)

    def build(start: int | None) -> dict[str, float | None]:
        values = {k: at(v, start) for k, v in raw.items()}
        values["input"] = values["input"] or 0.0
        values["output"] = values["output"] or 0.0
        return values

    above = tuple((s, Price(**build(s), model=model_id)) for s in starts)  # type: ignore[arg-type]
    return Price(**build(None), above=above, model=model_id)  # type: ignore[arg-type]


# -- a backend's price, estimates --------------------------------------------------------------


def backend_price(backend: object, request: ChatRequest) -> Price | None:
    """What ``backend`` charges for ``request``, from its ``price_for(request)`` method, found
    through the guards and wrappers around it (``inner``, ``provider``); ``None``: unknown."""
    seen = 0
    node: object | None = backend
    while node is not None and seen < 32:
        price_for = getattr(node, "price_for", None)
        if callable(price_for):
            price = price_for(request)
            return price if isinstance(price, Price) else None
        node = getattr(node, "provider", None) or getattr(node, "inner", None)
        seen += 1
    return None


def _default_max_tokens(backend: object) -> int | None:
    node: object | None = backend
    for _ in range(32):
        if node is None:
            return None
        value = getattr(node, "max_tokens", None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
        node = getattr(node, "provider", None) or getattr(node, "inner", None)
    return None


def estimate_input_tokens(request: ChatRequest) -> int:
    """Prompt tokens of ``request``, estimated without a tokenizer: a token per 4 characters
    of text, tool definitions and schemas included, plus 4 per message (the chat template)."""
    chars = 0
    for m in request.messages:
        chars += len(m.content or "")
        for call in m.tool_calls:
            chars += len(call.name) + len(call.arguments)
    for tool in request.tools:
        chars += len(tool.name) + len(tool.description) + len(repr(tool.parameters))
    fmt = request.response_format
    if fmt is not None and fmt.json_schema is not None:
        chars += len(repr(fmt.json_schema))
    return -(-chars // 4) + 4 * len(request.messages)


def estimate_cost(backend: object, request: ChatRequest) -> float | None:
    """The most ``backend`` may charge for ``request`` before it is sent: estimated prompt
    tokens x input price + ``max_tokens`` x output price (``max_tokens`` from the request, else
    the backend's default, else `DEFAULT_OUTPUT_TOKENS`); ``None``: its price is unknown.

    A backend may answer this itself with an ``estimate_cost(request) -> float`` method."""
    node: object | None = backend
    for _ in range(32):
        if node is None:
            break
        own = getattr(node, "estimate_cost", None)
        if callable(own):
            value = own(request)
            return float(value) if isinstance(value, int | float) else None
        if callable(getattr(node, "price_for", None)):
            break
        node = getattr(node, "provider", None) or getattr(node, "inner", None)
    price = backend_price(backend, request)
    if price is None:
        return None
    out = request.max_tokens or _default_max_tokens(backend) or DEFAULT_OUTPUT_TOKENS
    return price.estimate(estimate_input_tokens(request), out)


class MaxCostError(CallCancelledError):
    """A call a fan-out did not make, or cancelled, to stay within its ``max_cost``.

    Attributes:
        action: ``"skipped"`` (never started: its estimate would have passed the cap) or
            ``"cancelled"`` (stopped while running: the spend passed the cap).
        max_cost: the cap, USD.
        spent: USD spent (and, for a skipped call, committed to the calls running) when it was
            cut.
        estimate: the call's estimated cost, USD (``None``: unknown).
    """

    reason: Literal["max_cost"] = "max_cost"

    def __init__(
        self,
        message: str,
        *,
        backend: str,
        action: Literal["skipped", "cancelled"],
        max_cost: float,
        spent: float,
        estimate: float | None = None,
    ) -> None:
        super().__init__(message, backend=backend)
        self.action: Literal["skipped", "cancelled"] = action
        self.max_cost = max_cost
        self.spent = spent
        self.estimate = estimate
