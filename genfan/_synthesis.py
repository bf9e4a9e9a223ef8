"""Synthesis (Mixture-of-Agents): proposers answer, an aggregator writes the final answer.

Wang et al. (2024): several proposer models answer; in each further layer the proposers answer
again with the previous layer's answers as references; finally an aggregator model synthesises
one answer from the last layer's. The prompt is MoA's "aggregate-and-synthesize" prompt, placed
in the system message (after any system prompt the request already had).

A synthesis is a [`Backend`][genfan.Backend] too (`Synthesis.complete` gives the aggregator's
answer), so it can be a fan-out target or a cascade tier.

Closing a synthesis closes only the proposers' fan-out it built (from a list of backends), which
leaves the backends open; the backends, the aggregator and a fan-out passed in belong to
whoever made them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ._backend import Backend, BaseBackend, aclose_all
from ._errors import AllBackendsFailedError, ConfigurationError
from ._fanout import Cut, FanOut, FanOutResult, Target, check_max_cost, no_answer
from ._sync import clip, not_awaited, run_sync
from ._types import ChatRequest, Completion, Message, Usage
from .cost import MaxCostError, estimate_cost
from .select import Candidate

__all__ = ["AGGREGATE_PROMPT", "Synthesis", "SynthesisResult", "aggregate_request"]

AGGREGATE_PROMPT = (
    "You have been provided with a set of responses from various models to the latest user "
    "query. Your task is to synthesize these responses into a single, high-quality response. "
    "It is crucial to critically evaluate the information provided in these responses, "
    "recognizing that some of it may be biased or incorrect. Your response should not simply "
    "replicate the given answers but should offer a refined, accurate, and comprehensive reply "
    "to the instruction. Ensure your response is well-structured, coherent, and adheres to the "
    "highest standards of accuracy and reliability.\n\nResponses from models:"
)


def aggregate_request(
    request: ChatRequest, references: Sequence[str], *, prompt: str = AGGREGATE_PROMPT
) -> ChatRequest:
    """``request`` with the references injected MoA-style.

    The system message becomes the request's own system prompt (if any), a blank line, then
    ``prompt`` followed by the numbered references (``"\\n1. ..."``); the other messages stay.
    """
    refs = "".join(f"\n{i}. {text}" for i, text in enumerate(references, 1))
    system = prompt + refs
    messages = list(request.messages)
    if messages and messages[0].role == "system":
        system = f"{messages[0].content or ''}\n\n{system}"
        messages = messages[1:]
    return request.model_copy(update={"messages": (Message.system(system), *messages)})


@dataclass(frozen=True, kw_only=True)
class SynthesisResult:
    """The aggregator's answer and what led to it.

    Attributes:
        completion: the aggregator's completion.
        layers: the proposers' fan-out result of each layer, in order.
        aggregate_request: the request the aggregator received.
    """

    completion: Completion
    layers: tuple[FanOutResult, ...]
    aggregate_request: ChatRequest

    @property
    def text(self) -> str:
        return self.completion.text

    @property
    def usage(self) -> Usage:
        """Tokens (and cost) of every proposer call and the aggregator's."""
        total = self.completion.usage
        for layer in self.layers:
            total = total + layer.usage
        return total

    @property
    def cost(self) -> float | None:
        """USD of every proposer call and the aggregator's (``None``: no price known)."""
        return self.usage.cost

    @property
    def cut(self) -> tuple[Cut, ...]:
        """The proposer calls ``max_cost`` cut, layer after layer."""
        return tuple(c for layer in self.layers for c in layer.cut)

    def __repr__(self) -> str:
        answered = sum(len(layer.successes) for layer in self.layers)
        asked = sum(len(layer.candidates) for layer in self.layers)
        # layers run one after another, then the aggregator
        elapsed = sum(x.elapsed for x in self.layers) + self.completion.latency
        return (
            f"SynthesisResult(aggregator={self.completion.backend!r}, text={clip(self.text)!r}, "
            f"layers={len(self.layers)}, proposals={answered}/{asked}, elapsed={elapsed:.3f}s)"
        )


class Synthesis(BaseBackend):
    """Mixture-of-Agents: proposer layers, then one aggregator call.

    A synthesis is a [`Backend`][genfan.Backend]: `complete` (and `stream`, which
    replays it) returns the aggregator's completion; where `run` raises
    [`AllBackendsFailedError`][genfan.AllBackendsFailedError] it raises [`NoAnswerError`][genfan.NoAnswerError], and the
    aggregator's own error as it is.

    Args:
        proposers: a [`FanOut`][genfan.FanOut], or backends/targets (run as ``FanOut(mode="all")``).
        aggregator: the backend that writes the final answer.
        layers: how many proposer layers (1: propose once, then aggregate; 2: propose, propose
            again seeing the first answers, then aggregate...).
        prompt: the aggregate-and-synthesize instruction (references are appended to it).
        max_references: use at most this many answers (in the order the proposers finished).
        name: the synthesis's backend name (default ``"synthesis(a,b,...->aggregator)"``).
        max_cost: a cap in USD on a run. The aggregator's call is reserved first (its
            estimate on the request without references); each proposer layer runs under what
            is left (its fan-out skips the calls that do not fit, see `FanOut`'s
            ``max_cost``); the aggregator is called only if its estimate, references
            included, still fits, else `run` raises [`MaxCostError`][genfan.cost.MaxCostError].
            Every backend needs a known price.

    Example:
        ```python
        moa = Synthesis([gpt, claude, llama], aggregator=gpt, layers=2)
        result = await moa.run("Explain the CAP theorem in two sentences.")
        # from sync code: result = moa.run_sync("Explain the CAP theorem in two sentences.")
        ```
    """

    def __init__(
        self,
        proposers: FanOut | Sequence[Backend | Target],
        aggregator: Backend,
        *,
        layers: int = 1,
        prompt: str = AGGREGATE_PROMPT,
        max_references: int | None = None,
        name: str | None = None,
        max_cost: float | None = None,
    ) -> None:
        not_awaited(proposers, "Synthesis()")
        check_max_cost(max_cost)
        self.max_cost = max_cost
        not_awaited(aggregator, "Synthesis()")
        if not isinstance(layers, int) or layers < 1:
            raise ConfigurationError(f"layers must be an integer >= 1, got {layers!r}")
        if max_references is not None and max_references < 1:
            raise ConfigurationError(f"max_references must be >= 1 or None, got {max_references!r}")
        self.fanout = proposers if isinstance(proposers, FanOut) else FanOut(proposers, mode="all")
        self._built = self.fanout is not proposers  # closed with the synthesis
        self.aggregator = aggregator
        self.layers = layers
        self.prompt = prompt
        self.max_references = max_references
        super().__init__(
            name or "synthesis(" + ",".join(self.fanout.names) + "->" + aggregator.name + ")"
        )

    def references(self, candidates: Sequence[Candidate]) -> list[str]:
        """The answers passed on: successful, non-empty, in finishing order."""
        ok = [c for c in candidates if c.ok and c.text.strip()]
        ok.sort(key=lambda c: c.finished_order if c.finished_order is not None else 1 << 30)
        texts = [c.text for c in ok]
        return texts[: self.max_references] if self.max_references else texts

    async def synthesize(self, request: ChatRequest, candidates: Sequence[Candidate]) -> Completion:
        """One aggregator call over ``candidates``' answers."""
        not_awaited(candidates, "Synthesis.synthesize()")
        return await self.aggregator.complete(
            aggregate_request(request, self.references(candidates), prompt=self.prompt)
        )

    async def run(self, request: ChatRequest | str) -> SynthesisResult:
        """Run the proposer layers and the aggregator: ``result = await moa.run("...")``
        (from sync code: `run_sync`).

        Raises:
            AllBackendsFailedError: every proposer of a layer failed (or ``max_cost`` cut
                them all).
            BackendError: the aggregator failed; a `MaxCostError` when ``max_cost`` left no
                room for it.
            ConfigurationError: ``max_cost`` and a backend whose price is unknown.
        """
        not_awaited(request, "Synthesis.run()")
        req = ChatRequest.from_prompt(request) if isinstance(request, str) else request
        results: list[FanOutResult] = []
        layer_request = req
        cap = self.max_cost
        spent = 0.0
        reserve = 0.0
        if cap is not None:
            reserve = self._aggregator_estimate(aggregate_request(req, [], prompt=self.prompt))
        for _ in range(self.layers):
            if cap is None:
                result = await self.fanout.run(layer_request)
            else:
                result = await self.fanout.run(
                    layer_request, max_cost=max(cap - spent - reserve, 0.0)
                )
                spent += result.cost or 0.0
            results.append(result)
            layer_request = aggregate_request(
                req, self.references(result.candidates), prompt=self.prompt
            )
        if cap is not None:
            estimate = self._aggregator_estimate(layer_request)
            if spent + estimate > cap:
                raise MaxCostError(
                    f"the aggregator was not called: its estimated ${estimate:.6f} on top of "
                    f"the ${spent:.6f} the proposers spent would pass max_cost=${cap:g}",
                    backend=self.aggregator.name,
                    action="skipped",
                    max_cost=cap,
                    spent=spent,
                    estimate=estimate,
                )
        completion = await self.aggregator.complete(layer_request)
        return SynthesisResult(
            completion=completion, layers=tuple(results), aggregate_request=layer_request
        )

    def _aggregator_estimate(self, request: ChatRequest) -> float:
        estimate = estimate_cost(self.aggregator, request)
        if estimate is None:
            raise ConfigurationError(
                f"max_cost needs the aggregator's price, and {self.aggregator.name!r} has "
                "none: give it price=(input, output) in USD per 1M tokens, or drop max_cost"
            )
        return estimate

    def run_sync(self, request: ChatRequest | str) -> SynthesisResult:
        """`run` for sync code: ``result = moa.run_sync("...")``.

        It blocks until the aggregator answered, in a plain script or inside a running event
        loop (a notebook), whose loop it blocks meanwhile, as a sync HTTP client would: in
        async code, ``await moa.run(...)`` instead.

        Raises:
            AllBackendsFailedError: every proposer of a layer failed.
            BackendError: the aggregator failed.
        """
        return run_sync(self.run, request)

    async def complete(self, request: ChatRequest) -> Completion:
        """Run the layers and the aggregator; return its completion (the Backend protocol).

        Raises:
            NoAnswerError: every proposer of a layer failed.
            BackendError: the aggregator failed (its own error).
        """
        try:
            result = await self.run(request)
        except AllBackendsFailedError as exc:
            raise no_answer(exc, backend=self.name) from exc
        return result.completion

    async def aclose(self) -> None:
        """Close what the synthesis created: the proposers' fan-out it built from a list (which
        leaves those backends open). The backends, the aggregator and a fan-out passed in stay
        open."""
        if self._built:
            await aclose_all([self.fanout])
