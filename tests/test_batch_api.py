"""Batch jobs through the providers' batch APIs (``via="batch-api"``), against the fake server's
faithful OpenAI Batches and Anthropic Message Batches: splitting, results and errors mapped to
rows, half price, resuming without paying twice, the deadline, cancelling, the scheduler's
submit and collect, and the offline path."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import pytest

from genfan import BackendConnectionError, ConfigurationError, HTTPStatusError
from genfan.batching import (
    BatchAPISettings,
    BatchAPISummary,
    BatchJob,
    cancel_batch_job,
    collect_batch,
    read_results,
    run_batch_job,
    run_via_batch_api,
    submit_batch,
)
from genfan.testserver import FakeLLMServer, Fault, TextReply

pytestmark = pytest.mark.anyio

PRICE = (0.15, 0.6)
FAST = BatchAPISettings(poll_initial=0.005, poll_max=0.02, cancel_wait=5)


@pytest.fixture
def server() -> Iterator[FakeLLMServer]:
    with FakeLLMServer() as srv:
        yield srv


@pytest.fixture(params=["openai", "anthropic"])
def provider(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def chat_path(provider: str) -> str:
    return "/v1/chat/completions" if provider == "openai" else "/v1/messages"


def setup_job(
    tmp_path: Path,
    srv: FakeLLMServer,
    provider: str,
    n: int = 12,
    *,
    extra: str = "",
    **job: Any,
) -> BatchJob:
    cfg = tmp_path / "genfan.toml"
    cfg.write_text(
        f'[backends.m]\ntype = "{provider}"\nmodel = "m1"\nbase_url = "{srv.url}"\n'
        f"price = [{PRICE[0]}, {PRICE[1]}]\n{extra}"
    )
    rows = tmp_path / "in.jsonl"
    rows.write_text("".join(json.dumps({"id": i, "prompt": f"q{i} a b"}) + "\n" for i in range(n)))
    options: dict[str, Any] = {"via": "batch-api", "batch_api": FAST, **job}
    return BatchJob(input=rows, output=tmp_path / "out.jsonl", config=cfg, **options)


def state_of(job: BatchJob) -> dict[str, Any]:
    return json.loads(job.output.with_name(job.output.name + ".batches.json").read_text())  # type: ignore[no-any-return]


async def test_rows_answered_through_batches_split_under_the_limit_at_half_price(
    tmp_path: Path, server: FakeLLMServer, provider: str
) -> None:
    job = setup_job(
        tmp_path,
        server,
        provider,
        25,
        batch_api=BatchAPISettings(max_requests=10, poll_initial=0.005),
    )
    summary = await run_batch_job(job)
    assert isinstance(summary, BatchAPISummary)
    assert (summary.ok, summary.failed, summary.missing) == (25, 0, 0)
    assert server.batches.creates[provider] == 3  # 10 + 10 + 5
    assert server.count(chat_path(provider)) == 0  # nothing went real-time
    results = read_results(job.output)
    assert [results[i]["text"] for i in range(25)] == [f"echo: q{i} a b" for i in range(25)]
    # every row was priced at half the real-time price of its tokens
    for r in results.values():
        u = r["usage"]
        full = (u["input_tokens"] * PRICE[0] + u["output_tokens"] * PRICE[1]) / 1e6
        assert r["via"] == "batch-api"
        assert u["cost"] == pytest.approx(full / 2)
    assert summary.batch_cost == pytest.approx(sum(r["usage"]["cost"] for r in results.values()))
    assert summary.realtime_rows == 0
    assert [c["state"] for c in state_of(job)["chunks"]] == ["collected"] * 3
    assert server.batches.resubmitted() == 0


async def test_the_byte_limit_splits_too(tmp_path: Path, server: FakeLLMServer) -> None:
    job = setup_job(
        tmp_path,
        server,
        "openai",
        10,
        batch_api=BatchAPISettings(max_bytes=600, poll_initial=0.005),
    )
    summary = await run_batch_job(job)
    assert summary.ok == 10
    sizes = [len(c["keys"]) for c in state_of(job)["chunks"]]
    assert sum(sizes) == 10 and len(sizes) > 1 and max(sizes) < 10
    assert server.batches.creates["openai"] == len(sizes)


async def test_the_openai_upload_is_a_multipart_batch_file_and_metadata_names_job_and_chunk(
    tmp_path: Path, server: FakeLLMServer
) -> None:
    job = setup_job(tmp_path, server, "openai", 3)
    await run_batch_job(job)
    batch = server.batches.get(server.batches.ids[-1])
    st = state_of(job)
    assert batch["status"] == "completed"
    assert batch["metadata"] == {"genfan_job": st["job_id"], "genfan_chunk": "0"}
    assert batch["input_file_id"] == st["chunks"][0]["input_file_id"]
    assert batch["request_counts"] == {"total": 3, "completed": 3, "failed": 0}


async def test_failed_requests_become_failed_rows_and_only_failed_resends_just_those(
    tmp_path: Path, server: FakeLLMServer, provider: str
) -> None:
    server.script("m1", ["ok0", Fault("status", status=400), "ok2", Fault("status", status=500)])
    job = setup_job(tmp_path, server, provider, 6)
    summary = await run_batch_job(job)
    assert (summary.ok, summary.failed) == (4, 2)
    results = read_results(job.output)
    assert results[1]["status"] == "failed" and results[1]["error"]["type"] == "HTTPStatusError"
    assert results[0]["text"] == "ok0" and results[4]["text"] == "echo: q4 a b"
    # --only-failed through a new batch: only rows 1 and 3 are sent
    again = await run_batch_job(setup_job(tmp_path, server, provider, 6, rerun="failed"))
    assert (again.ran, again.ok, again.done_ok) == (2, 2, 6)
    assert server.batches.creates[provider] == 2
    assert sorted(len(c["keys"]) for c in state_of(job)["chunks"]) == [2, 6]


async def test_only_failed_can_go_real_time(tmp_path: Path, server: FakeLLMServer) -> None:
    server.script("m1", [Fault("status", status=400)])
    await run_batch_job(setup_job(tmp_path, server, "openai", 4))
    again = await run_batch_job(
        setup_job(tmp_path, server, "openai", 4, rerun="failed", via="realtime")
    )
    assert (again.ran, again.ok) == (1, 1)
    assert server.count("/v1/chat/completions") == 1
    assert server.batches.creates["openai"] == 1


@pytest.mark.parametrize("lost", ["create", "save"])
async def test_a_batch_the_provider_accepted_is_adopted_not_created_again(
    tmp_path: Path, server: FakeLLMServer, provider: str, lost: str
) -> None:
    job = setup_job(tmp_path, server, provider, 5)
    if lost == "create":
        # the provider accepts the create, the connection breaks before its answer
        server.batches.lose_next_create()
        summary = await run_batch_job(job)
    else:
        # a process killed after the create, before saving the id: the state on disk then
        server.batches.hold()
        await run_via_batch_api(job, mode="submit")
        st = state_of(job)
        st["chunks"][0]["batch_id"] = None
        st["chunks"][0]["state"] = "uploaded" if provider == "openai" else "intent"
        job.output.with_name("out.jsonl.batches.json").write_text(json.dumps(st))
        server.batches.complete_after(0)
        summary = await run_batch_job(job)
    assert isinstance(summary, BatchAPISummary)
    assert summary.ok == 5 and summary.batches_adopted == 1
    assert server.batches.creates[provider] == 1
    assert server.batches.resubmitted() == 0


async def test_a_killed_run_resumes_polling_its_batches(
    tmp_path: Path, server: FakeLLMServer, provider: str
) -> None:
    server.batches.hold()
    job = setup_job(
        tmp_path,
        server,
        provider,
        8,
        batch_api=BatchAPISettings(max_requests=3, poll_initial=0.005),
    )
    first = await run_via_batch_api(job, mode="submit")
    assert first.batches_created == 3 and first.batches_pending == 3
    assert [c["state"] for c in state_of(job)["chunks"]] == ["submitted"] * 3
    server.batches.complete_after(0)
    summary = await run_batch_job(job)
    assert summary.ok == 8 and summary.batches_created == 0
    assert server.batches.creates[provider] == 3 and server.batches.resubmitted() == 0
    # a run after everything is collected sends nothing at all
    done = await run_batch_job(job)
    assert done.ran == 0 and server.batches.creates[provider] == 3


async def test_an_intent_never_sent_is_sent_once_on_resume(
    tmp_path: Path, server: FakeLLMServer
) -> None:
    job = setup_job(tmp_path, server, "openai", 4)
    server.set_faults("503", paths=["/v1/files"])  # the upload fails: only the intent is written
    with pytest.raises(HTTPStatusError):
        await run_batch_job(
            setup_job(tmp_path, server, "openai", 4, batch_api=BatchAPISettings(attempts=1))
        )
    assert state_of(job)["chunks"][0]["state"] == "intent"
    server.clear_faults()
    summary = await run_batch_job(job)
    assert summary.ok == 4 and server.batches.creates["openai"] == 1


async def test_at_the_deadline_batches_are_cancelled_and_the_rest_goes_real_time(
    tmp_path: Path, server: FakeLLMServer, provider: str
) -> None:
    server.batches.hold()
    job = setup_job(tmp_path, server, provider, 10, deadline=0.2)
    await run_via_batch_api(job, mode="submit")
    server.batches.finish_some(4)  # the provider got through 4 rows by the deadline
    summary = await run_batch_job(job)
    assert isinstance(summary, BatchAPISummary)
    assert (summary.ok, summary.missing) == (10, 0)
    assert (summary.batch_rows, summary.realtime_rows) == (4, 6)
    batch = server.batches.get(server.batches.ids[-1])
    assert batch.get("status", batch.get("processing_status")) in ("cancelled", "ended")
    assert server.count(chat_path(provider)) == 6  # only the unfinished rows, once each
    results = read_results(job.output)
    assert sum(r.get("via") == "batch-api" for r in results.values()) == 4
    # both paths are priced: real time at the full price, the batch at half
    assert summary.realtime_cost is not None and summary.batch_cost is not None
    per_row_rt = summary.realtime_cost / 6
    per_row_batch = summary.batch_cost / 4
    assert per_row_batch == pytest.approx(per_row_rt / 2)
    assert summary.cost == pytest.approx(summary.realtime_cost + summary.batch_cost)
    assert any("real time: 6 rows" in line for line in summary.lines())


async def test_expired_batches_leave_their_unfinished_rows_failed(
    tmp_path: Path, server: FakeLLMServer, provider: str
) -> None:
    server.batches.hold()
    job = setup_job(tmp_path, server, provider, 5)
    await run_via_batch_api(job, mode="submit")
    server.batches.expire(completed=2)
    summary = await run_batch_job(job)
    assert (summary.ok, summary.failed) == (2, 3)
    assert {
        r["error"]["type"] for r in read_results(job.output).values() if r["status"] == "failed"
    } == {"BatchExpiredError"}


async def test_a_batch_that_fails_validation_fails_its_rows(
    tmp_path: Path, server: FakeLLMServer
) -> None:
    server.batches.max_requests = 2  # the server refuses the file: the batch "failed"
    summary = await run_batch_job(setup_job(tmp_path, server, "openai", 3))
    assert (summary.ok, summary.failed) == (0, 3)
    assert summary.failures_by_type == {"BatchFailedError": 3}


async def test_cancel_cancels_the_provider_batches(
    tmp_path: Path, server: FakeLLMServer, provider: str
) -> None:
    server.batches.hold()
    job = setup_job(tmp_path, server, provider, 4)
    await run_via_batch_api(job, mode="submit")
    assert await cancel_batch_job(job) == 1
    summary = await run_batch_job(job)
    assert (summary.ok, summary.failed) == (0, 4)
    assert summary.failures_by_type == {"BatchCancelledError": 4}
    assert state_of(job)["chunks"][0]["cancel_requested"] is True


async def test_scheduler_halves_submit_then_collect(tmp_path: Path, server: FakeLLMServer) -> None:
    job = setup_job(tmp_path, server, "anthropic", 6)
    kwargs = {"input": str(job.input), "output": str(job.output), "config": str(job.config)}
    server.batches.hold()
    with pytest.raises(ConfigurationError, match="nothing to collect"):
        await collect_batch(**kwargs)
    submitted = await submit_batch(**kwargs)
    assert submitted["batches_created"] == 1 and submitted["batches_pending"] == 1
    again = await submit_batch(**kwargs)  # a second nightly fire submits nothing new
    assert again["batches_created"] == 0 and server.batches.creates["anthropic"] == 1
    early = await collect_batch(**kwargs)
    assert early["batches_pending"] == 1 and early["missing"] == 6
    server.batches.advance()
    late = await collect_batch(**kwargs)
    assert late["batches_pending"] == 0 and late["done_ok"] == 6


async def test_offline_sends_every_row_at_once(tmp_path: Path) -> None:
    # Each answer takes 2 s so that all 40 requests are open at once even on a slow,
    # loaded CI machine (0.2 s let the first answers finish before the last were sent).
    with FakeLLMServer(latency=2.0) as srv:
        job = setup_job(tmp_path, srv, "openai", 40, via="offline", batch_api=None)
        summary = await run_batch_job(job)
        assert summary.ok == 40
        assert srv.max_in_flight == 40  # real time keeps 16 in flight by default
        assert srv.batches.creates["openai"] == 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {
                "extra": '[backends.n]\ntype = "openai"\nmodel = "x"\nbase_url = "http://127.0.0.1:9/v1"\n'
            },
            "--backend",
        ),
        ({"batch_api": BatchAPISettings(backend="nope")}, "no backend named 'nope'"),
    ],
)
async def test_misuse_is_one_clear_error(
    tmp_path: Path, server: FakeLLMServer, change: dict[str, Any], message: str
) -> None:
    with pytest.raises(ConfigurationError, match=message):
        await run_batch_job(setup_job(tmp_path, server, "openai", 2, **change))
    assert server.batches.creates["openai"] == 0


def test_bad_settings_fail_at_construction(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="deadline"):
        BatchJob(
            input=tmp_path / "i",
            output=tmp_path / "o",
            fanout="a:b",
            via="batch-api",
            deadline="soonish",
        )
    with pytest.raises(ConfigurationError, match="via must be"):
        BatchJob(input=tmp_path / "i", output=tmp_path / "o", fanout="a:b", via="batch")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="max_requests"):
        BatchAPISettings(max_requests=0)


async def test_a_fanout_factory_or_a_backend_without_a_batch_api_is_refused(tmp_path: Path) -> None:
    rows = tmp_path / "in.jsonl"
    rows.write_text('{"id": 1, "prompt": "x"}\n')
    job = BatchJob(
        input=rows,
        output=tmp_path / "o.jsonl",
        fanout="tests.test_batching_job:echo_fanout",
        via="batch-api",
    )
    with pytest.raises(ConfigurationError, match="needs config="):
        await run_batch_job(job)
    cfg = tmp_path / "genfan.toml"
    cfg.write_text('[backends.f]\ntype = "fake"\nmodel = "x"\n')
    with pytest.raises(ConfigurationError, match="has no batch API"):
        await run_batch_job(
            BatchJob(input=rows, output=tmp_path / "o.jsonl", config=cfg, via="batch-api")
        )


async def test_a_refused_key_is_named_never_shown(
    tmp_path: Path, server: FakeLLMServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("BATCH_TEST_KEY", "sk-very-secret-123")
    server.set_faults("echo;status=401", paths=["/v1/files"])
    job = setup_job(tmp_path, server, "openai", 2, extra='api_key_env = "BATCH_TEST_KEY"\n')
    with pytest.raises(HTTPStatusError) as info:
        await run_batch_job(job)
    assert "sk-very-secret-123" not in str(info.value) and "API key" in str(info.value)
    assert "sk-very-secret" not in job.output.with_name("out.jsonl.batches.json").read_text()


async def test_an_unreachable_api_is_a_connection_error(
    tmp_path: Path, server: FakeLLMServer
) -> None:
    cfg_job = setup_job(tmp_path, server, "openai", 1, batch_api=BatchAPISettings(attempts=1))
    cfg_job.config.write_text(
        '[backends.m]\ntype = "openai"\nmodel = "m"\nbase_url = "http://127.0.0.1:9/v1"\n'
    )  # type: ignore[union-attr]
    with pytest.raises(BackendConnectionError):
        await run_batch_job(cfg_job)


async def test_the_toml_batch_table_sets_via_deadline_and_settings(
    tmp_path: Path, server: FakeLLMServer
) -> None:
    extra = (
        '[batch]\nvia = "batch-api"\n[batch.batch_api]\nmax_requests = 2\npoll_initial = 0.005\n'
    )
    job = setup_job(tmp_path, server, "openai", 5, extra=extra, via=None, batch_api=None)
    summary = await run_batch_job(job)
    assert isinstance(summary, BatchAPISummary) and summary.ok == 5
    assert server.batches.creates["openai"] == 3


def test_deadline_forms() -> None:
    from datetime import datetime

    from genfan.batching._batch_settings import parse_deadline

    now = datetime(2026, 12, 6, 22, 0).astimezone()
    assert parse_deadline("90m", now=now) == 5400
    assert parse_deadline("2h30m", now=now) == 9000
    assert parse_deadline(12, now=now) == 12
    assert parse_deadline("06:00", now=now) == 8 * 3600  # the next 06:00: tomorrow
    assert parse_deadline("2026-12-06T23:00", now=now) == 3600
    assert parse_deadline(None) is None
    with pytest.raises(ConfigurationError, match="duration"):
        parse_deadline("tomorrow-ish")


def test_served_requests_go_through_scripts(server: FakeLLMServer) -> None:
    # the emulator answers a batch's requests with the server's scripts
    server.script("m1", [TextReply("scripted", usage=(7, 9))])
    import httpx

    with httpx.Client(base_url=server.url) as http:
        r = http.post(
            "/messages/batches",
            json={
                "requests": [
                    {
                        "custom_id": "a",
                        "params": {
                            "model": "m1",
                            "max_tokens": 5,
                            "messages": [{"role": "user", "content": "hi"}],
                        },
                    }
                ]
            },
        )
        bid = r.json()["id"]
        assert r.json()["processing_status"] == "in_progress"
        assert http.get(f"/messages/batches/{bid}/results").status_code == 400  # not ended yet
        got = http.get(f"/messages/batches/{bid}").json()
        assert got["processing_status"] == "ended" and got["request_counts"]["succeeded"] == 1
        line = json.loads(http.get(got["results_url"]).text)
        assert line["result"]["message"]["content"][0]["text"] == "scripted"
        assert line["result"]["message"]["usage"] == {"input_tokens": 7, "output_tokens": 9}
        bad = http.post(
            "/messages/batches", json={"requests": [{"custom_id": "no spaces!", "params": {}}]}
        )
        assert bad.status_code == 400


def test_openai_status_goes_validating_in_progress_finalizing_completed(
    server: FakeLLMServer,
) -> None:
    import httpx

    line = {
        "custom_id": "x",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": "m", "messages": [{"role": "user", "content": "hi"}]},
    }
    with httpx.Client(base_url=server.url) as http:
        up = http.post(
            "/files",
            data={"purpose": "batch"},
            files={"file": ("in.jsonl", json.dumps(line).encode())},
        )
        assert up.json()["purpose"] == "batch"
        assert (
            http.post(
                "/files", data={"purpose": "fine-tune"}, files={"file": ("a", b"{}")}
            ).status_code
            == 400
        )
        b = http.post(
            "/batches",
            json={
                "input_file_id": up.json()["id"],
                "endpoint": "/v1/chat/completions",
                "completion_window": "24h",
                "metadata": {"k": "v"},
            },
        ).json()
        seen = [b["status"]]
        while seen[-1] != "completed":
            seen.append(http.get(f"/batches/{b['id']}").json()["status"])
        assert seen == ["validating", "in_progress", "finalizing", "completed"]
        done = http.get(f"/batches/{b['id']}").json()
        out = http.get(f"/files/{done['output_file_id']}/content").text
        assert json.loads(out)["response"]["body"]["choices"][0]["message"]["content"] == "echo: hi"
        assert done["error_file_id"] is None
        assert http.post(f"/batches/{b['id']}/cancel").status_code == 400  # it has ended
        listed = http.get("/batches").json()["data"]
        assert listed[0]["metadata"] == {"k": "v"}


async def test_the_scheduler_submits_on_one_fire_and_collects_on_another(
    tmp_path: Path, server: FakeLLMServer
) -> None:
    from genfan.schedule import IntervalTrigger, Scheduler, SQLiteStore

    job = setup_job(tmp_path, server, "openai", 5)
    kwargs = {"input": str(job.input), "output": str(job.output), "config": str(job.config)}
    server.batches.hold()
    store = SQLiteStore(tmp_path / "s.db")
    try:
        async with Scheduler(store, poll_interval=0.02) as s:
            for half in ("submit", "collect"):
                await s.add_schedule(
                    f"genfan.batching:{half}_batch",
                    IntervalTrigger(hours=24),
                    id=half,
                    kwargs=kwargs,
                    paused=True,
                )

            async def fire(schedule: str) -> None:
                await s.trigger(schedule)
                with anyio.fail_after(20):
                    while not [r for r in await s.history(schedule) if r.status == "succeeded"]:  # noqa: ASYNC110
                        await anyio.sleep(0.02)

            await fire("submit")  # the nightly submit
            assert server.batches.creates["openai"] == 1 and not job.output.read_text()
            server.batches.advance()  # the provider works overnight
            await fire("collect")  # the morning collect
    finally:
        await store.aclose()
    assert {r["text"] for r in read_results(job.output).values()} == {
        f"echo: q{i} a b" for i in range(5)
    }
    assert server.batches.creates["openai"] == 1


async def test_a_flaky_download_is_retried(tmp_path: Path, server: FakeLLMServer) -> None:
    server.set_faults("503", rate=0.5, paths=["/content"])  # half the file downloads fail
    job = setup_job(
        tmp_path,
        server,
        "openai",
        9,
        batch_api=BatchAPISettings(max_requests=3, poll_initial=0.005),
    )
    summary = await run_batch_job(job)
    assert summary.done_ok == 9 and server.batches.creates["openai"] == 3
    assert sum(v for k, v in server.counts.items() if k.endswith("/content")) > 3  # retried


async def test_a_damaged_or_foreign_state_file_stops_the_run(
    tmp_path: Path, server: FakeLLMServer
) -> None:
    job = setup_job(tmp_path, server, "openai", 2)
    state = job.output.with_name("out.jsonl.batches.json")
    state.write_text("{not json")
    with pytest.raises(ConfigurationError, match="unreadable"):
        await run_batch_job(job)
    state.write_text(
        json.dumps({"job_id": "x", "provider": "anthropic", "backend": "other", "chunks": []})
    )
    with pytest.raises(ConfigurationError, match="backend 'other'"):
        await run_batch_job(job)
    assert server.batches.creates["openai"] == 0


async def test_a_deadline_already_past_sends_everything_real_time(
    tmp_path: Path, server: FakeLLMServer
) -> None:
    summary = await run_batch_job(setup_job(tmp_path, server, "openai", 3, deadline=0))
    assert isinstance(summary, BatchAPISummary)
    assert (summary.done_ok, summary.realtime_rows, summary.batch_rows) == (3, 3, 0)
    assert server.batches.creates["openai"] == 0 and server.count("/v1/chat/completions") == 3
