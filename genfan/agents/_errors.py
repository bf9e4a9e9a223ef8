"""Errors of tools, agents and chains (a branch of genfan's error tree).

::

    GenfanError
    ├── ToolError(tool=, call_id=)        a tool call failed; the model reads its message
    │   ├── ToolArgumentsError            the arguments were not valid JSON or did not validate
    │   ├── UnknownToolError              the model named a tool that is not registered
    │   └── ToolTimeoutError              the tool ran past its timeout (also a TimeoutError)
    ├── AgentStepLimitError(result=)      the model still wanted tools after ``max_steps``
    ├── StepTimeoutError(step=)           a chain step ran past its timeout (also a TimeoutError)
    └── ChainFailedError(result=)         a chain with ``on_error="fail"`` failed; also an
                                          ``ExceptionGroup`` of the steps' own errors

A step's error inside `ChainFailedError` is the exception the step raised, with a note
naming the step (``except* ToolError`` works), so nothing is hidden behind a wrapper.

The two errors that carry a result live next to it, so that this module imports nothing of
``genfan.agents`` and no import cycle runs through it: ``AgentStepLimitError`` in ``_loop.py``
(with ``AgentResult``), ``ChainFailedError`` in ``_chain_result.py`` (with ``ChainResult``).
"""

from __future__ import annotations

from .._errors import GenfanError

__all__ = [
    "StepTimeoutError",
    "ToolArgumentsError",
    "ToolError",
    "ToolTimeoutError",
    "UnknownToolError",
]


class ToolError(GenfanError):
    """A tool call failed.

    The message is written for the model as well as for people: the tool loop sends
    ``"Error: <message>"`` back as the tool's result so that the model can correct itself.

    Attributes:
        tool: the tool's name.
        call_id: the id of the model's tool call, when there was one.
    """

    def __init__(self, message: str, *, tool: str, call_id: str | None = None) -> None:
        self.tool = tool
        self.call_id = call_id
        self.message = message
        super().__init__(message)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(tool={self.tool!r}, message={self.message!r})"


class ToolArgumentsError(ToolError):
    """The model's arguments were not a JSON object, or did not match the tool's schema."""


class UnknownToolError(ToolError):
    """The model asked for a tool that is not in the agent's registry (so it was not run)."""


class ToolTimeoutError(ToolError, TimeoutError):
    """The tool did not finish within its timeout."""


class StepTimeoutError(GenfanError, TimeoutError):
    """A chain step did not finish within its ``timeout``.

    Attributes:
        step: the step's name.
    """

    def __init__(self, message: str, *, step: str) -> None:
        self.step = step
        super().__init__(message)
