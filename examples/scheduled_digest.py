"""A digest of whatever arrived in an inbox folder, written every few seconds by a scheduler.

A content job fills a prompt with the files that arrived since its last successful run, fans it
out to two "models", keeps the longer answer and writes one file per run. A second schedule
shows a cron trigger in a time zone, and the run history is printed at the end.

Runs offline in about 4 seconds: the models are function backends, the store is a SQLite file in
a temporary folder. In production, run the same schedules from a config file on several
replicas: ``genfan schedule run --config genfan.toml`` (see docs/schedule.md).
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import anyio

from genfan import ChatRequest, FanOut
from genfan.resilience import RetryPolicy
from genfan.schedule import (
    ContentJob,
    CronTrigger,
    IntervalTrigger,
    SchedulePolicy,
    Scheduler,
)
from genfan.testing import FunctionBackend


def terse(request: ChatRequest) -> str:
    return f"{request.prompt.count('### ')} new note(s)."


def thorough(request: ChatRequest) -> str:
    titles = [line[4:] for line in request.prompt.splitlines() if line.startswith("### ")]
    return f"Digest of {len(titles)} note(s): " + ", ".join(titles) + "."


def fanout(job: ContentJob) -> FanOut:
    """Builds the content job's fan-out (``genfan schedule run`` builds it from the config)."""
    return FanOut(
        [FunctionBackend(terse), FunctionBackend(thorough)],
        select=lambda request, candidates: (
            max((c for c in candidates if c.ok), key=lambda c: len(c.text)).index
        ),
    )


async def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="genfan-digest-"))
    inbox = root / "inbox"
    inbox.mkdir()
    (inbox / "standup.md").write_text("The deploy went out at 9.")

    async with Scheduler(root / "schedules.db", fanout_factory=fanout, poll_interval=0.1) as s:
        await s.add_schedule(
            ContentJob(
                prompt="Summarise what arrived since {since}:\n\n{files}",
                collect=["inbox/*.md"],
                output="digests/",
                base_dir=str(root),
            ),
            IntervalTrigger(seconds=1),
            id="inbox-digest",
            policy=SchedulePolicy(
                overlap="skip",
                timeout=30,
                retry=RetryPolicy(attempts=3, initial=0.5, jitter="none"),
            ),
        )
        morning = await s.add_schedule(
            "os:getpid", CronTrigger(expr="0 7 * * mon-fri", timezone="Europe/Berlin"), id="morning"
        )
        await anyio.sleep(1.5)
        (inbox / "incident.md").write_text("Queue latency spiked at 10:02.")
        (inbox / "release.md").write_text("v2.3 is tagged.")
        await anyio.sleep(2)
        history = await s.history("inbox-digest", statuses=["succeeded"])

    print(f"morning schedule: {morning.trigger}, next at {morning.next_fire:%Y-%m-%d %H:%M} UTC")
    print(f"inbox-digest ran {len(history)} times; digests written:")
    for path in sorted((root / "digests").iterdir()):
        print(f"  - {path.read_text().strip()}")


if __name__ == "__main__":
    anyio.run(main)
