"""The Proxy-Wasm map encoding, exactly as the specification's example shows it.

Maps are decoded in C where the host's extension is built (`fastcall.c`'s `parse_map`) and in
Python otherwise and for malformed maps: the decoding tests run on both (`deserialize_map`,
and `decode_map` alone), and the two must agree on any bytes.
"""

from __future__ import annotations

import struct
from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from addons.proxywasm import _wasmtime
from addons.proxywasm.headers import MapFormatError, decode_map, deserialize_map, serialize_map

Decoder = Callable[[bytes], list[tuple[bytes, bytes]]]
decoders = pytest.mark.parametrize("decode", [deserialize_map, decode_map],
                                   ids=["deserialize_map", "python"])


@decoders
def test_spec_example(decode: Decoder) -> None:
    # The specification's own example: {"a": "1"}, {"b": "22"}.
    data = serialize_map([(b"a", b"1"), (b"b", b"22")])
    assert data == struct.pack("<5I", 2, 1, 1, 1, 2) + b"a\x001\x00b\x0022\x00"
    assert decode(data) == [(b"a", b"1"), (b"b", b"22")]


@decoders
@pytest.mark.parametrize("empty", [b"", b"\x00"])
def test_empty_map_both_forms(decode: Decoder, empty: bytes) -> None:
    assert decode(empty) == []


def test_empty_map_serializes_to_nothing() -> None:
    assert serialize_map([]) == b""


@decoders
@given(pairs=st.lists(st.tuples(st.binary(max_size=64), st.binary(max_size=256)), max_size=20))
def test_round_trip_arbitrary_bytes(decode: Decoder, pairs: list[tuple[bytes, bytes]]) -> None:
    # Keys and values may hold NULs and non-UTF-8 bytes: lengths, not terminators, delimit them.
    assert decode(serialize_map(pairs)) == pairs


@decoders
def test_big_map(decode: Decoder) -> None:
    pairs = [(f"x-header-{i}".encode(), bytes([i % 256]) * 70_000) for i in range(40)]
    data = serialize_map(pairs)
    assert len(data) > 2_800_000
    assert decode(data) == pairs


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"\x01", "must be empty"),
        (b"\x01\x00", "too short"),
        (struct.pack("<I", 1000), "declares 1000 pairs"),
        (struct.pack("<3I", 1, 5, 5) + b"ab\x00", "runs past the end"),
        (struct.pack("<3I", 1, 1, 1) + b"aXb\x00", "not NUL-terminated"),
        (struct.pack("<3I", 1, 1, 1) + b"a\x00b\x00junk", "trailing bytes"),
        (struct.pack("<I", 0xFFFFFFFF) + b"\x00" * 8, "declares 4294967295 pairs"),
    ],
)
@decoders
def test_malformed_maps_are_rejected_with_the_reason(decode: Decoder, data: bytes,
                                                     message: str) -> None:
    with pytest.raises(MapFormatError, match=message):
        decode(data)


def test_the_extension_decodes_where_it_is_built() -> None:
    # Where the crossings go through the extension, so do the maps. A build from before it
    # had a decoder still works (maps decode in Python) but is out of date: this says so.
    if not _wasmtime.FASTCALLS:
        pytest.skip("the C extension is not loaded: maps decode in Python (covered above)")
    assert _wasmtime.parse_map is not None, (
        "the extension was built before it had parse_map: rebuild it (bash .ci/setup)")
    assert _wasmtime.parse_map(serialize_map([(b"a", b"1")])) == [(b"a", b"1")]


def _python_or_none(data: bytes) -> list[tuple[bytes, bytes]] | None:
    try:
        return decode_map(data)
    except MapFormatError:
        return None


@given(pairs=st.lists(st.tuples(st.binary(max_size=8), st.binary(max_size=16)), max_size=4),
       cut=st.integers(0, 200), flip=st.integers(0, 200), byte=st.integers(0, 255),
       tail=st.binary(max_size=3))
def test_c_and_python_agree_on_any_bytes(pairs: list[tuple[bytes, bytes]], cut: int,
                                         flip: int, byte: int, tail: bytes) -> None:
    # A map cut short, with one byte changed, or with bytes after it: the C decoder gives the
    # Python one's pairs, or None exactly where Python rejects the map.
    parse = _wasmtime.parse_map
    if parse is None:
        pytest.skip("the C extension is not loaded")
    data = bytearray(serialize_map(pairs))
    if data and flip < len(data):
        data[flip] = byte
    for candidate in (bytes(data), bytes(data[:cut]), bytes(data) + tail):
        assert parse(candidate) == _python_or_none(candidate)
    assert parse(bytearray(data)) is None  # not bytes: Python decides
