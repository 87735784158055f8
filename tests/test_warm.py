"""Warm restart (SPEC §10): the journal, its rule, the replay, and every cold fallback.

The reference filter (filters/auth_cache.wasm) is the filter the contract is written for; small
WAT filters break the contract on purpose to show each fallback.
"""

from __future__ import annotations

import json

import pytest
import wasmtime

from addons.proxywasm import (
    FilterModule,
    Host,
    HttpCall,
    HttpCallResponse,
    InProcessDispatcher,
    Limits,
    VirtualClock,
)
from addons.proxywasm.host import Decision, FilterInstance
from addons.proxywasm.journal import (
    CallRecord,
    Entry,
    Journal,
    JournalConfig,
    credentials_of,
    window_from_config,
)

from .test_host_lifecycle import CALL_HEADERS, CALLING_FILTER
from .wat import module

LIVE_ENTRIES, LIVE_BYTES = "auth_cache.live_entries", "auth_cache.live_bytes"
TTL = 60.0


class Auth:
    """An auth server counting its calls: tokens in `valid` get 200, others 401."""

    def __init__(self) -> None:
        self.valid: set[bytes] = set()
        self.calls = 0

    def __call__(self, call: HttpCall) -> HttpCallResponse:
        self.calls += 1
        token = (call.header(b"authorization") or b"").partition(b" ")[2]
        return HttpCallResponse(200 if token in self.valid else 401)


class Proxy:
    """A host with journaling on a virtual clock, and helpers to send requests."""

    def __init__(self, module: FilterModule, *, ttl: float = TTL, max_bytes: int = 64 * 2**20,
                 journal: bool = True, journaling: bool = True,
                 config: dict[str, object] | None = None) -> None:
        self.clock = VirtualClock()
        self.auth = Auth()
        disp = InProcessDispatcher(self.auth, self.clock.now_ns, latency_s=0.01,
                                   clusters=("auth",))
        cfg = {"ttl_seconds": ttl, **(config or {})}
        plugin = json.dumps(cfg).encode()
        self.host = Host(
            module, disp, clock=self.clock, limits=Limits(deadline_ms=10_000),
            plugin_configuration=plugin,
            journal=JournalConfig(window_from_config(plugin), max_bytes) if journal else None,
            journaling=journaling,
        )
        self.inst: FilterInstance = self.host.instance("shop")

    def request(self, token: bytes, path: bytes = b"/") -> Decision:
        s = self.inst.stream()
        d = s.request_headers([(b":method", b"GET"), (b":path", path), (b":authority", b"shop"),
                               (b"authorization", b"Bearer " + token)])
        while d is None:
            self.advance(0.005)
            d = s.decision
        s.close()
        return d

    def advance(self, seconds: float) -> None:
        end = self.clock.now_ns() + int(seconds * 1e9)
        while (t := self.host.next_event_ns()) is not None and t <= end:
            self.clock.set_ns(max(t, self.clock.now_ns()))
            self.host.poll()
        self.clock.set_ns(end)
        self.host.poll()

    def live(self) -> int:
        return self.inst.observe().metrics[LIVE_ENTRIES]


def tokens(n: int, prefix: bytes = b"token-") -> list[bytes]:
    return [prefix + b"%06d" % i for i in range(n)]


# ---- the journal's rule ----------------------------------------------------------------------


def _entry(headers: list[tuple[bytes, bytes]], call_headers: list[tuple[bytes, bytes]] | None,
           t: int = 0) -> Entry:
    e = Entry(0, t, headers, True)
    if call_headers is not None:
        e.add_call(1, "auth", call_headers, b"", [])
    return e


@pytest.mark.parametrize(("request_headers", "call_headers", "expected"), [
    ([(b"authorization", b"Bearer secret-token")], [(b"authorization", b"Bearer secret-token")],
     {(b"authorization", b"Bearer secret-token"), (b"authorization", b"secret-token")}),
    # a filter that sends only the token: the word is the credential
    ([(b"authorization", b"Bearer secret-token")], [(b"x-token", b"secret-token")],
     {(b"authorization", b"secret-token")}),
    # short values and pseudo-headers never count
    ([(b":path", b"/verify-long-path"), (b"accept", b"*/*")],
     [(b":path", b"/verify-long-path"), (b"accept", b"*/*")], set()),
    ([(b"cookie", b"session=abcdefgh12")], [(b"authorization", b"Bearer other-token")], set()),
])
def test_credentials_are_request_values_the_filter_sent_in_its_call(
        request_headers: list[tuple[bytes, bytes]], call_headers: list[tuple[bytes, bytes]],
        expected: set[tuple[bytes, bytes]]) -> None:
    calls = [CallRecord("auth", call_headers, b"", [])]
    assert credentials_of(request_headers, calls) == expected


def test_journal_keeps_anchors_and_their_dependents_until_the_window_passes() -> None:
    j = Journal(JournalConfig(window_s=10), generation=0)
    auth = [(b"authorization", b"Bearer alice-token")]
    anchor = _entry(auth, auth, t=0)
    assert j.commit(anchor, 0)
    hit = _entry(auth, None, t=1)
    assert j.commit(hit, 1_000_000_000) and hit.anchor is anchor
    stranger = _entry([(b"authorization", b"Bearer nobody-else")], None, t=2)
    assert not j.commit(stranger, 2_000_000_000)  # no call, no live credential: not kept
    assert j.replayable(5_000_000_000) == [anchor, hit]
    # 10 s after the anchor closed, it and what depends on it are gone
    assert j.replayable(10_500_000_000) == []
    late_hit = _entry(auth, None, t=11)
    assert not j.commit(late_hit, 11_000_000_000)
    assert j.bytes == 0 or j.entries  # accounting never goes negative
    assert j.bytes >= 0


def test_a_dependent_whose_anchor_left_the_window_is_not_replayed() -> None:
    j = Journal(JournalConfig(window_s=10), generation=0)
    auth = [(b"authorization", b"Bearer alice-token")]
    anchor = _entry(auth, auth)
    j.commit(anchor, 0)
    hit = _entry(auth, None, t=9_000_000_000)
    j.commit(hit, 9_000_000_000)
    assert j.replayable(10_500_000_000) == []  # the hit is in the window, its anchor is not


def test_journal_overflow_clears_it_and_says_why() -> None:
    j = Journal(JournalConfig(window_s=600, max_bytes=4000), generation=0)
    for i in range(20):
        auth = [(b"authorization", b"Bearer token-%06d" % i)]
        j.commit(_entry(auth, auth), i)
    assert j.overflowed is not None and "journal overflow" in j.overflowed
    assert not j.entries and j.bytes == 0
    j.reset(1)
    assert j.overflowed is None


@pytest.mark.parametrize(("config", "option", "expected"), [
    (b'{"ttl_seconds": 300}', 0.0, 301.0),
    (b'{"ttl_seconds": 300}', 120.0, 121.0),
    (b"", 0.0, 601.0),
    (b"not json", 0.0, 601.0),
    (b'{"ttl_seconds": "long"}', 0.0, 601.0),
    (b'{"ttl_seconds": true}', 0.0, 601.0),
])
def test_window_from_the_filter_ttl_or_the_option(config: bytes, option: float,
                                                  expected: float) -> None:
    assert window_from_config(config, option) == expected


# ---- the reference filter --------------------------------------------------------------------


def test_warm_restart_keeps_the_cache_without_an_auth_call(filter_module: FilterModule) -> None:
    p = Proxy(filter_module)
    users = tokens(300)
    p.auth.valid.update(users)
    for t in users:
        p.request(t)
        p.advance(0.05)
    for t in users[::3]:
        assert p.request(t).outbound == 0
    before = p.inst.observe()
    calls = p.auth.calls
    record = p.inst.restart("test", "pytest", "warm")
    assert (record.mode, record.fallback) == ("warm", None)
    assert record.replayed == len(users) + len(users[::3])
    assert record.generation == before.generation + 1
    assert p.auth.calls == calls  # the replay asked the auth server nothing
    after = p.inst.observe()
    assert after.metrics[LIVE_ENTRIES] == before.metrics[LIVE_ENTRIES] == len(users)
    assert after.metrics[LIVE_BYTES] == before.metrics[LIVE_BYTES]
    assert after.requests == after.outbound == 0  # replayed work is not traffic
    assert after.allocated_pages <= before.allocated_pages
    for t in users:
        d = p.request(t)
        assert (d.action, d.outbound, d.generation) == ("continue", 0, record.generation)
    assert p.auth.calls == calls


def test_a_cold_restart_drops_the_cache(filter_module: FilterModule) -> None:
    p = Proxy(filter_module)
    users = tokens(20)
    p.auth.valid.update(users)
    for t in users:
        p.request(t)
    record = p.inst.restart("test", "pytest")
    assert (record.mode, record.fallback, record.replayed) == ("cold", None, 0)
    assert p.request(users[0]).outbound == 1


def test_a_logout_before_the_restart_stays_evicted(filter_module: FilterModule) -> None:
    p = Proxy(filter_module)
    alice, bob = b"alice-token-1", b"bob-token-22"
    p.auth.valid.update([alice, bob])
    p.request(alice)
    p.request(bob)
    p.advance(1)
    assert p.request(alice, b"/logout").action == "continue"
    assert p.live() == 1
    record = p.inst.restart("test", "pytest", "warm")
    assert record.mode == "warm" and p.live() == 1
    calls = p.auth.calls
    assert p.request(bob).outbound == 0
    assert p.request(alice).outbound == 1  # logged out: the filter asks again
    assert p.auth.calls == calls + 1


def test_entries_expire_when_they_would_have(filter_module: FilterModule) -> None:
    p = Proxy(filter_module)
    early, late = b"early-token", b"later-token"
    p.auth.valid.update([early, late])
    p.request(early)          # cached until ~t0 + 60
    p.advance(30)
    p.request(late)           # cached until ~t0 + 90
    p.advance(10)
    record = p.inst.restart("test", "pytest", "warm")
    assert record.mode == "warm" and p.live() == 2
    p.advance(15)             # t0 + 55
    assert p.request(early).outbound == 0
    p.advance(10)             # t0 + 65: early expired, late not
    assert p.live() == 1
    assert p.request(late).outbound == 0
    assert p.request(early).outbound == 1


def test_anchors_older_than_the_ttl_are_not_replayed(filter_module: FilterModule) -> None:
    p = Proxy(filter_module)
    old, new = b"old-token-1", b"new-token-1"
    p.auth.valid.update([old, new])
    p.request(old)
    p.advance(TTL + 5)
    p.request(new)
    record = p.inst.restart("test", "pytest", "warm")
    assert record.replayed == 1 and p.live() == 1


def test_denials_and_failures_replay_as_they_happened(filter_module: FilterModule) -> None:
    p = Proxy(filter_module)
    good, bad = b"good-token-1", b"revoked-token"
    p.auth.valid.add(good)
    assert p.request(bad).response is not None
    p.request(good)
    record = p.inst.restart("test", "pytest", "warm")
    assert record.mode == "warm" and p.live() == 1
    # the denial was not cached then and is not now
    assert p.request(bad).outbound == 1


def test_warm_restarts_chain(filter_module: FilterModule) -> None:
    p = Proxy(filter_module)
    users = tokens(50)
    p.auth.valid.update(users)
    for t in users[:25]:
        p.request(t)
    p.inst.restart("one", "pytest", "warm")
    for t in users[25:]:
        p.request(t)
    calls = p.auth.calls
    record = p.inst.restart("two", "pytest", "warm")
    assert record.mode == "warm" and record.replayed == 50 and p.live() == 50
    assert all(p.request(t).outbound == 0 for t in users)
    assert p.auth.calls == calls


def test_a_request_in_flight_during_the_restart_reaches_the_new_generation(
        filter_module: FilterModule) -> None:
    p = Proxy(filter_module)
    first, pending = b"first-token-1", b"in-flight-tok"
    p.auth.valid.update([first, pending])
    p.request(first)
    s = p.inst.stream()
    assert s.request_headers([(b":method", b"GET"), (b":path", b"/"), (b":authority", b"shop"),
                              (b"authorization", b"Bearer " + pending)]) is None
    record = p.inst.restart("test", "pytest", "warm")
    assert record.replayed == 1 and p.live() == 1
    p.advance(0.05)  # the old generation's call is answered; its stream decides
    assert s.decision is not None and s.decision.generation == record.generation_before
    s.close()
    assert p.live() == 2  # replayed into the new generation as it finished
    calls = p.auth.calls
    assert p.request(pending).outbound == 0
    assert p.auth.calls == calls


def test_a_replay_in_steps_takes_in_what_happened_meanwhile(filter_module: FilterModule) -> None:
    p = Proxy(filter_module)
    users = tokens(60)
    p.auth.valid.update(users)
    for t in users[:40]:
        p.request(t)
    prepared = p.inst.prepare_warm()
    served = 0
    while not prepared.step(10):
        if served < 20:  # the old generation keeps serving between steps: new logins
            p.request(users[40 + served])
            served += 1
    for t in users[40 + served:]:
        p.request(t)
    assert served >= 5 and prepared.backlog > 0
    p.request(users[1], b"/logout")  # an eviction after the replay began
    calls = p.auth.calls
    record = p.inst.restart("test", "pytest", "warm", prepared)
    assert (record.mode, record.fallback) == ("warm", None)
    assert p.live() == 59
    assert all(p.request(t).outbound == 0 for t in users if t != users[1])
    assert p.auth.calls == calls
    assert p.request(users[1]).outbound == 1


def test_a_prepared_replay_is_dropped_if_the_instance_restarted_meanwhile(
        filter_module: FilterModule) -> None:
    p = Proxy(filter_module)
    p.auth.valid.add(b"some-token-1")
    p.request(b"some-token-1")
    prepared = p.inst.prepare_warm()
    p.inst.restart("someone else", "pytest")
    assert prepared.step(100) and prepared.fallback is not None
    record = p.inst.restart("test", "pytest", "warm", prepared)
    assert record.mode == "warm" and record.replayed == 0  # a fresh replay of the new journal


def test_overflow_falls_back_to_cold_and_says_why(filter_module: FilterModule) -> None:
    p = Proxy(filter_module, max_bytes=20_000)
    users = tokens(100)
    p.auth.valid.update(users)
    for t in users:
        p.request(t)
    record = p.inst.restart("test", "pytest", "warm")
    assert record.mode == "cold"
    assert record.fallback is not None and "journal overflow" in record.fallback
    assert p.live() == 0
    # the next generation journals again
    for t in users[:5]:
        p.request(t)
    assert p.inst.restart("again", "pytest", "warm").mode == "warm"


def test_without_a_journal_a_warm_restart_runs_cold(filter_module: FilterModule) -> None:
    p = Proxy(filter_module, journal=False)
    p.auth.valid.add(b"some-token-1")
    p.request(b"some-token-1")
    record = p.inst.restart("test", "pytest", "warm")
    assert record.mode == "cold" and "journaling is off" in (record.fallback or "")


def test_until_journaling_starts_nothing_is_kept(filter_module: FilterModule) -> None:
    p = Proxy(filter_module, journaling=False)
    users = tokens(20)
    p.auth.valid.update(users)
    for t in users + users:  # misses (with calls) and hits: what a journal would keep
        p.request(t)
    assert p.inst.journal is None and not p.host.journaling
    record = p.inst.restart("test", "pytest", "warm")
    assert record.mode == "cold" and "journaling has not started" in (record.fallback or "")
    # started on a generation that has made calls: cold within the window, as it may lack them
    for t in users[:5]:
        p.request(t)
    assert p.host.start_journaling() and p.inst.journal is not None
    p.request(users[0])
    record = p.inst.restart("test", "pytest", "warm")
    assert record.mode == "cold" and "journaling started 0.0 s ago" in (record.fallback or "")
    # the next generation is journaled from its start
    calls = p.auth.calls
    for t in users[:5]:
        p.request(t)
    assert p.inst.restart("test", "pytest", "warm").mode == "warm"
    assert p.auth.calls == calls + 5
    for t in users[:5]:
        assert p.request(t).outbound == 0  # hits: the warm restart kept them


def test_a_journal_started_late_is_complete_after_a_window(filter_module: FilterModule) -> None:
    p = Proxy(filter_module, ttl=60, journaling=False)
    p.auth.valid.update(tokens(3))
    for t in tokens(3):
        p.request(t)
    p.host.start_journaling()
    p.advance(30)
    assert p.inst.restart("early", "pytest", "warm").mode == "cold"
    p2 = Proxy(filter_module, ttl=60, journaling=False)
    p2.auth.valid.update(tokens(3))
    for t in tokens(3):
        p2.request(t)
    p2.host.start_journaling()
    p2.advance(62)  # past the window (TTL + 1 s): what the journal missed has expired
    p2.request(tokens(3)[0])
    record = p2.inst.restart("later", "pytest", "warm")
    assert (record.mode, record.fallback, record.replayed) == ("warm", None, 1)


def test_a_generation_that_made_no_call_journals_whole_from_the_start(
        filter_module: FilterModule) -> None:
    # Nothing the journal keeps happened before it started: the first warm restart is warm.
    p = Proxy(filter_module, journaling=False)
    for _ in range(3):  # no token: 401 without a call
        s = p.inst.stream()
        d = s.request_headers([(b":method", b"GET"), (b":path", b"/"), (b":authority", b"shop")])
        assert d is not None and d.outbound == 0 and d.response is not None
        s.close()
    p.host.start_journaling()
    p.auth.valid.add(b"some-token-1")
    p.request(b"some-token-1")
    record = p.inst.restart("test", "pytest", "warm")
    assert (record.mode, record.fallback, record.replayed) == ("warm", None, 1)


def test_a_bad_mode_is_refused(filter_module: FilterModule) -> None:
    p = Proxy(filter_module)
    with pytest.raises(ValueError, match="'cold' or 'warm'"):
        p.inst.restart("test", "pytest", "lukewarm")  # type: ignore[arg-type]


# ---- filters that break the contract: each falls back to cold, saying why ----------------------


def _uptime_filter(on_fresh: str) -> str:
    """CALLING_FILTER, but a request in the same nanosecond as the VM's start does `on_fresh`
    (its behaviour depends on when the VM started: not deterministic given its inputs)."""
    start = """
  (import "env" "proxy_get_current_time_nanoseconds" (func $now (param i32) (result i32)))
  (global $start (mut i64) (i64.const 0))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (drop (call $now (i32.const 64))) (global.set $start (i64.load (i32.const 64))) (i32.const 1))
"""
    check = f"""(local $mode i32)
    (drop (call $now (i32.const 64)))
    (if (i64.eq (i64.load (i32.const 64)) (global.get $start)) (then {on_fresh}))"""
    return start + CALLING_FILTER.replace("(local $mode i32)", check, 1)


TICK_CALLER = CALLING_FILTER.replace('(func (export "proxy_on_done")', f"""
  (import "env" "proxy_set_tick_period_milliseconds" (func $tick (param i32) (result i32)))
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (drop (call $tick (i32.const 1000))) (i32.const 1))
  (func (export "proxy_on_tick") (param i32)
    (drop (call $proxy_http_call (i32.const 256) (i32.const 4) (i32.const 512) (i32.const {len(CALL_HEADERS)})
                                 (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
                                 (i32.const 1000) (i32.const 100))))
  (func (export "proxy_on_done")""", 1)


def _wat_proxy(wat: str) -> tuple[Host, VirtualClock]:
    clock = VirtualClock()
    disp = InProcessDispatcher(lambda call: HttpCallResponse(200), clock.now_ns,
                               latency_s=0.01, clusters=("auth",))
    host = Host(FilterModule(wasmtime.wat2wasm(module(wat))), disp, clock=clock,
                limits=Limits(deadline_ms=10_000), journal=JournalConfig())
    return host, clock


def _serve(host: Host, clock: VirtualClock, n: int) -> None:
    inst = host.instance("shop")
    for i in range(n):
        clock.advance(1)
        host.poll()
        s = inst.stream()
        d = s.request_headers([(b"x-mode", b"call"),
                               (b"authorization", b"Bearer token-%06d" % i)])
        while d is None:
            clock.advance(0.01)
            host.poll()
            d = s.decision
        assert d.action == "continue"
        s.close()


@pytest.mark.parametrize(("wat", "reason"), [
    (_uptime_filter("unreachable"), "the replay trapped"),
    (_uptime_filter("(return (i32.const 0))"), "outbound call"),
    (TICK_CALLER, "outside a request"),
])
def test_a_filter_breaking_the_contract_restarts_cold(wat: str, reason: str) -> None:
    host, clock = _wat_proxy(wat)
    _serve(host, clock, 3)
    inst = host.instance("shop")
    record = inst.restart("test", "pytest", "warm")
    assert record.mode == "cold"
    assert reason in (record.fallback or "")
    assert inst.vm is not None and not inst.vm.closed  # the cold generation serves
    _serve(host, clock, 1)


def test_a_contract_keeping_wat_filter_restarts_warm() -> None:
    host, clock = _wat_proxy(CALLING_FILTER)
    _serve(host, clock, 3)
    record = host.instance("shop").restart("test", "pytest", "warm")
    assert (record.mode, record.replayed) == ("warm", 3)


async def test_restart_in_steps_serves_requests_meanwhile(filter_module: FilterModule) -> None:
    import asyncio

    p = Proxy(filter_module)
    users = tokens(200)
    p.auth.valid.update(users)
    for t in users[:150]:
        p.request(t)
    served: list[Decision] = []

    async def traffic() -> None:
        for t in users[150:]:  # logins while the replay runs, each served by the old generation
            served.append(p.request(t))
            await asyncio.sleep(0)

    task = asyncio.create_task(traffic())
    record = await p.host.restart_in_steps("shop", "test", "pytest", "warm", step_events=20)
    await task
    assert (record.mode, record.fallback) == ("warm", None)
    during = [d for d in served if d.generation == record.generation_before]
    assert len(during) >= 10  # requests did not wait for the whole replay
    assert len(served) == 50 and all(d.action == "continue" for d in served)
    calls = p.auth.calls
    assert all(p.request(t).outbound == 0 for t in users)  # nothing was lost on the way
    assert p.auth.calls == calls


BODY_COUNTER = CALLING_FILTER.replace('(func (export "proxy_on_done")', """
  (import "env" "proxy_define_metric" (func $define (param i32 i32 i32 i32) (result i32)))
  (import "env" "proxy_increment_metric" (func $inc (param i32 i64) (result i32)))
  (data (i32.const 400) "body_bytes")
  (func (export "proxy_on_vm_start") (param i32 i32) (result i32)
    (drop (call $define (i32.const 0) (i32.const 400) (i32.const 10) (i32.const 420)))
    (i32.const 1))
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32)
    (drop (call $inc (i32.load (i32.const 420)) (i64.extend_i32_u (local.get 1))))
    (i32.const 0))
  (func (export "proxy_on_done")""", 1)


def test_later_phases_are_journaled_and_replayed() -> None:
    host, clock = _wat_proxy(BODY_COUNTER)
    inst = host.instance("shop")
    for i in range(3):
        clock.advance(1)
        s = inst.stream()
        d = s.request_headers([(b"x-mode", b"call"), (b"authorization", b"Bearer token-%06d" % i)])
        while d is None:
            clock.advance(0.01)
            host.poll()
            d = s.decision
        clock.advance(0.01)
        s.response_headers([(b":status", b"200")], False)
        s.response_body(b"x" * (100 + i), True)
        s.close()
    assert inst.observe().metrics["body_bytes"] == 303
    record = inst.restart("test", "pytest", "warm")
    assert (record.mode, record.fallback) == ("warm", None)
    assert inst.observe().metrics["body_bytes"] == 303  # the response bodies were replayed
