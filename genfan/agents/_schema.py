"""From a Python signature and its Google-style docstring to a pydantic model and JSON schema."""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Callable
from typing import Any, get_type_hints

from pydantic import BaseModel, ConfigDict, Field, create_model
from pydantic.fields import FieldInfo

from .._errors import ConfigurationError

__all__ = ["Docstring", "arguments_model", "clean_schema", "parse_docstring"]

_SECTION = re.compile(r"^(\w[\w ]*):\s*$")
_ARG_SECTIONS = {"args", "arguments", "parameters", "params", "keyword args", "keyword arguments"}
_OTHER_SECTIONS = {
    "returns",
    "return",
    "yields",
    "raises",
    "examples",
    "example",
    "note",
    "notes",
    "attributes",
    "see also",
    "warning",
    "warnings",
    "todo",
    "references",
}
_ARG_LINE = re.compile(r"^\*{0,2}(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$")


class Docstring:
    """The parts of a Google-style docstring a tool needs.

    Attributes:
        description: the text before the first section (summary and body).
        params: parameter name -> its description from the ``Args:`` section.
    """

    __slots__ = ("description", "params")

    def __init__(self, description: str, params: dict[str, str]) -> None:
        self.description = description
        self.params = params


def parse_docstring(doc: str | None) -> Docstring:
    """Split a Google-style docstring into its description and per-argument descriptions."""
    if not doc:
        return Docstring("", {})
    lines = inspect.cleandoc(doc).splitlines()
    description: list[str] = []
    params: dict[str, str] = {}
    section: str | None = None
    current: str | None = None
    base_indent: int | None = None
    for line in lines:
        stripped = line.strip()
        header = _SECTION.match(line)
        if header and header.group(1).lower() in _ARG_SECTIONS | _OTHER_SECTIONS:
            section = header.group(1).lower()
            current, base_indent = None, None
            continue
        if section is None:
            description.append(line)
            continue
        if section not in _ARG_SECTIONS or not stripped:
            continue
        indent = len(line) - len(line.lstrip())
        if base_indent is None:
            base_indent = indent
        match = _ARG_LINE.match(stripped)
        if indent <= base_indent and match:
            current = match.group(1)
            params[current] = match.group(2).strip()
        elif current is not None:
            params[current] = f"{params[current]} {stripped}".strip()
    return Docstring("\n".join(description).strip(), params)


def arguments_model(
    fn: Callable[..., Any],
    *,
    name: str,
    docstring: Docstring,
    skip: frozenset[str] = frozenset(),
) -> type[BaseModel]:
    """A pydantic model of ``fn``'s parameters (descriptions from the docstring).

    Raises:
        ConfigurationError: ``fn`` takes ``*args``/``**kwargs`` or positional-only parameters,
            or a parameter name pydantic cannot hold.
    """
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"cannot read the signature of tool {name!r}: {exc}") from exc
    target: Any = inspect.unwrap(fn)
    while isinstance(target, functools.partial):
        target = target.func
    if not inspect.isroutine(target) and hasattr(target, "__call__"):  # noqa: B004
        target = target.__call__
    try:
        hints = get_type_hints(target, include_extras=True)
    except Exception:  # unresolvable forward references: fall back to the raw annotations
        hints = {}
    fields: dict[str, Any] = {}
    for pname, param in signature.parameters.items():
        if pname in skip:
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise ConfigurationError(
                f"tool {name!r}: parameter {pname!r} is *args/**kwargs; a tool takes named "
                "parameters only"
            )
        if param.kind is param.POSITIONAL_ONLY:
            raise ConfigurationError(
                f"tool {name!r}: parameter {pname!r} is positional-only; a tool takes named "
                "parameters only"
            )
        if pname.startswith("_"):
            raise ConfigurationError(
                f"tool {name!r}: parameter {pname!r} starts with '_', which a JSON schema "
                "field cannot; rename it"
            )
        annotation = hints.get(pname, param.annotation)
        if annotation is inspect.Parameter.empty:
            annotation = Any
        description = docstring.params.get(pname)
        default = param.default
        if isinstance(default, FieldInfo):
            info = default
            if description and info.description is None:
                info.description = description
        elif default is inspect.Parameter.empty:
            info = Field(..., description=description)
        else:
            info = Field(default, description=description)
        fields[pname] = (annotation, info)
    model_name = "".join(part.capitalize() for part in re.split(r"[^A-Za-z0-9]", name)) or "Tool"
    try:
        return create_model(
            f"{model_name}Arguments",
            __config__=ConfigDict(extra="forbid", arbitrary_types_allowed=False),
            **fields,
        )
    except Exception as exc:
        raise ConfigurationError(
            f"tool {name!r}: cannot build a schema from its signature: {exc}"
        ) from exc


# Keys whose values are data, not schemas: never rewritten.
_VALUES = frozenset({"default", "enum", "const", "examples", "example"})


def clean_schema(schema: dict[str, Any]) -> dict[str, Any]:
    """Drop the auto-generated ``title`` keys pydantic adds (noise for a model's prompt).

    A *property* named ``title`` is kept: it is a dict under ``properties``, not a string.
    """

    def walk(node: Any) -> Any:
        if isinstance(node, dict):
            return {
                k: v if k in _VALUES else walk(v)
                for k, v in node.items()
                if not (k == "title" and isinstance(v, str))
            }
        if isinstance(node, list):
            return [walk(v) for v in node]
        return node

    out: dict[str, Any] = walk(schema)
    return out
