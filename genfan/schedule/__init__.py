"""Scheduling: periodic jobs that run on time, once across replicas, and survive failure.

```python
from genfan.schedule import Scheduler, CronTrigger, SchedulePolicy

async with Scheduler("sqlite:///schedules.db") as scheduler:
    await scheduler.add_schedule(
        "myapp.jobs:morning_digest",
        CronTrigger(expr="0 7 * * *", timezone="Europe/Berlin"),
        policy=SchedulePolicy(misfire_grace_time=600, overlap="skip"),
    )
    await scheduler.run_until_stopped()
```

Retries are a `genfan.resilience.RetryPolicy` (``SchedulePolicy(retry=...)``), run by
genfan's one retry engine. [`parse_schedules`][genfan.schedule.parse_schedules] reads the ``[schedules]`` section of a TOML
config (what ``genfan schedule run`` runs). See docs/schedule.md for the semantics (misfires,
coalescing, overlap, leases and fencing tokens, DST, backfill, history limits).
"""

from typing import TYPE_CHECKING

from genfan._facade import lazy

if TYPE_CHECKING:
    from ._clock import AnyioClock as AnyioClock
    from ._clock import Clock as Clock
    from ._config import SchedulesConfig as SchedulesConfig
    from ._config import parse_schedules as parse_schedules
    from ._jobs import ContentJob as ContentJob
    from ._jobs import FanOutFactory as FanOutFactory
    from ._jobs import RunContext as RunContext
    from ._policy import Coalesce as Coalesce
    from ._policy import Isolation as Isolation
    from ._policy import Overlap as Overlap
    from ._policy import SchedulePolicy as SchedulePolicy
    from ._postgres import PostgresStore as PostgresStore
    from ._records import BackfillResult as BackfillResult
    from ._records import RunRecord as RunRecord
    from ._records import RunStatus as RunStatus
    from ._records import ScheduleInfo as ScheduleInfo
    from ._scheduler import Scheduler as Scheduler
    from ._sqlite import SQLiteStore as SQLiteStore
    from ._store import Store as Store
    from ._store import StoreUnavailableError as StoreUnavailableError
    from ._triggers import CronTrigger as CronTrigger
    from ._triggers import DateTrigger as DateTrigger
    from ._triggers import IntervalTrigger as IntervalTrigger
    from ._triggers import Trigger as Trigger
    from ._triggers import parse_duration as parse_duration
    from ._url import store_from_url as store_from_url

__getattr__, __dir__, __all__ = lazy(__name__, __file__)
