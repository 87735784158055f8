"""ABI conformance: each host function, one small inline WAT module at a time.

Every test calls the host function exactly as a guest would (through an exported trampoline),
then checks the returned status and what the host wrote into linear memory.
"""

from __future__ import annotations

import logging
import sys

import pytest

from addons.proxywasm import HttpCallResponse, Status, serialize_map
from addons.proxywasm import _wasmtime as raw
from addons.proxywasm.abi import BufferType, MapType, MetricType, WasiErrno
from addons.proxywasm.exports import HOSTCALLS

from .wat import allocator, module, trampolines

OOB = 0xFFFFFF00  # a pointer far outside a 2-page memory
OUT_PTR, OUT_SIZE = 4096, 4100
BAD = Status.INVALID_MEMORY_ACCESS


def with_all(h_factory, *names):
    return h_factory(module(trampolines(*names)))


# ---- logging, time, ticks -------------------------------------------------------------------


def test_proxy_log_levels_and_memory(harness, caplog) -> None:
    h = with_all(harness, "proxy_log")
    ptr, n = h.put(1024, "héllo \xff".encode() + b"\xff")
    with caplog.at_level(logging.DEBUG, logger="wasm_reclaim.guest"):
        assert h.call("proxy_log", 3, ptr, n) == Status.OK
    assert "héllo" in caplog.text and caplog.records[-1].levelno == logging.WARNING
    assert h.call("proxy_log", 9, ptr, n) == Status.BAD_ARGUMENT
    assert h.call("proxy_log", 2, OOB, 10) == BAD
    assert h.call("proxy_log", 2, 1024, 0xFFFFFFFF) == BAD


def test_proxy_get_log_level(harness) -> None:
    h = with_all(harness, "proxy_get_log_level")
    logging.getLogger("wasm_reclaim.guest").setLevel(logging.WARNING)
    try:
        assert h.call("proxy_get_log_level", 1024) == Status.OK
        assert h.u32(1024) == 3  # WARN
    finally:
        logging.getLogger("wasm_reclaim.guest").setLevel(logging.NOTSET)
    assert h.call("proxy_get_log_level", OOB) == BAD


def test_current_time_comes_from_the_injected_clock(harness) -> None:
    h = with_all(harness, "proxy_get_current_time_nanoseconds",
                 ("wasi_snapshot_preview1", "clock_time_get"))
    h.clock.advance(12.5)
    assert h.call("proxy_get_current_time_nanoseconds", 1024) == Status.OK
    assert h.u64(1024) == h.clock.now_ns()
    assert h.call("clock_time_get", 1, 0, 2048) == WasiErrno.SUCCESS
    assert h.u64(2048) == h.clock.now_ns()
    assert h.call("clock_time_get", 7, 0, 2048) == WasiErrno.NOTSUP
    assert h.call("clock_time_get", 0, 0, OOB) == WasiErrno.FAULT
    assert h.call("proxy_get_current_time_nanoseconds", OOB) == BAD


def test_tick_period_drives_proxy_on_tick_on_the_virtual_clock(harness) -> None:
    body = trampolines("proxy_set_tick_period_milliseconds") + """
  (global $ticks (mut i32) (i32.const 0))
  (func (export "proxy_on_tick") (param i32) (global.set $ticks (i32.add (global.get $ticks) (i32.const 1))))
  (func (export "ticks") (result i32) (global.get $ticks))"""
    h = harness(module(body))
    assert h.call("proxy_set_tick_period_milliseconds", 250) == Status.OK
    h.host.schedule_changed()
    for _ in range(8):
        h.clock.set_ns(h.host.next_event_ns())
        h.host.poll()
    assert h.call("ticks") == 8
    assert h.clock.now_ns() - h.vm.started_ns == 8 * 250_000_000
    assert h.call("proxy_set_tick_period_milliseconds", 0) == Status.OK
    h.clock.advance(10)
    h.host.poll()
    assert h.call("ticks") == 9  # the timer armed before disabling fires once more, then stops
    h.clock.advance(10)
    h.host.poll()
    assert h.call("ticks") == 9


# ---- buffers --------------------------------------------------------------------------------


def test_buffers_are_available_only_in_their_callback(harness) -> None:
    h = with_all(harness, "proxy_get_buffer_bytes", "proxy_get_buffer_status",
                 "proxy_set_buffer_bytes")
    cfg = BufferType.PLUGIN_CONFIGURATION
    assert h.call("proxy_get_buffer_bytes", cfg, 0, 100, OUT_PTR, OUT_SIZE) == Status.NOT_FOUND
    h.vm.buffers = {cfg: b"0123456789"}
    assert h.call("proxy_get_buffer_bytes", cfg, 2, 5, OUT_PTR, OUT_SIZE) == Status.OK
    assert h.returned(OUT_PTR, OUT_SIZE) == b"23456"
    assert h.call("proxy_get_buffer_bytes", cfg, 8, 100, OUT_PTR, OUT_SIZE) == Status.OK
    assert h.returned(OUT_PTR, OUT_SIZE) == b"89"
    assert h.call("proxy_get_buffer_bytes", cfg, 11, 1, OUT_PTR, OUT_SIZE) == Status.BAD_ARGUMENT
    assert h.call("proxy_get_buffer_bytes", 99, 0, 1, OUT_PTR, OUT_SIZE) == Status.BAD_ARGUMENT
    assert h.call("proxy_get_buffer_bytes", cfg, 0, 1, OOB, OUT_SIZE) == BAD
    assert h.call("proxy_get_buffer_status", cfg, 1024, 1028) == Status.OK
    assert h.u32(1024) == 10
    assert h.call("proxy_get_buffer_status", cfg, OOB, 1028) == BAD
    ptr, n = h.put(1100, b"AB")
    assert h.call("proxy_set_buffer_bytes", cfg, 0, 0, ptr, n) == Status.OK  # prepend
    assert h.vm.buffers[cfg] == b"AB0123456789"
    assert h.call("proxy_set_buffer_bytes", cfg, 2, 3, ptr, n) == Status.OK  # replace
    assert h.vm.buffers[cfg] == b"ABAB3456789"
    assert h.call("proxy_set_buffer_bytes", cfg, 0xFFFFFFFF, 0, ptr, n) == Status.OK  # append
    assert h.vm.buffers[cfg].endswith(b"789AB")
    assert h.call("proxy_set_buffer_bytes", cfg, 0, 0, OOB, 4) == BAD


def test_empty_result_writes_null_pointer_without_allocating(harness) -> None:
    h = with_all(harness, "proxy_get_buffer_bytes")
    h.vm.buffers = {BufferType.PLUGIN_CONFIGURATION: b""}
    h.put(OUT_PTR, b"\xff" * 8)
    assert h.call("proxy_get_buffer_bytes", 7, 0, 10, OUT_PTR, OUT_SIZE) == Status.OK
    assert (h.u32(OUT_PTR), h.u32(OUT_SIZE)) == (0, 0)


# ---- header maps ----------------------------------------------------------------------------

MAP_FUNCS = ("proxy_get_header_map_pairs", "proxy_get_header_map_size",
             "proxy_set_header_map_pairs", "proxy_get_header_map_value",
             "proxy_add_header_map_value", "proxy_replace_header_map_value",
             "proxy_remove_header_map_value")
REQ = MapType.HTTP_REQUEST_HEADERS


def test_header_map_get_pairs_and_size(harness) -> None:
    h = with_all(harness, *MAP_FUNCS)
    headers = [(b":path", b"/a"), (b"x-bin", b"\x00\xff\xfe")]
    h.stream_context(headers)
    assert h.call("proxy_get_header_map_pairs", REQ, OUT_PTR, OUT_SIZE) == Status.OK
    assert h.returned(OUT_PTR, OUT_SIZE) == serialize_map(headers)
    assert h.call("proxy_get_header_map_size", REQ, 1024) == Status.OK
    assert h.u32(1024) == len(serialize_map(headers))
    assert h.call("proxy_get_header_map_pairs", 42, OUT_PTR, OUT_SIZE) == Status.BAD_ARGUMENT
    assert h.call("proxy_get_header_map_pairs", REQ, OOB, OUT_SIZE) == BAD
    h.root()  # no stream is effective: request headers are not available
    assert h.call("proxy_get_header_map_pairs", REQ, OUT_PTR, OUT_SIZE) == Status.NOT_FOUND


def test_header_map_value_is_case_insensitive_and_binary_safe(harness) -> None:
    h = with_all(harness, *MAP_FUNCS)
    h.stream_context([(b"authorization", b"Bearer \xff\x00x")])
    k, n = h.put(1024, b"Authorization")
    assert h.call("proxy_get_header_map_value", REQ, k, n, OUT_PTR, OUT_SIZE) == Status.OK
    assert h.returned(OUT_PTR, OUT_SIZE) == b"Bearer \xff\x00x"
    k2, n2 = h.put(1100, b"missing")
    assert h.call("proxy_get_header_map_value", REQ, k2, n2, OUT_PTR, OUT_SIZE) == Status.NOT_FOUND
    assert h.call("proxy_get_header_map_value", REQ, OOB, 4, OUT_PTR, OUT_SIZE) == BAD
    assert h.call("proxy_get_header_map_value", REQ, k, n, OUT_PTR, OOB) == BAD


def test_header_map_add_replace_remove(harness) -> None:
    h = with_all(harness, *MAP_FUNCS)
    ctx = h.stream_context([(b"a", b"1"), (b"b", b"2")])
    k, kn = h.put(1024, b"A")
    v, vn = h.put(1100, b"9")
    assert h.call("proxy_add_header_map_value", REQ, k, kn, v, vn) == Status.OK
    assert ctx.request_headers == [(b"a", b"1"), (b"b", b"2"), (b"a", b"9")]
    assert h.call("proxy_replace_header_map_value", REQ, k, kn, v, vn) == Status.OK
    assert ctx.request_headers == [(b"b", b"2"), (b"a", b"9")]
    assert h.call("proxy_remove_header_map_value", REQ, k, kn) == Status.OK
    assert ctx.request_headers == [(b"b", b"2")]
    assert h.call("proxy_remove_header_map_value", REQ, k, kn) == Status.OK  # absent: still OK
    assert h.call("proxy_add_header_map_value", 77, k, kn, v, vn) == Status.BAD_ARGUMENT
    assert h.call("proxy_add_header_map_value", REQ, k, kn, OOB, 1) == BAD
    assert h.call("proxy_replace_header_map_value", REQ, OOB, 1, v, vn) == BAD


def test_set_header_map_pairs_validates_the_encoding(harness) -> None:
    h = with_all(harness, *MAP_FUNCS)
    ctx = h.stream_context([(b"old", b"x")])
    ptr, n = h.put(1024, serialize_map([(b"New", b"1"), (b"two", b"")]))
    assert h.call("proxy_set_header_map_pairs", REQ, ptr, n) == Status.OK
    assert ctx.request_headers == [(b"new", b"1"), (b"two", b"")]
    bad, bn = h.put(2048, b"\x05\x00\x00\x00garbage")
    assert h.call("proxy_set_header_map_pairs", REQ, bad, bn) == Status.BAD_ARGUMENT
    assert ctx.request_headers == [(b"new", b"1"), (b"two", b"")]
    assert h.call("proxy_set_header_map_pairs", REQ, OOB, 16) == BAD


@pytest.mark.parametrize(("name", "value"), [
    (b"x-a", b"1\r\nx-injected: 1"), (b"x-a", b"1\nx"), (b"x-a", b"nul\x00"),
    (b"bad name", b"1"), (b"x:y", b"1"), (b"", b"1"), (b":path", b"/a b"),
    (b":path", b""), (b":method", b"GET /x HTTP/1.1\r\n"), (b":foo", b"1"),
])
def test_a_field_that_would_split_the_message_is_refused(harness, name, value, caplog) -> None:
    h = with_all(harness, *MAP_FUNCS, "proxy_send_local_response")
    ctx = h.stream_context([(b":path", b"/"), (b"old", b"x")])
    before = list(ctx.request_headers)
    k, kn = h.put(1024, name)
    v, vn = h.put(1100, value)
    assert h.call("proxy_add_header_map_value", REQ, k, kn, v, vn) == Status.BAD_ARGUMENT
    assert h.call("proxy_replace_header_map_value", REQ, k, kn, v, vn) == Status.BAD_ARGUMENT
    m, mn = h.put(2048, serialize_map([(b"ok", b"1"), (name, value)]))
    assert h.call("proxy_set_header_map_pairs", REQ, m, mn) == Status.BAD_ARGUMENT
    assert h.call("proxy_send_local_response", 403, 0, 0, 0, 0, m, mn, 0) == (
        Status.BAD_ARGUMENT)
    assert ctx.request_headers == before and ctx.local_response is None
    lines = [r.getMessage() for r in caplog.records if "refused" in r.getMessage()]
    assert len(lines) == 4 and all("\n" not in line and "\r" not in line for line in lines)


def test_fields_with_any_other_bytes_are_kept(harness) -> None:
    h = with_all(harness, *MAP_FUNCS)
    ctx = h.stream_context([(b":path", b"/")])
    k, kn = h.put(1024, b"X-Bin")
    v, vn = h.put(1100, b"\xff\xfe tab\there")  # not UTF-8, but no CR, LF or NUL
    assert h.call("proxy_add_header_map_value", REQ, k, kn, v, vn) == Status.OK
    assert ctx.request_headers[-1] == (b"x-bin", b"\xff\xfe tab\there")


def test_a_local_response_is_final(harness) -> None:
    h = with_all(harness, "proxy_send_local_response")
    ctx = h.stream_context()
    assert h.call("proxy_send_local_response", 101, 0, 0, 0, 0, 0, 0, 0) == Status.BAD_ARGUMENT
    assert h.call("proxy_send_local_response", 199, 0, 0, 0, 0, 0, 0, 0) == Status.BAD_ARGUMENT
    assert ctx.local_response is None
    assert h.call("proxy_send_local_response", 204, 0, 0, 0, 0, 0, 0, 0) == Status.OK


def test_huge_header_value_crosses_the_boundary_intact(harness) -> None:
    h = with_all(harness, *MAP_FUNCS)
    big = bytes(range(256)) * 4096  # 1 MiB; the guest's allocator grows memory for it
    h.stream_context([(b"x-big", big)])
    k, n = h.put(1024, b"x-big")
    assert h.call("proxy_get_header_map_value", REQ, k, n, OUT_PTR, OUT_SIZE) == Status.OK
    assert h.returned(OUT_PTR, OUT_SIZE) == big


# ---- streams and local responses ------------------------------------------------------------


def test_memory_the_guest_grows_is_in_bounds_and_a_closed_vm_has_none(harness) -> None:
    """The host sees pages the guest itself grew (its view of linear memory is refreshed), never
    a byte past the end, and nothing once the VM is closed (its memory is freed)."""
    h = harness(module("""
  (func (export "grow") (param $n i32) (result i32) (memory.grow (local.get $n)))
  (func (export "store") (param $p i32) (param $v i32) (i32.store (local.get $p) (local.get $v)))
"""))
    vm = h.vm
    end = 2 * 65536  # the module's two pages
    assert vm.read(end, 4) is None and not vm.write_u32(end, 1) and vm.read(end - 4, 4) is not None
    assert h.call("grow", 1) == 2
    h.call("store", end, 0x01020304)  # the guest writes into its new page
    assert vm.read(end, 4) == bytes([4, 3, 2, 1])
    assert vm.write_u32(end + 4, 7) and h.u32(end + 4) == 7
    grown = 3 * 65536
    assert vm.read(grown - 4, 4) is not None  # the last bytes, but not one past them
    assert vm.read(grown - 4, 8) is None and not vm.write(grown - 1, b"ab")
    vm.close()
    assert vm.read(0, 4) is None and not vm.in_bounds(0, 1) and not vm.write_u64(0, 1)


def test_continue_close_and_local_response(harness) -> None:
    h = with_all(harness, "proxy_continue_stream", "proxy_close_stream",
                 "proxy_send_local_response", "proxy_continue_request")
    ctx = h.stream_context()
    assert h.call("proxy_continue_stream", 0) == Status.OK and ctx.resumed
    assert h.call("proxy_continue_stream", 9) == Status.BAD_ARGUMENT
    assert h.call("proxy_continue_stream", 2) == Status.UNIMPLEMENTED  # TCP streams
    assert h.call("proxy_continue_request") == Status.OK
    assert h.call("proxy_close_stream", 0) == Status.OK and ctx.closed
    d, dn = h.put(1024, b"denied")
    b, bn = h.put(1100, b"no\n")
    hd, hn = h.put(1200, serialize_map([(b"WWW-Authenticate", b"Bearer")]))
    assert h.call("proxy_send_local_response", 401, d, dn, b, bn, hd, hn, 0) == Status.OK
    assert ctx.local_response is not None
    assert (ctx.local_response.status, ctx.local_response.body) == (401, b"no\n")
    assert ctx.local_response.headers == [(b"www-authenticate", b"Bearer")]
    assert ctx.local_response.details == "denied"
    assert h.call("proxy_send_local_response", 401, d, dn, OOB, 3, hd, hn, 0) == BAD
    assert h.call("proxy_send_local_response", 42, d, dn, b, bn, hd, hn, 0) == (
        Status.BAD_ARGUMENT)
    h.root()
    assert h.call("proxy_continue_stream", 0) == Status.NOT_FOUND


def test_set_effective_context(harness) -> None:
    h = with_all(harness, "proxy_set_effective_context")
    ctx = h.stream_context()
    h.root()
    assert h.call("proxy_set_effective_context", ctx.id) == Status.OK
    assert h.call("proxy_set_effective_context", 9999) == Status.BAD_ARGUMENT


def test_proxy_done_finishes_a_deferred_context(harness) -> None:
    body = trampolines("proxy_done") + """
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 0))
  (global $deleted (mut i32) (i32.const 0))
  (func (export "proxy_on_delete") (param $c i32) (global.set $deleted (local.get $c)))
  (func (export "deleted") (result i32) (global.get $deleted))"""
    h = harness(module(body))
    s = h.instance.stream()
    assert s.request_headers([]) is not None
    s.close()
    assert h.call("deleted") == 0  # proxy_on_done said "not yet"
    ctx_id = next(iter(h.vm.contexts))
    h.vm.effective = ctx_id
    assert h.call("proxy_done") == Status.OK
    assert h.call("deleted") == ctx_id and not h.vm.contexts
    assert h.call("proxy_done") == Status.NOT_FOUND


# ---- outbound calls -------------------------------------------------------------------------


def _call_headers(**extra: bytes) -> bytes:
    pairs = {b":method": b"GET", b":path": b"/verify", b":authority": b"auth", **{
        k.encode(): v for k, v in extra.items()}}
    return serialize_map(list(pairs.items()))


def test_http_call_dispatches_and_returns_an_id(harness) -> None:
    h = with_all(harness, "proxy_http_call")
    h.stream_context()
    up, un = h.put(1024, b"auth")
    hd, hn = h.put(1100, _call_headers(authorization=b"Bearer t"))
    assert h.call("proxy_http_call", up, un, hd, hn, 0, 0, 0, 0, 500, 2048) == Status.OK
    call_id = h.u32(2048)
    assert call_id in h.vm.calls and h.vm.outbound == 1
    assert h.calls[0].path == "/verify" and h.calls[0].header(b"authorization") == b"Bearer t"
    assert h.calls[0].timeout_ms == 500


@pytest.mark.parametrize(
    ("upstream", "headers", "status"),
    [
        (b"nowhere", _call_headers(), Status.BAD_ARGUMENT),  # unknown cluster
        (b"auth", serialize_map([(b":method", b"GET")]), Status.BAD_ARGUMENT),  # no :path
        (b"auth", b"\x09\x00\x00\x00", Status.BAD_ARGUMENT),  # broken map
    ],
)
def test_http_call_rejects_bad_requests(harness, upstream, headers, status) -> None:
    h = with_all(harness, "proxy_http_call")
    h.stream_context()
    up, un = h.put(1024, upstream)
    hd, hn = h.put(1100, headers)
    assert h.call("proxy_http_call", up, un, hd, hn, 0, 0, 0, 0, 500, 2048) == status
    assert h.vm.outbound == 0 and not h.calls


def test_http_call_bad_pointers(harness) -> None:
    h = with_all(harness, "proxy_http_call")
    up, un = h.put(1024, b"auth")
    hd, hn = h.put(1100, _call_headers())
    assert h.call("proxy_http_call", OOB, 4, hd, hn, 0, 0, 0, 0, 500, 2048) == BAD
    assert h.call("proxy_http_call", up, un, hd, hn, 0, 0, 0, 0, 500, OOB) == BAD
    assert h.vm.outbound == 0


def test_call_response_headers_body_and_status_in_the_callback(harness) -> None:
    body = trampolines("proxy_http_call", "proxy_get_header_map_value", "proxy_get_buffer_bytes",
                       "proxy_get_status") + """
  (global $seen (mut i32) (i32.const 0))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
    ;; copy :status into 3000.., body into 3100.., status code into 3200
    (drop (call $proxy_get_header_map_value (i32.const 6) (i32.const 2900) (i32.const 7)
                                            (i32.const 3000) (i32.const 3004)))
    (drop (call $proxy_get_buffer_bytes (i32.const 4) (i32.const 0) (i32.const 100)
                                        (i32.const 3100) (i32.const 3104)))
    (drop (call $proxy_get_status (i32.const 3200) (i32.const 3204) (i32.const 3208)))
    (global.set $seen (local.get 3)))
  (func (export "seen") (result i32) (global.get $seen))"""
    h = harness(module(body), lambda call: HttpCallResponse(403, [(b"x", b"y")], b"nope"))
    h.stream_context()
    h.put(2900, b":status")
    up, un = h.put(1024, b"auth")
    hd, hn = h.put(1100, _call_headers())
    assert h.call("proxy_http_call", up, un, hd, hn, 0, 0, 0, 0, 500, 2048) == Status.OK
    h.root()
    h.host.poll()
    assert h.call("seen") == 4  # body size
    assert h.returned(3000, 3004) == b"403"
    assert h.returned(3100, 3104) == b"nope"
    assert h.u32(3200) == 403


# ---- metrics --------------------------------------------------------------------------------


METRIC_FUNCS = ("proxy_define_metric", "proxy_increment_metric", "proxy_record_metric",
                "proxy_get_metric")


def define_metric(h, metric_type: MetricType, name: bytes, at: int, out: int) -> int:
    """Define metric `name` (written at `at`); its id, returned at `out`."""
    n, nn = h.put(at, name)
    assert h.call("proxy_define_metric", metric_type, n, nn, out) == Status.OK
    return h.u32(out)


def test_metrics_define_increment_record_get(harness) -> None:
    h = with_all(harness, *METRIC_FUNCS)
    counter = define_metric(h, MetricType.COUNTER, b"auth_cache.hits", 1024, 2048)
    n, nn = 1024, len(b"auth_cache.hits")  # the name define_metric wrote
    assert h.call("proxy_increment_metric", counter, 5) == Status.OK
    assert h.call("proxy_increment_metric", counter, -1) == Status.BAD_ARGUMENT
    gauge = define_metric(h, MetricType.GAUGE, b"auth_cache.live_bytes", 1100, 2052)
    assert h.call("proxy_record_metric", gauge, 123456789012) == Status.OK
    assert h.call("proxy_increment_metric", gauge, -12) == Status.OK
    assert h.call("proxy_get_metric", gauge, 2056) == Status.OK
    assert h.u64(2056) == 123456789000
    assert h.vm.metric_values() == {"auth_cache.hits": 5, "auth_cache.live_bytes": 123456789000}
    assert h.instance.observe().metrics["auth_cache.hits"] == 5
    assert h.call("proxy_define_metric", 7, n, nn, 2048) == Status.BAD_ARGUMENT
    assert h.call("proxy_define_metric", 0, OOB, 3, 2048) == BAD
    assert h.call("proxy_get_metric", 999, 2056) == Status.NOT_FOUND
    assert h.call("proxy_record_metric", 999, 1) == Status.NOT_FOUND
    assert h.call("proxy_get_metric", gauge, OOB) == BAD


def test_metrics_by_type_as_envoy(harness) -> None:
    """Envoy's semantics per type: recording on a counter adds; a histogram records, and can
    neither be incremented nor read back."""
    h = with_all(harness, *METRIC_FUNCS)
    counter = define_metric(h, MetricType.COUNTER, b"conf.requests", 1024, 2048)
    assert h.call("proxy_record_metric", counter, 5) == Status.OK
    assert h.call("proxy_record_metric", counter, 5) == Status.OK
    assert h.call("proxy_get_metric", counter, 2056) == Status.OK
    assert h.u64(2056) == 10
    histogram = define_metric(h, MetricType.HISTOGRAM, b"conf.body_bytes", 1100, 2052)
    assert h.call("proxy_record_metric", histogram, 42) == Status.OK
    assert h.call("proxy_increment_metric", histogram, 1) == Status.BAD_ARGUMENT
    assert h.call("proxy_get_metric", histogram, 2056) == Status.BAD_ARGUMENT
    assert h.vm.metric_values()["conf.body_bytes"] == 42


# ---- shared data, properties ----------------------------------------------------------------


def test_shared_data_with_cas(harness) -> None:
    h = with_all(harness, "proxy_set_shared_data", "proxy_get_shared_data")
    k, kn = h.put(1024, b"key")
    v, vn = h.put(1100, b"value")
    assert h.call("proxy_get_shared_data", k, kn, OUT_PTR, OUT_SIZE, 2048) == Status.NOT_FOUND
    assert h.call("proxy_set_shared_data", k, kn, v, vn, 0) == Status.OK
    assert h.call("proxy_get_shared_data", k, kn, OUT_PTR, OUT_SIZE, 2048) == Status.OK
    assert h.returned(OUT_PTR, OUT_SIZE) == b"value"
    cas = h.u32(2048)
    assert h.call("proxy_set_shared_data", k, kn, v, vn, cas + 1) == Status.CAS_MISMATCH
    assert h.call("proxy_set_shared_data", k, kn, v, vn, cas) == Status.OK
    assert h.call("proxy_set_shared_data", OOB, 3, v, vn, 0) == BAD
    # Shared data outlives a restart (like Envoy's, it belongs to the host, not the VM).
    h.instance.restart("test", "test")
    k, kn = h.put(1024, b"key")  # the new generation's memory is fresh
    assert h.call("proxy_get_shared_data", k, kn, OUT_PTR, OUT_SIZE, 2048) == Status.OK


def test_properties(harness) -> None:
    h = with_all(harness, "proxy_get_property", "proxy_set_property")
    p, pn = h.put(1024, b"plugin_vm_id")
    assert h.call("proxy_get_property", p, pn, OUT_PTR, OUT_SIZE) == Status.OK
    assert h.returned(OUT_PTR, OUT_SIZE) == b""  # Envoy's vm_id: empty unless configured
    h.stream_context([(b":path", b"/x?y"), (b":method", b"POST")])
    p, pn = h.put(1100, b"request\x00path")
    assert h.call("proxy_get_property", p, pn, OUT_PTR, OUT_SIZE) == Status.OK
    assert h.returned(OUT_PTR, OUT_SIZE) == b"/x?y"
    p, pn = h.put(1200, b"upstream\x00address")
    assert h.call("proxy_get_property", p, pn, OUT_PTR, OUT_SIZE) == Status.NOT_FOUND
    assert h.call("proxy_get_property", OOB, 4, OUT_PTR, OUT_SIZE) == BAD
    assert h.call("proxy_set_property", p, pn, p, pn) == Status.OK  # filter state, per stream
    assert h.call("proxy_get_property", p, pn, OUT_PTR, OUT_SIZE) == Status.OK
    assert h.returned(OUT_PTR, OUT_SIZE) == b"upstream\x00address"


@pytest.mark.parametrize("name", [
    "proxy_grpc_call", "proxy_grpc_stream", "proxy_grpc_send", "proxy_grpc_cancel",
    "proxy_grpc_close",
])
def test_declared_but_unsupported_calls_return_unimplemented(harness, name) -> None:
    h = with_all(harness, name)
    params = HOSTCALLS[("env", name)][0][0]
    assert h.call(name, *([0] * len(params))) == Status.UNIMPLEMENTED


def test_foreign_functions_are_not_found(harness) -> None:
    h = with_all(harness, "proxy_call_foreign_function")
    assert h.call("proxy_call_foreign_function", 0, 0, 0, 0, 0, 0) == Status.NOT_FOUND


# ---- WASI preview1 --------------------------------------------------------------------------

W = "wasi_snapshot_preview1"


def test_fd_write_logs_stdout_and_stderr(harness, caplog) -> None:
    h = with_all(harness, (W, "fd_write"))
    h.put(1024, b"hello ")
    h.put(1100, b"world\n")
    h.put(2000, (1024).to_bytes(4, "little") + (6).to_bytes(4, "little")
          + (1100).to_bytes(4, "little") + (6).to_bytes(4, "little"))
    with caplog.at_level(logging.INFO, logger="wasm_reclaim.guest"):
        assert h.call("fd_write", 2, 2000, 2, 3000) == WasiErrno.SUCCESS
    assert h.u32(3000) == 12
    assert "hello world" in caplog.text and caplog.records[-1].levelno == logging.ERROR
    assert h.call("fd_write", 5, 2000, 2, 3000) == WasiErrno.BADF
    assert h.call("fd_write", 1, OOB, 2, 3000) == WasiErrno.FAULT
    h.put(2100, OOB.to_bytes(4, "little") + (6).to_bytes(4, "little"))
    assert h.call("fd_write", 1, 2100, 1, 3000) == WasiErrno.FAULT


def test_random_get_is_seeded_in_simulation(harness) -> None:
    a = harness(module(trampolines((W, "random_get"))), seed=7)
    b = harness(module(trampolines((W, "random_get"))), seed=7)
    for h in (a, b):
        assert h.call("random_get", 1024, 32) == WasiErrno.SUCCESS
    assert a.vm.read(1024, 32) == b.vm.read(1024, 32) != bytes(32)
    assert a.call("random_get", OOB, 4) == WasiErrno.FAULT
    assert a.call("random_get", 1024, 10**7) == WasiErrno.INVAL


def test_environ_and_args_are_empty(harness) -> None:
    h = with_all(harness, (W, "environ_sizes_get"), (W, "environ_get"), (W, "args_sizes_get"),
                 (W, "args_get"))
    h.put(1024, b"\xff" * 8)
    assert h.call("environ_sizes_get", 1024, 1028) == WasiErrno.SUCCESS
    assert (h.u32(1024), h.u32(1028)) == (0, 0)
    assert h.call("args_sizes_get", 1024, OOB) == WasiErrno.FAULT
    assert h.call("environ_get", 0, 0) == WasiErrno.SUCCESS
    assert h.call("args_get", 0, 0) == WasiErrno.SUCCESS


def test_proc_exit_traps_with_its_code(harness) -> None:
    from addons.proxywasm._wasmtime import GuestTrap

    h = with_all(harness, (W, "proc_exit"))
    with pytest.raises(GuestTrap, match=r"proc_exit\(3\)"):
        h.call("proc_exit", 3)


def test_distinct_guest_lines_are_distinct_log_kinds(harness, caplog) -> None:
    # The proxy rate-limits each kind of log line (addons.logsafe.RateLimit counts records by
    # their message); a filter's distinct lines must not count as one kind.
    from addons.logsafe import RateLimit

    h = with_all(harness, "proxy_log")
    limit = RateLimit(burst=2, period_s=60, clock=lambda: 0.0)
    logger = logging.getLogger("wasm_reclaim.guest")
    logger.addFilter(limit)
    try:
        with caplog.at_level(logging.INFO, logger="wasm_reclaim.guest"):
            for i in range(6):
                ptr, n = h.put(1024, f"line {i}".encode())
                h.call("proxy_log", 2, ptr, n)
            for _ in range(4):
                ptr, n = h.put(1024, b"same")
                h.call("proxy_log", 2, ptr, n)
    finally:
        logger.removeFilter(limit)
    lines = [r.getMessage() for r in caplog.records]
    assert [ln for ln in lines if "line" in ln] == [f"[t gen 0] line {i}" for i in range(6)]
    assert sum("same" in ln for ln in lines) == 2  # repeats of one line are held back


# ---- the C forms of the hot host calls (fastcall.c) -----------------------------------------

# An allocator the test steers: 0 = the bump allocator, 1 = return null, 2 = trap.
STEERED_ALLOCATOR = """
  (global $mode (mut i32) (i32.const 0))
  (func (export "set_alloc_mode") (param i32) (global.set $mode (local.get 0)))
""" + allocator("""
    (if (i32.eq (global.get $mode) (i32.const 1)) (then (return (i32.const 0))))
    (if (i32.eq (global.get $mode) (i32.const 2)) (then unreachable))""")

_CASES = [  # (map, key, allocator mode, header pairs), each through both forms
    (REQ, b"Authorization", 0, [(b"authorization", b"Bearer t")]),
    (REQ, b"x-b", 0, [(b"x-a", b"1"), (b"x-b", b"2"), (b"x-b", b"3")]),  # the first match
    (REQ, b"missing", 0, [(b"a", b"1")]),
    (REQ, b"empty", 0, [(b"empty", b"")]),
    (REQ, b"k" * 300, 0, [(b"k" * 300, b"long key")]),
    (MapType.HTTP_RESPONSE_HEADERS, b"a", 0, [(b"a", b"1")]),
    (MapType.HTTP_REQUEST_TRAILERS, b"a", 0, [(b"a", b"1")]),
    (REQ, b"big", 0, [(b"big", bytes(range(256)) * 1024)]),  # the allocator grows memory
    (REQ, b"a", 1, [(b"a", b"1")]),  # the allocator returns null
    (REQ, b"a", 2, [(b"a", b"1")]),  # the allocator traps
    (99, b"a", 0, [(b"a", b"1")]),
]


def _header_value_outcome(harness, abi: str, native: bool, case) -> tuple[object, ...]:
    map_type, key, alloc_mode, pairs = case
    wat = module(trampolines("proxy_get_header_map_value") + STEERED_ALLOCATOR, abi=abi,
                 allocator=False)
    h = harness(wat)
    ctx = h.stream_context(pairs)
    ctx.response_headers = pairs
    if not native:
        h.vm.native = None
    h.call("set_alloc_mode", alloc_mode)
    k, n = h.put(1024, key)
    h.put(OUT_PTR, b"\xee" * 8)
    try:
        status = h.call("proxy_get_header_map_value", map_type, k, n, OUT_PTR, OUT_SIZE)
    except Exception as e:  # a trap: its message names what failed
        return ("trap", type(e).__name__, str(e).splitlines()[0])
    ptr, size = h.u32(OUT_PTR), h.u32(OUT_SIZE)
    value = h.vm.read(ptr, size) if status == Status.OK and size else None
    return (status, ptr, size, value)


@pytest.mark.parametrize("abi", ["0_2_1", "0_1_0"])
@pytest.mark.parametrize("case", range(len(_CASES)))
def test_the_c_form_of_get_header_map_value_answers_as_the_python_function(
        harness, abi: str, case: int) -> None:
    assert bool(raw.NATIVE_HEADER_MAP_VALUE) == raw.FASTCALLS
    native = _header_value_outcome(harness, abi, True, _CASES[case])
    python = _header_value_outcome(harness, abi, False, _CASES[case])
    assert native == python


def test_the_c_forms_take_a_hit_without_the_python_functions(harness) -> None:
    # Through ctypes (the extension not built, or WASM_RECLAIM_CTYPES_CALLS) there are none.
    c_forms = raw.FASTCALLS
    h = harness(module(trampolines("proxy_get_header_map_value",
                                   "proxy_get_current_time_nanoseconds")))
    h.stream_context([(b"authorization", b"Bearer t")])
    k, n = h.put(1024, b"authorization")
    m, mn = h.put(1100, b"missing")
    called: list[str] = []

    def profile(frame, event, _arg) -> None:
        if event == "call" and frame.f_code.co_name.startswith("proxy_get_"):
            called.append(frame.f_code.co_name)

    sys.setprofile(profile)
    try:
        h.clock.advance(3.25)
        assert h.call("proxy_get_current_time_nanoseconds", 2048) == Status.OK
        assert h.call("proxy_get_header_map_value", REQ, k, n, OUT_PTR, OUT_SIZE) == Status.OK
        both = ["proxy_get_current_time_nanoseconds", "proxy_get_header_map_value"]
        assert called == ([] if c_forms else both)
        assert h.call("proxy_get_header_map_value", REQ, m, mn, OUT_PTR, OUT_SIZE) == (
            Status.NOT_FOUND)
        assert called[-1:] == ["proxy_get_header_map_value"]  # a miss: the Python function
    finally:
        sys.setprofile(None)
    assert h.u64(2048) == h.clock.now_ns()
    assert h.returned(OUT_PTR, OUT_SIZE) == b"Bearer t"
