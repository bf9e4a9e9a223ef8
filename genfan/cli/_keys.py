"""``genfan keys``: the gateway's virtual API keys (create, list, revoke).

The store is the one ``genfan serve`` uses: ``--db URL``, else ``keys`` (or ``keys_env``) in the
``[serve]`` table of ``--config``.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import anyio
import typer

from .._errors import GenfanError

if TYPE_CHECKING:
    from ..serve import KeyStore

keys_app = typer.Typer(
    name="keys",
    help="Create, list and revoke the gateway's virtual API keys.",
    no_args_is_help=True,
    add_completion=False,
)

ConfigOpt = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="genfan.toml whose [serve] table names the key store."),
]
DbOpt = Annotated[
    str | None,
    typer.Option("--db", help="Key store URL: sqlite:///keys.db or postgresql://host/db."),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print JSON for scripts.")]


def _fail(message: str) -> typer.Exit:
    typer.echo(f"error: {message}", err=True)
    return typer.Exit(2)


def _store(db: str | None, config: Path | None) -> KeyStore:
    from ..serve import KeyStore, load_gateway_config

    if db:
        return KeyStore(db)
    path = config if config is not None else Path("genfan.toml")
    if config is None and not path.exists():
        raise _fail("no key store: pass --db sqlite:///keys.db, or --config genfan.toml")
    _, settings = load_gateway_config(path)
    url = settings.keys_url()
    if not url:
        raise _fail(f"{path} has no key store: set keys = 'sqlite:///keys.db' in [serve]")
    return KeyStore(url)


def _run(db: str | None, config: Path | None, fn: Any) -> Any:
    async def main() -> Any:
        async with _store(db, config) as store:
            return await fn(store)

    try:
        return anyio.run(main)
    except GenfanError as exc:
        raise _fail(str(exc).replace("\n", "; ")) from None


def _when(ts: float | None) -> str:
    return "-" if ts is None else datetime.fromtimestamp(ts, UTC).strftime("%Y-%m-%d %H:%M")


@keys_app.command("create")
def create(
    name: Annotated[str, typer.Argument(help="A unique name for the key.")],
    models: Annotated[
        list[str] | None, typer.Option("--model", "-m", help="A model it may call (repeat).")
    ] = None,
    rpm: Annotated[int | None, typer.Option("--rpm", help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option("--tpm", help="Tokens per minute.")] = None,
    budget: Annotated[
        float | None, typer.Option("--budget", help="USD it may spend per --budget-period.")
    ] = None,
    budget_period: Annotated[
        str, typer.Option("--budget-period", help="total (default), hour, day, week or month.")
    ] = "total",
    db: DbOpt = None,
    config: ConfigOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Make a key; it is printed once (only its hash is stored)."""
    secret, key = _run(
        db,
        config,
        lambda s: s.create(
            name,
            models=models or None,
            rpm=rpm,
            tpm=tpm,
            budget_usd=budget,
            budget_period=budget_period,
        ),
    )
    if as_json:
        typer.echo(json.dumps({"key": secret, "id": key.id, "name": key.name}))
    else:
        typer.echo(secret)
        typer.echo(f"created key {key.name!r} (id {key.id}); it is shown only now", err=True)


@keys_app.command("list")
def list_keys(
    db: DbOpt = None,
    config: ConfigOpt = None,
    all_keys: Annotated[bool, typer.Option("--all", help="Include revoked keys.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """The keys (never their secrets), with limits and spend."""
    keys = _run(db, config, lambda s: s.list(include_revoked=all_keys))
    if as_json:
        typer.echo(
            json.dumps(
                [
                    {
                        "id": k.id,
                        "name": k.name,
                        "models": list(k.models) if k.models is not None else None,
                        "rpm": k.rpm,
                        "tpm": k.tpm,
                        "budget_usd": k.budget_usd,
                        "budget_period": k.budget_period,
                        "spent_usd": k.spent_usd,
                        "created": k.created,
                        "revoked": k.revoked,
                    }
                    for k in keys
                ]
            )
        )
        return
    typer.echo(
        f"{'id':<12}  {'name':<20} {'models':<20} {'rpm':>6} {'tpm':>8} {'spent/budget $':>18}  revoked"
    )
    for k in keys:
        models = ",".join(k.models) if k.models is not None else "*"
        budget = f"{k.spent_usd:.4f}/" + (
            f"{k.budget_usd:.2f}" if k.budget_usd is not None else "-"
        )
        typer.echo(
            f"{k.id:<12}  {k.name:<20} {models:<20} {k.rpm or '-':>6} {k.tpm or '-':>8} "
            f"{budget:>18}  {_when(k.revoked)}"
        )


@keys_app.command("revoke")
def revoke(
    key: Annotated[str, typer.Argument(help="The key's id or name.")],
    db: DbOpt = None,
    config: ConfigOpt = None,
) -> None:
    """Revoke a key (replicas stop taking it within serve.key_cache_seconds)."""
    revoked = _run(db, config, lambda s: s.revoke(key))
    typer.echo(f"revoked key {revoked.name!r} (id {revoked.id})")
