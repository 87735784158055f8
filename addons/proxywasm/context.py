"""What each context of a VM knows (cpp-host's context.cc): stream contexts, pending calls.

The root context (id 1) is the VM itself: its tick period, metrics and outbound calls live on
the `Vm`. A `StreamContext` is one HTTP stream: its header maps, and what the filter decided
for it (a local response, a reset, a resume). A `PendingCall` is an outbound `proxy_http_call`
waiting for its answer or its deadline.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, NamedTuple

from .abi import MetricType
from .headers import Pairs

if TYPE_CHECKING:
    from .calls import Cancel

ROOT_CONTEXT_ID = 1
REQUEST_BODY_DIRTY = 1 << 8
RESPONSE_BODY_DIRTY = 1 << 9


class LocalResponse(NamedTuple):
    """A response the filter sends itself instead of forwarding the request."""

    status: int
    body: bytes = b""
    headers: Pairs = []  # noqa: RUF012 - NamedTuple defaults are never mutated here
    details: str = ""


class StreamContext:
    """Host-side state of one HTTP stream context in a Vm."""

    __slots__ = (
        "calls", "closed", "dirty", "done_pending", "id", "local_response", "modified", "outbound",
        "properties", "request_body", "request_headers", "request_trailers", "response_body",
        "response_headers", "response_trailers", "resumed", "stream",
    )

    def __init__(self, context_id: int, stream: Any) -> None:
        self.id = context_id
        self.stream = stream
        self.request_headers: Pairs = []
        self.request_trailers: Pairs = []
        self.response_headers: Pairs = []
        self.response_trailers: Pairs = []
        self.request_body: bytes | None = None
        """The request body buffer while the filter may see it (None: not available)."""
        self.response_body: bytes | None = None
        self.local_response: LocalResponse | None = None
        self.modified = False  # the filter changed a header map
        self.dirty = 0
        """What the filter changed: bit `1 << MapType` per header map, REQUEST_BODY_DIRTY and
        RESPONSE_BODY_DIRTY for the bodies."""
        self.properties: dict[tuple[bytes, ...], bytes] | None = None
        """Filter state set with `proxy_set_property` on this stream."""
        self.resumed = False
        self.closed = False
        self.done_pending = False
        self.calls: set[int] = set()
        self.outbound = 0


class PendingCall:
    """An outbound `proxy_http_call` waiting for its response or its deadline."""

    __slots__ = ("cancel", "cluster", "context_id", "deadline_ns", "id", "orphaned", "path",
                 "started_ns")

    def __init__(
        self, call_id: int, context_id: int, cluster: str, path: str, started_ns: int,
        deadline_ns: int,
    ) -> None:
        self.id = call_id
        self.context_id = context_id
        self.cluster = cluster
        self.path = path
        self.started_ns = started_ns
        self.deadline_ns = deadline_ns
        self.orphaned = False
        """Its stream context was deleted (the stream ended): its answer is recorded (an auth
        call the manager counts) but never given to the filter. Where the stream ended because
        its client left, the host cancels it instead, as Envoy cancels a deleted context's
        calls, and records it then (outcome `cancelled`)."""
        self.cancel: Cancel | None = None
        """What stops it in flight (from the dispatcher), or None if nothing can."""


class Metric:
    """A metric the guest defined with `proxy_define_metric`."""

    __slots__ = ("name", "type", "value")

    def __init__(self, name: str, metric_type: MetricType) -> None:
        self.name = name
        self.type = metric_type
        self.value = 0
