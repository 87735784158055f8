"""A Proxy-Wasm (ABI 0.2.1 and 0.2.0) host on wasmtime, for mitmproxy addons and simulations.

Typical use::

    module = FilterModule.from_file("filters/auth_cache.wasm")
    host = Host(module, dispatcher, plugin_configuration=b'{"ttl_seconds": 600}')
    stream = host.instance("shop.example").stream()
    decision = stream.request_headers([(b":path", b"/"), (b"authorization", b"Bearer t")])
    ...
    stream.close()
"""

from .abi import WASM_PAGE_SIZE, Action, BufferType, LogLevel, MapType, MetricType, Status
from .calls import (
    Dispatcher,
    HttpCall,
    HttpCallResponse,
    HttpxDispatcher,
    InProcessDispatcher,
)
from .clock import Clock, ScaledClock, VirtualClock, WallClock
from .context import LocalResponse
from .headers import MapFormatError, deserialize_map, serialize_map
from .host import (
    AuthCallRecord,
    Decision,
    FilterInstance,
    Host,
    HostEvents,
    Observation,
    RestartError,
    RestartRecord,
    Stream,
)
from .limits import Limits
from .module import FilterLoadError, FilterModule
from .vm import FilterStartError

__all__ = [
    "WASM_PAGE_SIZE", "Action", "AuthCallRecord", "BufferType", "Clock", "Decision",
    "Dispatcher", "FilterInstance", "FilterLoadError", "FilterModule", "FilterStartError",
    "Host", "HostEvents", "HttpCall", "HttpCallResponse", "HttpxDispatcher",
    "InProcessDispatcher", "Limits", "LocalResponse", "LogLevel", "MapFormatError", "MapType",
    "MetricType", "Observation", "RestartError", "RestartRecord", "ScaledClock", "Status",
    "Stream", "VirtualClock", "WallClock", "deserialize_map", "serialize_map",
]
