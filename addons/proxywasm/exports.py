"""The host calls (cpp-host's exports.cc): check the arguments, read guest memory, delegate.

Each function here is one import a filter may make, called with the active `Vm` and the
guest's parameters as ints (i32 unsigned: pointers, sizes, ids; i64 signed). It checks its
arguments, reads guest memory through the VM's bounds-checked accessors, delegates to the VM,
its context or the host services, and writes results back. It returns a `Status` (or a WASI
errno for the `wasi_snapshot_preview1` functions); a bad guest pointer is
`INVALID_MEMORY_ACCESS` (WASI `FAULT`), never an exception.

`HOSTCALLS` maps (module, name) to the signature and the function; `module.py` links them.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable

from addons.logsafe import escape  # what a filter logs may carry what clients sent

from . import _wasmtime as raw
from . import properties
from .abi import BufferType, LogLevel, MapType, MetricType, Status, StreamType, WasiErrno
from .context import ROOT_CONTEXT_ID, LocalResponse, Metric, PendingCall
from .headers import (
    MapFormatError,
    deserialize_map,
    invalid_field,
    invalid_map,
    serialize_map,
    serialized_size,
)
from .vm import M32, Vm

guest_logger = logging.getLogger("wasm_reclaim.guest")

BAD_MEMORY = Status.INVALID_MEMORY_ACCESS
# The statuses of the calls a filter makes on every request and tick, as plain ints: an enum
# member costs a class-attribute lookup on each use (the guest sees the same i32).
_OK = int(Status.OK)
_NOT_FOUND = int(Status.NOT_FOUND)
_BAD_ARGUMENT = int(Status.BAD_ARGUMENT)
_BAD_MEMORY = int(Status.INVALID_MEMORY_ACCESS)
_UNIMPLEMENTED = int(Status.UNIMPLEMENTED)
_COUNTER = int(MetricType.COUNTER)
_HISTOGRAM = int(MetricType.HISTOGRAM)
_HTTP_STREAMS = frozenset((int(StreamType.HTTP_REQUEST), int(StreamType.HTTP_RESPONSE)))
_HTTP_REQUEST = int(StreamType.HTTP_REQUEST)
_HTTP_RESPONSE = int(StreamType.HTTP_RESPONSE)
_CALL_PSEUDO_HEADERS = frozenset((b":authority", b":method", b":path"))
_BUFFER_TYPES = frozenset(BufferType)
_MAP_TYPES = frozenset(int(t) for t in MapType)
_STREAM_TYPES = frozenset(StreamType)
_METRIC_TYPES = frozenset(MetricType)
MAX_LOG_MESSAGE = 16 * 1024
MAX_RANDOM_BYTES = 64 * 1024

_PY_LEVEL: dict[int, int] = {
    LogLevel.TRACE: logging.DEBUG,
    LogLevel.DEBUG: logging.DEBUG,
    LogLevel.INFO: logging.INFO,
    LogLevel.WARN: logging.WARNING,
    LogLevel.ERROR: logging.ERROR,
    LogLevel.CRITICAL: logging.CRITICAL,
}


# ---- logging, time, ticks ----


def proxy_log(vm: Vm, level: int, ptr: int, size: int) -> int:
    py_level = _PY_LEVEL.get(level)  # no LogLevel(level): an enum call costs more than a line
    if py_level is None:
        return _BAD_ARGUMENT
    if not vm.in_bounds(ptr, size):
        return _BAD_MEMORY
    if vm.starting and py_level > logging.WARNING:
        py_level = logging.WARNING  # a start-up message, not an error of the proxy's start
    if guest_logger.isEnabledFor(py_level):
        data = vm.read(ptr, min(size, MAX_LOG_MESSAGE)) or b""
        _guest_line(vm, py_level, escape(data, MAX_LOG_MESSAGE))
    return _OK


def _guest_line(vm: Vm, level: int, text: str) -> None:
    """One line of the filter's log. The record's message is the line itself (no arguments),
    so a rate limit on the logger holds back repeats of one line, not every line of a filter
    (Envoy logs every proxy_log call)."""
    guest_logger.log(level, f"[{vm.instance_id} gen {vm.generation}] {text}")


def proxy_get_log_level(vm: Vm, ret_level: int) -> int:
    level = guest_logger.getEffectiveLevel()
    abi_level = (
        LogLevel.DEBUG if level <= logging.DEBUG else LogLevel.INFO if level <= logging.INFO
        else LogLevel.WARN if level <= logging.WARNING
        else LogLevel.ERROR if level <= logging.ERROR else LogLevel.CRITICAL
    )
    return Status.OK if vm.write_u32(ret_level, abi_level) else BAD_MEMORY


def proxy_get_current_time_nanoseconds(vm: Vm, ret_time: int) -> int:
    return _OK if vm.write_u64(ret_time, vm.host.clock.now_ns()) else _BAD_MEMORY


proxy_get_current_time_nanoseconds.native = raw.NATIVE_CURRENT_TIME  # type: ignore[attr-defined]


def proxy_set_tick_period_milliseconds(vm: Vm, period_ms: int) -> int:
    vm.tick_period_ns = period_ms * 1_000_000
    vm.next_tick_ns = vm.host.clock.now_ns() + vm.tick_period_ns if period_ms else 0
    vm.host.schedule_changed()
    return Status.OK


# ---- buffers ----


def proxy_get_buffer_bytes(
    vm: Vm, buf: int, start: int, max_size: int, ret_ptr: int, ret_size: int,
) -> int:
    if buf not in _BUFFER_TYPES:
        return _BAD_ARGUMENT
    data = vm.buffer(buf)
    if data is None:
        return _NOT_FOUND
    if start > len(data):
        return _BAD_ARGUMENT
    return vm.return_bytes(data[start : start + max_size], ret_ptr, ret_size)


def proxy_get_buffer_status(vm: Vm, buf: int, ret_size: int, ret_flags: int) -> int:
    if buf not in _BUFFER_TYPES:
        return _BAD_ARGUMENT
    data = vm.buffer(buf)
    if data is None:
        return _NOT_FOUND
    if not (vm.write_u32(ret_size, len(data)) and vm.write_u32(ret_flags, 0)):
        return _BAD_MEMORY
    return _OK


def proxy_set_buffer_bytes(
    vm: Vm, buf: int, start: int, size: int, value_ptr: int, value_size: int,
) -> int:
    """Replace `size` bytes at `start` with the value: prepend (0, 0), append (start at or past
    the end), replace or inject (the spec's semantics, which include Envoy's)."""
    if buf not in _BUFFER_TYPES:
        return Status.BAD_ARGUMENT
    data = vm.buffer(buf)
    if data is None:
        return Status.NOT_FOUND
    value = vm.read(value_ptr, value_size)
    if value is None:
        return BAD_MEMORY
    start = min(start, len(data))
    vm.set_buffer(buf, data[:start] + value + data[start + size :])
    return Status.OK


def proxy_get_configuration(vm: Vm, ret_ptr: int, ret_size: int) -> int:
    """ABI v0.1.0's way to read the configuration, as Envoy answers it: the plugin's while the
    root context is created and configured, else the VM's."""
    data = vm.buffers.get(BufferType.PLUGIN_CONFIGURATION)
    if data is None:
        data = vm.host.vm_configuration
    return vm.return_bytes(data, ret_ptr, ret_size)


# ---- header maps ----


def proxy_get_header_map_pairs(vm: Vm, map_type: int, ret_ptr: int, ret_size: int) -> int:
    if map_type not in _MAP_TYPES:
        return _BAD_ARGUMENT
    pairs = vm.header_map(map_type)
    if pairs is None:
        return _NOT_FOUND
    return vm.return_bytes(serialize_map(pairs), ret_ptr, ret_size)


def proxy_get_header_map_size(vm: Vm, map_type: int, ret_size: int) -> int:
    if map_type not in _MAP_TYPES:
        return _BAD_ARGUMENT
    pairs = vm.header_map(map_type)
    if pairs is None:
        return _NOT_FOUND
    return _OK if vm.write_u32(ret_size, serialized_size(pairs)) else _BAD_MEMORY


def proxy_set_header_map_pairs(vm: Vm, map_type: int, ptr: int, size: int) -> int:
    if map_type not in _MAP_TYPES:
        return Status.BAD_ARGUMENT
    data = vm.read(ptr, size)
    if data is None:
        return BAD_MEMORY
    try:
        pairs = [(k.lower(), v) for k, v in deserialize_map(data)]
    except MapFormatError as e:
        guest_logger.warning("[%s] proxy_set_header_map_pairs: %s", vm.instance_id, e)
        return Status.BAD_ARGUMENT
    why = invalid_map(pairs)
    if why is not None:
        return _refused(vm, "proxy_set_header_map_pairs", why)
    return Status.OK if vm.set_header_map(map_type, pairs) else Status.NOT_FOUND


def _refused(vm: Vm, call: str, why: str) -> int:
    """A header field that cannot go on the wire (`headers.invalid_field`): BAD_ARGUMENT, and
    the map stays as it was (a value with CR or LF would split the message)."""
    guest_logger.warning("[%s] %s: %s: refused", vm.instance_id, call, why)
    return _BAD_ARGUMENT


def proxy_get_header_map_value(
    vm: Vm, map_type: int, key_ptr: int, key_size: int, ret_ptr: int, ret_size: int,
) -> int:
    if map_type not in _MAP_TYPES:
        return _BAD_ARGUMENT
    key = vm.read(key_ptr, key_size)
    if key is None:
        return _BAD_MEMORY
    pairs = vm.header_map(map_type)
    if pairs is None:
        return _NOT_FOUND
    key = key.lower()
    for k, v in pairs:
        if k == key:
            return vm.return_bytes(v, ret_ptr, ret_size)
    if vm.abi_0_1_0:  # as Envoy for that ABI: a missing header is an empty value
        return vm.return_bytes(b"", ret_ptr, ret_size)
    return _NOT_FOUND


# A cache hit's header reads: in C when found with a value (fastcall.c), else as above.
proxy_get_header_map_value.native = raw.NATIVE_HEADER_MAP_VALUE  # type: ignore[attr-defined]


def _edit_map(
    vm: Vm, map_type: int, key_ptr: int, key_size: int, value: bytes | None, mode: str,
) -> int:
    if map_type not in _MAP_TYPES:
        return Status.BAD_ARGUMENT
    key = vm.read(key_ptr, key_size)
    if key is None or value is None:
        return BAD_MEMORY
    pairs = vm.header_map(map_type)
    if pairs is None or map_type >= MapType.GRPC_CALL_INITIAL_METADATA:
        return Status.NOT_FOUND
    key = key.lower()
    if mode != "remove":
        why = invalid_field(key, value)
        if why is not None:
            return _refused(vm, f"proxy_{mode}_header_map_value", why)
    if mode == "add":
        new = [*pairs, (key, value)]
    else:
        new = [(k, v) for k, v in pairs if k != key]
        if mode == "replace":
            new.append((key, value))
    vm.set_header_map(map_type, new)
    return Status.OK


def proxy_add_header_map_value(
    vm: Vm, map_type: int, key_ptr: int, key_size: int, value_ptr: int, value_size: int,
) -> int:
    return _edit_map(vm, map_type, key_ptr, key_size, vm.read(value_ptr, value_size), "add")


def proxy_replace_header_map_value(
    vm: Vm, map_type: int, key_ptr: int, key_size: int, value_ptr: int, value_size: int,
) -> int:
    value = vm.read(value_ptr, value_size)
    return _edit_map(vm, map_type, key_ptr, key_size, value, "replace")


def proxy_remove_header_map_value(vm: Vm, map_type: int, key_ptr: int, key_size: int) -> int:
    return _edit_map(vm, map_type, key_ptr, key_size, b"", "remove")


# ---- streams ----


def proxy_continue_stream(vm: Vm, stream_type: int) -> int:
    if stream_type not in _HTTP_STREAMS:
        return _BAD_ARGUMENT if stream_type not in _STREAM_TYPES else _UNIMPLEMENTED
    ctx = vm.contexts.get(vm.effective)
    if ctx is None:
        return _NOT_FOUND
    ctx.resumed = True
    return _OK


def proxy_clear_route_cache(vm: Vm) -> int:
    """Ok: mitmproxy routes by the request as it leaves the addon, so nothing is cached."""
    return _OK


def proxy_continue_request(vm: Vm) -> int:
    return proxy_continue_stream(vm, _HTTP_REQUEST)


def proxy_continue_response(vm: Vm) -> int:
    return proxy_continue_stream(vm, _HTTP_RESPONSE)


def proxy_close_stream(vm: Vm, stream_type: int) -> int:
    if stream_type not in _STREAM_TYPES:
        return Status.BAD_ARGUMENT
    ctx = vm.contexts.get(vm.effective)
    if ctx is None:
        return Status.NOT_FOUND
    ctx.closed = True
    return Status.OK


def proxy_send_local_response(
    vm: Vm, status: int, details_ptr: int, details_size: int, body_ptr: int, body_size: int,
    headers_ptr: int, headers_size: int, _grpc_status: int,
) -> int:
    details = vm.read(details_ptr, details_size)
    body = vm.read(body_ptr, body_size)
    headers_raw = vm.read(headers_ptr, headers_size)
    if details is None or body is None or headers_raw is None:
        return BAD_MEMORY
    try:
        headers = [(k.lower(), v) for k, v in deserialize_map(headers_raw)]
    except MapFormatError as e:
        guest_logger.warning("[%s] proxy_send_local_response: %s", vm.instance_id, e)
        return Status.BAD_ARGUMENT
    if not 200 <= status <= 999:  # a local response is final: never 1xx
        return Status.BAD_ARGUMENT
    why = invalid_map(headers)
    if why is not None:
        return _refused(vm, "proxy_send_local_response", why)
    ctx = vm.contexts.get(vm.effective)
    if ctx is None:
        return Status.NOT_FOUND
    ctx.local_response = LocalResponse(
        status, body, headers, details.decode("utf-8", "replace")
    )
    return Status.OK


def proxy_set_effective_context(vm: Vm, context_id: int) -> int:
    if context_id != ROOT_CONTEXT_ID and context_id not in vm.contexts:
        return _BAD_ARGUMENT
    vm.effective = context_id
    return _OK


def proxy_done(vm: Vm) -> int:
    ctx = vm.contexts.get(vm.effective)
    if ctx is None or not ctx.done_pending:
        return Status.NOT_FOUND
    vm.delete_context(ctx)
    vm.host.context_released(vm)
    return Status.OK


# ---- outbound HTTP calls ----


def proxy_http_call(
    vm: Vm, upstream_ptr: int, upstream_size: int, headers_ptr: int, headers_size: int,
    body_ptr: int, body_size: int, trailers_ptr: int, trailers_size: int, timeout_ms: int,
    ret_call_id: int,
) -> int:
    upstream = vm.read(upstream_ptr, upstream_size)
    headers_raw = vm.read(headers_ptr, headers_size)
    body = vm.read(body_ptr, body_size)
    trailers_raw = vm.read(trailers_ptr, trailers_size)
    if upstream is None or headers_raw is None or body is None or trailers_raw is None:
        return _BAD_MEMORY
    if not vm.in_bounds(ret_call_id, 4):
        return _BAD_MEMORY
    try:
        headers = deserialize_map(headers_raw)
        trailers = deserialize_map(trailers_raw)
    except MapFormatError as e:
        guest_logger.warning("[%s] proxy_http_call: %s", vm.instance_id, e)
        return _BAD_ARGUMENT
    first = {k.lower(): v for k, v in reversed(headers)}  # each name's first value
    if not first.keys() >= _CALL_PSEUDO_HEADERS:
        return _BAD_ARGUMENT
    call_id = vm.next_call_id
    now = vm.host.clock.now_ns()
    # 0 is no timeout of the filter's own, as in Envoy: the call then ends when a paused
    # stream would (`Limits.stream_timeout_s`), not at once.
    timeout_ns = (timeout_ms * 1_000_000 if timeout_ms
                  else int(vm.host.limits.stream_timeout_s * 1e9))
    call = PendingCall(
        call_id, vm.effective, upstream.decode("utf-8", "replace"),
        first[b":path"].decode("latin-1"), now, now + timeout_ns,
    )
    status = vm.host.start_call(vm, call, headers, body, trailers)
    if status != _OK:
        return status
    vm.next_call_id += 1
    vm.calls[call_id] = call
    vm.outbound += 1
    ctx = vm.contexts.get(vm.effective)
    if ctx is not None:
        ctx.calls.add(call_id)
        ctx.outbound += 1
    vm.write_u32(ret_call_id, call_id)
    return _OK


def proxy_get_status(vm: Vm, ret_code: int, ret_ptr: int, ret_size: int) -> int:
    if vm.call_response is None:
        return Status.NOT_FOUND
    if not vm.write_u32(ret_code, vm.call_response[0]):
        return BAD_MEMORY
    message = b"" if vm.call_response[1] else b"call failed"
    return vm.return_bytes(message, ret_ptr, ret_size)


# ---- metrics ----


def proxy_define_metric(
    vm: Vm, metric_type: int, name_ptr: int, name_size: int, ret_id: int,
) -> int:
    if metric_type not in _METRIC_TYPES:
        return Status.BAD_ARGUMENT
    name = vm.read_str(name_ptr, name_size)
    if name is None or not vm.in_bounds(ret_id, 4):
        return BAD_MEMORY
    metric_id = vm.metric_ids.get(name)
    if metric_id is None:
        metric_id = vm.next_metric_id
        vm.next_metric_id += 1
        vm.metric_ids[name] = metric_id
        vm.metrics[metric_id] = Metric(name, MetricType(metric_type))
    vm.write_u32(ret_id, metric_id)
    return Status.OK


def proxy_increment_metric(vm: Vm, metric_id: int, delta: int) -> int:
    metric = vm.metrics.get(metric_id)
    if metric is None:
        return _NOT_FOUND
    if (delta < 0 and metric.type == _COUNTER) or metric.type == _HISTOGRAM:
        return _BAD_ARGUMENT  # as Envoy: a counter only grows; a histogram only records
    metric.value += delta
    return _OK


def proxy_record_metric(vm: Vm, metric_id: int, value: int) -> int:
    metric = vm.metrics.get(metric_id)
    if metric is None:
        return _NOT_FOUND
    # As Envoy: a counter adds the value, a gauge is set to it, a histogram keeps the latest
    # value it recorded (what `metric_values` reports; its distribution is not kept).
    value &= 0xFFFFFFFFFFFFFFFF  # the ABI's value is a u64
    metric.value = (metric.value + value) & 0xFFFFFFFFFFFFFFFF if metric.type == _COUNTER else value
    return _OK


def proxy_get_metric(vm: Vm, metric_id: int, ret_value: int) -> int:
    metric = vm.metrics.get(metric_id)
    if metric is None:
        return Status.NOT_FOUND
    if metric.type == _HISTOGRAM:
        return Status.BAD_ARGUMENT  # as Envoy: a histogram cannot be read back
    return Status.OK if vm.write_u64(ret_value, metric.value) else BAD_MEMORY


# ---- shared data (shared by every instance of this host; survives restarts) ----


def proxy_set_shared_data(
    vm: Vm, key_ptr: int, key_size: int, value_ptr: int, value_size: int, cas: int,
) -> int:
    key = vm.read(key_ptr, key_size)
    value = vm.read(value_ptr, value_size)
    if key is None or value is None:
        return BAD_MEMORY
    shared = vm.host.shared_data
    current = shared.get(key)
    if cas and current is not None and current[1] != cas:
        return Status.CAS_MISMATCH
    next_cas = ((current[1] + 1) & M32 or 1) if current else 1
    shared[key] = (value, next_cas)
    return Status.OK


def proxy_get_shared_data(
    vm: Vm, key_ptr: int, key_size: int, ret_ptr: int, ret_size: int, ret_cas: int,
) -> int:
    key = vm.read(key_ptr, key_size)
    if key is None or not vm.in_bounds(ret_cas, 4):
        return BAD_MEMORY
    entry = vm.host.shared_data.get(key)
    if entry is None:
        return Status.NOT_FOUND
    status = vm.return_bytes(entry[0], ret_ptr, ret_size)
    if status == Status.OK:
        vm.write_u32(ret_cas, entry[1])
    return status


# ---- shared queues ----


def proxy_register_shared_queue(vm: Vm, name_ptr: int, name_size: int, ret_id: int) -> int:
    """Returns: OK, INVALID_MEMORY_ACCESS."""
    name = vm.read_str(name_ptr, name_size)
    if name is None or not vm.in_bounds(ret_id, 4):
        return BAD_MEMORY
    vm.write_u32(ret_id, vm.host.shared_queues.register(vm.host.vm_id, name, vm))
    return Status.OK


def proxy_resolve_shared_queue(
    vm: Vm, vm_id_ptr: int, vm_id_size: int, name_ptr: int, name_size: int, ret_id: int,
) -> int:
    """Returns: OK, NOT_FOUND (nobody registered it), INVALID_MEMORY_ACCESS."""
    vm_id = vm.read_str(vm_id_ptr, vm_id_size)
    name = vm.read_str(name_ptr, name_size)
    if vm_id is None or name is None or not vm.in_bounds(ret_id, 4):
        return BAD_MEMORY
    queue_id = vm.host.shared_queues.resolve(vm_id, name)
    if queue_id is None:
        return Status.NOT_FOUND
    vm.write_u32(ret_id, queue_id)
    return Status.OK


def proxy_enqueue_shared_queue(vm: Vm, queue_id: int, value_ptr: int, value_size: int) -> int:
    """Returns: OK, NOT_FOUND (no such queue), INVALID_MEMORY_ACCESS."""
    value = vm.read(value_ptr, value_size)
    if value is None:
        return BAD_MEMORY
    queue = vm.host.shared_queues.get(queue_id)
    if queue is None:
        return Status.NOT_FOUND
    queue.items.append(value)
    vm.host.queue_ready(queue_id)
    return Status.OK


def proxy_dequeue_shared_queue(vm: Vm, queue_id: int, ret_ptr: int, ret_size: int) -> int:
    """Returns: OK, EMPTY, NOT_FOUND (no such queue), INVALID_MEMORY_ACCESS."""
    queue = vm.host.shared_queues.get(queue_id)
    if queue is None:
        return Status.NOT_FOUND
    if not (vm.in_bounds(ret_ptr, 4) and vm.in_bounds(ret_size, 4)):
        return BAD_MEMORY
    if not queue.items:
        return Status.EMPTY
    status = vm.return_bytes(queue.items[0], ret_ptr, ret_size)
    if status == Status.OK:
        queue.items.popleft()
    return status


# ---- properties ----


def proxy_get_property(vm: Vm, path_ptr: int, path_size: int, ret_ptr: int, ret_size: int) -> int:
    """Returns: OK, NOT_FOUND (no such property), INVALID_MEMORY_ACCESS."""
    path = vm.read(path_ptr, path_size)
    if path is None:
        return BAD_MEMORY
    value = _property(vm, properties.split(path))
    if value is None:
        return Status.NOT_FOUND
    return vm.return_bytes(value, ret_ptr, ret_size)


_REQUEST_LINE = {b"path": b":path", b"method": b":method", b"host": b":authority",
                 b"scheme": b":scheme"}


def _property(vm: Vm, path: properties.Path) -> bytes | None:
    """Filter state first, then the plugin's properties, then what the stream knows."""
    ctx = vm.contexts.get(vm.effective)
    state = ctx.properties if ctx is not None else vm.properties
    if state:
        value = state.get(path)
        if value is not None:
            return value
    value = vm.plugin_properties.get(path)
    if value is not None or ctx is None:
        return value
    attributes = getattr(ctx.stream, "attributes", None)
    if attributes is not None:
        return attributes(path)  # type: ignore[no-any-return]
    if len(path) == 2 and path[0] == b"request" and path[1] in _REQUEST_LINE:
        header = _REQUEST_LINE[path[1]]  # no embedder: the request line from the headers
        return next((v for k, v in ctx.request_headers if k == header), None)
    return None


def proxy_set_property(
    vm: Vm, path_ptr: int, path_size: int, value_ptr: int, value_size: int,
) -> int:
    """Keep filter state: per stream in a stream context, per VM in the root context.

    Returns: OK, INVALID_MEMORY_ACCESS."""
    path = vm.read(path_ptr, path_size)
    value = vm.read(value_ptr, value_size)
    if path is None or value is None:
        return BAD_MEMORY
    ctx = vm.contexts.get(vm.effective)
    if ctx is not None:
        if ctx.properties is None:
            ctx.properties = {}
        ctx.properties[properties.split(path)] = value
    else:
        vm.properties[properties.split(path)] = value
    return Status.OK


# ---- unimplemented by design: a status, never a crash ----


def unimplemented(vm: Vm, *_params: int) -> int:
    return Status.UNIMPLEMENTED


def not_found(vm: Vm, *_params: int) -> int:
    return Status.NOT_FOUND


# ---- WASI preview1 ----


def fd_write(vm: Vm, fd: int, iovs: int, iovs_len: int, ret_written: int) -> int:
    if fd not in (1, 2):
        return WasiErrno.BADF
    vec = vm.read(iovs, 8 * iovs_len)
    if vec is None or not vm.in_bounds(ret_written, 4):
        return WasiErrno.FAULT
    chunks = []
    for i in range(iovs_len):
        ptr, size = struct.unpack_from("<II", vec, 8 * i)
        chunk = vm.read(ptr, size)
        if chunk is None:
            return WasiErrno.FAULT
        chunks.append(chunk)
    data = b"".join(chunks)
    level = logging.INFO if fd == 1 else logging.WARNING if vm.starting else logging.ERROR
    text = data[:MAX_LOG_MESSAGE].decode("utf-8", "surrogateescape").rstrip("\n")
    for line in text.split("\n") if text else ():  # each line under the instance's prefix
        _guest_line(vm, level, escape(line, MAX_LOG_MESSAGE))
    vm.write_u32(ret_written, len(data))
    return WasiErrno.SUCCESS


def clock_time_get(vm: Vm, clock_id: int, _precision: int, ret_time: int) -> int:
    if clock_id not in (0, 1):
        return WasiErrno.NOTSUP
    ok = vm.write_u64(ret_time, max(vm.host.clock.now_ns(), vm.wasi_time_floor_ns))
    return WasiErrno.SUCCESS if ok else WasiErrno.FAULT


def random_get(vm: Vm, ptr: int, size: int) -> int:
    if size > MAX_RANDOM_BYTES:
        return WasiErrno.INVAL
    ok = vm.write(ptr, vm.host.random_bytes(size))
    return WasiErrno.SUCCESS if ok else WasiErrno.FAULT


def zero_sizes(vm: Vm, ret_count: int, ret_size: int) -> int:
    """environ_sizes_get / args_sizes_get: no variables, no arguments."""
    ok = vm.write_u32(ret_count, 0) and vm.write_u32(ret_size, 0)
    return WasiErrno.SUCCESS if ok else WasiErrno.FAULT


def empty_get(vm: Vm, _array: int, _buffer: int) -> int:
    """environ_get / args_get after zero sizes: nothing to write."""
    return WasiErrno.SUCCESS


# ---- what emscripten's standalone modules import (cpp-host defines both for every module) ----


def emscripten_notify_memory_growth(vm: Vm, _memory_index: int) -> None:
    """The guest grew its memory: nothing to do (the host re-reads its size on each access)."""


def pthread_equal(vm: Vm, left: int, right: int) -> int:
    """One thread per VM: two thread ids are equal when their values are."""
    return int(left == right)


def proc_exit(vm: Vm, code: int) -> None:
    raise raw.HostTrap(f"the filter called proc_exit({code})")


def sched_yield(vm: Vm) -> int:
    return WasiErrno.SUCCESS


_SUBSCRIPTION = struct.Struct("<QB7xIxxxxQQH")  # userdata, tag, clock id, timeout, precision, flags
_EVENT = struct.Struct("<QHB5xQH6x")  # userdata, error, type, nbytes, flags (32 bytes)
_FD_EVENT = {1: 1, 2: 2}  # subscription tag -> event type (fd_read, fd_write)


def poll_oneoff(vm: Vm, in_ptr: int, out_ptr: int, nsubscriptions: int, ret_nevents: int) -> int:
    """Every subscription is ready at once: a clock has expired (the host never sleeps inside
    a callback; Go's scheduler polls this when it idles), an fd is writable or has nothing.

    A sleep is not waited out but skipped: the guest's WASI clocks then read at least the time
    it would have woken at, so a guest that sleeps sees the time it expects (also on a virtual
    clock), and its clocks never go back.

    Returns: SUCCESS, INVAL (no subscriptions), FAULT.
    """
    if nsubscriptions == 0:
        return WasiErrno.INVAL
    subs = vm.read(in_ptr, 48 * nsubscriptions)
    if subs is None or not vm.in_bounds(out_ptr, 32 * nsubscriptions):
        return WasiErrno.FAULT
    events = bytearray()
    now = max(vm.host.clock.now_ns(), vm.wasi_time_floor_ns)
    for i in range(nsubscriptions):
        userdata, tag = struct.unpack_from("<QB", subs, 48 * i)
        if tag == 0:
            _, _, clock_id, timeout, _, flags = _SUBSCRIPTION.unpack_from(subs, 48 * i)
            wake = timeout if flags & 1 else now + timeout  # 1: an absolute time
            if clock_id in (0, 1) and wake > vm.wasi_time_floor_ns:
                vm.wasi_time_floor_ns = wake
            events += _EVENT.pack(userdata, WasiErrno.SUCCESS, 0, 0, 0)
        else:
            events += _EVENT.pack(userdata, WasiErrno.BADF, _FD_EVENT.get(tag, 1), 0, 0)
    if not (vm.write(out_ptr, bytes(events)) and vm.write_u32(ret_nevents, nsubscriptions)):
        return WasiErrno.FAULT
    return WasiErrno.SUCCESS


def fd_fdstat_get(vm: Vm, fd: int, ret_stat: int) -> int:
    """stdin, stdout and stderr are character devices (no rights to seek); nothing else is
    open. Returns: SUCCESS, BADF, FAULT."""
    if fd > 2:
        return WasiErrno.BADF
    rights = 0x40 if fd else 0x2  # fd_write for stdout/stderr, fd_read for stdin
    stat = struct.pack("<BxHxxxxQQ", 2, 0, rights, 0)
    return WasiErrno.SUCCESS if vm.write(ret_stat, stat) else WasiErrno.FAULT


def fd_fdstat_set_flags(vm: Vm, fd: int, _flags: int) -> int:
    """Flags of stdin, stdout and stderr (Go makes them non-blocking): accepted, nothing
    changes. Returns: SUCCESS, BADF."""
    return WasiErrno.SUCCESS if fd <= 2 else WasiErrno.BADF


def fd_close(vm: Vm, fd: int) -> int:
    """Nothing is open but stdin, stdout and stderr, which stay open. Returns: SUCCESS, BADF."""
    return WasiErrno.SUCCESS if fd <= 2 else WasiErrno.BADF


def fd_prestat_get(vm: Vm, fd: int, ret_prestat: int) -> int:
    """No directory is pre-opened: BADF ends the guest's scan of pre-opens."""
    return WasiErrno.BADF


def fd_prestat_dir_name(vm: Vm, fd: int, path_ptr: int, path_len: int) -> int:
    """No directory is pre-opened: BADF."""
    return WasiErrno.BADF


# (module, name) -> ((params, results), implementation). Signatures: i = i32, I = i64.
HOSTCALLS: dict[tuple[str, str], tuple[tuple[str, str], Callable[..., int | None]]] = {
    ("env", "proxy_log"): (("iii", "i"), proxy_log),
    ("env", "proxy_get_log_level"): (("i", "i"), proxy_get_log_level),
    ("env", "proxy_get_current_time_nanoseconds"): (
        ("i", "i"), proxy_get_current_time_nanoseconds),
    ("env", "proxy_set_tick_period_milliseconds"): (
        ("i", "i"), proxy_set_tick_period_milliseconds),
    ("env", "proxy_get_buffer_bytes"): (("iiiii", "i"), proxy_get_buffer_bytes),
    ("env", "proxy_get_buffer_status"): (("iii", "i"), proxy_get_buffer_status),
    ("env", "proxy_set_buffer_bytes"): (("iiiii", "i"), proxy_set_buffer_bytes),
    ("env", "proxy_get_header_map_pairs"): (("iii", "i"), proxy_get_header_map_pairs),
    ("env", "proxy_get_header_map_size"): (("ii", "i"), proxy_get_header_map_size),
    ("env", "proxy_set_header_map_pairs"): (("iii", "i"), proxy_set_header_map_pairs),
    ("env", "proxy_get_header_map_value"): (("iiiii", "i"), proxy_get_header_map_value),
    ("env", "proxy_add_header_map_value"): (("iiiii", "i"), proxy_add_header_map_value),
    ("env", "proxy_replace_header_map_value"): (
        ("iiiii", "i"), proxy_replace_header_map_value),
    ("env", "proxy_remove_header_map_value"): (("iii", "i"), proxy_remove_header_map_value),
    ("env", "proxy_continue_stream"): (("i", "i"), proxy_continue_stream),
    ("env", "proxy_get_configuration"): (("ii", "i"), proxy_get_configuration),
    ("env", "proxy_clear_route_cache"): (("", "i"), proxy_clear_route_cache),
    ("env", "proxy_continue_request"): (("", "i"), proxy_continue_request),
    ("env", "proxy_continue_response"): (("", "i"), proxy_continue_response),
    ("env", "proxy_close_stream"): (("i", "i"), proxy_close_stream),
    ("env", "proxy_send_local_response"): (("iiiiiiii", "i"), proxy_send_local_response),
    ("env", "proxy_http_call"): (("iiiiiiiiii", "i"), proxy_http_call),
    ("env", "proxy_get_status"): (("iii", "i"), proxy_get_status),
    ("env", "proxy_set_effective_context"): (("i", "i"), proxy_set_effective_context),
    ("env", "proxy_done"): (("", "i"), proxy_done),
    ("env", "proxy_define_metric"): (("iiii", "i"), proxy_define_metric),
    ("env", "proxy_increment_metric"): (("iI", "i"), proxy_increment_metric),
    ("env", "proxy_record_metric"): (("iI", "i"), proxy_record_metric),
    ("env", "proxy_get_metric"): (("ii", "i"), proxy_get_metric),
    ("env", "proxy_set_shared_data"): (("iiiii", "i"), proxy_set_shared_data),
    ("env", "proxy_get_shared_data"): (("iiiii", "i"), proxy_get_shared_data),
    ("env", "proxy_get_property"): (("iiii", "i"), proxy_get_property),
    ("env", "proxy_set_property"): (("iiii", "i"), proxy_set_property),
    ("env", "proxy_register_shared_queue"): (("iii", "i"), proxy_register_shared_queue),
    ("env", "proxy_resolve_shared_queue"): (("iiiii", "i"), proxy_resolve_shared_queue),
    ("env", "proxy_enqueue_shared_queue"): (("iii", "i"), proxy_enqueue_shared_queue),
    ("env", "proxy_dequeue_shared_queue"): (("iii", "i"), proxy_dequeue_shared_queue),
    ("env", "proxy_grpc_call"): (("iiiiiiiiiiii", "i"), unimplemented),
    ("env", "proxy_grpc_stream"): (("iiiiiiiii", "i"), unimplemented),
    ("env", "proxy_grpc_send"): (("iiii", "i"), unimplemented),
    ("env", "proxy_grpc_cancel"): (("i", "i"), unimplemented),
    ("env", "proxy_grpc_close"): (("i", "i"), unimplemented),
    ("env", "proxy_call_foreign_function"): (("iiiiii", "i"), not_found),
    ("env", "emscripten_notify_memory_growth"): (("i", ""), emscripten_notify_memory_growth),
    ("env", "pthread_equal"): (("ii", "i"), pthread_equal),
    ("wasi_snapshot_preview1", "fd_write"): (("iiii", "i"), fd_write),
    ("wasi_snapshot_preview1", "clock_time_get"): (("iIi", "i"), clock_time_get),
    ("wasi_snapshot_preview1", "random_get"): (("ii", "i"), random_get),
    ("wasi_snapshot_preview1", "environ_sizes_get"): (("ii", "i"), zero_sizes),
    ("wasi_snapshot_preview1", "environ_get"): (("ii", "i"), empty_get),
    ("wasi_snapshot_preview1", "args_sizes_get"): (("ii", "i"), zero_sizes),
    ("wasi_snapshot_preview1", "args_get"): (("ii", "i"), empty_get),
    ("wasi_snapshot_preview1", "proc_exit"): (("i", ""), proc_exit),
    ("wasi_snapshot_preview1", "sched_yield"): (("", "i"), sched_yield),
    ("wasi_snapshot_preview1", "poll_oneoff"): (("iiii", "i"), poll_oneoff),
    ("wasi_snapshot_preview1", "fd_fdstat_get"): (("ii", "i"), fd_fdstat_get),
    ("wasi_snapshot_preview1", "fd_fdstat_set_flags"): (("ii", "i"), fd_fdstat_set_flags),
    ("wasi_snapshot_preview1", "fd_prestat_get"): (("ii", "i"), fd_prestat_get),
    ("wasi_snapshot_preview1", "fd_close"): (("i", "i"), fd_close),
    ("wasi_snapshot_preview1", "fd_prestat_dir_name"): (("iii", "i"), fd_prestat_dir_name),
}
# The same functions under their older module name.
HOSTCALLS.update({("wasi_unstable", name): entry
                  for (module, name), entry in list(HOSTCALLS.items())
                  if module == "wasi_snapshot_preview1"})
