"""Log lines a client cannot forge or flood.

- `escape()` makes client-controlled text (a path, a Host, a method) safe for one log line:
  CR, LF and every other control character become visible escapes, and long text is cut.
- `OneLine` is a `logging.Filter` that turns a record carrying a traceback into one line
  naming the exception (for aiohttp's "Error handling request" on malformed requests).
- `RateLimit` is a `logging.Filter` that lets a few lines of each kind through per period and
  then says, once the period is over, how many similar lines it held back.

Filters on a logger apply to the records logged on that logger (not on its children):
`install()` puts them on the loggers that log what clients send.
"""

from __future__ import annotations

import logging
import re
import time
import urllib.parse
from collections.abc import Callable, Iterable

MAX_TEXT = 200
_ESCAPES = {i: f"\\x{i:02x}" for i in [*range(0x20), *range(0x7F, 0xA0)]}
_ESCAPES.update({ord("\n"): "\\n", ord("\r"): "\\r", ord("\t"): "\\t", ord("\\"): "\\\\"})
_ESCAPES.update({0x2028: "\\u2028", 0x2029: "\\u2029", 0x85: "\\x85"})
_ESCAPES.update({i: f"\\u{i:04x}" for i in range(0xD800, 0xE000)})  # lone surrogates
_ESCAPES.update({0xDC00 + b: f"\\x{b:02x}" for b in range(0x80, 0x100)})  # surrogateescape


def escape(text: str | bytes | None, limit: int = MAX_TEXT) -> str:
    """`text` as one printable line: control characters escaped, cut to about `limit` chars.

    Bytes are decoded as UTF-8 with undecodable bytes escaped (`\\xe9`), as are surrogates
    that mitmproxy's surrogateescape decoding leaves in a str.
    """
    if text is None:
        return ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", "surrogateescape")
    out = text.translate(_ESCAPES)
    if len(out) > limit:
        out = f"{out[:limit]}…({len(text)} chars)"
    return out


class OneLine(logging.Filter):
    """Drop a record's traceback; append the exception's first line, escaped, instead."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info
        if exc and exc[1] is not None:
            error = exc[1]
            text = " ".join(ln.strip() for ln in str(error).splitlines() if ln.strip())
            reason = type(error).__name__ + (f": {text}" if text else "")
            record.msg = f"{record.getMessage()}: {escape(reason)}"
            record.args = ()
            record.exc_info = None
            record.exc_text = None
        return True


class Redact(logging.Filter):
    """Hide secrets in a record's line: each of `secrets` (the admin token), and the credentials
    after `Bearer` or `Basic` (a client's Authorization header quoted in an error: aiohttp's
    "Invalid header value" or "LineTooLong" lines quote the raw header line)."""

    _CREDENTIALS = re.compile(r"(?i)(bearer|basic)(\s+|\\x20|\\t)[^\s'\"\\]+")

    def __init__(self, *secrets: str) -> None:
        super().__init__()
        self.secrets = [s for s in secrets if s]

    def filter(self, record: logging.LogRecord) -> bool:
        line = record.getMessage()
        hidden = line
        for secret in self.secrets:
            hidden = hidden.replace(secret, "[redacted]")
        hidden = self._CREDENTIALS.sub(r"\1\2[redacted]", hidden)
        if hidden != line:
            record.msg, record.args = hidden, ()
        return True


class RateLimit(logging.Filter):
    """At most `burst` lines per kind every `period_s` seconds.

    A kind is the unformatted message (`"refused %s"`), or with `by_text` the formatted line:
    for a logger whose lines share one format (a filter's own log), so that only repeats of
    the same line are held back. When a period in which lines were held back is over, the next
    line of that kind says how many were suppressed. `clock` is injectable for tests.
    """

    MAX_KINDS = 4096

    def __init__(self, burst: int = 5, period_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic, *, by_text: bool = False) -> None:
        super().__init__()
        self.burst = burst
        self.period_s = period_s
        self.clock = clock
        self.by_text = by_text
        self._windows: dict[tuple[str, int, str], list[float]] = {}
        """(logger, level, message) → [window start, lines in window, suppressed]."""

    def filter(self, record: logging.LogRecord) -> bool:
        key = (record.name, record.levelno,
               record.getMessage() if self.by_text else str(record.msg))
        now = self.clock()
        window = self._windows.get(key)
        if window is None or now - window[0] >= self.period_s:
            suppressed = int(window[2]) if window is not None else 0
            self._windows[key] = [now, 1, 0]
            if len(self._windows) > 1024:  # kinds are few; forget old ones if not
                self._forget(now)
                if len(self._windows) > self.MAX_KINDS:  # a flood of distinct lines
                    self._windows = {key: self._windows[key]}
            if suppressed:
                record.msg = f"{record.getMessage()} ({suppressed} similar lines suppressed)"
                record.args = ()
            return True
        if window[1] < self.burst:
            window[1] += 1
            return True
        window[2] += 1
        return False

    def _forget(self, now: float) -> None:
        for key in [k for k, w in self._windows.items() if now - w[0] >= self.period_s]:
            del self._windows[key]


def install(names: Iterable[str], *filters: logging.Filter) -> None:
    """Add `filters` to each named logger, once per type (calling it again adds nothing)."""
    for name in names:
        target = logging.getLogger(name)
        for f in filters:
            if not any(type(existing) is type(f) for existing in target.filters):
                target.addFilter(f)


def shown_url(url: str) -> str:
    """`url` as a log line may show it: a password in it replaced by `***`."""
    try:
        parts = urllib.parse.urlsplit(url)
        password = parts.password
    except ValueError:
        return re.sub(r"//[^/@]*@", "//***@", url)
    if not password:
        return url
    netloc = parts.netloc.replace(f":{password}@", ":***@", 1)
    return urllib.parse.urlunsplit(parts._replace(netloc=netloc))
