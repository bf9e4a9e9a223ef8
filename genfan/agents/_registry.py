"""The tools one agent may run, by name: `ToolRegistry`.

Only registered tools ever run: a call naming any other tool comes back to the model as a
readable `UnknownToolError` record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Any

import anyio

from .. import telemetry
from .._errors import ConfigurationError
from .._types import ToolCall, ToolSpec
from ._errors import UnknownToolError
from ._tools import Tool, ToolCallRecord, failed_record

__all__ = ["ToolLike", "ToolRegistry"]


ToolLike = Tool[Any] | Callable[..., Any]


class ToolRegistry:
    """The tools one agent may run, by name. Only registered tools ever run.

    Args:
        tools: tools, or plain functions (wrapped with `Tool.from_function`).

    Raises:
        ConfigurationError: two tools share a name.
    """

    def __init__(self, tools: Iterable[ToolLike] = ()) -> None:
        self._tools: dict[str, Tool[Any]] = {}
        for t in tools:
            self.add(t)

    def add(self, item: ToolLike) -> Tool[Any]:
        """Register a tool (or a function); returns the `Tool`."""
        t = item if isinstance(item, Tool) else Tool.from_function(item)
        if t.name in self._tools:
            raise ConfigurationError(f"two tools are named {t.name!r}; tool names must be unique")
        self._tools[t.name] = t
        return t

    def get(self, name: str) -> Tool[Any]:
        """The tool called ``name``.

        Raises:
            UnknownToolError: no such tool; the message lists the ones there are.
        """
        try:
            return self._tools[name]
        except KeyError:
            known = ", ".join(sorted(self._tools)) or "none"
            raise UnknownToolError(
                f"there is no tool named {name!r}; available tools: {known}", tool=name
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._tools

    def __iter__(self) -> Iterator[Tool[Any]]:
        return iter(self._tools.values())

    def __len__(self) -> int:
        return len(self._tools)

    @property
    def names(self) -> list[str]:
        return list(self._tools)

    def specs(self) -> tuple[ToolSpec, ...]:
        """Every tool's [`ToolSpec`][genfan.ToolSpec], in registration order."""
        return tuple(t.spec for t in self._tools.values())

    async def run(self, call: ToolCall) -> ToolCallRecord:
        """Run the model's call if the tool is registered; a readable error record if not."""
        try:
            t = self.get(call.name)
        except UnknownToolError as exc:
            exc.call_id = call.id
            telemetry.event(
                "tool_call_failed", level="info", tool=call.name, error="UnknownToolError"
            )
            return failed_record(call, exc, attempts=0, started=anyio.current_time())
        return await t.run(call)
