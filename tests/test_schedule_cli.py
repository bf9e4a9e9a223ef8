"""``genfan schedule`` and the ``[schedules]`` config section."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from typer.testing import CliRunner

from genfan import ConfigurationError
from genfan.cli import app
from genfan.schedule import ContentJob, CronTrigger, IntervalTrigger, parse_schedules

ROOT = Path(__file__).resolve().parents[1]

CONFIG = """
[backends.a]
type = "fake"
[backends.a.options]
replies = ["Today's digest"]

[schedules]
store = "sqlite:///{db}"
poll_interval = 0.2

[schedules.digest]
interval = "1s"
retry = {{ attempts = 2, initial = 0.1 }}
[schedules.digest.content]
prompt = "Digest:\\n{{files}}"
collect = ["inbox/*.md"]
output = "digests/"

[schedules.tick]
func = "os:getpid"
interval = "0.5s"
overlap = "allow"
"""


@pytest.fixture(autouse=True)
def _restore_structlog() -> Iterator[None]:
    """The CLI configures logging (a level filter included); undo that for the other tests."""
    import structlog

    was = structlog.is_configured()
    saved = structlog.get_config()
    yield
    if was:
        structlog.configure(**saved)
    else:
        structlog.reset_defaults()


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A config whose schedules ran for ~3 seconds under ``genfan schedule run``."""
    tmp = tmp_path_factory.mktemp("cli")
    (tmp / "inbox").mkdir()
    (tmp / "inbox" / "note.md").write_text("something happened")
    cfg = tmp / "genfan.toml"
    cfg.write_text(CONFIG.format(db=tmp / "s.db"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "genfan.cli",
            "schedule",
            "run",
            "--config",
            str(cfg),
            "--duration",
            "3",
            "--log-level",
            "warning",
        ],
        cwd=tmp,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "running 2 configured schedule(s)" in proc.stderr
    return cfg


def test_run_executes_the_content_job_once_per_new_input(ran: Path) -> None:
    files = list((ran.parent / "digests").iterdir())
    # The first run collected note.md; later runs found nothing new and wrote nothing.
    assert len(files) == 1
    assert files[0].read_text() == "Today's digest\n"
    assert files[0].name.startswith("digest-")


def test_list_history_pause_resume_trigger(ran: Path) -> None:
    runner = CliRunner()
    cfg = ["--config", str(ran)]
    out = runner.invoke(app, ["schedule", "list", *cfg, "--json"])
    assert out.exit_code == 0, out.output
    items = {i["id"]: i for i in json.loads(out.output)}
    assert set(items) == {"digest", "tick"}
    assert items["tick"]["job"]["func"] == "os:getpid"
    assert items["digest"]["job"]["kind"] == "content"

    out = runner.invoke(app, ["schedule", "history", "tick", *cfg, "--json", "--limit", "3"])
    assert out.exit_code == 0, out.output
    runs = json.loads(out.output)
    assert len(runs) == 3 and {r["status"] for r in runs} <= {"succeeded", "pending"}
    assert runs[0]["fire_time"] > runs[1]["fire_time"]

    table = runner.invoke(app, ["schedule", "history", *cfg])
    assert table.exit_code == 0 and "succeeded" in table.output

    assert runner.invoke(app, ["schedule", "pause", "tick", *cfg]).output.strip() == "tick: paused"
    listed = runner.invoke(app, ["schedule", "list", *cfg])
    assert "paused" in listed.output
    assert "resumed" in runner.invoke(app, ["schedule", "resume", "tick", *cfg]).output
    trig = runner.invoke(app, ["schedule", "trigger", "digest", *cfg])
    assert trig.exit_code == 0 and "run queued" in trig.output
    missing = runner.invoke(app, ["schedule", "pause", "nope", *cfg])
    assert missing.exit_code == 2 and "no schedule" in missing.output
    missing = runner.invoke(app, ["schedule", "trigger", "nope", *cfg])
    assert missing.exit_code == 2 and "no schedule with id 'nope'" in missing.output


def test_bad_config_is_reported_with_the_key(tmp_path: Path) -> None:
    cfg = tmp_path / "genfan.toml"
    cfg.write_text('[schedules.x]\nfunc = "os:getpid"\ncron = "0 7 * * *"\ninterval = 5\n')
    out = CliRunner().invoke(app, ["schedule", "run", "--config", str(cfg), "--duration", "0.1"])
    assert out.exit_code == 2
    assert "schedules.x" in out.output and "exactly one of cron, interval" in out.output


def test_parse_schedules() -> None:
    cfg = parse_schedules(
        {
            "store": "postgresql://127.0.0.1/test",
            "max_concurrent_runs": 5,
            "nightly": {
                "func": "myapp.jobs:nightly",
                "cron": "0 3 * * *",
                "timezone": "Europe/Berlin",
                "kwargs": {"days": 7},
                "coalesce": "all",
                "retry": {"attempts": 3},
                "jitter": 30,
                "keep_succeeded": 10,
                "keep_failed": 0,
            },
            "digest": {
                "delay": "in 10 minutes",
                "content": {"prompt": "p", "output": "o/", "collect": "in/*.md"},
            },
        },
        base_dir=Path("/srv"),
    )
    assert cfg.settings.max_concurrent_runs == 5
    nightly = cfg.entries["nightly"]
    assert nightly.trigger() == CronTrigger(expr="0 3 * * *", timezone="Europe/Berlin")
    assert nightly.call_kwargs == {"days": 7}
    assert nightly.policy().coalesce == "all" and nightly.policy().retry.attempts == 3
    assert (nightly.policy().keep_succeeded, nightly.policy().keep_failed) == (10, 0)
    assert cfg.entries["digest"].policy().keep_succeeded is None  # default: keep every run
    job = cfg.entries["digest"].job(cfg.base_dir)
    assert isinstance(job, ContentJob) and job.collect == ("in/*.md",) and job.base_dir == "/srv"
    assert cfg.entries["digest"].trigger().delay == 600  # type: ignore[union-attr]
    every = parse_schedules({"x": {"func": "a:b", "interval": "30m"}}).entries["x"].trigger()
    assert every == IntervalTrigger(seconds=1800)


def test_a_retry_table_keeps_its_keys_through_the_store() -> None:
    from genfan.schedule import SchedulePolicy

    keys = {"attempts": 4, "initial": 2, "multiplier": 3, "max_delay": 50, "jitter": "full"}
    entry = parse_schedules({"x": {"func": "a:b", "interval": 5, "retry": keys}}).entries["x"]
    policy = entry.policy()
    assert {k: getattr(policy.retry, k) for k in keys} == keys
    assert SchedulePolicy.from_dict(policy.to_dict()) == policy
    # The keys left out keep the schedule defaults (no jitter, waits up to 300 s).
    few = parse_schedules({"x": {"func": "a:b", "interval": 5, "retry": {"attempts": 2}}})
    retry = few.entries["x"].policy().retry
    assert (retry.attempts, retry.initial, retry.multiplier, retry.max_delay, retry.jitter) == (
        2,
        1.0,
        2.0,
        300.0,
        "none",
    )


@pytest.mark.parametrize(
    ("data", "match"),
    [
        ({"stor": "x"}, "unknown key"),
        ({"x": {"cron": "0 * * * *"}}, "exactly one of func"),
        ({"x": {"func": "a:b"}}, "exactly one of cron, interval, at and delay"),
        ({"x": {"func": "a:b", "cron": "bad"}}, "schedules.x: .*not a valid cron"),
        ({"x": {"func": "a:b", "interval": 5, "overlap": "queue"}}, "schedules.x.overlap"),
        ({"x": {"func": "a:b", "interval": 5, "colaesce": "all"}}, "unknown key"),
        ({"lease_time": 0}, "schedules.lease_time"),
        ({"x": {"func": "a:b", "interval": 5, "keep_succeeded": 0}}, "schedules.x.keep_succeeded"),
        ({"x": {"func": "a:b", "interval": 5, "retry": {"jitter": "some"}}}, "schedules.x.retry"),
        ({"x": {"func": "a:b", "interval": 5, "retry": {"attempts": 101}}}, "schedules.x.retry"),
    ],
)
def test_parse_schedules_rejects(data: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        parse_schedules(data)


def test_backfill_queues_a_window_once_and_a_running_scheduler_runs_it(tmp_path: Path) -> None:
    from datetime import UTC, datetime, timedelta

    import anyio

    from genfan.schedule import SchedulePolicy, SQLiteStore

    db = tmp_path / "s.db"
    today = datetime.now(UTC).replace(hour=0, minute=0, second=0, microsecond=0)
    start, end = today - timedelta(days=3), today
    fires = [(start + timedelta(days=d, hours=3)).isoformat() for d in range(3)]

    async def add() -> None:
        async with SQLiteStore(db) as store:
            await store.put_schedule(
                id="nightly",
                trigger=CronTrigger(expr="0 3 * * *"),
                job={"kind": "call", "func": "os:getpid", "args": [], "kwargs": {}},
                policy=SchedulePolicy(),
                now=datetime.now(UTC),
                paused=True,  # its own fires never run here; backfilled ones do
            )

    anyio.run(add)
    runner = CliRunner()
    where = ["--store", f"sqlite:///{db}"]
    window = ["--start", start.isoformat(), "--end", end.isoformat()]
    out = runner.invoke(
        app,
        ["schedule", "backfill", "nightly", *window, *where, "--overlap", "buffer_all", "--json"],
    )
    assert out.exit_code == 0, out.output
    assert json.loads(out.output) == {
        "schedule": "nightly",
        "fire_times": fires,
        "queued": fires,
        "existing": [],
    }
    again = runner.invoke(app, ["schedule", "backfill", "nightly", *window, *where])
    assert again.exit_code == 0, again.output
    assert "0 run(s) queued, 3 already in the history, of 3 fire time(s)" in again.output

    for args, message in [
        (
            ["--start", "2026-01-01T00:00", "--end", end.isoformat()],
            "--start '2026-01-01T00:00' has no timezone",
        ),
        (["--start", "yesterday", "--end", end.isoformat()], "is not an ISO 8601 time"),
        (["--start", end.isoformat(), "--end", start.isoformat()], "window is empty"),
        (["--start", start.isoformat(), "--end", "2999-01-01T00:00Z"], "is in the future"),
        ([*window, "--max-fires", "2"], "narrow the window"),
    ]:
        bad = runner.invoke(app, ["schedule", "backfill", "nightly", *args, *where])
        assert bad.exit_code == 2 and message in bad.output, (args, bad.output)
    missing = runner.invoke(app, ["schedule", "backfill", "nope", *window, *where])
    assert missing.exit_code == 2 and "no schedule with id 'nope'" in missing.output

    proc = subprocess.run(
        [sys.executable, "-m", "genfan.cli", "schedule", "run", *where, "--duration", "2"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = runner.invoke(app, ["schedule", "history", "nightly", *where, "--json"])
    runs = sorted(json.loads(out.output), key=lambda r: r["fire_time"])
    assert [(r["fire_time"], r["status"], r["backfill"]) for r in runs] == [
        (f, "succeeded", True) for f in fires
    ]


_RUN_ERRORS = [
    # an unimportable func: the key, the path, why, and the fix
    (
        'func = "nosuchmod.jobs:go"\ninterval = 5',
        [
            "schedules.x.func: job 'nosuchmod.jobs:go': cannot import 'nosuchmod.jobs'",
            "No module named 'nosuchmod'",
            "fix the import path",
        ],
    ),
    # a module that raises while it is imported: the file and line
    (
        'func = "badmod:go"\ninterval = 5',
        ["schedules.x.func", "importing 'badmod' failed with RuntimeError: boom", "line 2"],
    ),
    # a cron that never fires
    (
        'func = "os:getpid"\ncron = "0 0 31 2 *"',
        ["schedules.x: cron '0 0 31 2 *' never fires", "fix its day-of-month and month"],
    ),
    # a start after the end
    (
        'func = "os:getpid"\ninterval = 5\nstart = 2026-02-01T00:00:00Z\nend = 2026-01-01T00:00:00Z',
        ["schedules.x: start 2026-02-01T00:00:00+00:00 is after its end", "set start before end"],
    ),
]


@pytest.mark.parametrize(("table", "expected"), _RUN_ERRORS)
def test_run_reports_a_bad_schedule_in_one_line_and_exits_2(
    tmp_path: Path, table: str, expected: list[str]
) -> None:
    (tmp_path / "badmod.py").write_text('"""A module that fails."""\nraise RuntimeError("boom")\n')
    cfg = tmp_path / "genfan.toml"
    cfg.write_text(f'[schedules]\nstore = "sqlite:///{tmp_path}/s.db"\n\n[schedules.x]\n{table}\n')
    proc = subprocess.run(
        [sys.executable, "-m", "genfan.cli", "schedule", "run", "--config", str(cfg)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()  # one line, no traceback
    assert line.startswith(f"error: {cfg}: "), line
    for part in expected:
        assert part in line, line


@pytest.mark.parametrize(
    ("store", "expected"),
    [
        (
            "postgresql://postgres@127.0.0.1:1/test",
            ["cannot connect to the PostgreSQL store", "port 1", "database is running"],
        ),
        (
            "sqlite:////proc/genfan-nowhere/s.db",
            ["SQLite store /proc/genfan-nowhere/s.db", "folder exists or can be created"],
        ),
    ],
)
def test_run_reports_an_unreachable_store_in_one_line_and_exits_2(
    tmp_path: Path, store: str, expected: list[str]
) -> None:
    cfg = tmp_path / "genfan.toml"
    cfg.write_text(
        f'[schedules]\nstore = "{store}"\n\n[schedules.x]\nfunc = "os:getpid"\ninterval = 5\n'
    )
    proc = subprocess.run(
        [sys.executable, "-m", "genfan.cli", "schedule", "run", "--config", str(cfg)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
        env={"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin"},
    )
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    for part in [*expected, f"check `store` in [schedules] of {cfg}"]:
        assert part in line, line


def test_list_and_history_read_whole_at_80_columns(
    ran: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Timestamps were cut to "2026-12-…" at 80 columns: they must stay whole.
    monkeypatch.setenv("COLUMNS", "80")
    runner = CliRunner()
    cfg = ["--config", str(ran)]
    for command in (["schedule", "list"], ["schedule", "history"]):
        out = runner.invoke(app, [*command, *cfg])
        assert out.exit_code == 0, out.output
        assert re.search(r"\d{4}-\d{2}-\d{2} \d{2}:\d{2}:\d{2}", out.output), out.output
        assert "…" not in out.output
        assert max(len(line) for line in out.output.splitlines()) <= 80
