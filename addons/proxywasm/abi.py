"""Proxy-Wasm ABI constants (v0.2.1, which v0.2.0 shares for everything we implement).

The values are those of the specification, proxy-wasm/spec `abi-versions/v0.2.1/README.md`,
section "Types". Names follow the specification so that a reader can search for them there.

v0.1.0, which Envoy still runs, differs where the host must know it (as proxy-wasm-cpp-host
does): `proxy_on_request_headers` and `proxy_on_response_headers` take no `end_of_stream`
(`ABI_0_1_0_CALLBACKS`), a header `proxy_get_header_map_value` does not find is `Ok` and empty,
and such filters read their configuration with `proxy_get_configuration`.
"""

from __future__ import annotations

from enum import IntEnum

#: Exports that mark a module as a Proxy-Wasm filter, newest first.
ABI_MARKERS = ("proxy_abi_version_0_2_1", "proxy_abi_version_0_2_0", "proxy_abi_version_0_1_0")

#: The type each callback the host calls must have, as (params, results) in
#: `_wasmtime.functype`'s letters: the host calls exports without checking their types on the
#: hot path, so a module whose export differs is refused at load (cpp-host's "Bad function
#: signature"). Not listed: `main`, called with as many parameters as it has.
CALLBACKS: dict[str, tuple[str, str]] = {
    "_initialize": ("", ""),
    "_start": ("", ""),
    "proxy_on_memory_allocate": ("i", "i"),
    "malloc": ("i", "i"),
    "proxy_on_context_create": ("ii", ""),
    "proxy_on_vm_start": ("ii", "i"),
    "proxy_on_configure": ("ii", "i"),
    "proxy_on_tick": ("i", ""),
    "proxy_on_request_headers": ("iii", "i"),
    "proxy_on_request_body": ("iii", "i"),
    "proxy_on_request_trailers": ("ii", "i"),
    "proxy_on_response_headers": ("iii", "i"),
    "proxy_on_response_body": ("iii", "i"),
    "proxy_on_response_trailers": ("ii", "i"),
    "proxy_on_http_call_response": ("iiiii", ""),
    "proxy_on_queue_ready": ("ii", ""),
    "proxy_on_done": ("i", "i"),
    "proxy_on_log": ("i", ""),
    "proxy_on_delete": ("i", ""),
}

#: Where v0.1.0's callbacks differ: the header callbacks have no `end_of_stream`.
ABI_0_1_0_CALLBACKS: dict[str, tuple[str, str]] = {
    "proxy_on_request_headers": ("ii", "i"),
    "proxy_on_response_headers": ("ii", "i"),
}

WASM_PAGE_SIZE = 65536
"""Bytes in one Wasm page: allocated memory is always a whole number of pages."""


class Status(IntEnum):
    """`proxy_status_t`: what every host function returns."""

    OK = 0
    NOT_FOUND = 1
    BAD_ARGUMENT = 2
    SERIALIZATION_FAILURE = 3
    PARSE_FAILURE = 4
    INVALID_MEMORY_ACCESS = 6
    EMPTY = 7
    CAS_MISMATCH = 8
    INTERNAL_FAILURE = 10
    UNIMPLEMENTED = 12


class WasiErrno(IntEnum):
    """The `wasi_errno_t` values the ABI names."""

    SUCCESS = 0
    BADF = 8
    FAULT = 21
    INVAL = 28
    NOSYS = 52
    NOTSUP = 58


class Action(IntEnum):
    """`proxy_action_t`: what a stream callback returns."""

    CONTINUE = 0
    PAUSE = 1


class LogLevel(IntEnum):
    """`proxy_log_level_t`."""

    TRACE = 0
    DEBUG = 1
    INFO = 2
    WARN = 3
    ERROR = 4
    CRITICAL = 5


class BufferType(IntEnum):
    """`proxy_buffer_type_t`."""

    HTTP_REQUEST_BODY = 0
    HTTP_RESPONSE_BODY = 1
    DOWNSTREAM_DATA = 2
    UPSTREAM_DATA = 3
    HTTP_CALL_RESPONSE_BODY = 4
    GRPC_CALL_MESSAGE = 5
    VM_CONFIGURATION = 6
    PLUGIN_CONFIGURATION = 7
    FOREIGN_FUNCTION_ARGUMENTS = 8


class MapType(IntEnum):
    """`proxy_map_type_t`."""

    HTTP_REQUEST_HEADERS = 0
    HTTP_REQUEST_TRAILERS = 1
    HTTP_RESPONSE_HEADERS = 2
    HTTP_RESPONSE_TRAILERS = 3
    GRPC_CALL_INITIAL_METADATA = 4
    GRPC_CALL_TRAILING_METADATA = 5
    HTTP_CALL_RESPONSE_HEADERS = 6
    HTTP_CALL_RESPONSE_TRAILERS = 7


class StreamType(IntEnum):
    """`proxy_stream_type_t`."""

    HTTP_REQUEST = 0
    HTTP_RESPONSE = 1
    DOWNSTREAM = 2
    UPSTREAM = 3


class MetricType(IntEnum):
    """`proxy_metric_type_t`."""

    COUNTER = 0
    GAUGE = 1
    HISTOGRAM = 2
