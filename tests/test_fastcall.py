"""The host's crossings: guest calls and host calls through the C extension (`fastcall.c`), or
through ctypes where it is not built or WASM_RECLAIM_CTYPES_CALLS is set.

The first tests start fresh processes to see which path runs (and that it still runs in a
forked child); the others check behaviour in this process, on whichever path it took: run them
again with WASM_RECLAIM_CTYPES_CALLS=1 for the ctypes path.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import wasmtime

from addons.proxywasm import _wasmtime as raw

ROOT = Path(__file__).resolve().parents[1]

# Which path runs, whether guest calls keep the GIL, and that a request with host calls and
# an interrupted looping filter both work: in this process and in a forked child.
PATH_CHECK = """
import logging, os, sys, wasmtime
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
from addons.proxywasm import FilterModule, Limits, _wasmtime
from scenarios.simulate import DEFAULT_FILTER
from tests.bench.host import HEADERS, make_host
from tests.wat import module
LOOP = FilterModule(bytes(wasmtime.wat2wasm(module(
    '(func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)'
    ' (loop $l (br $l)) (i32.const 0))'))))
AUTH = FilterModule.from_file(DEFAULT_FILTER)
def served():  # a miss (an outbound call, its answer), then a hit: host calls both ways
    host, _ = make_host(AUTH)
    inst = host.instance("shop")
    for _ in range(2):
        s = inst.stream()
        d = s.request_headers([*HEADERS, (b"authorization", b"Bearer t")])
        host.poll()
        s.close()
    ok = d is not None and d.action == "continue" and inst.observe().outbound == 1
    host.close()
    return ok
def interrupted():
    host, _ = make_host(LOOP, limits=Limits(deadline_ms=100))
    d = host.instance("loop").stream().request_headers(HEADERS)
    host.close()
    return d is not None and "interrupted" in (d.error or "")
def state():
    call = _wasmtime._guest_call.__name__ if _wasmtime.FASTCALLS else "ctypes"
    return f"{_wasmtime.FASTCALLS} {call} {bool(_wasmtime._KEEPALIVE)} {served()} {interrupted()}"
print(state(), flush=True)
pid = os.fork()
if pid == 0:
    print(state(), flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


def fresh(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter (the path is chosen at import) from the worktree."""
    base = {k: v for k, v in os.environ.items()
            if k not in ("WASM_RECLAIM_CTYPES_CALLS", "WASM_RECLAIM_PYTHON_TICKER")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**base, "PYTHONPATH": str(ROOT), **env})
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def test_the_extension_carries_the_calls_when_built_also_in_a_forked_child() -> None:
    if not raw.FASTCALL_LIBRARY.exists():
        pytest.fail(f"{raw.FASTCALL_LIBRARY.name} is not built: bash .ci/setup builds it "
                    "from addons/proxywasm/fastcall.c with gcc")
    done = fresh(PATH_CHECK)
    # No ctypes callback made for any host function; guest calls keep the GIL (native ticker)
    assert done.stdout.splitlines() == ["True checked False True True"] * 2
    assert "ctypes" not in done.stderr
    # With the Python ticker, guest calls release the GIL; host calls take it back
    done = fresh(PATH_CHECK, WASM_RECLAIM_PYTHON_TICKER="1")
    assert done.stdout.splitlines() == ["True checked_nogil False True True"] * 2


def test_forced_ctypes_calls_run_and_say_so_in_one_line() -> None:
    done = fresh(PATH_CHECK, WASM_RECLAIM_CTYPES_CALLS="1")
    assert done.stdout.splitlines() == ["False ctypes True True True"] * 2
    said = [ln for ln in done.stderr.splitlines() if "ctypes" in ln]
    assert said == ["wasm: WASM_RECLAIM_CTYPES_CALLS is set: guest and host calls cross "
                    "through ctypes (slower)"]


def test_the_path_in_this_process_is_the_one_expected() -> None:
    forced = bool(os.environ.get("WASM_RECLAIM_CTYPES_CALLS"))
    if not forced and not raw.FASTCALL_LIBRARY.exists():
        pytest.fail(f"{raw.FASTCALL_LIBRARY.name} is not built: bash .ci/setup builds it")
    assert raw.FASTCALLS is not forced


# ---- host functions and guest calls, at the engine layer ----------------------------------

# `run` passes its (i32, i64) parameters to the host function env.f and returns its result;
# `spin` calls it forever (a filter looping on host calls); `loop` loops in guest code.
PROBE = """(module
  (import "env" "f" (func $f (param i32 i64) (result i32)))
  (memory (export "memory") 1)
  (func (export "run") (param i32 i64) (result i32) (call $f (local.get 0) (local.get 1)))
  (func (export "spin") (loop $l (drop (call $f (i32.const 1) (i64.const 2))) (br $l)))
  (func (export "loop") (loop $l (br $l))))
"""


class Probe:
    """One instance of PROBE whose env.f is `impl(vm, a, b)`, with `active[0]` as the VM."""

    def __init__(self, impl: Any) -> None:
        self.active: list[Any] = ["vm"]
        linker = wasmtime.Linker(raw.engine())
        raw.define_host_function(linker, "env", "f", raw.functype("iI", "i"), impl,
                                 self.active)
        self.inst = raw.RawInstance(linker.instantiate_pre(
            wasmtime.Module(raw.engine(), PROBE)), 0)
        self.inst.arm(raw.deadline_budget_ns(10_000))

    def __call__(self, name: str, *params: int) -> int:
        return self.inst.call(self.inst.func(name), *params)

    def close(self) -> None:
        self.inst.close(wait=True)


@pytest.fixture
def probe() -> Any:
    made: list[Probe] = []

    def make(impl: Any) -> Probe:
        made.append(Probe(impl))
        return made[-1]

    yield make
    for p in made:
        p.close()


def test_host_calls_get_unsigned_i32_and_signed_i64_and_return_the_low_32_bits(probe) -> None:
    seen: list[tuple[Any, ...]] = []
    results = iter([7, -1, 2**40 + 9, 0xFFFFFFFF])

    def impl(vm: Any, a: int, b: int) -> int:
        seen.append((vm, a, b))
        return next(results)

    p = probe(impl)
    assert p("run", 1, 2) == 7
    assert p("run", 0xFFFFFFFF, -5) == -1  # the guest's i32 result comes back signed
    assert p("run", -1, 2**63 - 1) == 9
    assert p("run", 2**31, 2**64 - 1) == -1  # an i64 given unsigned reaches the guest as -1
    assert seen == [("vm", 1, 2), ("vm", 0xFFFFFFFF, -5), ("vm", 0xFFFFFFFF, 2**63 - 1),
                    ("vm", 2**31, -1)]


def test_guest_calls_reject_what_is_not_an_int(probe) -> None:
    p = probe(lambda vm, a, b: 0)
    with pytest.raises(TypeError):
        p("run", 1, "2")
    assert p("run", 1, 2) == 0  # and the instance still serves


def test_a_host_trap_traps_the_guest_with_its_message(probe, caplog) -> None:
    def impl(vm: Any, a: int, b: int) -> int:
        raise raw.HostTrap(f"the filter called proc_exit({a})")

    p = probe(impl)
    with caplog.at_level(logging.ERROR), pytest.raises(raw.GuestTrap) as trapped:
        p("run", 3, 0)
    assert str(trapped.value).startswith("the filter called proc_exit(3)")
    assert not trapped.value.interrupted
    assert not caplog.records  # a HostTrap is the filter's doing: not logged as a host bug
    with pytest.raises(raw.GuestTrap, match=r"proc_exit\(4\)"):
        p("run", 4, 0)


def test_a_host_bug_becomes_a_trap_naming_the_function_and_is_logged(probe, caplog) -> None:
    def impl(vm: Any, a: int, b: int) -> int:
        return a // b

    p = probe(impl)
    assert p("run", 7, 2) == 3
    with caplog.at_level(logging.ERROR), pytest.raises(raw.GuestTrap) as trapped:
        p("run", 7, 0)
    assert str(trapped.value).startswith(
        "host function env.f failed: ZeroDivisionError('integer division or modulo by zero')")
    [record] = [r for r in caplog.records if "env.f" in r.getMessage()]
    assert record.getMessage() == "host function env.f failed"
    assert record.exc_info is not None and record.exc_info[0] is ZeroDivisionError
    assert record.exc_info[2] is not None  # with the traceback into impl


def test_a_result_that_is_not_an_int_is_a_host_bug(probe, caplog) -> None:
    p = probe(lambda vm, a, b: "ok")
    with caplog.at_level(logging.ERROR), pytest.raises(
            raw.GuestTrap, match=r"host function env\.f failed: TypeError\("):
        p("run", 1, 2)


def test_a_host_call_outside_any_callback_traps(probe) -> None:
    p = probe(lambda vm, a, b: 1)
    p.active[0] = None
    with pytest.raises(raw.GuestTrap, match=r"env\.f was called outside any callback"):
        p("run", 1, 2)


def test_a_looping_guest_is_interrupted_and_the_instance_serves_again(probe) -> None:
    p = probe(lambda vm, a, b: a + 1)
    p.inst.arm(raw.deadline_budget_ns(100))
    with pytest.raises(raw.GuestTrap) as trapped:
        p("loop")
    assert trapped.value.interrupted
    assert "interrupted: the guest ran" in str(trapped.value)
    assert p("run", 41, 0) == 42


def test_a_guest_looping_on_host_calls_is_interrupted_by_its_host_time(probe) -> None:
    # Once the call is measured (its first epoch prompt), host calls go through the Python
    # callback that books their time as host time.
    def impl(vm: Any, a: int, b: int) -> int:
        return sum(range(2000)) & 1

    p = probe(impl)
    p.inst.arm(raw.deadline_budget_ns(50))
    with pytest.raises(raw.GuestTrap) as trapped:
        p("spin")
    assert trapped.value.interrupted
    assert "most of it in host calls" in str(trapped.value)
    assert p("run", 1, 2) == 0


FINALIZED = """
import gc, weakref, wasmtime
from addons.proxywasm import _wasmtime as raw
from tests.test_fastcall import PROBE
class Impl:
    def __call__(self, vm, a, b):
        return a
impl = Impl()
gone = weakref.ref(impl)
linker = wasmtime.Linker(raw.engine())
raw.define_host_function(linker, "env", "f", raw.functype("iI", "i"), impl, ["vm"])
inst = raw.RawInstance(linker.instantiate_pre(wasmtime.Module(raw.engine(), PROBE)), 0)
inst.arm(raw.deadline_budget_ns(1000))
del impl, linker
gc.collect()
print(gone() is not None, inst.call(inst.func("run"), 5, 0))
inst.close()  # dropped on the reaper thread, without the GIL: released on this one
raw.drain_reaper()
gc.collect()
print(gone() is None)
"""


def test_a_host_function_is_released_when_its_last_user_is_dropped() -> None:
    if not raw.FASTCALL_LIBRARY.exists():
        pytest.fail(f"{raw.FASTCALL_LIBRARY.name} is not built: bash .ci/setup builds it")
    # The store still uses the function after its linker is gone; once the store is dropped
    # (on the reaper thread) wasmtime's finalizer releases the Python objects.
    assert fresh(FINALIZED).stdout.splitlines() == ["True 5", "True"]


def test_many_host_calls_leave_no_references_behind(probe) -> None:
    arg = object()
    p = probe(lambda vm, a, b: b)
    before = sys.getrefcount(arg)
    p.active[0] = arg
    for i in range(2000):
        assert p("run", 1, i) == i
    p.active[0] = None
    assert sys.getrefcount(arg) == before


def test_ticks_while_no_guest_runs_do_not_prompt_the_next_call(probe) -> None:
    # A prompt starts the guest meter (`_meter[0]`), which the host function sees. With the
    # extension an outermost call sets its deadline to the next tick, so the ticks that passed
    # while no guest ran do not prompt it; through ctypes the first call after them is
    # prompted at once.
    metered: list[bool] = []

    def impl(vm: Any, a: int, b: int) -> int:
        metered.append(raw._meter[0] is not None)
        return 0

    p = probe(impl)
    p("run", 0, 0)
    for _ in range(5):
        raw.engine().increment_epoch()
    p("run", 0, 0)
    assert metered == [False, not raw.FASTCALLS]


def test_every_guest_call_ends_its_meter_also_when_it_traps(probe) -> None:
    # Each form of the call (`call`, the fixed-arity `call1`..`call3`; through the extension
    # one C entry point bound to the instance) resets the running call's meter as it returns,
    # or the next call would count this one's time; a trap comes back as a GuestTrap.
    p = probe(lambda vm, a, b: b)
    inst, run = p.inst, p.inst.func("run")
    for call in (lambda: inst.call(run, 1, 7), lambda: inst.call2(run, 1, 7)):
        raw._meter[0] = raw.GuestMeter(0)
        assert call() == 7
        assert raw._meter[0] is None

    def trap(vm: Any, a: int, b: int) -> int:
        raise raw.HostTrap(f"trap {a}")

    t = probe(trap)
    for i in range(200):  # and nothing is left behind by the failures
        raw._meter[0] = raw.GuestMeter(0)
        with pytest.raises(raw.GuestTrap, match=rf"^trap {i}"):
            t.inst.call2(t.inst.func("run"), i, 0)
        assert raw._meter[0] is None
    assert p("run", 1, 5) == 5  # the other instance serves on
