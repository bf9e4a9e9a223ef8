"""genfan and genfan-providers as two distributions: what the wheels hold, and what users see.

Nothing installs a top-level ``providers`` package (a user's own must not clash with ours),
``import genfan`` loads no provider code, and each backend has one concurrency cap.
"""

from __future__ import annotations

import configparser
import os
import subprocess
import sys
import textwrap
import zipfile
from collections.abc import Iterator
from pathlib import Path

import anyio
import pytest

from genfan import ChatRequest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, zipfile.ZipFile]]:
    """Both wheels, built once from the checkout (no build isolation: a few seconds, offline)."""
    pytest.importorskip("hatchling", reason="the dev extra's hatchling builds the wheels")
    out = tmp_path_factory.mktemp("wheels")
    pip = ["pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check"]
    subprocess.run(
        [sys.executable, "-m", *pip, "-q", "-w", str(out), ".", "./providers"],
        cwd=ROOT,
        check=True,
        capture_output=True,
        timeout=120,
    )
    built = {p.name.split("-")[0]: zipfile.ZipFile(p) for p in out.glob("*.whl")}
    assert sorted(built) == ["genfan", "genfan_providers"]
    yield built
    for wheel in built.values():
        wheel.close()


def test_no_wheel_installs_a_top_level_providers_package(
    wheels: dict[str, zipfile.ZipFile],
) -> None:
    for wheel in wheels.values():
        tops = {name.split("/")[0] for name in wheel.namelist()}
        assert "providers" not in tops, wheel.filename
    genfan_tops = {name.split("/")[0] for name in wheels["genfan"].namelist()}
    assert "genfan_providers" not in genfan_tops
    assert not any(name.startswith("genfan/local/") for name in wheels["genfan"].namelist())


def test_the_providers_wheel_is_typed_and_registers_the_three_backends(
    wheels: dict[str, zipfile.ZipFile],
) -> None:
    wheel = wheels["genfan_providers"]
    names = set(wheel.namelist())
    assert "genfan_providers/py.typed" in names
    assert "genfan_providers/vllm/__init__.py" in names  # the local engine, all in one package
    [entry_points] = [n for n in names if n.endswith(".dist-info/entry_points.txt")]
    parser = configparser.ConfigParser()
    parser.read_string(wheel.read(entry_points).decode())
    assert dict(parser["genfan.backends"]) == {
        "openai": "genfan_providers.openai:OpenAIBackend",
        "anthropic": "genfan_providers.anthropic:AnthropicBackend",
        "vllm": "genfan_providers.vllm:VLLMBackend",
    }


def test_a_users_own_providers_package_does_not_clash(tmp_path: Path) -> None:
    """A project with its own top-level ``providers`` package, first on sys.path."""
    own = tmp_path / "providers"
    own.mkdir()
    (own / "__init__.py").write_text('"""The user\'s own providers."""\n')
    (own / "openai.py").write_text("OpenAIBackend = 'the user\\'s own, not genfan\\'s'\n")
    code = textwrap.dedent(
        """
        import providers, providers.openai
        from genfan import create_backend
        backend = create_backend("openai:gpt-4o-mini", api_key="k", guards=False)
        print(type(backend).__module__, type(backend).__name__, backend.name)
        print(providers.openai.OpenAIBackend)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "genfan_providers.openai OpenAIBackend openai:gpt-4o-mini",
        "the user's own, not genfan's",
    ]


def test_import_genfan_loads_no_provider_code() -> None:
    code = (
        "import sys, genfan; print(sorted(m for m in sys.modules "
        "if m.split('.')[0] in ('genfan_providers', 'providers', 'vllm', 'httpx')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_the_local_engine_has_one_import_path() -> None:
    import types

    import genfan_providers.vllm as local

    for name in local.__all__:
        value = getattr(local, name)
        if isinstance(value, type | types.FunctionType):
            assert value.__module__ == "genfan_providers.vllm", name


# -- one concurrency cap per backend -----------------------------------------------------------


@pytest.mark.anyio
async def test_the_guards_bulkhead_is_the_http_backends_one_cap() -> None:
    from genfan_providers.openai import OpenAIBackend

    from genfan.resilience import BulkheadPolicy, guard
    from genfan.testserver import FakeLLMServer

    with FakeLLMServer() as srv:
        srv.set_latency(1.5)  # long enough that every call is sent before one is answered
        backend = OpenAIBackend("m", base_url=srv.url, api_key="k")
        assert backend.max_concurrency is None
        wide = BulkheadPolicy(max_concurrent=80, max_queued=0)
        async with guard(backend, bulkhead=wide, retry=None) as guarded:
            async with anyio.create_task_group() as tg:
                for i in range(80):
                    tg.start_soon(guarded.complete, ChatRequest.from_prompt(f"p{i}"))
            # More in flight than a cap under the bulkhead would let through (it was 64), on
            # pools of 4 connections, opened as the load grew.
            assert srv.max_in_flight > 64
            assert len(backend.clients) == 80 // 4
        assert srv.connections_opened <= 80

        # The default bulkhead (1,000 at once) is the one cap: 96 calls are all in flight.
        srv.max_in_flight = 0
        backend = OpenAIBackend("m", base_url=srv.url, api_key="k")
        async with guard(backend, retry=None) as guarded:
            async with anyio.create_task_group() as tg:
                for i in range(96):
                    tg.start_soon(guarded.complete, ChatRequest.from_prompt(f"d{i}"))
        assert srv.max_in_flight == 96

        # A bulkhead of 64: the pools hold what it lets through, never more.
        opened, srv.max_in_flight = srv.connections_opened, 0
        backend = OpenAIBackend("m", base_url=srv.url, api_key="k")
        narrow = BulkheadPolicy(max_concurrent=64)
        async with guard(backend, bulkhead=narrow, retry=None) as guarded:
            async with anyio.create_task_group() as tg:
                for i in range(96):
                    tg.start_soon(guarded.complete, ChatRequest.from_prompt(f"q{i}"))
            assert len(backend.clients) <= 64 // 4
        assert srv.max_in_flight <= 64
        assert srv.connections_opened - opened <= 64
