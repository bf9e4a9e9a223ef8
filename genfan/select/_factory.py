"""Selectors by name, for the TOML config (``select = {name = "vote", ...}``) and the CLI."""

from __future__ import annotations

from typing import Any

from .._errors import ConfigurationError
from ._base import FirstSuccess, Selector

__all__ = ["SELECTOR_NAMES", "selector_from_name"]

SELECTOR_NAMES = ("auto", "first", "vote", "consensus", "judge", "schema")

_SELECT_OPTIONS = ("tie_break", "if_none_pass", "filters")


def _backend(spec: Any) -> Any:
    if isinstance(spec, str):
        if ":" not in spec:
            raise ConfigurationError(
                f"judge={spec!r} is not a 'provider:model' spec: pass a backend, or a spec like "
                "'openai:gpt-4o-mini' (a config file may also name one of its [backends.NAME])"
            )
        from .._backend import build_backend

        return build_backend(spec)
    return spec


def selector_from_name(name: str, /, **options: Any) -> Selector:
    """Build a selector from its name and options.

    Names and their options (plus ``tie_break=`` for every name but ``first``):

    * ``auto`` (the default): infers the answer's form from the request, votes on the answers
      read for it, weighted by model confidence; consensus for free text ([`AutoSelect`][genfan.select.AutoSelect]);
      ``weight=`` ``"answer"`` | ``"sequence"`` | ``"none"``, ``keep=`` (0..1];
    * ``first``: the first answer to arrive;
    * ``vote``: majority vote; ``extract=`` ``"normalize"`` | ``"number"`` | ``"words"`` |
      ``"re:<pattern>"``;
    * ``consensus``: the answer most similar to the others; ``similarity=`` ``"rouge_l"`` |
      ``"token_jaccard"`` | ``"char_ngram"``;
    * ``judge``: an LLM judge; ``judge=`` a backend or a ``"provider:model"`` spec (required),
      ``rubric=``, ``mode=`` ``"pointwise"`` | ``"pairwise"``, ``max_concurrency=``;
    * ``schema``: the first answer whose JSON validates; ``schema=`` a JSON schema dict or a
      pydantic model (default: the request's response format).

    Raises:
        ConfigurationError: unknown name or option.
    """
    from ._select import Select

    select_opts = {k: options.pop(k) for k in _SELECT_OPTIONS if k in options}
    try:
        if name == "auto":
            from ._auto import AutoSelect

            return AutoSelect(**options, **select_opts)
        if name == "first":
            if options or select_opts:
                raise TypeError(f"unexpected options {sorted({**options, **select_opts})}")
            return FirstSuccess()
        if name == "vote":
            from ._vote import MajorityVote

            return Select(scorers=[MajorityVote(**options)], **select_opts)
        if name == "consensus":
            from ._consensus import Consensus

            return Select(scorers=[Consensus(**options)], **select_opts)
        if name == "judge":
            from ._judge import LLMJudge

            if "judge" not in options:
                raise ConfigurationError(
                    "the judge selector needs judge= a backend or a 'provider:model' spec "
                    "(on the command line: --judge NAME_OR_SPEC)"
                )
            judge = _backend(options.pop("judge"))
            return Select(scorers=[LLMJudge(judge, **options)], **select_opts)
        if name == "schema":
            from ._schema import SchemaValid

            extra = list(select_opts.pop("filters", ()))  # e.g. early exit's agreement filter
            return Select(filters=[SchemaValid(**options), *extra], name="schema", **select_opts)
    except TypeError as exc:
        raise ConfigurationError(f"bad options for selector {name!r}: {exc}") from exc
    raise ConfigurationError(f"unknown selector {name!r}; available: {', '.join(SELECTOR_NAMES)}")
