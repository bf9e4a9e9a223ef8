"""Tool calls on the in-process engine: what vLLM's OpenAI-compatible server does, in-process.

* ``tool_choice="required"`` or a tool's name: the answer is constrained (structured outputs) to
  the JSON schema vLLM's ``get_json_schema_from_tools`` builds, then read as tool calls;
* ``tool_choice="auto"`` (or ``None``) with a ``tool_parser``: one of vLLM's registered tool
  parsers (``ToolParserManager``) reads the calls out of the generated text;
* ``tool_choice="none"``: the tools are not shown to the model and nothing is parsed.

`VLLMBackend` decides a request's `_ToolPlan` and applies
it; the pieces here know nothing of the engine.
"""

from __future__ import annotations

import copy
import json
import os
import sys
import uuid
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from genfan import ChatRequest, ConfigurationError, ToolCall, ToolSpec

from ._env import apply_engine_env, env_lock, new_log_file
from ._errors import missing_vllm


@dataclass(frozen=True, kw_only=True, slots=True)
class _ToolPlan:
    """How one request's tools are handled (see the module docstring)."""

    template_tools: list[dict[str, Any]] | None = None
    forced: str | None = None  # "required", or the one tool's name
    schema: dict[str, Any] | None = None
    new_parser: Callable[[], Any] | None = None  # auto mode: a fresh vLLM ToolParser
    parser_request: Any = None  # the vLLM ChatCompletionRequest the parser reads
    skip_special_tokens: bool | None = None


_NO_TOOLS: Final = _ToolPlan()
_EMPTY_OBJECT: Final[Mapping[str, Any]] = {"type": "object", "properties": {}}


def _new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _template_tools(tools: Sequence[ToolSpec]) -> list[dict[str, Any]]:
    return [
        {
            "type": "function",
            "function": {"name": t.name, "description": t.description, "parameters": t.parameters},
        }
        for t in tools
    ]


def _tool_call_schema(tools: Sequence[ToolSpec], tool_choice: str) -> dict[str, Any]:
    """The JSON schema that forces tool calls, as vLLM's ``get_json_schema_from_tools`` builds it.

    ``"required"``: an array (at least one item) of ``{"name": <one tool's name>, "parameters":
    <that tool's parameters>}`` objects, one ``anyOf`` branch per tool; every tool's ``$defs``
    move to the top so their ``#/$defs/...`` references resolve. A tool's name: that tool's
    parameters schema itself (the answer is the arguments object).

    Raises:
        ValueError: the named tool is not among ``tools``, or two tools define the same ``$defs``
            entry differently.
    """
    if tool_choice != "required":
        for t in tools:
            if t.name == tool_choice:
                return copy.deepcopy(t.parameters) if t.parameters else dict(_EMPTY_OBJECT)
        names = ", ".join(t.name for t in tools) or "none"
        raise ValueError(
            f"tool_choice names the tool {tool_choice!r}, which is not in the request's tools "
            f"({names})"
        )
    branches: list[dict[str, Any]] = []
    defs: dict[str, Any] = {}
    for t in tools:
        params = copy.deepcopy(t.parameters) if t.parameters else dict(_EMPTY_OBJECT)
        own = params.pop("$defs", {})
        if not isinstance(own, dict):
            raise ValueError(f"'$defs' in the parameters of tool {t.name!r} must be an object")
        for key, value in own.items():
            if key in defs and defs[key] != value:
                raise ValueError(
                    f"tools define '$defs/{key}' differently (seen again in {t.name!r}); "
                    "rename one of the definitions"
                )
            defs[key] = value
        branches.append(
            {
                "properties": {
                    "name": {"type": "string", "enum": [t.name]},
                    "parameters": params,
                },
                "required": ["name", "parameters"],
            }
        )
    schema: dict[str, Any] = {
        "type": "array",
        "minItems": 1,
        "items": {"type": "object", "anyOf": branches},
    }
    if defs:
        schema["$defs"] = defs
    return schema


def _parse_forced_tool_calls(
    text: str, tool_choice: str, names: Collection[str]
) -> tuple[ToolCall, ...]:
    """Read the answer to a ``required`` or named ``tool_choice`` as tool calls.

    Raises:
        ValueError: the text is not what `_tool_call_schema` asks for (e.g. cut short),
            or it calls a tool not in ``names``.
    """
    value = json.loads(text)
    if tool_choice != "required":
        if not isinstance(value, dict):
            raise ValueError(f"the arguments must be a JSON object, got {type(value).__name__}")
        return (ToolCall(id=_new_call_id(), name=tool_choice, arguments=text.strip()),)
    if not isinstance(value, list) or not value:
        raise ValueError("expected a non-empty JSON array of tool calls")
    calls = []
    for item in value:
        if not isinstance(item, dict) or not isinstance(item.get("name"), str):
            raise ValueError(f"a tool call must be an object with a string 'name', got {item!r}")
        if item["name"] not in names:
            raise ValueError(
                f"the model called {item['name']!r}, which is not a tool of the request"
            )
        params = item.get("parameters")
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ValueError(f"the parameters of {item['name']!r} must be a JSON object")
        calls.append(
            ToolCall(
                id=_new_call_id(),
                name=item["name"],
                arguments=json.dumps(params, ensure_ascii=False),
            )
        )
    return tuple(calls)


def _extract_tool_calls(parser: Any, text: str, request: Any) -> tuple[str, tuple[ToolCall, ...]]:
    """Tool calls a vLLM ``ToolParser`` finds in ``text``, and the text left around them.

    As vLLM's server does: when the parser finds no call (or cannot read one, e.g. invalid JSON
    inside ``<tool_call>``), the whole text is the answer.
    """
    info = parser.extract_tool_calls(text, request)
    if not info.tools_called or not info.tool_calls:
        return text, ()
    calls = tuple(
        ToolCall(id=_new_call_id(), name=tc.function.name, arguments=tc.function.arguments or "{}")
        for tc in info.tool_calls
    )
    content = info.content or ""
    return ("" if not content.strip() else content), calls


def _stream_content(
    parser: Any,
    request: Any,
    previous: str,
    current: str,
    delta: str,
    previous_ids: list[int],
    current_ids: list[int],
    delta_ids: list[int],
) -> str | None:
    """The text of a streamed step that is not part of a tool call (vLLM's streaming parser).

    A parser that fails holds the text back; the end of the stream sends what is left.
    """
    try:
        message = parser.extract_tool_calls_streaming(
            previous, current, delta, previous_ids, current_ids, delta_ids, request
        )
    except Exception:
        return None
    content = None if message is None else message.content
    return content if isinstance(content, str) else None


def _template_messages(request: ChatRequest) -> list[dict[str, Any]]:
    """The messages as chat templates read them (tool calls' arguments as dicts, as in vLLM)."""
    out: list[dict[str, Any]] = []
    for m in request.messages:
        d: dict[str, Any] = {"role": m.role, "content": m.content or ""}
        if m.role == "assistant" and m.tool_calls:
            d["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": _arguments_object(c.arguments)},
                }
                for c in m.tool_calls
            ]
        if m.role == "tool" and m.tool_call_id is not None:
            d["tool_call_id"] = m.tool_call_id
        if m.name:
            d["name"] = m.name
        out.append(d)
    return out


def _arguments_object(arguments: str) -> dict[str, Any]:
    # vLLM coerces unreadable arguments in the history to {} rather than failing every later turn.
    try:
        value = json.loads(arguments or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _tool_parser_class(name: str) -> Any:
    """vLLM's registered tool parser ``name`` (imports vLLM, with the engine's environment).

    Raises:
        ConfigurationError: no tool parser has that name (the message lists them).
    """
    if "vllm" not in sys.modules:
        with env_lock:  # vLLM reads its environment (logging) when first imported
            apply_engine_env(os.environ, log_file=new_log_file("vllm-engine"))
    try:
        from vllm.tool_parsers import ToolParserManager
    except ImportError as exc:
        raise missing_vllm(exc) from exc
    available = ToolParserManager.list_registered()
    if name not in available:
        raise ConfigurationError(
            f"tool_parser must be None or one of vLLM's tool parsers ({', '.join(available)}), "
            f"got {name!r}"
        )
    try:
        return ToolParserManager.get_tool_parser(name)
    except Exception as exc:
        raise ConfigurationError(f"vLLM's tool parser {name!r} cannot be loaded: {exc}") from exc
