"""Content jobs: a prompt from variables and files new since the last run, fanned out, written."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import anyio
import pytest

from genfan import ChatRequest, ConfigurationError, FanOut
from genfan.schedule import (
    ContentJob,
    DateTrigger,
    IntervalTrigger,
    RunContext,
    Scheduler,
    SQLiteStore,
)
from genfan.testing import FakeBackend, FunctionBackend

T0 = datetime(2026, 3, 2, 7, tzinfo=UTC)


def _touch(path: Path, text: str, when: datetime) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.utime(path, (when.timestamp(), when.timestamp()))


def _ctx(fire: datetime, previous: datetime | None, attempt: int = 1) -> RunContext:
    return RunContext(
        schedule_id="digest",
        fire_time=fire,
        scheduled_at=fire,
        attempt=attempt,
        previous_success=previous,
    )


class Echo:
    """A fan-out of two backends: one echoes the prompt, one says something short."""

    def __init__(self) -> None:
        self.prompts: list[str] = []

    def __call__(self, job: ContentJob) -> FanOut:
        def echo(request: ChatRequest) -> str:
            self.prompts.append(request.prompt)
            return "DIGEST\n" + request.prompt

        return FanOut(
            [FunctionBackend(echo, name="echo"), FakeBackend("short", ["ok"], latency=0.01)],
            mode="all",
            select=lambda req, cands: (
                max((c for c in cands if c.ok), key=lambda c: len(c.text)).index
            ),
        )


@pytest.mark.anyio
async def test_files_are_collected_once_between_runs_and_written_one_file_per_run(
    tmp_path: Path,
) -> None:
    inbox = tmp_path / "inbox"
    job = ContentJob(
        prompt="Tone: {tone}. New since {since}:\n{files}\nList:\n{file_list}",
        variables={"tone": "brief"},
        collect=["inbox/*.md"],
        output="out/",
        base_dir=str(tmp_path),
    )
    fan = Echo()
    _touch(inbox / "a.md", "alpha", T0 - timedelta(minutes=10))
    _touch(inbox / "late.md", "arrives after the fire time", T0 + timedelta(minutes=5))
    first = await job.run("digest", _ctx(T0, None), fan)
    _touch(inbox / "b.md", "beta", T0 + timedelta(minutes=30))
    second = await job.run("digest", _ctx(T0 + timedelta(hours=1), T0), fan)
    third = await job.run("digest", _ctx(T0 + timedelta(hours=2), T0 + timedelta(hours=1)), fan)

    assert first == tmp_path / "out" / "digest-20260302T070000Z.md"
    assert "### a.md\nalpha" in fan.prompts[0] and "late.md" not in fan.prompts[0]
    assert "Tone: brief." in fan.prompts[0]
    assert second is not None and second.name == "digest-20260302T080000Z.md"
    assert "late.md" in fan.prompts[1] and "b.md" in fan.prompts[1]
    assert "a.md" not in fan.prompts[1].replace("late.md", "").replace("b.md", "")
    assert f"since {T0.isoformat()}" in fan.prompts[1]
    assert third is None  # nothing new: no fan-out, no output
    assert len(fan.prompts) == 2
    assert first.read_text().startswith("DIGEST\nTone: brief.")


@pytest.mark.anyio
async def test_single_file_sink_appends_one_section_per_run_idempotently(tmp_path: Path) -> None:
    job = ContentJob(prompt="Daily note for {date}", output=str(tmp_path / "notes.md"))
    fan = Echo()
    await job.run("daily", _ctx(T0, None), fan)
    await job.run("daily", _ctx(T0, None, attempt=2), fan)  # a retry of the same fire time
    await job.run("daily", _ctx(T0 + timedelta(days=1), T0), fan)
    text = (tmp_path / "notes.md").read_text()
    assert text.count("## 2026-03-02T07:00:00+00:00") == 1
    assert text.count("## 2026-03-03T07:00:00+00:00") == 1
    assert "Daily note for 2026-03-03" in text


def test_template_errors_name_the_missing_variable(tmp_path: Path) -> None:
    job = ContentJob(prompt="Hello {who}", output=str(tmp_path / "x.md"))
    with pytest.raises(ConfigurationError, match=r"\{who\}"):
        job.render(_ctx(T0, None), [])
    with pytest.raises(ConfigurationError, match="prompt"):
        ContentJob(prompt=" ", output="x")
    with pytest.raises(ConfigurationError, match="mode"):
        ContentJob(prompt="p", output="x", mode="some")  # type: ignore[arg-type]
    assert ContentJob.from_dict(job.to_dict()) == job


@pytest.mark.anyio
async def test_scheduler_runs_a_content_job_with_the_fanout_factory(tmp_path: Path) -> None:
    fan = Echo()
    store = SQLiteStore(tmp_path / "s.db")
    async with Scheduler(store, fanout_factory=fan, poll_interval=0.1) as s:
        job = ContentJob(prompt="Report for {fire_time}", output=str(tmp_path / "out") + "/")
        await s.add_schedule(job, IntervalTrigger(seconds=0.3), id="report")
        await anyio.sleep(0.75)
        runs = await s.history("report", statuses=["succeeded"])
    files = sorted((tmp_path / "out").iterdir())
    assert len(runs) >= 2 and len(files) == len(runs)
    assert all(f.read_text().startswith("DIGEST\nReport for 20") for f in files)


@pytest.mark.anyio
async def test_content_job_without_a_fanout_fails_with_a_clear_error(tmp_path: Path) -> None:
    async with Scheduler(SQLiteStore(tmp_path / "s.db"), poll_interval=0.05) as s:
        await s.add_schedule(
            ContentJob(prompt="p", output=str(tmp_path / "o.md")),
            DateTrigger(delay=0.05),
            id="c",
        )
        with anyio.fail_after(10):
            while not (runs := await s.history("c", statuses=["failed"])):  # noqa: ASYNC110
                await anyio.sleep(0.05)
    assert "fanout_factory" in (runs[0].error or "")
