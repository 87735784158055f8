"""Host lifecycle with small WAT filters: loading, generations, outbound calls, and faults.

Each fault (garbage .wasm, traps, loops, memory bombs, crash loops, unknown imports) must give
a clear error, decide the request by the fail policy, and leave the host working.
"""

from __future__ import annotations

import pytest
import wasmtime

from addons.proxywasm import (
    AuthCallRecord,
    FilterLoadError,
    FilterModule,
    FilterStartError,
    Host,
    HostEvents,
    HttpCallResponse,
    InProcessDispatcher,
    Limits,
    RestartError,
    Status,
    VirtualClock,
    serialize_map,
)

from .wat import module, trampolines

CALL_HEADERS = serialize_map([(b":method", b"GET"), (b":path", b"/verify"), (b":authority", b"auth")])


def _data(offset: int, data: bytes) -> str:
    escaped = "".join(f"\\{b:02x}" for b in data)
    return f'(data (i32.const {offset}) "{escaped}")'


# A minimal auth-like filter: every request makes an outbound call and waits for it;
# a 200 resumes the stream, anything else (or a failed call) answers 503 locally.
# Requests whose first header value starts with "trap"/"loop"/"bomb" misbehave on purpose.
CALLING_FILTER = trampolines(
    "proxy_http_call", "proxy_set_effective_context", "proxy_continue_stream",
    "proxy_send_local_response", "proxy_get_header_map_value", "proxy_get_header_map_size",
) + f"""
  {_data(256, b"auth")}
  {_data(512, CALL_HEADERS)}
  {_data(300, b"x-mode")}
  (global $ctx (mut i32) (i32.const 0))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param $c i32) (param i32 i32) (result i32)
    (local $mode i32)
    (if (i32.eqz (call $proxy_get_header_map_value (i32.const 0) (i32.const 300) (i32.const 6)
                                                   (i32.const 200) (i32.const 204)))
      (then (local.set $mode (i32.load8_u (i32.load (i32.const 200))))))
    (if (i32.eq (local.get $mode) (i32.const 116)) (then unreachable))             ;; 't'rap
    (if (i32.eq (local.get $mode) (i32.const 108)) (then (loop $l (br $l))))      ;; 'l'oop
    (if (i32.eq (local.get $mode) (i32.const 98))                                 ;; 'b'omb
      (then (loop $g (br_if $g (i32.ne (memory.grow (i32.const 16)) (i32.const -1)))) unreachable))
    (if (i32.eq (local.get $mode) (i32.const 104)) (then (return (i32.const 0)))) ;; 'h'it
    (global.set $ctx (local.get $c))
    (drop (call $proxy_http_call (i32.const 256) (i32.const 4) (i32.const 512) (i32.const {len(CALL_HEADERS)})
                                 (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
                                 (i32.const 1000) (i32.const 100)))
    ;; remember which stream made call id N at 1024 + 4N
    (i32.store (i32.add (i32.const 1024) (i32.shl (i32.load (i32.const 100)) (i32.const 2)))
               (local.get $c))
    (i32.const 1))
  (func (export "proxy_on_http_call_response") (param i32) (param $id i32) (param $n i32) (param i32 i32)
    (drop (call $proxy_set_effective_context
      (i32.load (i32.add (i32.const 1024) (i32.shl (local.get $id) (i32.const 2))))))
    (if (i32.eqz (local.get $n))
      (then (drop (call $proxy_send_local_response (i32.const 503) (i32.const 0) (i32.const 0)
                    (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0))))
      (else (drop (call $proxy_continue_stream (i32.const 0))))))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
"""


def make_host(wat: str = CALLING_FILTER, *, latency: float = 0.0, answer: int | None = 200,
              **kw: object) -> tuple[Host, VirtualClock]:
    clock = VirtualClock()
    handler = (lambda call: HttpCallResponse(answer)) if answer is not None else (lambda c: None)
    disp = InProcessDispatcher(handler, clock.now_ns, latency_s=latency, clusters=("auth",))
    kw.setdefault("limits", Limits(deadline_ms=10_000))  # the loop test sets its own 100 ms
    return Host(FilterModule(wasmtime.wat2wasm(module(wat))), disp, clock=clock, **kw), clock  # type: ignore[arg-type]


def run_until_idle(host: Host, clock: VirtualClock, limit_s: float = 60) -> None:
    end = clock.now_ns() + int(limit_s * 1e9)
    host.poll()
    while (t := host.next_event_ns()) is not None and t <= end and any(
        vm.calls for inst in host.instances.values() for vm in inst.vms()
    ):
        clock.set_ns(max(t, clock.now_ns()))
        host.poll()


# ---- loading --------------------------------------------------------------------------------


def test_garbage_wasm_is_a_clear_load_error() -> None:
    with pytest.raises(FilterLoadError, match="not a valid WebAssembly module"):
        FilterModule(b"\x00asm garbage", name="junk.wasm")


def test_missing_file_names_the_file(tmp_path) -> None:
    with pytest.raises(FilterLoadError, match=r"cannot read filter .*nope\.wasm"):
        FilterModule.from_file(tmp_path / "nope.wasm")


def test_plain_wasm_is_not_a_proxy_wasm_filter() -> None:
    wasm = wasmtime.wat2wasm('(module (memory (export "memory") 1))')
    with pytest.raises(FilterLoadError, match=r"exports neither proxy_abi_version_0_2_1"):
        FilterModule(wasm)


def test_unknown_abi_is_named_in_the_error() -> None:
    wasm = wasmtime.wat2wasm(module("", abi="0_3_0"))
    with pytest.raises(FilterLoadError, match=r"it has proxy_abi_version_0_3_0"):
        FilterModule(wasm)


# ABI v0.1.0 (Envoy still runs it): header callbacks without end_of_stream, a missing header
# is Ok and empty, the configuration comes from proxy_get_configuration. The filter answers
# every request locally with 200 + 10 × (the status of reading a missing header) + (the size
# of the configuration it read while configuring), and a response header count as x-n.
ABI_0_1_0_FILTER = trampolines(
    "proxy_get_configuration", "proxy_get_header_map_value", "proxy_send_local_response",
) + f"""
  {_data(300, b"x-none")}
  (global $cfg (mut i32) (i32.const 0))
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $proxy_get_configuration (i32.const 100) (i32.const 104)))
    (global.set $cfg (i32.load (i32.const 104)))
    (i32.const 1))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32) (result i32)
    (local $st i32)
    (local.set $st (call $proxy_get_header_map_value (i32.const 0) (i32.const 300) (i32.const 6)
                                                     (i32.const 200) (i32.const 204)))
    (drop (call $proxy_send_local_response
      (i32.add (i32.add (i32.const 200) (i32.mul (local.get $st) (i32.const 10)))
               (global.get $cfg))
      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
      (i32.const 0)))
    (i32.const 1))
  (func (export "proxy_on_response_headers") (param i32 i32) (result i32) (i32.const 0))
"""


def test_abi_0_1_0_filter_runs_as_in_envoy() -> None:
    m = FilterModule(wasmtime.wat2wasm(module(ABI_0_1_0_FILTER, abi="0_1_0")))
    assert m.abi_version == "0.1.0"
    clock = VirtualClock()
    host = Host(m, InProcessDispatcher(lambda call: None, clock.now_ns), clock=clock,
                plugin_configuration=b"abc")
    d = host.instance("shop").stream().request_headers([(b":path", b"/")])
    assert d is not None and d.response is not None
    assert d.response.status == 203  # the missing header was Ok (0), the configuration 3 bytes


def test_abi_0_2_1_missing_header_is_not_found() -> None:
    wat = ABI_0_1_0_FILTER.replace(
        '(func (export "proxy_on_request_headers") (param i32 i32) (result i32)',
        '(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)').replace(
        '(func (export "proxy_on_response_headers") (param i32 i32) (result i32)',
        '(func (export "proxy_on_response_headers") (param i32 i32 i32) (result i32)')
    clock = VirtualClock()
    host = Host(FilterModule(wasmtime.wat2wasm(module(wat))),
                InProcessDispatcher(lambda call: None, clock.now_ns), clock=clock,
                plugin_configuration=b"abc")
    d = host.instance("shop").stream().request_headers([(b":path", b"/")])
    assert d is not None and d.response is not None
    assert d.response.status == 213  # NotFound (1); the configuration still reads (3 bytes)


@pytest.mark.parametrize(("abi", "export", "sig"), [
    ("0_2_1", "proxy_on_request_headers", "(param i32 i32) (result i32)"),
    ("0_1_0", "proxy_on_request_headers", "(param i32 i32 i32) (result i32)"),
    ("0_2_1", "proxy_on_done", "(param i32)"),
    ("0_2_1", "proxy_on_memory_allocate", "(param i64) (result i32)"),
])
def test_callback_of_the_wrong_type_is_refused_at_load(abi: str, export: str, sig: str) -> None:
    """The host calls exports without checking types on each call: a mistyped one would read
    parameters that were never passed, so it must not load."""
    body = f'(func (export "{export}") {sig} {"(i32.const 0)" if "result" in sig else ""})'
    wat = module(body, abi=abi, allocator=export != "proxy_on_memory_allocate")
    if export == "proxy_on_memory_allocate":
        wat = wat.replace("(memory (export", '(func (export "malloc") (param i32) (result i32) '
                          "(i32.const 0))\n  (memory (export", 1)
    with pytest.raises(FilterLoadError, match=rf"exports {export} with type .* but ABI "):
        FilterModule(wasmtime.wat2wasm(wat))


def test_emscripten_imports_are_defined_as_in_cpp_host() -> None:
    """A C++ SDK filter built with emscripten tells the host after growing its memory, and
    may compare thread ids: neither may trap."""
    body = trampolines("proxy_send_local_response") + """
  (import "env" "emscripten_notify_memory_growth" (func $grown (param i32)))
  (import "env" "pthread_equal" (func $eq (param i32 i32) (result i32)))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (drop (memory.grow (i32.const 1)))
    (call $grown (i32.const 0))
    (drop (call $proxy_send_local_response
      (i32.add (i32.const 200) (i32.add (i32.mul (call $eq (i32.const 3) (i32.const 3))
                                                 (i32.const 10))
                                        (call $eq (i32.const 3) (i32.const 4))))
      (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0) (i32.const 0)
      (i32.const 0)))
    (i32.const 1))
"""
    m = FilterModule(wasmtime.wat2wasm(module(body)))
    assert not m.unimplemented
    clock = VirtualClock()
    host = Host(m, InProcessDispatcher(lambda call: None, clock.now_ns), clock=clock)
    inst = host.instance("shop")
    d = inst.stream().request_headers([(b":path", b"/")])
    assert d is not None and d.response is not None and d.response.status == 210
    assert inst.vm is not None and inst.vm.allocated_pages() == 3


def test_callback_that_is_not_a_function_is_refused_at_load() -> None:
    wat = module('(global (export "proxy_on_context_create") i32 (i32.const 0))')
    with pytest.raises(FilterLoadError, match=r"exports proxy_on_context_create, which is not a "
                                              r"function; ABI 0.2.1 defines it as"):
        FilterModule(wasmtime.wat2wasm(wat))


def test_a_trapping_start_function_is_one_line() -> None:
    wat = module("(func $boom unreachable) (start $boom)")
    clock = VirtualClock()
    host = Host(FilterModule(wasmtime.wat2wasm(wat)),
                InProcessDispatcher(lambda call: None, clock.now_ns), clock=clock)
    with pytest.raises(FilterStartError) as got:
        host.instance("shop")
    assert "\n" not in str(got.value)
    assert str(got.value).startswith("instantiation trapped: wasm trap: wasm `unreachable`")


def test_main_is_called_with_its_own_parameters() -> None:
    body = """
  (global $ran (mut i32) (i32.const 0))
  (func (export "_initialize"))
  (func (export "main") (result i32) (global.set $ran (i32.const 1)) (i32.const 0))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eqz (global.get $ran)) (then unreachable)) (i32.const 0))
"""
    m = FilterModule(wasmtime.wat2wasm(module(body)))
    assert m.main_params == 0
    clock = VirtualClock()
    host = Host(m, InProcessDispatcher(lambda call: None, clock.now_ns), clock=clock)
    d = host.instance("shop").stream().request_headers([(b":path", b"/")])
    assert d is not None and d.action == "continue"


def test_abi_0_2_0_is_supported() -> None:
    m = FilterModule(wasmtime.wat2wasm(module("", abi="0_2_0")))
    assert m.abi_version == "0.2.0"


def test_wrong_import_signature_is_named() -> None:
    wat = module('(import "env" "proxy_log" (func (param i32) (result i32)))')
    with pytest.raises(FilterLoadError, match=r"import env.proxy_log has type \(i32\) -> \(i32\)"):
        FilterModule(wasmtime.wat2wasm(wat))


def test_unknown_imports_return_unimplemented_or_trap_with_their_name() -> None:
    wat = module("""
  (import "env" "proxy_future_call" (func $f (param i32) (result i32)))
  (import "other" "thing" (func $g))
  (func (export "call_f") (result i32) (call $f (i32.const 0)))
  (func (export "call_g") (call $g))""")
    m = FilterModule(wasmtime.wat2wasm(wat))
    assert m.unimplemented == ["env.proxy_future_call", "other.thing"]
    host = Host(m, InProcessDispatcher(lambda c: None, VirtualClock().now_ns))
    vm = host.instance("x").vm
    assert vm is not None
    assert vm.call(vm.raw.func("call_f")) == Status.UNIMPLEMENTED
    from addons.proxywasm._wasmtime import GuestTrap

    with pytest.raises(GuestTrap, match=r"unimplemented import other\.thing"):
        vm.call(vm.raw.func("call_g"))


def test_filter_rejecting_its_configuration_fails_to_start() -> None:
    wat = '(func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 0))'
    host, _ = make_host(wat)
    with pytest.raises(FilterStartError, match="rejected its plugin configuration"):
        host.instance("x")
    assert "x" not in host.instances


# ---- streams and outbound calls -------------------------------------------------------------


def test_paused_stream_resumes_when_the_call_answers() -> None:
    host, clock = make_host(latency=0.2)
    inst = host.instance("shop")
    s = inst.stream()
    assert s.request_headers([(b":path", b"/")]) is None  # paused on the outbound call
    decided = []
    s.on_decision = decided.append
    clock.advance(0.1)
    host.poll()
    assert not decided
    clock.advance(0.1)
    host.poll()
    assert decided and decided[0].action == "continue" and decided[0].outbound == 1
    s.close()
    obs = inst.observe()
    assert (obs.requests, obs.outbound) == (1, 1)


def test_decision_without_a_call_is_immediate() -> None:
    host, _ = make_host()
    d = host.instance("shop").stream().request_headers([(b"x-mode", b"hit")])
    assert d is not None and d.action == "continue" and d.outbound == 0


def test_call_timeout_delivers_a_failure_and_a_late_answer_is_ignored() -> None:
    host, clock = make_host(latency=5.0)  # answers after 5 s; the filter's timeout is 1 s
    s = host.instance("shop").stream()
    assert s.request_headers([]) is None
    clock.advance(1.0)
    host.poll()
    assert s.decision is not None and s.decision.action == "respond"
    assert s.decision.response is not None and s.decision.response.status == 503
    clock.advance(5.0)
    host.poll()  # the late answer arrives: ignored, no crash, decision unchanged
    assert s.decision.response.status == 503


def test_a_call_of_a_closed_stream_is_recorded_but_never_delivered() -> None:
    """The client left while its request waited for the auth call: the stream ends at once
    (as Envoy resets it); the call's answer still counts as an outbound call (the manager's
    O(t)), and the filter is not called back for a context that is gone."""
    calls = []

    class Events(HostEvents):
        def on_auth_call(self, record: AuthCallRecord) -> None:
            calls.append(record)

    host, clock = make_host(latency=0.5, events=Events())
    inst = host.instance("shop")
    s = inst.stream()
    assert s.request_headers([]) is None  # paused on the outbound call
    s.fail_pending("client disconnected")
    s.close()
    vm = inst.vm
    assert vm.contexts == {} and len(vm.calls) == 1 and not vm.idle
    clock.advance(0.5)
    host.poll()
    assert [(c.outcome, c.status) for c in calls] == [("ok", 200)]
    assert vm.calls == {} and vm.idle and not vm.closed
    assert inst.observe().outbound == 1


def test_a_zero_timeout_is_no_timeout_of_the_filters_own() -> None:
    """As in Envoy: timeout 0 does not end the call at once; the answer after 5 s resumes the
    stream, and only a call unanswered for the stream timeout fails."""
    zero = CALLING_FILTER.replace("(i32.const 1000) (i32.const 100)", "(i32.const 0) (i32.const 100)")
    assert zero != CALLING_FILTER
    host, clock = make_host(zero, latency=5.0)
    s = host.instance("shop").stream()
    assert s.request_headers([]) is None
    clock.advance(1.0)
    host.poll()
    assert s.decision is None  # still waiting
    clock.advance(4.0)
    host.poll()
    assert s.decision is not None and s.decision.action == "continue"
    host, clock = make_host(zero, answer=None, limits=Limits(stream_timeout_s=10))
    s = host.instance("shop").stream()
    assert s.request_headers([]) is None
    clock.advance(9.0)
    host.poll()
    assert s.decision is None
    clock.advance(1.0)
    host.poll()
    assert s.decision is not None and s.decision.response is not None
    assert s.decision.response.status == 503


def test_missing_answer_times_out() -> None:
    host, clock = make_host(answer=None)
    s = host.instance("shop").stream()
    assert s.request_headers([]) is None
    run_until_idle(host, clock)
    assert s.decision is not None and s.decision.response is not None
    assert s.decision.response.status == 503


def test_concurrent_streams_each_get_their_own_answer() -> None:
    host, clock = make_host(latency=0.05)
    inst = host.instance("shop")
    streams = [inst.stream() for _ in range(20)]
    for s in streams:
        assert s.request_headers([]) is None
    run_until_idle(host, clock)
    assert all(s.decision is not None and s.decision.action == "continue" for s in streams)
    assert inst.observe().outbound == 20


# ---- restarts -------------------------------------------------------------------------------


def test_restart_gives_a_new_generation_and_in_flight_streams_finish_on_the_old_one() -> None:
    host, clock = make_host(latency=0.5)
    inst = host.instance("shop")
    old = inst.stream()
    assert old.request_headers([]) is None
    old_vm = inst.vm
    record = inst.restart("test", "pytest")
    assert (record.generation_before, record.generation) == (0, 1)
    assert inst.draining == [old_vm]  # still has a stream in flight
    new = inst.stream()
    assert new.generation == 1
    run_until_idle(host, clock)
    assert old.decision is not None and old.decision.action == "continue"
    assert old.decision.generation == 0
    old.close()
    assert inst.draining == [] and old_vm is not None and old_vm.closed  # dropped once idle
    new.close()


def test_restart_frees_memory() -> None:
    host, _ = make_host()
    inst = host.instance("shop")
    vm = inst.vm
    assert vm is not None
    vm.raw.store.set_epoch_deadline(1000)
    grow = 200  # pages
    from addons.proxywasm._wasmtime import engine

    assert engine() is not None
    mem = vm.raw.export("memory")
    assert mem is not None
    before = inst.observe().allocated_pages
    wasmtime_mem = wasmtime.Memory._from_raw(mem.of.memory)
    wasmtime_mem.grow(vm.raw.store, grow)
    assert inst.observe().allocated_pages == before + grow
    record = inst.restart("reclaim", "pytest")
    assert record.allocated_bytes_before == (before + grow) * 65536
    assert record.allocated_bytes_after == before * 65536
    assert vm.closed


def test_failed_restart_keeps_the_old_generation(monkeypatch) -> None:
    host, _ = make_host()
    inst = host.instance("shop")
    host.plugin_configuration = b"x"
    monkeypatch.setattr(host, "module", FilterModule(wasmtime.wat2wasm(module(
        '(func (export "proxy_on_configure") (param i32 i32) (result i32) (i32.const 0))'))))
    with pytest.raises(RestartError, match="generation 0 keeps serving"):
        inst.restart("test", "pytest")
    assert inst.vm is not None and inst.generation == 0
    assert inst.stream().request_headers([(b"x-mode", b"hit")]) is not None


# ---- faults ---------------------------------------------------------------------------------


@pytest.mark.parametrize("fail_open", [False, True])
def test_trap_fails_the_request_by_policy_and_restarts(fail_open: bool, caplog) -> None:
    host, _ = make_host(fail_open=fail_open)
    inst = host.instance("shop")
    d = inst.stream().request_headers([(b"x-mode", b"trap")])
    assert d is not None and d.error is not None and "unreachable" in d.error
    if fail_open:
        assert d.action == "continue"
    else:
        assert d.action == "respond" and d.response is not None and d.response.status == 503
    assert "trapped" in caplog.text
    assert inst.generation == 1  # restarted at once after a first crash
    assert inst.stream().request_headers([(b"x-mode", b"hit")]).action == "continue"  # type: ignore[union-attr]


def test_trap_fails_every_stream_waiting_on_that_generation() -> None:
    host, _ = make_host(latency=1.0)
    inst = host.instance("shop")
    waiting = inst.stream()
    assert waiting.request_headers([]) is None
    inst.stream().request_headers([(b"x-mode", b"trap")])
    assert waiting.decision is not None and waiting.decision.response is not None
    assert waiting.decision.response.status == 503 and "trapped" in (waiting.decision.error or "")


def test_looping_filter_is_interrupted_by_its_deadline() -> None:
    host, _ = make_host(limits=Limits(deadline_ms=100))
    inst = host.instance("shop")
    d = inst.stream().request_headers([(b"x-mode", b"loop")])  # returns: the deadline fired
    assert d is not None and d.response is not None and d.response.status == 503
    assert d.error is not None and "interrupted" in d.error
    assert inst.stream().request_headers([(b"x-mode", b"hit")]) is not None


def test_memory_bomb_hits_the_cap_and_the_host_survives() -> None:
    host, _ = make_host(limits=Limits(memory_bytes=4 * 2**20))
    inst = host.instance("shop")
    d = inst.stream().request_headers([(b"x-mode", b"bomb")])
    assert d is not None and d.response is not None and d.response.status == 503
    assert inst.observe().allocated_pages <= 64
    assert inst.stream().request_headers([(b"x-mode", b"hit")]).action == "continue"  # type: ignore[union-attr]


def test_crash_loop_backs_off_and_recovers() -> None:
    host, clock = make_host()
    inst = host.instance("shop")
    for _ in range(3):
        inst.stream().request_headers([(b"x-mode", b"trap")])
    # Third crash within the window: the instance waits before starting again.
    assert inst.vm is None and inst.retry_at_ns > clock.now_ns()
    d = inst.stream().request_headers([(b"x-mode", b"hit")])
    assert d is not None and d.response is not None and d.response.status == 503
    assert d.error is not None and "is down" in d.error
    clock.set_ns(inst.retry_at_ns)
    host.poll()
    assert inst.vm is not None
    assert inst.stream().request_headers([(b"x-mode", b"hit")]).action == "continue"  # type: ignore[union-attr]


def test_stalled_stream_fails_after_the_stream_timeout() -> None:
    wat = '''(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32) (i32.const 1))'''
    host, clock = make_host(wat, limits=Limits(stream_timeout_s=5))
    s = host.instance("shop").stream()
    assert s.request_headers([]) is None
    clock.advance(6)
    host.poll()
    assert s.decision is not None and "never resumed" in (s.decision.error or "")
