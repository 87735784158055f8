"""One Proxy-Wasm VM: a compiled module instantiated in its own Store, and the host functions.

`FilterModule` compiles a .wasm once and links it against the host functions below.
`Vm` is one instance of it (one *generation* of a filter instance): its Store, its contexts
(one root context, one context per HTTP stream), its metrics and its outbound calls.
A restart is a new `Vm`; dropping the old one frees its linear memory.

Every pointer and length the guest passes is bounds-checked against the current memory size
before anything is read or written; a bad one gets `INVALID_MEMORY_ACCESS` (or WASI `FAULT`),
never a crash. Host functions run on the thread that called into the guest; the active `Vm` is
the one in `_active[0]` (calls are synchronous, so there is only ever one).
"""

from __future__ import annotations

import ctypes
import logging
import os
import struct
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import wasmtime

from . import _wasmtime as raw
from .abi import (
    ABI_MARKERS,
    Action,
    BufferType,
    LogLevel,
    MapType,
    MetricType,
    Status,
    StreamType,
    WasiErrno,
)
from .headers import MapFormatError, Pairs, deserialize_map, serialize_map

if TYPE_CHECKING:
    from .host import Host

logger = logging.getLogger(__name__)
guest_logger = logging.getLogger("wasm_reclaim.guest")

M32 = 0xFFFFFFFF
BAD_MEMORY = Status.INVALID_MEMORY_ACCESS
_BUFFER_TYPES = frozenset(BufferType)
_MAP_TYPES = frozenset(MapType)
_STREAM_TYPES = frozenset(StreamType)
_METRIC_TYPES = frozenset(MetricType)
ROOT_CONTEXT_ID = 1
MAX_LOG_MESSAGE = 16 * 1024
MAX_RANDOM_BYTES = 64 * 1024

_PY_LEVEL = {
    LogLevel.TRACE: logging.DEBUG,
    LogLevel.DEBUG: logging.DEBUG,
    LogLevel.INFO: logging.INFO,
    LogLevel.WARN: logging.WARNING,
    LogLevel.ERROR: logging.ERROR,
    LogLevel.CRITICAL: logging.CRITICAL,
}

_memmove = ctypes.memmove
_string_at = ctypes.string_at
_u32_at = ctypes.c_uint32.from_address
_u64_at = ctypes.c_uint64.from_address

# The Vm whose guest code is running (host functions need it); calls never interleave.
_active: list[Vm | None] = [None]


class FilterLoadError(Exception):
    """The .wasm is not a usable Proxy-Wasm filter; the message says why."""


class FilterStartError(Exception):
    """A filter instance could not start (trap, or a start callback returned false)."""


class LocalResponse(NamedTuple):
    """A response the filter sends itself instead of forwarding the request."""

    status: int
    body: bytes = b""
    headers: Pairs = []  # noqa: RUF012 - NamedTuple defaults are never mutated here
    details: str = ""


class StreamContext:
    """Host-side state of one HTTP stream context in a Vm."""

    __slots__ = (
        "calls", "closed", "done_pending", "id", "local_response", "modified", "outbound",
        "request_headers", "request_trailers", "response_headers", "response_trailers", "resumed",
        "stream",
    )

    def __init__(self, context_id: int, stream: Any) -> None:
        self.id = context_id
        self.stream = stream
        self.request_headers: Pairs = []
        self.request_trailers: Pairs = []
        self.response_headers: Pairs = []
        self.response_trailers: Pairs = []
        self.local_response: LocalResponse | None = None
        self.modified = False  # the filter changed a header map
        self.resumed = False
        self.closed = False
        self.done_pending = False
        self.calls: set[int] = set()
        self.outbound = 0


class PendingCall:
    """An outbound `proxy_http_call` waiting for its response or its deadline."""

    __slots__ = ("cluster", "context_id", "deadline_ns", "id", "path", "started_ns")

    def __init__(
        self, call_id: int, context_id: int, cluster: str, path: str, started_ns: int,
        deadline_ns: int,
    ) -> None:
        self.id = call_id
        self.context_id = context_id
        self.cluster = cluster
        self.path = path
        self.started_ns = started_ns
        self.deadline_ns = deadline_ns


class Metric:
    """A metric the guest defined with `proxy_define_metric`."""

    __slots__ = ("name", "type", "value")

    def __init__(self, name: str, metric_type: MetricType) -> None:
        self.name = name
        self.type = metric_type
        self.value = 0


# --------------------------------------------------------------------------------------------
# The compiled module
# --------------------------------------------------------------------------------------------


class FilterModule:
    """A Proxy-Wasm module compiled once and linked against the host functions."""

    def __init__(self, wasm: bytes, name: str = "filter") -> None:
        self.name = name
        try:
            self.module = wasmtime.Module(raw.engine(), wasm)
        except wasmtime.WasmtimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            raise FilterLoadError(f"{name}: not a valid WebAssembly module: {first}") from e
        exports = {e.name for e in self.module.exports}
        versions = [m for m in ABI_MARKERS if m in exports]
        if not versions:
            legacy = sorted(n for n in exports if n.startswith("proxy_abi_version_"))
            has = f" (it has {', '.join(legacy)})" if legacy else ""
            raise FilterLoadError(
                f"{name}: not a supported Proxy-Wasm filter: it exports neither "
                f"{' nor '.join(ABI_MARKERS)}{has}"
            )
        self.abi_version = versions[0].removeprefix("proxy_abi_version_").replace("_", ".")
        self.exports = frozenset(exports)
        if "memory" not in exports:
            raise FilterLoadError(f"{name}: the module does not export its memory as 'memory'")
        if "proxy_on_memory_allocate" not in exports and "malloc" not in exports:
            raise FilterLoadError(
                f"{name}: the module exports neither proxy_on_memory_allocate nor malloc"
            )
        self.unimplemented: list[str] = []
        linker = wasmtime.Linker(raw.engine())
        self._define_imports(linker)
        try:
            self.pre = linker.instantiate_pre(self.module)
        except wasmtime.WasmtimeError as e:
            raise FilterLoadError(f"{name}: cannot link the module: {e}") from e

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> FilterModule:
        """Read and compile a .wasm file; errors name the file."""
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise FilterLoadError(f"cannot read filter {p}: {e.strerror or e}") from e
        return cls(data, name=str(p))

    def _define_imports(self, linker: wasmtime.Linker) -> None:
        """Define every function the module imports: implemented ones, or named stubs."""
        for imp in self.module.imports:
            ty = imp.type
            if not isinstance(ty, wasmtime.FuncType):
                raise FilterLoadError(
                    f"{self.name}: imports {imp.module}.{imp.name}, which is not a function; "
                    "the host provides only functions"
                )
            key = (imp.module, imp.name or "")
            entry = HOSTCALLS.get(key)
            if entry is not None:
                sig, impl = entry
                want = raw.functype(*sig)
                if _sig(ty) != _sig(want):
                    raise FilterLoadError(
                        f"{self.name}: import {imp.module}.{imp.name} has type {_sig(ty)}, "
                        f"but the ABI defines {_sig(want)}"
                    )
                raw.define_host_function(linker, imp.module, imp.name or "", ty, impl, _active)
            else:
                self.unimplemented.append(f"{imp.module}.{imp.name}")
                raw.define_host_function(
                    linker, imp.module, imp.name or "", ty,
                    _unimplemented(imp.module, imp.name, ty), _active,
                )
        if self.unimplemented:
            logger.info(
                "%s: imports the host does not implement (they return Unimplemented or trap "
                "if called): %s", self.name, ", ".join(self.unimplemented),
            )


def _sig(ty: wasmtime.FuncType) -> str:
    params = ", ".join(str(p) for p in ty.params)
    results = ", ".join(str(r) for r in ty.results)
    return f"({params}) -> ({results})"


def _unimplemented(module: str, name: str | None, ty: wasmtime.FuncType) -> raw.HostImpl:
    """A stub for an import the host lacks: a status if the signature allows one, else a trap."""
    qualified = f"{module}.{name}"
    results = [str(r) for r in ty.results]
    warned: list[bool] = []

    def call(_vm: Vm, *_params: int) -> int | None:
        if not warned:
            warned.append(True)
            logger.warning("filter called %s, which this host does not implement", qualified)
        if results == ["i32"] and module == "env":
            return int(Status.UNIMPLEMENTED)
        if results == ["i32"] and module.startswith("wasi_"):
            return int(WasiErrno.NOSYS)
        raise raw.HostTrap(f"unimplemented import {qualified} was called")

    return call


# --------------------------------------------------------------------------------------------
# The VM
# --------------------------------------------------------------------------------------------


class Vm:
    """One instance of a `FilterModule` (one generation), with its contexts and state."""

    def __init__(self, module: FilterModule, host: Host, instance_id: str, generation: int) -> None:
        self.module = module
        self.host = host
        self.instance_id = instance_id
        self.generation = generation
        self.started_ns = host.clock.now_ns()
        self.deadline = raw.deadline_ticks(host.limits.deadline_ms)
        self.requests = 0
        self.outbound = 0
        self.broken: str | None = None
        self.closed = False
        self.tick_period_ns = 0
        self.next_tick_ns = 0
        self.tick_armed = False
        self.contexts: dict[int, StreamContext] = {}
        self.calls: dict[int, PendingCall] = {}
        self.metrics: dict[int, Metric] = {}
        self.metric_ids: dict[str, int] = {}
        self.effective = ROOT_CONTEXT_ID
        self.buffers: dict[int, bytes] = {}
        self.call_response: tuple[int, Pairs, Pairs] | None = None
        self._next_context = ROOT_CONTEXT_ID + 1
        self._next_call = 1
        self._next_metric = 1
        self._mem_size = 0
        previous = _active[0]
        _active[0] = self
        try:
            self.raw = raw.RawInstance(module.pre, host.limits.memory_bytes)
        except raw.GuestTrap as e:
            raise FilterStartError(f"instantiation trapped: {e}") from e
        except wasmtime.Trap as e:
            raise FilterStartError(f"instantiation trapped: {e.message}") from e
        except wasmtime.WasmtimeError as e:
            raise FilterStartError(f"cannot instantiate: {e}") from e
        finally:
            _active[0] = previous
        self._mem_size = self.raw.memory_size()
        exports = module.exports

        def f(name: str) -> Any:
            return self.raw.func(name) if name in exports else None

        self._alloc = f("proxy_on_memory_allocate") or f("malloc")
        self._on_context_create = f("proxy_on_context_create")
        self._on_request_headers = f("proxy_on_request_headers")
        self._on_response_headers = f("proxy_on_response_headers")
        self._on_http_call_response = f("proxy_on_http_call_response")
        self._on_tick = f("proxy_on_tick")
        self._on_done = f("proxy_on_done")
        self._on_log = f("proxy_on_log")
        self._on_delete = f("proxy_on_delete")
        self._start()

    # ---- lifecycle ---------------------------------------------------------------------------

    def _start(self) -> None:
        """Run the start functions and the root context's start callbacks."""
        f = self._export
        self.raw.arm(self.deadline * 10)  # start-up may legitimately take longer
        try:
            init = f("_initialize")
            if init is not None:
                self.call(init)
                main = f("main")
                if main is not None:
                    self.call(main, 0, 0)
            else:
                start = f("_start")
                if start is not None:
                    self.call(start)
            if self._on_context_create is not None:
                self.call(self._on_context_create, ROOT_CONTEXT_ID, 0)
            cfg = self.host.vm_configuration
            on_vm_start = f("proxy_on_vm_start")
            if on_vm_start is not None:
                self.buffers = {BufferType.VM_CONFIGURATION: cfg}
                ok = self.call(on_vm_start, ROOT_CONTEXT_ID, len(cfg))
                if not ok:
                    raise FilterStartError("proxy_on_vm_start returned false")
            cfg = self.host.plugin_configuration
            on_configure = f("proxy_on_configure")
            if on_configure is not None:
                self.buffers = {BufferType.PLUGIN_CONFIGURATION: cfg}
                ok = self.call(on_configure, ROOT_CONTEXT_ID, len(cfg))
                if not ok:
                    raise FilterStartError(
                        "proxy_on_configure returned false: the filter rejected its plugin "
                        "configuration (see its log above)"
                    )
        except raw.GuestTrap as e:
            self.close()
            raise FilterStartError(f"trapped while starting: {e}") from e
        except FilterStartError:
            self.close()
            raise
        finally:
            self.buffers = {}

    def _export(self, name: str) -> Any:
        return self.raw.func(name) if name in self.module.exports else None

    def close(self) -> None:
        """Drop the Store, freeing the linear memory. The Vm is unusable afterwards."""
        if not self.closed:
            self.closed = True
            self.contexts.clear()
            self.calls.clear()
            self.raw.close()

    @property
    def idle(self) -> bool:
        """No stream context is open and no outbound call is pending."""
        return not self.contexts and not self.calls

    def allocated_pages(self) -> int:
        """Linear memory in 64 KiB pages (the paper's allocated memory)."""
        return 0 if self.closed else self.raw.memory_pages()

    def metric_values(self) -> dict[str, int]:
        """The filter's metrics by name."""
        return {m.name: m.value for m in self.metrics.values()}

    # ---- guest calls -------------------------------------------------------------------------

    def call(self, func: Any, *params: int) -> int:
        """Call a guest export; raise `GuestTrap` on a trap.

        The deadline is the one the entry point armed: every method that enters the guest
        from outside (a request, a response, a tick, a call's answer) arms it first, so a
        looping filter is interrupted within `Limits.deadline_ms` of that entry.
        """
        # Guest calls never interleave across VMs (a host function only calls back into its
        # own VM), so the active slot needs no restoring afterwards.
        _active[0] = self
        return self.raw.call(func, *params)

    def new_context(self, stream: Any) -> StreamContext:
        """Create a stream context (calls `proxy_on_context_create`)."""
        ctx = StreamContext(self._next_context, stream)
        self._next_context += 1
        self.contexts[ctx.id] = ctx
        self.raw.arm(self.deadline)
        if self._on_context_create is not None:
            _active[0] = self
            self.raw.call2(self._on_context_create, ctx.id, ROOT_CONTEXT_ID)
        return ctx

    def on_request_headers(self, ctx: StreamContext, end_of_stream: bool) -> int:
        """Run `proxy_on_request_headers`; return the action (CONTINUE if not exported)."""
        self.requests += 1
        if self._on_request_headers is None:
            return int(Action.CONTINUE)
        self.effective = ctx.id
        _active[0] = self
        try:
            return self.raw.call3(
                self._on_request_headers, ctx.id, len(ctx.request_headers), int(end_of_stream)
            )
        finally:
            self.effective = ROOT_CONTEXT_ID

    def on_response_headers(self, ctx: StreamContext, end_of_stream: bool) -> int:
        """Run `proxy_on_response_headers` if exported; return the action."""
        if self._on_response_headers is None:
            return int(Action.CONTINUE)
        self.raw.arm(self.deadline)
        self.effective = ctx.id
        try:
            return self.call(
                self._on_response_headers, ctx.id, len(ctx.response_headers), int(end_of_stream)
            )
        finally:
            self.effective = ROOT_CONTEXT_ID

    def finish_context(self, ctx: StreamContext) -> None:
        """`proxy_on_done`, then (unless the guest defers with false) log and delete."""
        self.effective = ctx.id
        self.raw.arm(self.deadline)
        _active[0] = self
        try:
            done = 1 if self._on_done is None else self.raw.call1(self._on_done, ctx.id)
            if done:
                self._delete_context(ctx)
            else:
                ctx.done_pending = True
        finally:
            self.effective = ROOT_CONTEXT_ID

    def _delete_context(self, ctx: StreamContext) -> None:
        try:
            _active[0] = self
            if self._on_log is not None:
                self.raw.call1(self._on_log, ctx.id)
            if self._on_delete is not None:
                self.raw.call1(self._on_delete, ctx.id)
        finally:
            self.contexts.pop(ctx.id, None)
            for call_id in ctx.calls:
                self.calls.pop(call_id, None)

    def on_http_call_response(
        self, call: PendingCall, status: int, headers: Pairs, body: bytes, trailers: Pairs
    ) -> None:
        """Deliver an outbound call's response (`headers=[]` means the call failed)."""
        if self._on_http_call_response is None:
            return
        self.buffers = {BufferType.HTTP_CALL_RESPONSE_BODY: body}
        self.call_response = (status, headers, trailers)
        self.effective = ROOT_CONTEXT_ID
        self.raw.arm(self.deadline)
        try:
            self.call(
                self._on_http_call_response, ROOT_CONTEXT_ID, call.id, len(headers), len(body),
                len(trailers),
            )
        finally:
            self.buffers = {}
            self.call_response = None
            self.effective = ROOT_CONTEXT_ID

    def on_tick(self) -> None:
        """Run `proxy_on_tick` on the root context."""
        if self._on_tick is not None:
            self.raw.arm(self.deadline)
            self.call(self._on_tick, ROOT_CONTEXT_ID)

    # ---- linear memory -----------------------------------------------------------------------

    def _in_bounds(self, ptr: int, size: int) -> bool:
        end = ptr + size
        if end <= self._mem_size:
            return True
        self._mem_size = self.raw.memory_size()  # memory only grows: refresh and retry
        return end <= self._mem_size

    def read(self, ptr: int, size: int) -> bytes | None:
        """Read guest memory; None if [ptr, ptr+size) is out of bounds."""
        if not self._in_bounds(ptr, size):
            return None
        return _string_at(self.raw.base + ptr, size) if size else b""

    def write(self, ptr: int, data: bytes) -> bool:
        """Write guest memory; False if out of bounds."""
        if not self._in_bounds(ptr, len(data)):
            return False
        _memmove(self.raw.base + ptr, data, len(data))
        return True

    def write_u32(self, ptr: int, value: int) -> bool:
        """Write a little-endian u32; False if out of bounds."""
        if not self._in_bounds(ptr, 4):
            return False
        _u32_at(self.raw.base + ptr).value = value & M32
        return True

    def write_u64(self, ptr: int, value: int) -> bool:
        """Write a little-endian u64; False if out of bounds."""
        if not self._in_bounds(ptr, 8):
            return False
        _u64_at(self.raw.base + ptr).value = value & 0xFFFFFFFFFFFFFFFF
        return True

    def return_bytes(self, data: bytes, ptr_ptr: int, size_ptr: int) -> int:
        """Copy `data` into guest-allocated memory and write its address and size.

        Empty data writes a null pointer and size 0 without allocating.
        Returns a `Status` value.
        """
        if not (self._in_bounds(ptr_ptr, 4) and self._in_bounds(size_ptr, 4)):
            return Status.INVALID_MEMORY_ACCESS
        addr = 0
        size = len(data)
        if size:
            addr = self.raw.call1(self._alloc, size) & M32
            if addr == 0 or not self._in_bounds(addr, size):
                return Status.INVALID_MEMORY_ACCESS
            _memmove(self.raw.base + addr, data, size)
        base = self.raw.base  # both out-parameters were bounds-checked above
        _u32_at(base + ptr_ptr).value = addr
        _u32_at(base + size_ptr).value = size
        return Status.OK

    def _read_str(self, ptr: int, size: int) -> str | None:
        data = self.read(ptr, size)
        return None if data is None else data.decode("utf-8", "replace")

    # ---- header maps -------------------------------------------------------------------------

    def _map(self, map_type: int) -> Pairs | None:
        """The header map `map_type` as visible from the effective context, or None."""
        if map_type in (MapType.HTTP_CALL_RESPONSE_HEADERS, MapType.HTTP_CALL_RESPONSE_TRAILERS):
            if self.call_response is None:
                return None
            _, headers, trailers = self.call_response
            return headers if map_type == MapType.HTTP_CALL_RESPONSE_HEADERS else trailers
        ctx = self.contexts.get(self.effective)
        if ctx is None:
            return None
        if map_type == MapType.HTTP_REQUEST_HEADERS:
            return ctx.request_headers
        if map_type == MapType.HTTP_RESPONSE_HEADERS:
            return ctx.response_headers
        if map_type == MapType.HTTP_REQUEST_TRAILERS:
            return ctx.request_trailers
        if map_type == MapType.HTTP_RESPONSE_TRAILERS:
            return ctx.response_trailers
        return None

    def _set_map(self, map_type: int, pairs: Pairs) -> bool:
        ctx = self.contexts.get(self.effective)
        if ctx is None:
            return False
        ctx.modified = True
        if map_type == MapType.HTTP_REQUEST_HEADERS:
            ctx.request_headers = pairs
        elif map_type == MapType.HTTP_RESPONSE_HEADERS:
            ctx.response_headers = pairs
        elif map_type == MapType.HTTP_REQUEST_TRAILERS:
            ctx.request_trailers = pairs
        elif map_type == MapType.HTTP_RESPONSE_TRAILERS:
            ctx.response_trailers = pairs
        else:
            return False
        return True

    # ============================================================================================
    # Host functions. Parameters arrive as ints: i32 unsigned (pointers, sizes, ids), i64
    # signed. Each returns a `Status` (or a WASI errno for wasi_snapshot_preview1 functions).
    # ============================================================================================

    # ---- logging, time, ticks ----

    def hc_proxy_log(self, level: int, ptr: int, size: int) -> int:
        if level not in _PY_LEVEL:
            return Status.BAD_ARGUMENT
        if not self._in_bounds(ptr, size):
            return Status.INVALID_MEMORY_ACCESS
        py_level = _PY_LEVEL[LogLevel(level)]
        if guest_logger.isEnabledFor(py_level):
            data = self.read(ptr, min(size, MAX_LOG_MESSAGE)) or b""
            guest_logger.log(
                py_level, "[%s gen %d] %s", self.instance_id, self.generation,
                data.decode("utf-8", "replace"),
            )
        return Status.OK

    def hc_proxy_get_log_level(self, ret_level: int) -> int:
        level = guest_logger.getEffectiveLevel()
        abi_level = (
            LogLevel.DEBUG if level <= logging.DEBUG else LogLevel.INFO if level <= logging.INFO
            else LogLevel.WARN if level <= logging.WARNING
            else LogLevel.ERROR if level <= logging.ERROR else LogLevel.CRITICAL
        )
        return Status.OK if self.write_u32(ret_level, abi_level) else BAD_MEMORY

    def hc_proxy_get_current_time_nanoseconds(self, ret_time: int) -> int:
        return Status.OK if self.write_u64(ret_time, self.host.clock.now_ns()) else BAD_MEMORY

    def hc_proxy_set_tick_period_milliseconds(self, period_ms: int) -> int:
        self.tick_period_ns = period_ms * 1_000_000
        self.next_tick_ns = self.host.clock.now_ns() + self.tick_period_ns if period_ms else 0
        self.host.schedule_changed()
        return Status.OK

    # ---- buffers ----

    def hc_proxy_get_buffer_bytes(
        self, buf: int, start: int, max_size: int, ret_ptr: int, ret_size: int
    ) -> int:
        if buf not in _BUFFER_TYPES:
            return Status.BAD_ARGUMENT
        data = self.buffers.get(buf)
        if data is None:
            return Status.NOT_FOUND
        if start > len(data):
            return Status.BAD_ARGUMENT
        return self.return_bytes(data[start : start + max_size], ret_ptr, ret_size)

    def hc_proxy_get_buffer_status(self, buf: int, ret_size: int, ret_flags: int) -> int:
        if buf not in _BUFFER_TYPES:
            return Status.BAD_ARGUMENT
        data = self.buffers.get(buf)
        if data is None:
            return Status.NOT_FOUND
        if not (self.write_u32(ret_size, len(data)) and self.write_u32(ret_flags, 0)):
            return BAD_MEMORY
        return Status.OK

    def hc_proxy_set_buffer_bytes(
        self, buf: int, start: int, size: int, value_ptr: int, value_size: int
    ) -> int:
        if buf not in _BUFFER_TYPES:
            return Status.BAD_ARGUMENT
        data = self.buffers.get(buf)
        if data is None:
            return Status.NOT_FOUND
        value = self.read(value_ptr, value_size)
        if value is None:
            return BAD_MEMORY
        start = min(start, len(data))
        self.buffers[buf] = data[:start] + value + data[start + size :]
        return Status.OK

    # ---- header maps ----

    def hc_proxy_get_header_map_pairs(self, map_type: int, ret_ptr: int, ret_size: int) -> int:
        if map_type not in _MAP_TYPES:
            return Status.BAD_ARGUMENT
        pairs = self._map(map_type)
        if pairs is None:
            return Status.NOT_FOUND
        return self.return_bytes(serialize_map(pairs), ret_ptr, ret_size)

    def hc_proxy_get_header_map_size(self, map_type: int, ret_size: int) -> int:
        if map_type not in _MAP_TYPES:
            return Status.BAD_ARGUMENT
        pairs = self._map(map_type)
        if pairs is None:
            return Status.NOT_FOUND
        return Status.OK if self.write_u32(ret_size, len(serialize_map(pairs))) else BAD_MEMORY

    def hc_proxy_set_header_map_pairs(self, map_type: int, ptr: int, size: int) -> int:
        if map_type not in _MAP_TYPES:
            return Status.BAD_ARGUMENT
        data = self.read(ptr, size)
        if data is None:
            return BAD_MEMORY
        try:
            pairs = [(k.lower(), v) for k, v in deserialize_map(data)]
        except MapFormatError as e:
            guest_logger.warning("[%s] proxy_set_header_map_pairs: %s", self.instance_id, e)
            return Status.BAD_ARGUMENT
        return Status.OK if self._set_map(map_type, pairs) else Status.NOT_FOUND

    def hc_proxy_get_header_map_value(
        self, map_type: int, key_ptr: int, key_size: int, ret_ptr: int, ret_size: int
    ) -> int:
        if map_type not in _MAP_TYPES:
            return Status.BAD_ARGUMENT
        key = self.read(key_ptr, key_size)
        if key is None:
            return BAD_MEMORY
        pairs = self._map(map_type)
        if pairs is None:
            return Status.NOT_FOUND
        key = key.lower()
        for k, v in pairs:
            if k == key:
                return self.return_bytes(v, ret_ptr, ret_size)
        return Status.NOT_FOUND

    def _edit_map(self, map_type: int, key_ptr: int, key_size: int, value: bytes | None,
                  mode: str) -> int:
        if map_type not in _MAP_TYPES:
            return Status.BAD_ARGUMENT
        key = self.read(key_ptr, key_size)
        if key is None or value is None:
            return BAD_MEMORY
        pairs = self._map(map_type)
        if pairs is None or map_type >= MapType.GRPC_CALL_INITIAL_METADATA:
            return Status.NOT_FOUND
        key = key.lower()
        if mode == "add":
            new = [*pairs, (key, value)]
        else:
            new = [(k, v) for k, v in pairs if k != key]
            if mode == "replace":
                new.append((key, value))
        self._set_map(map_type, new)
        return Status.OK

    def hc_proxy_add_header_map_value(
        self, map_type: int, key_ptr: int, key_size: int, value_ptr: int, value_size: int
    ) -> int:
        return self._edit_map(map_type, key_ptr, key_size, self.read(value_ptr, value_size), "add")

    def hc_proxy_replace_header_map_value(
        self, map_type: int, key_ptr: int, key_size: int, value_ptr: int, value_size: int
    ) -> int:
        value = self.read(value_ptr, value_size)
        return self._edit_map(map_type, key_ptr, key_size, value, "replace")

    def hc_proxy_remove_header_map_value(self, map_type: int, key_ptr: int, key_size: int) -> int:
        return self._edit_map(map_type, key_ptr, key_size, b"", "remove")

    # ---- streams ----

    def hc_proxy_continue_stream(self, stream_type: int) -> int:
        if stream_type not in _STREAM_TYPES:
            return Status.BAD_ARGUMENT
        if stream_type not in (StreamType.HTTP_REQUEST, StreamType.HTTP_RESPONSE):
            return Status.UNIMPLEMENTED
        ctx = self.contexts.get(self.effective)
        if ctx is None:
            return Status.NOT_FOUND
        ctx.resumed = True
        return Status.OK

    def hc_proxy_continue_request(self) -> int:
        return self.hc_proxy_continue_stream(StreamType.HTTP_REQUEST)

    def hc_proxy_continue_response(self) -> int:
        return self.hc_proxy_continue_stream(StreamType.HTTP_RESPONSE)

    def hc_proxy_close_stream(self, stream_type: int) -> int:
        if stream_type not in _STREAM_TYPES:
            return Status.BAD_ARGUMENT
        ctx = self.contexts.get(self.effective)
        if ctx is None:
            return Status.NOT_FOUND
        ctx.closed = True
        return Status.OK

    def hc_proxy_send_local_response(
        self, status: int, details_ptr: int, details_size: int, body_ptr: int, body_size: int,
        headers_ptr: int, headers_size: int, _grpc_status: int,
    ) -> int:
        details = self.read(details_ptr, details_size)
        body = self.read(body_ptr, body_size)
        headers_raw = self.read(headers_ptr, headers_size)
        if details is None or body is None or headers_raw is None:
            return BAD_MEMORY
        try:
            headers = [(k.lower(), v) for k, v in deserialize_map(headers_raw)]
        except MapFormatError as e:
            guest_logger.warning("[%s] proxy_send_local_response: %s", self.instance_id, e)
            return Status.BAD_ARGUMENT
        if not 100 <= status <= 999:
            return Status.BAD_ARGUMENT
        ctx = self.contexts.get(self.effective)
        if ctx is None:
            return Status.NOT_FOUND
        ctx.local_response = LocalResponse(
            status, body, headers, details.decode("utf-8", "replace")
        )
        return Status.OK

    def hc_proxy_set_effective_context(self, context_id: int) -> int:
        if context_id != ROOT_CONTEXT_ID and context_id not in self.contexts:
            return Status.BAD_ARGUMENT
        self.effective = context_id
        return Status.OK

    def hc_proxy_done(self) -> int:
        ctx = self.contexts.get(self.effective)
        if ctx is None or not ctx.done_pending:
            return Status.NOT_FOUND
        self._delete_context(ctx)
        self.host.context_released(self)
        return Status.OK

    # ---- outbound HTTP calls ----

    def hc_proxy_http_call(
        self, upstream_ptr: int, upstream_size: int, headers_ptr: int, headers_size: int,
        body_ptr: int, body_size: int, trailers_ptr: int, trailers_size: int, timeout_ms: int,
        ret_call_id: int,
    ) -> int:
        upstream = self.read(upstream_ptr, upstream_size)
        headers_raw = self.read(headers_ptr, headers_size)
        body = self.read(body_ptr, body_size)
        trailers_raw = self.read(trailers_ptr, trailers_size)
        if upstream is None or headers_raw is None or body is None or trailers_raw is None:
            return BAD_MEMORY
        if not self._in_bounds(ret_call_id, 4):
            return BAD_MEMORY
        try:
            headers = deserialize_map(headers_raw)
            trailers = deserialize_map(trailers_raw)
        except MapFormatError as e:
            guest_logger.warning("[%s] proxy_http_call: %s", self.instance_id, e)
            return Status.BAD_ARGUMENT
        cluster = upstream.decode("utf-8", "replace")
        names = {k.lower() for k, _ in headers}
        if not {b":authority", b":method", b":path"} <= names:
            return Status.BAD_ARGUMENT
        if not self.host.dispatcher.has_cluster(cluster):
            guest_logger.warning(
                "[%s] proxy_http_call to unknown cluster %r", self.instance_id, cluster
            )
            return Status.BAD_ARGUMENT
        call_id = self._next_call
        self._next_call += 1
        now = self.host.clock.now_ns()
        path = next((v for k, v in headers if k.lower() == b":path"), b"").decode("latin-1")
        call = PendingCall(
            call_id, self.effective, cluster, path, now, now + max(timeout_ms, 1) * 1_000_000
        )
        if not self.host.start_call(self, call, headers, body, trailers):
            return Status.INTERNAL_FAILURE
        self.calls[call_id] = call
        self.outbound += 1
        ctx = self.contexts.get(self.effective)
        if ctx is not None:
            ctx.calls.add(call_id)
            ctx.outbound += 1
        self.write_u32(ret_call_id, call_id)
        return Status.OK

    def hc_proxy_get_status(self, ret_code: int, ret_ptr: int, ret_size: int) -> int:
        if self.call_response is None:
            return Status.NOT_FOUND
        if not self.write_u32(ret_code, self.call_response[0]):
            return BAD_MEMORY
        message = b"" if self.call_response[1] else b"call failed"
        return self.return_bytes(message, ret_ptr, ret_size)

    # ---- metrics ----

    def hc_proxy_define_metric(
        self, metric_type: int, name_ptr: int, name_size: int, ret_id: int
    ) -> int:
        if metric_type not in _METRIC_TYPES:
            return Status.BAD_ARGUMENT
        name = self._read_str(name_ptr, name_size)
        if name is None or not self._in_bounds(ret_id, 4):
            return BAD_MEMORY
        metric_id = self.metric_ids.get(name)
        if metric_id is None:
            metric_id = self._next_metric
            self._next_metric += 1
            self.metric_ids[name] = metric_id
            self.metrics[metric_id] = Metric(name, MetricType(metric_type))
        self.write_u32(ret_id, metric_id)
        return Status.OK

    def hc_proxy_increment_metric(self, metric_id: int, delta: int) -> int:
        metric = self.metrics.get(metric_id)
        if metric is None:
            return Status.NOT_FOUND
        if metric.type == MetricType.COUNTER and delta < 0:
            return Status.BAD_ARGUMENT
        metric.value += delta
        return Status.OK

    def hc_proxy_record_metric(self, metric_id: int, value: int) -> int:
        metric = self.metrics.get(metric_id)
        if metric is None:
            return Status.NOT_FOUND
        metric.value = value & 0xFFFFFFFFFFFFFFFF  # the ABI's value is a u64
        return Status.OK

    def hc_proxy_get_metric(self, metric_id: int, ret_value: int) -> int:
        metric = self.metrics.get(metric_id)
        if metric is None:
            return Status.NOT_FOUND
        return Status.OK if self.write_u64(ret_value, metric.value) else BAD_MEMORY

    # ---- shared data (shared by every instance of this host; survives restarts) ----

    def hc_proxy_set_shared_data(
        self, key_ptr: int, key_size: int, value_ptr: int, value_size: int, cas: int
    ) -> int:
        key = self.read(key_ptr, key_size)
        value = self.read(value_ptr, value_size)
        if key is None or value is None:
            return BAD_MEMORY
        shared = self.host.shared_data
        current = shared.get(key)
        if cas and current is not None and current[1] != cas:
            return Status.CAS_MISMATCH
        next_cas = ((current[1] + 1) & M32 or 1) if current else 1
        shared[key] = (value, next_cas)
        return Status.OK

    def hc_proxy_get_shared_data(
        self, key_ptr: int, key_size: int, ret_ptr: int, ret_size: int, ret_cas: int
    ) -> int:
        key = self.read(key_ptr, key_size)
        if key is None or not self._in_bounds(ret_cas, 4):
            return BAD_MEMORY
        entry = self.host.shared_data.get(key)
        if entry is None:
            return Status.NOT_FOUND
        status = self.return_bytes(entry[0], ret_ptr, ret_size)
        if status == Status.OK:
            self.write_u32(ret_cas, entry[1])
        return status

    # ---- properties ----

    def hc_proxy_get_property(self, path_ptr: int, path_size: int, ret_ptr: int,
                              ret_size: int) -> int:
        path = self.read(path_ptr, path_size)
        if path is None:
            return BAD_MEMORY
        value = self._property(tuple(p for p in path.split(b"\0") if p))
        if value is None:
            return Status.NOT_FOUND
        return self.return_bytes(value, ret_ptr, ret_size)

    def _property(self, path: tuple[bytes, ...]) -> bytes | None:
        """The cheap properties: plugin identity and the effective stream's request line."""
        plugin = {
            (b"plugin_name",): self.host.plugin_name.encode(),
            (b"plugin_root_id",): self.host.plugin_name.encode(),
            (b"plugin_vm_id",): self.instance_id.encode(),
        }
        if path in plugin:
            return plugin[path]
        ctx = self.contexts.get(self.effective)
        if ctx is None or len(path) != 2 or path[0] != b"request":
            return None
        header = {b"path": b":path", b"method": b":method", b"host": b":authority",
                  b"scheme": b":scheme"}.get(path[1])
        if header is None:
            return None
        return next((v for k, v in ctx.request_headers if k == header), None)

    # ---- unimplemented by design: a status, never a crash ----

    def hc_unimplemented(self, *_params: int) -> int:
        return Status.UNIMPLEMENTED

    def hc_not_found(self, *_params: int) -> int:
        return Status.NOT_FOUND

    # ---- WASI preview1 ----

    def hc_fd_write(self, fd: int, iovs: int, iovs_len: int, ret_written: int) -> int:
        if fd not in (1, 2):
            return WasiErrno.BADF
        vec = self.read(iovs, 8 * iovs_len)
        if vec is None or not self._in_bounds(ret_written, 4):
            return WasiErrno.FAULT
        chunks = []
        for i in range(iovs_len):
            ptr, size = struct.unpack_from("<II", vec, 8 * i)
            chunk = self.read(ptr, size)
            if chunk is None:
                return WasiErrno.FAULT
            chunks.append(chunk)
        data = b"".join(chunks)
        level = logging.INFO if fd == 1 else logging.ERROR
        text = data[:MAX_LOG_MESSAGE].decode("utf-8", "replace").rstrip("\n")
        if text:
            guest_logger.log(level, "[%s gen %d] %s", self.instance_id, self.generation, text)
        self.write_u32(ret_written, len(data))
        return WasiErrno.SUCCESS

    def hc_clock_time_get(self, clock_id: int, _precision: int, ret_time: int) -> int:
        if clock_id not in (0, 1):
            return WasiErrno.NOTSUP
        ok = self.write_u64(ret_time, self.host.clock.now_ns())
        return WasiErrno.SUCCESS if ok else WasiErrno.FAULT

    def hc_random_get(self, ptr: int, size: int) -> int:
        if size > MAX_RANDOM_BYTES:
            return WasiErrno.INVAL
        ok = self.write(ptr, self.host.random_bytes(size))
        return WasiErrno.SUCCESS if ok else WasiErrno.FAULT

    def hc_zero_sizes(self, ret_count: int, ret_size: int) -> int:
        """environ_sizes_get / args_sizes_get: no variables, no arguments."""
        ok = self.write_u32(ret_count, 0) and self.write_u32(ret_size, 0)
        return WasiErrno.SUCCESS if ok else WasiErrno.FAULT

    def hc_empty_get(self, _array: int, _buffer: int) -> int:
        """environ_get / args_get after zero sizes: nothing to write."""
        return WasiErrno.SUCCESS

    def hc_proc_exit(self, code: int) -> None:
        raise raw.HostTrap(f"the filter called proc_exit({code})")

    def hc_sched_yield(self) -> int:
        return WasiErrno.SUCCESS


# (module, name) -> ((params, results), implementation). Signatures: i = i32, I = i64.
HOSTCALLS: dict[tuple[str, str], tuple[tuple[str, str], Callable[..., int | None]]] = {
    ("env", "proxy_log"): (("iii", "i"), Vm.hc_proxy_log),
    ("env", "proxy_get_log_level"): (("i", "i"), Vm.hc_proxy_get_log_level),
    ("env", "proxy_get_current_time_nanoseconds"): (
        ("i", "i"), Vm.hc_proxy_get_current_time_nanoseconds),
    ("env", "proxy_set_tick_period_milliseconds"): (
        ("i", "i"), Vm.hc_proxy_set_tick_period_milliseconds),
    ("env", "proxy_get_buffer_bytes"): (("iiiii", "i"), Vm.hc_proxy_get_buffer_bytes),
    ("env", "proxy_get_buffer_status"): (("iii", "i"), Vm.hc_proxy_get_buffer_status),
    ("env", "proxy_set_buffer_bytes"): (("iiiii", "i"), Vm.hc_proxy_set_buffer_bytes),
    ("env", "proxy_get_header_map_pairs"): (("iii", "i"), Vm.hc_proxy_get_header_map_pairs),
    ("env", "proxy_get_header_map_size"): (("ii", "i"), Vm.hc_proxy_get_header_map_size),
    ("env", "proxy_set_header_map_pairs"): (("iii", "i"), Vm.hc_proxy_set_header_map_pairs),
    ("env", "proxy_get_header_map_value"): (("iiiii", "i"), Vm.hc_proxy_get_header_map_value),
    ("env", "proxy_add_header_map_value"): (("iiiii", "i"), Vm.hc_proxy_add_header_map_value),
    ("env", "proxy_replace_header_map_value"): (
        ("iiiii", "i"), Vm.hc_proxy_replace_header_map_value),
    ("env", "proxy_remove_header_map_value"): (("iii", "i"), Vm.hc_proxy_remove_header_map_value),
    ("env", "proxy_continue_stream"): (("i", "i"), Vm.hc_proxy_continue_stream),
    ("env", "proxy_continue_request"): (("", "i"), Vm.hc_proxy_continue_request),
    ("env", "proxy_continue_response"): (("", "i"), Vm.hc_proxy_continue_response),
    ("env", "proxy_close_stream"): (("i", "i"), Vm.hc_proxy_close_stream),
    ("env", "proxy_send_local_response"): (("iiiiiiii", "i"), Vm.hc_proxy_send_local_response),
    ("env", "proxy_http_call"): (("iiiiiiiiii", "i"), Vm.hc_proxy_http_call),
    ("env", "proxy_get_status"): (("iii", "i"), Vm.hc_proxy_get_status),
    ("env", "proxy_set_effective_context"): (("i", "i"), Vm.hc_proxy_set_effective_context),
    ("env", "proxy_done"): (("", "i"), Vm.hc_proxy_done),
    ("env", "proxy_define_metric"): (("iiii", "i"), Vm.hc_proxy_define_metric),
    ("env", "proxy_increment_metric"): (("iI", "i"), Vm.hc_proxy_increment_metric),
    ("env", "proxy_record_metric"): (("iI", "i"), Vm.hc_proxy_record_metric),
    ("env", "proxy_get_metric"): (("ii", "i"), Vm.hc_proxy_get_metric),
    ("env", "proxy_set_shared_data"): (("iiiii", "i"), Vm.hc_proxy_set_shared_data),
    ("env", "proxy_get_shared_data"): (("iiiii", "i"), Vm.hc_proxy_get_shared_data),
    ("env", "proxy_get_property"): (("iiii", "i"), Vm.hc_proxy_get_property),
    ("env", "proxy_set_property"): (("iiii", "i"), Vm.hc_unimplemented),
    ("env", "proxy_register_shared_queue"): (("iii", "i"), Vm.hc_unimplemented),
    ("env", "proxy_resolve_shared_queue"): (("iiiii", "i"), Vm.hc_unimplemented),
    ("env", "proxy_enqueue_shared_queue"): (("iii", "i"), Vm.hc_unimplemented),
    ("env", "proxy_dequeue_shared_queue"): (("iii", "i"), Vm.hc_unimplemented),
    ("env", "proxy_grpc_call"): (("iiiiiiiiiiii", "i"), Vm.hc_unimplemented),
    ("env", "proxy_grpc_stream"): (("iiiiiiiii", "i"), Vm.hc_unimplemented),
    ("env", "proxy_grpc_send"): (("iiii", "i"), Vm.hc_unimplemented),
    ("env", "proxy_grpc_cancel"): (("i", "i"), Vm.hc_unimplemented),
    ("env", "proxy_grpc_close"): (("i", "i"), Vm.hc_unimplemented),
    ("env", "proxy_call_foreign_function"): (("iiiiii", "i"), Vm.hc_not_found),
    ("wasi_snapshot_preview1", "fd_write"): (("iiii", "i"), Vm.hc_fd_write),
    ("wasi_snapshot_preview1", "clock_time_get"): (("iIi", "i"), Vm.hc_clock_time_get),
    ("wasi_snapshot_preview1", "random_get"): (("ii", "i"), Vm.hc_random_get),
    ("wasi_snapshot_preview1", "environ_sizes_get"): (("ii", "i"), Vm.hc_zero_sizes),
    ("wasi_snapshot_preview1", "environ_get"): (("ii", "i"), Vm.hc_empty_get),
    ("wasi_snapshot_preview1", "args_sizes_get"): (("ii", "i"), Vm.hc_zero_sizes),
    ("wasi_snapshot_preview1", "args_get"): (("ii", "i"), Vm.hc_empty_get),
    ("wasi_snapshot_preview1", "proc_exit"): (("i", ""), Vm.hc_proc_exit),
    ("wasi_snapshot_preview1", "sched_yield"): (("", "i"), Vm.hc_sched_yield),
}
