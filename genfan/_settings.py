"""Process-wide switches, on the bottom floor so that any floor may read them.

Test mode (`genfan.testing.set_testing`) is the one today: retries then wait 0 seconds and
try at most a capped number of times. Production code reads it through `is_testing` and
never imports the test kit.
"""

from __future__ import annotations

__all__ = ["is_testing", "set_testing_mode"]

_testing: dict[str, int | bool | None] = {"on": False, "attempts": None}


def set_testing_mode(on: bool, attempts: int | None) -> None:
    """Set test mode (the public switch is `genfan.testing.set_testing`)."""
    _testing["on"] = on
    _testing["attempts"] = attempts


def is_testing() -> tuple[bool, int | None]:
    """Whether test mode is on, and its attempts cap."""
    attempts = _testing["attempts"]
    return bool(_testing["on"]), attempts if isinstance(attempts, int) else None
