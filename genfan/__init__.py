"""genfan: fan a prompt out to several LLMs at once, pick the best answer, stay up under failure.

This facade holds the core: messages and completions, the error tree, the ``Backend`` protocol
and its registry, and the composites that run fan-outs (``FanOut``, ``Cascade``,
``Synthesis``) with the configuration that builds them. Each subsystem has a facade of its own:
``genfan.select``, ``genfan.resilience``, ``genfan.agents``, ``genfan.batching``,
``genfan.schedule``, and the test kit ``genfan.testing``. Every public name has exactly one
import path.
"""

from typing import TYPE_CHECKING

from ._facade import lazy

__version__ = "0.1.0"

if TYPE_CHECKING:
    from ._adaptive import MultiSampleBackend as MultiSampleBackend
    from ._adaptive import Sampling as Sampling
    from ._backend import Backend as Backend
    from ._backend import BackendFactory as BackendFactory
    from ._backend import BaseBackend as BaseBackend
    from ._backend import collect_stream as collect_stream
    from ._backend import merge_tool_call_deltas as merge_tool_call_deltas
    from ._backend import register_backend as register_backend
    from ._backend import registered_prefixes as registered_prefixes
    from ._cascade import Cascade as Cascade
    from ._cascade import CascadeResult as CascadeResult
    from ._cascade import Tier as Tier
    from ._cascade import TierOutcome as TierOutcome
    from ._config import BackendConfig as BackendConfig
    from ._config import FanOutConfig as FanOutConfig
    from ._config import GenfanConfig as GenfanConfig
    from ._config import load_config as load_config
    from ._config import parse_config as parse_config
    from ._create import create_backend as create_backend
    from ._errors import AllBackendsFailedError as AllBackendsFailedError
    from ._errors import AnswerRejectedError as AnswerRejectedError
    from ._errors import BackendConnectionError as BackendConnectionError
    from ._errors import BackendError as BackendError
    from ._errors import BackendTimeoutError as BackendTimeoutError
    from ._errors import BudgetExceededError as BudgetExceededError
    from ._errors import BulkheadFullError as BulkheadFullError
    from ._errors import CallCancelledError as CallCancelledError
    from ._errors import CircuitOpenError as CircuitOpenError
    from ._errors import ConfigurationError as ConfigurationError
    from ._errors import GenfanError as GenfanError
    from ._errors import HTTPStatusError as HTTPStatusError
    from ._errors import MalformedResponseError as MalformedResponseError
    from ._errors import MissingExtraError as MissingExtraError
    from ._errors import NoAnswerError as NoAnswerError
    from ._errors import RateLimitError as RateLimitError
    from ._errors import RateLimitExceededError as RateLimitExceededError
    from ._errors import ResponseTooLargeError as ResponseTooLargeError
    from ._errors import StreamInterruptedError as StreamInterruptedError
    from ._fanout import AnswerChosen as AnswerChosen
    from ._fanout import CandidateDelta as CandidateDelta
    from ._fanout import CandidateFinished as CandidateFinished
    from ._fanout import Cut as Cut
    from ._fanout import FanOut as FanOut
    from ._fanout import FanOutEvent as FanOutEvent
    from ._fanout import FanOutFinished as FanOutFinished
    from ._fanout import FanOutResult as FanOutResult
    from ._fanout import FanOutStream as FanOutStream
    from ._fanout import Mode as Mode
    from ._fanout import PromptCache as PromptCache
    from ._fanout import Target as Target
    from ._output import AnswerCheck as AnswerCheck
    from ._output import OutputValidationError as OutputValidationError
    from ._output import ValidateLike as ValidateLike
    from ._synthesis import AGGREGATE_PROMPT as AGGREGATE_PROMPT
    from ._synthesis import Synthesis as Synthesis
    from ._synthesis import SynthesisResult as SynthesisResult
    from ._synthesis import aggregate_request as aggregate_request
    from ._types import CacheTTL as CacheTTL
    from ._types import ChatRequest as ChatRequest
    from ._types import Completion as Completion
    from ._types import FinishReason as FinishReason
    from ._types import JsonValue as JsonValue
    from ._types import LogprobStats as LogprobStats
    from ._types import Message as Message
    from ._types import RateLimitInfo as RateLimitInfo
    from ._types import ResponseFormat as ResponseFormat
    from ._types import Role as Role
    from ._types import StreamEnd as StreamEnd
    from ._types import StreamEvent as StreamEvent
    from ._types import TextDelta as TextDelta
    from ._types import TokenLogprob as TokenLogprob
    from ._types import ToolCall as ToolCall
    from ._types import ToolCallDelta as ToolCallDelta
    from ._types import ToolSpec as ToolSpec
    from ._types import Usage as Usage

__getattr__, __dir__, __all__ = lazy(__name__, __file__)
