"""Guards for every backend: bulkhead, circuit breaker, retries, timeouts, hedging, rate limits,
fallback chains and load-balanced pools, each a [`Backend`][genfan.Backend] wrapping a
backend.

`guard` builds a backend's whole stack in one fixed order (`GUARD_ORDER`, outermost
first): hedge → bulkhead → retry → rate limit → breaker → timeout → provider. Every guard waits
through anyio (works on asyncio and trio, and under a mock clock) and spends only what is left
of the fan-out's deadline. The bulkhead is a backend's one concurrency cap. Policies hold values
only; what stacks share is given to `guard` as one object: a retry budget
(``retry_budget=RetryBudget(...)``) and a quota kept in Redis for every process and host
(``rate_limit_store=RedisQuota(...)``).
"""

from typing import TYPE_CHECKING

from genfan._facade import lazy

if TYPE_CHECKING:
    from ._adaptive import AIMD as AIMD
    from ._adaptive import AdaptiveLimit as AdaptiveLimit
    from ._adaptive import Gradient2 as Gradient2
    from ._adaptive import Vegas as Vegas
    from ._base import time_left as time_left
    from ._breaker import BreakerState as BreakerState
    from ._breaker import BreakerStatistics as BreakerStatistics
    from ._breaker import CircuitBreaker as CircuitBreaker
    from ._bulkhead import Bulkhead as Bulkhead
    from ._bulkhead import BulkheadStatistics as BulkheadStatistics
    from ._config import GuardsConfig as GuardsConfig
    from ._config import RateLimitStoreConfig as RateLimitStoreConfig
    from ._fallback import Fallback as Fallback
    from ._hedge import Hedge as Hedge
    from ._hedge import HedgeStatistics as HedgeStatistics
    from ._policies import BreakerPolicy as BreakerPolicy
    from ._policies import BulkheadPolicy as BulkheadPolicy
    from ._policies import HedgePolicy as HedgePolicy
    from ._policies import RateLimitPolicy as RateLimitPolicy
    from ._policies import RetryBudgetPolicy as RetryBudgetPolicy
    from ._policies import RetryPolicy as RetryPolicy
    from ._policies import TimeoutPolicy as TimeoutPolicy
    from ._pool import Pool as Pool
    from ._pool import PoolStrategy as PoolStrategy
    from ._pool import ReplicaStatistics as ReplicaStatistics
    from ._ratelimit import RateLimiter as RateLimiter
    from ._ratelimit import RateLimiterStatistics as RateLimiterStatistics
    from ._ratelimit import TokenBucket as TokenBucket
    from ._retry import Retrier as Retrier
    from ._retry import Retry as Retry
    from ._retry import RetryBudget as RetryBudget
    from ._retry import RetryStatistics as RetryStatistics
    from ._shared import RedisQuota as RedisQuota
    from ._shared import SharedQuotaError as SharedQuotaError
    from ._stack import GUARD_ORDER as GUARD_ORDER
    from ._stack import GuardedBackend as GuardedBackend
    from ._stack import GuardStatistics as GuardStatistics
    from ._stack import guard as guard
    from ._timeout import Timeout as Timeout

__getattr__, __dir__, __all__ = lazy(__name__, __file__)
