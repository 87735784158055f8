"""Metrics documents on their way from the proxy to the store: the local spool (the shipper,
which delivers it, is `addons.telemetry.shipper`).

The proxy must never wait for the database, must not lose documents, and should not spend its
GIL on database work. So every document goes through a spool directory on local disk, and a
separate process, the *shipper*, delivers it:

    proxy (asyncio loop)                          shipper process
    MetricsLog.write() ── buffer ── flush() ──▶ spool/ ──▶ insert_many ──▶ store
      O(1), no I/O          once a second,        ready       idempotent      MongoDB,
                            in a thread           segments    by `_id`        FerretDB, SQLite

Spool format
------------
A spool is a directory (mode 0700) of *segments*. A segment is a file (mode 0600) of JSON
Lines, UTF-8, one document per line:

    {"c":"requests","d":{"time":1732610000.25,"instance":"shop",…,"_id":"3f9c1a2b7d4e-17"}}

`c` is the collection, `d` the document. `_id` is `<boot_id>-<seq>`: `boot_id` is 48 random
bits drawn by each MetricsLog, `seq` counts its documents, so ids are unique and a document
delivered twice is stored once. A segment is written as `seg-<boot>-<boot_id>-<n>.jsonl.tmp`
(`<boot>`: the MetricsLog's start, ns since the epoch, 20 digits; `<n>`: 8 digits) and renamed
atomically to `….jsonl` when complete, so the shipper only sees complete files and delivers
them in name order: older proxy runs first, then in the order they were written.
`rejected/` holds documents the store refused for good (same format, plus `"e": <error code>`):
the dead letters.

Text that is not UTF-8
----------------------
mitmproxy decodes a request's method and path with `surrogateescape`, so a client that sends
`GET /caf\\xe9` makes a string with a lone surrogate, which neither UTF-8 nor BSON can encode. Such
text is escaped when the document is spooled (`escape_text`): backslashes are doubled, a byte
that `surrogateescape` kept becomes `\\xNN`, any other lone surrogate `\\uXXXX`. The document's
`escaped` field lists the fields so escaped (`unescape_text` gives the original back), so the
store holds valid UTF-8 and nothing is lost. The shipper escapes documents of older spools the
same way, and quarantines any document the store still refuses, so one document never blocks the
others.

Credentials in paths
--------------------
A request path can carry a credential (`/account?access_token=…`). Before a document is
spooled, the values of such parameters in its `path` (query parameters, and `;name=value`
parameters of path segments) become `REDACTED` (`redact_path`): the names in
`REDACT_PARAMS`, any name ending in one of `REDACT_SUFFIXES`, and the names the operator adds
(the addon's `wasm_redact_params`), compared without case, percent-decoded, `-` as `_`.

What can be lost
----------------
Nothing on a clean stop or while the store is away: segments stay on disk until every document
in them is stored. On SIGKILL of the proxy, the documents written since its last flush (at most
one flush interval); an interrupted flush leaves a `.tmp` file that the shipper adopts after a
minute, minus its torn last line. Segments are not fsynced unless `fsync=True`: the kernel
keeps them across a process crash, but a power loss can take the last seconds.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, NamedTuple
from urllib.parse import unquote_plus

logger = logging.getLogger(__name__)

SEGMENT_PREFIX: Final = "seg-"
SEGMENT_SUFFIX: Final = ".jsonl"
TMP_SUFFIX: Final = ".tmp"
REJECTED_DIR: Final = "rejected"
LOCK_FILE: Final = ".shipper.lock"
ORPHAN_AGE_S: Final = 60.0  # a .tmp this old belongs to a proxy that died while flushing
INVALID_COLLECTION: Final = -2  # rejection code: documents for a collection name MongoDB refuses

ESCAPED: Final = "escaped"  # the field listing a document's escaped text fields
REDACTED: Final = "REDACTED"
REDACT_PARAMS: Final = frozenset({
    "access_token", "refresh_token", "id_token", "token", "key", "api_key", "apikey",
    "password", "passwd", "pwd", "secret", "client_secret", "auth", "authorization",
    "sig", "signature", "x_amz_signature", "x_amz_credential", "x_amz_security_token",
    "session", "sessionid", "jsessionid", "phpsessid", "jwt", "code", "ticket",
})
REDACT_SUFFIXES: Final = ("_token", "_secret", "_key", "_password", "_signature")

_encode = json.JSONEncoder(separators=(",", ":"), allow_nan=False, ensure_ascii=False).encode
_encode_ascii = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def private_dir(path: Path) -> Path:
    """Make directory `path` (and its parents) if needed; the directory itself mode 0700."""
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)
    return path


def open_private(path: Path, append: bool = False) -> int:
    """A file descriptor for writing `path`, created with mode 0600."""
    flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else os.O_TRUNC)
    return os.open(path, flags, 0o600)


def segment_name(boot_ns: int, boot_id: str, n: int) -> str:
    """The ready name of segment `n` of the MetricsLog (`boot_ns`, `boot_id`)."""
    return f"{SEGMENT_PREFIX}{boot_ns:020d}-{boot_id}-{n:08d}{SEGMENT_SUFFIX}"


def ready_segments(spool_dir: Path) -> list[Path]:
    """The complete segments of `spool_dir`, in delivery order (oldest first)."""
    try:
        names = [e.name for e in os.scandir(spool_dir)
                 if e.name.startswith(SEGMENT_PREFIX) and e.name.endswith(SEGMENT_SUFFIX)]
    except FileNotFoundError:
        return []
    return [spool_dir / name for name in sorted(names)]


def _finite(value: Any) -> Any:
    """`value` with NaN and ±Infinity (at any depth) replaced by None."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def redact_names(extra: str | Sequence[str] = "") -> frozenset[str]:
    """`REDACT_PARAMS` plus `extra` (comma-separated text or a list), normalized."""
    items = extra.split(",") if isinstance(extra, str) else extra
    return REDACT_PARAMS | {_param_key(n) for n in items if n.strip()}


def _param_key(name: str) -> str:
    return unquote_plus(name).strip().lower().replace("-", "_")


def _redact_pairs(text: str, sep: str, names: frozenset[str]) -> str:
    pairs = text.split(sep)
    for i, pair in enumerate(pairs):
        name, eq, value = pair.partition("=")
        if eq and value:
            key = _param_key(name)
            if key in names or key.endswith(REDACT_SUFFIXES):
                pairs[i] = f"{name}={REDACTED}"
    return sep.join(pairs)


def redact_path(path: str, names: frozenset[str] = REDACT_PARAMS) -> str:
    """`path` with the values of credential parameters (see the module's docstring) replaced
    by `REDACTED`; everything else byte for byte as it was."""
    if "=" not in path:
        return path
    base, qmark, query = path.partition("?")
    if ";" in base:
        base = "/".join(_redact_pairs(seg, ";", names) if ";" in seg else seg
                        for seg in base.split("/"))
    if qmark:
        query = _redact_pairs(query, "&", names)
    return base + qmark + query


def escape_text(text: str) -> str:
    """`text` as valid UTF-8, losslessly: backslashes doubled, a byte `surrogateescape` kept
    (U+DC80..U+DCFF) as `\\xNN`, any other lone surrogate as `\\uXXXX`. Only for text that
    UTF-8 cannot encode; `unescape_text` reverses it."""
    out = []
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            out.append("\\\\")
        elif 0xDC80 <= code <= 0xDCFF:
            out.append(f"\\x{code - 0xDC00:02x}")
        elif 0xD800 <= code <= 0xDFFF:
            out.append(f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


_UNESCAPE = re.compile(r"\\(\\|x[0-9a-f]{2}|u[0-9a-f]{4})")


def unescape_text(text: str) -> str:
    """The original of `escape_text(original)` (a field the document's `escaped` lists)."""

    def one(m: re.Match[str]) -> str:
        code = m.group(1)
        if code == "\\":
            return "\\"
        return chr(0xDC00 + int(code[1:], 16)) if code[0] == "x" else chr(int(code[1:], 16))

    return _UNESCAPE.sub(one, text)


def _utf8(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def escape_document(doc: dict[str, Any]) -> dict[str, Any]:
    """`doc` with every text (keys too, at any depth) that UTF-8 cannot encode escaped, and
    their dotted field names (escaped themselves) in `escaped`; `doc` itself when there is
    none."""
    fields: list[str] = []

    def walk(value: Any, where: str) -> Any:
        if isinstance(value, str):
            if _utf8(value):
                return value
            fields.append(where)
            return escape_text(value)
        if isinstance(value, dict):
            out = {}
            for k, v in value.items():
                key = k if not isinstance(k, str) or _utf8(k) else escape_text(k)
                name = f"{where}.{key}" if where else str(key)
                if key is not k:
                    fields.append(name + ".<key>")
                out[key] = walk(v, name)
            return out
        if isinstance(value, list | tuple):
            return [walk(v, f"{where}.{i}") for i, v in enumerate(value)]
        return value

    escaped = walk(doc, "")
    if not fields:
        return doc
    return {**escaped, ESCAPED: fields}


class Encoded(NamedTuple):
    """Spool lines for a batch (valid UTF-8), and what it took to make them."""

    lines: list[str]
    kept: list[tuple[str, dict[str, Any]]]  # the items the lines encode
    rejected: dict[str, int]                # per collection: documents JSON cannot encode
    escaped: int                            # documents whose text had to be escaped


def encode_lines(batch: Sequence[tuple[str, dict[str, Any]]]) -> Encoded:
    """Spool lines for `batch`.

    NaN and ±Infinity become null: JSON has no such numbers, and FerretDB drops the connection
    on them, which would stall the spool. Text UTF-8 cannot encode (a client's non-UTF-8 bytes,
    kept by surrogateescape) is escaped (`escape_document`). A document JSON cannot encode
    (bytes, a datetime, a cycle) is rejected and left out.
    """
    try:
        lines = [_encode({"c": c, "d": d}) for c, d in batch]
    except (TypeError, ValueError, RecursionError):
        pass
    else:
        # str.isascii() is O(1) in CPython; only a line with other characters is checked
        if all(line.isascii() or _utf8(line) for line in lines):
            return Encoded(lines, list(batch), {}, 0)
    lines = []
    kept: list[tuple[str, dict[str, Any]]] = []
    rejected: dict[str, int] = {}
    escaped = 0
    for c, d in batch:
        try:
            try:
                line = _encode({"c": c, "d": d})
            except ValueError:  # a non-finite float
                d = _finite(d)
                line = _encode({"c": c, "d": d})
            if not (line.isascii() or _utf8(line)):
                d = escape_document(d)
                line = _encode({"c": c, "d": d})
                escaped += 1
        except (TypeError, ValueError, RecursionError):
            rejected[c] = rejected.get(c, 0) + 1
            continue
        lines.append(line)
        kept.append((c, d))
    return Encoded(lines, kept, rejected, escaped)


def read_segment(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The (collection, document) pairs of a segment; malformed lines are skipped and logged.

    A malformed line only comes from a torn write (an adopted `.tmp`) or outside tampering.
    Lone surrogates (`\\udcXX` escapes, from a spool written before text was escaped) are
    escaped now (`escape_document`).
    """
    items: list[tuple[str, dict[str, Any]]] = []
    bad = 0
    with path.open("rb") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                c, d = rec["c"], rec["d"]
                if not (isinstance(c, str) and c and isinstance(d, dict) and "_id" in d):
                    raise ValueError("not a spool record")
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            if b"\\ud" in line:
                d = escape_document(d)
            items.append((c, d))
    if bad:
        logger.warning("spool segment %s: %d malformed lines skipped", path.name, bad)
    return items


@dataclass(frozen=True)
class _Batch:
    paths: list[Path]                        # the segments it holds, to delete once delivered
    items: list[tuple[str, dict[str, Any]]]  # their (collection, document) pairs
    end: int                                 # index of the next segment to read


def _read_batch(paths: Sequence[Path], start: int, docs: int) -> _Batch:
    """Segments from `paths[start]` on until they hold at least `docs` documents (or run out);
    segments that vanished are skipped."""
    group: list[Path] = []
    items: list[tuple[str, dict[str, Any]]] = []
    i = start
    while i < len(paths) and (not group or len(items) < docs):
        with contextlib.suppress(FileNotFoundError):
            items += read_segment(paths[i])
            group.append(paths[i])
        i += 1
    return _Batch(group, items, i)


def count_documents(paths: Sequence[Path]) -> int:
    """Documents in these segments (their line count); vanished files count 0."""
    n = 0
    for path in paths:
        with contextlib.suppress(FileNotFoundError), path.open("rb") as f:
            n += sum(chunk.count(b"\n") for chunk in iter(lambda: f.read(1 << 16), b""))
    return n


# ==== in the proxy ===========================================================================


class MetricsLog:
    """The proxy's side: buffers documents in memory and spools them to segment files.

    `write` runs on the event loop and does no I/O. `flush` (once a second, in a thread via
    `asyncio.to_thread`) writes the buffer to a new segment. Thread-safe: `write` and `flush`
    may run on different threads, and flushes are serialized so segments keep their order.

    Bounded memory: when `max_buffer` documents wait, `write` flushes at once (unless another
    thread is flushing: that flush takes the older documents, a later write the rest). If the
    spool cannot be written (disk full, permissions), documents stay buffered, the flush is
    retried at most once a second, and beyond 2 × `max_buffer` new documents are dropped and
    counted in `dropped`; `last_error` says why.
    """

    def __init__(self, spool_dir: Path, *, max_buffer: int = 50_000, fsync: bool = False,
                 redact: frozenset[str] = REDACT_PARAMS) -> None:
        if max_buffer < 1:
            raise ValueError(f"max_buffer must be at least 1, not {max_buffer}")
        self.spool_dir = private_dir(Path(spool_dir))
        self.max_buffer = max_buffer
        self.fsync = fsync
        self.redact = redact
        self.boot_id = secrets.token_hex(6)
        self._boot_ns = time.time_ns()
        self._id_prefix = f"{self.boot_id}-"
        self._seq = 0
        self._segment = 0
        self._buffer: list[tuple[str, dict[str, Any]]] = []
        self._lock = threading.Lock()        # guards _buffer, _seq and dropped
        self._flush_lock = threading.Lock()  # one flush at a time: segments stay in order
        self._retry_at = 0.0                 # monotonic time before which write() won't flush
        self._failing = False                # the last attempt to write the spool failed
        self.spooled_docs = 0
        self.segments_written = 0
        self.rejected = 0  # documents JSON could not encode (never spooled)
        self.escaped = 0   # documents with text that was not UTF-8, spooled escaped
        self.dropped = 0   # documents refused because the spool was unwritable and memory full
        self.last_error: str | None = None

    def write(self, collection: str, doc: dict[str, Any]) -> None:
        """Queue `doc` (not modified: a copy gets the `_id`) for `collection`. O(1), no I/O
        unless the buffer is full."""
        with self._lock:
            n = len(self._buffer)
            if self._failing and n >= 2 * self.max_buffer:
                self.dropped += 1
                return
            self._seq += 1
            self._buffer.append((collection, {**doc, "_id": f"{self._id_prefix}{self._seq}"}))
        if n + 1 >= self.max_buffer and time.monotonic() >= self._retry_at:
            self._flush(blocking=False)  # a flush already running will take the rest next time

    def flush(self) -> int:
        """Write the buffered documents to a new ready segment; returns how many were written.

        On an OSError the documents go back to the buffer, `last_error` is set, the error is
        logged and 0 is returned.
        """
        return self._flush(blocking=True)

    @property
    def buffered(self) -> int:
        """Documents in memory, not yet in the spool."""
        return len(self._buffer)

    def segments_pending(self) -> int:
        """Ready segments in the spool directory, not yet delivered by the shipper."""
        return len(ready_segments(self.spool_dir))

    def status(self) -> dict[str, Any]:
        """Counters for `wasm.status` and logs."""
        return {"spool": str(self.spool_dir), "buffered": self.buffered,
                "spooled_docs": self.spooled_docs, "segments_written": self.segments_written,
                "segments_pending": self.segments_pending(), "rejected": self.rejected,
                "escaped": self.escaped, "dropped": self.dropped, "last_error": self.last_error}

    def _flush(self, *, blocking: bool) -> int:
        if not self._flush_lock.acquire(blocking=blocking):
            return 0
        try:
            with self._lock:
                batch, self._buffer = self._buffer, []
            if not batch:
                return 0
            batch = [(c, self._redacted(d)) for c, d in batch]
            lines, kept, rejected, escaped = encode_lines(batch)
            if escaped:
                if not self.escaped:  # once: a client can send such bytes at will
                    logger.warning("metrics: %d documents held text that is not UTF-8 (bytes a "
                                   "client sent); stored escaped, see their `escaped` field",
                                   escaped)
                self.escaped += escaped
            if rejected:
                self.rejected += sum(rejected.values())
                self.last_error = f"documents JSON cannot encode were rejected: {rejected}"
                logger.error("metrics spool: %s", self.last_error)
            if not lines:
                return 0
            try:
                self._write_segment(lines)
            except OSError as e:
                with self._lock:
                    self._buffer[:0] = kept
                self._retry_at = time.monotonic() + 1.0
                self._failing = True
                error = f"cannot write the spool {self.spool_dir}: {e.strerror or e}"
                if error != self.last_error:
                    logger.error("metrics %s; %d documents kept in memory", error, len(kept))
                self.last_error = error
                return 0
            self.spooled_docs += len(lines)
            self.segments_written += 1
            self._failing = False
            if self.last_error is not None and self.last_error.startswith("cannot write"):
                logger.info("metrics spool writable again: %s", self.spool_dir)
                self.last_error = None
            return len(lines)
        finally:
            self._flush_lock.release()

    def _redacted(self, doc: dict[str, Any]) -> dict[str, Any]:
        path = doc.get("path")
        if isinstance(path, str) and "=" in path:
            clean = redact_path(path, self.redact)
            if clean != path:
                return {**doc, "path": clean}
        return doc

    def _write_segment(self, lines: list[str]) -> None:
        name = segment_name(self._boot_ns, self.boot_id, self._segment)
        ready = self.spool_dir / name
        tmp = self.spool_dir / (name + TMP_SUFFIX)
        if not self.spool_dir.is_dir():  # removed while we run: make it again
            private_dir(self.spool_dir)
        try:
            with os.fdopen(open_private(tmp), "wb") as f:
                f.write("\n".join(lines).encode())
                f.write(b"\n")
                if self.fsync:
                    f.flush()
                    os.fsync(f.fileno())
            os.replace(tmp, ready)
        except OSError:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._segment += 1
        if self.fsync:
            _fsync_dir(self.spool_dir)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

