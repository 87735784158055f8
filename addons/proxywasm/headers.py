"""The Proxy-Wasm map encoding for HTTP fields (spec section "Serialization").

A non-empty map is: a little-endian u32 count N; N pairs of u32 (key length, value length);
then every key and every value, each followed by one NUL byte. An empty map is either zero bytes
or one NUL byte. Keys and values are arbitrary bytes: nothing here decodes them as text.

A filter sends a map with every outbound call, so a well-formed one is decoded in C where the
host's extension is built (`fastcall.c`: `parse_map`, a fifth of the time); a malformed one, or
any where it is not built, by `decode_map` here, which says where the encoding is broken.

A request's header fields, as mitmproxy holds them, become the lowercase pairs a filter sees in
one pass (`view_fields`, on every request the proxy filters), in C too (`fastcall.c`:
`view_fields`).
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence

from ._wasmtime import parse_map as _parse_map
from ._wasmtime import view_fields as _view_fields

Pairs = list[tuple[bytes, bytes]]

_U32 = struct.Struct("<I")


class MapFormatError(ValueError):
    """A serialized map from the guest does not follow the specification's encoding."""


def view_fields(raw: Sequence[tuple[bytes, bytes]]
                ) -> tuple[Pairs, bytes | None, int, bytes | None]:
    """A request's raw header fields (mitmproxy's `headers.fields`) as (the fields with
    lowercase names, Host left out, the last Host value, how many Host fields, the last
    Authorization value); None for a value that is absent. As in Envoy, a filter sees the
    Host only as `:authority`."""
    if _view_fields is not None:
        got = _view_fields(raw)  # type: ignore[arg-type]  # None unless a tuple of bytes pairs
        if got is not None:
            return got
    return view_fields_py(raw)


def view_fields_py(raw: Sequence[tuple[bytes, bytes]]
                   ) -> tuple[Pairs, bytes | None, int, bytes | None]:
    """`view_fields` in Python: where the extension is not built, and for fields it does not
    take (names lowercased in ASCII only, as `bytes.lower` and the C pass do)."""
    host = authorization = None
    hosts = 0
    fields = []
    for name, value in raw:
        lowered = name.lower()
        if lowered == b"host":
            host = value
            hosts += 1
            continue
        if lowered == b"authorization":
            authorization = value
        fields.append((lowered, value))
    return fields, host, hosts, authorization


_TCHAR = frozenset(b"!#$%&'*+-.^_`|~0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ")
_NEVER_IN_VALUE = frozenset(b"\0\r\n")
_NEVER_IN_TARGET = _NEVER_IN_VALUE | frozenset(b" \t")
_PSEUDO = frozenset((b":method", b":path", b":scheme", b":authority", b":status"))


def invalid_field(name: bytes, value: bytes) -> str | None:
    """Why a header field a filter sets cannot go on the wire, or None if it can.

    A name must be a token (RFC 9110 §5.1) or one of the pseudo-headers; no value may hold CR,
    LF or NUL (a value with them would split the message: RFC 9110 §5.5); `:path`,
    `:authority`, `:method` and `:scheme` are parts of the request line, so they hold no
    whitespace and are not empty."""
    if name.startswith(b":"):
        if name not in _PSEUDO:
            return f"unknown pseudo-header {escape_bytes(name)}"
        if not value or not _NEVER_IN_TARGET.isdisjoint(value):
            return f"{name.decode()} must be non-empty, without whitespace, CR, LF or NUL"
        return None
    if not name or not _TCHAR.issuperset(name):
        return f"header name {escape_bytes(name)} is not a token"
    if not _NEVER_IN_VALUE.isdisjoint(value):
        return f"the value of {name.decode()} holds CR, LF or NUL"
    return None


def invalid_map(pairs: Pairs) -> str | None:
    """`invalid_field` of the first field of `pairs` that cannot go on the wire, or None."""
    for name, value in pairs:
        why = invalid_field(name, value)
        if why is not None:
            return why
    return None


def escape_bytes(data: bytes, limit: int = 60) -> str:
    """`data` as a short printable repr, for a log line."""
    text = repr(data[:limit])[2:-1]
    return f"'{text}'" + ("…" if len(data) > limit else "")


def serialize_map(pairs: Iterable[tuple[bytes, bytes]]) -> bytes:
    """Encode `pairs` as the specification defines; an empty map encodes as zero bytes."""
    items = list(pairs)
    if not items:
        return b""
    sizes = [n for key, value in items for n in (len(key), len(value))]
    parts = [struct.pack(f"<{1 + len(sizes)}I", len(items), *sizes)]
    for key, value in items:
        parts += (key, b"\0", value, b"\0")
    return b"".join(parts)


def serialized_size(pairs: Pairs) -> int:
    """The length of `serialize_map(pairs)`, without building it."""
    if not pairs:
        return 0
    return 4 + 10 * len(pairs) + sum(len(k) + len(v) for k, v in pairs)


def deserialize_map(data: bytes) -> Pairs:
    """Decode a serialized map; raise `MapFormatError` saying where the encoding is broken."""
    if _parse_map is not None:
        pairs = _parse_map(data)
        if pairs is not None:
            return pairs
    return decode_map(data)


def decode_map(data: bytes) -> Pairs:
    """`deserialize_map` in Python: where the extension is not built, and for every map it
    does not decode (a malformed one: this says why)."""
    if len(data) <= 1:
        if data in (b"", b"\0"):
            return []
        raise MapFormatError(f"a map of {len(data)} byte must be empty (b'' or b'\\x00')")
    if len(data) < 4:
        raise MapFormatError(f"map of {len(data)} bytes is too short for its u32 count")
    (count,) = _U32.unpack_from(data, 0)
    header_end = 4 + 8 * count
    if header_end > len(data):
        raise MapFormatError(
            f"map declares {count} pairs, whose sizes need {header_end} bytes; got {len(data)}"
        )
    sizes = struct.unpack_from(f"<{2 * count}I", data, 4)
    pairs: Pairs = []
    pos = header_end
    for i in range(count):
        key_len, value_len = sizes[2 * i], sizes[2 * i + 1]
        key_end = pos + key_len
        value_end = key_end + 1 + value_len
        if value_end + 1 > len(data):
            raise MapFormatError(
                f"pair {i} (key {key_len} bytes, value {value_len} bytes) runs past the end "
                f"of the {len(data)}-byte map"
            )
        if data[key_end] != 0 or data[value_end] != 0:
            raise MapFormatError(f"pair {i} is not NUL-terminated")
        pairs.append((data[pos:key_end], data[key_end + 1 : value_end]))
        pos = value_end + 1
    if pos != len(data):
        raise MapFormatError(f"{len(data) - pos} trailing bytes after {count} pairs")
    return pairs
