"""The reference auth-cache filter (filters/auth_cache.wasm) under the real host.

Behaviour of SPEC §3: hit, miss, deny, expiry, logout, fail-closed and fail-open, concurrent
streams waiting on their calls, the ground-truth gauges, and its configuration.
"""

from __future__ import annotations

import json

import pytest

from addons.proxywasm import (
    FilterModule,
    FilterStartError,
    Host,
    HttpCall,
    HttpCallResponse,
    InProcessDispatcher,
    Limits,
    Stream,
    VirtualClock,
)
from addons.proxywasm.host import Decision

LIVE_ENTRIES, LIVE_BYTES = "auth_cache.live_entries", "auth_cache.live_bytes"


class Auth:
    """An auth server: tokens in `valid` get 200, others 401; `status` overrides everything."""

    def __init__(self) -> None:
        self.valid = {b"alice", b"bob"}
        self.status: int | None = None
        self.calls: list[HttpCall] = []

    def __call__(self, call: HttpCall) -> HttpCallResponse | None:
        self.calls.append(call)
        if self.status == 0:
            return None  # never answers
        if self.status is not None:
            return HttpCallResponse(self.status)
        scheme, _, token = (call.header(b"authorization") or b"").partition(b" ")
        token = token.strip() if scheme.lower() == b"bearer" else b""
        return HttpCallResponse(200 if token in self.valid else 401)


class Proxy:
    """The filter in a host on a virtual clock, with helpers to send requests."""

    def __init__(self, module: FilterModule, config: dict[str, object] | None = None,
                 latency: float = 0.01) -> None:
        self.clock = VirtualClock()
        self.auth = Auth()
        disp = InProcessDispatcher(self.auth, self.clock.now_ns, latency_s=latency,
                                   clusters=("auth",))
        # A generous deadline: these tests are about the filter, and a loaded CI machine must
        # not turn a scheduling stall into a "looping filter" (test_host_lifecycle tests that).
        self.host = Host(module, disp, clock=self.clock, limits=Limits(deadline_ms=10_000),
                         plugin_configuration=json.dumps(config or {}).encode())
        self.inst = self.host.instance("shop")

    def open(self, token: bytes | None, path: bytes = b"/", auth_header: bytes | None = None
             ) -> tuple[Stream, Decision | None]:
        headers = [(b":method", b"GET"), (b":path", path), (b":authority", b"shop")]
        if auth_header is not None:
            headers.append((b"Authorization", auth_header))
        elif token is not None:
            headers.append((b"Authorization", b"Bearer " + token))
        s = self.inst.stream()
        return s, s.request_headers(headers)

    def request(self, token: bytes | None, path: bytes = b"/", auth_header: bytes | None = None
                ) -> Decision:
        s, d = self.open(token, path, auth_header)
        while d is None:
            self.step()
            d = s.decision
        s.close()
        return d

    def step(self) -> None:
        nxt = self.host.next_event_ns()
        assert nxt is not None, "a paused stream with nothing scheduled"
        self.clock.set_ns(max(nxt, self.clock.now_ns()))
        self.host.poll()

    def advance(self, seconds: float) -> None:
        end = self.clock.now_ns() + int(seconds * 1e9)
        while (nxt := self.host.next_event_ns()) is not None and nxt <= end:
            self.clock.set_ns(max(nxt, self.clock.now_ns()))
            self.host.poll()
        self.clock.set_ns(end)
        self.host.poll()

    def metric(self, name: str) -> int:
        return self.inst.observe().metrics[name]


@pytest.fixture
def proxy(filter_module: FilterModule) -> Proxy:
    return Proxy(filter_module)


def status(d: Decision) -> int:
    return d.response.status if d.response is not None else 200


def test_miss_then_hit(proxy: Proxy) -> None:
    first = proxy.request(b"alice")
    assert (first.action, first.outbound) == ("continue", 1)
    call = proxy.auth.calls[0]
    assert (call.cluster, call.method, call.path) == ("auth", "GET", "/verify")
    assert call.header(b"authorization") == b"Bearer alice"
    assert call.header(b":authority") == b"auth"
    second = proxy.request(b"alice")
    assert (second.action, second.outbound) == ("continue", 0)
    assert len(proxy.auth.calls) == 1
    assert proxy.metric("auth_cache.hits") == 1 and proxy.metric("auth_cache.misses") == 1
    assert proxy.metric(LIVE_ENTRIES) == 1


@pytest.mark.parametrize("answer", [401, 403])
def test_rejected_token_gets_401_and_is_not_cached(proxy: Proxy, answer: int) -> None:
    proxy.auth.status = answer
    d = proxy.request(b"mallory")
    assert d.action == "respond" and status(d) == 401
    assert d.response is not None and d.response.details
    proxy.request(b"mallory")
    assert len(proxy.auth.calls) == 2  # no negative caching
    assert proxy.metric(LIVE_ENTRIES) == 0
    assert proxy.metric("auth_cache.denied") == 2


@pytest.mark.parametrize("header", [
    None, b"", b"Basic YWxpY2U6eA==", b"Bearer", b"Bearer ", b"Bearer    ", b"Token alice",
])
def test_missing_or_malformed_authorization_is_401_without_a_call(proxy: Proxy,
                                                                  header: bytes | None) -> None:
    d = proxy.request(None, auth_header=header)
    assert d.action == "respond" and status(d) == 401 and d.outbound == 0
    assert not proxy.auth.calls


def test_bearer_scheme_is_case_insensitive(proxy: Proxy) -> None:
    assert proxy.request(None, auth_header=b"bearer   alice").action == "continue"
    assert proxy.auth.calls[0].header(b"authorization") == b"bearer   alice"


@pytest.mark.parametrize("token", [b"\xff\xfe", b"a\x00b", b"caf\xc3\xa9", b"x" * 5000])
def test_tokens_outside_rfc6750_are_rejected_without_a_call(proxy: Proxy, token: bytes) -> None:
    # Bearer tokens are visible ASCII (RFC 6750 b64token); the filter caps their length.
    d = proxy.request(token)
    assert d.action == "respond" and status(d) == 401 and not proxy.auth.calls


def test_entries_expire_after_the_ttl(filter_module: FilterModule) -> None:
    p = Proxy(filter_module, {"ttl_seconds": 60})
    p.request(b"alice")
    p.advance(59)
    assert p.request(b"alice").outbound == 0
    assert p.metric(LIVE_ENTRIES) == 1
    p.advance(2)  # past the TTL: a tick has evicted it
    assert p.metric(LIVE_ENTRIES) == 0 and p.metric(LIVE_BYTES) == 0
    assert p.request(b"alice").outbound == 1


def test_logout_evicts_the_token_and_goes_upstream(proxy: Proxy) -> None:
    proxy.request(b"alice")
    proxy.request(b"bob")
    assert proxy.metric(LIVE_ENTRIES) == 2
    d = proxy.request(b"alice", path=b"/logout?next=/")
    assert d.action == "continue" and d.outbound == 0
    assert proxy.metric(LIVE_ENTRIES) == 1
    assert proxy.request(b"alice").outbound == 1  # it has to be verified again
    assert proxy.request(b"bob").outbound == 0


@pytest.mark.parametrize("failure", [500, 503, 0])  # 0: the auth server never answers
def test_auth_failure_is_fail_closed_by_default(proxy: Proxy, failure: int) -> None:
    proxy.auth.status = failure
    d = proxy.request(b"alice")
    assert d.action == "respond" and status(d) == 503
    assert proxy.metric("auth_cache.auth_failures") == 1
    assert proxy.metric(LIVE_ENTRIES) == 0


@pytest.mark.parametrize("failure", [500, 0])
def test_auth_failure_fail_open_continues_without_caching(filter_module: FilterModule,
                                                          failure: int) -> None:
    p = Proxy(filter_module, {"fail_open": True})
    p.auth.status = failure
    d = p.request(b"alice")
    assert d.action == "continue"
    assert p.metric(LIVE_ENTRIES) == 0
    p.auth.status = None
    assert p.request(b"alice").outbound == 1


def test_call_timeout_is_configurable(filter_module: FilterModule) -> None:
    p = Proxy(filter_module, {"timeout_ms": 300})
    p.auth.status = 0
    s, d = p.open(b"alice")
    assert d is None
    p.advance(0.29)
    assert s.decision is None
    p.advance(0.02)
    assert s.decision is not None and status(s.decision) == 503


def test_concurrent_streams_each_get_their_own_verdict(filter_module: FilterModule) -> None:
    p = Proxy(filter_module, latency=0.05)
    tokens = [b"alice", b"eve", b"bob", b"trudy"] * 5
    opened = [p.open(t) for t in tokens]
    assert all(d is None for _, d in opened)  # all waiting on their calls at once
    p.advance(0.1)
    verdicts = [status(s.decision) for s, _ in opened if s.decision is not None]
    assert verdicts == [200 if t in (b"alice", b"bob") else 401 for t in tokens]
    for s, _ in opened:
        s.close()
    assert p.metric(LIVE_ENTRIES) == 2
    assert len(p.auth.calls) == 4  # concurrent misses for one token share one call


@pytest.mark.parametrize(("answer", "expected"), [(None, 200), (401, 401), (500, 503), (0, 503)])
def test_concurrent_misses_for_one_token_make_one_call(filter_module: FilterModule,
                                                      answer: int | None, expected: int) -> None:
    p = Proxy(filter_module, {"timeout_ms": 200}, latency=0.05)
    p.auth.status = answer
    opened = [p.open(b"alice") for _ in range(16)]
    assert all(d is None for _, d in opened)
    p.advance(0.5)
    assert len(p.auth.calls) == 1
    assert [status(s.decision) for s, _ in opened if s.decision is not None] == [expected] * 16
    for s, _ in opened:
        s.close()
    assert p.metric("auth_cache.misses") == 16
    failures = p.metric("auth_cache.auth_failures")
    assert failures == (1 if expected == 503 else 0)  # counted per call, not per stream


def test_a_merged_call_outlives_the_stream_that_made_it(filter_module: FilterModule) -> None:
    p = Proxy(filter_module, latency=0.05)
    first, d1 = p.open(b"alice")
    second, d2 = p.open(b"alice")
    assert d1 is None and d2 is None and len(p.auth.calls) == 1
    first.close()  # the client that caused the call went away: the host cancels its call
    p.advance(0.1)
    assert len(p.auth.calls) == 2  # made again for the stream still waiting
    assert second.decision is not None and status(second.decision) == 200
    second.close()
    assert p.request(b"alice").outbound == 0  # cached by the call it shared


def test_gauges_follow_entry_size(filter_module: FilterModule) -> None:
    p = Proxy(filter_module, {"entry_size": 2048})
    for i in range(10):
        p.auth.valid.add(b"t%d" % i)
        p.request(b"t%d" % i)
    assert p.metric(LIVE_ENTRIES) == 10
    assert p.metric(LIVE_BYTES) == 10 * 2048


def test_allocated_memory_stays_after_logouts_and_a_restart_resets_it(proxy: Proxy) -> None:
    start_pages = proxy.inst.observe().allocated_pages
    tokens = [b"user-%d" % i for i in range(600)]
    proxy.auth.valid.update(tokens)
    for t in tokens:
        proxy.request(t)
    grown = proxy.inst.observe().allocated_pages
    assert grown >= start_pages + 600 * 1024 // 65536
    for t in tokens:
        proxy.request(t, path=b"/logout")
    after = proxy.inst.observe()
    assert after.metrics[LIVE_ENTRIES] == 0
    assert after.allocated_pages == grown  # linear memory never shrinks
    # Freed entries are reused: logging the same number in again does not grow memory.
    for t in tokens:
        proxy.request(t)
    assert proxy.inst.observe().allocated_pages == grown
    proxy.inst.restart("reclaim", "test")
    assert proxy.inst.observe().allocated_pages == start_pages


@pytest.mark.parametrize("config", [b"{", b"[1,2]", b'{"ttl_seconds": "ten"}',
                                    b'{"entry_size": -5}', b'{"ttl_seconds": 60,}'])
def test_bad_configuration_is_rejected(filter_module: FilterModule, config: bytes) -> None:
    host = Host(filter_module, InProcessDispatcher(lambda c: None, VirtualClock().now_ns),
                plugin_configuration=config)
    with pytest.raises(FilterStartError, match="rejected its plugin configuration"):
        host.instance("shop")


def test_custom_cluster_and_path(filter_module: FilterModule) -> None:
    p = Proxy(filter_module, {"auth_cluster": "auth", "auth_path": "/check?x=1",
                              "auth_authority": "auth.internal"})
    p.request(b"alice")
    assert p.auth.calls[0].path == "/check?x=1"
    assert p.auth.calls[0].header(b":authority") == b"auth.internal"
