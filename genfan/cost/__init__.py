"""Cost: a price on every call, budgets per scope, and caches that hit.

* Prices: usage turned into USD for known models from the ``genai-prices`` table (cached input,
  cache writes and reasoning tokens included); ``price=`` on a backend overrides it.
* Budgets: spend limits per scope over a period, persisted (SQLite, PostgreSQL, Redis), checked
  before each call.
* Caches: an exact response cache (SQLite, Redis) and an opt-in semantic cache.
"""

from typing import TYPE_CHECKING

from genfan._facade import lazy

if TYPE_CHECKING:
    # -- prices (genfan/cost/_prices.py)
    # -- end prices
    # -- budgets and caches (genfan/cost/_budget.py, _cache.py, _semantic.py)
    # -- end budgets and caches
    pass

__getattr__, __dir__, __all__ = lazy(__name__, __file__)
