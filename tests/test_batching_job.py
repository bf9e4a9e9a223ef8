"""Batch jobs from Python: answers per row, resume, typed failures, re-runs, bad input."""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from collections import Counter
from pathlib import Path

import anyio
import pytest

import genfan.batching
from genfan import BackendTimeoutError, ChatRequest, ConfigurationError, FanOut
from genfan.batching import BatchJob, JobProgress, read_results, run_batch_job
from genfan.batching._output import OutputFile
from genfan.batching._progress import Tally
from genfan.testing import Fail, FakeBackend, Reply

pytestmark = pytest.mark.anyio

# Module state the factories read: which prompts fail, which hang, and every prompt seen.
FAIL_WORDS: set[str] = set()
HANG_FROM: list[int] = []
SEEN: Counter[str] = Counter()


def _script(name: str):  # type: ignore[no-untyped-def]
    async def reply(request: ChatRequest) -> Reply | Fail:
        prompt = request.prompt
        SEEN[f"{name}:{prompt}"] += 1
        if HANG_FROM and prompt.startswith("q") and int(prompt[1:]) >= HANG_FROM[0]:
            await anyio.sleep_forever()
        if any(word in prompt for word in FAIL_WORDS):
            return Fail(error=BackendTimeoutError("too slow", backend=name))
        return Reply(text=f"{name}:{prompt}")

    return reply


def echo_fanout() -> FanOut:
    """Two fake backends that echo the prompt (importable: 'tests.test_batching_job:echo_fanout')."""
    return FanOut([FakeBackend("a", _script("a")), FakeBackend("b", _script("b"))])


@pytest.fixture(autouse=True)
def _reset() -> None:
    FAIL_WORDS.clear()
    HANG_FROM.clear()
    SEEN.clear()


def write_rows(path: Path, rows: list[dict[str, object]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def prompts(n: int) -> list[dict[str, object]]:
    return [{"id": i, "prompt": f"q{i}"} for i in range(n)]


async def test_every_row_gets_its_own_answer_once_in_input_order(tmp_path: Path) -> None:
    rows = [
        *prompts(30),
        {"id": "t1", "template": "hello {name}", "vars": {"name": "ann"}},
        {"id": "t2", "name": "bob"},  # the job's template, variables from the row itself
        {"id": "s", "prompt": "with system", "system": "be brief"},
    ]
    job = BatchJob(
        input=write_rows(tmp_path / "in.jsonl", rows),
        output=tmp_path / "out.jsonl",
        fanout=echo_fanout,
        template="hi {name}",
        max_in_flight=5,
    )
    summary = await run_batch_job(job, progress=False)
    out = lines(job.output)
    assert [r["id"] for r in out] == [r["id"] for r in rows]
    by_id = {r["id"]: r for r in out}
    assert by_id[7]["text"] == f"{by_id[7]['backend']}:q7"  # the chosen candidate's answer
    assert str(by_id["t1"]["text"]).endswith(":hello ann")
    assert str(by_id["t2"]["text"]).endswith(":hi bob")
    assert [c["text"] for c in by_id[3]["candidates"]] == ["a:q3", "b:q3"]  # type: ignore[union-attr]
    assert summary.rows == summary.ran == summary.ok == 33
    assert (summary.failed, summary.skipped, summary.missing) == (0, 0, 0)
    assert summary.input_tokens > 0 and summary.output_tokens > 0


async def test_resume_skips_finished_rows_and_repairs_a_torn_last_line(tmp_path: Path) -> None:
    inp = write_rows(tmp_path / "in.jsonl", prompts(40))
    out = tmp_path / "out.jsonl"
    first = BatchJob(input=inp, output=out, fanout=echo_fanout)
    await run_batch_job(first, progress=False)
    done = out.read_text().splitlines(keepends=True)
    # As if killed: 15 rows written, the 16th cut mid-line.
    out.write_text("".join(done[:15]) + done[15][:25])
    SEEN.clear()

    summary = await run_batch_job(first, progress=False)
    assert summary.skipped == 15 and summary.ran == 25
    assert summary.repaired == 25
    assert {k.split(":")[1] for k in SEEN} == {f"q{i}" for i in range(15, 40)}
    result = lines(out)
    assert [r["id"] for r in result] == list(range(40))
    assert all(r["text"] == f"{r['backend']}:q{r['id']}" for r in result)


async def test_a_cancelled_run_resumes_without_loss_or_duplicates(tmp_path: Path) -> None:
    inp = write_rows(tmp_path / "in.jsonl", prompts(30))
    out = tmp_path / "out.jsonl"
    job = BatchJob(input=inp, output=out, fanout=echo_fanout, max_in_flight=4)
    HANG_FROM.append(12)  # rows from q12 on never answer: the run is stopped mid-way
    with anyio.move_on_after(1.0):
        await run_batch_job(job, progress=False)
    partial = lines(out)
    assert 0 < len(partial) <= 12
    HANG_FROM.clear()
    summary = await run_batch_job(job, progress=False)
    assert summary.skipped == len(partial)
    assert [r["id"] for r in lines(out)] == list(range(30))


async def test_failed_rows_keep_typed_errors_and_only_failed_reruns_them(tmp_path: Path) -> None:
    rows = [*prompts(10), {"id": "x", "prompt": "please fail"}, {"id": "y", "prompt": "fail too"}]
    inp = write_rows(tmp_path / "in.jsonl", rows)
    out = tmp_path / "out.jsonl"
    FAIL_WORDS.add("fail")
    summary = await run_batch_job(BatchJob(input=inp, output=out, fanout=echo_fanout))
    assert (summary.ok, summary.failed) == (10, 2)
    assert summary.failures_by_type == {"AllBackendsFailedError": 2}
    failed = read_results(out)["x"]
    assert failed["status"] == "failed"
    error = failed["error"]
    assert error["type"] == "AllBackendsFailedError"
    assert [(e["backend"], e["type"]) for e in error["backend_errors"]] == [
        ("a", "BackendTimeoutError"),
        ("b", "BackendTimeoutError"),
    ]

    FAIL_WORDS.clear()
    SEEN.clear()
    again = await run_batch_job(
        BatchJob(input=inp, output=out, fanout=echo_fanout, rerun="failed"), progress=False
    )
    assert again.ran == 2 and again.ok == 2 and again.skipped == 10
    assert set(SEEN) == {"a:please fail", "b:please fail", "a:fail too", "b:fail too"}
    result = lines(out)
    assert [r["id"] for r in result] == [r["id"] for r in rows]  # one record per id
    assert all(r["status"] == "ok" for r in result)
    assert again.done_failed == 0


async def test_a_row_without_prompt_or_template_fails_alone(tmp_path: Path) -> None:
    rows = [{"id": 1, "prompt": "q1"}, {"id": 2, "text": "no prompt"}, {"prompt": "q3"}]
    job = BatchJob(
        input=write_rows(tmp_path / "in.jsonl", rows), output=tmp_path / "o", fanout=echo_fanout
    )
    summary = await run_batch_job(job, progress=False)
    res = read_results(job.output)
    assert res[1]["status"] == "ok"
    assert res[2]["error"]["type"] == "ConfigurationError"
    assert "no 'prompt'" in res[2]["error"]["message"]
    assert str(res[3]["text"]).endswith(":q3")  # a row without id gets its line number
    assert summary.failures_by_type == {"ConfigurationError": 1}


async def test_bad_input_is_refused_before_any_work(tmp_path: Path) -> None:
    dup = write_rows(tmp_path / "dup.jsonl", [{"id": 1, "prompt": "a"}, {"id": 1, "prompt": "b"}])
    with pytest.raises(ConfigurationError, match="line 2: id 1 already used on line 1"):
        await run_batch_job(BatchJob(input=dup, output=tmp_path / "o1", fanout=echo_fanout))
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"id": 1, "prompt": "a"}\n{"id": 2,\n')
    with pytest.raises(ConfigurationError, match="line 2: not valid JSON"):
        await run_batch_job(BatchJob(input=broken, output=tmp_path / "o2", fanout=echo_fanout))
    assert SEEN == Counter()
    with pytest.raises(ConfigurationError, match="exactly one of config"):
        BatchJob(input=dup, output=tmp_path / "o3")
    with pytest.raises(ConfigurationError, match="max_in_flight"):
        BatchJob(input=dup, output=tmp_path / "o3", fanout=echo_fanout, max_in_flight=0)


async def test_two_jobs_cannot_write_one_output(tmp_path: Path) -> None:
    inp = write_rows(tmp_path / "in.jsonl", prompts(3))
    holder = OutputFile(tmp_path / "out.jsonl")
    holder.open()
    try:
        with pytest.raises(ConfigurationError, match="being written by another job"):
            await run_batch_job(BatchJob(input=inp, output=holder.path, fanout=echo_fanout))
    finally:
        holder.close()


async def test_rows_in_flight_are_bounded(tmp_path: Path) -> None:
    backend = FakeBackend("slow", latency=0.01)
    job = BatchJob(
        input=write_rows(tmp_path / "in.jsonl", prompts(40)),
        output=tmp_path / "out.jsonl",
        fanout=lambda: FanOut([backend]),
        max_in_flight=3,
    )
    summary = await run_batch_job(job, progress=False)
    assert summary.ok == 40
    assert backend.max_in_flight == 3


async def test_config_file_builds_the_fan_out_and_sets_batch_defaults(tmp_path: Path) -> None:
    cfg = tmp_path / "genfan.toml"
    cfg.write_text(
        '[batch]\ntemplate = "Translate: {word}"\nmax_in_flight = 2\n\n'
        '[backends.one]\ntype = "fake"\noptions = {replies = ["uno"]}\n'
        '[backends.two]\ntype = "fake"\noptions = {replies = ["eins"]}\n'
    )
    inp = write_rows(tmp_path / "in.jsonl", [{"id": "w", "word": "one"}])
    summary = await run_batch_job(
        BatchJob(input=inp, output=tmp_path / "out.jsonl", config=cfg), progress=False
    )
    rec = read_results(tmp_path / "out.jsonl")["w"]
    assert summary.ok == 1
    assert [c["text"] for c in rec["candidates"]] == ["uno", "eins"]
    cfg.write_text('[batch]\ntemplates = "x"\n[backends.one]\ntype = "fake"\n')
    with pytest.raises(ConfigurationError, match=r"unknown key\(s\) in \[batch\]"):
        await run_batch_job(BatchJob(input=inp, output=tmp_path / "o2", config=cfg))


async def test_import_path_factory_and_log_progress(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    job = BatchJob(
        input=write_rows(tmp_path / "in.jsonl", prompts(5)),
        output=tmp_path / "out.jsonl",
        fanout="tests.test_batching_job:echo_fanout",
    )
    summary = await job.run(progress=True)  # stderr is not a terminal: plain log lines
    assert summary.ok == 5
    err = capsys.readouterr().err
    assert "batch: 5 rows to run" in err and "5/5 rows" in err
    text = "\n".join(summary.lines())
    assert "5 ok, 0 failed" in text and "rows/s" in text


def test_read_results_takes_the_last_record_and_ignores_a_torn_line(tmp_path: Path) -> None:
    path = tmp_path / "out.jsonl"
    path.write_text(
        '{"id": 1, "status": "failed"}\n{"id": "1", "status": "ok"}\n'
        '{"id": 1, "status": "ok"}\n{"id": 2, "sta'
    )
    res = read_results(path)
    assert res == {1: {"id": 1, "status": "ok"}, "1": {"id": "1", "status": "ok"}}


async def test_on_progress_reports_the_start_every_row_and_the_end(tmp_path: Path) -> None:
    FAIL_WORDS.add("q3")
    reports: list[JobProgress] = []
    job = BatchJob(
        input=write_rows(tmp_path / "in.jsonl", prompts(6)),
        output=tmp_path / "out.jsonl",
        fanout=echo_fanout,
        max_in_flight=2,
    )
    summary = await job.run(on_progress=reports.append)
    assert [p.done for p in reports] == [0, 1, 2, 3, 4, 5, 6, 6]
    assert {p.total for p in reports} == {6}
    assert [p.finished for p in reports] == [False] * 7 + [True]
    last = reports[-1]
    assert (last.ok, last.failed) == (summary.ok, summary.failed) == (5, 1)
    assert (last.input_tokens, last.output_tokens) == (summary.input_tokens, summary.output_tokens)
    assert last.tokens == last.input_tokens + last.output_tokens
    assert last.elapsed >= 0 and last.rate > 0
    assert (last.eta, reports[0].eta) == (0, math.inf)

    again: list[JobProgress] = []
    await run_batch_job(job, on_progress=again.append)
    assert again == []  # nothing to run, nothing to report


async def test_the_last_report_comes_even_when_the_run_fails(tmp_path: Path) -> None:
    reports: list[JobProgress] = []

    def fragile(p: JobProgress) -> None:
        reports.append(p)
        if p.done == 2 and not p.finished:
            raise RuntimeError("the display broke")

    job = BatchJob(
        input=write_rows(tmp_path / "in.jsonl", prompts(20)),
        output=tmp_path / "out.jsonl",
        fanout=echo_fanout,
        max_in_flight=1,
    )
    with pytest.raises(RuntimeError, match="the display broke"):
        await run_batch_job(job, on_progress=fragile)
    assert reports[-1].finished and reports[-1].done < 20
    assert len(read_results(job.output)) >= reports[-1].done  # what was reported is on disk


def test_progress_counts_every_record() -> None:
    tally = Tally()
    for record in (
        {"status": "ok", "usage": {"input_tokens": 3, "cost": 0.5}},
        {"status": "failed"},
    ):
        tally.add(record)
    assert (tally.ok, tally.failed, tally.input_tokens, tally.cost) == (1, 1, 3, 0.5)
    p = tally.snapshot(4, 2.0)
    assert (p.total, p.done, p.ok, p.failed, p.cost, p.rate, p.eta) == (4, 2, 1, 1, 0.5, 1.0, 2.0)


def test_import_genfan_batching_loads_no_rich_and_no_ray() -> None:
    code = (
        "import sys, genfan.batching as b; b.BatchJob, b.run_batch_job, b.JobProgress; "
        "print([m for m in ('rich', 'ray', 'typer', 'genfan.cli') if m in sys.modules])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_batching_modules_import_each_other_without_a_cycle() -> None:
    # Every import counts: at module level, inside functions and under TYPE_CHECKING.
    package = Path(genfan.batching.__file__).parent
    graph: dict[str, set[str]] = {}
    for file in package.glob("*.py"):
        deps = graph.setdefault(file.stem, set())
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level == 1:
                if node.module:
                    deps.add(node.module)
                else:
                    deps.update(alias.name for alias in node.names)
    done: set[str] = set()

    def visit(module: str, path: tuple[str, ...]) -> None:
        assert module not in path, f"import cycle: {' -> '.join((*path, module))}"
        if module in done:
            return
        for dep in graph.get(module, ()):
            visit(dep, (*path, module))
        done.add(module)

    for module in graph:
        visit(module, ())


# -- output and input problems: one line each, nothing torn, nothing left behind ------------------


async def test_a_non_utf8_byte_names_its_line_and_column(tmp_path: Path) -> None:
    inp = tmp_path / "in.jsonl"
    inp.write_bytes(b'{"id": 1, "prompt": "a"}\n{"id": 2, "prompt": "caf\xe9"}\n')
    job = BatchJob(input=inp, output=tmp_path / "out.jsonl", fanout=echo_fanout)
    with pytest.raises(ConfigurationError) as err:
        await run_batch_job(job)
    assert str(err.value) == (
        f"{inp} line 2: not UTF-8 (byte 0xe9 at column 25); save the file as UTF-8"
    )
    assert not (tmp_path / "out.jsonl").exists()  # refused before any work
    bom = tmp_path / "bom.jsonl"
    bom.write_bytes(b'\xef\xbb\xbf{"id": 1, "prompt": "a"}\n')  # a BOM at the start is fine
    summary = await run_batch_job(
        BatchJob(input=bom, output=tmp_path / "b.jsonl", fanout=echo_fanout)
    )
    assert summary.done_ok == 1


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        ("folder", "is a folder: name a file, e.g. -o"),
        ("under_a_file", "is a file, not a folder"),
    ],
)
async def test_an_output_that_cannot_be_a_file_is_one_error(
    tmp_path: Path, where: str, expected: str
) -> None:
    from genfan import GenfanError

    inp = write_rows(tmp_path / "in.jsonl", prompts(3))
    if where == "folder":
        out = tmp_path / "outdir"
        out.mkdir()
    else:
        (tmp_path / "plain").write_text("x")
        out = tmp_path / "plain" / "out.jsonl"
    with pytest.raises(GenfanError) as err:
        await run_batch_job(BatchJob(input=inp, output=out, fanout=echo_fanout))
    assert isinstance(err.value, OSError)
    assert str(err.value).startswith(f"cannot open the output {out}: ") and expected in str(
        err.value
    )


async def test_a_read_only_file_system_is_one_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from genfan import GenfanError

    inp = write_rows(tmp_path / "in.jsonl", prompts(3))
    out = tmp_path / "ro" / "out.jsonl"

    def read_only(self: Path, *args: object, **kwargs: object) -> None:
        raise OSError(errno.EROFS, "Read-only file system", str(self))

    monkeypatch.setattr(Path, "mkdir", read_only)
    with pytest.raises(GenfanError, match="is on a read-only file system: choose a writable"):
        await run_batch_job(BatchJob(input=inp, output=out, fanout=echo_fanout))


async def test_a_full_disk_leaves_no_torn_line_and_the_job_resumes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno
    import os

    from genfan.batching import _output

    inp = write_rows(tmp_path / "in.jsonl", prompts(20))
    out = tmp_path / "out.jsonl"
    real = _output._write_all
    written = [0]

    def fills_up(fd: int, data: bytes) -> None:
        if written[0] + data.count(b"\n") > 5:  # room for 5 records, then half a write
            os.write(fd, data[: len(data) // 2])
            raise OSError(errno.ENOSPC, "No space left on device")
        written[0] += data.count(b"\n")
        real(fd, data)

    monkeypatch.setattr(_output, "_write_all", fills_up)
    job = BatchJob(input=inp, output=out, fanout=echo_fanout, max_in_flight=1)
    with pytest.raises(OSError, match=r"the disk holding .* is full") as err:
        await run_batch_job(job)
    assert "run the same command again" in str(err.value)
    assert out.read_bytes().endswith(b"\n")  # the half-written line was cut off again
    kept = len(lines(out))
    assert kept == written[0] <= 5  # every whole write, nothing of the failed one
    monkeypatch.setattr(_output, "_write_all", real)
    summary = await run_batch_job(job)
    assert (summary.skipped, summary.ran, summary.done_ok) == (kept, 20 - kept, 20)


async def test_a_failed_compaction_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from genfan.batching import _output

    inp = write_rows(tmp_path / "in.jsonl", prompts(10))
    out = tmp_path / "out.jsonl"
    FAIL_WORDS.add("q3")
    job = BatchJob(input=inp, output=out, fanout=echo_fanout)
    await run_batch_job(job)
    FAIL_WORDS.clear()
    before = out.read_bytes()
    real = _output._write_all

    def full_when_compacting(fd: int, data: bytes) -> None:
        if os_path(fd).endswith(".compact"):
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fd, data)

    monkeypatch.setattr(_output, "_write_all", full_when_compacting)
    retry = BatchJob(input=inp, output=out, fanout=echo_fanout, rerun="failed")
    with pytest.raises(OSError, match=r"cannot compact the output .* is full"):
        await run_batch_job(retry)
    assert not (tmp_path / "out.jsonl.compact").exists()
    assert out.read_bytes().startswith(before)  # the output is as it was, plus the re-run row
    assert read_results(out)[3]["status"] == "ok"
    monkeypatch.setattr(_output, "_write_all", real)
    summary = await run_batch_job(retry)  # the retry compacts now
    assert summary.done_ok == 10 and [r["id"] for r in lines(out)] == list(range(10))


def os_path(fd: int) -> str:
    import os

    return os.readlink(f"/proc/self/fd/{fd}")


async def test_a_compaction_file_left_by_a_kill_is_removed(tmp_path: Path) -> None:
    inp = write_rows(tmp_path / "in.jsonl", prompts(4))
    out = tmp_path / "out.jsonl"
    (tmp_path / "out.jsonl.compact").write_text('{"id": 0, "status": "ok"}\n{"id"')
    summary = await run_batch_job(BatchJob(input=inp, output=out, fanout=echo_fanout))
    assert summary.done_ok == 4 and not (tmp_path / "out.jsonl.compact").exists()
