"""The LLM step: a prompt template filled with named inputs, sent to a backend, the answer parsed.

:class:`LLMCall` is a plain async callable of keyword inputs, so a chain runs it like any other
function step (``Chain.llm`` builds one; ``Chain.map`` can take one). With a
``response_model`` it asks the backend for JSON of that model's schema and returns a validated
instance; otherwise the answer's text.
"""

from __future__ import annotations

import inspect
import string
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel

from .._backend import Backend
from .._errors import ConfigurationError
from .._types import ChatRequest, ResponseFormat
from ._model import check_model, complete

__all__ = ["LLMCall"]


class LLMCall:
    """An LLM call as a function of named inputs: the prompt is a ``str.format`` template.

    ``LLMCall(model, "Summarise:\\n{text}")`` takes the keyword ``text``. Used by
    :meth:`Chain.llm`, and usable on its own (for instance with :meth:`Chain.map`).

    Args:
        model: a :class:`~genfan.Backend` (a :class:`~genfan.FanOut` is one).
        prompt: the template; its ``{fields}`` are the call's inputs. Or a function of the
            inputs returning the prompt or a whole :class:`~genfan.ChatRequest`.
        system: a system prompt.
        response_model: parse the answer as JSON into this pydantic model (and ask the backend
            for JSON of its schema).
        temperature: sampling temperature.
        max_tokens: output limit.
    """

    def __init__(
        self,
        model: Backend,
        prompt: str | Callable[..., str | ChatRequest],
        *,
        system: str | None = None,
        response_model: type[BaseModel] | None = None,
        temperature: float | None = None,
        max_tokens: int | None = None,
    ) -> None:
        self.model = check_model(model, what="an LLM step")
        self.prompt = prompt
        self.system = system
        self.response_model = response_model
        self.temperature = temperature
        self.max_tokens = max_tokens
        if isinstance(prompt, str):
            try:
                fields = [f for _, f, _, _ in string.Formatter().parse(prompt) if f is not None]
            except ValueError as exc:
                raise ConfigurationError(f"bad prompt template {prompt!r}: {exc}") from exc
            names: list[str] = []
            for f in fields:
                base = f.split(".", 1)[0].split("[", 1)[0]
                if not base.isidentifier():
                    raise ConfigurationError(
                        f"prompt template fields must be named, like {{text}}; got {{{f}}} in "
                        f"{prompt!r}"
                    )
                if base not in names:
                    names.append(base)
            self.__signature__ = inspect.Signature(
                [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY) for n in names]
            )
        else:
            self.__signature__ = inspect.signature(prompt)
        self.__name__ = f"llm[{self.model.name}]"

    def __repr__(self) -> str:
        return f"LLMCall({self.model.name!r})"

    def request(self, **values: Any) -> ChatRequest:
        """The request for these input values."""
        if isinstance(self.prompt, str):
            request: ChatRequest | str = self.prompt.format(**values)
        else:
            request = self.prompt(**values)
        req = ChatRequest.from_prompt(request) if isinstance(request, str) else request
        if self.system is not None:
            req = req.with_system(self.system)
        fmt = ResponseFormat.from_model(self.response_model) if self.response_model else None
        return req.with_overrides(
            temperature=self.temperature, max_tokens=self.max_tokens, response_format=fmt
        )

    async def __call__(self, **values: Any) -> Any:
        completion = await complete(self.model, self.request(**values))
        if self.response_model is not None:
            return self.response_model.model_validate_json(completion.text)
        return completion.text
