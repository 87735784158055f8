"""Traces as HAR 1.2 files and HAR recordings as traces, through mitmproxy's own HAR code.

Writing (:func:`to_har`, :func:`write_har`): one entry per request or logout (logins cause no
proxy traffic), made by mitmproxy's ``SaveHar.flow_entry`` from a flow with the request
``<method> <scheme>://<host><path>``, headers ``Host`` and ``Authorization: Bearer <token>``,
``startedDateTime`` = ``base + time``. The trace has no responses, so every entry has the
``status: 0`` response that mitmproxy writes for a flow without one. HAR custom fields (the
spec allows names starting with ``_``) keep what HAR has no place for: ``_kind``, ``_user`` and
``_token`` (the token label) on each entry, and ``_trace`` (the trace header,
:meth:`TraceMeta.to_json`) on ``log``. ``mitmdump -C file.har`` replays the file (mitmproxy
client replay: requests go to their URL, in order, without the original timing).

Reading (:func:`read_har`, :func:`har_to_trace`): the JSON is checked first so that bad input
gets its location (``x.har:3:14: broken JSON``, ``x.har: log.entries[2].request.url: missing
field``), then mitmproxy's ``mitmproxy.io.har.request_to_flow`` (what ``mitmdump -C`` uses)
turns each entry into a flow, and flows become events in ``startedDateTime`` order: the
bearer token (or ``_token``) is the token label, its first sight (or first sight after a
logout) emits a login at the same instant, and a request whose ``_kind`` is ``logout`` or whose
path looks like a logout (:data:`scenarios.trace.LOGOUT_PATTERN`) is a logout. Entries without
a bearer token are skipped (or an error), and so are WebSocket (``ws://``, ``wss://``) and
``data:`` URL entries. A URL with non-ASCII characters is read as browsers send it (the host
IDNA-encoded, the rest percent-encoded UTF-8); an IPv6 host keeps its brackets
(``[::1]:8000``), both ways. A naive ``startedDateTime`` is taken as UTC. A recording whose
entries span more than a year (:data:`scenarios.trace.MAX_TRACE_SECONDS`) is refused.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import quote, urlencode, urlsplit, urlunsplit

from mitmproxy import connection, http, version
from mitmproxy.io.har import request_to_flow
from tqdm import tqdm

with warnings.catch_warnings():
    # mitmproxy.addons imports ldap3, which trips pyasn1's DeprecationWarning at import time.
    warnings.simplefilter("ignore", DeprecationWarning)
    from mitmproxy.addons.savehar import SaveHar

from scenarios.trace import (
    MAX_TRACE_SECONDS,
    Event,
    Kind,
    ScenarioError,
    Trace,
    TraceError,
    TraceMeta,
    looks_like_logout,
    span_text,
)

logger = logging.getLogger(__name__)

DEFAULT_BASE: Final = datetime(2019, 12, 1, tzinfo=UTC)  # EClog's first day
CREATOR: Final = "wasm-reclaim scenarios"


class HarError(ScenarioError):
    """Bad HAR input; the message starts with the location."""


# -- writing ---------------------------------------------------------------------------------


def to_har(
    trace: Trace,
    *,
    base: datetime | None = None,
    scheme: Literal["http", "https"] = "http",
    tokens: Mapping[str, str] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """The HAR 1.2 document of ``trace``.

    ``base``: wall-clock time of ``t = 0`` (default ``trace.meta.start``, else 2019-12-01 UTC;
    naive is UTC). ``tokens``: label → real token to put in ``Authorization`` (default: the
    label itself); the label stays in ``_token``.
    """
    base = _aware(base or trace.meta.start or DEFAULT_BASE)
    base_ts = base.timestamp()
    saver = SaveHar()
    seen: set[connection.Server] = set()
    client = connection.Client(
        peername=("127.0.0.1", 0), sockname=("127.0.0.1", 0), timestamp_start=base_ts
    )
    server = connection.Server(address=None)
    entries: list[dict[str, Any]] = []
    for e in tqdm(trace.events, desc="HAR entries", unit=" events", disable=not progress):
        if e.kind == "login":
            continue
        flow = http.HTTPFlow(client, server)
        flow.request = _request(e, scheme, tokens, base_ts + e.time)
        entry = saver.flow_entry(flow, seen)
        if ":" in flow.request.host:  # mitmproxy writes an IPv6 literal without its brackets
            bare = f"{scheme}://{flow.request.host}"
            entry["request"]["url"] = f"{scheme}://[{flow.request.host}]" + entry["request"][
                "url"].removeprefix(bare)
        entry["_kind"] = e.kind
        entry["_user"] = e.user
        entry["_token"] = e.token
        entries.append(entry)
    meta = trace.meta.to_json()
    meta["start"] = base.isoformat()
    return {
        "log": {
            "version": "1.2",
            "creator": {
                "name": CREATOR,
                "version": "1",
                "comment": f"entries made by mitmproxy {version.VERSION} savehar",
            },
            "pages": [],
            "entries": entries,
            "comment": trace.meta.description,
            "_trace": meta,
        }
    }


def write_har(trace: Trace, path: str | Path, **kwargs: Any) -> int:
    """Write :func:`to_har` to ``path``; returns the number of entries."""
    har = to_har(trace, **kwargs)
    with open(path, "w", encoding="utf-8") as f:
        json.dump(har, f, indent=1, ensure_ascii=False)
        f.write("\n")
    return len(har["log"]["entries"])


def _request(e: Event, scheme: str, tokens: Mapping[str, str] | None, ts: float) -> http.Request:
    if e.host.startswith("[") and "]" in e.host:  # an IPv6 literal: [::1] or [::1]:8080
        host, _, port_text = e.host[1:].partition("]")
        port_text = port_text.removeprefix(":")
        if not port_text.isdigit():
            port_text = ""
    else:
        host, _, port_text = e.host.rpartition(":") if ":" in e.host else (e.host, "", "")
        if not port_text.isdigit():
            host, port_text = e.host, ""
    port = int(port_text) if port_text else (443 if scheme == "https" else 80)
    token = tokens.get(e.token, e.token) if tokens else e.token
    fields = [(b"Host", e.host.encode()), (b"Authorization", f"Bearer {token}".encode())]
    if e.method in ("POST", "PUT", "PATCH"):
        fields.append((b"Content-Length", b"0"))
    return http.Request(
        host=host,
        port=port,
        method=e.method.encode(),
        scheme=scheme.encode(),
        authority=b"",
        path=e.path.encode(),
        http_version=b"HTTP/1.1",
        headers=http.Headers(fields),
        content=b"",
        trailers=None,
        timestamp_start=ts,
        timestamp_end=ts,
    )


# -- reading ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class HarReadParams:
    """``missing_token``: what to do with an entry without ``Authorization: Bearer``.
    ``hash_tokens``: use ``h<sha256[:16]>`` of the bearer token as the label (the default), so
    that real credentials from a browser recording do not end up in trace files; False keeps
    the recorded token as it is."""

    missing_token: Literal["skip", "error"] = "skip"
    hash_tokens: bool = True


def read_har(
    path: str | Path, params: HarReadParams | None = None, *, progress: bool = False
) -> Trace:
    """Read a HAR file (``.har``; UTF-8, optional BOM) into a trace."""
    name = str(path)
    raw = Path(path).read_bytes()
    return har_to_trace(load_har(raw, name), name, params, progress=progress)


def load_har(raw: bytes | str, name: str = "<har>") -> dict[str, Any]:
    """Parse HAR JSON; broken JSON is ``name:line:column: broken JSON: …``."""
    text = raw.decode("utf-8-sig", errors="replace") if isinstance(raw, bytes) else raw
    try:
        har = json.loads(text)
    except json.JSONDecodeError as e:
        raise HarError(f"{name}:{e.lineno}:{e.colno}: broken JSON: {e.msg}") from None
    except RecursionError:
        raise HarError(f"{name}: JSON nested too deeply to be a HAR") from None
    if not isinstance(har, dict):
        raise HarError(f"{name}: expected a JSON object with 'log', got {type(har).__name__}")
    return har


def har_to_trace(
    har: Mapping[str, Any],
    name: str = "<har>",
    params: HarReadParams | None = None,
    *,
    progress: bool = False,
) -> Trace:
    """A parsed HAR document → trace (module docstring)."""
    p = params or HarReadParams()
    entries = check_har(har, name)
    rows: list[tuple[datetime, int, http.HTTPFlow, Mapping[str, Any]]] = []
    not_http = 0
    bar = tqdm(entries, desc="HAR entries", unit=" entries", disable=not progress)
    for i, entry in enumerate(bar):
        if entry["request"]["url"].lower().startswith(NOT_HTTP):
            not_http += 1
            continue
        started = _entry_time(entry, name, i)
        request = _with_defaults(entry)
        request["request"]["url"] = _ascii_url(request["request"]["url"],
                                               f"{name}: log.entries[{i}].request.url")
        try:
            flow = request_to_flow(request)
        except Exception as e:  # mitmproxy raises anything from KeyError to ValueError
            raise HarError(f"{name}: log.entries[{i}]: mitmproxy cannot read it: {e!r}") from e
        rows.append((started, i, flow, entry))
    if not_http:
        logger.warning("%s: skipped %d WebSocket and data: URL entries", name, not_http)
    rows.sort(key=lambda r: (r[0], r[1]))
    log = har["log"]
    meta = _meta(log, name)
    base = min(
        [r[0] for r in rows[:1]] + ([meta.start] if meta.start is not None else []),
        default=None,
    )
    if rows and base is not None:
        check_span(base, rows[-1][0], name, rows[-1][1],
                   "the first entry" if base == rows[0][0] else "log._trace.start")
    events = flows_to_events(
        ((round((t - base).total_seconds(), 6) if base else 0.0, f, e, i) for t, i, f, e in rows),
        name,
        p,
    )
    hosts = tuple(dict.fromkeys(e.host for e in events if e.kind != "login"))
    meta = replace(meta, hosts=meta.hosts or hosts, tenants=meta.tenants or hosts, start=base)
    return Trace(tuple(events), meta)  # already in a valid order; re-sorting could break it


def check_span(base: datetime, last: datetime, name: str, i: int, what: str) -> None:
    """Refuse a recording whose entry `i` (at `last`) is more than
    :data:`~scenarios.trace.MAX_TRACE_SECONDS` (a year) after `base` (`what`: which time that
    is). A browser records minutes or hours; dates that span millennia are broken, and an
    experiment on them would run for ages (the limit's docstring)."""
    seconds = (last - base).total_seconds()
    if seconds > MAX_TRACE_SECONDS:
        raise HarError(
            f"{name}: log.entries[{i}].startedDateTime: {last.isoformat()} is "
            f"{span_text(seconds)} after {what} ({base.isoformat()}); a HAR may span at most "
            f"{span_text(MAX_TRACE_SECONDS)}"
        )


def flows_to_events(
    rows: Iterable[tuple[float, http.HTTPFlow, Mapping[str, Any], int]],
    name: str = "<har>",
    params: HarReadParams | None = None,
) -> list[Event]:
    """(time, flow, HAR entry, entry index) in time order → events, logins included."""
    p = params or HarReadParams()
    live: set[str] = set()
    events: list[Event] = []
    skipped = 0
    for t, flow, entry, i in rows:
        req = flow.request
        label = entry.get("_token")
        bearer = _bearer(req.headers.get("authorization", ""))
        if not isinstance(label, str) or not label:
            if bearer is None:
                if p.missing_token == "error":
                    raise HarError(
                        f"{name}: log.entries[{i}].request.headers: no 'Authorization: Bearer'"
                    )
                skipped += 1
                continue
            label = _hashed(bearer) if p.hash_tokens else bearer
        user = entry.get("_user")
        if not isinstance(user, str) or not user:
            user = label
        kind: Kind = "logout" if looks_like_logout(req.path) else "request"
        if entry.get("_kind") in ("request", "logout"):
            kind = entry["_kind"]
        host = req.pretty_host
        if ":" in req.host:  # an IPv6 literal keeps its brackets, as in a URL (mitmproxy's
            host = f"[{req.host}]"  # pretty_host drops them, and may glue the port on)
        elif ":" in host:
            host = f"[{host}]"
        elif not host.isascii():  # mitmproxy decodes IDNA: the host as browsers send it
            host = host.encode("idna").decode("ascii")
        if req.port != (443 if req.scheme == "https" else 80):
            host = f"{host}:{req.port}"
        if label not in live:
            events.append(Event.login(t, user, label, host))
            live.add(label)
        events.append(Event(t, kind, user, label, req.method, host, req.path))
        if kind == "logout":
            live.discard(label)
    if skipped:
        logger.warning("%s: skipped %d entries without 'Authorization: Bearer'", name, skipped)
    return events


def check_har(har: Mapping[str, Any], name: str = "<har>") -> list[dict[str, Any]]:
    """The entries, after checking the fields that the trace needs; errors name the field."""
    if "log" not in har:
        raise HarError(f"{name}: log: missing field (not a HAR file?)")
    log = _field(har, "log", dict, f"{name}: ")
    entries: list[dict[str, Any]] = _field(log, "entries", list, f"{name}: log.")
    for i, entry in enumerate(entries):
        where = f"{name}: log.entries[{i}]"
        if not isinstance(entry, dict):
            raise HarError(f"{where}: expected an object, got {_what(entry)}")
        _field(entry, "startedDateTime", str, f"{where}.")
        req = _field(entry, "request", dict, f"{where}.")
        for f in ("method", "url"):
            if not _field(req, f, str, f"{where}.request."):
                raise HarError(f"{where}.request.{f}: empty")
        if not req["url"].lower().startswith(("http://", "https://", *NOT_HTTP)):
            raise HarError(f"{where}.request.url: {req['url']!r} is not an http(s) URL")
        headers = _field(req, "headers", list, f"{where}.request.")
        for j, h in enumerate(headers):
            ok = (
                isinstance(h, dict)
                and isinstance(h.get("name"), str)
                and isinstance(h.get("value"), str)
            ) or (isinstance(h, list) and len(h) == 2 and all(isinstance(x, str) for x in h))
            if not ok:
                raise HarError(
                    f"{where}.request.headers[{j}]: expected {{name, value}} strings, got {h!r}"
                )
    return entries


NOT_HTTP: Final = ("ws://", "wss://", "data:")
"""URL prefixes of entries that are no HTTP request through the proxy: skipped when read."""


def _ascii_url(url: str, where: str) -> str:
    """`url` as a browser sends it: the host IDNA-encoded, the rest percent-encoded (UTF-8)."""
    if url.isascii():
        return url
    parts = urlsplit(url)
    userinfo, at, hostport = parts.netloc.rpartition("@")
    hostname, colon, port = hostport.partition(":")
    try:
        hostname = hostname if hostname.isascii() else hostname.encode("idna").decode("ascii")
    except UnicodeError as e:
        raise HarError(f"{where}: host {hostname!r} is no valid domain name: {e}") from None
    netloc = _percent_encode(userinfo) + at + hostname + colon + port
    return urlunsplit(parts._replace(netloc=netloc, path=_percent_encode(parts.path),
                                     query=_percent_encode(parts.query),
                                     fragment=_percent_encode(parts.fragment)))


def _percent_encode(text: str) -> str:
    """Non-ASCII characters as UTF-8 percent escapes; the rest as it is."""
    return re.sub(r"[^\x00-\x7f]+", lambda m: quote(m.group(), safe=""), text)


_KINDS: Final[dict[type, str]] = {dict: "an object", list: "a list", str: "a string"}


def _what(value: Any) -> str:
    """A JSON value for an error message: its kind and the start of it."""
    kinds: dict[type, str] = {**_KINDS, bool: "a boolean", int: "a number", float: "a number",
                              type(None): "null"}
    text = json.dumps(value, ensure_ascii=False)
    return f"{kinds.get(type(value), type(value).__name__)} {text[:40]}{'…' * (len(text) > 40)}"


def _field(obj: Mapping[str, Any], key: str, kind: type, where: str) -> Any:
    """`obj[key]`, checked to be of `kind`; the error says which of missing or wrong it is."""
    if key not in obj:
        raise HarError(f"{where}{key}: missing field")
    value = obj[key]
    if not isinstance(value, kind):
        raise HarError(f"{where}{key}: not {_KINDS[kind]} (got {_what(value)})")
    return value


def _entry_time(entry: Mapping[str, Any], name: str, i: int) -> datetime:
    value = entry["startedDateTime"]
    try:
        return _aware(datetime.fromisoformat(value.replace("Z", "+00:00")))
    except ValueError:
        raise HarError(
            f"{name}: log.entries[{i}].startedDateTime: cannot parse {value!r} as ISO-8601"
        ) from None


def _with_defaults(entry: Mapping[str, Any]) -> dict[str, Any]:
    """Fill what mitmproxy's reader needs but traces do not (``time``, ``response``, the
    ``postData.text`` of a form given as ``params``)."""
    out = dict(entry)
    out["request"] = {"httpVersion": "HTTP/1.1", **entry["request"]}
    out["request"]["headers"] = drop_pseudo_headers(entry["request"]["headers"])
    post = out["request"].get("postData")
    if isinstance(post, dict) and not isinstance(post.get("text"), str):
        # HAR may give a form as `params` only; the trace needs no body, but mitmproxy a text.
        params = post.get("params")
        pairs = [(str(q.get("name", "")), str(q.get("value", ""))) for q in params
                 if isinstance(q, dict)] if isinstance(params, list) else []
        out["request"]["postData"] = {**post, "text": urlencode(pairs)}
    out.setdefault("time", 0)
    response = entry.get("response")
    out["response"] = {
        "status": 0,
        "httpVersion": "",
        "headers": [],
        "content": {},
        **(response if isinstance(response, dict) else {}),
    }
    return out


def drop_pseudo_headers(headers: list[Any]) -> list[Any]:
    """HTTP/2 pseudo-headers (`:authority`, `:method`…) as Chrome records them are no header
    fields (mitmproxy refuses them: `Received invalid header name`): the URL carries them."""
    def name(h: Any) -> str:
        return str(h.get("name", "") if isinstance(h, dict) else h[0])

    return [h for h in headers if not name(h).startswith(":")]


def _meta(log: Mapping[str, Any], name: str) -> TraceMeta:
    header = log.get("_trace")
    if isinstance(header, dict):
        where = f"{name}: log._trace"
        try:
            return TraceMeta.from_json({"format": "wasm-reclaim-trace", **header}, where)
        except TraceError as e:
            raise HarError(str(e)) from None
    creator = log.get("creator")
    made_by = creator.get("name") if isinstance(creator, dict) else None
    return TraceMeta(
        name=Path(name).stem,
        description=f"HAR recording{f' by {made_by}' if made_by else ''}",
        extra={"scenario": "har", "source": Path(name).name},
    )


def _hashed(token: str) -> str:
    return "h" + hashlib.sha256(token.encode()).hexdigest()[:16]


def _bearer(value: str) -> str | None:
    scheme, _, token = value.strip().partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


def _aware(dt: datetime) -> datetime:
    return dt if dt.tzinfo is not None else dt.replace(tzinfo=UTC)
