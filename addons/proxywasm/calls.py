"""Where `proxy_http_call` goes: pluggable dispatchers for outbound calls.

The host hands every outbound call to a `Dispatcher` with a `deliver` callback. A dispatcher
must call `deliver` at most once and never from inside `start` (the guest is still running
then): with the response, or with None when the call failed (unreachable, reset, timed out).
The host enforces the call's timeout itself and ignores a delivery that comes too late, so a
dispatcher that never answers cannot stall a stream. `start` returns what cancels the call
(then `deliver` is never called): the host cancels the calls of a stream whose client left, as
Envoy cancels a deleted context's calls, and records them itself.

- `InProcessDispatcher`: a Python function answers, after a latency in host-clock time; used by
  simulations in virtual time and by tests.
- `HttpxDispatcher`: real HTTP through an `httpx.AsyncClient` (keep-alive pool); used by the
  mitmproxy addon. Calls never block the event loop. The call's timeout is the host's alone.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
from collections.abc import Callable, Mapping
from typing import NamedTuple

from addons.logsafe import escape, shown_url

from .headers import Pairs

logger = logging.getLogger(__name__)

TIMEOUT_GRACE = 2.0
"""httpx gives up on a call after this many times its timeout: by then the host has."""


class HttpCall(NamedTuple):
    """An outbound call as the filter made it (pseudo-headers included)."""

    cluster: str
    headers: Pairs
    body: bytes = b""
    trailers: Pairs = []  # noqa: RUF012 - never mutated
    timeout_ms: int = 1000

    def header(self, name: bytes) -> bytes | None:
        """The first value of header `name` (lowercase), or None."""
        return next((v for k, v in self.headers if k.lower() == name), None)

    @property
    def method(self) -> str:
        """`:method`."""
        return (self.header(b":method") or b"GET").decode("latin-1")

    @property
    def path(self) -> str:
        """`:path`."""
        return (self.header(b":path") or b"/").decode("latin-1")


class HttpCallResponse(NamedTuple):
    """A response to an outbound call."""

    status: int
    headers: Pairs = []  # noqa: RUF012 - never mutated
    body: bytes = b""
    trailers: Pairs = []  # noqa: RUF012 - never mutated


Deliver = Callable[[HttpCallResponse | None], None]
Cancel = Callable[[], object]
"""Stops a call in flight: its `deliver` is never called after this."""


def call_url(base: str, call: HttpCall) -> str:
    """The URL of an outbound call: the cluster's base URL, its scheme replaced by the call's
    `:scheme` (http or https) when given, then the call's `:path`."""
    scheme = (call.header(b":scheme") or b"").decode("latin-1").lower()
    if scheme in ("http", "https"):
        base = scheme + base[base.index("://"):]
    return base + call.path


class Dispatcher:
    """Base class: sends outbound calls. Subclasses implement `has_cluster` and `start`."""

    def has_cluster(self, name: str) -> bool:
        """Whether calls may go to cluster `name`."""
        raise NotImplementedError

    def start(self, call: HttpCall, deliver: Deliver) -> Cancel | None:
        """Start `call`; later call `deliver` once. Raise to refuse the call. Returns what
        cancels it, or None where it cannot be cancelled (it then runs to its end)."""
        raise NotImplementedError

    def poll(self, now_ns: int) -> None:
        """Deliver what is due at `now_ns` (dispatchers driven by the host clock)."""

    def next_due_ns(self) -> int | None:
        """When the next delivery is due, for virtual-time stepping; None if nothing waits."""
        return None

    async def aclose(self) -> None:
        """Release connections."""


Handler = Callable[[HttpCall], HttpCallResponse | None]


class InProcessDispatcher(Dispatcher):
    """Answers calls with a Python function after `latency_s` of host-clock time.

    `handler` returns the response, or None for a call that gets no answer (it then times out).
    """

    def __init__(
        self, handler: Handler, clock_ns: Callable[[], int], *, latency_s: float = 0.0,
        clusters: tuple[str, ...] | None = None,
    ) -> None:
        self.handler = handler
        self.clock_ns = clock_ns
        self.latency_ns = int(latency_s * 1e9)
        self.clusters = clusters
        self._queue: list[tuple[int, int, list[Deliver], HttpCallResponse]] = []
        """Answers by due time; each with its `deliver` in a list, which cancelling empties."""
        self._seq = itertools.count()

    def has_cluster(self, name: str) -> bool:
        """Any cluster, unless a list was given."""
        return self.clusters is None or name in self.clusters

    def start(self, call: HttpCall, deliver: Deliver) -> Cancel | None:
        """Compute the answer now; deliver it after the latency (or never, for None)."""
        response = self.handler(call)
        if response is None:
            return None
        due = self.clock_ns() + self.latency_ns
        to = [deliver]
        heapq.heappush(self._queue, (due, next(self._seq), to, response))
        return to.clear

    def poll(self, now_ns: int) -> None:
        """Deliver every answer due by `now_ns`, in order (a cancelled call's is dropped)."""
        queue = self._queue
        while queue and queue[0][0] <= now_ns:
            _, _, to, response = heapq.heappop(queue)
            if to:
                to[0](response)

    def next_due_ns(self) -> int | None:
        """The due time of the next answer."""
        return self._queue[0][0] if self._queue else None


class HttpxDispatcher(Dispatcher):
    """Real HTTP calls with httpx on the running asyncio loop.

    `clusters` maps a cluster name to a base URL (`auth=http://127.0.0.1:8081`); the call's
    `:path` is appended to it, `:method` is the method, `:scheme` (when given) replaces the
    URL's scheme, and `:authority` becomes the Host header (the only one: a `host` header the
    filter also sent is dropped, so no call fails on two Host headers).
    """

    def __init__(self, clusters: Mapping[str, str], *, max_connections: int = 100,
                 clock_speed: float = 1.0) -> None:
        import httpx

        self.clusters = {name: url.rstrip("/") for name, url in clusters.items()}
        # A call's timeout is in host-clock time; on a clock sped up N times it is N times
        # shorter in wall time. (The host enforces it on its own clock too.)
        self.clock_speed = clock_speed
        self._client = httpx.AsyncClient(
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            follow_redirects=False,
        )
        self._tasks: set[asyncio.Task[None]] = set()

    def has_cluster(self, name: str) -> bool:
        """Whether `name` is configured."""
        return name in self.clusters

    def start(self, call: HttpCall, deliver: Deliver) -> Cancel:
        """Schedule the request on the running loop; cancelling its task ends the request
        (httpx closes its connection, so the server sees the call go). Refused once the
        dispatcher is closed (the proxy is stopping)."""
        if self._client.is_closed:
            raise RuntimeError("the proxy is stopping (its outbound client is closed)")
        task = asyncio.get_running_loop().create_task(self._send(call, deliver))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task.cancel

    async def _send(self, call: HttpCall, deliver: Deliver) -> None:
        import httpx

        url = call_url(self.clusters[call.cluster], call)
        authority = call.header(b":authority")
        headers = [(k, v) for k, v in call.headers
                   if not k.startswith(b":") and not (authority and k.lower() == b"host")]
        if authority:
            headers.insert(0, (b"host", authority))
        # One timeout, the filter's: the host enforces it on its own clock and records it as
        # `timeout`. httpx's timer only ends a call the host has given up on, so it runs
        # longer (TIMEOUT_GRACE) and bounds the whole exchange, not each read.
        limit = call.timeout_ms / 1000 / self.clock_speed * TIMEOUT_GRACE
        if self._client.is_closed:  # closed between `start` and now: the proxy is stopping
            logger.warning("outbound call to cluster %s not sent: the proxy is stopping",
                           call.cluster)
            deliver(None)
            return
        try:
            async with asyncio.timeout(limit):
                resp = await self._client.request(
                    call.method, url, headers=headers, content=call.body or None, timeout=None)
        except TimeoutError:
            return  # no delivery: the host's own timer ends the call, as `timeout`
        except (httpx.HTTPError, httpx.InvalidURL, ValueError) as e:  # a URL the call built
            logger.warning(
                "outbound call to cluster %s (%s) failed: %s", call.cluster,
                shown_url(self.clusters[call.cluster]),
                escape(type(e).__name__ + (f": {e}" if str(e) else "")),
            )
            deliver(None)
            return
        except asyncio.CancelledError:
            raise
        pairs = [(k.lower(), v) for k, v in resp.headers.raw]
        deliver(HttpCallResponse(resp.status_code, pairs, resp.content))

    async def aclose(self) -> None:
        """Cancel calls in flight and close the connection pool."""
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._client.aclose()
