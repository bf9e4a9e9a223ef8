"""Selection end to end on the real local model (SmolLM2-135M in the in-process vLLM engine).

Slow (starts the engine): marked ``engine``; asyncio only (vLLM is asyncio-only).
"""

from __future__ import annotations

import anyio
import pytest

from genfan import Cascade, ChatRequest, FanOut, Synthesis, Target, Tier
from genfan.select import Consensus, LLMJudge, MajorityVote, RefusalDetector, Select

pytestmark = [pytest.mark.engine, pytest.mark.anyio]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def test_selection_end_to_end_on_the_local_model() -> None:
    vllm_local = pytest.importorskip("genfan_providers.vllm")
    backend = vllm_local.VLLMBackend()
    try:
        await backend.start()
        question = ChatRequest.from_prompt(
            "What is 6 + 7?\nAnswer with just the number.", max_tokens=24
        )

        # 1. Five samples, voted on (refusals filtered), consensus and judge as extra scorers.
        judge = LLMJudge(backend, max_tokens=12)
        vote = MajorityVote(extract="number")
        select = Select(
            scorers=[(vote, 1.0), (Consensus(), 0.5), (judge, 0.25)],
            filters=[RefusalDetector()],
            if_none_pass="best",
        )
        samples = [Target(backend=backend, temperature=0.7) for _ in range(5)]
        result = await FanOut(samples, select=select).run(question)
        assert [c.status for c in result.candidates] == ["ok"] * 5
        assert all(c.completion and c.completion.usage.output_tokens > 0 for c in result.candidates)
        sel = result.selection
        assert sel.chosen is not None
        assert sel.confidence is not None and 0.0 <= sel.confidence <= 1.0
        assert set(sel.by_scorer) == {"vote", "consensus", "judge"}
        assert result.candidates[sel.chosen].backend in sel.explanation
        stats = judge.statistics()
        # the 135M judge rarely keeps to the format: whatever it says, it is counted, not raised
        assert stats.calls >= 1 and stats.parsed + stats.unparsed + stats.failed == stats.calls

        # 2. Early exit: two short greedy answers agree while long ones are still generating;
        #    the long ones are cancelled and aborted in the engine.
        story = ChatRequest.from_prompt("Write a long story about a dragon who loves tea.")
        short = [Target(backend=backend, temperature=0.0, max_tokens=4) for _ in range(2)]
        long = [Target(backend=backend, temperature=0.0, max_tokens=400) for _ in range(3)]
        agree = MajorityVote(extract="normalize")
        early = await FanOut([*long, *short], **agree.early_exit(2)).run(story)
        assert early.quorum_met
        assert [c.status for c in early.candidates] == ["cancelled"] * 3 + ["ok"] * 2
        assert early.selection.confidence == 1.0
        with anyio.fail_after(30):
            # the engine offers no event for "idle": poll its request count
            while (s := backend.stats()) is not None and s.running_requests:  # noqa: ASYNC110
                await anyio.sleep(0.1)

        # 3. Cascade: a greedy answer alone is "confident" (1 of 1), so the sampling tier is
        #    never called.
        cascade = Cascade(
            [
                Tier(backends=[Target(backend=backend, temperature=0.0)], name="greedy"),
                Tier(backends=samples, name="samples"),
            ],
            selector=vote.selector(),
            threshold=0.9,
        )
        outcome = await cascade.run(question)
        assert outcome.tiers_used == ["greedy"]
        # the local engine is free unless priced: nothing spent, and nothing saved in USD
        assert outcome.cost == 0.0 and outcome.saved == 0.0

        # 4. Synthesis: the model aggregates its own three samples.
        moa = Synthesis(samples[:3], aggregator=backend)
        synth = await moa.run(question)
        assert synth.text.strip()
        assert "Responses from models:\n1. " in (synth.aggregate_request.messages[0].content or "")
    finally:
        await backend.aclose()


async def test_logprobs_and_an_n_sample_wave_from_the_local_engine() -> None:
    vllm_local = pytest.importorskip("genfan_providers.vllm")
    from genfan import MultiSampleBackend, Sampling
    from genfan.select import AutoSelect, Waves

    backend = vllm_local.VLLMBackend()
    try:
        await backend.start()
        asked = ChatRequest.from_prompt(
            "What is the capital of France? Answer with one word.", max_tokens=12, logprobs=True
        )
        one = await backend.complete(asked)
        assert one.logprobs is not None and 0 < len(one.logprobs) <= one.usage.output_tokens
        assert "".join(t.token for t in one.logprobs) == one.text  # the end token left out
        assert all(t.logprob <= 0.0 for t in one.logprobs)
        assert one.logprob_stats is not None and 0.0 < one.logprob_stats.probability <= 1.0
        plain = await backend.complete(asked.with_overrides(logprobs=False))
        assert plain.logprobs is None

        # One engine request, n samples: the prompt counted once, every sample with logprobs.
        assert isinstance(backend, MultiSampleBackend)
        wave = await backend.sample(asked.with_overrides(temperature=0.7), 4)
        assert len(wave) == 4
        assert wave[0].usage.input_tokens > 0 and all(c.usage.input_tokens == 0 for c in wave[1:])
        assert all(c.logprobs and c.usage.output_tokens > 0 for c in wave)

        # Adaptive sampling end to end: waves of 2, the auto selector picks and explains.
        sampler = Sampling(backend, 6, waves=Waves(size=2), temperature=0.7, max_tokens=12)
        result = await sampler.run(asked)
        drawn = len(result.successes)
        assert drawn in (2, 4, 6)
        assert all(c.status == "cancelled" for c in result.candidates[drawn:])
        assert result.selection.method == "auto:short"
        assert result.selection.confidence is not None
        assert isinstance(sampler.selector, AutoSelect)
    finally:
        await backend.aclose()
