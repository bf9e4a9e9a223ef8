"""Schema validity: the answer holds JSON that validates against a pydantic model or JSON schema."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from .._errors import ConfigurationError, MissingExtraError
from .._output import find_json
from .._types import ChatRequest, JsonValue
from ._base import Candidate
from ._scorer import CandidateScorer, Score

__all__ = ["SchemaValid", "extract_json"]


def extract_json(text: str) -> JsonValue:
    """The JSON value in ``text``: the whole text, else a fenced code block, else the first
    ``{...}`` or ``[...]`` that parses.

    Raises:
        ValueError: no JSON found.
    """
    return find_json(text, empty="empty answer")


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SchemaValid(CandidateScorer):
    """1 when the answer's JSON validates, else 0 with the first validation error.

    The JSON is found by `extract_json` (code fences and surrounding prose are fine).

    Args:
        schema: a pydantic model class, or a JSON schema (dict; validated with ``jsonschema``,
            extra ``schema``). None: the request's ``response_format`` JSON schema, or, when it
            has none, any JSON value passes.
    """

    def __init__(
        self, schema: type[BaseModel] | Mapping[str, Any] | None = None, *, name: str = "schema"
    ) -> None:
        self.model: type[BaseModel] | None = None
        self.json_schema: dict[str, Any] | None = None
        if isinstance(schema, type) and issubclass(schema, BaseModel):
            self.model = schema
        elif isinstance(schema, Mapping):
            self.json_schema = dict(schema)
            self._validator(self.json_schema)  # fail at construction on a bad schema
        elif schema is not None:
            raise ConfigurationError(
                f"schema must be a pydantic model class or a JSON schema dict, got {schema!r}"
            )
        self.name = name
        self._validators: dict[str, Any] = {}

    @staticmethod
    def _validator(schema: dict[str, Any]) -> Any:
        try:
            import jsonschema
        except ImportError as exc:
            raise MissingExtraError(
                "jsonschema", "schema", reason="needed to validate against a JSON schema"
            ) from exc
        cls = jsonschema.validators.validator_for(schema)
        try:
            cls.check_schema(schema)
        except jsonschema.SchemaError as exc:
            raise ConfigurationError(f"invalid JSON schema: {exc.message}") from exc
        return cls(schema)

    def _schema_for(self, request: ChatRequest) -> dict[str, Any] | None:
        if self.json_schema is not None:
            return self.json_schema
        fmt = request.response_format
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema:
            return dict(fmt.json_schema)
        return None

    def score_one(self, request: ChatRequest, candidate: Candidate) -> Score:
        try:
            value = extract_json(candidate.text)
        except ValueError as exc:
            return Score(0.0, str(exc))
        if self.model is not None:
            try:
                self.model.model_validate(value)
            except ValidationError as exc:
                err = exc.errors()[0]
                where = ".".join(str(p) for p in err["loc"]) or "value"
                return Score(0.0, _short(f"{where}: {err['msg']}"))
            return Score(1.0, f"valid {self.model.__name__}")
        schema = self._schema_for(request)
        if schema is None:
            return Score(1.0, "valid JSON")
        key = json.dumps(schema, sort_keys=True)
        validator = self._validators.get(key)
        if validator is None:
            validator = self._validators[key] = self._validator(schema)
        import jsonschema

        error = jsonschema.exceptions.best_match(validator.iter_errors(value))
        if error is not None:
            where = ".".join(str(p) for p in error.absolute_path) or "value"
            return Score(0.0, _short(f"{where}: {error.message}"))
        return Score(1.0, "valid against the schema")
