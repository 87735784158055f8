"""The HTTP stream lifecycle in the host: every stream callback, in Envoy's order, with its
sizes and end_of_stream; pauses and resumes from any phase; local responses; body buffers.

The filter is an inline WAT module that records each callback it gets (kind, context id, and
its two arguments) in its memory, and answers the action the test wrote for that kind.
"""

from __future__ import annotations

import pytest

from addons.proxywasm import Status
from addons.proxywasm.abi import BufferType, MapType
from addons.proxywasm.context import REQUEST_BODY_DIRTY, RESPONSE_BODY_DIRTY

from .wat import module, trampolines

KINDS = {1: "request_headers", 2: "request_body", 3: "request_trailers", 4: "response_headers",
         5: "response_body", 6: "response_trailers", 7: "log", 8: "done", 9: "delete"}
ACTIONS, EVENTS = 4096, 8192
CONTINUE, PAUSE = 0, 1

RECORDER = trampolines(
    "proxy_continue_stream", "proxy_send_local_response", "proxy_get_buffer_bytes",
    "proxy_set_buffer_bytes", "proxy_get_buffer_status", "proxy_close_stream",
    "proxy_replace_header_map_value", "proxy_set_effective_context",
) + """
  (global $n (mut i32) (i32.const 0))
  (func $rec (param $kind i32) (param $c i32) (param $a i32) (param $b i32) (result i32)
    (local $p i32)
    (local.set $p (i32.add (i32.const 8192) (i32.mul (global.get $n) (i32.const 16))))
    (i32.store (local.get $p) (local.get $kind))
    (i32.store offset=4 (local.get $p) (local.get $c))
    (i32.store offset=8 (local.get $p) (local.get $a))
    (i32.store offset=12 (local.get $p) (local.get $b))
    (global.set $n (i32.add (global.get $n) (i32.const 1)))
    (i32.load (i32.add (i32.const 4096) (i32.mul (local.get $kind) (i32.const 4)))))
  (func (export "events") (result i32) (global.get $n))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (call $rec (i32.const 1) (local.get 0) (local.get 1) (local.get 2)))
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32)
    (call $rec (i32.const 2) (local.get 0) (local.get 1) (local.get 2)))
  (func (export "proxy_on_request_trailers") (param i32 i32) (result i32)
    (call $rec (i32.const 3) (local.get 0) (local.get 1) (i32.const -1)))
  (func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)
    (call $rec (i32.const 4) (local.get 0) (local.get 1) (local.get 2)))
  (func (export "proxy_on_response_body") (param i32 i32 i32) (result i32)
    (call $rec (i32.const 5) (local.get 0) (local.get 1) (local.get 2)))
  (func (export "proxy_on_response_trailers") (param i32 i32) (result i32)
    (call $rec (i32.const 6) (local.get 0) (local.get 1) (i32.const -1)))
  (func (export "proxy_on_log") (param i32)
    (drop (call $rec (i32.const 7) (local.get 0) (i32.const -1) (i32.const -1))))
  (func (export "proxy_on_done") (param i32) (result i32)
    (if (result i32) (call $rec (i32.const 8) (local.get 0) (i32.const -1) (i32.const -1))
      (then (i32.const 0)) (else (i32.const 1))))
  (func (export "proxy_on_delete") (param i32)
    (drop (call $rec (i32.const 9) (local.get 0) (i32.const -1) (i32.const -1))))
"""


def events(h) -> list[tuple[str, int, int]]:
    """What the filter recorded: (callback, first argument, second argument); -1: none."""
    out = []
    for i in range(h.call("events")):
        data = h.vm.read(EVENTS + 16 * i, 16)
        kind, _ctx, a, b = (int.from_bytes(data[j:j + 4], "little", signed=True)
                            for j in range(0, 16, 4))
        out.append((KINDS[kind], a, b))
    return out


def act(h, kind: str, action: int) -> None:
    """Make the filter answer `action` to the callback `kind` (done: 1 defers)."""
    number = next(k for k, v in KINDS.items() if v == kind)
    h.put(ACTIONS + 4 * number, action.to_bytes(4, "little"))


@pytest.fixture
def rec(harness):
    return harness(module(RECORDER))


HEADERS = [(b":method", b"POST"), (b":path", b"/p"), (b":authority", b"a.example")]
RESPONSE = [(b":status", b"200"), (b"content-type", b"text/plain")]


def test_every_callback_runs_in_envoys_order_with_sizes_and_end_of_stream(rec) -> None:
    stream = rec.instance.stream()
    assert stream.request_headers(HEADERS, end_of_stream=False).action == "continue"
    assert stream.request_body(b"hello", end_of_stream=False).action == "continue"
    assert stream.request_trailers([(b"x-t", b"1"), (b"x-u", b"2")]).action == "continue"
    assert stream.response_headers(RESPONSE, end_of_stream=False).action == "continue"
    assert stream.response_body(b"0123456789", end_of_stream=True).action == "continue"
    stream.close()
    assert events(rec) == [
        ("request_headers", 3, 0), ("request_body", 5, 0), ("request_trailers", 2, -1),
        ("response_headers", 2, 0), ("response_body", 10, 1),
        ("log", -1, -1), ("done", -1, -1), ("delete", -1, -1),
    ]
    assert rec.vm.contexts == {}


def test_done_false_defers_delete_until_proxy_done(harness) -> None:
    h = harness(module(RECORDER + trampolines("proxy_done")))
    act(h, "done", 1)
    stream = h.instance.stream()
    stream.request_headers(HEADERS)
    ctx = stream.ctx
    stream.close()
    assert [e[0] for e in events(h)] == ["request_headers", "log", "done"]
    h.vm.effective = ctx.id
    assert h.call("proxy_done") == Status.OK
    assert [e[0] for e in events(h)][-1] == "delete"


@pytest.mark.parametrize("phase", ["request_headers", "request_body", "request_trailers",
                                   "response_headers", "response_body", "response_trailers"])
def test_pause_then_continue_stream_from_any_phase(rec, phase) -> None:
    act(rec, phase, PAUSE)
    stream = rec.instance.stream()
    decided = []
    stream.on_decision = decided.append
    results = {}
    for name, run in [
        ("request_headers", lambda: stream.request_headers(HEADERS, False)),
        ("request_body", lambda: stream.request_body(b"abc", False)),
        ("request_trailers", lambda: stream.request_trailers([(b"t", b"1")])),
        ("response_headers", lambda: stream.response_headers(RESPONSE, False)),
        ("response_body", lambda: stream.response_body(b"xyz", False)),
        ("response_trailers", lambda: stream.response_trailers([(b"t", b"2")])),
    ]:
        results[name] = run()
        if name == phase:
            break
    assert results[phase] is None and stream.waiting
    rec.vm.effective = stream.ctx.id
    assert rec.call("proxy_continue_stream", 0 if phase.startswith("request") else 1) == 0
    rec.host._settle(rec.vm)
    assert not stream.waiting and decided[-1].action == "continue"


@pytest.mark.parametrize("phase", ["request_headers", "request_body", "response_headers",
                                   "response_body"])
def test_local_response_from_any_phase(harness, phase) -> None:
    # The filter sends a local response from inside the callback `phase`.
    kind = next(k for k, v in KINDS.items() if v == phase)
    body = RECORDER.replace(
        f"(call $rec (i32.const {kind}) (local.get 0) (local.get 1) (local.get 2)))",
        f"(drop (call $rec (i32.const {kind}) (local.get 0) (local.get 1) (local.get 2)))\n"
        "    (drop (call $proxy_send_local_response (i32.const 418) (i32.const 0) (i32.const 0)"
        " (i32.const 2000) (i32.const 3) (i32.const 0) (i32.const 0) (i32.const 0)))"
        " (i32.const 1))")
    h = harness(module(body + '\n  (data (i32.const 2000) "tea")'))
    stream = h.instance.stream()
    steps = [
        ("request_headers", lambda: stream.request_headers(HEADERS, False)),
        ("request_body", lambda: stream.request_body(b"abc", True)),
        ("response_headers", lambda: stream.response_headers(RESPONSE, False)),
        ("response_body", lambda: stream.response_body(b"xyz", True)),
    ]
    for name, run in steps:
        d = run()
        if name == phase:
            assert d.action == "respond" and d.response.status == 418 and d.response.body == b"tea"
            break
        assert d.action == "continue"


def test_body_buffers_belong_to_the_stream_with_the_specs_semantics(rec) -> None:
    h = rec
    stream = h.instance.stream()
    stream.request_headers(HEADERS, False)
    ctx = stream.ctx
    h.vm.effective = ctx.id
    body = BufferType.HTTP_REQUEST_BODY
    OUT_PTR, OUT_SIZE = 3000, 3004
    assert h.call("proxy_get_buffer_bytes", body, 0, 10, OUT_PTR, OUT_SIZE) == Status.NOT_FOUND
    stream.request_body(b"0123456789", True)
    h.vm.effective = ctx.id
    assert h.call("proxy_get_buffer_status", body, 3008, 3012) == Status.OK
    assert h.u32(3008) == 10
    assert h.call("proxy_get_buffer_bytes", body, 3, 4, OUT_PTR, OUT_SIZE) == Status.OK
    assert h.returned(OUT_PTR, OUT_SIZE) == b"3456"
    ptr, n = h.put(3100, b"AB")
    assert h.call("proxy_set_buffer_bytes", body, 0, 0, ptr, n) == Status.OK  # prepend
    assert ctx.request_body == b"AB0123456789" and ctx.dirty & REQUEST_BODY_DIRTY
    assert h.call("proxy_set_buffer_bytes", body, 0, 12, ptr, n) == Status.OK  # replace all
    assert ctx.request_body == b"AB"
    assert h.call("proxy_set_buffer_bytes", body, 0xFFFFFFFF, 0, ptr, n) == Status.OK  # append
    assert ctx.request_body == b"ABAB"
    assert h.call("proxy_set_buffer_bytes", body, 1, 2, ptr, 0) == Status.OK  # cut
    assert ctx.request_body == b"AB"
    # The response body is not there before its callback.
    assert h.call("proxy_get_buffer_status", 1, 3008, 3012) == Status.NOT_FOUND
    stream.response_headers(RESPONSE, False)
    stream.response_body(b"", True)
    h.vm.effective = ctx.id
    assert h.call("proxy_get_buffer_bytes", 1, 0, 10, OUT_PTR, OUT_SIZE) == Status.OK
    assert (h.u32(OUT_PTR), h.u32(OUT_SIZE)) == (0, 0)  # an empty buffer: OK, nothing
    assert h.call("proxy_set_buffer_bytes", 1, 0, 0, ptr, n) == Status.OK
    assert ctx.response_body == b"AB" and ctx.dirty & RESPONSE_BODY_DIRTY


def test_response_header_changes_are_kept_on_the_context(rec) -> None:
    h = rec
    stream = h.instance.stream()
    stream.request_headers(HEADERS)
    stream.response_headers(RESPONSE, True)
    h.vm.effective = stream.ctx.id
    k, kn = h.put(3200, b":status")
    v, vn = h.put(3220, b"201")
    assert h.call("proxy_replace_header_map_value", MapType.HTTP_RESPONSE_HEADERS, k, kn, v,
                  vn) == Status.OK
    assert (b":status", b"201") in stream.ctx.response_headers
    assert stream.ctx.dirty & (1 << MapType.HTTP_RESPONSE_HEADERS)


def test_close_stream_in_the_response_phase_resets(rec) -> None:
    h = rec
    act(h, "response_headers", PAUSE)
    stream = h.instance.stream()
    stream.request_headers(HEADERS)
    assert stream.response_headers(RESPONSE, True) is None
    h.vm.effective = stream.ctx.id
    assert h.call("proxy_close_stream", 1) == Status.OK
    decided = []
    stream.on_decision = decided.append
    h.host._settle(h.vm)
    assert decided and decided[0].action == "reset"


def test_a_trap_in_the_response_phase_fails_by_policy(harness) -> None:
    body = RECORDER.replace(
        "(call $rec (i32.const 4) (local.get 0) (local.get 1) (local.get 2)))",
        "(unreachable))")
    h = harness(module(body))
    stream = h.instance.stream()
    assert stream.request_headers(HEADERS).action == "continue"
    d = stream.response_headers(RESPONSE, True)
    assert d.action == "respond" and d.response.status == 503 and d.error
    stream.close()  # the generation is gone: nothing left to run, nothing raised


CALL_FROM_RESPONSE = trampolines(
    "proxy_http_call", "proxy_set_effective_context", "proxy_continue_stream",
    "proxy_add_header_map_value",
) + """
  (data (i32.const 1000) "auth")
  (data (i32.const 1100) "\\03\\00\\00\\00\\07\\00\\00\\00\\03\\00\\00\\00\\05\\00\\00\\00\\01\\00\\00\\00\\0a\\00\\00\\00\\01\\00\\00\\00:method\\00GET\\00:path\\00/\\00:authority\\00a\\00")
  (data (i32.const 1200) "x-called")
  (data (i32.const 1210) "yes")
  (global $ctx (mut i32) (i32.const 0))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_response_headers") (param $c i32) (param i32 i32) (result i32)
    (global.set $ctx (local.get $c))
    (drop (call $proxy_http_call (i32.const 1000) (i32.const 4) (i32.const 1100) (i32.const 61)
      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 1000) (i32.const 1300)))
    (i32.const 1))
  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
    (drop (call $proxy_set_effective_context (global.get $ctx)))
    (drop (call $proxy_add_header_map_value (i32.const 2) (i32.const 1200) (i32.const 8) (i32.const 1210) (i32.const 3)))
    (drop (call $proxy_continue_stream (i32.const 1))))
"""


def test_outbound_call_from_the_response_phase_pauses_and_resumes(harness) -> None:
    h = harness(module(CALL_FROM_RESPONSE))
    stream = h.instance.stream()
    assert stream.request_headers(HEADERS).action == "continue"
    decided = []
    stream.on_decision = decided.append
    assert stream.response_headers(RESPONSE, True) is None  # paused on its call
    assert len(h.calls) == 1 and h.calls[0].path == "/"
    h.clock.set_ns(h.host.next_event_ns())
    h.host.poll()  # the call's answer arrives; the filter resumes the response
    assert decided and decided[-1].action == "continue"
    assert (b"x-called", b"yes") in stream.ctx.response_headers
    stream.close()


def test_a_paused_phase_times_out_from_its_own_start(rec) -> None:
    h = rec
    act(h, "response_headers", PAUSE)
    stream = h.instance.stream()
    stream.request_headers(HEADERS)
    h.clock.advance(31)  # a slow upstream: longer than stream_timeout_s since the request
    decided = []
    stream.on_decision = decided.append
    assert stream.response_headers(RESPONSE, True) is None
    h.clock.advance(2)
    h.host.poll()
    assert not decided  # the pause began 2 s ago, not 33
    h.clock.advance(30)
    h.host.poll()
    assert decided and decided[0].error and "never resumed" in decided[0].error


CALL_IN_HEADERS = CALL_FROM_RESPONSE.replace(
    '(func (export "proxy_on_response_headers")', '(func (export "proxy_on_request_headers")'
).replace(
    """  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32)
    (drop (call $proxy_set_effective_context (global.get $ctx)))
    (drop (call $proxy_add_header_map_value (i32.const 2) (i32.const 1200) (i32.const 8) (i32.const 1210) (i32.const 3)))
    (drop (call $proxy_continue_stream (i32.const 1))))""",
    """  (func (export "proxy_on_http_call_response") (param i32 i32 i32 i32 i32))
  (func (export "proxy_on_request_body") (param i32 i32 i32) (result i32) (i32.const 0))""")


async def test_a_continued_body_holds_while_the_headers_call_is_in_flight(harness) -> None:
    import asyncio

    from addons.lifecycle import run_phases

    h = harness(module(CALL_IN_HEADERS))
    stream = h.instance.stream()
    task = asyncio.ensure_future(run_phases(stream, [
        lambda: stream.request_headers(HEADERS, False),  # pauses on its auth-like call
        lambda: stream.request_body(b"hello", True),  # continues, as an SDK's default does
    ]))
    await asyncio.sleep(0)
    assert not task.done() and len(h.calls) == 1  # held: the call is not answered yet
    h.clock.set_ns(h.host.next_event_ns())
    h.host.poll()  # the answer arrives; nothing else holds the stream
    decision = await asyncio.wait_for(task, 5)
    assert decision.action == "continue"
    stream.close()
