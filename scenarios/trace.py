"""The trace model: a timed sequence of login, request and logout events.

A trace is what every scenario produces and what every replayer consumes:

- ``login``: the user obtains a credential from the auth server. No proxy traffic. A live
  replayer exchanges the event's ``token`` label for a real token here; the simulator uses the
  label as the token.
- ``request``: ``method host path`` through the proxy with ``Authorization: Bearer <token>``.
- ``logout``: a request to the logout path (``/logout`` by default) through the proxy with the
  token; the filter evicts the token and the session ends.

Invariants (checked by :func:`validate_events`, with the location of the first offence):
times are finite, non-negative, at most :data:`MAX_TRACE_SECONDS` (a year) and never go
backwards; a request or logout uses a token that is logged in (login seen, no logout since); a
login does not reuse a token that is still logged in; requests and logouts name a method, a host
and a path.

File format: JSON Lines. The first line is a header object that carries the metadata and is
recognised by its ``"format": "wasm-reclaim-trace"`` member; every further line is one event
object with the fields of :class:`Event`. A file without a header line is read with default
metadata. Unknown members of an event object are ignored. Example::

    {"format": "wasm-reclaim-trace", "version": 1, "name": "basic", "description": "...",
     "tenants": ["shop.example"], "hosts": ["shop.example"], "start": null, "extra": {}}
    {"time": 0.0, "kind": "login", "user": "u0001", "token": "u0001-1", "method": "", ...}
    {"time": 0.0, "kind": "request", "user": "u0001", "token": "u0001-1", "method": "GET", ...}
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, get_args

import numpy as np
import pandas as pd

Kind = Literal["login", "request", "logout"]
KINDS: Final[tuple[Kind, ...]] = get_args(Kind)
FIELDS: Final = ("time", "kind", "user", "token", "method", "host", "path")
FORMAT: Final = "wasm-reclaim-trace"
VERSION: Final = 1

# Order of kinds for sorting the events that one source row makes (a login, then its request).
KIND_RANK: Final[Mapping[str, int]] = {"login": 0, "request": 1, "logout": 2}
LOGOUT_PATH: Final = "/logout"
# A path (without query) that logs out: ``/logout``, ``/api/auth/sign-out``, ``/wyloguj`` (the
# EClog store is Polish). Used where recorded traffic has no explicit logout events.
LOGOUT_PATTERN: Final = r"(?i)/(?:log-?out|sign-?out|wyloguj)/?$"
MAX_TRACE_SECONDS: Final = 366 * 86_400.0
"""The latest time an event may have (seconds from ``t = 0``): a (leap) year.

No real capture comes near it: a HAR records a browser session of minutes or hours, and the
whole EClog dataset spans 183 days. The simulator advances virtual time in sampling rounds,
one a second per instance by default, so a year is already 3.2e7 rounds per instance; a time
beyond that (a HAR whose dates span millennia, a trace with a time of 1e12) would keep an
experiment running for ages, so it is refused instead. A longer log fits once its time is
compressed (``eclog-convert --speedup``).
"""


class ScenarioError(Exception):
    """Bad scenario input. The message starts with the location (``file:line: field: …``)."""


class TraceError(ScenarioError):
    """A trace breaks the model's rules or cannot be read."""


@dataclass(frozen=True, slots=True)
class Event:
    """One trace event; ``time`` is in seconds from the trace start."""

    time: float
    kind: Kind
    user: str
    token: str
    method: str = ""
    host: str = ""
    path: str = ""

    @classmethod
    def login(cls, time: float, user: str, token: str, host: str = "") -> Event:
        """The user obtains ``token`` from the auth server (``host``: the site, if known)."""
        return cls(time, "login", user, token, "", host, "")

    @classmethod
    def request(
        cls, time: float, user: str, token: str, host: str, path: str = "/", method: str = "GET"
    ) -> Event:
        """A request through the proxy with ``Authorization: Bearer <token>``."""
        return cls(time, "request", user, token, method, host, path)

    @classmethod
    def logout(
        cls,
        time: float,
        user: str,
        token: str,
        host: str,
        path: str = LOGOUT_PATH,
        method: str = "POST",
    ) -> Event:
        """A logout request through the proxy; the filter evicts ``token``."""
        return cls(time, "logout", user, token, method, host, path)


@dataclass(frozen=True)
class TraceMeta:
    """Trace metadata.

    ``start`` is the wall-clock time of ``t = 0`` when known (timezone-aware); ``tenants`` and
    ``hosts`` are for replayers that key filter instances by tenant or upstream host; ``extra``
    holds JSON-serialisable provenance such as the source file, TTL and speed-up.
    """

    name: str = "trace"
    description: str = ""
    tenants: tuple[str, ...] = ()
    hosts: tuple[str, ...] = ()
    start: datetime | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        """The header object of a JSON Lines trace file."""
        return {
            "format": FORMAT,
            "version": VERSION,
            "name": self.name,
            "description": self.description,
            "tenants": list(self.tenants),
            "hosts": list(self.hosts),
            "start": self.start.isoformat() if self.start else None,
            "extra": dict(self.extra),
        }

    @classmethod
    def from_json(cls, obj: Mapping[str, Any], where: str = "header") -> TraceMeta:
        """Parse a header object; errors name ``where``."""
        if obj.get("format", FORMAT) != FORMAT:
            raise TraceError(f"{where}: format {obj.get('format')!r} is not {FORMAT!r}")
        version = obj.get("version", VERSION)
        if not isinstance(version, int) or version > VERSION:
            raise TraceError(f"{where}: unsupported version {version!r} (this reader: {VERSION})")
        start = obj.get("start")
        parsed_start: datetime | None = None
        if start is not None:
            try:
                parsed_start = _aware(datetime.fromisoformat(str(start)))
            except ValueError:
                raise TraceError(
                    f"{where}: field 'start': cannot parse {start!r} as ISO-8601"
                ) from None
        extra = obj.get("extra") or {}
        if not isinstance(extra, dict):
            raise TraceError(f"{where}: field 'extra': expected an object")
        return cls(
            name=str(obj.get("name", "trace")),
            description=str(obj.get("description", "")),
            tenants=_str_tuple(obj.get("tenants"), where, "tenants"),
            hosts=_str_tuple(obj.get("hosts"), where, "hosts"),
            start=parsed_start,
            extra=extra,
        )


@dataclass(frozen=True)
class Trace:
    """Events sorted by time plus metadata.

    Construction validates the events (:class:`TraceError` names the offending event). Use
    :meth:`from_events` to sort unsorted events first.
    """

    events: tuple[Event, ...]
    meta: TraceMeta = field(default_factory=TraceMeta)

    def __post_init__(self) -> None:
        if not isinstance(self.events, tuple):
            object.__setattr__(self, "events", tuple(self.events))
        validate_events(self.events, lambda i: f"event #{i}")

    # -- construction --------------------------------------------------------------------

    @classmethod
    def from_events(cls, events: Iterable[Event], meta: TraceMeta | None = None) -> Trace:
        """Sort ``events`` by time and validate them.

        The sort is stable: events at the same time keep their given order, so emit a login
        before the first request that uses its token (and a logout after the last).
        """
        ordered = sorted(events, key=lambda e: e.time)
        return cls(tuple(ordered), meta or TraceMeta())

    @classmethod
    def _trusted(cls, events: tuple[Event, ...], meta: TraceMeta) -> Trace:
        """Build without re-validating events that a reader has just validated."""
        trace = cls.__new__(cls)
        object.__setattr__(trace, "events", events)
        object.__setattr__(trace, "meta", meta)
        return trace

    # -- views ---------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self) -> Iterator[Event]:
        return iter(self.events)

    @property
    def duration(self) -> float:
        """Seconds from ``t = 0`` to the last event."""
        return self.events[-1].time if self.events else 0.0

    def counts(self) -> dict[str, int]:
        """Number of events by kind (every kind present, zero when absent)."""
        out: dict[str, int] = dict.fromkeys(KINDS, 0)
        for e in self.events:
            out[e.kind] += 1
        return out

    def users(self) -> set[str]:
        return {e.user for e in self.events}

    def hosts(self) -> tuple[str, ...]:
        """Hosts that requests go to, in order of first use."""
        return tuple(dict.fromkeys(e.host for e in self.events if e.kind != "login"))

    # -- pandas --------------------------------------------------------------------------

    def to_frame(self) -> pd.DataFrame:
        """Columns ``time`` (float seconds) and ``kind user token method host path`` (str).

        The metadata travels in ``df.attrs["trace_meta"]``.
        """
        ev = self.events
        df = pd.DataFrame(
            {
                "time": np.fromiter((e.time for e in ev), dtype=np.float64, count=len(ev)),
                "kind": [e.kind for e in ev],
                "user": [e.user for e in ev],
                "token": [e.token for e in ev],
                "method": [e.method for e in ev],
                "host": [e.host for e in ev],
                "path": [e.path for e in ev],
            },
            columns=list(FIELDS),
        )
        df.attrs["trace_meta"] = self.meta
        return df

    @classmethod
    def from_frame(cls, df: pd.DataFrame, meta: TraceMeta | None = None) -> Trace:
        """Build from a frame with the :meth:`to_frame` columns, in trace order.

        Errors name the row (``row 3: field 'time': …``, rows count from 0). Missing
        ``method host path`` values of logins become empty strings. ``meta`` defaults to
        ``df.attrs["trace_meta"]``.
        """
        missing = [c for c in FIELDS if c not in df.columns]
        if missing:
            raise TraceError(f"DataFrame: missing column(s) {', '.join(map(repr, missing))}")
        raw_time = df["time"]
        times = pd.to_numeric(raw_time, errors="coerce")
        bad = times.isna().to_numpy()
        if bad.any():
            i = int(np.argmax(bad))
            value = raw_time.iloc[i]
            if pd.isna(value):
                raise TraceError(f"row {i}: missing field 'time'")
            raise TraceError(f"row {i}: field 'time': cannot parse {value!r} as a number")
        cols = [_string_column(df[c], c) for c in FIELDS[1:]]
        events = list(map(Event, times.to_numpy(dtype=np.float64).tolist(), *cols))
        out = tuple(events)
        validate_events(out, lambda i: f"row {i}")
        if meta is None:
            attr = df.attrs.get("trace_meta")
            meta = attr if isinstance(attr, TraceMeta) else TraceMeta()
        return cls._trusted(out, meta)

    # -- JSON Lines ----------------------------------------------------------------------

    def write_jsonl(self, path: str | Path) -> None:
        """Write the header line and one line per event."""
        with open(path, "w", encoding="utf-8") as f:
            f.write(json.dumps(self.meta.to_json(), ensure_ascii=False) + "\n")
            for e in self.events:
                f.write(
                    json.dumps(
                        {
                            "time": e.time,
                            "kind": e.kind,
                            "user": e.user,
                            "token": e.token,
                            "method": e.method,
                            "host": e.host,
                            "path": e.path,
                        },
                        ensure_ascii=False,
                    )
                    + "\n"
                )

    @classmethod
    def read_jsonl(cls, path: str | Path) -> Trace:
        """Read a JSON Lines trace; errors are ``path:line: …`` (lines count from 1)."""
        with open(path, encoding="utf-8-sig") as f:  # a BOM, as some editors write one
            return cls.parse_jsonl(f, str(path))

    @classmethod
    def parse_jsonl(cls, lines: Iterable[str], name: str = "<trace>") -> Trace:
        """Parse JSON Lines text; ``name`` is the file name used in error messages."""
        meta: TraceMeta | None = None
        events: list[Event] = []
        line_of: list[int] = []
        for lineno, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            where = f"{name}:{lineno}"
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise TraceError(f"{where}:{e.colno}: broken JSON: {e.msg}") from None
            except ValueError as e:  # an integer of more digits than Python converts
                raise TraceError(f"{where}: unreadable JSON: {e}") from None
            except RecursionError:
                raise TraceError(f"{where}: JSON nested too deeply") from None
            if not isinstance(obj, dict):
                raise TraceError(f"{where}: expected a JSON object, got {type(obj).__name__}")
            if "format" in obj:
                if meta is not None or events:
                    raise TraceError(f"{where}: header line must be the first line")
                meta = TraceMeta.from_json(obj, where)
                continue
            events.append(_event_from_json(obj, where))
            line_of.append(lineno)
        out = tuple(events)
        validate_events(out, lambda i: f"{name}:{line_of[i]}")
        return cls._trusted(out, meta or TraceMeta(name=Path(name).stem))


def looks_like_logout(path: str, pattern: str = LOGOUT_PATTERN) -> bool:
    """Whether ``path`` (query and fragment ignored) matches the logout ``pattern``."""
    bare = path.split("?", 1)[0].split("#", 1)[0]
    return re.search(pattern, bare) is not None


def _string_column(col: pd.Series, name: str) -> list[str]:
    """Column values as strings; missing values become ""; other types are an error."""
    if isinstance(col.dtype, pd.StringDtype):
        return [str(v) for v in col.fillna("").tolist()] if col.hasnans else col.tolist()
    values: list[Any] = col.tolist()
    odd = [i for i, v in enumerate(values) if type(v) is not str]
    for i in odd:
        v = values[i]
        if v is None or v is pd.NA or (isinstance(v, float) and math.isnan(v)):
            values[i] = ""
        else:
            raise TraceError(f"row {i}: field {name!r}: expected a string, got {v!r}")
    return values


def _event_from_json(obj: Mapping[str, Any], where: str) -> Event:
    """One event object → :class:`Event`; field errors name ``where`` and the field."""
    for name in ("time", "kind", "user", "token"):
        if name not in obj or obj[name] is None:
            raise TraceError(f"{where}: missing field {name!r}")
    kind = obj["kind"]
    if kind not in KINDS:
        raise TraceError(f"{where}: field 'kind': unknown kind {kind!r} (expected one of {KINDS})")
    if kind != "login":
        for name in ("method", "host", "path"):
            if name not in obj or obj[name] is None:
                raise TraceError(f"{where}: missing field {name!r} (required for a {kind})")
    strings = []
    for name in FIELDS[2:]:
        v = obj.get(name, "")
        if v is None:
            v = ""
        if not isinstance(v, str):
            raise TraceError(f"{where}: field {name!r}: expected a string, got {v!r}")
        strings.append(v)
    return Event(_parse_number(obj["time"], where, "time"), kind, *strings)


def _parse_number(value: Any, where: str, name: str) -> float:
    """A finite float from a JSON number or numeric string."""
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise TraceError(f"{where}: field {name!r}: cannot parse {value!r} as a number")
    try:
        out = float(value)
    except ValueError:
        raise TraceError(f"{where}: field {name!r}: cannot parse {value!r} as a number") from None
    except OverflowError:  # an int beyond any float
        digits = len(str(value).lstrip("-"))
        raise TraceError(f"{where}: field {name!r}: {str(value)[:12]}… ({digits} digits) is not "
                         "a finite number") from None
    if not math.isfinite(out):
        raise TraceError(f"{where}: field {name!r}: {value!r} is not a finite number")
    return out


def validate_events(events: Sequence[Event], locate: Callable[[int], str]) -> None:
    """Check the trace invariants (module docstring); raise :class:`TraceError` at the first
    offence, located by ``locate(index)``."""
    live: set[str] = set()
    prev = 0.0
    prev_i = -1
    for i, e in enumerate(events):
        kind, t = e.kind, e.time
        if kind not in KIND_RANK:
            raise TraceError(
                f"{locate(i)}: field 'kind': unknown kind {kind!r} (expected one of {KINDS})"
            )
        try:
            in_order = prev <= t <= MAX_TRACE_SECONDS  # False for NaN
        except TypeError:
            in_order = False
        if not in_order:
            if isinstance(t, int | float) and MAX_TRACE_SECONDS < t < math.inf:
                raise TraceError(f"{locate(i)}: field 'time': {t!r} s is {span_text(t)} after "
                                 f"t = 0, beyond the limit of {span_text(MAX_TRACE_SECONDS)}")
            if isinstance(t, int | float) and math.isfinite(t) and t >= 0:
                raise TraceError(
                    f"{locate(i)}: field 'time': time goes backwards ({t!r} after {prev!r} "
                    f"at {locate(prev_i)})"
                )
            raise TraceError(f"{locate(i)}: field 'time': {t!r} is not a finite time >= 0")
        prev, prev_i = t, i
        if not e.user:
            raise TraceError(f"{locate(i)}: missing field 'user'")
        token = e.token
        if not token:
            raise TraceError(f"{locate(i)}: missing field 'token'")
        if kind == "login":
            if token in live:
                raise TraceError(
                    f"{locate(i)}: field 'token': login of {token!r}, which is already logged in"
                )
            live.add(token)
            continue
        if not (e.method and e.host and e.path):
            name = "method" if not e.method else "host" if not e.host else "path"
            raise TraceError(f"{locate(i)}: missing field {name!r} (required for a {kind})")
        if token not in live:
            raise TraceError(
                f"{locate(i)}: field 'token': {kind} with token {token!r} before its login"
            )
        if kind == "logout":
            live.discard(token)


def span_text(seconds: float) -> str:
    """A long time span in words, for messages: ``400 days``, ``2,738 years``."""
    days = seconds / 86_400
    if days < 2:
        return f"{seconds / 3600:.3g} hours"
    if days < 3650:
        return f"{days:.0f} days"
    years = days / 365.25
    return f"{years:,.0f} years" if years < 1e6 else f"{years:.3g} years"


# -- statistics ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Session:
    """One token's life: from its login to its logout, or to its last use."""

    user: str
    token: str
    start: float
    last: float
    requests: int
    logged_out: bool


def sessions(trace: Trace) -> list[Session]:
    """Sessions in order of login."""
    open_: dict[str, list[Any]] = {}
    done: list[tuple[int, Session]] = []
    order = 0
    for e in trace.events:
        if e.kind == "login":
            open_[e.token] = [order, e.user, e.time, e.time, 0]
            order += 1
            continue
        s = open_[e.token]
        s[3] = e.time
        s[4] += 1
        if e.kind == "logout":
            del open_[e.token]
            done.append((s[0], Session(s[1], e.token, s[2], s[3], s[4], True)))
    for token, s in open_.items():
        done.append((s[0], Session(s[1], token, s[2], s[3], s[4], False)))
    done.sort(key=lambda x: x[0])
    return [s for _, s in done]


def live_tokens(trace: Trace, linger: float = 0.0) -> pd.Series:
    """Logged-in tokens over time, as a step function indexed by event time.

    A session counts from its login until its logout; a session without a logout counts until
    ``linger`` seconds after its last event (pass the filter's TTL to approximate the tokens
    that the cache holds). The value at a time is the count after every change at that time,
    so a session that ends where it starts never counts.
    """
    starts: list[float] = []
    ends: list[float] = []
    for s in sessions(trace):
        starts.append(s.start)
        ends.append(s.last if s.logged_out else s.last + linger)
    t = np.concatenate([np.asarray(starts, dtype=np.float64), np.asarray(ends, dtype=np.float64)])
    d = np.concatenate([np.ones(len(starts), np.int64), -np.ones(len(ends), np.int64)])
    if len(t) == 0:
        return pd.Series([0], index=pd.Index([0.0], name="time"), name="live_tokens")
    per_time = pd.Series(d, index=t).groupby(level=0).sum().cumsum()
    per_time.index.name = "time"
    per_time.name = "live_tokens"
    return per_time


def default_ttl(trace: Trace, fallback: float = 600.0) -> float:
    """The filter TTL in trace seconds: ``extra["ttl"] / extra["speedup"]`` when recorded."""
    ttl, speedup = trace.meta.extra.get("ttl"), trace.meta.extra.get("speedup", 1.0)
    if isinstance(ttl, int | float) and isinstance(speedup, int | float) and speedup > 0:
        return float(ttl) / float(speedup)
    return fallback


def summary(trace: Trace, ttl: float = 600.0) -> dict[str, Any]:
    """Numbers for ``python -m scenarios info``."""
    live = live_tokens(trace)
    cached = live_tokens(trace, linger=ttl)
    ss = sessions(trace)
    return {
        "name": trace.meta.name,
        "events": len(trace),
        **trace.counts(),
        "users": len(trace.users()),
        "sessions": len(ss),
        "hosts": list(trace.hosts()),
        "duration_s": trace.duration,
        "start": trace.meta.start.isoformat() if trace.meta.start else None,
        "mean_requests_per_session": (sum(s.requests for s in ss) / len(ss) if ss else 0.0),
        "peak_live_tokens": int(live.max()),
        "peak_live_tokens_at_s": float(live.index[int(np.argmax(live.to_numpy()))]),
        "ttl_s": ttl,
        "peak_tokens_within_ttl": int(cached.max()),
    }


# -- helpers -------------------------------------------------------------------------------


def _aware(dt: datetime) -> datetime:
    """Naive datetimes are taken as UTC."""
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)


def _str_tuple(value: Any, where: str, name: str) -> tuple[str, ...]:
    if value is None:
        return ()
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TraceError(f"{where}: field {name!r}: expected a list of strings")
    return tuple(value)
