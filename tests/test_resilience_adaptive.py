"""Adaptive concurrency: the algorithms (AIMD, Gradient2, Vegas) sample by sample and as
properties, and the bulkhead whose cap adapts, on a mock clock."""

from __future__ import annotations

import math
from collections.abc import Callable

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from trio.testing import MockClock

from genfan import (
    BackendConnectionError,
    BackendError,
    BackendTimeoutError,
    BulkheadFullError,
    ChatRequest,
    ConfigurationError,
    HTTPStatusError,
    RateLimitError,
    parse_config,
)
from genfan.resilience import (
    AIMD,
    AdaptiveLimit,
    Bulkhead,
    BulkheadPolicy,
    Gradient2,
    GuardsConfig,
    RetryPolicy,
    Vegas,
    guard,
)
from genfan.testing import Fail, FakeBackend, Reply, capture_events

REQ = ChatRequest.from_prompt("hi")
MOCK_TRIO = ("trio", {"clock": MockClock(autojump_threshold=0)})
KINDS: list[type[AIMD | Gradient2 | Vegas]] = [AIMD, Gradient2, Vegas]


# -- AIMD ---------------------------------------------------------------------------------------


def test_aimd_slow_starts_then_adds_one_slot_per_round_trip() -> None:
    aimd = AIMD(initial=4, max_limit=100)
    assert [aimd.update(1.0, 4 + i, False) for i in range(4)] == [5, 6, 7, 8]  # +1 a call
    assert aimd.update(1.0, 8, True) == 7  # 8 * 0.9 = 7.2
    limits = [aimd.update(1.0, 7, False) for _ in range(8)]  # a round trip of 7-8 calls
    assert limits == [7] * 7 + [8]  # +1/limit per call: one slot per round trip


def test_aimd_does_not_grow_while_the_limit_is_not_used() -> None:
    aimd = AIMD(initial=10)
    assert aimd.update(1.0, 4, False) == 10  # 4 of 10 in use
    assert aimd.update(1.0, 5, False) == 11  # half in use: grows


def test_aimd_cuts_by_the_ratio_and_by_one_slot_at_least() -> None:
    aimd = AIMD(initial=40, backoff_ratio=0.5)
    assert aimd.update(0.0, 40, True) == 20
    small = AIMD(initial=3)
    assert small.update(0.0, 3, True) == 2  # 2.7 would keep 2... and 3 * 0.9 < 3 - 1 is false
    assert small.update(0.0, 2, True) == 1
    assert small.update(0.0, 1, True) == 1  # the floor


def test_aimd_bounds() -> None:
    aimd = AIMD(initial=3, min_limit=2, max_limit=4)
    assert [aimd.update(1.0, 9, False) for _ in range(3)] == [4, 4, 4]
    assert [aimd.update(1.0, 9, True) for _ in range(3)] == [3, 2, 2]


# -- Gradient2 ----------------------------------------------------------------------------------


def test_gradient2_grows_by_the_smoothed_queue_allowance_while_latency_is_flat() -> None:
    g = Gradient2(initial=16, max_limit=100)
    assert [g.update(0.1, 16, False) for _ in range(5)] == [16, 17, 18, 19, 20]  # +0.8 each
    assert g.long_rtt == pytest.approx(0.1)


def test_gradient2_shrinks_when_latency_passes_the_tolerance() -> None:
    g = Gradient2(initial=20, max_limit=100)
    for _ in range(10):
        g.update(0.1, 20, False)  # long RTT 0.1 (the warm-up average), limit 28
    before = g._estimate
    g.update(0.3, 28, False)  # 3x the long RTT: gradient 1.5 * 0.1 / 0.3 = 0.5 (its floor)
    long_rtt = g.long_rtt
    assert long_rtt == pytest.approx(0.1 + 0.2 * 2 / 601)
    expected = before * 0.8 + (before * max(0.5, 1.5 * long_rtt / 0.3) + 4) * 0.2
    assert g._estimate == pytest.approx(expected)
    assert g.limit < math.floor(before)


def test_gradient2_forgets_an_old_overload_quickly() -> None:
    g = Gradient2(initial=10)
    for _ in range(10):
        g.update(1.0, 10, False)
    g.update(0.1, 10, False)  # long 1.0 / short 0.1 > 2: the long RTT decays by 5% too
    assert g.long_rtt == pytest.approx((1.0 + (0.1 - 1.0) * 2 / 601) * 0.95)


def test_gradient2_ignores_zero_rtts_and_an_unused_limit_and_cuts_on_drops() -> None:
    g = Gradient2(initial=20)
    assert g.update(0.0, 20, False) == 20 and g.long_rtt == 0.0
    assert g.update(0.1, 9, False) == 20  # fewer than half in use
    assert g.long_rtt == pytest.approx(0.1)
    assert g.update(5.0, 20, True) == 18  # the drop's RTT is not latency
    assert g.long_rtt == pytest.approx(0.1)


# -- Vegas --------------------------------------------------------------------------------------


def test_vegas_keeps_the_estimated_queue_between_alpha_and_beta() -> None:
    v = Vegas(initial=20, max_limit=100)
    assert v.update(0.1, 20, False) == 20 and v.rtt_noload == 0.1  # first: the lowest RTT
    assert v.update(0.1, 20, False) == 26  # no queue: + beta (6 * log10, at least 1)
    assert v.update(0.1 / (1 - 2 / 26), 26, False) == 27  # 2 queued (< alpha = 3): +1
    assert v.update(0.1 / (1 - 5 / 27), 27, False) == 27  # 5 queued: between, held
    assert v.update(0.1 / (1 - 8 / 27), 27, False) == 26  # 8 queued (> beta = 6): -1
    assert v.update(0.05, 26, False) == 26 and v.rtt_noload == 0.05  # a new lowest RTT
    assert v.update(1.0, 26, True) == 23  # a drop: * 0.9


def test_vegas_relearns_its_lowest_rtt_every_probe_interval() -> None:
    v = Vegas(initial=2, max_limit=2, probe_every=3)
    v.update(0.1, 2, False)
    for _ in range(4):
        v.update(0.5, 2, False)
    assert v.rtt_noload == 0.1
    v.update(0.5, 2, False)  # the 6th sample: 3 x limit 2
    assert v.rtt_noload == 0.5


def test_vegas_does_not_grow_while_the_limit_is_not_used() -> None:
    v = Vegas(initial=20)
    v.update(0.1, 20, False)
    assert v.update(0.1, 9, False) == 20


# -- all of them --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_bad_bounds_are_refused(kind: type[AdaptiveLimit]) -> None:
    with pytest.raises(ConfigurationError, match=r"min_limit must be an integer >= 1"):
        kind(initial=1, min_limit=0)
    with pytest.raises(ConfigurationError, match=r"initial must be <= max_limit \(4\)"):
        kind(initial=5, max_limit=4)
    with pytest.raises(ConfigurationError, match=r"max_limit must be an integer >= 3"):
        kind(initial=3, min_limit=3, max_limit=2)
    with pytest.raises(ConfigurationError, match=r"backoff_ratio must be a number > 0 and < 1"):
        kind(backoff_ratio=1.0)  # type: ignore[call-arg]


def test_bad_tuning_is_refused() -> None:
    with pytest.raises(ConfigurationError, match=r"Gradient2.tolerance must be a number >= 1"):
        Gradient2(tolerance=0.9)
    with pytest.raises(ConfigurationError, match=r"Gradient2.smoothing"):
        Gradient2(smoothing=0)
    with pytest.raises(ConfigurationError, match=r"Gradient2.queue_size"):
        Gradient2(queue_size=-1)
    with pytest.raises(ConfigurationError, match=r"AIMD.increase"):
        AIMD(increase=0)
    with pytest.raises(ConfigurationError, match=r"Vegas.probe_every"):
        Vegas(probe_every=0)


def test_repr() -> None:
    assert repr(AIMD(initial=3, max_limit=8)) == "AIMD(limit=3, min_limit=1, max_limit=8)"


_rtts = st.floats(min_value=0.0, max_value=60.0, allow_nan=False)
_samples = st.lists(
    st.tuples(_rtts, st.integers(min_value=0, max_value=500), st.booleans()), max_size=200
)


@st.composite
def _limits(draw: st.DrawFn) -> AIMD | Gradient2 | Vegas:
    kind = draw(st.sampled_from(KINDS))
    low = draw(st.integers(min_value=1, max_value=50))
    high = draw(st.integers(min_value=low, max_value=200))
    initial = draw(st.integers(min_value=low, max_value=high))
    return kind(initial=initial, min_limit=low, max_limit=high)


@settings(max_examples=300, deadline=None)
@given(_limits(), _samples)
def test_property_the_limit_stays_within_its_bounds(
    limit: AdaptiveLimit, samples: list[tuple[float, int, bool]]
) -> None:
    for rtt, in_flight, dropped in samples:
        new = limit.update(rtt, in_flight, dropped)
        assert new == limit.limit
        assert limit.min_limit <= new <= limit.max_limit


@settings(max_examples=300, deadline=None)
@given(_limits(), _samples, _rtts, st.integers(min_value=0, max_value=500))
def test_property_a_drop_always_cuts_the_limit(
    limit: AdaptiveLimit, prefix: list[tuple[float, int, bool]], rtt: float, in_flight: int
) -> None:
    for sample in prefix:
        limit.update(*sample)
    before = limit.limit
    after = limit.update(rtt, in_flight, True)
    assert after < before or after == before == limit.min_limit


@settings(max_examples=300, deadline=None)
@given(
    _limits(),
    st.floats(min_value=1e-3, max_value=60.0),
    st.lists(
        st.tuples(
            st.floats(min_value=1.0, max_value=10.0),
            st.integers(min_value=0, max_value=500),
            st.booleans(),
        ),
        max_size=50,
    ),
)
def test_property_the_limit_grows_while_rtt_is_flat_and_the_limit_is_used(
    limit: AdaptiveLimit, rtt: float, prefix: list[tuple[float, int, bool]]
) -> None:
    # whatever came before, as long as it was no faster than now (a new, lower latency is news)
    for factor, in_flight, dropped in prefix:
        limit.update(rtt * factor, in_flight, dropped)
    start = limit.limit
    previous = start
    for _ in range(limit.max_limit + 2):  # a round trip's worth of calls, and more
        now = limit.update(rtt, limit.limit, False)
        assert now >= previous  # never falls
        previous = now
    assert previous > start or start == limit.max_limit


# -- the policy ---------------------------------------------------------------------------------


def test_policy_defaults_and_validation() -> None:
    assert BulkheadPolicy().adaptive is None
    assert BulkheadPolicy().start_concurrent == 1000
    assert BulkheadPolicy(adaptive="aimd").start_concurrent == 16
    assert BulkheadPolicy(adaptive="vegas", max_concurrent=8).start_concurrent == 8
    assert BulkheadPolicy(adaptive="gradient", min_concurrent=20).start_concurrent == 20
    assert BulkheadPolicy(adaptive="aimd", initial_concurrent=3).start_concurrent == 3
    with pytest.raises(ConfigurationError, match=r"adaptive must be one of 'aimd', 'gradient'"):
        BulkheadPolicy(adaptive="tcp")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match=r"need an adaptive cap"):
        BulkheadPolicy(min_concurrent=4)
    with pytest.raises(ConfigurationError, match=r"need an adaptive cap"):
        BulkheadPolicy(initial_concurrent=4)
    with pytest.raises(ConfigurationError, match=r"min_concurrent must be <= max_concurrent"):
        BulkheadPolicy(adaptive="aimd", max_concurrent=4, min_concurrent=5)
    with pytest.raises(ConfigurationError, match=r"initial_concurrent must be between"):
        BulkheadPolicy(adaptive="aimd", max_concurrent=4, initial_concurrent=5)
    with pytest.raises(ConfigurationError, match=r"min_concurrent must be an integer >= 1"):
        BulkheadPolicy(adaptive="aimd", min_concurrent=0)


def test_the_guards_table_takes_an_adaptive_cap() -> None:
    table = {"bulkhead": {"adaptive": "aimd", "max_concurrent": 32, "min_concurrent": 2}}
    policy = GuardsConfig.model_validate(table).policies()["bulkhead"]
    assert policy == BulkheadPolicy(adaptive="aimd", max_concurrent=32, min_concurrent=2)
    stack = GuardsConfig.model_validate(table).build(FakeBackend("b"))
    assert stack.bulkhead is not None and isinstance(stack.bulkhead.adaptive_limit, AIMD)
    with pytest.raises(ValueError, match=r"adaptive must be one of"):
        GuardsConfig.model_validate({"bulkhead": {"adaptive": "fast"}})
    config = parse_config(
        {
            "defaults": {"guards": {"bulkhead": {"adaptive": "gradient"}}},
            "backends": {"a": {"type": "fake"}, "b": {"type": "fake", "guards": {}}},
        }
    )
    assert config is not None


# -- the bulkhead -------------------------------------------------------------------------------


def _limit_of(bulkhead: Bulkhead | None) -> int:
    assert bulkhead is not None
    return bulkhead.statistics().limit


def test_a_fixed_cap_reports_its_limit() -> None:
    bulkhead = Bulkhead(FakeBackend("b"), BulkheadPolicy(max_concurrent=7))
    stats = bulkhead.statistics()
    assert (stats.max_concurrent, stats.limit) == (7, 7)
    assert bulkhead.adaptive_limit is None


@pytest.mark.parametrize("anyio_backend", [MOCK_TRIO])
@pytest.mark.anyio
async def test_a_retried_429_still_cuts_the_cap() -> None:
    fake = FakeBackend("b", [Fail(error=RateLimitError), Reply(text="ok", latency=1.0)])
    stack = guard(
        fake,
        bulkhead=BulkheadPolicy(adaptive="aimd", initial_concurrent=10),
        retry=RetryPolicy(attempts=2, initial=0.1, budget=None),
    )
    with capture_events() as events:
        assert (await stack.complete(REQ)).text == "ok"  # the caller saw only success
    assert _limit_of(stack.bulkhead) == 9  # the attempt's 429 cut the cap; the answer did not
    cut = [e for e in events if e["event"] == "bulkhead_limit_cut"]
    assert len(cut) == 1 and cut[0]["limit"] == 9 and cut[0]["reason"] == "RateLimitError"


@pytest.mark.parametrize("anyio_backend", [MOCK_TRIO])
@pytest.mark.anyio
@pytest.mark.parametrize(
    ("error", "cuts"),
    [
        (RateLimitError, True),
        (BackendTimeoutError, True),
        (HTTPStatusError("overloaded", status_code=529), True),
        (HTTPStatusError("unavailable", status_code=503), True),
        (HTTPStatusError("bug", status_code=500), False),
        (HTTPStatusError("bad", status_code=400), False),
        (BackendConnectionError, False),
    ],
)
async def test_what_counts_as_a_drop(error: object, cuts: bool) -> None:
    fake = FakeBackend("b", [Fail(error=error)])  # type: ignore[arg-type]
    stack = guard(fake, bulkhead=BulkheadPolicy(adaptive="aimd"), retry=None)
    with pytest.raises(BackendError):
        await stack.complete(REQ)
    assert _limit_of(stack.bulkhead) == (14 if cuts else 16)


@pytest.mark.parametrize("anyio_backend", [MOCK_TRIO])
@pytest.mark.anyio
async def test_a_hung_attempt_is_a_drop_through_the_timeout() -> None:
    stack = guard(FakeBackend("b", latency=100), bulkhead=BulkheadPolicy(adaptive="aimd"))
    stack = guard(
        FakeBackend("b", latency=100),
        bulkhead=BulkheadPolicy(adaptive="aimd"),
        retry=None,
        timeout=1.0,
    )
    with pytest.raises(BackendTimeoutError):
        await stack.complete(REQ)
    assert _limit_of(stack.bulkhead) == 14


@pytest.mark.parametrize("anyio_backend", [MOCK_TRIO])
@pytest.mark.anyio
async def test_a_burst_of_429s_cuts_the_cap_once_per_round_trip() -> None:
    fake = FakeBackend("b", [Fail(error=RateLimitError, latency=1.0)])
    stack = guard(fake, bulkhead=BulkheadPolicy(adaptive="aimd"), retry=None, breaker=None)
    async with anyio.create_task_group() as tg:
        for _ in range(16):
            tg.start_soon(_swallow, stack.complete)
    assert _limit_of(stack.bulkhead) == 14  # 16 refusals sent under one cap: one cut, not 0.9**16
    await _swallow(stack.complete)  # sent after the cut: cuts again
    assert _limit_of(stack.bulkhead) == 12


async def _swallow(call: Callable[[ChatRequest], object]) -> None:
    try:
        await call(REQ)  # type: ignore[misc]
    except Exception:
        pass


@pytest.mark.parametrize("anyio_backend", [MOCK_TRIO])
@pytest.mark.anyio
async def test_a_lower_cap_holds_at_once_and_a_higher_one_lets_waiters_in() -> None:
    fake = FakeBackend("b", latency=1.0)
    stack = guard(
        fake,
        bulkhead=BulkheadPolicy(adaptive="aimd", max_concurrent=8, initial_concurrent=2),
        retry=None,
    )
    async with anyio.create_task_group() as tg:
        for _ in range(14):
            tg.start_soon(stack.complete, REQ)
    # slow start: each finished call that used the cap adds a slot and wakes a waiter with it
    # (2 at once, then 3 or 4, then 6 to 8: a call that started with fewer than half of the cap
    # in flight does not count as using it, and trio runs the calls of a round in any order)
    assert 6 <= fake.max_in_flight <= 8
    assert fake.completed == 14
    assert _limit_of(stack.bulkhead) > fake.max_in_flight - 2
    assert stack.bulkhead is not None and stack.bulkhead.statistics().running == 0


@pytest.mark.parametrize("anyio_backend", [MOCK_TRIO])
@pytest.mark.anyio
async def test_after_a_cut_no_new_call_starts_until_the_running_ones_fit() -> None:
    fake = FakeBackend("b", [Fail(error=RateLimitError, latency=0.5), *["ok"] * 99], latency=2.0)
    stack = guard(
        fake,
        bulkhead=BulkheadPolicy(adaptive="aimd", max_concurrent=10, initial_concurrent=10),
        retry=None,
    )
    assert stack.bulkhead is not None
    bulkhead = stack.bulkhead
    seen: dict[float, tuple[int, int]] = {}

    async def watch() -> None:
        start = anyio.current_time()
        for at in (0.25, 0.75, 1.5, 2.25, 4.25):
            await anyio.sleep_until(start + at)
            seen[at] = (bulkhead.statistics().limit, fake.in_flight)

    async with anyio.create_task_group() as tg:
        tg.start_soon(watch)
        for _ in range(30):
            tg.start_soon(_swallow, stack.complete)
    assert seen[0.25] == (10, 10)
    assert seen[0.75] == seen[1.5] == (9, 9)  # the refused call's slot was not handed on
    assert seen[2.25] == (9, 9)  # 9 answers, 9 new calls: +1/9 a call, not yet a slot more
    assert seen[4.25] == (10, 10)  # one slot per round trip
    assert fake.max_in_flight == 10


@pytest.mark.parametrize("anyio_backend", [MOCK_TRIO])
@pytest.mark.anyio
async def test_a_bulkhead_on_its_own_samples_its_own_calls() -> None:
    fake = FakeBackend("b", [Fail(error=RateLimitError), "ok"])
    bulkhead = Bulkhead(fake, BulkheadPolicy(adaptive="gradient", initial_concurrent=10))
    with pytest.raises(RateLimitError):
        await bulkhead.complete(REQ)
    assert bulkhead.statistics().limit == 9
    assert isinstance(bulkhead.adaptive_limit, Gradient2)


@pytest.mark.parametrize("anyio_backend", [MOCK_TRIO])
@pytest.mark.anyio
@pytest.mark.parametrize("standalone", [False, True])
async def test_streams_are_sampled_to_their_end(standalone: bool) -> None:
    fake = FakeBackend("b", [Reply(text="a b c", latency=1.0), Fail(error=RateLimitError)])
    policy = BulkheadPolicy(adaptive="vegas", initial_concurrent=10)
    stack = Bulkhead(fake, policy) if standalone else guard(fake, bulkhead=policy, retry=None)
    bulkhead = stack if isinstance(stack, Bulkhead) else stack.bulkhead
    assert bulkhead is not None and isinstance(bulkhead.adaptive_limit, Vegas)
    words = [event async for event in stack.stream(REQ)]
    assert len(words) == 4
    assert bulkhead.adaptive_limit.rtt_noload == pytest.approx(1.0)
    with pytest.raises(RateLimitError):
        async for _ in stack.stream(REQ):
            pass
    assert bulkhead.statistics().limit == 9


@pytest.mark.parametrize("anyio_backend", [MOCK_TRIO])
@pytest.mark.anyio
async def test_shed_calls_are_not_samples() -> None:
    fake = FakeBackend("b", latency=1.0)
    policy = BulkheadPolicy(adaptive="aimd", max_concurrent=4, initial_concurrent=1, max_queued=0)
    stack = guard(fake, bulkhead=policy, retry=None)
    async with anyio.create_task_group() as tg:
        tg.start_soon(stack.complete, REQ)
        await anyio.sleep(0.1)
        with pytest.raises(BulkheadFullError):
            await stack.complete(REQ)
    assert _limit_of(stack.bulkhead) == 2  # the one answer grew it; the refusal did nothing


# -- against a server of capacity C (the benchmark, small, on a mock clock) ----------------------


class _Server:
    """C slots of L seconds; FIFO queue beyond; 429 beyond 2C in the system."""

    def __init__(self, capacity: int, latency: float) -> None:
        self.slots = anyio.CapacityLimiter(capacity)
        self.capacity = capacity
        self.latency = latency
        self.in_system = 0
        self.refused = 0

    async def __call__(self, request: ChatRequest) -> Reply | Fail:
        if self.in_system >= 2 * self.capacity:
            self.refused += 1
            return Fail(error=RateLimitError)
        self.in_system += 1
        try:
            async with self.slots:
                await anyio.sleep(self.latency)
        finally:
            self.in_system -= 1
        return Reply(text="ok")


async def _drive(policy: BulkheadPolicy, seconds: float = 60.0) -> tuple[int, int, float]:
    """Open-loop load at 1.5x the capacity: (answers, 429s, mean time of an answer)."""
    server = _Server(capacity=20, latency=1.0)
    stack = guard(FakeBackend("srv", server), bulkhead=policy, retry=None, breaker=None)
    answers: list[float] = []

    async def call() -> None:
        start = anyio.current_time()
        try:
            await stack.complete(REQ)
        except (RateLimitError, BulkheadFullError):
            return
        answers.append(anyio.current_time() - start)

    async with anyio.create_task_group() as tg:
        for _ in range(int(seconds * 30)):
            tg.start_soon(call)
            await anyio.sleep(1 / 30)
    return len(answers), server.refused, sum(answers) / len(answers)


@pytest.mark.parametrize("anyio_backend", [MOCK_TRIO])
@pytest.mark.anyio
async def test_adaptive_caps_find_the_capacity_they_were_not_told() -> None:
    capacity = 20 * 60  # answers the server can give in the run
    fixed_c = await _drive(BulkheadPolicy(max_concurrent=20, max_queued=0))
    fixed_4c = await _drive(BulkheadPolicy(max_concurrent=80, max_queued=0))
    assert fixed_c[1] == 0 and fixed_c[2] == pytest.approx(1.0)  # the oracle: told C
    assert fixed_4c[1] > 500 and fixed_4c[2] > 1.9  # oversized: 429s, and a full queue
    found = {
        kind: await _drive(BulkheadPolicy(adaptive=kind, max_queued=0))
        for kind in ("aimd", "gradient", "vegas")
    }
    for kind, (answers, _, _) in found.items():
        assert answers >= 0.85 * capacity, kind
    # drops drive AIMD: it stops just short of the 429s, with the server's queue full
    assert found["aimd"][1] < fixed_4c[1] / 10 and found["aimd"][2] > 1.5
    # gradient2 lets latency rise to its tolerance, then meets the 429s
    assert found["gradient"][1] < fixed_4c[1] / 2 and found["gradient"][2] > 1.5
    # Vegas reads the queue from the lowest latency: it keeps the queue short
    assert found["vegas"][1] < fixed_4c[1] / 10 and found["vegas"][2] < 1.5
