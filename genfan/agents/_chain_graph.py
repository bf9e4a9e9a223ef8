"""The parts a chain's graph is made of, and the checks made when a step is declared.

* `Input`: a value the caller gives to ``Chain.run`` by name;
* `StepRef`: a step's future output; passing it to another step makes a dependency;
* `StepSpec`: one declared step (what it calls, its inputs, its guards, its dependencies);
* the checks on a declaration: the function's signature against the inputs given, the timeout,
  the error policy.

The builder (``_chain.py``) makes these; the runner (``_chain_run.py``) reads them.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, TypeVar

from .._errors import ConfigurationError
from ..resilience import RetryPolicy
from ._llm_call import LLMCall
from ._tools import Tool

__all__ = [
    "MISSING",
    "Input",
    "OnError",
    "StepKind",
    "StepRef",
    "StepSpec",
    "check_on_error",
    "check_signature",
    "check_timeout",
    "fn_name",
    "parameters",
    "step_kind",
]

T = TypeVar("T")

OnError = Literal["fail", "continue"]
StepKind = Literal["function", "tool", "llm", "join"]

MISSING: Any = object()
"""The default of an `Input` the caller must pass."""


class Input(Generic[T]):
    """A value given to `Chain.run` by name (``chain.run(query="...")``).

    Args:
        name: the keyword the caller passes.
        type: the expected type (documents it, and types ``result`` look-ups).
        default: used when the caller does not pass it.
    """

    __slots__ = ("default", "name", "type")

    def __init__(self, name: str, type: type[T] | None = None, *, default: Any = MISSING) -> None:
        if not name.isidentifier():
            raise ConfigurationError(f"Input name must be an identifier, got {name!r}")
        self.name = name
        self.type = type
        self.default = default

    @property
    def required(self) -> bool:
        return self.default is MISSING

    def __repr__(self) -> str:
        return f"Input({self.name!r})"


class StepRef(Generic[T]):
    """A step's future output: pass it as another step's input to make that step depend on it.

    ``T`` is what the step returns, so ``result[ref]`` is typed.
    """

    __slots__ = ("_chain", "name")

    def __init__(self, chain: object, name: str) -> None:
        self._chain = chain  # the Chain it belongs to, compared by identity only
        self.name = name

    def __repr__(self) -> str:
        return f"StepRef({self.name!r})"

    def __eq__(self, other: object) -> bool:
        return (
            isinstance(other, StepRef) and other._chain is self._chain and other.name == self.name
        )

    def __hash__(self) -> int:
        return hash((id(self._chain), self.name))


@dataclass(kw_only=True)
class StepSpec:
    """One declared step."""

    name: str
    kind: StepKind
    fn: Callable[..., Any]
    inputs: dict[str, Any]  # param -> StepRef | Input | constant
    after: tuple[str, ...] = ()
    item_param: str | None = None  # map steps: the parameter each item goes to
    items: Any = None  # map steps: the source of the list
    max_concurrency: int | None = None
    timeout: float | None = None
    retry: RetryPolicy | None = None
    thread: bool = False
    deps: tuple[str, ...] = field(default=())


def step_kind(fn: Callable[..., Any]) -> StepKind:
    """``llm`` for an `LLMCall`, ``tool`` for a `Tool`, else ``function``."""
    if isinstance(fn, LLMCall):
        return "llm"
    return "tool" if isinstance(fn, Tool) else "function"


def parameters(fn: Callable[..., Any], step: str) -> dict[str, inspect.Parameter]:
    target = fn.fn if isinstance(fn, Tool) else fn
    try:
        return dict(inspect.signature(target).parameters)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"step {step!r}: cannot read the signature of {target!r}: {exc}"
        ) from exc


def fn_name(fn: Callable[..., Any]) -> str:
    if isinstance(fn, Tool):
        return f"tool {fn.name!r}"
    return getattr(fn, "__qualname__", None) or getattr(fn, "__name__", None) or repr(fn)


def check_signature(step: StepSpec) -> None:
    """Every input names a parameter of the step's function, and every required one is given."""
    params = parameters(step.fn, step.name)
    given = set(step.inputs)
    if step.item_param is not None:
        given.add(step.item_param)
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = {n: p for n, p in params.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    for n in sorted(given):
        p = named.get(n)
        if p is None and not takes_any:
            listing = ", ".join(named) or "none"
            raise ConfigurationError(
                f"step {step.name!r}: {fn_name(step.fn)} has no parameter {n!r} "
                f"(its parameters: {listing})"
            )
        if p is not None and p.kind is p.POSITIONAL_ONLY:
            raise ConfigurationError(
                f"step {step.name!r}: parameter {n!r} of {fn_name(step.fn)} is positional-only "
                "and cannot be given by name"
            )
    missing = [
        n for n, p in named.items() if n not in given and p.default is inspect.Parameter.empty
    ]
    if missing:
        raise ConfigurationError(
            f"step {step.name!r} is missing input(s) {', '.join(map(repr, missing))} "
            f"(required by {fn_name(step.fn)})"
        )


def check_timeout(timeout: float | None, step: str) -> float | None:
    if timeout is not None and not (timeout > 0 and timeout != float("inf")):
        raise ConfigurationError(f"step {step!r}: timeout must be > 0 seconds, got {timeout!r}")
    return timeout


def check_on_error(value: object) -> None:
    if value not in ("fail", "continue"):
        raise ConfigurationError(f"on_error must be 'fail' or 'continue', got {value!r}")
