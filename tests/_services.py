"""Skip-or-fail for tests that need a real service (PostgreSQL, Redis, Ray)."""

from __future__ import annotations

import os
import socket

import pytest


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_service(name: str, available: bool, reason: str) -> None:
    """Skip when a service is missing, but fail when GENFAN_REQUIRE_SERVICES=1 (CI)."""
    if available:
        return
    if os.environ.get("GENFAN_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{name} is required here (GENFAN_REQUIRE_SERVICES=1) but {reason}")
    pytest.skip(f"{name} not available: {reason}")
