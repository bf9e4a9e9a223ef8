"""The gateway: an OpenAI-compatible HTTP server in front of genfan's backends, fan-outs and
cascades (``genfan serve``).

Every configured backend, pool, fallback, fan-out (with its selector) and cascade is a model of
``/v1/chat/completions``; the selection's explanation and each candidate's usage and cost come
back in the answer's ``genfan`` field and ``x-genfan-*`` headers. Virtual keys (hashed at rest)
carry model allow-lists, requests and tokens per minute and USD budgets, with a spend ledger.
Needs ``pip install 'genfan[serve]'``.
"""

from typing import TYPE_CHECKING

from genfan._facade import lazy

if TYPE_CHECKING:
    from ._app import Gateway as Gateway
    from ._app import create_app as create_app
    from ._errors import GatewayError as GatewayError
    from ._keys import KeyStore as KeyStore
    from ._keys import KeyStoreError as KeyStoreError
    from ._keys import LedgerEntry as LedgerEntry
    from ._keys import VirtualKey as VirtualKey
    from ._server import serve as serve
    from ._settings import CascadeSettings as CascadeSettings
    from ._settings import FanOutSettings as FanOutSettings
    from ._settings import ServeSettings as ServeSettings
    from ._settings import load_gateway_config as load_gateway_config

__getattr__, __dir__, __all__ = lazy(__name__, __file__)
