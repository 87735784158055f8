"""A deadline trip means the guest itself ran too long.

A burst of epoch ticks (a starved ticker catching up), host time inside a call (a slow host
function, lowering headers, waiting for the GIL) and a busy machine must never interrupt a
healthy call; a looping filter is interrupted every time, also when it loops on host calls.
The only assertions are "was it interrupted"; how fast is measured by `tests.bench.deadline`.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import wasmtime

from addons.proxywasm import (
    FilterModule,
    FilterStartError,
    Host,
    HostEvents,
    HttpCallResponse,
    InProcessDispatcher,
    Limits,
    VirtualClock,
)
from addons.proxywasm._wasmtime import TICKER_LIBRARY, engine
from tests.bench import deadline as bench
from tests.hooks import run_hook

from .wat import module, trampolines

# proxy_on_request_headers: log "x" through the host, then do a little guest work and continue.
# With x-mode "loop" it logs forever (a filter looping on host calls).
LOGGING_FILTER = trampolines("proxy_log", "proxy_get_header_map_value") + """
  (data (i32.const 300) "x-mode")
  (data (i32.const 320) "x")
  (func $work (param $n i32) (result i32)
    (local $i i32)
    (loop $l (local.set $i (i32.add (local.get $i) (i32.const 1)))
      (br_if $l (i32.lt_u (local.get $i) (local.get $n))))
    (local.get $i))
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (if (i32.eqz (call $proxy_get_header_map_value (i32.const 0) (i32.const 300) (i32.const 6)
                                                   (i32.const 200) (i32.const 204)))
      (then (loop $forever
        (drop (call $proxy_log (i32.const 2) (i32.const 320) (i32.const 1)))
        (drop (call $work (i32.const 1000)))
        (br $forever))))
    (drop (call $proxy_log (i32.const 2) (i32.const 320) (i32.const 1)))
    (drop (call $work (i32.const 1000)))
    (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
"""


def make_host(deadline_ms: float = 100) -> Host:
    clock = VirtualClock()
    disp = InProcessDispatcher(lambda call: HttpCallResponse(200), clock.now_ns)
    wasm = wasmtime.wat2wasm(module(LOGGING_FILTER))
    return Host(FilterModule(wasm), disp, clock=clock, limits=Limits(deadline_ms=deadline_ms))


class _OnGuestLog(logging.Handler):
    """Runs `action` inside the host call whenever the guest logs."""

    def __init__(self, action) -> None:
        super().__init__(logging.DEBUG)
        self.action = action

    def emit(self, record: logging.LogRecord) -> None:
        self.action()


@pytest.fixture
def on_guest_log() -> Iterator[list[_OnGuestLog]]:
    installed: list[_OnGuestLog] = []
    guest = logging.getLogger("wasm_reclaim.guest")
    level = guest.level
    guest.setLevel(logging.INFO)
    yield installed
    for handler in installed:
        guest.removeHandler(handler)
    guest.setLevel(level)


def _install(installed: list[_OnGuestLog], action) -> None:
    handler = _OnGuestLog(action)
    logging.getLogger("wasm_reclaim.guest").addHandler(handler)
    installed.append(handler)


def test_a_burst_of_ticks_does_not_interrupt_a_healthy_call(on_guest_log) -> None:
    eng = engine()
    # The ticker was starved and catches up while the host runs: 50 epochs (500 ms) at once.
    _install(on_guest_log, lambda: [eng.increment_epoch() for _ in range(50)])
    host = make_host()
    inst = host.instance("shop")
    for _ in range(20):
        decision = inst.stream().request_headers([(b":path", b"/")])
        assert decision is not None and decision.error is None, decision
    assert inst.generation == 0


def test_host_time_inside_a_call_is_not_guest_time(on_guest_log) -> None:
    def slow_host_call() -> None:  # 300 ms of host CPU: three deadlines' worth
        end = time.thread_time() + 0.3
        while time.thread_time() < end:
            pass

    _install(on_guest_log, slow_host_call)
    host = make_host()
    inst = host.instance("shop")
    decision = inst.stream().request_headers([(b":path", b"/")])
    assert decision is not None and decision.error is None, decision


def test_a_filter_looping_on_host_calls_is_interrupted() -> None:
    host = make_host()
    inst = host.instance("shop")
    decision = inst.stream().request_headers([(b":path", b"/"), (b"x-mode", b"loop")])
    assert decision is not None and decision.error is not None
    assert "interrupted" in decision.error


def test_no_false_trip_and_every_true_trip_under_contention() -> None:
    """3 busy processes on the machine's cores and a GIL-holding thread; the short form of
    `python -m tests.bench.deadline` (1 M requests there)."""
    result = bench.run(requests=20_000, loops=3, busy=3)
    assert result["healthy"]["false_trips"] == 0, result["healthy"]["errors"]
    assert result["looping"]["trapped"] == result["looping"]["calls"]


# ---- back-off per module, across instances -----------------------------------------------


class _Crashes(HostEvents):
    def __init__(self) -> None:
        self.count = 0

    def on_crash(self, instance: str, generation: int, error: str) -> None:
        self.count += 1


def test_a_filter_looping_across_many_instances_backs_off_as_a_module() -> None:
    """A new Host per request, each looping: the deadline is paid a few times, not each time,
    and the tenant whose instance is healthy is served throughout."""
    clock = VirtualClock()
    disp = InProcessDispatcher(lambda call: HttpCallResponse(200), clock.now_ns)
    events = _Crashes()
    host = Host(FilterModule(wasmtime.wat2wasm(module(LOGGING_FILTER))), disp, clock=clock,
                limits=Limits(deadline_ms=20), events=events)
    good = host.instance("good.example")
    served = 0
    for i in range(30):
        try:
            inst = host.instance(f"h{i}.example")
        except FilterStartError:
            inst = None  # the module backs off: the request fails by policy, fast
        if inst is not None:
            decision = inst.stream().request_headers([(b":path", b"/"), (b"x-mode", b"loop")])
            assert decision is not None and decision.error is not None
        g = good.stream().request_headers([(b":path", b"/")])
        served += g is not None and g.error is None
        clock.advance(0.01)
    assert events.count <= Limits().module_crash_threshold + 1  # before: 30, one per Host
    assert served == 30


async def test_requests_failed_while_the_module_backs_off_are_recorded(tmp_path) -> None:
    from mitmproxy.test import taddons, tflow

    from addons.wasm_auth import WasmAuth

    wasm = tmp_path / "loop.wasm"
    wasm.write_bytes(wasmtime.wat2wasm(module(LOGGING_FILTER)))
    addon = WasmAuth()
    docs: list[dict[str, object]] = []
    with taddons.context(addon) as tctx:
        tctx.configure(addon, wasm_filter=str(wasm), wasm_deadline_ms=20, wasm_admin_listen="",
                       wasm_log_metrics=False, wasm_spool=str(tmp_path / "spool"),
                       wasm_store=str(tmp_path / "store"))
        addon.metrics = type("Sink", (), {"write": lambda self, c, d: docs.append(d)})()
        addon._bind_hooks()  # as when the metrics log starts: records need `response`
        flows = []
        for i in range(8):
            f = tflow.tflow()
            f.request.headers["Host"] = f"h{i}.example"
            f.request.headers["x-mode"] = "loop"
            await run_hook(addon.request(f))
            addon.response(f)
            flows.append(f)
        assert all(f.response is not None and f.response.status_code == 503 for f in flows)
        assert any("backing off" in f.comment for f in flows)
        addon.metrics = None
        await addon.done()
    recorded = [d for d in docs if "decision" in d]
    assert len(recorded) == 8 and {d["decision"] for d in recorded} == {"error"}


# Run in a fresh process (the ticker starts with the engine): which ticker runs, whether guest
# calls keep the GIL, and that a looping filter is interrupted, also in a forked child.
TICKER_CHECK = """
import os, threading, wasmtime
from addons.proxywasm import FilterModule, Limits, _wasmtime
from tests.bench.host import HEADERS, make_host
from tests.wat import module
LOOP = module('(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)'
              ' (loop $l (br $l)) (i32.const 0))')
compiled = FilterModule(bytes(wasmtime.wat2wasm(LOOP)))  # compiled before forking
def interrupted():
    host, _ = make_host(compiled, limits=Limits(deadline_ms=100))
    decision = host.instance("loop").stream().request_headers(HEADERS)
    host.close()
    return decision is not None and "interrupted" in (decision.error or "")
def state():
    return f"{_wasmtime.keeps_gil} {any(t.name == 'wasm-epoch' for t in threading.enumerate())}"
print(state(), interrupted(), flush=True)
pid = os.fork()
if pid == 0:
    print(state(), interrupted(), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


def _fresh(code: str, **env: str) -> str:
    """What `code` prints, run in a fresh interpreter from this worktree (the ticker starts
    with the engine, so which one runs is decided there)."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=root,
                          env={**os.environ, "PYTHONPATH": str(root), **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def _ticker_check(**env: str) -> list[str]:
    return _fresh(TICKER_CHECK, **env).split("\n")[:2]


def test_the_native_ticker_ticks_without_the_gil_and_interrupts_a_looping_filter() -> None:
    if not TICKER_LIBRARY.exists():
        pytest.fail(f"{TICKER_LIBRARY} is not built: bash .ci/setup builds it with gcc")
    # No Python ticker thread; guest calls keep the GIL, in the parent and in a forked child.
    assert _ticker_check() == ["True False True", "True False True"]


def test_without_the_native_ticker_a_python_thread_ticks_and_guest_calls_release_the_gil(
) -> None:
    assert _ticker_check(WASM_RECLAIM_PYTHON_TICKER="1") == ["False True True",
                                                             "False True True"]


# In a fresh process (nothing else uses its CPU): a store whose epoch deadline is the next tick
# and that has no epoch callback traps at its next call once the epoch has advanced.
TICKS_ON_CPU_TIME = """
import time, wasmtime
from addons.proxywasm import _wasmtime
eng = _wasmtime.engine()
print(_wasmtime.ticker_clock(), flush=True)
store = wasmtime.Store(eng)
noop = wasmtime.Instance(store, wasmtime.Module(eng, '(module (func (export "f")))'), [])
f = noop.exports(store)["f"]
def ticked():
    try:
        f(store)
    except (wasmtime.Trap, wasmtime.WasmtimeError):
        return True
    finally:
        store.set_epoch_deadline(1)
    return False
store.set_epoch_deadline(1)
time.sleep(0.5)  # 50 ticks of wall time, none of CPU time
print(ticked(), flush=True)
start = time.thread_time()
while time.thread_time() - start < 0.1:  # 10 ticks of CPU time
    pass
print(ticked(), flush=True)
"""


def test_the_native_ticker_ticks_on_cpu_time_so_an_idle_process_is_never_woken() -> None:
    if not TICKER_LIBRARY.exists():
        pytest.fail(f"{TICKER_LIBRARY} is not built: bash .ci/setup builds it with gcc")
    # No tick in half a second of sleep; ticks once the process has used 100 ms of CPU.
    assert _fresh(TICKS_ON_CPU_TIME).split() == ["process", "CPU", "False", "True"]
    # The Python ticker counts wall time: the sleep ticks.
    assert _fresh(TICKS_ON_CPU_TIME, WASM_RECLAIM_PYTHON_TICKER="1").split() == [
        "wall", "True", "True"]
