"""Instance bounds: key validation, allow-list, a maximum with LRU eviction of idle instances,
the overflow answer, two Host headers, and samples of idle instances only on change."""

from __future__ import annotations

import pytest
import wasmtime
from mitmproxy.test import taddons, tflow

from addons.instance_bounds import (
    SHARED_KEY,
    InstanceBounds,
    InvalidKey,
    Refusal,
    is_allowed,
    parse_allow,
    parse_instance_key,
)
from addons.proxywasm import (
    Decision,
    FilterModule,
    Host,
    HttpCallResponse,
    InProcessDispatcher,
    VirtualClock,
)
from addons.wasm_auth import WasmAuth, verdict
from tests.hooks import run_hook

from .wat import module

# Continues every request at once; a request with x-wait pauses until closed.
PASS_FILTER = """
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 0))
"""
PAUSE_FILTER = """
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 1))
"""


@pytest.mark.parametrize(("authority", "key"), [
    (b"Shop.Example", "shop.example"), (b"shop.example:8080", "shop.example"),
    (b"shop.example.", "shop.example"), (b"127.0.0.1:80", "127.0.0.1"),
    (b"[::1]:8080", "[::1]"), (b"[::1]", "[::1]"), (b"", "default"), (b"_dmarc.x", "_dmarc.x"),
    (b"a" * 253, "a" * 253),
])
def test_valid_keys(authority, key) -> None:
    assert parse_instance_key(authority, "host") == key
    assert parse_instance_key(authority, "single") == "single"


@pytest.mark.parametrize("authority", [
    b"shop\r\nX-Injected: 1", b"shop\x00.example", b"a" * 8192, b"sh op", b"caf\xc3\xa9.example",
    b"shop.example:http", b"shop.example:99999999", b"[::1]x", b"*", b"/etc/passwd", b"-x",
    b"shop.example:80:80x", b"\x1b[31mred", b"shop.example:99999", b"[::1]:65536",
])
def test_hostile_keys_are_refused(authority) -> None:
    with pytest.raises(InvalidKey) as e:
        parse_instance_key(authority, "host")
    message = str(e.value)
    assert "\n" not in message and "\r" not in message and "\x00" not in message
    assert len(message) < 300


def test_allow_patterns() -> None:
    allow = parse_allow(["shop.example", "*.Shop.Example"])
    assert is_allowed("shop.example", allow) and is_allowed("eu.shop.example", allow)
    assert not is_allowed("evil.example", allow)
    assert is_allowed("anything", ())
    with pytest.raises(ValueError, match="not a host name pattern"):
        parse_allow(["shop example"])


def make_host(body: str = PASS_FILTER) -> Host:
    clock = VirtualClock()
    disp = InProcessDispatcher(lambda call: HttpCallResponse(200), clock.now_ns)
    return Host(FilterModule(wasmtime.wat2wasm(module(body))), disp, clock=clock)


def test_the_least_recently_used_idle_instance_is_evicted() -> None:
    host = make_host()
    bounds = InstanceBounds(host, (), 3, "reject")
    evicted: list[str] = []
    bounds.on_evict.append(evicted.append)
    for key in ("a", "b", "c", "a", "d"):  # "a" used again, so "b" is the oldest
        inst = bounds.get(key)
        assert not isinstance(inst, Refusal)
        s = inst.stream()
        s.request_headers([])
        s.close()
    assert sorted(host.instances) == ["a", "c", "d"] and evicted == ["b"]
    assert bounds.evicted == 1
    again = bounds.get("b")  # comes back fresh, at generation 0
    assert not isinstance(again, Refusal) and again.generation == 0
    assert len(host.instances) == 3


@pytest.mark.parametrize("overflow", ["reject", "shared"])
def test_busy_instances_are_never_evicted(overflow) -> None:
    host = make_host(PAUSE_FILTER)
    bounds = InstanceBounds(host, (), 2, overflow)
    streams = []
    for key in ("a", "b"):
        inst = bounds.get(key)
        assert not isinstance(inst, Refusal)
        s = inst.stream()
        assert s.request_headers([]) is None  # paused: in flight
        streams.append(s)
    got = bounds.get("c")
    assert isinstance(got, Refusal) and got.status == 503 and got.retry_after == 1
    assert sorted(host.instances) == ["a", "b"] and bounds.refused == 1
    streams[0].close()  # "a" is idle now
    got = bounds.get("c")
    assert not isinstance(got, Refusal) and sorted(host.instances) == ["b", "c"]


def test_keys_not_allowed_are_refused_or_shared() -> None:
    host = make_host()
    rejecting = InstanceBounds(host, ("shop.example",), 10, "reject")
    refusal = rejecting.get("evil.example")
    assert isinstance(refusal, Refusal) and refusal.status == 421
    assert list(host.instances) == []
    sharing = InstanceBounds(host, ("shop.example",), 10, "shared")
    a, b = sharing.get("evil.example"), sharing.get("other.example")
    assert not isinstance(a, Refusal) and a is b and a.id == SHARED_KEY
    assert not isinstance(sharing.get("shop.example"), Refusal)
    assert sorted(host.instances) == [SHARED_KEY, "shop.example"]


@pytest.mark.parametrize(("decision", "has_token", "word"), [
    (Decision("continue", [], None, 1, failed_calls=1), True, "fail_open"),
    (Decision("continue", [], None, 2, failed_calls=1), True, "miss"),
    (Decision("continue", [], None, 0, 0, "trap"), True, "fail_open"),
    (Decision("respond", [], None, 0, 0, "trap"), True, "error"),
])
def test_fail_open_forwards_have_their_own_word(decision, has_token, word) -> None:
    assert verdict(decision, has_token) == word


# ---- through the addon --------------------------------------------------------------------


def options(tmp_path, **kw: object) -> dict[str, object]:
    return {"wasm_log_metrics": False, "wasm_admin_listen": "",
            "wasm_spool": str(tmp_path / "spool"), "wasm_store": str(tmp_path / "store"), **kw}


def flow(host: bytes, *more_hosts: bytes) -> tflow.HTTPFlow:
    """An unauthenticated request (the filter answers 401 itself, no auth call)."""
    f = tflow.tflow()
    f.request.headers.fields = ((b"Host", host), *((b"Host", h) for h in more_hosts))
    return f


async def test_a_flood_of_distinct_hosts_stays_within_the_bound(tmp_path) -> None:
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, **options(tmp_path, wasm_max_instances=20))
        for i in range(300):
            f = flow(b"h%d.example" % i)
            await run_hook(addon.request(f))
            assert f.response is not None and f.response.status_code == 401  # no auth call
        assert addon.host is not None and len(addon.host.instances) <= 20
        assert addon.bounds is not None and addon.bounds.evicted == 280
        assert "evicted: 280" in addon.status()
        await addon.done()


async def test_hostile_hosts_get_400_and_make_no_instance(tmp_path) -> None:
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, **options(tmp_path))
        for host in (b"a\x00b", b"x" * 8192, b"evil\x1b[2J", b"sp ace"):
            f = flow(host)
            await run_hook(addon.request(f))
            assert f.response is not None and f.response.status_code == 400
            assert "wasm: refused" in f.comment and "\n" not in f.comment
        assert addon.list_instances() == []
        await addon.done()


async def test_two_host_headers_are_refused(tmp_path) -> None:
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, **options(tmp_path))
        f = flow(b"a.example", b"b.example")
        await run_hook(addon.request(f))
        assert f.response is not None and f.response.status_code == 400
        assert addon.list_instances() == []
        await addon.done()


async def test_overflow_option_shares_one_instance(tmp_path) -> None:
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, **options(tmp_path, wasm_instance_allow=["shop.example"],
                                        wasm_instance_overflow="shared"))
        for host in (b"shop.example", b"x.example", b"y.example"):
            await run_hook(addon.request(flow(host)))
        assert sorted(r["id"] for r in addon.list_instances()) == [SHARED_KEY, "shop.example"]
        tctx.configure(addon, wasm_instance_overflow="reject")
        f = flow(b"z.example")
        await run_hook(addon.request(f))
        assert f.response is not None and f.response.status_code == 421
        await addon.done()


class _Collect:
    def __init__(self) -> None:
        self.docs: list[tuple[str, dict[str, object]]] = []

    def write(self, collection: str, doc: dict[str, object]) -> None:
        self.docs.append((collection, doc))


async def test_idle_instances_are_sampled_only_when_something_changed(tmp_path) -> None:
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        tctx.configure(addon, **options(tmp_path))
        for host in (b"a.example", b"b.example"):
            await run_hook(addon.request(flow(host)))
        sink = _Collect()
        addon._sample_all_to(sink)
        assert sorted(d["instance"] for _, d in sink.docs) == ["a.example", "b.example"]
        sink.docs.clear()
        addon._sample_all_to(sink)  # nothing happened since
        assert sink.docs == []
        await run_hook(addon.request(flow(b"b.example")))
        addon._sample_all_to(sink)
        assert [d["instance"] for _, d in sink.docs] == ["b.example"]
        await addon.done()
