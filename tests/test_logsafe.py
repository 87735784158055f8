"""Log lines a client cannot forge or flood: escaping, one-line tracebacks, rate limits."""

from __future__ import annotations

import logging

import pytest

from addons.logsafe import OneLine, RateLimit, escape


@pytest.mark.parametrize(("text", "expected"), [
    ("shop.example", "shop.example"),
    ("/\n[00:00:00.000] INJECTED", "/\\n[00:00:00.000] INJECTED"),
    ("a\r\nb\x00c\x1b[31m", "a\\r\\nb\\x00c\\x1b[31m"),
    ("back\\slash", "back\\\\slash"),
    ("\u2028next\x85", "\\u2028next\\x85"),
    (b"/caf\xe9", "/caf\\xe9"),
    ("/caf\udce9", "/caf\\xe9"),  # mitmproxy's surrogateescape
    (None, ""),
])
def test_escape(text, expected) -> None:
    assert escape(text) == expected


def test_escape_cuts_long_text() -> None:
    out = escape("x" * 9000, limit=50)
    assert out.startswith("x" * 50) and out.endswith("(9000 chars)") and len(out) < 80


def _record(msg: str, *args: object, exc: BaseException | None = None) -> logging.LogRecord:
    exc_info = (type(exc), exc, None) if exc is not None else None
    return logging.LogRecord("t", logging.ERROR, __file__, 1, msg, args, exc_info)


def test_one_line_replaces_the_traceback_with_the_reason() -> None:
    record = _record("Error handling request from %s", "127.0.0.1",
                     exc=ValueError("400, message:\n  Bad status line\n  b'GET /\\n'"))
    assert OneLine().filter(record)
    assert record.exc_info is None
    assert record.getMessage() == ("Error handling request from 127.0.0.1: ValueError: 400, "
                                   "message: Bad status line b'GET /\\\\n'")


def test_rate_limit_lets_a_burst_through_then_counts() -> None:
    now = [0.0]
    limit = RateLimit(burst=3, period_s=10, clock=lambda: now[0])
    passed = [limit.filter(_record("refused %s", i)) for i in range(10)]
    assert passed == [True] * 3 + [False] * 7
    assert limit.filter(_record("another kind"))  # kinds are counted apart
    now[0] = 10.5
    record = _record("refused %s", 99)
    assert limit.filter(record)
    assert record.getMessage() == "refused 99 (7 similar lines suppressed)"
    assert limit.filter(_record("refused %s", 100))
