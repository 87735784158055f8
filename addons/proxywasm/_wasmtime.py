"""The thin layer over wasmtime's C API that the host's hot path uses.

wasmtime-py's `Func.__call__` converts every argument through `Val` and costs 20-45 µs per
call; a Proxy-Wasm request makes several guest calls and several host calls, so the host uses
the lower-level entry points instead (a bare guest call: about 0.2 µs through the extension
below, 1.1 µs through ctypes; `just bench`):

- guest calls go through `wasmtime_func_call_unchecked` with a raw argument array;
- host functions are defined with `wasmtime_linker_define_func_unchecked`, so a host call
  receives the raw argument array and writes its result in place;
- the engine is configured with `memory_may_move=False`, so a memory's base address is fixed
  for the life of its store and can be cached; only its size changes (it only grows);
- the epoch that interrupts a looping guest ticks from a native thread (`ticker.c`, built by
  .ci/setup) every 10 ms of the process's CPU time, so guest calls keep the GIL and an idle
  proxy is never woken; where it is not built, from a Python thread every 10 ms;
- both kinds of crossing are plain C calls, without ctypes, through a small CPython extension
  (`fastcall.c`, built by .ci/setup into `_fastcall`): a guest call is one METH_FASTCALL
  function, a host call a C trampoline that calls the host function through vectorcall.
  Where it is not built (or WASM_RECLAIM_CTYPES_CALLS is set) they go through ctypes, said
  in one line.

Everything unsafe lives here; `vm.py` uses these helpers and never touches ctypes: it reads
and writes linear memory through a view of its current size (`RawInstance.memory_view`), after
its own bounds checks.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import importlib
import itertools
import logging
import os
import queue
import struct
import sysconfig
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import wasmtime
from wasmtime import _bindings as _b
from wasmtime import _ffi as ffi

logger = logging.getLogger(__name__)

EPOCH_TICK_S = 0.01
"""How often the epoch ticker advances the engine's epoch: every 10 ms of the process's CPU time
(the native ticker), or of wall time (the Python one, or where the CPU-time timer cannot be
made). 100 ticks a second of a busy process are enough for a 100 ms deadline; an idle process
gets none."""

HOST_TIME_FACTOR = 10
"""A guest call whose host calls (with its own guest time) take this many deadlines of CPU is
interrupted too: a filter looping on host calls is still a filter running too long."""

ValRaw = _b.wasmtime_val_raw_t
VAL_SIZE = ctypes.sizeof(ValRaw)  # 16: every raw value slot is as wide as a v128
HostImpl = Callable[..., int | None]
"""A host function: gets the active Vm and its parameters as ints; returns the i32 result."""

# The hot entry points, without ctypes argtypes: ctypes then passes prepared c_void_p/c_size_t
# objects straight through, which costs 0.55 µs per guest call instead of 1.5 µs (just bench).
# Two bindings of each: through `CDLL`, which releases the GIL for the call, and through
# `PyDLL`, which keeps it (no GIL hand-over per guest call, and the callbacks of the host calls
# made from it find the GIL already held). A guest call may keep the GIL only while the epoch
# ticker needs none (the native one, `_start_ticker`): a Python ticker could not tick
# meanwhile, and a looping guest would never be interrupted.
_lib = ctypes.CDLL(_b.dll._name)  # type: ignore[attr-defined]
_pylib = ctypes.PyDLL(_b.dll._name)  # type: ignore[attr-defined]


def _entry(lib: ctypes.CDLL, name: str, restype: Any) -> Any:
    func = getattr(lib, name)
    func.argtypes = None
    func.restype = restype
    return func


_memory_data = _b._wasmtime_memory_data


FASTCALL_LIBRARY = Path(__file__).with_name(
    "_fastcall" + (sysconfig.get_config_var("EXT_SUFFIX") or ".so"))
"""The C extension for the crossings (`fastcall.c`), built by .ci/setup for this Python."""


def _load_fastcall() -> Any:
    """The `_fastcall` extension bound to wasmtime's library, or None (the ctypes path): not
    built, not loadable, or WASM_RECLAIM_CTYPES_CALLS set. Why is said once `engine()` starts."""
    global _fastcall_note
    if os.environ.get("WASM_RECLAIM_CTYPES_CALLS"):
        _fastcall_note = (logging.INFO, "WASM_RECLAIM_CTYPES_CALLS is set")
        return None
    if not FASTCALL_LIBRARY.exists():
        _fastcall_note = (logging.INFO, f"{FASTCALL_LIBRARY.name} is not built (bash .ci/setup "
                          "builds it from fastcall.c)")
        return None
    try:
        module = importlib.import_module(f"{__package__}._fastcall")
    except ImportError as e:  # a broken build (one for another Python has another name)
        _fastcall_note = (logging.WARNING, f"cannot load {FASTCALL_LIBRARY.name} ({e})")
        return None
    if not hasattr(module, "checked"):  # built from an older fastcall.c
        _fastcall_note = (logging.WARNING, f"{FASTCALL_LIBRARY.name} is out of date (bash "
                          ".ci/setup rebuilds it from fastcall.c)")
        return None
    try:
        module.bind(_b.dll._name, VAL_SIZE)  # type: ignore[attr-defined]
    except (OSError, RuntimeError) as e:
        _fastcall_note = (logging.WARNING, f"{FASTCALL_LIBRARY.name} cannot bind wasmtime ({e})")
        return None
    return module


_fastcall_note: tuple[int, str] | None = None
_fastcall = _load_fastcall()
FASTCALLS = _fastcall is not None
"""Whether guest and host calls cross through the C extension (`fastcall.c`), not ctypes."""
NATIVE_HEADER_MAP_VALUE: int = getattr(_fastcall, "NATIVE_HEADER_MAP_VALUE", 0)
NATIVE_CURRENT_TIME: int = getattr(_fastcall, "NATIVE_CURRENT_TIME", 0)
"""The C forms of two host calls (`define_host_function`); 0 where the extension lacks them."""
parse_map: Callable[[bytes], list[tuple[bytes, bytes]] | None] | None = getattr(
    _fastcall, "parse_map", None)
"""The extension's decoder of serialized maps (`headers.deserialize_map` uses it), or None
where the extension is not loaded (or was built before it had one)."""
view_fields: Callable[[tuple[tuple[bytes, bytes], ...]], tuple[
    list[tuple[bytes, bytes]], bytes | None, int, bytes | None] | None] | None = getattr(
    _fastcall, "view_fields", None)
"""The extension's one pass over a request's header fields (`headers.view_fields`), or None."""


def _say_calls_path() -> None:
    """Say once, in one line, that the calls go through ctypes, and why."""
    global _fastcall_note
    note, _fastcall_note = _fastcall_note, None
    if note is not None:
        logger.log(note[0], "wasm: %s: guest and host calls cross through ctypes (slower)",
                   note[1])

# `_func_call` and the memory's size (read after every callback, for the memory cap, and
# whenever a guest pointer lies past the size last seen: 0.3 µs, not 2 µs) are bound by
# `_bind_calls`: to the GIL-keeping entry points while the native ticker runs.
_func_call: Any = None
_memory_size_bytes: Any = None
_memory_pages: Any = None
_guest_call: Any = None
"""The extension's guest call (`_fastcall.checked`, or `checked_nogil`, which releases the
GIL), which `RawInstance._bind_fastcalls` binds."""
keeps_gil = False
"""Whether guest calls keep the GIL (the native ticker runs)."""


def _bind_calls(keep_gil: bool) -> None:
    global _func_call, _memory_size_bytes, _memory_pages, _guest_call, keeps_gil
    lib = _pylib if keep_gil else _lib
    _func_call = _entry(lib, "wasmtime_func_call_unchecked", ctypes.c_void_p)
    _memory_size_bytes = _entry(lib, "wasmtime_memory_data_size", ctypes.c_size_t)
    _memory_pages = _entry(lib, "wasmtime_memory_size", ctypes.c_uint64)
    if _fastcall is not None:
        _guest_call = _fastcall.checked if keep_gil else _fastcall.checked_nogil
        if hasattr(_fastcall, "keep_gil"):
            _fastcall.keep_gil(keep_gil)
    keeps_gil = keep_gil


_bind_calls(keep_gil=False)
_trap_new = _b._wasmtime_trap_new
# Host callbacks receive plain addresses as size_t (ints, never None): no pointer objects
# built per call, and the cheapest conversion ctypes has (0.3 µs a callback, 0.45 as c_void_p).
_CALLBACK = ctypes.CFUNCTYPE(
    ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_size_t
)

ADDRESS_SPACE = memoryview((ctypes.c_char * 2**62).from_address(0)).cast("B")
"""The process's address space as one byte buffer (nothing is read until an offset is used):
the argument array of a host call is unpacked from it and its result packed into it by
address, with `struct` (0.1 µs) instead of a ctypes object or a copy per call (0.6 µs). Only
the addresses wasmtime hands a host callback are ever used with it."""
_RESULT = struct.Struct("<I")


class GuestTrap(Exception):
    """The guest trapped, was interrupted by its deadline, or a host call failed inside it."""

    def __init__(self, message: str, *, interrupted: bool = False, capped: bool = False) -> None:
        super().__init__(message)
        self.interrupted = interrupted
        self.capped = capped
        """Not a trap: the linear memory reached its cap, so the filter cannot allocate."""


def summarize(message: str) -> str:
    """One line from a wasmtime error: the cause first, then the innermost frame.

    "error while executing at wasm backtrace: 0: 0x34b - <unknown>!<wasm function 15>
    Caused by: wasm trap: wasm `unreachable` instruction executed" becomes
    "wasm trap: wasm `unreachable` instruction executed (at <wasm function 15>)".
    """
    lines = [ln.strip() for ln in message.strip().splitlines() if ln.strip()]
    if not lines:
        return "unknown error"
    if "Caused by:" in lines:
        i = lines.index("Caused by:")
        cause = "; ".join(lines[i + 1 :]) or lines[0]
        frames = [ln.split(" - ", 1)[-1] for ln in lines[1:i] if " - " in ln]
        where = frames[0].split("!", 1)[-1] if frames else ""
        return f"{cause} (at {where})" if where else cause
    return "; ".join(lines)


class HostTrap(Exception):
    """Raised by a host function to trap the guest with a clear message."""


# --------------------------------------------------------------------------------------------
# Engine and epoch ticker
# --------------------------------------------------------------------------------------------

_engine_lock = threading.Lock()
_engine: wasmtime.Engine | None = None


def engine() -> wasmtime.Engine:
    """Return the process-wide engine, creating it and its epoch ticker on first use."""
    global _engine
    with _engine_lock:
        if _engine is None:
            config = wasmtime.Config()
            config.epoch_interruption = True
            # A fixed base address lets the host cache it (see module docstring).
            config.memory_may_move = False
            config.cranelift_opt_level = "speed"
            _engine = wasmtime.Engine(config)
            _start_ticker(_engine)
            _start_reaper()
            _say_calls_path()
        return _engine


TICKER_LIBRARY = Path(__file__).with_name("_ticker.so")
"""The native epoch ticker (`ticker.c`), built by .ci/setup; without it, a Python thread ticks."""
_ticker_lib: Any = None
_ticker_said_missing = False
_ticker: int | None = None
"""The native ticker's handle (`wr_ticker *`) while it runs."""


def _stop_ticker() -> None:
    """Stop the native ticker (at exit: before the interpreter tears down, which may free the
    engine it ticks)."""
    global _ticker
    ticker, _ticker = _ticker, None
    if ticker is not None:
        _ticker_lib.wr_ticker_stop(ticker)


atexit.register(_stop_ticker)


def _start_ticker(eng: wasmtime.Engine) -> None:
    """Tick the engine's epoch: from the native thread of `ticker.c` if it is built, else from
    a Python thread. Guest calls keep the GIL only with the native ticker."""
    native = _native_ticker(eng)
    _bind_calls(keep_gil=native)
    if not native:
        threading.Thread(target=_tick_epochs, args=(eng,), name="wasm-epoch",
                         daemon=True).start()


def _native_ticker(eng: wasmtime.Engine) -> bool:
    """Start the native ticker; False if it is not built (said once, in one line), cannot be
    loaded or started, or WASM_RECLAIM_PYTHON_TICKER is set."""
    global _ticker, _ticker_lib, _ticker_said_missing
    if os.environ.get("WASM_RECLAIM_PYTHON_TICKER"):
        return False
    if not TICKER_LIBRARY.exists():
        if _ticker_said_missing:
            return False
        _ticker_said_missing = True
        logger.info("wasm: %s is not built (bash .ci/setup builds it): the epoch ticks from a "
                    "Python thread", TICKER_LIBRARY.name)
        return False
    try:
        lib = ctypes.CDLL(str(TICKER_LIBRARY))
    except OSError as e:
        logger.warning("wasm: cannot load %s (%s): the epoch ticks from a Python thread",
                       TICKER_LIBRARY, e)
        return False
    lib.wr_ticker_start.argtypes = (ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long)
    lib.wr_ticker_start.restype = ctypes.c_void_p
    lib.wr_ticker_stop.argtypes = (ctypes.c_void_p,)
    lib.wr_ticker_stop.restype = ctypes.c_int
    lib.wr_ticker_clock.argtypes = (ctypes.c_void_p,)
    lib.wr_ticker_clock.restype = ctypes.c_int
    increment = ctypes.cast(_lib.wasmtime_engine_increment_epoch, ctypes.c_void_p).value
    ticker = lib.wr_ticker_start(increment, ctypes.cast(eng.ptr(), ctypes.c_void_p).value,
                                 int(EPOCH_TICK_S * 1e9))
    if not ticker:
        logger.warning("wasm: the native epoch ticker did not start: the epoch ticks from a "
                       "Python thread")
        return False
    _ticker_lib, _ticker = lib, ticker
    return True


def ticker_clock() -> str:
    """What the epoch ticker counts its ticks on: "process CPU" (the native ticker's timer),
    "wall" (the native ticker where that timer cannot be made, or the Python ticker), or
    "none" (no engine yet, or the ticker was stopped)."""
    if _ticker is not None:
        deadline = time.monotonic() + 1.0
        while (clock := _ticker_lib.wr_ticker_clock(_ticker)) == 0 and time.monotonic() < deadline:
            time.sleep(0.001)  # the thread is starting: it chooses at once
        return "process CPU" if clock == 1 else "wall"
    if any(t.name == "wasm-epoch" for t in threading.enumerate()):
        return "wall"
    return "none"


def _tick_epochs(eng: wasmtime.Engine) -> None:
    """The Python ticker, where the native one is not built: advance the engine's epoch by
    one every EPOCH_TICK_S of real time, never in a burst.

    A late wake-up (the thread was not scheduled, or waited for the GIL) adds one tick, not
    the ticks it missed: an epoch is only a prompt to look at the guest's clock (see
    `GuestMeter`), so catching up would only make more prompts at once.
    """
    increment = _b._wasmtime_engine_increment_epoch
    ptr = eng.ptr()
    while True:
        time.sleep(EPOCH_TICK_S)
        increment(ptr)


# --------------------------------------------------------------------------------------------
# Deadlines on guest time
# --------------------------------------------------------------------------------------------
#
# An epoch deadline alone counts wall time: a call that armed before the ticker was starved
# (or that waited for the GIL, or while the host lowered headers) could trap at once on a
# burst of ticks. So the epoch only prompts a check: every store's deadline is one epoch
# ahead, and when it is reached wasmtime calls `_on_epoch`, which measures the guest's own CPU
# time (CLOCK_THREAD_CPUTIME_ID of the thread running it, minus the time spent in host
# functions) and either extends the deadline by one epoch or interrupts the call. With
# `_fastcall`, an outermost guest call first sets its store's deadline to the next tick, so
# the ticks that passed while no guest ran do not prompt it at its first instruction; without
# it, the first call after a tick is prompted at once (a little more work, the same limits).
#
# Measuring costs a system call (about 0.8 µs here), so it starts lazily: at the first epoch
# prompt within a guest call. A call shorter than a tick is never measured; the time before the
# first prompt (at most one tick of the process's CPU time with the native ticker, so at most
# one tick of the guest's own) is not counted, which is why the guest budget is the deadline
# minus two ticks: a looping call is interrupted after between deadline - 2 ticks and the
# deadline of guest time (plus up to a scheduler tick, when the kernel checks CPU timers),
# however busy the machine. A starved or late ticker delays the check, never makes it trip: a
# trip always means the guest ran its budget.


class GuestMeter:
    """The guest time of the running guest call, measured from its first epoch prompt."""

    __slots__ = ("guest_ns", "host_ns", "mark")

    def __init__(self, now_ns: int) -> None:
        self.guest_ns = 0
        """Guest CPU time measured so far."""
        self.host_ns = 0
        """CPU time in host functions (and guest code they call) since measuring started."""
        self.mark = now_ns
        """Thread CPU time when the current guest stretch started."""


_meter: list[GuestMeter | None] = [None]
"""The meter of the guest call running now (calls never interleave), or None if unmeasured.
A guest call resets it when it returns; a host function restores its caller's."""
_thread_ns = time.thread_time_ns
_by_data: dict[int, RawInstance] = {}
_next_data = itertools.count(1)


def deadline_budget_ns(deadline_ms: float) -> int:
    """The guest CPU time a call may use (ns) for a deadline of `deadline_ms`.

    Two ticks less than the deadline (at least one tick): one tick may pass before measuring
    starts, and one between the checks.
    """
    tick_ns = int(EPOCH_TICK_S * 1e9)
    return max(tick_ns, int(deadline_ms * 1e6) - 2 * tick_ns)


_EPOCH_CALLBACK_T = ctypes.CFUNCTYPE(
    ctypes.c_size_t, ctypes.c_void_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_uint64),
    ctypes.POINTER(ctypes.c_uint8),
)
_UPDATE_DEADLINE_CONTINUE = 0
_error_new = _b._wasmtime_error_new


def _on_epoch(_ctx: int, data: int | None, delta: Any, kind: Any) -> int:
    """wasmtime's epoch-deadline callback: extend by one epoch, or interrupt the call."""
    now = _thread_ns()
    delta[0] = 1
    kind[0] = _UPDATE_DEADLINE_CONTINUE
    meter = _meter[0]
    if meter is None:
        _meter[0] = GuestMeter(now)
        return 0
    meter.guest_ns += now - meter.mark
    meter.mark = now
    inst = _by_data.get(data or 0)
    if inst is None:
        return 0
    budget = inst.budget_ns
    if meter.guest_ns < budget and meter.guest_ns + meter.host_ns < budget * HOST_TIME_FACTOR:
        return 0
    deadline_ms = (budget + 2 * EPOCH_TICK_S * 1e9) / 1e6
    if meter.guest_ns >= budget:
        message = (f"interrupted: the guest ran {meter.guest_ns / 1e6:.0f} ms of its own time "
                   f"in one call (deadline {deadline_ms:.0f} ms)")
    else:
        message = (f"interrupted: one call ran {(meter.guest_ns + meter.host_ns) / 1e6:.0f} ms "
                   f"of CPU, most of it in host calls ({HOST_TIME_FACTOR} × the "
                   f"{deadline_ms:.0f} ms deadline)")
    inst.interrupted = message
    error = _error_new(message.encode())
    return ctypes.cast(error, ctypes.c_void_p).value or 0


_epoch_callback = _EPOCH_CALLBACK_T(_on_epoch)
_set_epoch_callback = _lib.wasmtime_store_epoch_deadline_callback
_set_epoch_callback.argtypes = None  # type: ignore[assignment]
_set_epoch_callback.restype = None


# --------------------------------------------------------------------------------------------
# Dropping stores off the request path
# --------------------------------------------------------------------------------------------

_reap_queue: queue.SimpleQueue[wasmtime.Store | threading.Event | None] = queue.SimpleQueue()
_reaper_lock = threading.Lock()
_reaper: threading.Thread | None = None


def _reap() -> None:
    while True:
        store = _reap_queue.get()
        if store is None:
            return
        if isinstance(store, threading.Event):  # a drain_reaper() marker
            store.set()
            continue
        try:
            store.close()  # a ctypes call: the GIL is released while the kernel unmaps
        except Exception:  # pragma: no cover - nothing useful to do but log
            logger.exception("dropping a wasm store failed")


def _start_reaper() -> None:
    global _reaper
    with _reaper_lock:
        if _reaper is None:
            _reaper = threading.Thread(target=_reap, name="wasm-reaper", daemon=True)
            _reaper.start()


def drop_store(store: wasmtime.Store) -> None:
    """Free a store's memory on the reaper thread.

    Unmapping a 32 MiB linear memory takes milliseconds; a restart should not make a request
    wait for it. The store must not be used afterwards.
    """
    _start_reaper()
    _reap_queue.put(store)


def drain_reaper(timeout_s: float = 5.0) -> None:
    """Wait until every store handed to the reaper is freed (tests and benchmarks)."""
    marker = threading.Event()
    _reap_queue.put(marker)
    marker.wait(timeout_s)


def _after_fork_in_child() -> None:
    """Threads do not survive a fork: a child that goes on running guest code (the standard
    experiment set forks simulations) gets its own epoch ticker and reaper."""
    global _engine_lock, _reap_queue, _reaper_lock, _reaper, _ticker
    _engine_lock, _reaper_lock = threading.Lock(), threading.Lock()
    _reap_queue = queue.SimpleQueue()
    _reaper = None
    _ticker = None  # the native ticker's thread is gone too: never join it, start anew
    if _engine is not None:
        _start_ticker(_engine)
        _start_reaper()


os.register_at_fork(after_in_child=_after_fork_in_child)


# --------------------------------------------------------------------------------------------
# Host functions
# --------------------------------------------------------------------------------------------

_I32 = wasmtime.ValType.i32()
_I64 = wasmtime.ValType.i64()
_VALTYPES = {"i": _I32, "I": _I64}


def functype(params: str, results: str) -> wasmtime.FuncType:
    """A FuncType from a compact signature: `i` for i32, `I` for i64 (e.g. "iiI", "i")."""
    return wasmtime.FuncType([_VALTYPES[c] for c in params], [_VALTYPES[c] for c in results])


def make_trap(message: str) -> int:
    """Create a wasm trap carrying `message`; return it as the integer a host callback returns."""
    data = message.encode("utf-8", "replace")
    trap = _trap_new(data, len(data))
    return ctypes.cast(trap, ctypes.c_void_p).value or 0


def _host_failure(qualified: str, error: BaseException) -> str:
    """The trap message for an exception from the host function `qualified`: a `HostTrap`'s
    own message; anything else is a host bug, logged with its traceback and named."""
    if isinstance(error, HostTrap):
        return str(error)
    logger.error("host function %s failed", qualified, exc_info=error)
    return f"host function {qualified} failed: {error!r}"


def _address(pointer: Any) -> int:
    """The address a ctypes pointer holds (0 for NULL)."""
    return ctypes.cast(pointer, ctypes.c_void_p).value or 0


def _finalize_nothing(_env: int) -> None:
    return None


_no_finalizer = ctypes.CFUNCTYPE(None, ctypes.c_void_p)(_finalize_nothing)


# The ctypes callbacks must outlive every linker that refers to them.
_KEEPALIVE: list[object] = []


def define_host_function(
    linker: wasmtime.Linker, module: str, name: str, ty: wasmtime.FuncType, impl: HostImpl,
    active: list[Any],
) -> None:
    """Define `module.name` on `linker`, calling `impl(active[0], *params)`.

    `active[0]` is the object whose guest code is running (the host's `Vm`); calls never
    interleave, so one slot is enough.

    i32 parameters arrive as unsigned ints (pointers and sizes need no masking), i64 ones as
    signed ints. `impl` returns the i32 result, or None for a function without results.
    `HostTrap` becomes a trap with its message; any other exception becomes a trap naming the
    host function, and is logged, so a host bug never crashes the proxy. While the calling
    guest call is being measured, the time spent here is host time, not guest time.

    Through `_fastcall` (when built) a C trampoline calls `impl` directly and falls back to the
    Python callback below only while the guest call is measured or no VM is active; both turn
    an exception into the same trap (`_host_failure`). An `impl` with a ``native`` attribute
    (`NATIVE_HEADER_MAP_VALUE`, `NATIVE_CURRENT_TIME`) has a C form for its common case, which
    runs first and leaves every other case to `impl` (see fastcall.c and `Vm.native`).
    """
    qualified = f"{module}.{name}"
    params = [str(p) for p in ty.params]
    layout = struct.Struct("<" + "".join("I12x" if p == "i32" else "q8x" for p in params))
    unpack = functools.partial(layout.unpack_from, ADDRESS_SPACE)
    pack_result = functools.partial(_RESULT.pack_into, ADDRESS_SPACE)

    def callback(_env: int, _caller: int, args: int, _nargs: int) -> int:
        # One Python frame per host call. Clocks are read only while the calling guest call
        # is being measured (not the usual case).
        meter = _meter[0]
        if meter is not None:
            entered = _thread_ns()
            meter.guest_ns += entered - meter.mark
        try:
            target = active[0]
            if target is None:
                raise HostTrap(f"{qualified} was called outside any callback")
            result = impl(target, *unpack(args))
            if result is not None:
                pack_result(args, result & 0xFFFFFFFF)
            return 0
        except BaseException as e:
            return make_trap(_host_failure(qualified, e))
        finally:
            if meter is not None:
                # host time is not guest time; a guest call made from here had its own meter
                _meter[0] = meter
                left = _thread_ns()
                meter.host_ns += left - entered
                meter.mark = left

    mod_b, name_b = module.encode(), name.encode()
    if _fastcall is not None and len(params) <= _fastcall.MAX_HOST_PARAMS:
        kinds = "".join("i" if p == "i32" else "I" for p in params).encode()
        address = _fastcall.define(
            _address(linker.ptr()), mod_b, name_b, _address(ty.ptr()), kinds, impl, active,
            _meter, callback, functools.partial(_host_failure, qualified),
            getattr(impl, "native", 0))
        if address:
            raise wasmtime.WasmtimeError._from_ptr(
                ctypes.cast(address, ctypes.POINTER(ffi.wasmtime_error_t)))
        return
    cb = _CALLBACK(callback)
    _KEEPALIVE.append(cb)
    error = _b._wasmtime_linker_define_func_unchecked(
        linker.ptr(), mod_b, len(mod_b), name_b, len(name_b), ty.ptr(),
        ctypes.cast(cb, _b.wasmtime_func_unchecked_callback_t), None, _no_finalizer,
    )
    if error:
        raise wasmtime.WasmtimeError._from_ptr(error)


# --------------------------------------------------------------------------------------------
# Instances, exports, calls, memory
# --------------------------------------------------------------------------------------------


def _pointer_arg(address: int | None) -> Any:
    """`address` as a ctypes parameter object (`c_void_p.from_param`), passed without
    conversion; the caller keeps what it points to alive."""
    return ctypes.c_void_p.from_param(address)


def _call_failed(data: int, error: int, trap: int) -> NoReturn:
    """`_fastcall.checked`'s `on_failed` for the instance registered as `data`: raise the
    `GuestTrap` of its failed guest call (`RawInstance._raise`, without a frame per call)."""
    inst = _by_data.get(data)
    if inst is not None:
        inst._raise(error, trap)
    _raise_trap(None, error, trap)  # a closed instance: nothing interrupted it


def _raise_trap(stopped: str | None, error: int, trap: int) -> NoReturn:
    """Raise the `GuestTrap` for a failed guest call, taking ownership of its wasmtime error
    and trap (addresses, 0 if none); `stopped`: why our epoch callback interrupted it."""
    if stopped is not None:  # our epoch callback stopped it: the guest ran too long
        if error:
            _b._wasmtime_error_delete(ctypes.cast(
                ctypes.c_void_p(error), ctypes.POINTER(ffi.wasmtime_error_t)))
        if trap:
            _b._wasm_trap_delete(ctypes.cast(
                ctypes.c_void_p(trap), ctypes.POINTER(ffi.wasm_trap_t)))
        raise GuestTrap(stopped, interrupted=True) from None
    if trap:
        if error:  # never both, but never leak either
            _b._wasmtime_error_delete(ctypes.cast(
                ctypes.c_void_p(error), ctypes.POINTER(ffi.wasmtime_error_t)))
        ptr = ctypes.cast(ctypes.c_void_p(trap), ctypes.POINTER(ffi.wasm_trap_t))
        trapped = wasmtime.Trap._from_ptr(ptr)
        message = summarize(trapped.message)
        raise GuestTrap(message,
                        interrupted=trapped.trap_code == wasmtime.TrapCode.INTERRUPT
                        ) from None
    err = wasmtime.WasmtimeError._from_ptr(
        ctypes.cast(ctypes.c_void_p(error), ctypes.POINTER(ffi.wasmtime_error_t))
    )
    raise GuestTrap(summarize(str(err))) from None


class RawInstance:
    """One instantiated module in its own Store, with fast access to exports and memory."""

    def __init__(self, pre: wasmtime.InstancePre, memory_limit_bytes: int) -> None:
        self.store = wasmtime.Store(engine())
        if memory_limit_bytes > 0:
            self.store.set_limits(memory_size=memory_limit_bytes)
        self.budget_ns = deadline_budget_ns(1000)
        """Guest CPU time one call may use (see `arm`); instantiation runs start functions."""
        self.interrupted: str | None = None
        self._data = next(_next_data)
        _by_data[self._data] = self
        _set_epoch_callback(self.store.ptr(), _epoch_callback, ctypes.c_void_p(self._data),
                            None)
        self.store.set_epoch_deadline(1)
        self._ctx = self.store._context()
        try:
            self._instance = pre.instantiate(self.store)
        except BaseException:
            _by_data.pop(self._data, None)
            raise
        finally:
            _meter[0] = None
        self._args = (ValRaw * 16)()
        self._a64 = (ctypes.c_int64 * (16 * VAL_SIZE // 8)).from_buffer(self._args)
        self._a32 = (ctypes.c_int32 * (16 * VAL_SIZE // 4)).from_buffer(self._args)
        self._trap = ctypes.c_void_p(0)
        # The entry points' arguments as the parameter objects ctypes makes of a value
        # (`from_param`), which it passes as they are: a c_void_p or c_size_t is converted
        # through its type's format on every call (half a bare call's cost). They hold plain
        # addresses: what they point to is kept alive by this instance.
        self._cv = _pointer_arg(ctypes.cast(self._ctx, ctypes.c_void_p).value)
        self._av = _pointer_arg(ctypes.addressof(self._args))
        self._tv = _pointer_arg(ctypes.addressof(self._trap))
        self._n = ctypes.c_size_t.from_param(16)
        self._exports: dict[str, Any] = {}
        memory = self.export("memory")
        if memory is None or memory.kind != ffi.WASMTIME_EXTERN_MEMORY.value:
            raise wasmtime.WasmtimeError("module does not export its linear memory as 'memory'")
        self._mem = memory.of.memory
        self._mem_ref = ctypes.byref(self._mem)
        self._mv = _pointer_arg(ctypes.addressof(self._mem))
        # The same addresses as plain ints, for `_fastcall`.
        self._ctx_addr = _address(self._ctx)
        self._mem_addr = ctypes.addressof(self._mem)
        if _fastcall is not None:
            self._bind_fastcalls()
        self.base = ctypes.cast(_memory_data(self._ctx, self._mem_ref), ctypes.c_void_p).value or 0

    def export(self, name: str) -> Any:
        """Return the raw `wasmtime_extern_t` export `name`, or None."""
        item = ffi.wasmtime_extern_t()
        nb = name.encode()
        found = _b._wasmtime_instance_export_get(
            self._ctx, ctypes.byref(self._instance._instance), nb, len(nb), ctypes.byref(item)
        )
        if not found:
            return None
        self._exports[name] = item  # keeps the handle alive for addresses taken from it
        return item

    def func(self, name: str) -> Any:
        """Return a handle usable by `call` for the exported function `name`, or None."""
        item = self.export(name)
        if item is None or item.kind != ffi.WASMTIME_EXTERN_FUNC.value:
            return None
        address = ctypes.addressof(item.of.func)
        return address if _fastcall is not None else _pointer_arg(address)

    def _bind_fastcalls(self) -> None:
        """Bind `call`, `call1`, `call2`, `call3`, `memory_size` and `memory_pages` on this
        instance to the extension's entry points, with this instance's addresses: calls into C
        with no Python frame between (a cache hit makes four guest calls and reads the size
        twice). A failed guest call raises through `_call_failed`, and every call resets the
        meter, as the ctypes forms below do."""
        call = functools.partial(_guest_call, _meter, functools.partial(_call_failed, self._data),
                                 self._ctx_addr)
        self.call = self.call1 = self.call2 = self.call3 = call  # type: ignore[method-assign]
        self.memory_size = functools.partial(  # type: ignore[method-assign]
            _fastcall.memory_size, self._ctx_addr, self._mem_addr)
        self.memory_pages = functools.partial(  # type: ignore[method-assign]
            _fastcall.memory_pages, self._ctx_addr, self._mem_addr)

    def arm(self, budget_ns: int) -> None:
        """Set the guest CPU time each following call may use (`deadline_budget_ns`)."""
        self.budget_ns = budget_ns

    # `call` and its fixed-arity forms (`call1`, `call2`, `call3`: no tuple of parameters on
    # the hot path) and the memory's size, through ctypes. Where `_fastcall` is built,
    # `__init__` binds each of them on the instance to the extension's entry point instead
    # (`_bind_fastcalls`).

    def call(self, func: Any, *params: int) -> int:
        """Call a guest function with i32/i64 `params`; return its i32 result (0 if none).

        The deadline is whatever `arm` set last. Raises `GuestTrap`.
        """
        a64 = self._a64
        for i, p in enumerate(params):
            a64[2 * i] = p
        error = _func_call(self._cv, func, self._av, self._n, self._tv)
        _meter[0] = None
        if error or self._trap.value:
            self._raise_ctypes(error)
        return self._a32[0]

    def call1(self, func: Any, p0: int) -> int:
        """`call` with one parameter (the hot path: allocations, context callbacks)."""
        self._a64[0] = p0
        error = _func_call(self._cv, func, self._av, self._n, self._tv)
        _meter[0] = None
        if error or self._trap.value:
            self._raise_ctypes(error)
        return self._a32[0]

    def call2(self, func: Any, p0: int, p1: int) -> int:
        """`call` with two parameters (context create)."""
        a64 = self._a64
        a64[0] = p0
        a64[2] = p1
        error = _func_call(self._cv, func, self._av, self._n, self._tv)
        _meter[0] = None
        if error or self._trap.value:
            self._raise_ctypes(error)
        return self._a32[0]

    def call3(self, func: Any, p0: int, p1: int, p2: int) -> int:
        """`call` with three parameters (request and response headers)."""
        a64 = self._a64
        a64[0] = p0
        a64[2] = p1
        a64[4] = p2
        error = _func_call(self._cv, func, self._av, self._n, self._tv)
        _meter[0] = None
        if error or self._trap.value:
            self._raise_ctypes(error)
        return self._a32[0]

    def memory_size(self) -> int:
        """Current linear-memory size in bytes (it never shrinks)."""
        return _memory_size_bytes(self._cv, self._mv)  # type: ignore[no-any-return]

    def memory_pages(self) -> int:
        """Current linear-memory size in 64 KiB pages."""
        return _memory_pages(self._cv, self._mv)  # type: ignore[no-any-return]

    def _raise_ctypes(self, error: int | None) -> NoReturn:
        trap, self._trap.value = self._trap.value or 0, 0
        self._raise(error or 0, trap)

    def _raise(self, error: int, trap: int) -> NoReturn:
        """Raise the `GuestTrap` for a failed guest call, taking ownership of its wasmtime
        error and trap (addresses, 0 if none)."""
        stopped, self.interrupted = self.interrupted, None
        _raise_trap(stopped, error, trap)

    def memory_view(self, size: int) -> memoryview:
        """The first `size` bytes of linear memory as a writable buffer (`size` at most
        `memory_size()`). It stays valid while the store lives: the memory never moves
        (`memory_may_move=False`) and never shrinks; it only grows past the view's end."""
        return ADDRESS_SPACE[self.base : self.base + size]  # no ctypes type per size

    def close(self, *, wait: bool = False) -> None:
        """Drop the store, which frees the linear memory: on the reaper thread unless `wait`."""
        self._exports.clear()
        _by_data.pop(self._data, None)
        if wait:
            self.store.close()
        else:
            drop_store(self.store)
