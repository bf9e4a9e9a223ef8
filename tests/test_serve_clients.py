"""``genfan serve`` as users run it (a real uvicorn process), driven by clients nobody here
wrote: the official openai Python SDK, the official openai Node.js SDK, and curl. Also the
``genfan keys`` commands, and the drain on SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest

from genfan.testserver import FakeLLMServer

from ._serve_helpers import ROOT, GatewayProcess, cli, write_config
from ._services import require_service

NODE_DIR = ROOT / "tests" / "node"
HI = [{"role": "user", "content": "hi"}]
WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
]


@pytest.fixture(scope="module")
def srv() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as server:
        yield server


@pytest.fixture(scope="module")
def setup(srv: FakeLLMServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    tmp = tmp_path_factory.mktemp("gateway")
    db = tmp / "keys.db"
    config = write_config(tmp / "genfan.toml", srv.url, serve=f'keys = "sqlite:///{db}"')
    made = cli("keys", "create", "main", "--config", str(config), "--budget", "100")
    assert made.returncode == 0, made.stderr
    limited = cli("keys", "create", "limited", "--config", str(config), "--rpm", "1", "--json")
    assert limited.returncode == 0, limited.stderr
    with GatewayProcess(config) as gw:
        yield {
            "url": gw.url,
            "key": made.stdout.strip(),
            "limited": json.loads(limited.stdout)["key"],
            "config": str(config),
        }


def sdk(setup: dict[str, str], key: str | None = None) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{setup['url']}/v1", api_key=key or setup["key"], max_retries=0)


# -- the openai Python SDK ----------------------------------------------------------------------


def test_python_sdk_json_and_extension(setup: dict[str, str]) -> None:
    r = sdk(setup).chat.completions.create(model="fanout", messages=HI)  # type: ignore[arg-type]
    assert r.choices[0].message.content == "echo: hi"
    ext = (r.model_extra or {})["genfan"]
    assert ext["kind"] == "fanout" and {c["backend"] for c in ext["candidates"]} == {"a", "b"}
    assert r.usage is not None and r.usage.total_tokens > 0
    raw = sdk(setup).chat.completions.with_raw_response.create(model="a", messages=HI)  # type: ignore[arg-type]
    assert float(raw.headers["x-genfan-cost"]) > 0


def test_python_sdk_stream(setup: dict[str, str]) -> None:
    stream = sdk(setup).chat.completions.create(
        model="a",
        messages=[{"role": "user", "content": "one two"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "echo: one two"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens > 0


def test_python_sdk_tools_and_embeddings(setup: dict[str, str]) -> None:
    r = sdk(setup).chat.completions.create(
        model="a",
        messages=HI,
        tools=WEATHER,  # type: ignore[arg-type]
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )
    call = r.choices[0].message.tool_calls[0]  # type: ignore[index]
    assert r.choices[0].finish_reason == "tool_calls"
    assert call.function.name == "get_weather"  # type: ignore[union-attr]
    e = sdk(setup).embeddings.create(model="a", input=["x", "y"])  # the SDK asks for base64
    assert len(e.data) == 2 and len(e.data[0].embedding) > 0


def test_python_sdk_errors_and_429(setup: dict[str, str]) -> None:
    with pytest.raises(openai.NotFoundError) as nf:
        sdk(setup).chat.completions.create(model="nope", messages=HI)  # type: ignore[arg-type]
    assert nf.value.code == "model_not_found"
    with pytest.raises(openai.AuthenticationError):
        sdk(setup, "gf-000000000000-" + "x" * 32).models.list()
    made = cli("keys", "create", "py-limited", "--config", setup["config"], "--rpm", "1")
    limited = sdk(setup, made.stdout.strip())
    limited.chat.completions.create(model="a", messages=HI)  # type: ignore[arg-type]
    with pytest.raises(openai.RateLimitError) as rl:
        limited.chat.completions.create(model="a", messages=HI)  # type: ignore[arg-type]
    assert int(rl.value.response.headers["retry-after"]) >= 1
    assert rl.value.code == "rate_limit_exceeded"


def test_keys_cli_lists_spend_and_revokes(setup: dict[str, str]) -> None:
    listed = cli("keys", "list", "--config", setup["config"], "--json")
    assert listed.returncode == 0
    keys = {k["name"]: k for k in json.loads(listed.stdout)}
    assert keys["main"]["spent_usd"] > 0 and keys["main"]["budget_usd"] == 100
    assert setup["key"] not in listed.stdout
    extra = cli("keys", "create", "temp", "--config", setup["config"])
    gone = cli("keys", "revoke", "temp", "--config", setup["config"])
    assert gone.returncode == 0 and "revoked" in gone.stdout
    with pytest.raises(openai.AuthenticationError):
        sdk(setup, extra.stdout.strip()).models.list()


def test_keys_cli_errors_are_one_line_exit_2(setup: dict[str, str], tmp_path: Path) -> None:
    for args in (
        ("keys", "revoke", "nobody", "--config", setup["config"]),
        ("keys", "create", "main", "--config", setup["config"]),  # the name is taken
        ("keys", "create", "x", "--config", setup["config"], "--rpm", "0"),
        ("keys", "list", "--db", "mysql://host/db"),
        ("keys", "list", "--config", str(tmp_path / "missing.toml")),
    ):
        r = cli(*args)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "Traceback" not in r.stderr


def test_serve_cli_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[serve]\nprot = 8000\n[backends.a]\ntype = "fake"\n', encoding="utf-8")
    r = cli("serve", "--config", str(bad))
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "serve.prot" in r.stderr
    r = cli("serve", "--config", str(tmp_path / "none.toml"))
    assert r.returncode == 2 and "not found" in r.stderr


# -- curl -----------------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_json_and_stream(setup: dict[str, str]) -> None:
    base = [
        "curl",
        "-sS",
        "-H",
        f"authorization: Bearer {setup['key']}",
        "-H",
        "content-type: application/json",
    ]
    body = json.dumps({"model": "a", "messages": HI})
    r = subprocess.run(
        [*base, "-d", body, f"{setup['url']}/v1/chat/completions"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert json.loads(r.stdout)["choices"][0]["message"]["content"] == "echo: hi"
    body = json.dumps({"model": "a", "messages": HI, "stream": True})
    r = subprocess.run(
        [*base, "-N", "-d", body, f"{setup['url']}/v1/chat/completions"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.stdout.rstrip().endswith("data: [DONE]")
    r = subprocess.run(
        ["curl", "-sS", "-i", f"{setup['url']}/v1/models"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert r.stdout.startswith("HTTP/1.1 401") and '"code":"invalid_api_key"' in r.stdout


# -- the openai Node.js SDK -----------------------------------------------------------------------


def test_node_sdk(setup: dict[str, str]) -> None:
    node = shutil.which("node")
    installed = (NODE_DIR / "node_modules" / "openai" / "package.json").exists()
    require_service(
        "the openai Node.js SDK",
        node is not None and installed,
        "run `npm ci --prefix tests/node` (needs node >= 20)",
    )
    assert node is not None
    r = subprocess.run(
        [node, str(NODE_DIR / "gateway.mjs")],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=NODE_DIR,
        env={
            **os.environ,
            "GATEWAY_URL": f"{setup['url']}/v1",
            "GATEWAY_KEY": setup["key"],
            "GATEWAY_LIMITED_KEY": setup["limited"],
        },
    )
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["json"]["content"] == "echo: hello from node"
    assert out["json"]["kind"] == "fanout" and out["json"]["candidates"] == 2
    assert out["stream"]["text"] == "echo: stream me" and out["stream"]["usage"]["total_tokens"] > 0
    assert out["tools"] == {"finish": "tool_calls", "name": "get_weather"}
    assert out["embeddings"]["count"] == 2
    assert out["notFound"]["status"] == 404 and out["notFound"]["code"] == "model_not_found"
    assert out["badKey"]["status"] == 401 and out["badKey"]["name"] == "AuthenticationError"
    # the limited key allows 1 request a minute: the second is refused
    first, last = out["limited"]
    assert first["status"] == 0
    assert last["status"] == 429 and last["name"] == "RateLimitError"
    assert int(last["retryAfter"]) >= 1


# -- drain ----------------------------------------------------------------------------------------


def test_sigterm_drains_streams_in_flight_and_refuses_new_requests(
    srv: FakeLLMServer, tmp_path: Path
) -> None:
    srv.set_latency(1.5, model="m-slow")
    config = write_config(
        tmp_path / "genfan.toml",
        srv.url,
        extra=f'\n[backends.slow]\ntype = "openai"\nmodel = "m-slow"\nbase_url = "{srv.url}"\n'
        'api_key_env = "GF_TEST_KEY"\nenabled = false\n',
    )
    gw = GatewayProcess(config).start()
    try:
        client = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="unused", max_retries=0)
        got: dict[str, object] = {}
        before = srv.count()

        def slow_stream() -> None:
            try:
                chunks = list(
                    client.chat.completions.create(model="slow", messages=HI, stream=True)
                )
                got["text"] = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
            except Exception as exc:  # pragma: no cover - reported by the assert below
                got["error"] = exc

        t = threading.Thread(target=slow_stream)
        t.start()
        assert srv.wait_until(lambda: srv.count() > before, timeout=10)
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGTERM)
        refused = None
        for _ in range(50):  # the drain starts at once: the next request is refused
            r = httpx.post(
                f"{gw.url}/v1/chat/completions", json={"model": "a", "messages": HI}, timeout=5
            )
            if r.status_code == 503:
                refused = r
                break
        assert refused is not None and refused.json()["error"]["code"] == "draining"
        assert refused.headers["retry-after"] == "1"
        t.join(timeout=30)
        assert got.get("text") == "echo: hi", got
        assert gw.proc.wait(timeout=30) == 0
    finally:
        srv.set_latency(0.0, model="m-slow")
        gw.stop()


def test_the_same_app_under_granian(srv: FakeLLMServer, tmp_path: Path) -> None:
    config = write_config(tmp_path / "genfan.toml", srv.url)
    with GatewayProcess(config, "--server", "granian") as gw:
        r = openai.OpenAI(base_url=f"{gw.url}/v1", api_key="none", max_retries=0)
        answer = r.chat.completions.create(model="fanout", messages=HI)  # type: ignore[arg-type]
        assert answer.choices[0].message.content == "echo: hi"
    assert gw.proc is not None and gw.proc.returncode is not None
