"""Docs as tests: every code block of README.md and docs/*.md runs, so no snippet can rot.

One test per block, named ``page:line`` (the line of its opening fence). What a block is
decides how it is tested; an HTML comment on the line right before the fence,
``<!-- docs-test: KIND [NAME] -->``, says what the block alone cannot:

Python (each in a subprocess, offline: ``tests/_docs_runner.py``; it must exit 0)
    no marker          a whole program, run as it is.
    ``server``         a whole program whose HTTP calls to vendors' APIs (api.openai.com, ...)
                       are answered by a ``FakeLLMServer`` on 127.0.0.1 (dummy API keys);
                       nothing listens on other local ports.
    ``with NAME``      a whole program that needs the fixture ``NAME`` (files beside it, a
                       prelude, a check afterwards, a Ctrl-C for a program that runs until
                       stopped): see ``FIXTURES``.
    ``fragment [NAME]`` a few lines of a larger program: top-level ``await`` and
                       ``async with`` allowed, completed by the fixture ``NAME`` (``server``
                       is a fixture too), all in one event loop.
    ``pytest``         a test module: pytest runs it and it must pass.
    ``engine-only``    needs the local vLLM engine: here its imports must resolve (and
                       ``pytest -m engine`` runs it for real).
TOML
    no marker          a whole config file: ``genfan.load_config`` loads it, every guards
                       table validates, ``[schedules]`` passes ``genfan.schedule.parse_schedules``
                       and every backend builds.
    ``fragment NAME``  a few tables of a config, merged over ``TOML_BASES[NAME]`` first.
Shell (``bash``/``console``; one command a line, ``\\`` continues one; ``$ `` prompts)
    ``genfan ...``     runs (through the runner: offline; with ``server`` or ``with NAME``
                       against a fake server), in a folder holding the page's config as
                       ``genfan.toml`` (its last TOML block above, or else its first: as it
                       is, or as the fixture adapts it), and must exit 0.
                       ``genfan schedule run`` and the fake server run until stopped: they
                       are started, then stopped with Ctrl-C (SIGINT), and must exit cleanly.
    ``engine-only`` / ``ray-only``: the commands need the local engine or a Ray cluster: their
                       command lines must parse and their ``--help`` work.
    ``pip install``    installs nothing: each extra it names must exist in pyproject.toml.
    ``make T``         builds nothing: ``make -n T`` must succeed.
Anything else (``text``, ``json``, no language)
    ``output NAME``    shows the output of something: the check ``OUTPUTS[NAME]`` compares it.
    ``json`` without a marker must parse (one document, or JSON Lines).
"""

from __future__ import annotations

import json
import os
import queue
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import pytest

from tests._services import port_open, require_service

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
RUNNER = ROOT / "tests" / "_docs_runner.py"
TIMEOUT = 60

# -- collecting the blocks ------------------------------------------------------------------------

_FENCE = re.compile(r"^(?P<indent> *)(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)[^`]*$")
_MARKER = re.compile(r"^\s*<!--\s*docs-test:\s*(?P<spec>.*?)\s*-->\s*$")


@dataclass(frozen=True)
class Block:
    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: tuple[str, ...]
    index: int  # position among the page's blocks

    @property
    def id(self) -> str:
        page = self.page.relative_to(ROOT) if self.page.is_relative_to(ROOT) else self.page
        return f"{page}:{self.line}"

    @property
    def kind(self) -> str:
        return self.marker[0] if self.marker else ""

    @property
    def name(self) -> str | None:
        return self.marker[1] if len(self.marker) > 1 else None


def collect(page: Path) -> list[Block]:
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        indent, fence = len(m["indent"]), m["fence"]
        j = i + 1
        while j < len(lines) and not lines[j].strip().startswith(fence):
            j += 1
        assert j < len(lines), f"{page.name}:{i + 1}: unclosed code block"
        code = "\n".join(line[indent:] for line in lines[i + 1 : j]) + "\n"
        marker: tuple[str, ...] = ()
        if i and (mm := _MARKER.match(lines[i - 1])):
            marker = tuple(mm["spec"].split())
        blocks.append(Block(page, i + 1, m["lang"].lower(), code, marker, len(blocks)))
        i = j + 1
    return blocks


BLOCKS = [b for page in PAGES for b in collect(page)]


def test_blocks_are_collected() -> None:
    assert len({b.id for b in BLOCKS}) == len(BLOCKS) > 50
    langs = {b.lang for b in BLOCKS}
    assert {"python", "toml", "bash"} <= langs


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_markers_sit_on_blocks(page: Path) -> None:
    """A marker is the line right before a fence; anywhere else it would be silently ignored."""
    lines = page.read_text(encoding="utf-8").splitlines()
    for i, line in enumerate(lines):
        if line.lstrip().startswith("<!--") and "docs-test:" in line:
            assert _MARKER.match(line), f"{page.name}:{i + 1}: not a marker: {line!r}"
            following = lines[i + 1] if i + 1 < len(lines) else ""
            assert _FENCE.match(following), f"{page.name}:{i + 1}: no code block right after"


# -- fixtures: what a block needs that it does not show -------------------------------------------


@dataclass(frozen=True)
class Fixture:
    prelude: str = ""  # Python run first, in the snippet's namespace
    epilogue: str = ""  # Python run afterwards: checks, closing what the prelude opened
    server: bool = False  # vendors' APIs answered by a FakeLLMServer
    files: Mapping[str, str] = field(default_factory=dict)  # written beside the snippet
    stop_when: str | None = None  # Ctrl-C once this Python expression holds (a program that
    # runs until stopped); it sees ``Path``, and runs in the snippet's folder
    setup: tuple[str, ...] = ()  # shell commands run before a shell block's own
    # genfan.toml for a shell block, from the page's TOML block (default: that block as it is)
    config: Callable[[str], str] | None = None
    # earlier blocks of the same page to run first, each found by a line it contains
    page_blocks: tuple[str, ...] = ()


_AGENT_TOOLS = """
from genfan.agents import Agent, tool
from genfan.testserver import TextReply, ToolCallsReply

docs_server.script("gpt-4o-mini", [
    ToolCallsReply([("get_weather", {"place": {"city": "Oslo"}}),
                    ("get_weather", {"place": {"city": "Lima"}}),
                    ("search", {"query": "news"})]),
    TextReply("Rain in Oslo, sun in Lima; the news: ..."),
])
"""

_CHAIN = '''
import anyio
from pydantic import BaseModel
from genfan import ChatRequest
from genfan.agents import tool
from genfan.testing import FunctionBackend

class Entities(BaseModel):
    people: list[str]
    year: int

async def answer(request: ChatRequest) -> str:
    await anyio.sleep(0.05)
    if request.response_format is not None:
        return Entities(people=["Kim"], year=2023).model_dump_json()
    return "one line"

llm = FunctionBackend(answer, name="llm")

@tool
async def web_search(query: str) -> list[str]:
    """Search the web."""
    return [f"{query} hit {i}" for i in range(3)]

def merge(summary: str, entities: Entities, digests: list[str]) -> str:
    return f"{summary}; {entities.people}; {len(digests)} digests"

text = "LLMCompiler runs independent function calls in parallel (Kim et al., 2023)."
'''

_SAMPLES = """
from genfan import FanOut, Target
from genfan.select import MajorityVote
from genfan.testing import FakeBackend

engine = FakeBackend("engine", ["17 * 3 = 51", "It is 51.", "51", "I think 41", "51."])
samples = [Target(backend=engine, temperature=0.7) for _ in range(9)]
"""

_SCHEDULER = """
from datetime import UTC, datetime
from genfan.schedule import CronTrigger, IntervalTrigger, Scheduler

def morning_digest() -> None: ...

scheduler = await Scheduler("sqlite:///schedules.db", process_runs=False).__aenter__()
await scheduler.add_schedule(
    morning_digest, CronTrigger(expr="0 7 * * mon-fri", timezone="Europe/Berlin"),
    id="morning-digest",
)
"""

_BATCH_FILES = {
    "prompts.jsonl": "\n".join(
        json.dumps(row)
        for row in [
            {"id": 1, "prompt": "Name a prime."},
            {"id": 2, "template": "Translate {w}.", "vars": {"w": "cat"}},
            {"id": 3, "prompt": "Name a colour.", "system": "Answer in one word."},
        ]
    )
    + "\n",
    "genfan.toml": """
[backends.gpt]
type = "openai"
model = "gpt-4o-mini"

[backends.claude]
type = "anthropic"
model = "claude-3-5-haiku-latest"
""",
}

_SCHEDULE_FILES = {
    "myapp/__init__.py": "",
    "myapp/jobs.py": """
from pathlib import Path


async def morning_digest() -> None:
    Path("digest-ran").write_text("yes")


def sweep() -> None:
    Path("sweep-ran").write_text("yes")


def cleanup(days: int) -> None:
    Path("cleanup-ran").write_text(str(days))
""",
}


def _schedules_here(toml: str) -> str:
    """The page's [schedules] with the store in a SQLite file here, and the backends it names."""
    local = re.sub(r'(?m)^store = "[^"]*"', 'store = "sqlite:///schedules.db"', toml)
    assert local != toml, "the page's [schedules] table names a store"
    return local + _BATCH_FILES["genfan.toml"]


FIXTURES: dict[str, Fixture] = {
    # vendors' APIs answered by a fake server (see tests/_docs_runner.py)
    "server": Fixture(server=True),
    # docs/agents.md: the tools of the page, a model that calls them, then answers
    "agent": Fixture(
        server=True,
        page_blocks=("async def get_weather(",),
        prelude=_AGENT_TOOLS,
        epilogue="assert result.text and len(result.tool_calls) == 3, result",
    ),
    "agent-stream": Fixture(
        server=True,
        page_blocks=("async def get_weather(",),
        prelude=_AGENT_TOOLS
        + '''
from genfan import create_backend

@tool
async def search(query: str) -> list[str]:
    """Search the news."""
    return ["Today's news"]

agent = Agent(create_backend("openai:gpt-4o-mini"), tools=[get_weather, search])
''',
        epilogue="assert result.text.startswith('Rain in Oslo'), result",
    ),
    "local-agent": Fixture(
        page_blocks=("async def get_weather(",),
        prelude="""
from genfan import ToolCall
from genfan.agents import Agent
from genfan.testing import FakeBackend, Reply

paris = '{"place": {"city": "Paris"}}'
local_model = FakeBackend("local", [
    Reply(tool_calls=(ToolCall(id="1", name="get_weather", arguments=paris),)),
    "Rain in Paris.",
])
""",
        epilogue="""
result = await agent.run("Weather in Paris?")
assert [c.name for c in result.tool_calls] == ["get_weather"] and result.text == "Rain in Paris."
assert local_model.calls[0].tool_choice == "required" and local_model.calls[1].tool_choice == "auto"
""",
    ),
    # docs/agents.md "Chains": a model, a search tool, a merge and a text
    "chain": Fixture(prelude=_CHAIN, epilogue="assert 'digests' in result[report], result"),
    # docs/fanout.md: backends made once, closed by their owner
    "ownership": Fixture(
        server=True,
        prelude="from genfan import FanOut, create_backend",
        epilogue="await main()",
    ),
    # docs/batching.md
    "embed": Fixture(
        prelude="""
from genfan.batching import MicroBatcher

async def embed_many(texts: list[str]) -> list[list[float]]:
    return [[float(len(text))] for text in texts]
""",
    ),
    "engine-batch": Fixture(
        prelude="""
from genfan.batching import MicroBatcher

async def run_engine(items: list[str]) -> list[str]:
    return [item.upper() for item in items]

urgent_item, backfill_item = "urgent", "backfill"
""",
        epilogue="assert (answer, later) == ('URGENT', 'BACKFILL')",
    ),
    "batch": Fixture(server=True, files=_BATCH_FILES),
    # docs/fanout.md, docs/selection.md: backends that answer at once
    "fanout-targets": Fixture(
        prelude="""
from genfan.testing import FakeBackend
engine, gpt = FakeBackend("engine", ["Paris."]), FakeBackend("gpt", ["Paris!"])
""",
        epilogue="""
async with fan:
    result = await fan.run("What is the capital of France?")
assert [c.backend for c in result.candidates] == ["greedy", "creative", "gpt"]
assert any(m.content == "Be inventive." for c in engine.calls for m in c.messages)
assert gpt.calls[0].model == "gpt-4o" and gpt.calls[0].max_tokens == 200
""",
    ),
    "samples": Fixture(
        prelude=_SAMPLES,
        epilogue="""
async with fan:
    result = await fan.run("What is 17 * 3?")
assert vote.key(result.text, result.request) == "51", result
""",
    ),
    "vote-samples": Fixture(
        prelude=_SAMPLES, epilogue="assert result.text.endswith(('51', '51.'))"
    ),
    "moa": Fixture(
        prelude="""
from genfan import Synthesis
from genfan.testing import FakeBackend
gpt, claude, llama = (FakeBackend(n, [f"{n}: CAP says pick two."]) for n in ("gpt", "claude", "llama"))
""",
        epilogue="assert result.text and len(gpt.calls) == 3",
    ),
    "cascade": Fixture(
        prelude="""
from genfan import Cascade, Tier
from genfan.select import MajorityVote
from genfan.testing import FakeBackend
small = FakeBackend("small", ["41", "51", "It is 15."])
large = FakeBackend("large", ["17 * 3 = 51"])
""",
        epilogue="assert result.text == '17 * 3 = 51' and len(result.tiers_used) == 2, result",
    ),
    # docs/providers.md and docs/resilience.md: the provider classes, and a 429 with quotas
    "providers": Fixture(
        server=True,
        prelude="""
from genfan.resilience import HedgePolicy, guard
from genfan_providers.anthropic import AnthropicBackend
from genfan_providers.openai import OpenAIBackend
""",
    ),
    "rate-limited": Fixture(
        server=True,
        prelude="""
from genfan import ChatRequest, RateLimitError
from genfan.testserver import RawReply
from genfan_providers.openai import OpenAIBackend

gpt = OpenAIBackend("gpt-4o-mini")
request = ChatRequest.from_prompt("hi")
docs_server.script("gpt-4o-mini", [RawReply(
    status=429,
    body={"error": {"message": "Rate limit reached", "type": "tokens"}},
    headers={"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "6m0s"},
)])
""",
    ),
    # docs/schedule.md
    "scheduler-app": Fixture(
        files=_SCHEDULE_FILES,
        stop_when="Path('sweep-ran').exists()",  # the interval schedule fires when added
    ),
    "scheduler": Fixture(
        prelude=_SCHEDULER,
        epilogue="await scheduler.__aexit__(None, None, None)",
    ),
    "schedules": Fixture(server=True, files=_SCHEDULE_FILES, config=_schedules_here),
    # ... and added to the store by a scheduler that ran once
    "scheduled": Fixture(
        server=True,
        files=_SCHEDULE_FILES,
        config=_schedules_here,
        setup=("genfan schedule run --config genfan.toml",),
    ),
}

# The base a TOML fragment is merged over (its own tables win).
TOML_BASES: dict[str, str] = {
    "backends": """
[backends.gpt]
type = "fake"
[backends.claude]
type = "fake"
[backends.local]
type = "fake"
""",
}


# -- running ---------------------------------------------------------------------------------------


def _env(tmp_path: Path) -> dict[str, str]:
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "SYSTEMROOT")
    env = {k: os.environ[k] for k in keep if k in os.environ}
    env.update(
        PYTHONPATH=str(ROOT),
        PYTHONDONTWRITEBYTECODE="1",
        COLUMNS="120",
        NO_COLOR="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        VLLM_NO_USAGE_STATS="1",
        DO_NOT_TRACK="1",
    )
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '/usr/bin:/bin')}"
    return env


def _spec_file(tmp_path: Path, spec: Mapping[str, Any]) -> Path:
    path = tmp_path / f".docs-spec-{time.monotonic_ns()}.json"
    path.write_text(json.dumps(spec), encoding="utf-8")
    return path


def _runner(
    tmp_path: Path, spec: Mapping[str, Any], *, timeout: float = TIMEOUT
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(RUNNER), str(_spec_file(tmp_path, spec))],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tmp_path,
        env=_env(tmp_path),
    )


def _fixture(block: Block) -> tuple[str | None, Fixture]:
    name = block.name
    if block.kind == "server":
        name = "server"
    if name is None:
        return None, Fixture()
    assert name in FIXTURES, f"{block.id}: no fixture {name!r} in tests/test_docs.py FIXTURES"
    return name, FIXTURES[name]


def _write_files(tmp_path: Path, files: Mapping[str, str]) -> None:
    for rel, text in files.items():
        path = tmp_path / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def _explain(block: Block, out: subprocess.CompletedProcess[str]) -> str:
    return (
        f"{block.id} failed (exit {out.returncode}):\n--- stdout\n{out.stdout[-4000:]}"
        f"\n--- stderr\n{out.stderr[-6000:]}"
    )


# -- Python ----------------------------------------------------------------------------------------


def run_python(block: Block, tmp_path: Path) -> None:
    kind = block.kind
    assert kind in ("", "server", "with", "fragment", "pytest", "engine-only"), (
        f"{block.id}: unknown docs-test marker {block.marker}"
    )
    if "RedisQuota(" in block.code:
        require_service("Redis", port_open("127.0.0.1", 6379), "nothing listens on port 6379")
    if kind == "pytest":
        return run_pytest_module(block, tmp_path)
    if kind == "engine-only":
        return check_imports(block, tmp_path)
    name, fx = _fixture(block)
    _write_files(tmp_path, fx.files)
    prelude = "".join(_page_block(block, needle).code for needle in fx.page_blocks) + fx.prelude
    snippet = tmp_path / "snippet.py"
    snippet.write_text(block.code, encoding="utf-8")
    spec = {
        "code": block.code,
        "filename": str(block.page),
        "line": block.line + 1,
        "file": str(snippet),
        "fixture": name,
        "prelude": prelude,
        "epilogue": fx.epilogue,
        "server": fx.server,
        "fragment": kind == "fragment",
        "stop_when": fx.stop_when,
    }
    out = _runner(tmp_path, spec)
    assert out.returncode == 0, _explain(block, out)
    if kind != "fragment" and "anyio.run(" in block.code and not fx.stop_when:
        assert out.stdout.strip(), f"{block.id}: a program shows what it does (it printed nothing)"
    _STDOUT[block.id] = out.stdout


# What each Python block printed, and the blocks started ahead (see the ``ahead`` fixture).
_STDOUT: dict[str, str] = {}
_AHEAD: dict[str, Future[None]] = {}


def stdout_of(program: Block, tmp_path: Path) -> str:
    """What a Python block prints (it runs once per session)."""
    if program.id in _AHEAD:
        _AHEAD[program.id].result()
    if program.id not in _STDOUT:
        run_python(program, tmp_path)
    return _STDOUT[program.id]


def _page_block(block: Block, needle: str) -> Block:
    """The first block above ``block`` on its page that contains ``needle``."""
    for earlier in collect(block.page):
        if earlier.line < block.line and needle in earlier.code:
            return earlier
    raise AssertionError(f"{block.id}: no block above it contains {needle!r}")


def run_pytest_module(block: Block, tmp_path: Path) -> None:
    (tmp_path / "test_snippet.py").write_text(block.code, encoding="utf-8")
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_snippet.py"],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        cwd=tmp_path,
        env=_env(tmp_path),
    )
    assert out.returncode == 0, _explain(block, out)
    assert re.search(r"\b[1-9]\d* passed", out.stdout), out.stdout


def check_imports(block: Block, tmp_path: Path) -> None:
    """An engine-only block compiles and its imports resolve (without starting the engine)."""
    import ast

    tree = ast.parse(block.code, str(block.page))
    imports = [n for n in tree.body if isinstance(n, ast.Import | ast.ImportFrom)]
    assert imports, f"{block.id}: an engine-only block imports what it uses"
    spec = {
        "code": "\n".join(ast.unparse(n) for n in imports) + "\n",
        "filename": f"{block.id} (imports)",
        "line": 1,
    }
    out = _runner(tmp_path, spec)
    assert out.returncode == 0, _explain(block, out)


# -- TOML ------------------------------------------------------------------------------------------


def _merge(base: dict[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in over.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def check_toml(block: Block, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from genfan import (
        ConfigurationError,
        GenfanConfig,
        MissingExtraError,
        load_config,
        parse_config,
    )
    from genfan.resilience import GuardsConfig
    from genfan.schedule import parse_schedules

    if block.kind == "fragment":
        assert block.name in TOML_BASES, f"{block.id}: no TOML base {block.name!r}"
        data = _merge(tomllib.loads(TOML_BASES[block.name]), tomllib.loads(block.code))
        cfg: GenfanConfig = parse_config(data, source=block.id)
    else:
        assert not block.marker, f"{block.id}: unknown docs-test marker {block.marker}"
        path = tmp_path / "genfan.toml"
        path.write_text(block.code, encoding="utf-8")
        cfg = load_config(path)
    defaults = GuardsConfig.model_validate(cfg.defaults.get("guards") or {})
    for backend in cfg.backends.values():
        GuardsConfig.model_validate(backend.guards or {}).merged_over(defaults)
    if cfg.schedules:
        parse_schedules(cfg.schedules, base_dir=tmp_path)
    # Every backend builds, guards and shared quota stores included (nothing is called), with
    # the variables the file names set as they would be where it is used.
    monkeypatch.setenv("GENFAN_REDIS_URL", "redis://127.0.0.1:6379/0")
    for var in {"OPENAI_API_KEY", "ANTHROPIC_API_KEY"} | {
        b.api_key_env for b in cfg.backends.values() if b.api_key_env
    }:
        monkeypatch.setenv(var, "docs-test")

    async def build_all() -> None:
        for name in cfg.backends:
            try:
                backend = cfg.build_backend(name)
            except MissingExtraError:  # a valid table whose extra is not installed here
                continue
            await backend.aclose()

    try:
        anyio.run(build_all)
    except ConfigurationError as exc:
        pytest.fail(f"{block.id}: {exc}")


# -- shell -----------------------------------------------------------------------------------------


def shell_commands(block: Block) -> list[list[str]]:
    """The block's command lines, split into words (prompts, comments and output left out)."""
    commands, pending = [], ""
    for raw in block.code.splitlines():
        line = raw.rstrip()
        if block.lang == "console":
            if not pending and not line.startswith("$ "):
                continue  # output
            line = line.removeprefix("$ ")
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        words = shlex.split(line, comments=True)
        if words:
            commands.append(words)
    return commands


def _extras() -> set[str]:
    data = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))
    return set(data["project"].get("optional-dependencies", {}))


def check_pip(block: Block, words: list[str]) -> None:
    assert words[:2] == ["pip", "install"], f"{block.id}: {words}"
    for req in (w for w in words[2:] if not w.startswith("-")):
        m = re.fullmatch(r"genfan(?:\[(?P<extras>[\w,\s-]+)\])?", req)
        assert m, f"{block.id}: the docs install genfan and its extras only, not {req!r}"
        missing = {e.strip() for e in (m["extras"] or "").split(",") if e.strip()} - _extras()
        assert not missing, f"{block.id}: pyproject.toml has no extra {sorted(missing)}"


def check_make(block: Block, words: list[str]) -> None:
    targets = [w for w in words[1:] if not w.startswith("-") and "=" not in w]
    assert targets, f"{block.id}: make without a target"
    out = subprocess.run(
        ["make", "-n", *targets], capture_output=True, text=True, timeout=TIMEOUT, cwd=ROOT
    )
    assert out.returncode == 0, f"{block.id}: make -n {' '.join(targets)}: {out.stderr}"


def _parse_genfan(block: Block, words: list[str], tmp_path: Path) -> None:
    """The command line parses, and the subcommand's --help works (the command does not run)."""
    for spec in (
        {"argv": words[1:], "parse_only": True},
        {"argv": [*_subcommand(words[1:]), "--help"]},
    ):
        out = _runner(tmp_path, spec)
        assert out.returncode == 0, _explain(block, out)


def _subcommand(args: list[str]) -> list[str]:
    groups = {"local", "batch", "schedule"}
    if args and args[0] in groups:
        return args[:2]
    return args[:1]


def _run_until_ready(block: Block, argv: list[str], tmp_path: Path, ready: str) -> None:
    """Start a command that runs until stopped, wait for ``ready`` in its output, Ctrl-C it."""
    proc = subprocess.Popen(
        argv,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        cwd=tmp_path,
        env=_env(tmp_path),
    )
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    reader = threading.Thread(target=lambda: [lines.put(s) for s in proc.stdout or ()])
    reader.start()
    seen: list[str] = []
    deadline = time.monotonic() + TIMEOUT
    try:
        while time.monotonic() < deadline and not any(re.search(ready, s) for s in seen):
            try:
                seen.append(lines.get(timeout=0.1))
            except queue.Empty:
                if proc.poll() is not None and not reader.is_alive() and lines.empty():
                    break
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=TIMEOUT)
        finally:
            proc.kill()
            reader.join()
    seen.extend(lines.queue)
    output = "".join(seen)
    assert any(re.search(ready, s) for s in seen), (
        f"{block.id}: {argv} never said {ready!r}:\n{output}"
    )
    assert proc.returncode == 0, (
        f"{block.id}: {argv} stopped with exit {proc.returncode}:\n{output}"
    )


def run_genfan(block: Block, words: list[str], tmp_path: Path, server: bool) -> None:
    spec = {"argv": words[1:], "server": server}
    if words[1:3] == ["schedule", "run"]:
        argv = [sys.executable, str(RUNNER), str(_spec_file(tmp_path, spec))]
        return _run_until_ready(block, argv, tmp_path, r"running \d+ configured schedule")
    if words[1:2] == ["serve"]:  # the gateway runs until stopped, like the scheduler
        argv = [sys.executable, str(RUNNER), str(_spec_file(tmp_path, spec))]
        return _run_until_ready(block, argv, tmp_path, r"listening on http://")
    out = _runner(tmp_path, spec)
    assert out.returncode == 0, _explain(block, out)
    assert (out.stdout + out.stderr).strip(), f"{block.id}: {shlex.join(words)} said nothing"


def _page_toml(block: Block) -> Block | None:
    """The page's config for a shell block: its last TOML block above, or else the first below."""
    tomls = [b for b in collect(block.page) if b.lang == "toml"]
    above = [b for b in tomls if b.line < block.line]
    return above[-1] if above else (tomls[0] if tomls else None)


def run_shell(block: Block, tmp_path: Path) -> None:
    kind = block.kind
    assert kind in ("", "server", "with", "engine-only", "ray-only"), (
        f"{block.id}: unknown docs-test marker {block.marker}"
    )
    commands = shell_commands(block)
    assert commands, f"{block.id}: no command in a shell block"
    _, fx = _fixture(block)
    _write_files(tmp_path, fx.files)
    toml = _page_toml(block)
    if toml is not None and "genfan.toml" not in fx.files:
        text = fx.config(toml.code) if fx.config else toml.code
        (tmp_path / "genfan.toml").write_text(text, encoding="utf-8")
    for line in fx.setup:
        run_genfan(block, shlex.split(line), tmp_path, fx.server)
    for words in commands:
        tool = Path(words[0]).name
        if tool == "pip":
            check_pip(block, words)
        elif tool == "make":
            check_make(block, words)
        elif tool == "mkdocs":
            out = subprocess.run(
                [str(Path(sys.executable).parent / "mkdocs"), words[1], "--help"],
                capture_output=True,
                text=True,
                timeout=TIMEOUT,
            )
            assert out.returncode == 0, out.stderr
        elif tool == "genfan" and kind in ("engine-only", "ray-only"):
            _parse_genfan(block, words, tmp_path)
        elif tool == "genfan":
            run_genfan(block, words, tmp_path, fx.server)
        elif tool.startswith("python") and words[1:3] == ["-m", "genfan.testserver"]:
            argv = [sys.executable, *words[1:]]
            _run_until_ready(block, argv, tmp_path, r"^http://127\.0\.0\.1:\d+/v1$")
        else:
            pytest.fail(f"{block.id}: tests/test_docs.py does not know how to test {words}")


# -- output shown on the pages ---------------------------------------------------------------------


def _output_config_error(block: Block, tmp_path: Path) -> None:
    """config.md: the message of a misspelt key, as load_config says it."""
    from genfan import ConfigurationError, load_config

    typo = re.search(r"backends\.(\w+)\.(\w+): unknown key", block.code)
    assert typo, block.code
    (tmp_path / "genfan.toml").write_text(
        f'[backends.{typo[1]}]\ntype = "openai"\n{typo[2]} = 0.2\n', encoding="utf-8"
    )
    cwd = Path.cwd()
    os.chdir(tmp_path)
    try:
        with pytest.raises(ConfigurationError) as info:
            load_config("genfan.toml")
    finally:
        os.chdir(cwd)
    assert str(info.value) == block.code.strip()


def _output_ask_usage(block: Block, tmp_path: Path) -> None:
    """config.md: the synopsis of `genfan ask` names exactly its options."""
    out = _runner(tmp_path, {"argv": ["ask", "--help"]})
    assert out.returncode == 0, out.stderr
    documented = set(re.findall(r"--[\w-]+", block.code))
    actual = set(re.findall(r"--[\w-]+", out.stdout)) - {"--help"}
    assert documented == actual, f"documented {sorted(documented)}, actual {sorted(actual)}"


def _output_guard_order(block: Block, tmp_path: Path) -> None:
    """resilience.md: the order of the guards is GUARD_ORDER's."""
    from genfan.resilience import GUARD_ORDER

    shown = [w.strip().replace(" ", "_") for w in block.code.split("→")]
    assert shown == [*GUARD_ORDER, "provider"], (shown, GUARD_ORDER)


def _output_chain_table(block: Block, tmp_path: Path) -> None:
    """agents.md: the chain's table is what examples/agent_chain.py prints (steps, statuses)."""
    out = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "agent_chain.py")],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=_env(tmp_path),
    )
    assert out.returncode == 0, out.stderr

    def rows(text: str) -> list[tuple[str, str]]:
        found = re.findall(r"^(\w+)\s+(ok|failed|skipped|cancelled)\s", text, flags=re.M)
        return [(a, b) for a, b in found]

    assert block.code.split()[:4] == ["step", "status", "start", "end"]
    assert rows(block.code) == rows(out.stdout), out.stdout


def _output_batch_records(block: Block, tmp_path: Path) -> None:
    """batching.md: the records have the fields a batch job writes, an ok row and a failed one."""
    from genfan import BackendTimeoutError, ChatRequest, FanOut, RateLimitError
    from genfan.batching import BatchJob, run_batch_job
    from genfan.testing import Fail, FakeBackend

    shown = [json.loads(line) for line in block.code.splitlines() if line.strip()]
    (tmp_path / "in.jsonl").write_text('{"id": 1, "prompt": "7?"}\n{"id": 2, "prompt": "?"}\n')

    def gpt(request: ChatRequest) -> str | Fail:
        return "7" if request.prompt == "7?" else Fail(error=BackendTimeoutError("slow"))

    def fanout() -> FanOut:
        claude = FakeBackend("claude", [Fail(error=RateLimitError("slow down"))])
        return FanOut([FakeBackend("gpt", gpt), claude])

    job = BatchJob(input=tmp_path / "in.jsonl", output=tmp_path / "out.jsonl", fanout=fanout)
    anyio.run(run_batch_job, job)
    written = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]

    def same_shape(doc: Any, real: Any, where: str) -> None:
        if isinstance(doc, dict):
            assert isinstance(real, dict) and set(doc) == set(real), (where, doc, real)
            for key in doc:
                same_shape(doc[key], real[key], f"{where}.{key}")
        elif isinstance(doc, list):
            assert isinstance(real, list) and real, (where, doc, real)
            for i, item in enumerate(doc):
                same_shape(item, real[min(i, len(real) - 1)], f"{where}[{i}]")

    assert [r["status"] for r in shown] == [r["status"] for r in written]
    for i, (doc, real) in enumerate(zip(shown, written, strict=True)):
        same_shape(doc, real, f"record {i + 1}")


def _output_previous(block: Block, tmp_path: Path) -> None:
    """The block shows exactly what the Python program just above it prints."""
    program = collect(block.page)[block.index - 1]
    assert program.lang == "python" and program.kind in ("", "server", "with"), (
        f"{block.id}: the block above is not a whole Python program"
    )
    assert stdout_of(program, tmp_path).strip() == block.code.strip()


def _output_batch_api_summary(block: Block, tmp_path: Path) -> None:
    """batch-api.md: the summary of a run through the batch API, line by line, numbers aside."""
    from genfan.batching import BatchAPISettings, BatchJob, run_batch_job
    from genfan.testserver import FakeLLMServer

    def shape(line: str) -> str:
        return re.sub(r"\d+(\.\d+)?", "#", line.split(" -> ")[0])

    with FakeLLMServer() as srv:
        config = tmp_path / "genfan.toml"
        config.write_text(
            f'[backends.gpt]\ntype = "openai"\nmodel = "m"\nbase_url = "{srv.url}"\n'
            "price = [0.15, 0.6]\n"
        )
        rows = tmp_path / "in.jsonl"
        rows.write_text("".join(f'{{"id": {i}, "prompt": "q{i}"}}\n' for i in range(3)))
        job = BatchJob(
            input=rows,
            output=tmp_path / "out.jsonl",
            config=config,
            via="batch-api",
            batch_api=BatchAPISettings(poll_initial=0.01),
        )
        summary = anyio.run(run_batch_job, job)
    shown = [shape(line) for line in block.code.strip().splitlines()]
    assert [shape(line) for line in summary.lines()] == shown


OUTPUTS: dict[str, Callable[[Block, Path], None]] = {
    "batch-api-summary": _output_batch_api_summary,
    "previous": _output_previous,
    "config-error": _output_config_error,
    "ask-usage": _output_ask_usage,
    "guard-order": _output_guard_order,
    "chain-table": _output_chain_table,
    "batch-records": _output_batch_records,
}


def check_output(block: Block, tmp_path: Path) -> None:
    if block.kind == "output":
        assert block.name in OUTPUTS, f"{block.id}: no output check {block.name!r}"
        return OUTPUTS[block.name](block, tmp_path)
    assert not block.marker, f"{block.id}: unknown docs-test marker {block.marker}"
    if block.lang == "json":
        text = block.code.strip()
        try:
            json.loads(text)
        except json.JSONDecodeError:
            for line in text.splitlines():
                json.loads(line)
        return
    pytest.fail(
        f"{block.id}: a {block.lang or 'plain'} block shows output: mark it"
        " <!-- docs-test: output NAME --> and add the check to OUTPUTS in tests/test_docs.py"
    )


# -- the tests -------------------------------------------------------------------------------------


_SHELLS = ("bash", "console", "sh", "shell")
# Blocks tested by subprocesses alone run ahead, this many at once (most of their time is the
# interpreter starting, or waiting), so the whole docs test takes about a minute on two cores.
WORKERS = min(4, (os.cpu_count() or 2) + 1)


def _in_subprocesses(block: Block, tmp_path: Path) -> None:
    if block.lang in ("python", "py"):
        run_python(block, tmp_path)
    else:
        run_shell(block, tmp_path)


@pytest.fixture(scope="session")
def ahead(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, Future[None]]]:
    """The Python and shell blocks this session tests, started in a pool as the session starts."""
    blocks = [
        item.callspec.params["block"]
        for item in request.session.items
        if isinstance(item, pytest.Function) and item.originalname == "test_block"
    ]
    pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="docs-test")
    futures = {
        b.id: pool.submit(_in_subprocesses, b, tmp_path_factory.mktemp("block"))
        for b in blocks
        if b.lang in ("python", "py", *_SHELLS)
    }
    _AHEAD.update(futures)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)
    _AHEAD.clear()


@pytest.mark.parametrize("block", BLOCKS, ids=lambda b: b.id)
def test_block(
    block: Block,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    ahead: dict[str, Future[None]],
) -> None:
    if block.id in ahead:
        ahead[block.id].result()  # its outcome: passed, failed or skipped
    elif block.lang in ("python", "py", *_SHELLS):
        _in_subprocesses(block, tmp_path)
    elif block.lang == "toml":
        check_toml(block, tmp_path, monkeypatch)
    else:
        check_output(block, tmp_path)


ENGINE_BLOCKS = [b for b in BLOCKS if b.kind == "engine-only" and b.lang == "python"]


@pytest.mark.engine
@pytest.mark.parametrize("block", ENGINE_BLOCKS, ids=lambda b: b.id)
def test_engine_block_runs(block: Block, tmp_path: Path, request: pytest.FixtureRequest) -> None:
    """`pytest -m engine`: the engine-only Python blocks run for real, on the local engine.

    Only when ``-m`` selects engine tests by name (``make engine``): each block starts the
    engine or its server, minutes of CPU that a plain run of the docs test must not spend.
    """
    marks = str(request.config.getoption("markexpr") or "")
    if "engine" not in marks or "not engine" in marks:
        pytest.skip("starts the local vLLM engine: run with -m engine (make engine)")
    if "anyio.run(" in block.code:  # a whole program: run as the script it is (vLLM spawns)
        script = tmp_path / "example.py"
        script.write_text(block.code, encoding="utf-8")
        argv = [sys.executable, str(script)]
        out = subprocess.run(
            argv, capture_output=True, text=True, timeout=600, cwd=tmp_path, env=_env(tmp_path)
        )
    else:
        spec = {"code": block.code, "filename": str(block.page), "line": block.line + 1}
        out = _runner(tmp_path, {**spec, "fragment": True}, timeout=600)
    assert out.returncode == 0, _explain(block, out)


# -- what the earlier README and resilience tests asserted -------------------------------------------


def _page_blocks(name: str, lang: str) -> Iterator[Block]:
    return (b for b in BLOCKS if b.page.name == name and b.lang == lang)


def test_readme_example_picks_paris(tmp_path: Path) -> None:
    block = next(_page_blocks("README.md", "python"))
    assert "chosen: small -> Paris." in stdout_of(block, tmp_path)


def test_the_sharing_sections_have_programs() -> None:
    ran = "".join(b.code for b in _page_blocks("resilience.md", "python") if not b.marker)
    assert "retry_budget=budget" in ran and "rate_limit_store=store" in ran


def test_index_opens_with_a_quickstart() -> None:
    """docs/index.md opens with a whole program that needs no key, no vLLM and no network."""
    first = next(b for b in BLOCKS if b.page.name == "index.md")
    assert first.lang == "python" and not first.marker and first.line < 20
    assert "FakeLLMServer" in first.code and "FanOut(" in first.code and "vllm" not in first.code
