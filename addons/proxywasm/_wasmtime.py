"""The thin layer over wasmtime's C API that the host's hot path uses.

wasmtime-py's `Func.__call__` converts every argument through `Val` and costs about 19 µs per
call; a Proxy-Wasm request makes several guest calls and several host calls, so the host uses
the lower-level entry points instead (about 2 µs per call, see `just bench`):

- guest calls go through `wasmtime_func_call_unchecked` with one preallocated argument array;
- host functions are defined with `wasmtime_linker_define_func_unchecked`, so a host call
  receives the raw argument array and writes its result in place;
- the engine is configured with `memory_may_move=False`, so a memory's base address is fixed
  for the life of its store and can be cached; only its size changes (it only grows).

Everything unsafe lives here; `vm.py` uses these helpers and never touches ctypes directly
except for bounds-checked reads and writes of linear memory.
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Callable
from typing import Any

import wasmtime
from wasmtime import _bindings as _b
from wasmtime import _ffi as ffi

logger = logging.getLogger(__name__)

EPOCH_TICK_S = 0.005
"""How often the epoch ticker advances the engine's epoch (5 ms)."""

ValRaw = _b.wasmtime_val_raw_t
HostImpl = Callable[[Any], int | None]
"""A host function: gets the raw argument array, returns the i32 result (or None for void)."""

_func_call = _b._wasmtime_func_call_unchecked
_set_deadline = _b._wasmtime_context_set_epoch_deadline
_memory_size_bytes = _b._wasmtime_memory_data_size
_memory_data = _b._wasmtime_memory_data
_memory_pages = _b._wasmtime_memory_size
_trap_new = _b._wasmtime_trap_new
_CALLBACK = ffi.wasmtime_func_unchecked_callback_t


class GuestTrap(Exception):
    """The guest trapped, was interrupted by its deadline, or a host call failed inside it."""

    def __init__(self, message: str, *, interrupted: bool = False) -> None:
        super().__init__(message)
        self.interrupted = interrupted


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
            ticker = threading.Thread(
                target=_tick_epochs, args=(_engine,), name="wasm-epoch", daemon=True
            )
            ticker.start()
        return _engine


def _tick_epochs(eng: wasmtime.Engine) -> None:
    """Advance the engine's epoch every EPOCH_TICK_S; guest calls past their deadline trap."""
    stop = threading.Event()
    increment = _b._wasmtime_engine_increment_epoch
    ptr = eng.ptr()
    while not stop.wait(EPOCH_TICK_S):
        increment(ptr)


def deadline_ticks(deadline_ms: float) -> int:
    """Epoch ticks for a guest-call deadline of `deadline_ms` (a call traps within it)."""
    return max(1, int(deadline_ms / (EPOCH_TICK_S * 1000)))


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


@ctypes.CFUNCTYPE(None, ctypes.c_void_p)
def _no_finalizer(_env: int) -> None:
    return None


# The ctypes callbacks must outlive every linker that refers to them.
_KEEPALIVE: list[object] = []


def define_host_function(
    linker: wasmtime.Linker, module: str, name: str, ty: wasmtime.FuncType, impl: HostImpl,
) -> None:
    """Define `module.name` on `linker`, calling `impl(args)` with the raw argument array.

    `impl` returns the i32 result, which is written into args[0], or None for a function
    without results. `HostTrap` becomes a trap with its message; any other exception becomes
    a trap naming the host function, and is logged, so a host bug never crashes the proxy.
    """
    qualified = f"{module}.{name}"

    def callback(_env: int, _caller: Any, args: Any, _nargs: int) -> int:
        try:
            result = impl(args)
            if result is not None:
                args[0].i32 = result
            return 0
        except HostTrap as e:
            return make_trap(str(e))
        except BaseException as e:  # noqa: BLE001 - a host bug must become a trap, not a crash
            logger.exception("host function %s failed", qualified)
            return make_trap(f"host function {qualified} failed: {e!r}")

    cb = _CALLBACK(callback)
    _KEEPALIVE.append(cb)
    mod_b, name_b = module.encode(), name.encode()
    error = _b._wasmtime_linker_define_func_unchecked(
        linker.ptr(), mod_b, len(mod_b), name_b, len(name_b), ty.ptr(), cb, None, _no_finalizer
    )
    if error:
        raise wasmtime.WasmtimeError._from_ptr(error)


# --------------------------------------------------------------------------------------------
# Instances, exports, calls, memory
# --------------------------------------------------------------------------------------------


class RawInstance:
    """One instantiated module in its own Store, with fast access to exports and memory."""

    __slots__ = (
        "_args", "_ctx", "_instance", "_mem", "_mem_ref", "_trap", "_trap_ref",
        "base", "store",
    )

    def __init__(self, pre: wasmtime.InstancePre, memory_limit_bytes: int) -> None:
        self.store = wasmtime.Store(engine())
        if memory_limit_bytes > 0:
            self.store.set_limits(memory_size=memory_limit_bytes)
        # Instantiation runs start functions: give it a deadline like any other call.
        self.store.set_epoch_deadline(deadline_ticks(1000))
        self._ctx = self.store._context()
        self._instance = pre.instantiate(self.store)
        self._args = (ValRaw * 16)()
        self._trap = ctypes.POINTER(ffi.wasm_trap_t)()
        self._trap_ref = ctypes.byref(self._trap)
        memory = self.export("memory")
        if memory is None or memory.kind != ffi.WASMTIME_EXTERN_MEMORY.value:
            raise wasmtime.WasmtimeError("module does not export its linear memory as 'memory'")
        self._mem = memory.of.memory
        self._mem_ref = ctypes.byref(self._mem)
        self.base = ctypes.cast(_memory_data(self._ctx, self._mem_ref), ctypes.c_void_p).value or 0

    def export(self, name: str) -> Any:
        """Return the raw `wasmtime_extern_t` export `name`, or None."""
        item = ffi.wasmtime_extern_t()
        nb = name.encode()
        found = _b._wasmtime_instance_export_get(
            self._ctx, ctypes.byref(self._instance._instance), nb, len(nb), ctypes.byref(item)
        )
        return item if found else None

    def func(self, name: str) -> Any:
        """Return a reference usable by `call` for the exported function `name`, or None."""
        item = self.export(name)
        if item is None or item.kind != ffi.WASMTIME_EXTERN_FUNC.value:
            return None
        # byref keeps `item` (which owns the func handle) alive.
        return ctypes.byref(item.of.func)

    def call(self, func_ref: Any, deadline: int, *params: int) -> int:
        """Call a guest function with i32/i64 `params`; return its first result (0 if none).

        `deadline` is in epoch ticks; 0 keeps the current deadline (for calls the host makes
        from inside a host function, such as allocations). Raises `GuestTrap`.
        """
        args = self._args
        for i, p in enumerate(params):
            args[i].i64 = p
        if deadline:
            _set_deadline(self._ctx, deadline)
        error = _func_call(self._ctx, func_ref, args, 16, self._trap_ref)
        if error or self._trap:
            self._raise(error)
        return int(args[0].i32)

    def _raise(self, error: Any) -> None:
        if self._trap:
            trap = wasmtime.Trap._from_ptr(self._trap)
            self._trap = ctypes.POINTER(ffi.wasm_trap_t)()
            self._trap_ref = ctypes.byref(self._trap)
            message = summarize(trap.message)
            interrupted = trap.trap_code == wasmtime.TrapCode.INTERRUPT
            raise GuestTrap(message, interrupted=interrupted)
        err = wasmtime.WasmtimeError._from_ptr(error)
        raise GuestTrap(summarize(str(err)))

    def memory_size(self) -> int:
        """Current linear-memory size in bytes (it never shrinks)."""
        return int(_memory_size_bytes(self._ctx, self._mem_ref))

    def memory_pages(self) -> int:
        """Current linear-memory size in 64 KiB pages."""
        return int(_memory_pages(self._ctx, self._mem_ref))

    def close(self) -> None:
        """Drop the store: this frees the instance's linear memory."""
        self.store.close()
