"""Drive an addon's hooks as mitmproxy does."""

from __future__ import annotations

from collections.abc import Awaitable
from inspect import isawaitable
from typing import Any


async def run_hook(result: Awaitable[Any] | None) -> None:
    """Await what a hook returned, if anything: as mitmproxy's `AddonManager`, a hook may
    finish at once (None) or return an awaitable to wait for."""
    if result is not None and isawaitable(result):
        await result
