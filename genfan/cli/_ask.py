"""``genfan ask``: fan one prompt out and show every candidate side by side.

Every backend is made ready (``warm()``: HTTP clients built, a local engine started) before the
fan-out's clock starts, so a one-off start-up counts neither against ``--deadline`` nor in the
latency column; a start-up that takes a while gets a line of its own (always, with
``--verbose``). Engines' own warnings (Python warnings, vLLM's and torch's console logs) are
hidden unless ``--verbose``.

Exit status: 0 an answer was chosen; 1 none was chosen (the filters rejected every answer) or
the judge failed; 2 a usage or configuration error, or every backend failed.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import anyio
import typer

from .._errors import AllBackendsFailedError, GenfanError
from ._progress import VERBOSE_KEY, StepsDisplay

DEFAULT_CONFIG = Path("genfan.toml")
#: A start-up at least this long (seconds) gets its own line on stderr.
SLOW_START = 1.0
#: From this many columns up, the answers are the table's last column.
WIDE = 110


def ask(
    ctx: typer.Context,
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
        typer.Option(
            help="Stop once K answers agree (majority-vote key), cancel the rest, and choose "
            "among the answers that agree."
        ),
    ] = None,
    select: Annotated[
        str | None,
        typer.Option(
            "--select",
            "-s",
            help="Selector: auto (default), first, vote, consensus, judge, schema.",
        ),
    ] = None,
    judge: Annotated[
        str | None,
        typer.Option(
            help="The judge of --select judge (implied): a backend name from the config, or a "
            "spec like openai:gpt-4o-mini."
        ),
    ] = None,
    system: Annotated[str | None, typer.Option(help="System prompt for every backend.")] = None,
    max_tokens: Annotated[int | None, typer.Option(help="Max tokens per answer.")] = None,
    max_cost: Annotated[
        float | None,
        typer.Option(
            help="USD cap on the fan-out: calls whose estimated cost would pass it are not "
            "started, and running ones are cancelled once the spend passes it."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")] = False,
) -> None:
    """Fan PROMPT out to the configured backends and show the candidates and the chosen answer.

    Exit status: 0 an answer was chosen, 1 none was chosen or the judge failed, 2 a usage or
    configuration error or every backend failed.
    """
    verbose = bool(ctx.meta.get(VERBOSE_KEY))
    _check_flags(
        quorum=quorum,
        deadline=deadline,
        early_exit=early_exit,
        max_tokens=max_tokens,
        max_cost=max_cost,
    )
    try:
        fan = _build(
            config, backend or [], mode, quorum, deadline, select, early_exit, judge, max_cost
        )
        with _engine_output(verbose):
            result, ready = anyio.run(_run, fan, prompt, system, max_tokens, verbose)
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
    problem = _problem(fan, result)
    if as_json:
        data = result_to_json(result)
        data["ready_seconds"] = round(ready, 4)
        if problem:
            data["error"] = problem
        print(json.dumps(data, indent=2))
    else:
        _print_table(result)
        if problem:
            typer.echo(f"error: {problem}", err=True)
    if problem:
        raise typer.Exit(1)


def _check_flags(**flags: float | None) -> None:
    """One line naming the flag and exit code 2 for a value no fan-out could use."""
    rules: dict[str, tuple[Callable[[float], bool], str]] = {
        "quorum": (lambda v: v >= 1, "at least 1"),
        "early_exit": (lambda v: v >= 1, "at least 1 (answers that agree)"),
        "max_tokens": (lambda v: v >= 1, "at least 1"),
        "deadline": (lambda v: v > 0 and math.isfinite(v), "a positive number of seconds"),
        "max_cost": (lambda v: v >= 0 and math.isfinite(v), "a number of USD >= 0"),
    }
    for name, value in flags.items():
        ok, what = rules[name]
        if value is not None and not ok(value):
            flag = "--" + name.replace("_", "-")
            typer.echo(f"error: {flag} must be {what}, got {value:g}", err=True)
            raise typer.Exit(2)


def _build(
    config: Path | None,
    backends: list[str],
    mode: str | None,
    quorum: int | None,
    deadline: float | None,
    select: str | None,
    early_exit: int | None = None,
    judge: str | None = None,
    max_cost: float | None = None,
) -> Any:
    from .._config import GenfanConfig, load_config
    from .._errors import ConfigurationError

    path = config or (DEFAULT_CONFIG if DEFAULT_CONFIG.exists() else None)
    cfg = load_config(path) if path is not None else GenfanConfig()
    specs = [b for b in backends if ":" in b and b not in cfg.backends]
    names = [b for b in backends if b not in specs]
    if not cfg.backends and not specs:
        if names:  # a name, but no config to look it up in
            raise ConfigurationError(
                f"--backend {names[0]}: no config file names it; pass --config genfan.toml, "
                "or a provider:model such as openai:gpt-4o-mini"
            )
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
        judge=judge,
        max_cost=max_cost,
    )


@contextmanager
def _engine_output(verbose: bool) -> Iterator[None]:
    """Hide the engines' own warnings (Python warnings, vLLM's and torch's console logs, in this
    process and in the engine processes it starts) unless ``verbose``; a variable the user set
    is left alone. The environment is put back afterwards."""
    wanted = (
        {"VLLM_LOGGING_LEVEL": "INFO"}
        if verbose
        else {
            "PYTHONWARNINGS": "ignore",
            "VLLM_LOGGING_LEVEL": "ERROR",
            "TRANSFORMERS_VERBOSITY": "error",
            "TORCH_CPP_LOG_LEVEL": "ERROR",
            # torch's own Python loggers ("Triton not available" in the engine's processes)
            "TORCH_LOGS": "-torch",
        }
    )
    added = [key for key in wanted if key not in os.environ]
    for key in added:
        os.environ[key] = wanted[key]
    try:
        with warnings.catch_warnings():
            if not verbose:
                warnings.simplefilter("ignore")
            yield
    finally:
        for key in added:
            os.environ.pop(key, None)


async def _run(
    fan: Any, prompt: str, system: str | None, max_tokens: int | None, verbose: bool
) -> tuple[Any, float]:
    """The fan-out's result, and the seconds its backends took to get ready (not in it)."""
    from .._types import ChatRequest

    request = ChatRequest.from_prompt(prompt, system=system, max_tokens=max_tokens)
    async with fan:
        with StepsDisplay() as display:
            with display.spinning("getting the backends ready"):
                ready, slowest = await _warm(fan)
            if verbose or ready >= SLOW_START:
                display(
                    f"backends ready in {ready:.1f}s (slowest: {slowest}); the start-up is "
                    "not counted in the latency below"
                )
        return await fan.run(request), ready


def _backends_in(root: Any) -> list[Any]:
    """``root`` and every backend inside it: guards' inner backends, pools' replicas,
    fallbacks' members, fan-outs' targets."""
    found: list[Any] = []
    seen: set[int] = set()
    queue = [root]  # breadth first, so targets come in the config's order
    while queue:
        b = queue.pop(0)
        if b is None or id(b) in seen:
            continue
        seen.add(id(b))
        found.append(b)
        queue += [getattr(b, "provider", None), getattr(b, "inner", None)]
        for attr in ("replicas", "backends"):
            queue += list(getattr(b, attr, None) or ())
        queue += [t.backend for t in getattr(b, "targets", None) or ()]
    return found


async def _warm(fan: Any) -> tuple[float, str]:
    """Warm every backend of ``fan`` at once; the seconds it took, and the slowest one's name."""
    from .. import telemetry

    seconds: dict[str, float] = {}

    async def one(backend: Any) -> None:
        start = time.perf_counter()
        try:
            await backend.warm()
        except Exception as exc:  # the fan-out reports the backend's failure as a candidate's
            telemetry.event(
                "backend_warm_failed", level="info", backend=backend.name, error=repr(exc)
            )
        seconds[backend.name] = time.perf_counter() - start

    # The first backend warms alone: backends that share an engine (several sampling settings
    # of one local model) join the one it starts, and it is the one whose progress the config
    # usually asks to see; the others then warm at once.
    start = time.perf_counter()
    backends = [b for b in _backends_in(fan) if b is not fan and callable(getattr(b, "warm", None))]
    if backends:
        await one(backends[0])
    async with anyio.create_task_group() as tg:
        for b in backends[1:]:
            tg.start_soon(one, b)
    slowest = max(seconds, key=lambda name: seconds[name]) if seconds else "-"
    return time.perf_counter() - start, slowest


def _judges(fan: Any) -> list[Any]:
    from ..select import LLMJudge

    return [s for s, _ in getattr(fan.selector, "scorers", ()) if isinstance(s, LLMJudge)]


def _problem(fan: Any, result: Any) -> str | None:
    """Why the answer shown cannot be trusted as chosen (exit code 1), or ``None``."""
    for judge in _judges(fan):
        stats = judge.statistics()
        if stats.failed:
            return (
                f"the judge {judge.judge.name} failed {stats.failed} of its {stats.calls} "
                f"calls: {judge.last_error}; fix the judge (--judge, or fanout.select.judge "
                "in the config) or choose another --select"
            )
    if result.selection.chosen is None:
        why = f"no answer was chosen: {result.selection.explanation}"
        if result.selection.rejected:
            why += "; each answer's reason is under it (rejected: ...)"
        return why
    return None


def _cost(value: float) -> str:
    if value >= 0.01:
        return f"${value:.2f}"
    return f"${value:.6f}" if value >= 0.000001 else "<$0.000001"


def result_to_json(result: Any) -> dict[str, Any]:
    """A JSON-able view of a fan-out result."""
    chosen = result.selection.chosen
    return {
        "request_id": result.request_id,
        "chosen": None if chosen is None else result.candidates[chosen].backend,
        "text": result.text if chosen is not None else None,
        # the chosen answer validated into the fan-out's output_type, as JSON (else null)
        "output": result.dump_output() if hasattr(result, "dump_output") else None,
        "explanation": result.selection.explanation,
        "elapsed": round(result.elapsed, 4),
        "deadline_hit": result.deadline_hit,
        "usage": {
            "input_tokens": result.usage.input_tokens,
            "output_tokens": result.usage.output_tokens,
            "cache_read_tokens": result.usage.cache_read_tokens,
            "cache_write_tokens": result.usage.cache_write_tokens,
            "reasoning_tokens": result.usage.reasoning_tokens,
            "cost": result.usage.cost,
        },
        "max_cost": getattr(result, "max_cost", None),
        # the candidates max_cost cut: skipped before they started, or cancelled
        "cut": [
            {"backend": c.backend, "action": c.action, "reason": c.reason, "estimate": c.estimate}
            for c in getattr(result, "cut", ())
        ],
        "candidates": [
            {
                "backend": c.backend,
                "status": c.status,
                "latency": round(c.latency, 4),
                "score": result.selection.scores.get(c.index),
                "reason": result.selection.reasons.get(c.index),
                "text": c.text if c.ok else None,
                "error": None
                if c.error is None
                else f"{type(c.error).__name__}: {c.error.message}",
                "input_tokens": c.completion.usage.input_tokens if c.completion else None,
                "output_tokens": c.completion.usage.output_tokens if c.completion else None,
                "cost": c.completion.usage.cost if c.completion else None,
            }
            for c in result.candidates
        ],
    }


def _print_table(result: Any) -> None:
    """The candidates side by side, the totals, the choice.

    From `WIDE` columns up the answers are the table's last column; in a narrower
    terminal (80 columns) the table holds the numbers and each answer follows it at full width.
    """
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.padding import Padding
    from rich.table import Table

    console = Console(file=sys.stdout)
    wide = console.width >= WIDE
    selection = result.selection
    with_cost = any(c.completion is not None and c.completion.usage.cost is not None
                    for c in result.candidates)  # fmt: skip
    table = Table(
        title=f"genfan: {len(result.candidates)} candidates",
        box=box.SIMPLE_HEAD,
        show_lines=wide,
        pad_edge=False,
        collapse_padding=True,
    )
    table.add_column("", no_wrap=True)
    table.add_column("backend", overflow="fold", max_width=24)
    table.add_column("status", no_wrap=True)
    table.add_column("latency", justify="right", no_wrap=True)
    table.add_column("in/out tok", justify="right", no_wrap=True)
    if with_cost:
        table.add_column("cost", justify="right", no_wrap=True)
    table.add_column("score", justify="right", no_wrap=True)
    if wide:
        table.add_column("answer", overflow="fold", ratio=1)
    answers = []
    for c in result.candidates:
        usage = c.completion.usage if c.completion is not None else None
        score = selection.scores.get(c.index)
        if c.ok:
            answer = escape(c.text.strip())
        else:
            message = c.error.message if c.error is not None else ""
            answer = f"[red]{type(c.error).__name__}[/]: {escape(message)}"
        if c.index in selection.rejected:
            answer += f"\n[yellow]rejected: {escape(selection.rejected[c.index])}[/]"
        mark = "★" if c.index == selection.chosen else ""
        row = [
            mark,
            escape(c.backend),
            c.status,
            f"{c.latency * 1000:,.0f} ms",
            "-" if usage is None else f"{usage.input_tokens}/{usage.output_tokens}",
        ]
        if with_cost:
            row.append("-" if usage is None or usage.cost is None else _cost(usage.cost))
        row.append("-" if score is None else f"{score:.2f}")
        if wide:
            row.append(answer)
        table.add_row(*row)
        answers.append((f"{mark or ' '} [bold]{escape(c.backend)}[/]", answer))
    console.print(table)
    if not wide:
        for head, answer in answers:
            console.print(head, highlight=False)
            console.print(Padding(answer, (0, 0, 1, 4)), highlight=False)
    total = result.usage
    totals = f"total: {total.input_tokens}/{total.output_tokens} tok"
    if total.cost is not None:
        totals += f", {_cost(total.cost)}"
    totals += f", {result.elapsed:.2f}s" + (" (deadline hit)" if result.deadline_hit else "")
    console.print(totals, highlight=False)
    cut = getattr(result, "cut", ())
    if cut:
        console.print(
            f"cut by max_cost (${result.max_cost:g}): "
            + ", ".join(f"{escape(c.backend)} ({c.action})" for c in cut),
            highlight=False,
        )
    if selection.chosen is not None:
        console.print(
            f"[bold]chosen[/]: {escape(result.candidates[selection.chosen].backend)} — "
            f"{escape(selection.explanation)}",
            highlight=False,
        )
        if wide:  # in a narrow terminal, the chosen answer is above (★)
            console.print(escape(result.text.strip()), highlight=False)
