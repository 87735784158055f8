"""The Proxy-Wasm HTTP stream lifecycle on mitmproxy's hooks.

Envoy runs a filter's stream callbacks in this order, and so does the addon:

    proxy_on_request_headers, proxy_on_request_body, proxy_on_request_trailers,
    proxy_on_response_headers, proxy_on_response_body, proxy_on_response_trailers,
    proxy_on_log, proxy_on_done, proxy_on_delete

mitmproxy's hooks carry them (`wasm_auth.WasmAuth` delegates here):

- `requestheaders`: only for a request mitmproxy streams (`stream_large_bodies`): its headers
  leave before the body, so the filter sees them now, with `end_of_stream=false`. With
  `stream_large_bodies` set, a request whose body's size its headers do not give (chunked
  HTTP/1, HTTP/2 or 3 without Content-Length) is streamed from its headers too: mitmproxy
  would start to stream it midway, sending its headers upstream without any hook;
- `request`: a buffered request's headers (`end_of_stream` true only without body and
  trailers), then its whole body (`end_of_stream` true unless trailers follow), then its
  trailers; for a streamed request only its trailers;
- `responseheaders`: only for a streamed response: its headers. With `stream_large_bodies`
  set, a response whose size its headers do not give (chunked, or read until the connection
  closes) is streamed from its headers too, as mitmproxy would stream it midway with no hook;
  a local response decided on them is sent whole, the upstream's body dropped;
- `response`: a buffered response's headers, body and trailers (or a streamed one's
  trailers), then the end of the stream (log, done, delete);
- `error`: the end of the stream when the exchange failed (reset, upstream unreachable).

A filter that exports no callback beyond the request headers (and no `proxy_on_log`) pays for
none of this: its stream ends right after its request decision, as it always did.

Streamed bodies go to the filter chunk by chunk, through the message's `stream` callable. A
filter that pauses a chunk (Envoy's StopIterationAndBuffer) makes the host hold it back and
give it again with the next chunk, so the filter sees the body accumulate; the end of the body
releases whatever is held, whatever the filter answers, because mitmproxy cannot keep a
streamed message waiting. A local response from a streamed request body replaces the upstream's
answer (the rest of the body is dropped); a local response from a streamed response body, whose
headers already left, resets the stream instead. As in Envoy, a local response sent from a
request phase then runs through the response callbacks (`proxy_on_response_headers`, …).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from mitmproxy import http
from mitmproxy.net.http import status_codes

from addons.proxywasm import Decision, LocalResponse, Stream
from addons.proxywasm.abi import MapType
from addons.proxywasm.context import REQUEST_BODY_DIRTY, RESPONSE_BODY_DIRTY
from addons.proxywasm.headers import Pairs, serialize_map, view_fields
from addons.proxywasm.properties import Attributes, Path, boolean, int64

#: Callbacks that need the stream open past the request decision.
LIFECYCLE_CALLBACKS = (
    "proxy_on_request_body", "proxy_on_request_trailers", "proxy_on_response_headers",
    "proxy_on_response_body", "proxy_on_response_trailers", "proxy_on_log",
)

_REQUEST_HEADERS = 1 << MapType.HTTP_REQUEST_HEADERS
_REQUEST_TRAILERS = 1 << MapType.HTTP_REQUEST_TRAILERS
_RESPONSE_HEADERS = 1 << MapType.HTTP_RESPONSE_HEADERS
_RESPONSE_TRAILERS = 1 << MapType.HTTP_RESPONSE_TRAILERS


def needs_lifecycle(exports: frozenset[str]) -> bool:
    """Whether a module with these exports needs the stream open past the request decision."""
    return any(name in exports for name in LIFECYCLE_CALLBACKS)


# --------------------------------------------------------------------------------------------
# Pure helpers: mitmproxy messages <-> the filter's maps and buffers
# --------------------------------------------------------------------------------------------


def response_pairs(response: http.Response) -> Pairs:
    """The response as the filter sees it: `:status`, then every header as bytes."""
    return [(b":status", str(response.status_code).encode()), *response.headers.fields]


LOCAL_DETAILS = "wasm_local_details"
"""The `flow.metadata` key under which a local response keeps its details (the property
`response.code_details`, as Envoy reports a local reply's details)."""

_NO_CONTENT = (204, 304)
"""Statuses whose responses carry no content (RFC 9110 §6.4.1): a local response's body and
Content-Length are dropped, so that the connection's next response is not misread."""


def local_response(r: LocalResponse) -> http.Response:
    """The mitmproxy response for a filter's local response (pseudo-headers dropped)."""
    headers = [(k, v) for k, v in r.headers if not k.startswith(b":")]
    if r.status in _NO_CONTENT:
        response = http.Response.make(r.status, b"", headers)
        response.headers.pop("content-length", None)
        return response
    return http.Response.make(r.status, r.body, headers)


def respond_locally(flow: http.HTTPFlow, r: LocalResponse) -> http.Response:
    """Answer `flow` with the filter's local response; its details become the flow's
    `response.code_details`."""
    response = flow.response = local_response(r)
    flow.metadata[LOCAL_DETAILS] = r.details
    return response


def downstream_scheme(flow: http.HTTPFlow) -> bytes:
    """The scheme the client used, as a filter sees it (`:scheme`, `request.scheme`): Envoy's
    downstream scheme, not the one mitmproxy forwards with (in reverse mode, the upstream's)."""
    return b"https" if flow.client_conn.tls_established else b"http"


def authority_without_host(data: Any) -> bytes:
    """The authority of a request that has no Host field: its HTTP/2 or 3 authority, else
    the host it goes to."""
    return bytes(data.authority or data.host.encode("idna"))


def _authority(request: http.Request) -> tuple[bytes, bool]:
    """The request's authority as the filter was shown it (`wasm_auth.view`: the last Host
    field), and whether it came with a Host field."""
    data = request.data
    for name, value in reversed(data.headers.fields):
        if name.lower() == b"host":
            return value, True
    return authority_without_host(data), False


def apply_request_headers(flow: http.HTTPFlow, pairs: Pairs) -> None:
    """Make the request what the filter's header map says, pseudo-headers included.

    `:method` and `:path` set the request line; `:scheme`, if the filter changed it, the
    scheme forwarded with. `:authority` is the Host header (HTTP/1) or the authority (HTTP/2
    and 3): the map holds no Host field, as in Envoy, but a filter that adds one (and leaves
    `:authority`) is heard too. The upstream a request goes to stays the one mitmproxy chose
    (the reverse-proxy target, or the client's destination).
    """
    request = flow.request
    shown, had_host = _authority(request)
    fields = []
    authority = host = None
    for name, value in pairs:
        if not name.startswith(b":"):
            if name == b"host":
                host = value
            else:
                fields.append((name, value))
        elif name == b":method":
            request.data.method = value
        elif name == b":path":
            request.data.path = value
        elif name == b":scheme":
            if value != downstream_scheme(flow):
                request.data.scheme = value
        elif name == b":authority":
            authority = value
    if authority is None or (authority == shown and host is not None):
        authority = host if host is not None else shown  # a removed :authority is ignored
    if request.is_http2 or request.is_http3:
        request.data.authority = authority
    elif had_host or authority != shown:
        fields.insert(0, (b"host", authority))
    request.headers = http.Headers(fields)


def apply_response_headers(response: http.Response, pairs: Pairs) -> None:
    """Make the response what the filter's header map says; `:status` sets its status."""
    fields = []
    for name, value in pairs:
        if not name.startswith(b":"):
            fields.append((name, value))
        elif name == b":status":
            try:
                status = int(value)
            except ValueError:
                continue
            if 100 <= status <= 999 and status != response.status_code:
                response.status_code = status
                response.reason = status_codes.RESPONSES.get(status, "")  # not the old one's
    response.headers = http.Headers(fields)


def set_body(message: http.Message, body: bytes) -> None:
    """Replace a buffered message's body as it goes on the wire; Content-Length follows."""
    message.raw_content = body
    if "transfer-encoding" not in message.headers:
        message.headers["content-length"] = str(len(body))


def keep_framing(message: http.Message, streamed: bool) -> None:
    """After the filter edited the headers, make sure the body still has a length.

    A filter that removed Content-Length must not lose the body: a buffered body gets its
    length back (an empty response body too: without it the client reads to the end of the
    connection); a streamed HTTP/1 body is sent chunked.
    """
    headers = message.headers
    if "content-length" in headers or "transfer-encoding" in headers:
        return
    if streamed:
        if message.http_version.startswith("HTTP/1"):
            headers["transfer-encoding"] = "chunked"
    elif message.raw_content or (isinstance(message, http.Response)
                                 and message.status_code >= 200
                                 and message.status_code not in _NO_CONTENT):
        headers["content-length"] = str(len(message.raw_content or b""))


def unframe_for_streaming(message: http.Message) -> None:
    """A streamed body the filter may resize: drop Content-Length (chunked on HTTP/1)."""
    if "content-length" in message.headers:
        del message.headers["content-length"]
    keep_framing(message, streamed=True)


def trailers_allowed(flow: http.HTTPFlow, message: http.Message) -> bool:
    """Trailers go on the wire where the protocol carries them: HTTP/2 and HTTP/3, or a
    message that already had trailers."""
    return message.trailers is not None or not flow.request.http_version.startswith("HTTP/1")


def set_trailers(message: http.Message, pairs: Pairs) -> None:
    """Replace the message's trailers with the filter's map."""
    fields = [(k, v) for k, v in pairs if not k.startswith(b":")]
    message.trailers = http.Headers(fields) if fields else None


# --------------------------------------------------------------------------------------------
# Properties: the Envoy attributes mitmproxy knows, read from the flow when asked
# --------------------------------------------------------------------------------------------


def _header(message: http.Message | None, name: str) -> bytes | None:
    """The header's values joined with "," as Envoy joins them for a property; None if the
    message has none."""
    if message is None:
        return None
    key = name.encode()
    values = [v for k, v in message.headers.fields if k.lower() == key]
    return b",".join(values) if values else None


def request_map(flow: http.HTTPFlow) -> Pairs:
    """The request's header map as the filter is shown it (`wasm_auth.view`, from the same
    pass over the fields): `:method`, `:path`, `:authority`, `:scheme`, then every field with
    a lowercase name, the Host left out. It is what Envoy's attribute `request.headers` is (its
    request header map, which holds the Host only as `:authority`), so a filter reads the same
    fields through the property as through `proxy_get_header_map_pairs`. It is read from the
    flow's request as it stands: what the filter changes in a phase shows from its next phase
    on (in Envoy, at once)."""
    data = flow.request.data
    fields, authority, _, _ = view_fields(data.headers.fields)
    return [(b":method", data.method), (b":path", data.path),
            (b":authority", authority or authority_without_host(data)),
            (b":scheme", downstream_scheme(flow)), *fields]


def response_map(response: http.Response) -> Pairs:
    """The response's header map as the filter is shown it (`:status` first, lowercase
    names), as Envoy's attribute `response.headers` is its response header map."""
    return [(k.lower(), v) for k, v in response_pairs(response)]


def _map_value(pairs: Pairs, name: bytes) -> bytes | None:
    """`request.headers.<name>`, `response.headers.<name>`: the map's values of `name`
    (lowercase) joined with "," as Envoy joins them; None if the map has none. As in Envoy,
    a request has no `host` field here: its Host is `:authority`."""
    values = [v for k, v in pairs if k == name]
    return b",".join(values) if values else None


def _protocol(message: http.Message) -> bytes:
    """The protocol as Envoy names it: HTTP/1.0, HTTP/1.1, HTTP/2, HTTP/3."""
    version = message.data.http_version
    return version[:-2] if version in (b"HTTP/2.0", b"HTTP/3.0") else version


def _code_details(flow: http.HTTPFlow) -> bytes | None:
    if flow.response is None:
        return None
    details = flow.metadata.get(LOCAL_DETAILS)
    return details.encode() if details else b"via_upstream"


def _address(addr: Any) -> bytes | None:
    if not addr:
        return None
    host, port = addr[0], addr[1]
    return (f"[{host}]:{port}" if ":" in host else f"{host}:{port}").encode()


def _port(addr: Any) -> bytes | None:
    return int64(addr[1]) if addr else None


def _head_size(message: http.Message) -> int:
    return sum(len(k) + len(v) + 4 for k, v in message.headers.fields)


def _body_size(message: http.Message | None) -> bytes | None:
    if message is None:
        return None
    return int64(len(message.raw_content or b""))


def _tls_version(flow: http.HTTPFlow) -> bytes | None:
    version = flow.client_conn.tls_version
    return version.encode() if version else None


def _cluster(flow: http.HTTPFlow) -> bytes:
    # Named as a Higress (Istio) route names its upstream cluster.
    return f"outbound|{flow.request.port}||{flow.request.host}".encode()


_ATTRIBUTES: dict[Path, Callable[[http.HTTPFlow], bytes | None]] = {
    (b"request", b"path"): lambda f: f.request.data.path,
    (b"request", b"url_path"): lambda f: f.request.data.path.partition(b"?")[0],
    (b"request", b"host"): lambda f: f.request.host_header.encode() if f.request.host_header
    else f.request.data.host.encode(),
    (b"request", b"scheme"): downstream_scheme,
    (b"request", b"method"): lambda f: f.request.data.method,
    (b"request", b"headers"): lambda f: serialize_map(request_map(f)),
    (b"request", b"referer"): lambda f: _header(f.request, "referer"),
    (b"request", b"useragent"): lambda f: _header(f.request, "user-agent"),
    (b"request", b"id"): lambda f: _header(f.request, "x-request-id") or f.id.encode(),
    (b"request", b"protocol"): lambda f: _protocol(f.request),
    (b"request", b"time"): lambda f: int64(int(f.request.timestamp_start * 1e9)),
    (b"request", b"size"): lambda f: _body_size(f.request),
    (b"request", b"total_size"): lambda f: int64(
        _head_size(f.request) + len(f.request.raw_content or b"")),
    (b"response", b"code"): lambda f: int64(f.response.status_code) if f.response else None,
    (b"response", b"code_details"): _code_details,
    (b"response", b"headers"): lambda f: serialize_map(response_map(f.response))
    if f.response else None,
    (b"response", b"size"): lambda f: _body_size(f.response),
    (b"response", b"total_size"): lambda f: int64(
        _head_size(f.response) + len(f.response.raw_content or b"")) if f.response else None,
    (b"source", b"address"): lambda f: _address(f.client_conn.peername),
    (b"source", b"port"): lambda f: _port(f.client_conn.peername),
    (b"destination", b"address"): lambda f: _address(f.client_conn.sockname),
    (b"destination", b"port"): lambda f: _port(f.client_conn.sockname),
    (b"connection", b"id"): lambda f: int64(
        int.from_bytes(bytes.fromhex(f.client_conn.id.replace("-", ""))[:8], "little")
        & 0x7FFFFFFFFFFFFFFF),
    (b"connection", b"mtls"): lambda f: boolean(bool(f.client_conn.certificate_list)),
    (b"connection", b"requested_server_name"): lambda f: (f.client_conn.sni or "").encode(),
    (b"connection", b"tls_version"): _tls_version,
    (b"upstream", b"address"): lambda f: _address(f.server_conn.peername or f.server_conn.address),
    (b"upstream", b"port"): lambda f: _port(f.server_conn.peername or f.server_conn.address),
    (b"cluster_name",): _cluster,
    (b"route_name",): _cluster,
}


def flow_attributes(flow: http.HTTPFlow) -> Attributes:
    """The properties of a stream, read from its flow when the filter asks (nothing is built
    ahead): `request.*`, `response.*`, `source.*`, `destination.*`, `connection.*`,
    `upstream.*`, `cluster_name` and `route_name`; `request.headers.<name>` for one field of
    the map (`:authority`, never `host`, as in Envoy)."""

    def get(path: Path) -> bytes | None:
        read = _ATTRIBUTES.get(path)
        if read is not None:
            return read(flow)
        if len(path) == 3 and path[1] == b"headers":
            if path[0] == b"request":
                return _map_value(request_map(flow), path[2].lower())
            if path[0] == b"response" and flow.response is not None:
                return _map_value(response_map(flow.response), path[2].lower())
        return None

    return get


# --------------------------------------------------------------------------------------------
# One exchange: the stream and what the addon records about it
# --------------------------------------------------------------------------------------------


class Exchange:
    """One flow through the filter: its stream (while open) and its pending request record."""

    __slots__ = ("local", "record", "request_streamed", "reset", "response_streamed", "stream")

    def __init__(self, stream: Stream | None, record: dict[str, Any] | None) -> None:
        self.stream = stream
        self.record = record
        self.request_streamed = False
        self.response_streamed = False
        self.local: LocalResponse | None = None
        """A local response decided while the request streamed: it replaces the answer."""
        self.reset = False
        """A streamed phase decided to reset the stream: the next hook kills the flow."""


async def wait(stream: Stream, decision: Decision | None) -> Decision:
    """The phase's decision: at once, or when the paused filter decides."""
    if decision is not None:
        return decision
    waiter: asyncio.Future[Decision] = asyncio.get_running_loop().create_future()

    def resolve(d: Decision) -> None:
        if not waiter.done():
            waiter.set_result(d)

    stream.on_decision = resolve
    try:
        return await waiter
    finally:
        stream.on_decision = None


def _apply_request(flow: http.HTTPFlow, stream: Stream, streamed: bool) -> None:
    ctx = stream.ctx
    if ctx is None or not ctx.dirty:
        return
    request = flow.request
    if ctx.dirty & _REQUEST_HEADERS:
        apply_request_headers(flow, ctx.request_headers)
    if not streamed and ctx.dirty & REQUEST_BODY_DIRTY and ctx.request_body is not None:
        set_body(request, ctx.request_body)
    if ctx.dirty & _REQUEST_TRAILERS and trailers_allowed(flow, request):
        set_trailers(request, ctx.request_trailers)
    keep_framing(request, streamed)
    ctx.dirty = 0


def _apply_response(flow: http.HTTPFlow, stream: Stream, streamed: bool) -> None:
    ctx = stream.ctx
    response = flow.response
    if ctx is None or not ctx.dirty or response is None:
        return
    if ctx.dirty & _RESPONSE_HEADERS:
        apply_response_headers(response, ctx.response_headers)
    if not streamed and ctx.dirty & RESPONSE_BODY_DIRTY and ctx.response_body is not None:
        set_body(response, ctx.response_body)
    if ctx.dirty & _RESPONSE_TRAILERS and trailers_allowed(flow, response):
        set_trailers(response, ctx.response_trailers)
    keep_framing(response, streamed)
    ctx.dirty = 0


def kill(flow: http.HTTPFlow) -> None:
    """Reset the exchange (once)."""
    if flow.killable:
        flow.kill()  # type: ignore[no-untyped-call]


def _act(flow: http.HTTPFlow, decision: Decision) -> bool:
    """Carry out a local response or a reset; True if the phase chain stops here."""
    if decision.action == "respond" and decision.response is not None:
        respond_locally(flow, decision.response)
        return True
    if decision.action == "reset":
        kill(flow)
        return True
    return False


# --------------------------------------------------------------------------------------------
# The phases after the request headers
# --------------------------------------------------------------------------------------------


Step = Callable[[], "Decision | None"]


async def run_phases(stream: Stream, steps: list[Step]) -> Decision | None:
    """Run a buffered message's phases in order; the decision that counts.

    As in Envoy, a phase that pauses does not hold back the next one: a paused headers
    callback still gets the body, and a body paused with trailers to come still gets the
    trailers; a later phase that continues lifts the pause. Only the last phase's pause is
    waited out. A local response or a reset ends the chain. Phases whose callback the filter
    does not export are not steps, so they never lift a pause. One deviation, for safety: a
    pause while the filter's outbound call is in flight (a filter pausing its headers to ask
    an auth service) holds until that call is answered, even if a later phase continued.
    None: there were no steps.
    """
    decision: Decision | None = None
    last = len(steps) - 1
    paused = False
    for i, step in enumerate(steps):
        decision = step()
        if decision is None:
            if i < last:
                paused = True
                continue
            decision = await wait(stream, None)
        if decision.action != "continue":
            return decision
    if paused and decision is not None and stream.hold_for_calls():
        decision = await wait(stream, None)
    return decision


def request_steps(flow: http.HTTPFlow, stream: Stream, exports: frozenset[str]) -> list[Step]:
    """The phases of a buffered request after its headers: its body, then its trailers."""
    request = flow.request
    body = request.raw_content or b""
    trailers = request.trailers
    steps: list[Step] = []
    if body and "proxy_on_request_body" in exports:
        steps.append(lambda: stream.request_body(body, not trailers))
    if trailers and "proxy_on_request_trailers" in exports:
        fields = list(trailers.fields)
        steps.append(lambda: stream.request_trailers(fields))
    return steps


def apply_request(flow: http.HTTPFlow, stream: Stream, decision: Decision) -> None:
    """A buffered request's phases ended: carry out what the filter decided and changed."""
    if not _act(flow, decision):
        _apply_request(flow, stream, streamed=False)


def streamed_request_headers_continued(
    flow: http.HTTPFlow, ex: Exchange, exports: frozenset[str], limit: int
) -> None:
    """A streamed request's headers continued: apply them, and stream its body to the filter."""
    stream = ex.stream
    assert stream is not None
    ex.request_streamed = True
    _apply_request(flow, stream, streamed=True)
    if "proxy_on_request_body" in exports:
        unframe_for_streaming(flow.request)
        flow.request.stream = body_streamer(flow, ex, request=True, limit=limit)


async def streamed_request_trailers(
    flow: http.HTTPFlow, ex: Exchange, exports: frozenset[str]
) -> None:
    """A streamed request reached its end (the `request` hook): its trailers, if any."""
    stream = ex.stream
    trailers = flow.request.trailers
    if stream is None or not trailers or "proxy_on_request_trailers" not in exports:
        return
    d = await wait(stream, stream.request_trailers(list(trailers.fields)))
    if d.action == "respond" and d.response is not None:
        ex.local = d.response
    elif d.action == "reset":
        ex.reset = True
    else:
        _apply_request(flow, stream, streamed=True)


async def streamed_response_headers(
    flow: http.HTTPFlow, ex: Exchange, exports: frozenset[str], limit: int
) -> None:
    """A streamed response's headers (the `responseheaders` hook)."""
    stream = ex.stream
    response = flow.response
    assert stream is not None and response is not None
    if ex.local is not None or ex.reset:
        response.stream = False  # replaced or reset in the response hook: nothing leaves now
        return
    ex.response_streamed = True
    d = await wait(stream, stream.response_headers(response_pairs(response), False))
    if d.action == "respond" and d.response is not None:
        # Nothing left yet: the local response replaces the upstream's. mitmproxy still reads
        # the upstream's body, into whatever response the flow holds, and would stream it past
        # `stream_large_bodies`: so the local response streams, dropping the upstream's
        # chunks and sending its own body at the end.
        local = respond_locally(flow, d.response)
        local.stream = replacement_body(local.raw_content or b"")
        ex.local = d.response  # ends the filter's response phases (see `response_phases`)
        return
    if d.action == "reset":
        kill(flow)
        return
    _apply_response(flow, stream, streamed=True)
    if "proxy_on_response_body" in exports:
        unframe_for_streaming(response)
        response.stream = body_streamer(flow, ex, request=False, limit=limit)


async def response_phases(flow: http.HTTPFlow, ex: Exchange, exports: frozenset[str]) -> None:
    """The `response` hook: a buffered response's headers, body and trailers, or a streamed
    one's trailers; a local response decided while the request streamed replaces it.

    A local response from a request phase goes through these callbacks too, as Envoy sends a
    filter's local reply through its response callbacks; one from a response phase ends them.
    """
    stream = ex.stream
    if stream is None:
        return
    if ex.reset:
        kill(flow)
        return
    if ex.local is not None:
        if ex.response_streamed:  # decided on the streamed response's headers: it is sent
            return
        respond_locally(flow, ex.local)  # decided while the request streamed
        ex.local = None
    response = flow.response
    assert response is not None
    trailers = response.trailers
    steps: list[Step] = []
    if not ex.response_streamed:
        body = response.raw_content or b""
        if "proxy_on_response_headers" in exports:
            pairs = response_pairs(response)
            steps.append(lambda: stream.response_headers(pairs, not body and not trailers))
        if body and "proxy_on_response_body" in exports:
            steps.append(lambda: stream.response_body(body, not trailers))
    if trailers and "proxy_on_response_trailers" in exports:
        fields = list(trailers.fields)
        steps.append(lambda: stream.response_trailers(fields))
    d = await run_phases(stream, steps)
    if d is not None and ex.response_streamed and d.action != "continue":
        kill(flow)  # the headers already left: a local response can only reset
        return
    if d is None or not _act(flow, d):
        _apply_response(flow, stream, streamed=ex.response_streamed)


def replacement_body(body: bytes) -> Callable[[bytes], list[bytes]]:
    """A `stream` callable that drops every chunk it is given and sends `body` at the end (the
    end of the message, b"")."""
    def chunk(data: bytes) -> list[bytes]:
        return [] if data or not body else [body]

    return chunk


def body_streamer(flow: http.HTTPFlow, ex: Exchange, *, request: bool, limit: int
                  ) -> Callable[[bytes], list[bytes]]:
    """The `stream` callable that gives a streamed body to the filter chunk by chunk.

    mitmproxy calls it with each chunk, and with b"" at the end of the body (after any
    trailers arrived). A paused chunk is held back and given again with the next one, up to
    `limit` bytes (then released as if the filter continued). It returns the chunks to send
    now: none (an empty list, never b"", which mitmproxy would send as an empty chunk, and an
    empty chunk ends an HTTP/1 chunked body), or one.
    """
    held = bytearray()

    def chunk(data: bytes) -> list[bytes]:
        stream = ex.stream
        if stream is None or ex.reset or ex.local is not None:
            return []  # the stream was answered or reset: the rest of the body is dropped
        end = not data
        held.extend(data)
        message = flow.request if request else flow.response
        eos = end and not (message is not None and message.trailers)
        buf = bytes(held)
        if end and not eos:  # trailers follow and no data came: nothing new for the filter
            held.clear()  # (as in Envoy, the trailers callback is next); what it held leaves
            return [buf] if buf else []
        d = (stream.request_body(buf, eos) if request else stream.response_body(buf, eos))
        ctx = stream.ctx
        out = buf
        if ctx is not None:
            body = ctx.request_body if request else ctx.response_body
            out = body if body is not None else buf
        if d is None and not end and len(out) <= limit:
            held[:] = out  # StopIterationAndBuffer: hold, give it again with the next chunk
            return []
        held.clear()
        if d is not None and d.action == "respond" and d.response is not None:
            if request:
                ex.local = d.response
            else:
                ex.reset = True
            return []
        if d is not None and d.action == "reset":
            ex.reset = True
            return []
        return [out] if out else []

    return chunk
