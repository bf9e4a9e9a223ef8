"""Agents and chains: tools from typed functions, a tool loop that runs tool calls concurrently,
and chains whose independent steps run at once (the LLMCompiler idea).

* `Tool` / `tool`: a function the model may call, with a JSON schema derived from
  its signature and docstring, validated arguments, and its own timeout, retries and bulkhead;
* `Agent`: the tool loop (``run`` and ``run_stream``);
* `Chain`: steps wired by their inputs; each runs as soon as its inputs are ready.
"""

from typing import TYPE_CHECKING

from genfan._facade import lazy

if TYPE_CHECKING:
    from ._chain import Chain as Chain
    from ._chain_graph import Input as Input
    from ._chain_graph import OnError as OnError
    from ._chain_graph import StepKind as StepKind
    from ._chain_graph import StepRef as StepRef
    from ._chain_result import ChainFailedError as ChainFailedError
    from ._chain_result import ChainResult as ChainResult
    from ._chain_result import StepRecord as StepRecord
    from ._chain_result import StepStatus as StepStatus
    from ._errors import StepTimeoutError as StepTimeoutError
    from ._errors import ToolArgumentsError as ToolArgumentsError
    from ._errors import ToolError as ToolError
    from ._errors import ToolTimeoutError as ToolTimeoutError
    from ._errors import UnknownToolError as UnknownToolError
    from ._llm_call import LLMCall as LLMCall
    from ._loop import Agent as Agent
    from ._loop import AgentEvent as AgentEvent
    from ._loop import AgentFinished as AgentFinished
    from ._loop import AgentResult as AgentResult
    from ._loop import AgentStep as AgentStep
    from ._loop import AgentStepLimitError as AgentStepLimitError
    from ._loop import AgentStream as AgentStream
    from ._loop import ModelResponse as ModelResponse
    from ._loop import ModelTextDelta as ModelTextDelta
    from ._loop import ToolFailed as ToolFailed
    from ._loop import ToolFinished as ToolFinished
    from ._loop import ToolStarted as ToolStarted
    from ._registry import ToolRegistry as ToolRegistry
    from ._tools import Tool as Tool
    from ._tools import ToolCallRecord as ToolCallRecord
    from ._tools import tool as tool

__getattr__, __dir__, __all__ = lazy(__name__, __file__)
