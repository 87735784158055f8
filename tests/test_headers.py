"""The Proxy-Wasm map encoding, exactly as the specification's example shows it."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st

from addons.proxywasm.headers import MapFormatError, deserialize_map, serialize_map


def test_spec_example() -> None:
    # The specification's own example: {"a": "1"}, {"b": "22"}.
    data = serialize_map([(b"a", b"1"), (b"b", b"22")])
    assert data == struct.pack("<5I", 2, 1, 1, 1, 2) + b"a\x001\x00b\x0022\x00"
    assert deserialize_map(data) == [(b"a", b"1"), (b"b", b"22")]


@pytest.mark.parametrize("empty", [b"", b"\x00"])
def test_empty_map_both_forms(empty: bytes) -> None:
    assert deserialize_map(empty) == []


def test_empty_map_serializes_to_nothing() -> None:
    assert serialize_map([]) == b""


@given(st.lists(st.tuples(st.binary(max_size=64), st.binary(max_size=256)), max_size=20))
def test_round_trip_arbitrary_bytes(pairs: list[tuple[bytes, bytes]]) -> None:
    # Keys and values may hold NULs and non-UTF-8 bytes: lengths, not terminators, delimit them.
    assert deserialize_map(serialize_map(pairs)) == pairs


def test_big_map() -> None:
    pairs = [(f"x-header-{i}".encode(), bytes([i % 256]) * 70_000) for i in range(40)]
    data = serialize_map(pairs)
    assert len(data) > 2_800_000
    assert deserialize_map(data) == pairs


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
def test_malformed_maps_are_rejected_with_the_reason(data: bytes, message: str) -> None:
    with pytest.raises(MapFormatError, match=message):
        deserialize_map(data)
