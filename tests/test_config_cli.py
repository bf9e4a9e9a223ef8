"""The TOML config and the `genfan ask` command."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from genfan import (
    ChatRequest,
    ConfigurationError,
    create_backend,
    load_config,
    parse_config,
    register_backend,
)
from genfan.cli import app
from genfan.resilience import GuardedBackend
from genfan.testing import FakeBackend

GOOD = """
[fanout]
mode = "all"
deadline = 5

[backends.alpha]
type = "fake"
temperature = 0.2
system = "Be brief."
options = { replies = ["Paris."], latency = 0.02 }

[backends.beta]
type = "fake"
model = "m2"
options = { replies = ["The capital is Paris."], latency = 0.001 }

[backends.off]
type = "fake"
enabled = false
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "genfan.toml"
    p.write_text(text)
    return p


def test_good_config_builds_a_fanout(tmp_path: Path) -> None:
    cfg = load_config(write(tmp_path, GOOD))
    assert set(cfg.selected_backends()) == {"alpha", "beta"}
    fan = cfg.build_fanout()
    assert fan.names == ["alpha", "beta"] and fan.deadline == 5
    alpha = fan.targets[0]
    assert alpha.temperature == 0.2 and alpha.system == "Be brief."
    # every configured backend is guarded by default; the provider sits inside the stack
    assert isinstance(alpha.backend, GuardedBackend) and alpha.backend.name == "alpha"
    assert isinstance(alpha.backend.provider, FakeBackend)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[backends.a]\ntype = 'fake'\ntemprature = 0.3\n", "backends.a.temprature: unknown key"),
        ("[backends.a]\nmodel = 'x'\n", "backends.a.type: this key is required"),
        ("[backends.a]\ntype = 'fake'\ntemperature = 5\n", "backends.a.temperature"),
        ("[fanout]\nmode = 'fastest'\n", "fanout.mode"),
        ("[fanout]\nbackends = ['ghost']\n", "ghost"),
        ("[backends.a\ntype = 'fake'\n", "not valid TOML"),
    ],
)
def test_bad_config_names_the_key(tmp_path: Path, text: str, expected: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        load_config(write(tmp_path, text))
    assert expected in str(info.value)


def test_missing_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="--config"):
        load_config(tmp_path / "nope.toml")


def test_unknown_provider_lists_known_ones() -> None:
    cfg = parse_config({"backends": {"x": {"type": "nope"}}})
    with pytest.raises(ConfigurationError, match=r"known providers: .*fake"):
        cfg.build_fanout()


def test_register_backend_at_run_time() -> None:
    register_backend(
        "echo", lambda model=None, **kw: FakeBackend(kw.get("name", "echo"), [model or "?"])
    )
    backend = create_backend("echo:hello", name="e", guards=False)
    assert isinstance(backend, FakeBackend) and backend.name == "e"
    with pytest.raises(ConfigurationError):
        register_backend("bad:prefix", FakeBackend)
    with pytest.raises(ConfigurationError, match="provider:model"):
        create_backend("no-colon")


def test_ask_prints_a_table_with_the_chosen_answer(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        app, ["ask", "capital of France?", "-c", str(write(tmp_path, GOOD))]
    )
    assert result.exit_code == 0, result.output
    assert "alpha" in result.output and "beta" in result.output
    assert "★" in result.output and "chosen" in result.output


def test_ask_json_for_scripts(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["ask", "q", "-c", str(write(tmp_path, GOOD)), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["chosen"] == "beta" and data["text"] == "The capital is Paris."
    assert [c["backend"] for c in data["candidates"]] == ["alpha", "beta"]
    assert all(c["status"] == "ok" for c in data["candidates"])


def test_ask_with_backend_specs_and_no_config(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["ask", "q", "-b", "fake:a", "-b", "fake:b", "--json"])
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)["candidates"]) == 2


def test_ask_reports_all_failed_with_exit_code_2(tmp_path: Path) -> None:
    cfg = write(
        tmp_path,
        "[backends.a]\ntype='fake'\noptions={latency=10}\n[fanout]\ndeadline=0.05\n",
    )
    result = CliRunner().invoke(app, ["ask", "q", "-c", str(cfg)])
    assert result.exit_code == 2
    assert "all 1 backends failed" in result.output


def test_ask_without_backends_explains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["ask", "q"])
    assert result.exit_code == 2 and "--backend provider:model" in result.output


def test_genfan_script_runs_as_a_process(tmp_path: Path) -> None:
    cfg = write(tmp_path, GOOD)
    out = subprocess.run(
        [sys.executable, "-m", "genfan.cli", "ask", "q", "-c", str(cfg), "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "NO_COLOR": "1"},
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["chosen"] == "beta"


POOLED = """
[backends.r1]
type = "fake"
enabled = false
options = { replies = ["from r1"] }

[backends.r2]
type = "fake"
enabled = false
options = { replies = ["from r2"] }

[backends.replicas]
type = "pool"
members = ["r1", "r2"]
strategy = "round_robin"

[backends.safe]
type = "fallback"
members = ["r2", "r1"]
"""


def test_pool_and_fallback_from_the_file(tmp_path: Path) -> None:
    from genfan.resilience import Fallback, Pool

    cfg = load_config(write(tmp_path, POOLED))
    fan = cfg.build_fanout()
    assert fan.names == ["replicas", "safe"]
    pool, fallback = fan.targets[0].backend, fan.targets[1].backend
    assert isinstance(pool, Pool) and isinstance(fallback, Fallback)


@pytest.mark.anyio
async def test_pool_round_robins_and_fallback_moves_on() -> None:
    from genfan import BackendError
    from genfan.testing import Fail

    cfg = parse_config(
        {
            "backends": {
                "r1": {"type": "fake", "enabled": False, "options": {"replies": ["one"]}},
                "r2": {"type": "fake", "enabled": False, "options": {"replies": ["two"]}},
                "replicas": {"type": "pool", "members": ["r1", "r2"], "strategy": "round_robin"},
            }
        }
    )
    pool = cfg.build_backend("replicas")
    texts = [(await pool.complete(ChatRequest.from_prompt("q"))).text for _ in range(4)]
    assert sorted(texts) == ["one", "one", "two", "two"]

    register_backend(
        "broken",
        lambda model=None, **kw: FakeBackend(kw["name"], [Fail(error=BackendError("down"))]),
    )
    cfg2 = parse_config(
        {
            "backends": {
                "bad": {"type": "broken", "enabled": False, "guards": {"retry": False}},
                "good": {"type": "fake", "enabled": False, "options": {"replies": ["saved"]}},
                "safe": {"type": "fallback", "members": ["bad", "good"]},
            }
        }
    )
    result = await cfg2.build_fanout().run("q")
    assert result.text == "saved"


@pytest.mark.parametrize(
    ("backends", "expected"),
    [
        ({"p": {"type": "pool"}}, "needs members"),
        ({"p": {"type": "pool", "members": ["ghost"]}}, "ghost"),
        ({"p": {"type": "fake", "members": ["x"]}}, "only for type = 'pool'"),
    ],
)
def test_bad_composites_are_named(backends: dict[str, object], expected: str) -> None:
    with pytest.raises(ConfigurationError, match=expected):
        parse_config({"backends": backends})


def test_member_cycles_are_rejected() -> None:
    cfg = parse_config(
        {
            "backends": {
                "a": {"type": "pool", "members": ["b"]},
                "b": {"type": "fallback", "members": ["a"]},
            }
        }
    )
    with pytest.raises(ConfigurationError, match="cycle: a -> b -> a"):
        cfg.build_backend("a")


EARLY = """
[fanout]
select = { name = "vote", extract = "number" }
early_exit = 2

[backends.a]
type = "fake"
options = { replies = ["It is 7."], latency = 0.01 }

[backends.b]
type = "fake"
options = { replies = ["I think 9"], latency = 0.02 }

[backends.c]
type = "fake"
options = { replies = ["7"], latency = 0.03 }

[backends.slow]
type = "fake"
options = { replies = ["7"], latency = 30 }
"""


@pytest.mark.anyio
async def test_early_exit_from_the_file_stops_once_k_agree(tmp_path: Path) -> None:
    fan = load_config(write(tmp_path, EARLY)).build_fanout()
    assert fan.mode == "quorum" and fan.quorum == 2
    result = await fan.run("What is 3 + 4?")
    statuses = {c.backend: c.status for c in result.candidates}
    assert statuses == {"a": "ok", "b": "ok", "c": "ok", "slow": "cancelled"}
    assert result.quorum_met and "7" in result.text


def test_early_exit_conflicts_with_an_explicit_mode(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="early_exit"):
        load_config(
            write(tmp_path, EARLY.replace("early_exit = 2", "early_exit = 2\nmode = 'first'"))
        )


def test_ask_early_exit_option(tmp_path: Path) -> None:
    cfg = write(tmp_path, EARLY.replace("early_exit = 2\n", ""))
    result = CliRunner().invoke(app, ["ask", "3+4?", "-c", str(cfg), "--early-exit", "2", "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [c["status"] for c in data["candidates"]] == ["ok", "ok", "ok", "cancelled"]


SHARED_QUOTA = """
[rate_limit_stores.main]        # one shared quota store, built once
url_env = "GENFAN_TEST_REDIS_URL"
key_prefix = "cfg-test:"

[defaults.guards]
rate_limit_store = "main"       # every backend with a rate limit draws from it

[backends.a]
type = "fake"
enabled = false
guards = { rate_limit = { requests_per_minute = 60 } }

[backends.b]
type = "fake"
enabled = false
guards = { rate_limit = { requests_per_minute = 60, on_store_error = "raise" } }

[backends.pair]
type = "pool"
members = ["a", "b"]

[backends.plain]
type = "fake"
"""


@pytest.mark.anyio
async def test_toml_shares_one_quota_store_between_backends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("GENFAN_TEST_REDIS_URL", "redis://:pw-S3CRET@127.0.0.1:1/0")
    cfg = load_config(write(tmp_path, SHARED_QUOTA))
    fan = cfg.build_fanout()
    pool, plain = (t.backend for t in fan.targets)
    members = list(pool.replicas)  # type: ignore[attr-defined]
    limiters = [m.rate_limiter for m in members]
    assert all(isinstance(m, GuardedBackend) for m in members)
    assert limiters[0].store is limiters[1].store  # built once for the whole fan-out
    assert limiters[0].store.key_prefix == "cfg-test:"
    assert limiters[1].policy.on_store_error == "raise"
    assert isinstance(plain, GuardedBackend) and plain.rate_limiter is None
    assert "pw-S3CRET" not in repr(cfg) + repr(limiters[0].store)
    await fan.aclose()
    assert limiters[0].store._closed  # closed with the last backend that used it

    bad = SHARED_QUOTA.replace('rate_limit_store = "main"', 'rate_limit_store = "other"')
    with pytest.raises(ConfigurationError, match=r"defaults.guards.rate_limit_store names 'other'"):
        load_config(write(tmp_path, bad))
    old_way = SHARED_QUOTA.replace(
        "requests_per_minute = 60 }", 'requests_per_minute = 60, shared_env = "X" }', 1
    )
    with pytest.raises(ConfigurationError, match=r"rate_limit_stores"):
        load_config(write(tmp_path, old_way)).build_fanout()
