"""``genfan ask``: fan one prompt out and show every candidate side by side."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer

from .._errors import AllBackendsFailedError, GenfanError

DEFAULT_CONFIG = Path("genfan.toml")


def ask(
    prompt: Annotated[str, typer.Argument(help="The prompt to fan out.")],
    config: Annotated[
        Path | None,
        typer.Option("--config", "-c", help="TOML config file (default ./genfan.toml)."),
    ] = None,
    backend: Annotated[
        list[str] | None,
        typer.Option(
            "--backend",
            "-b",
            help="A backend name from the config, or a spec like openai:gpt-4o-mini. Repeatable.",
        ),
    ] = None,
    mode: Annotated[str | None, typer.Option(help="all | first | quorum")] = None,
    quorum: Annotated[int | None, typer.Option(help="k for --mode quorum.")] = None,
    deadline: Annotated[float | None, typer.Option(help="Seconds for the whole fan-out.")] = None,
    early_exit: Annotated[
        int | None,
        typer.Option(help="Stop once K answers agree (majority-vote key); cancel the rest."),
    ] = None,
    select: Annotated[
        str | None,
        typer.Option("--select", "-s", help="Selector: first, vote, consensus, judge..."),
    ] = None,
    system: Annotated[str | None, typer.Option(help="System prompt for every backend.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Max tokens per answer.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Fan PROMPT out to the configured backends and show the candidates and the chosen answer."""
    try:
        fan = _build(config, backend or [], mode, quorum, deadline, select, early_exit)
        result = anyio.run(_run, fan, prompt, system, max_tokens)
    except AllBackendsFailedError as exc:
        if as_json:
            print(json.dumps({"error": str(exc), "errors": [repr(e) for e in exc.exceptions]}))
        else:
            typer.echo(f"error: {exc}", err=True)
            for e in exc.exceptions:
                typer.echo(f"  {e}", err=True)
        raise typer.Exit(2) from None
    except GenfanError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None
    if as_json:
        print(json.dumps(result_to_json(result), indent=2))
    else:
        _print_table(result)


def _build(
    config: Path | None,
    backends: list[str],
    mode: str | None,
    quorum: int | None,
    deadline: float | None,
    select: str | None,
    early_exit: int | None = None,
) -> Any:
    from .._config import GenfanConfig, load_config
    from .._errors import ConfigurationError

    path = config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    cfg = load_config(path) if path is not None else GenfanConfig()
    specs = [b for b in backends if ":" in b and b not in cfg.backends]
    names = [b for b in backends if b not in specs]
    if not cfg.backends and not specs:
        raise ConfigurationError(
            "no backends: pass --config genfan.toml or --backend provider:model"
        )
    if specs:
        from .._config import BackendConfig

        extra = {}
        for i, spec in enumerate(specs):
            kind, _, model = spec.partition(":")
            extra[spec if spec not in extra else f"{spec}#{i}"] = BackendConfig(
                type=kind, model=model or None
            )
        cfg = cfg.model_copy(update={"backends": {**cfg.backends, **extra}})
        names = names + list(extra)
    return cfg.build_fanout(
        backends=names or None,
        select=select,
        mode=mode,
        quorum=quorum,
        deadline=deadline,
        early_exit=early_exit,
    )


async def _run(fan: Any, prompt: str, system: str | None, max_tokens: int | None) -> Any:
    from .._types import ChatRequest

    request = ChatRequest.from_prompt(prompt, system=system, max_tokens=max_tokens)
    async with fan:
        return await fan.run(request)


def result_to_json(result: Any) -> dict[str, Any]:
    """A JSON-able view of a fan-out result."""
    chosen = result.selection.chosen
    return {
        "request_id": result.request_id,
        "chosen": None if chosen is None else result.candidates[chosen].backend,
        "text": result.text if chosen is not None else None,
        "explanation": result.selection.explanation,
        "elapsed": round(result.elapsed, 4),
        "deadline_hit": result.deadline_hit,
        "usage": {
            "input_tokens": result.usage.input_tokens,
            "output_tokens": result.usage.output_tokens,
            "cost": result.usage.cost,
        },
        "candidates": [
            {
                "backend": c.backend,
                "status": c.status,
                "latency": round(c.latency, 4),
                "score": result.selection.scores.get(c.index),
                "text": c.text if c.ok else None,
                "error": None
                if c.error is None
                else f"{type(c.error).__name__}: {c.error.message}",
                "output_tokens": c.completion.usage.output_tokens if c.completion else None,
            }
            for c in result.candidates
        ],
    }


def _print_table(result: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(file=sys.stdout)
    table = Table(title=f"genfan: {len(result.candidates)} candidates", show_lines=True)
    for col in ("", "backend", "status", "latency", "tokens", "score", "answer"):
        table.add_column(col, overflow="fold")
    chosen = result.selection.chosen
    for c in result.candidates:
        mark = "★" if c.index == chosen else ""
        tokens = (
            f"{c.completion.usage.input_tokens}/{c.completion.usage.output_tokens}"
            if c.completion
            else "-"
        )
        score = result.selection.scores.get(c.index)
        answer = (
            c.text.strip()
            if c.ok
            else f"[red]{type(c.error).__name__}[/]: {c.error.message if c.error else ''}"
        )
        table.add_row(
            mark,
            c.backend,
            c.status,
            f"{c.latency * 1000:.0f} ms",
            tokens,
            "-" if score is None else f"{score:.2f}",
            answer,
        )
    console.print(table)
    if chosen is not None:
        console.print(
            f"[bold]chosen[/]: {result.candidates[chosen].backend} — {result.selection.explanation}"
        )
        console.print(result.text.strip())
