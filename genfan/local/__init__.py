"""The local engine's model and server: the embedded default model, and ``genfan local serve``.

Nothing here imports vLLM (or ``providers``) at import time; the in-process backend is
:class:`genfan_providers.vllm_local.VLLMBackend`.
"""

from typing import TYPE_CHECKING

from genfan._facade import lazy

if TYPE_CHECKING:
    from ._env import apply_engine_env as apply_engine_env
    from ._env import cpu_dtype as cpu_dtype
    from ._errors import ContextLengthExceededError as ContextLengthExceededError
    from ._errors import EngineRequestError as EngineRequestError
    from ._errors import EngineStartError as EngineStartError
    from ._errors import LocalEngineError as LocalEngineError
    from ._errors import ModelFolderError as ModelFolderError
    from ._prepare import DEFAULT_MODEL_NAME as DEFAULT_MODEL_NAME
    from ._prepare import cache_dir as cache_dir
    from ._prepare import default_model_dir as default_model_dir
    from ._prepare import is_prepared as is_prepared
    from ._prepare import prepare_default_model as prepare_default_model
    from ._prepare import resolve_model as resolve_model
    from ._prepare import validate_model_dir as validate_model_dir
    from ._progress import ProgressLike as ProgressLike
    from ._server import LocalServer as LocalServer
    from ._server import free_port as free_port
    from ._server import serve_local as serve_local
    from ._server import server_command as server_command

__getattr__, __dir__, __all__ = lazy(__name__, __file__)
