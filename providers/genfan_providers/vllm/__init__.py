"""The local vLLM engine, all of it: the in-process backend, the embedded model, and its server.

* `VLLMBackend` serves a model inside this process (registry prefix ``vllm:``);
* `VLLMEmbedder` embeds texts with a local model on vLLM's pooling runner (its own engine);
* `prepare_default_model` converts the embedded default model (SmolLM2-135M-Instruct) once
  into a folder (``genfan local prepare``);
* `serve_local` runs vLLM's OpenAI-compatible server for a local model
  (``genfan local serve``).

Importing this package loads neither vLLM nor torch nor transformers: each is imported where it
is used. Long steps report through ``progress=`` (see `ProgressEvent`); the library draws
nothing itself.
"""

import types as _types

from ._backend import EngineStats, VLLMBackend, shutdown_engines
from ._embed import VLLMEmbedder
from ._env import CPU_BLOCK_SIZE, apply_engine_env, cpu_dtype
from ._errors import (
    ContextLengthExceededError,
    EngineRequestError,
    EngineStartError,
    LocalEngineError,
    ModelFolderError,
)
from ._prepare import (
    DEFAULT_MODEL_NAME,
    cache_dir,
    default_model_dir,
    is_prepared,
    prepare_default_model,
    resolve_model,
    validate_model_dir,
)
from ._progress import ProgressEvent, ProgressLike
from ._server import LocalServer, free_port, serve_local, server_command

__all__ = [
    "CPU_BLOCK_SIZE",
    "DEFAULT_MODEL_NAME",
    "ContextLengthExceededError",
    "EngineRequestError",
    "EngineStartError",
    "EngineStats",
    "LocalEngineError",
    "LocalServer",
    "ModelFolderError",
    "ProgressEvent",
    "ProgressLike",
    "VLLMBackend",
    "VLLMEmbedder",
    "apply_engine_env",
    "cache_dir",
    "cpu_dtype",
    "default_model_dir",
    "free_port",
    "is_prepared",
    "prepare_default_model",
    "resolve_model",
    "serve_local",
    "server_command",
    "shutdown_engines",
    "validate_model_dir",
]

# Reprs, pickles and the docs name the path users import from, as genfan's own facades do.
for _name in __all__:
    _value = globals()[_name]
    if isinstance(_value, type | _types.FunctionType) and _value.__module__.startswith(
        __name__ + "._"
    ):
        _value.__module__ = __name__
del _name, _value
