"""The shipper: the process that delivers a spool's segments into the store.

The proxy writes documents to a spool directory (`addons.telemetry.spool`); the shipper, a
separate process started by the addon (`python -m addons.telemetry.shipper ship …`), inserts
them into the store idempotently by `_id` and deletes each segment once all its documents are
stored. See `addons.telemetry.spool` for the spool format and what can be lost.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import fcntl
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import IO, Any, Final

from pymongo.errors import OperationFailure

from addons.telemetry import store as st
from addons.telemetry.spool import (
    INVALID_COLLECTION,
    LOCK_FILE,
    ORPHAN_AGE_S,
    REJECTED_DIR,
    SEGMENT_PREFIX,
    SEGMENT_SUFFIX,
    TMP_SUFFIX,
    _encode_ascii,
    _read_batch,
    count_documents,
    open_private,
    private_dir,
    ready_segments,
)

logger = logging.getLogger(__name__)

STORE_ENV: Final = "WASM_RECLAIM_STORE"
"""The environment variable the shipper reads its store from when `--store` is not given: the
addon passes the store this way, so a password in a MongoDB URI is never on a command line."""

# ==== the shipper ============================================================================


class StoreUnavailable(Exception):
    """The store could not take documents now; they stay in the spool."""


def _describe(e: BaseException) -> str:
    """A short reason for logs: the error's type and first line, never document contents."""
    if isinstance(e, OperationFailure):  # its message may quote a document
        return f"{type(e).__name__} code {e.code}"
    text = str(e).splitlines()[0] if str(e) else ""
    if len(text) > 160:
        text = text[:157] + "…"
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


class Shipper:
    """Delivers the ready segments of one spool directory into one store, oldest first.

    A segment is deleted only once all its documents are stored (`store.insert_new`:
    a document stored before, by a shipper stopped between inserting and deleting, is not
    stored again). When the store is away, segments stay, one warning says so, and delivery is
    retried with a back-off of `backoff[0]` seconds doubling to `backoff[1]`.

    `retention` (seconds, 0 = keep all), for the embedded store only (its file on local disk
    would otherwise grow for ever): every `retention_every` seconds, documents of
    `store.TIME_SERIES` with `time` older than the newest `time` delivered minus `retention` are
    deleted. A server keeps everything (use a TTL index there if wanted).

    Use one shipper per spool: `run()` holds a lock file in the spool directory.
    """

    def __init__(self, spool_dir: Path, store: str, *, retention: float = 0.0,
                 database: str = st.DATABASE, timeout: float = 2.0, poll: float = 0.2,
                 backoff: tuple[float, float] = (0.5, 10.0), drain_timeout: float = 10.0,
                 retention_every: float = 10.0, batch_docs: int = 5_000,
                 db: st.Database | None = None) -> None:
        self.spool_dir = private_dir(Path(spool_dir))
        self.store = store
        self.where = st.redact(store)
        self.retention = retention
        self.poll = poll
        self.backoff = backoff
        self.drain_timeout = drain_timeout
        self.retention_every = retention_every
        self.batch_docs = batch_docs
        self._own_db = db is None
        self.db = db if db is not None else st.open_store(store, database, timeout=timeout)
        if retention > 0 and not st.is_embedded(self.db):
            logger.warning("--retention applies to the embedded store only; %s keeps every "
                           "document", self.where)
            self.retention = 0.0
        self.stop_event = threading.Event()
        self._stop_at: float | None = None  # monotonic time of stop()
        self.delivered = 0    # documents stored by this shipper
        self.duplicates = 0   # documents found already stored
        self.rejected = 0     # documents the store refused for good (kept in rejected/)
        self.pruned = 0       # documents deleted by retention
        self.newest_time: float | None = None
        self._indexed = False
        self._down_since: float | None = None  # monotonic start of the current outage
        self._down_logged = 0.0
        self._down_kind: tuple[str, object] = ("", None)
        self._next_prune = 0.0
        self._pool: ThreadPoolExecutor | None = None  # reads the next batch ahead
        self.batches = st.BatchWriter()  # the sample batches this shipper writes
        self._next_batch_prune = 0.0

    # ---- one pass ----

    def ship_ready(self, deadline: float | None = None) -> int:
        """Deliver every ready segment (until `deadline`, monotonic, checked between batches;
        after `stop()`, at most until `drain_timeout` after it).

        Batches of about `batch_docs` documents; the next batch is read and parsed in a helper
        thread while the store takes the current one. Returns the documents delivered. Raises
        StoreUnavailable, after logging it, when the store fails; what was not delivered stays
        in the spool.
        """
        self._adopt_orphans()
        paths = ready_segments(self.spool_dir)
        done = 0
        try:
            if not self._indexed:
                st.ensure_indexes(self.db)
                self._indexed = True
            batch = _read_batch(paths, 0, self.batch_docs)
            while batch.paths and not self._past(deadline):
                ahead = self._reader().submit(_read_batch, paths, batch.end, self.batch_docs) \
                    if batch.end < len(paths) else None
                self._deliver(batch.items, batch.paths[0].name)
                for path in batch.paths:
                    path.unlink(missing_ok=True)
                done += len(batch.items)
                if ahead is None:
                    break
                batch = ahead.result()
        except Exception as e:
            self._outage(e, paths)
            raise StoreUnavailable(_describe(e)) from e
        if self._down_since is not None:
            logger.info("store back: delivered %d documents", done)
            self._down_since = None
        return done

    def _reader(self) -> ThreadPoolExecutor:
        if self._pool is None:
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="spool-reader")
        return self._pool

    def _past(self, deadline: float | None) -> bool:
        now = time.monotonic()
        if deadline is not None and now > deadline:
            return True
        return self._stop_at is not None and now > self._stop_at + self.drain_timeout

    def _deliver(self, items: list[tuple[str, dict[str, Any]]], segment: str) -> None:
        by_collection: dict[str, list[dict[str, Any]]] = {}
        for c, d in items:
            by_collection.setdefault(c, []).append(d)
        for c, docs in by_collection.items():
            if not st.valid_collection_name(c):
                self._keep_rejected(c, [(d, INVALID_COLLECTION) for d in docs], segment)
                continue
            if c in st.REGISTRIES:  # one document per proxy: replaced, not inserted
                self.delivered += st.register(self.db, c, docs)
                continue
            if c == st.SAMPLES:  # and the same again as one batch per proxy (the manager's)
                result = st.insert_samples(self.db, docs, self.batches, time.time())
            else:
                result = st.insert_new(self.db, c, docs)
            if result.rejected:
                self._keep_rejected(c, result.rejected, segment)
            self.delivered += result.inserted
            self.duplicates += result.duplicates
            if c in st.TIME_SERIES:
                times = [t for d in docs if isinstance(t := d.get("time"), int | float)
                         and not isinstance(t, bool)]
                if times:
                    newest = max(times)
                    if self.newest_time is None or newest > self.newest_time:
                        self.newest_time = float(newest)

    def _keep_rejected(self, collection: str, rejected: list[tuple[dict[str, Any], int]],
                       segment: str) -> None:
        folder = private_dir(self.spool_dir / REJECTED_DIR)
        path = folder / (segment or f"rejected-{time.time_ns()}{SEGMENT_SUFFIX}")
        with os.fdopen(open_private(path, append=True), "w", encoding="ascii") as f:
            for doc, code in rejected:
                f.write(_encode_ascii({"c": collection, "d": doc, "e": code}) + "\n")
        self.rejected += len(rejected)
        codes = sorted({code for _, code in rejected})
        logger.error("store %s refused %d documents of %s for good (error codes %s); kept in %s",
                     self.where, len(rejected), collection, codes, path)

    def _outage(self, e: BaseException, paths: list[Path]) -> None:
        """Log an outage: once when it starts, again when its cause changes or every minute."""
        now = time.monotonic()
        kind = (type(e).__name__, getattr(e, "code", None))
        if self._down_since is None:
            self._down_since = now
            again = ""
        elif kind != self._down_kind or now - self._down_logged >= 60.0:
            again = f"still unreachable after {now - self._down_since:.0f} s"
        else:
            return
        self._down_logged, self._down_kind = now, kind
        waiting = count_documents(ready_segments(self.spool_dir))
        logger.warning("store %s %s (%s); %d documents waiting in %s", self.where,
                       again or "unreachable", _describe(e), waiting, self.spool_dir)

    def _adopt_orphans(self) -> None:
        """Make `.tmp` segments left by a proxy killed while flushing ready; make the spool
        directory again if it was removed."""
        now = time.time()
        try:
            self.spool_dir.mkdir(parents=True, exist_ok=True)
            for entry in os.scandir(self.spool_dir):
                name = entry.name
                if not (name.startswith(SEGMENT_PREFIX)
                        and name.endswith(SEGMENT_SUFFIX + TMP_SUFFIX)):
                    continue
                with contextlib.suppress(FileNotFoundError):
                    if now - entry.stat().st_mtime >= ORPHAN_AGE_S:
                        os.replace(entry.path, self.spool_dir / name[: -len(TMP_SUFFIX)])
                        logger.warning("adopted the unfinished spool segment %s (a proxy "
                                       "stopped while writing it)", name)
        except OSError as e:
            logger.warning("spool %s: %s", self.spool_dir, e)

    def prune(self) -> int:
        """Apply retention now (see the class); returns the documents deleted."""
        if self.retention <= 0 or self.newest_time is None:
            return 0
        cutoff = self.newest_time - self.retention
        deleted = 0
        for c in st.TIME_SERIES:
            deleted += st.delete_before(self.db, c, cutoff)
        self.pruned += deleted
        if deleted:
            logger.debug("retention: deleted %d documents older than %.3f", deleted, cutoff)
        return deleted

    # ---- the loop ----

    def stop(self) -> None:
        """Ask `run` to deliver what is ready (for at most `drain_timeout` s) and return.

        Safe from a signal handler or another thread."""
        if self._stop_at is None:
            self._stop_at = time.monotonic()
        self.stop_event.set()

    def run(self, *, once: bool = False, exit_when_idle: bool = False) -> int:
        """Deliver until stopped; returns the exit status.

        `once`: one pass, then 0 (everything ready was delivered) or 1 (the store failed).
        `exit_when_idle`: return 0 as soon as no ready segment is left. Otherwise run until
        `stop()` (SIGTERM/SIGINT in `main`), then drain and return 0.
        """
        with self._spool_lock() as locked:
            if not locked:
                return 0  # stopped while another shipper held the spool
            logger.info("shipping %s to %s", self.spool_dir, self.where)
            try:
                return self._loop(once=once, exit_when_idle=exit_when_idle)
            finally:
                waiting = count_documents(ready_segments(self.spool_dir))
                logger.info("shipper stopped: %d documents delivered, %d already stored, "
                            "%d quarantined in %s, %d waiting in %s", self.delivered,
                            self.duplicates, self.rejected, REJECTED_DIR, waiting,
                            self.spool_dir)

    def _loop(self, *, once: bool, exit_when_idle: bool) -> int:
        delay = self.backoff[0]
        while not self.stop_event.is_set():
            try:
                self.ship_ready()
            except StoreUnavailable:
                if once:
                    return 1
                self.stop_event.wait(delay)
                delay = min(delay * 2, self.backoff[1])
                continue
            delay = self.backoff[0]
            if once or (exit_when_idle and not ready_segments(self.spool_dir)):
                return 0
            self._maybe_prune()
            self.stop_event.wait(self.poll)
        with contextlib.suppress(StoreUnavailable):
            self.ship_ready()  # the drain: bounded by drain_timeout after stop()
        return 0

    def _maybe_prune(self) -> None:
        self._prune_batches()
        if self.retention <= 0 or time.monotonic() < self._next_prune:
            return
        self._next_prune = time.monotonic() + self.retention_every
        try:
            self.prune()
        except Exception as e:
            logger.warning("retention on %s failed (%s); retrying in %.0f s", self.where,
                           _describe(e), self.retention_every)

    def _prune_batches(self, now: float | None = None) -> None:
        """Every `retention_every` s: delete this shipper's sample batches older than
        `store.SAMPLE_BATCH_RETENTION_S` at `now` (wall clock; the samples themselves stay),
        and any proxy's older than `store.SAMPLE_BATCH_ABANDONED_S`."""
        now = time.time() if now is None else now
        if not self.batches.seq or now < self._next_batch_prune:
            return
        self._next_batch_prune = now + self.retention_every
        try:
            st.prune_sample_batches(self.db, sorted(self.batches.seq),
                                    now - st.SAMPLE_BATCH_RETENTION_S)
            st.prune_sample_batches(self.db, None, now - st.SAMPLE_BATCH_ABANDONED_S)
        except Exception as e:
            logger.warning("pruning the sample batches on %s failed (%s); retrying in %.0f s",
                           self.where, _describe(e), self.retention_every)

    @contextlib.contextmanager
    def _spool_lock(self) -> Iterator[bool]:
        """Hold the spool's lock file (waiting for another shipper to finish); yields False if
        stopped while waiting."""
        path = self.spool_dir / LOCK_FILE
        os.close(open_private(path, append=True))
        with path.open("a+") as f:
            waited = False
            while True:
                try:
                    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    if not waited:
                        logger.warning("another shipper (pid %s) is delivering %s; waiting",
                                       _read_pid(f) or "?", self.spool_dir)
                        waited = True
                    if self.stop_event.wait(self.poll):
                        yield False
                        return
            f.seek(0)
            f.truncate()
            f.write(f"{os.getpid()}\n")
            f.flush()
            try:
                yield True
            finally:
                fcntl.flock(f, fcntl.LOCK_UN)

    def close(self) -> None:
        """Stop the reader thread; close the store if this shipper opened it."""
        if self._pool is not None:
            self._pool.shutdown(wait=True)
            self._pool = None
        if self._own_db:
            st.close_store(self.db)


PR_SET_PDEATHSIG: Final = 1  # prctl(2)


def watch_parent(parent: int, stop: Callable[[], None], every: float = 1.0) -> None:
    """Call `stop` once process `parent` is no longer this process's parent (it died and we
    were re-parented), so the shipper never outlives its proxy.

    On Linux the kernel signals us at once (prctl PR_SET_PDEATHSIG, SIGUSR2); the signal also
    comes when the thread that started us ends, so the parent is checked before stopping. A
    thread also checks every `every` seconds, for other systems and a parent that died before
    the prctl.
    """

    def check(*_: object) -> None:
        if os.getppid() != parent:
            stop()

    signal.signal(signal.SIGUSR2, check)
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGUSR2, 0, 0, 0)
    check()

    def poll() -> None:
        while os.getppid() == parent:
            time.sleep(every)
        stop()

    threading.Thread(target=poll, name="parent-watch", daemon=True).start()


def _read_pid(f: IO[str]) -> str:
    f.seek(0)
    return f.read().strip()


def ship(spool_dir: Path, store: str, *, retention: float = 0.0, once: bool = False,
         exit_when_idle: bool = False, **options: Any) -> int:
    """Run a shipper (see `Shipper`, which takes the `options`) and return its exit status."""
    shipper = Shipper(spool_dir, store, retention=retention, **options)
    try:
        return shipper.run(once=once, exit_when_idle=exit_when_idle)
    finally:
        shipper.close()


# ==== command line ===========================================================================


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m addons.telemetry.shipper ship --spool DIR --store STORE [...]`."""
    parser = argparse.ArgumentParser(prog="python -m addons.telemetry.shipper",
                                     description="Deliver spooled metrics documents to a store.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("ship", help="deliver the spool's segments to the store",
                       description="Deliver ready segments until SIGTERM/SIGINT, then drain "
                                   "(at most 10 s) and exit 0; undelivered segments stay.")
    p.add_argument("--spool", type=Path, required=True, help="spool directory")
    p.add_argument("--store", default=os.environ.get(STORE_ENV),
                   help="mongodb://… URI, or a directory for the embedded store (default: "
                        f"${STORE_ENV}, which keeps a password off the command line)")
    p.add_argument("--database", default=st.DATABASE, help="database name (default %(default)s)")
    p.add_argument("--retention", type=float, default=0.0, metavar="S",
                   help="delete samples/requests/auth_calls older than the newest time seen "
                        "minus S seconds, every 10 s (default 0: keep all)")
    p.add_argument("--once", action="store_true",
                   help="one pass; exit 1 if the store failed")
    p.add_argument("--exit-when-idle", action="store_true",
                   help="exit 0 when no segment is left (retrying while the store is away)")
    p.add_argument("--timeout", type=float, default=2.0, metavar="S",
                   help="server selection and connect timeout, seconds (default %(default)s)")
    p.add_argument("--nice", type=int, default=0, metavar="N",
                   help="lower this process's CPU priority by N (the proxy's addon uses 10: "
                        "delivery can wait, serving cannot)")
    p.add_argument("--parent", type=int, metavar="PID",
                   help="deliver what is ready and exit when process PID, our parent, dies "
                        "(the addon passes its own pid)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = parser.parse_args(argv)
    if not args.store:
        parser.error(f"give --store, or set ${STORE_ENV}")
    if args.nice:
        os.nice(args.nice)
    os.umask(0o077)  # the spool's files and the embedded store's: private to the user

    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s [wasm shipper] %(levelname)s: %(message)s")
    if args.retention < 0:
        parser.error("--retention must be 0 or more seconds")
    try:
        shipper = Shipper(args.spool, args.store, retention=args.retention,
                          database=args.database, timeout=args.timeout)
    except Exception as e:  # any store's error (sqlite3's too): one line
        logger.error("cannot open %s: %s", st.redact(args.store), one_line(e))
        return 2
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: shipper.stop())
    if args.parent:
        watch_parent(args.parent, shipper.stop)
    try:
        return shipper.run(once=args.once, exit_when_idle=args.exit_when_idle)
    except Exception as e:  # one line; the addon restarts a shipper that exits
        logger.error("stopped: %s (the spool keeps what is not delivered)", one_line(e))
        return 1
    finally:
        shipper.close()


def one_line(error: BaseException) -> str:
    """`error` as one line: its type, and the first line of its message."""
    text = str(error).strip().splitlines()
    return type(error).__name__ + (f": {text[0]}" if text else "")


if __name__ == "__main__":
    sys.exit(main())
