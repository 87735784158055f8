"""One Proxy-Wasm VM (cpp-host's wasm.cc): a linked module instantiated in its own Store.

`Vm` is one instance of a filter module (one *generation* of a filter instance): its Store and
linear memory, its root context (tick period, metrics, outbound calls) and its stream contexts,
and the entry points that call into the guest (`proxy_on_*`). A restart is a new `Vm`;
dropping the old one frees its linear memory.

Every pointer and length the guest passes is bounds-checked against the current memory size
before anything is read or written (`read`, `write`, `return_bytes`); the host calls in
`exports.py` use nothing else. Host functions run on the thread that called into the guest; the
active `Vm` is the one in `ACTIVE[0]` (calls are synchronous, so there is only ever one).

The VM sees its embedder through `HostServices` (clock, limits, plugin configuration, shared
data, start an outbound call, a context released, the tick schedule changed), never the whole
`Host`, so no two modules import each other.
"""

from __future__ import annotations

import struct
from collections.abc import Callable
from typing import Any, Protocol

import wasmtime

from . import _wasmtime as raw
from .abi import Action, BufferType, MapType, Status
from .clock import Clock
from .context import (
    REQUEST_BODY_DIRTY,
    RESPONSE_BODY_DIRTY,
    ROOT_CONTEXT_ID,
    Metric,
    PendingCall,
    StreamContext,
)
from .headers import Pairs
from .limits import Limits
from .properties import Path, plugin_properties
from .refetch import RefetchIntervals
from .shared import SharedQueues

M32 = 0xFFFFFFFF

_pack_u32 = struct.Struct("<I").pack_into
_pack_u64 = struct.Struct("<Q").pack_into
_NO_MEMORY = memoryview(b"")
_REQUEST_HEADERS, _REQUEST_TRAILERS, _RESPONSE_HEADERS, _RESPONSE_TRAILERS = (
    int(MapType.HTTP_REQUEST_HEADERS), int(MapType.HTTP_REQUEST_TRAILERS),
    int(MapType.HTTP_RESPONSE_HEADERS), int(MapType.HTTP_RESPONSE_TRAILERS))
_CALL_RESPONSE_HEADERS, _CALL_RESPONSE_TRAILERS = (
    int(MapType.HTTP_CALL_RESPONSE_HEADERS), int(MapType.HTTP_CALL_RESPONSE_TRAILERS))
# Plain ints for the enum members used on every request (an enum member costs a class
# attribute lookup through EnumType on each use; the guest sees the same i32).
_REQUEST_BODY, _RESPONSE_BODY, _CALL_RESPONSE_BODY = (
    int(BufferType.HTTP_REQUEST_BODY), int(BufferType.HTTP_RESPONSE_BODY),
    int(BufferType.HTTP_CALL_RESPONSE_BODY))
_OK, _BAD_MEMORY = int(Status.OK), int(Status.INVALID_MEMORY_ACCESS)
_CONTINUE = int(Action.CONTINUE)

# The Vm whose guest code is running (host functions need it); calls never interleave.
ACTIVE: list[Vm | None] = [None]
_active = ACTIVE


class FilterStartError(Exception):
    """A filter instance could not start (trap, or a start callback returned false)."""


class LinkedModule(Protocol):
    """What a VM needs of its compiled and linked module (`module.FilterModule`)."""

    name: str
    pre: wasmtime.InstancePre
    exports: frozenset[str]
    abi_version: str
    main_params: int
    """How many parameters the module's `main` takes (0 or 2; called after `_initialize`)."""


class HostServices(Protocol):
    """What a VM needs of its embedder (the `Host`): the small interface cpp-host's
    `ContextBase` gives its exports."""

    clock: Clock
    limits: Limits
    plugin_name: str
    root_id: str
    vm_id: str
    plugin_configuration: bytes
    vm_configuration: bytes
    shared_data: dict[bytes, tuple[bytes, int]]
    shared_queues: SharedQueues

    def random_bytes(self, n: int) -> bytes:
        """Randomness for WASI `random_get`."""
        ...

    def start_call(
        self, vm: Vm, call: PendingCall, headers: Pairs, body: bytes, trailers: Pairs
    ) -> int:
        """Hand an outbound call to the dispatcher; return a `Status` (OK once started)."""
        ...

    def context_released(self, vm: Vm) -> None:
        """A stream context or call of `vm` ended."""
        ...

    def queue_ready(self, queue_id: int) -> None:
        """Something was enqueued: tell the queue's VMs (`proxy_on_queue_ready`), later."""
        ...

    def schedule_changed(self) -> None:
        """A tick period changed: re-arm the timers."""
        ...


# --------------------------------------------------------------------------------------------
# The VM
# --------------------------------------------------------------------------------------------


class Vm:
    """One instance of a `FilterModule` (one generation), with its contexts and state."""

    def __init__(
        self, module: LinkedModule, host: HostServices, instance_id: str, generation: int
    ) -> None:
        self.module = module
        self.native: tuple[int, int, int, Callable[[Vm, int], Pairs | None],
                           Callable[[], int]] | None
        self.native = None
        """What the C forms of two host calls read (fastcall.c): the store's context and memory
        addresses, the guest allocator's address (0: none), the class's `header_map` (called
        with the VM), and the clock of the host the VM serves now (`host`). None until the
        instance is made, and without `_fastcall`."""
        self._host = host
        self.instance_id = instance_id
        self.generation = generation
        self.started_ns = host.clock.now_ns()
        self.deadline = raw.deadline_budget_ns(host.limits.deadline_ms)
        self.requests = 0
        self.outbound = 0
        self.refetch = RefetchIntervals()
        """When this generation repeats an identical outbound call (its cache's TTL, seen)."""
        self.broken: str | None = None
        self.closed = False
        self.wasi_time_floor_ns = 0
        """WASI clocks read at least this: where a skipped sleep (`poll_oneoff`) woke."""
        self.starting = True
        """Start-up callbacks run: the guest's errors are logged as warnings, so that a filter
        that complains while starting does not stop mitmproxy's start (its ErrorCheck)."""
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
        self.properties: dict[Path, bytes] = {}
        """Filter state the root context set with `proxy_set_property`."""
        self.plugin_properties = plugin_properties(host.plugin_name, host.root_id, host.vm_id)
        self._next_context = ROOT_CONTEXT_ID + 1
        self.next_call_id = 1
        self.next_metric_id = 1
        self._mem_size = 0
        self._mem = _NO_MEMORY
        """Linear memory [0, `_mem_size`) as a buffer: reads and writes go through it after
        their bounds check, and it is replaced when the memory has grown (`_grown`)."""
        previous = _active[0]
        _active[0] = self
        try:
            self.raw = raw.RawInstance(module.pre, host.limits.memory_bytes)
        except raw.GuestTrap as e:
            raise FilterStartError(f"instantiation trapped: {raw.summarize(str(e))}") from e
        except wasmtime.Trap as e:
            raise FilterStartError(f"instantiation trapped: {raw.summarize(e.message)}") from e
        except wasmtime.WasmtimeError as e:
            raise FilterStartError(f"cannot instantiate: {raw.summarize(str(e))}") from e
        finally:
            _active[0] = previous
        self._grown(0)
        exports = module.exports

        def f(name: str) -> Any:
            return self.raw.func(name) if name in exports else None

        self._alloc = f("proxy_on_memory_allocate") or f("malloc")
        self._set_native()
        self._on_context_create = f("proxy_on_context_create")
        self._on_request_headers = f("proxy_on_request_headers")
        self._on_request_body = f("proxy_on_request_body")
        self._on_request_trailers = f("proxy_on_request_trailers")
        self._on_response_headers = f("proxy_on_response_headers")
        self._on_response_body = f("proxy_on_response_body")
        self._on_response_trailers = f("proxy_on_response_trailers")
        self._on_queue_ready = f("proxy_on_queue_ready")
        self._on_http_call_response = f("proxy_on_http_call_response")
        self._on_tick = f("proxy_on_tick")
        self._on_done = f("proxy_on_done")
        self._on_log = f("proxy_on_log")
        self._on_delete = f("proxy_on_delete")
        self.abi_0_1_0 = module.abi_version == "0.1.0"
        """ABI v0.1.0: header callbacks without `end_of_stream`, a missing header is empty."""
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
                    self.call(main, *(0,) * self.module.main_params)
            else:
                start = f("_start")
                if start is not None:
                    self.call(start)
            if self._on_context_create is not None:
                # as Envoy: the root context is created with its plugin at hand
                self.buffers = {BufferType.PLUGIN_CONFIGURATION: self.host.plugin_configuration}
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
            self.starting = False

    def _export(self, name: str) -> Any:
        return self.raw.func(name) if name in self.module.exports else None

    @property
    def host(self) -> HostServices:
        """The host the VM serves: its clock, limits and calls (a warm restart's replay gives
        the new generation its own for the replay, then the real one)."""
        return self._host

    @host.setter
    def host(self, host: HostServices) -> None:
        self._host = host
        if self.native is not None:
            self._set_native()

    def _set_native(self) -> None:
        if raw.FASTCALLS:
            self.native = (self.raw._ctx_addr, self.raw._mem_addr, self._alloc or 0,
                           type(self).header_map, self._host.clock.now_ns)

    def close(self) -> None:
        """Drop the Store, freeing the linear memory. The Vm is unusable afterwards."""
        if not self.closed:
            self.closed = True
            self.contexts.clear()
            self.calls.clear()
            self._mem_size = 0  # nothing is in bounds any more (`_grown`)
            if self._mem is not _NO_MEMORY:
                self._mem.release()
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

        Every guest call has the budget armed last (`Limits.deadline_ms` of the guest's own
        time, ten times that while starting): a looping filter is interrupted within the
        deadline of guest time, and host time or a busy machine never counts (`_wasmtime`).
        """
        # Guest calls never interleave across VMs (a host function only calls back into its
        # own VM), so the active slot needs no restoring afterwards.
        _active[0] = self
        return self.raw.call(func, *params)

    def new_context(self, stream: Any) -> StreamContext:
        """Create a stream context (calls `proxy_on_context_create`)."""
        context_id = self._next_context
        ctx = StreamContext(context_id, stream)
        self._next_context = context_id + 1
        self.contexts[context_id] = ctx
        raw = self.raw
        raw.budget_ns = self.deadline  # raw.arm(self.deadline), on the hot path
        if self._on_context_create is not None:
            _active[0] = self
            raw.call2(self._on_context_create, context_id, ROOT_CONTEXT_ID)
        return ctx

    def on_request_headers(self, ctx: StreamContext, end_of_stream: bool) -> int:
        """Run `proxy_on_request_headers`; return the action (CONTINUE if not exported)."""
        self.requests += 1
        if self._on_request_headers is None:
            return _CONTINUE
        self.effective = ctx.id
        _active[0] = self
        try:
            if self.abi_0_1_0:
                return self.raw.call2(self._on_request_headers, ctx.id, len(ctx.request_headers))
            return self.raw.call3(
                self._on_request_headers, ctx.id, len(ctx.request_headers), int(end_of_stream)
            )
        finally:
            self.effective = ROOT_CONTEXT_ID

    def _stream_call(self, func: Any, ctx: StreamContext, size: int, *rest: int) -> int:
        """Run one stream callback with `ctx` effective; CONTINUE if it is not exported."""
        if func is None:
            return _CONTINUE
        self.raw.arm(self.deadline)
        self.effective = ctx.id
        try:
            return self.call(func, ctx.id, size, *rest)
        finally:
            self.effective = ROOT_CONTEXT_ID

    def on_request_body(self, ctx: StreamContext, size: int, end_of_stream: bool) -> int:
        """Run `proxy_on_request_body` if exported; return the action."""
        return self._stream_call(self._on_request_body, ctx, size, int(end_of_stream))

    def on_request_trailers(self, ctx: StreamContext) -> int:
        """Run `proxy_on_request_trailers` if exported; return the action."""
        return self._stream_call(self._on_request_trailers, ctx, len(ctx.request_trailers))

    def on_response_headers(self, ctx: StreamContext, end_of_stream: bool) -> int:
        """Run `proxy_on_response_headers` if exported; return the action."""
        if self.abi_0_1_0:
            return self._stream_call(self._on_response_headers, ctx, len(ctx.response_headers))
        return self._stream_call(
            self._on_response_headers, ctx, len(ctx.response_headers), int(end_of_stream)
        )

    def on_response_body(self, ctx: StreamContext, size: int, end_of_stream: bool) -> int:
        """Run `proxy_on_response_body` if exported; return the action."""
        return self._stream_call(self._on_response_body, ctx, size, int(end_of_stream))

    def on_response_trailers(self, ctx: StreamContext) -> int:
        """Run `proxy_on_response_trailers` if exported; return the action."""
        return self._stream_call(self._on_response_trailers, ctx, len(ctx.response_trailers))

    def finish_context(self, ctx: StreamContext) -> None:
        """End a stream as Envoy does: `proxy_on_log`, then `proxy_on_done`, then (unless the
        guest defers with false, and later calls `proxy_done`) `proxy_on_delete`."""
        context_id = self.effective = ctx.id
        raw = self.raw
        raw.budget_ns = self.deadline  # raw.arm(self.deadline)
        _active[0] = self
        try:
            if self._on_log is not None:
                raw.call1(self._on_log, context_id)
            done = 1 if self._on_done is None else raw.call1(self._on_done, context_id)
            if done:
                self.delete_context(ctx)
            else:
                ctx.done_pending = True
        finally:
            self.effective = ROOT_CONTEXT_ID

    def delete_context(self, ctx: StreamContext) -> None:
        """`proxy_on_delete`, then forget the context; its pending calls are orphaned (their
        answers recorded, never delivered)."""
        try:
            _active[0] = self
            if self._on_delete is not None:
                self.raw.call1(self._on_delete, ctx.id)
        finally:
            self.contexts.pop(ctx.id, None)
            if ctx.calls:
                for call_id in ctx.calls:
                    call = self.calls.get(call_id)
                    if call is not None:
                        call.orphaned = True

    def on_http_call_response(
        self, call: PendingCall, status: int, headers: Pairs, body: bytes, trailers: Pairs
    ) -> None:
        """Deliver an outbound call's response (`headers=[]` means the call failed)."""
        if self._on_http_call_response is None:
            return
        self.buffers = {_CALL_RESPONSE_BODY: body}
        self.call_response = (status, headers, trailers)
        self.effective = ROOT_CONTEXT_ID
        raw = self.raw
        raw.budget_ns = self.deadline  # raw.arm(self.deadline)
        _active[0] = self  # as `call` does
        try:
            raw.call(
                self._on_http_call_response, ROOT_CONTEXT_ID, call.id, len(headers), len(body),
                len(trailers),
            )
        finally:
            self.buffers = {}
            self.call_response = None
            self.effective = ROOT_CONTEXT_ID

    def on_queue_ready(self, queue_id: int) -> None:
        """Run `proxy_on_queue_ready` on the root context, if exported."""
        if self._on_queue_ready is not None:
            self.raw.arm(self.deadline)
            self.effective = ROOT_CONTEXT_ID
            self.call(self._on_queue_ready, ROOT_CONTEXT_ID, queue_id)

    def on_tick(self) -> None:
        """Run `proxy_on_tick` on the root context."""
        if self._on_tick is not None:
            raw = self.raw
            raw.budget_ns = self.deadline  # raw.arm(self.deadline)
            _active[0] = self  # as `call` does, on the one-parameter path (a tick a second)
            raw.call1(self._on_tick, ROOT_CONTEXT_ID)

    # ---- linear memory -----------------------------------------------------------------------

    def _grown(self, end: int) -> bool:
        """Whether [.., end) is in bounds after reading the memory's size again (it only
        grows); a grown memory gets a new view."""
        if self.closed:  # the store is gone: nothing is in bounds
            return False
        size = self.raw.memory_size()
        if size != self._mem_size:
            self._mem_size = size
            self._mem = self.raw.memory_view(size)
        return end <= size

    def in_bounds(self, ptr: int, size: int) -> bool:
        end = ptr + size
        return end <= self._mem_size or self._grown(end)

    def read(self, ptr: int, size: int) -> bytes | None:
        """Read guest memory; None if [ptr, ptr+size) is out of bounds."""
        end = ptr + size
        if end > self._mem_size and not self._grown(end):
            return None
        return self._mem[ptr:end].tobytes()

    def write(self, ptr: int, data: bytes) -> bool:
        """Write guest memory; False if out of bounds."""
        end = ptr + len(data)
        if end > self._mem_size and not self._grown(end):
            return False
        self._mem[ptr:end] = data
        return True

    def write_u32(self, ptr: int, value: int) -> bool:
        """Write a little-endian u32; False if out of bounds."""
        if ptr + 4 > self._mem_size and not self._grown(ptr + 4):
            return False
        _pack_u32(self._mem, ptr, value & M32)
        return True

    def write_u64(self, ptr: int, value: int) -> bool:
        """Write a little-endian u64; False if out of bounds."""
        if ptr + 8 > self._mem_size and not self._grown(ptr + 8):
            return False
        _pack_u64(self._mem, ptr, value & 0xFFFFFFFFFFFFFFFF)
        return True

    def return_bytes(self, data: bytes, ptr_ptr: int, size_ptr: int) -> int:
        """Copy `data` into guest-allocated memory and write its address and size.

        Empty data writes a null pointer and size 0 without allocating.
        Returns a `Status` value.
        """
        limit = self._mem_size - 4
        if (ptr_ptr > limit or size_ptr > limit) and not (
                self._grown(ptr_ptr + 4) and self._grown(size_ptr + 4)):
            return _BAD_MEMORY
        addr = 0
        size = len(data)
        if size:
            addr = self.raw.call1(self._alloc, size) & M32
            end = addr + size
            if addr == 0 or (end > self._mem_size and not self._grown(end)):
                return _BAD_MEMORY
            self._mem[addr:end] = data
        mem = self._mem  # both out-parameters were bounds-checked above
        _pack_u32(mem, ptr_ptr, addr)
        _pack_u32(mem, size_ptr, size)
        return _OK

    def read_str(self, ptr: int, size: int) -> str | None:
        data = self.read(ptr, size)
        return None if data is None else data.decode("utf-8", "replace")

    # ---- buffers -----------------------------------------------------------------------------

    def buffer(self, buf: int) -> bytes | None:
        """The buffer `buf` as visible from the effective context, or None (NOT_FOUND).

        The bodies belong to the effective stream (from its body callback on, until it ends);
        the configurations and an outbound call's body exist only in their callbacks.
        """
        if buf <= _RESPONSE_BODY:
            ctx = self.contexts.get(self.effective)
            if ctx is None:
                return None
            return ctx.request_body if buf == _REQUEST_BODY else ctx.response_body
        return self.buffers.get(buf)

    def set_buffer(self, buf: int, data: bytes) -> None:
        """Replace a buffer that `buffer(buf)` returned."""
        if buf <= BufferType.HTTP_RESPONSE_BODY:
            ctx = self.contexts[self.effective]
            if buf == BufferType.HTTP_REQUEST_BODY:
                ctx.request_body = data
                ctx.dirty |= REQUEST_BODY_DIRTY
            else:
                ctx.response_body = data
                ctx.dirty |= RESPONSE_BODY_DIRTY
        else:
            self.buffers[buf] = data

    # ---- header maps -------------------------------------------------------------------------

    def header_map(self, map_type: int) -> Pairs | None:
        """The header map `map_type` as visible from the effective context, or None."""
        if map_type >= _CALL_RESPONSE_HEADERS:
            if self.call_response is None or map_type > _CALL_RESPONSE_TRAILERS:
                return None
            _, headers, trailers = self.call_response
            return headers if map_type == _CALL_RESPONSE_HEADERS else trailers
        ctx = self.contexts.get(self.effective)
        if ctx is None:
            return None
        if map_type == _REQUEST_HEADERS:
            return ctx.request_headers
        if map_type == _RESPONSE_HEADERS:
            return ctx.response_headers
        if map_type == _REQUEST_TRAILERS:
            return ctx.request_trailers
        if map_type == _RESPONSE_TRAILERS:
            return ctx.response_trailers
        return None

    def set_header_map(self, map_type: int, pairs: Pairs) -> bool:
        ctx = self.contexts.get(self.effective)
        if ctx is None:
            return False
        ctx.modified = True
        ctx.dirty |= 1 << map_type
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
