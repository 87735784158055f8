"""Properties (`proxy_get_property`, `proxy_set_property`), serialised as Envoy serialises them.

A property path is a list of segments separated by NUL bytes (`request\\0path`); a trailing NUL
is ignored, and `request.path` (dots) is accepted too. Values are bytes:

- strings as they are (UTF-8), integers as 8-byte little-endian int64, booleans as one byte,
  timestamps as int64 nanoseconds since the epoch, maps (`request.headers`) in the header-map
  encoding of the specification;
- `plugin_name`, `plugin_root_id`, `plugin_vm_id` and `node` come from the plugin; what a
  stream knows (`request.*`, `response.*`, `source.*`, `destination.*`, `connection.*`,
  `upstream.*`, `cluster_name`, `route_name`) from its `Attributes`, which the embedder
  supplies (the mitmproxy addon reads them from the flow);
- `proxy_set_property` keeps filter state: per stream in a stream context, per VM in the root
  context; a property the filter set is returned before any built-in one of the same path.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

Path = tuple[bytes, ...]
Attributes = Callable[[Path], bytes | None]
"""What a stream knows: a function from a property path to its serialised value, or None."""

_I64 = struct.Struct("<q")


def int64(value: int) -> bytes:
    """An integer as Envoy serialises it: 8 bytes, little-endian."""
    return _I64.pack(value)


def boolean(value: bool) -> bytes:
    """A boolean as Envoy serialises it: one byte."""
    return b"\x01" if value else b"\x00"


def split(path: bytes) -> Path:
    """Property path segments: NUL-separated (the ABI), or dotted for the top two levels."""
    if b"\0" in path:
        parts = path.split(b"\0")
        if parts and parts[-1] == b"":
            parts.pop()
        return tuple(parts)
    head, dot, rest = path.partition(b".")
    if not dot:
        return (path,)
    if head in (b"request", b"response") and rest.startswith(b"headers."):
        return (head, b"headers", rest[len(b"headers."):])
    return (head, rest)


def plugin_properties(name: str, root_id: str, vm_id: str) -> dict[Path, bytes]:
    """The plugin's own properties, built once per VM."""
    return {
        (b"plugin_name",): name.encode(),
        (b"plugin_root_id",): root_id.encode(),
        (b"plugin_vm_id",): vm_id.encode(),
        (b"node",): b"",
    }
