"""Selection: score the candidates of a fan-out and pick the best.

The fan-out hands every candidate (answers and typed failures) to a :class:`Selector`.
"""

from ._base import Candidate as Candidate
from ._base import CandidateStatus as CandidateStatus
from ._base import FirstSuccess as FirstSuccess
from ._base import Selection as Selection
from ._base import Selector as Selector
from ._base import SelectorLike as SelectorLike
from ._base import as_selector as as_selector
