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
    from ._prices import DEFAULT_OUTPUT_TOKENS as DEFAULT_OUTPUT_TOKENS
    from ._prices import MaxCostError as MaxCostError
    from ._prices import Price as Price
    from ._prices import PriceLike as PriceLike
    from ._prices import backend_price as backend_price
    from ._prices import estimate_cost as estimate_cost
    from ._prices import estimate_input_tokens as estimate_input_tokens
    from ._prices import lookup_price as lookup_price

    # -- end prices
    # -- budgets and caches (genfan/cost/_budget.py, _cache.py, _semantic.py)
    # isort: split
    from ._budget import Budget as Budget
    from ._budget import BudgetConfig as BudgetConfig
    from ._budget import BudgetedBackend as BudgetedBackend
    from ._budget import BudgetStatus as BudgetStatus
    from ._budget import Period as Period
    from ._budget import Reservation as Reservation
    from ._budget import budgeted as budgeted
    from ._cache import Cache as Cache
    from ._cache import CacheConfig as CacheConfig
    from ._cache import CachedBackend as CachedBackend
    from ._cache import ResponseCache as ResponseCache
    from ._cache import cached as cached
    from ._cache import request_key as request_key
    from ._semantic import Embedder as Embedder
    from ._semantic import SemanticCache as SemanticCache
    from ._semantic import SemanticHit as SemanticHit
    from ._store_budget import BudgetStore as BudgetStore
    from ._store_budget import CostStoreError as CostStoreError
    from ._store_budget import Ledger as Ledger
    from ._store_budget import MemoryBudgetStore as MemoryBudgetStore
    from ._store_budget import PostgresBudgetStore as PostgresBudgetStore
    from ._store_budget import RedisBudgetStore as RedisBudgetStore
    from ._store_budget import SQLiteBudgetStore as SQLiteBudgetStore
    from ._store_budget import budget_store_from_url as budget_store_from_url
    from ._store_cache import CacheStore as CacheStore
    from ._store_cache import MemoryCacheStore as MemoryCacheStore
    from ._store_cache import RedisCacheStore as RedisCacheStore
    from ._store_cache import SQLiteCacheStore as SQLiteCacheStore
    from ._store_cache import cache_store_from_url as cache_store_from_url

    # -- end budgets and caches
    pass

__getattr__, __dir__, __all__ = lazy(__name__, __file__)
