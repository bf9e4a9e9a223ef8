"""genfan: fan a prompt out to several LLMs at once, pick the best answer, stay up under failure.

The public face: import from ``genfan`` (and ``genfan.testing`` in tests). Subsystems load lazily
on first attribute access, so ``import genfan`` stays light.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

from .backend import Backend as Backend
from .backend import BaseBackend as BaseBackend
from .backend import collect_stream as collect_stream
from .backend import create_backend as create_backend
from .backend import register_backend as register_backend
from .errors import AllBackendsFailedError as AllBackendsFailedError
from .errors import BackendConnectionError as BackendConnectionError
from .errors import BackendError as BackendError
from .errors import BackendTimeoutError as BackendTimeoutError
from .errors import BulkheadFullError as BulkheadFullError
from .errors import CallCancelledError as CallCancelledError
from .errors import CircuitOpenError as CircuitOpenError
from .errors import ConfigurationError as ConfigurationError
from .errors import GenfanError as GenfanError
from .errors import HTTPStatusError as HTTPStatusError
from .errors import MalformedResponseError as MalformedResponseError
from .errors import MissingExtraError as MissingExtraError
from .errors import RateLimitError as RateLimitError
from .errors import RateLimitExceededError as RateLimitExceededError
from .fanout import FanOut as FanOut
from .fanout import FanOutResult as FanOutResult
from .fanout import Target as Target
from .select import Candidate as Candidate
from .select import Selection as Selection
from .select import Selector as Selector
from .types import ChatRequest as ChatRequest
from .types import Completion as Completion
from .types import Message as Message
from .types import RateLimitInfo as RateLimitInfo
from .types import ResponseFormat as ResponseFormat
from .types import StreamEnd as StreamEnd
from .types import StreamEvent as StreamEvent
from .types import TextDelta as TextDelta
from .types import ToolCall as ToolCall
from .types import ToolCallDelta as ToolCallDelta
from .types import ToolSpec as ToolSpec
from .types import Usage as Usage

__version__ = "0.1.0"

# name -> module for the parts that load on first use (keeps `import genfan` fast).
_LAZY: dict[str, str] = {
    "load_config": "genfan.config",
    "GenfanConfig": "genfan.config",
    "Cascade": "genfan.select",
    "Consensus": "genfan.select",
    "LLMJudge": "genfan.select",
    "LengthBounds": "genfan.select",
    "MajorityVote": "genfan.select",
    "Patterns": "genfan.select",
    "RefusalDetector": "genfan.select",
    "SchemaValid": "genfan.select",
    "Score": "genfan.select",
    "Scorer": "genfan.select",
    "Select": "genfan.select",
    "Synthesis": "genfan.select",
    "Tier": "genfan.select",
    "scorer": "genfan.select",
    "selector_from_name": "genfan.select",
    "BatchJob": "genfan.batching",
    "BatcherStatistics": "genfan.batching",
    "BatchingBackend": "genfan.batching",
    "BatchingEmbedder": "genfan.batching",
    "Embedder": "genfan.batching",
    "JobSummary": "genfan.batching",
    "MicroBatcher": "genfan.batching",
    "run_batch_job": "genfan.batching",
    "guard": "genfan.resilience",
    "GuardedBackend": "genfan.resilience",
    "GuardsConfig": "genfan.resilience",
    "BulkheadPolicy": "genfan.resilience",
    "BreakerPolicy": "genfan.resilience",
    "RetryPolicy": "genfan.resilience",
    "RetryBudgetPolicy": "genfan.resilience",
    "RetryBudget": "genfan.resilience",
    "TimeoutPolicy": "genfan.resilience",
    "HedgePolicy": "genfan.resilience",
    "RateLimitPolicy": "genfan.resilience",
    "Fallback": "genfan.resilience",
    "Pool": "genfan.resilience",
    "Agent": "genfan.agents",
    "AgentResult": "genfan.agents",
    "AgentStepLimitError": "genfan.agents",
    "Chain": "genfan.agents",
    "ChainFailedError": "genfan.agents",
    "ChainResult": "genfan.agents",
    "Input": "genfan.agents",
    "LLMCall": "genfan.agents",
    "StepTimeoutError": "genfan.agents",
    "Tool": "genfan.agents",
    "ToolArgumentsError": "genfan.agents",
    "ToolCallRecord": "genfan.agents",
    "ToolError": "genfan.agents",
    "ToolRegistry": "genfan.agents",
    "ToolTimeoutError": "genfan.agents",
    "UnknownToolError": "genfan.agents",
    "tool": "genfan.agents",
    "Scheduler": "genfan.schedule",
    "CronTrigger": "genfan.schedule",
    "IntervalTrigger": "genfan.schedule",
    "DateTrigger": "genfan.schedule",
    "SQLiteStore": "genfan.schedule",
    "PostgresStore": "genfan.schedule",
    "SchedulePolicy": "genfan.schedule",
    "ScheduleRetry": "genfan.schedule",
    "ContentJob": "genfan.schedule",
    "RunContext": "genfan.schedule",
}

if TYPE_CHECKING:
    from .agents import Agent as Agent
    from .agents import AgentResult as AgentResult
    from .agents import AgentStepLimitError as AgentStepLimitError
    from .agents import Chain as Chain
    from .agents import ChainFailedError as ChainFailedError
    from .agents import ChainResult as ChainResult
    from .agents import Input as Input
    from .agents import LLMCall as LLMCall
    from .agents import StepTimeoutError as StepTimeoutError
    from .agents import Tool as Tool
    from .agents import ToolArgumentsError as ToolArgumentsError
    from .agents import ToolCallRecord as ToolCallRecord
    from .agents import ToolError as ToolError
    from .agents import ToolRegistry as ToolRegistry
    from .agents import ToolTimeoutError as ToolTimeoutError
    from .agents import UnknownToolError as UnknownToolError
    from .agents import tool as tool
    from .batching import BatcherStatistics as BatcherStatistics
    from .batching import BatchingBackend as BatchingBackend
    from .batching import BatchingEmbedder as BatchingEmbedder
    from .batching import BatchJob as BatchJob
    from .batching import Embedder as Embedder
    from .batching import JobSummary as JobSummary
    from .batching import MicroBatcher as MicroBatcher
    from .batching import run_batch_job as run_batch_job
    from .config import GenfanConfig as GenfanConfig
    from .config import load_config as load_config
    from .resilience import BreakerPolicy as BreakerPolicy
    from .resilience import BulkheadPolicy as BulkheadPolicy
    from .resilience import Fallback as Fallback
    from .resilience import GuardedBackend as GuardedBackend
    from .resilience import GuardsConfig as GuardsConfig
    from .resilience import HedgePolicy as HedgePolicy
    from .resilience import Pool as Pool
    from .resilience import RateLimitPolicy as RateLimitPolicy
    from .resilience import RetryBudget as RetryBudget
    from .resilience import RetryBudgetPolicy as RetryBudgetPolicy
    from .resilience import RetryPolicy as RetryPolicy
    from .resilience import TimeoutPolicy as TimeoutPolicy
    from .resilience import guard as guard
    from .schedule import ContentJob as ContentJob
    from .schedule import CronTrigger as CronTrigger
    from .schedule import DateTrigger as DateTrigger
    from .schedule import IntervalTrigger as IntervalTrigger
    from .schedule import PostgresStore as PostgresStore
    from .schedule import RunContext as RunContext
    from .schedule import SchedulePolicy as SchedulePolicy
    from .schedule import Scheduler as Scheduler
    from .schedule import ScheduleRetry as ScheduleRetry
    from .schedule import SQLiteStore as SQLiteStore
    from .select import Cascade as Cascade
    from .select import Consensus as Consensus
    from .select import LengthBounds as LengthBounds
    from .select import LLMJudge as LLMJudge
    from .select import MajorityVote as MajorityVote
    from .select import Patterns as Patterns
    from .select import RefusalDetector as RefusalDetector
    from .select import SchemaValid as SchemaValid
    from .select import Score as Score
    from .select import Scorer as Scorer
    from .select import Select as Select
    from .select import Synthesis as Synthesis
    from .select import Tier as Tier
    from .select import scorer as scorer
    from .select import selector_from_name as selector_from_name


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'genfan' has no attribute {name!r}")
    value = getattr(import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


__all__ = [
    "AllBackendsFailedError",
    "Backend",
    "BackendConnectionError",
    "BackendError",
    "BackendTimeoutError",
    "BaseBackend",
    "BulkheadFullError",
    "CallCancelledError",
    "Candidate",
    "ChatRequest",
    "CircuitOpenError",
    "Completion",
    "ConfigurationError",
    "FanOut",
    "FanOutResult",
    "GenfanError",
    "HTTPStatusError",
    "MalformedResponseError",
    "Message",
    "MissingExtraError",
    "RateLimitError",
    "RateLimitInfo",
    "RateLimitExceededError",
    "ResponseFormat",
    "Selection",
    "Selector",
    "StreamEnd",
    "StreamEvent",
    "Target",
    "TextDelta",
    "ToolCall",
    "ToolCallDelta",
    "ToolSpec",
    "Usage",
    "collect_stream",
    "create_backend",
    "register_backend",
    *_LAZY,
]
