"""What the budget's and the cache's wrapping backends share."""

from __future__ import annotations

from .._backend import AsyncCloseable, Backend


class WrappedBackend(AsyncCloseable):
    """A backend that wraps ``inner``: it answers to ``inner``'s name and warms it. Closing it
    closes nothing: whoever made ``inner`` closes it."""

    inner: Backend

    @property
    def name(self) -> str:
        return self.inner.name

    async def warm(self) -> None:
        """Warm the wrapped backend (its HTTP clients, its engine), when it can be."""
        warm = getattr(self.inner, "warm", None)
        if callable(warm):
            await warm()
