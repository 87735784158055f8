"""The basic experiment (paper Fig. 4): many logins at a steady pace, then as many logouts.

With the defaults: 1024 users log in at one per second (t = 0 … 1023 s); each login is followed
at the same instant by one ``GET`` through the proxy with the new token, so the filter caches
it. One interval after the last login the logouts start, again one per second (t = 1024 …
2047 s). The number of cached tokens rises to ``count`` and falls back to zero, while the
filter's allocated memory stays at its peak: the surplus that a restart would reclaim.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from scenarios.trace import LOGOUT_PATH, Event, ScenarioError, Trace, TraceMeta


@dataclass(frozen=True)
class BasicParams:
    """Parameters of the basic experiment; the defaults are the paper's."""

    count: int = 1024
    interval: float = 1.0  # seconds between logins, and between logouts
    host: str = "shop.example"
    path: str = "/"
    logout_path: str = LOGOUT_PATH
    logout_order: Literal["fifo", "lifo"] = "fifo"  # fifo: the first to log in logs out first

    def __post_init__(self) -> None:
        if self.count < 1:
            raise ScenarioError(f"basic: count must be >= 1, got {self.count}")
        if not self.interval > 0:
            raise ScenarioError(f"basic: interval must be > 0, got {self.interval}")
        if self.logout_order not in ("fifo", "lifo"):
            raise ScenarioError(
                f"basic: logout_order must be fifo or lifo, got {self.logout_order!r}"
            )
        if not self.host:
            raise ScenarioError("basic: host must not be empty")
        if not self.path.startswith("/") or not self.logout_path.startswith("/"):
            raise ScenarioError("basic: paths must start with '/'")


def basic_trace(params: BasicParams | None = None) -> Trace:
    """The trace of the basic experiment: users ``u0001 …``, tokens ``u0001-1 …``."""
    p = params or BasicParams()
    width = max(4, len(str(p.count)))
    users = [f"u{i + 1:0{width}d}" for i in range(p.count)]
    events: list[Event] = []
    for i, user in enumerate(users):
        t = i * p.interval
        token = f"{user}-1"
        events.append(Event.login(t, user, token, p.host))
        events.append(Event.request(t, user, token, p.host, p.path))
    order = users if p.logout_order == "fifo" else users[::-1]
    for j, user in enumerate(order):
        t = (p.count + j) * p.interval
        events.append(Event.logout(t, user, f"{user}-1", p.host, p.logout_path))
    meta = TraceMeta(
        name="basic",
        description=(
            f"{p.count} logins (each followed by a GET {p.path}) every {p.interval:g} s, "
            f"then {p.count} logouts every {p.interval:g} s ({p.logout_order})"
        ),
        tenants=(p.host,),
        hosts=(p.host,),
        extra={
            "scenario": "basic",
            "count": p.count,
            "interval": p.interval,
            "logout_order": p.logout_order,
        },
    )
    return Trace(tuple(events), meta)
