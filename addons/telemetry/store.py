"""The metrics store: the one module that knows how to open, index, write and read it.

A store is named by one string (the `wasm_store` option, or the shipper's `--store`):

- `mongodb://…` or `mongodb+srv://…`: a MongoDB-protocol server (MongoDB, FerretDB) through
  pymongo;
- anything else: a directory holding the *embedded store*, montydb with its SQLite engine (one
  SQLite file per collection, WAL journal). It speaks the subset of pymongo's API we use:
  `insert_one`/`insert_many`, `find` (query, projection, sort), `count_documents`,
  `delete_many`, `drop_collection`. It has no secondary indexes (its `create_index` does
  nothing) and every query decodes every document of the collection in Python (about 0.9 s
  per 20k documents), so keep its collections small: the shipper's `--retention` does that.

Where montydb is slow in ways that grow with the collection, this module goes to its SQLite
files directly, in montydb's own layout (table `documents(k, v)`, k the `_id` in montydb's key
encoding, v the document as JSON), so montydb reads the result as its own:
- `insert_new` (the shipper's writes): `INSERT OR IGNORE` in one transaction, where montydb's
  `insert_many` costs time proportional to the stored documents for each new one;
- `delete_before` (retention) and `samples_since` (the manager's reads): filters with SQLite's
  JSON functions, without decoding every document.
Each falls back to montydb's API for a store montydb set up for BSON. The tests check that
montydb reads, finds, deletes and refuses duplicates of what these write.

Concurrency: the embedded store is safe for one writer process per collection (the shipper for
the metrics, the auth server for `users` and `tokens`) and any number of reader processes
(`tests/test_store.py` checks it). One montydb client must not be shared between threads: each
thread opens its own.

Both kinds of database are typed as pymongo's `Database`; montydb's is untyped and duck-types
the subset above.

Readers get pandas frames (`read_frame`, `samples_since`); pandas is imported on first use so
the shipper process stays small.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import sqlite3
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final

import pymongo
from bson.errors import InvalidDocument
from pymongo.database import Database as _Database
from pymongo.errors import BulkWriteError, DuplicateKeyError

if TYPE_CHECKING:
    import pandas as pd

Database = _Database[dict[str, Any]]

# ---- names: one name for one thing (SPEC §8) ----------------------------------------------

DATABASE: Final = "wasm_reclaim"

REQUESTS: Final = "requests"      # every request the proxy received
AUTH_CALLS: Final = "auth_calls"  # every outbound call of a filter instance to the auth server
SAMPLES: Final = "samples"        # allocated memory and counters, per instance and tick
RESTARTS: Final = "restarts"      # every restart of an instance (who asked, pages before/after)
DECISIONS: Final = "decisions"    # the manager's decisions, with their reasons
USERS: Final = "users"            # the auth server's users (unique `name`)
TOKENS: Final = "tokens"          # the auth server's tokens, hashed (unique `hash`)
PROXIES: Final = "proxies"        # each proxy's admin URL and heartbeat (`_id`: the proxy id)
LEASES: Final = "leases"          # which manager is active, until when (`_id`: the lease name)

COLLECTIONS: Final = (REQUESTS, AUTH_CALLS, SAMPLES, RESTARTS, DECISIONS, USERS, TOKENS,
                      PROXIES, LEASES)

# Collections read by (proxy, instance, time): each gets that compound index.
BY_INSTANCE_TIME: Final = (REQUESTS, AUTH_CALLS, SAMPLES, RESTARTS, DECISIONS)
# Collections of one document per key, replaced rather than inserted (`register`).
REGISTRIES: Final = (PROXIES,)
# Time series that retention prunes (restarts and decisions are few and stay).
TIME_SERIES: Final = (SAMPLES, REQUESTS, AUTH_CALLS)
# (collection, field) pairs with a unique index, used by the auth server.
UNIQUE_KEYS: Final = ((USERS, "name"), (TOKENS, "hash"))

MONGO_SCHEMES: Final = ("mongodb://", "mongodb+srv://")
EMBEDDED_ENGINE: Final = "sqlite"
_MONTY_IDENT: Final = ".monty.storage"  # montydb's file naming a repository's engine

# Query-string options of a MongoDB URI whose values are secrets.
_SECRET_OPTIONS: Final = ("password", "secret", "token", "authmechanismproperties")


# ---- opening ------------------------------------------------------------------------------


def is_mongo_uri(store: str) -> bool:
    """Whether `store` names a MongoDB-protocol server (else it is an embedded-store path)."""
    return store.startswith(MONGO_SCHEMES)


def redact(uri: str) -> str:
    """`uri` without credentials, for logs.

    Drops the `user:password@` part of a MongoDB URI and masks the values of query options
    that carry secrets (`…password…`, `…token…`, `…secret…`, `authMechanismProperties`).
    A path (embedded store) is returned unchanged.
    """
    if not is_mongo_uri(uri):
        return uri
    scheme, _, rest = uri.partition("://")
    end = len(rest)
    for sep in "/?":
        i = rest.find(sep)
        if i != -1:
            end = min(end, i)
    authority, tail = rest[:end], rest[end:]
    authority = authority.rpartition("@")[2]
    path, qmark, query = tail.partition("?")
    if qmark:
        options = []
        for option in query.split("&"):
            name, eq, _value = option.partition("=")
            if eq and any(s in name.lower() for s in _SECRET_OPTIONS):
                option = f"{name}=***"
            options.append(option)
        tail = f"{path}?{'&'.join(options)}"
    return f"{scheme}://{authority}{tail}"


def open_store(store: str, database: str = DATABASE, *, timeout: float = 5.0) -> Database:
    """Open database `database` of `store` (a `mongodb://` URI or an embedded-store directory).

    A URI that names a database (`mongodb://host:27017/NAME`) opens NAME instead.

    For a URI, `timeout` (seconds) bounds server selection and connecting; pymongo connects
    lazily, so an unreachable server shows on the first operation as a
    `pymongo.errors.ConnectionFailure`, never here. For a path, the directory is created with
    the SQLite engine if needed and made private (mode 0700); a directory holding a montydb
    store with another engine is a `ValueError`, and so is an empty `store`. Close with
    `close_store`.
    """
    if not store:
        raise ValueError("no store: give a mongodb:// URI or a directory")
    if is_mongo_uri(store):
        ms = max(1, int(timeout * 1000))
        client: pymongo.MongoClient[dict[str, Any]] = pymongo.MongoClient(
            store, serverSelectionTimeoutMS=ms, connectTimeoutMS=ms, appname="wasm-reclaim")
        # A database named in the URI (mongodb://host/NAME) wins, as MongoDB tools do.
        return client.get_default_database(default=database)
    return _open_embedded(Path(store).expanduser().resolve(), database)


def _open_embedded(path: Path, database: str) -> Database:
    import montydb

    path.mkdir(mode=0o700, parents=True, exist_ok=True)  # private: documents and token hashes
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)
    ident = path / _MONTY_IDENT
    if not ident.exists():
        # Two processes may create the store at once (the shipper and the auth server):
        # montydb writes its two configuration files non-atomically, so serialize that.
        with (path / ".create.lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not ident.exists():
                montydb.set_storage(os.fspath(path), storage=EMBEDDED_ENGINE)
                _private_files(path)
    engine = ident.read_text().strip()
    if engine != EMBEDDED_ENGINE:
        raise ValueError(f"{path} is a montydb store with the {engine!r} engine; wasm-reclaim "
                         f"needs {EMBEDDED_ENGINE!r} (safe for concurrent processes)")
    db: Database = montydb.MontyClient(os.fspath(path))[database]
    return db


def _private_files(path: Path) -> None:
    """Make the files (mode 0600) and folders (0700) under `path` that we own private. SQLite
    gives a collection's journal files the mode of its database file."""
    uid = os.getuid()
    for root, dirs, files in os.walk(path):
        for names, private in ((dirs, 0o700), (files, 0o600)):
            for name in names:
                where = os.path.join(root, name)
                with contextlib.suppress(OSError):
                    info = os.lstat(where)
                    if info.st_uid == uid and info.st_mode & 0o077 and not stat.S_ISLNK(
                            info.st_mode):
                        os.chmod(where, private)


def close_store(db: Database) -> None:
    """Close the client behind `db` (its connections, or the embedded store's files)."""
    db.client.close()


def is_embedded(db: Database) -> bool:
    """Whether `db` is the embedded store (montydb) rather than a MongoDB-protocol server."""
    return not isinstance(db, _Database)


def ensure_indexes(db: Database) -> bool:
    """Create the indexes the manager and the auth server rely on; idempotent.

    On a server: (proxy, instance, time) on `BY_INSTANCE_TIME`, unique `users.name` and
    `tokens.hash`.
    The embedded store has no indexes: there the collections are only created (so readers in
    other processes never meet a half-created SQLite file) and False is returned. Raises
    pymongo's errors when the server is unreachable.
    """
    if is_embedded(db):
        existing = set(db.list_collection_names())
        for name in COLLECTIONS:
            if name not in existing:
                try:
                    db.create_collection(name)
                except Exception:  # another process created it meanwhile (montydb or sqlite3)
                    if name not in db.list_collection_names():
                        raise
        repository: Any = db.client.address  # montydb's: the store's directory
        _private_files(Path(repository))
        return False
    for name in BY_INSTANCE_TIME:
        db[name].create_index([("proxy", pymongo.ASCENDING), ("instance", pymongo.ASCENDING),
                               ("time", pymongo.ASCENDING)])
    for name, key in UNIQUE_KEYS:
        db[name].create_index(key, unique=True)
    return True


# ---- writing ------------------------------------------------------------------------------


def valid_collection_name(name: str) -> bool:
    """Whether MongoDB (and montydb, which makes it a file name) accept `name` for a
    collection of ours."""
    return (0 < len(name) <= 100 and not name.startswith("system.")
            and not any(ch in name for ch in "$\0/\\"))


DUPLICATE_KEY: Final = 11000  # MongoDB's error code for a duplicate `_id`
INVALID_DOCUMENT: Final = -1  # our code for a document the client library cannot encode
# What pymongo raises for a document it cannot encode: never a reason to stop delivering others.
_UNENCODABLE: Final = (InvalidDocument, OverflowError, UnicodeEncodeError)


@dataclass(frozen=True)
class Delivery:
    """What `insert_new` did with a list of documents."""

    inserted: int
    duplicates: int  # already in the collection (same `_id`): delivered before
    # Documents the store refused for good, each with the server's error code (or
    # INVALID_DOCUMENT); retrying them cannot help.
    rejected: list[tuple[dict[str, Any], int]] = field(default_factory=list)


def insert_new(db: Database, collection: str, docs: list[dict[str, Any]]) -> Delivery:
    """Insert the documents (each with an `_id`) that `collection` does not hold yet.

    `collection` must be a valid name (`valid_collection_name`). Idempotent: a document whose
    `_id` is already there counts as a duplicate, so delivering the same documents twice (after
    a crash between inserting and forgetting them) stores each once. A document the store
    refuses for good (an invalid key, say) is returned in `rejected`. Any other error (server
    unreachable, timeout, a locked or unwritable SQLite file) propagates, and nothing can be
    assumed about which documents were stored: call again.
    """
    if not docs:
        return Delivery(0, 0)
    if is_embedded(db):
        return _insert_new_embedded(db, collection, docs)
    try:
        db[collection].insert_many(docs, ordered=False)
    except BulkWriteError as e:
        if e.details.get("writeConcernErrors"):
            raise
        errors = e.details.get("writeErrors", [])
        dups = sum(1 for err in errors if err.get("code") == DUPLICATE_KEY)
        rejected = [(docs[err["index"]], int(err.get("code", 0)))
                    for err in errors if err.get("code") != DUPLICATE_KEY]
        return Delivery(int(e.details.get("nInserted", 0)), dups, rejected)
    except _UNENCODABLE:  # a document BSON can't encode (too large, an int beyond 64 bits,
        return _insert_one_by_one(db, collection, docs)  # a lone surrogate): one at a time
    return Delivery(len(docs), 0)


def _insert_one_by_one(db: Database, collection: str, docs: list[dict[str, Any]]) -> Delivery:
    inserted = dups = 0
    rejected: list[tuple[dict[str, Any], int]] = []
    for doc in docs:
        try:
            db[collection].insert_one(doc)
            inserted += 1
        except DuplicateKeyError:
            dups += 1
        except _UNENCODABLE:
            rejected.append((doc, INVALID_DOCUMENT))
    return Delivery(inserted, dups, rejected)


def _insert_new_embedded(db: Database, collection: str, docs: list[dict[str, Any]]) -> Delivery:
    """Insert into the embedded store's SQLite file directly, in montydb's own layout.

    montydb's `insert_many` reads every stored key into a list and looks each new `_id` up in
    it (time grows with the collection: ~5 s per 20k documents once it holds 10k), encodes
    documents at ~100 µs each, and rolls the whole batch back on a duplicate `_id`. Its
    storage is one SQLite table per collection, `documents(k PRIMARY KEY, v)`, with k the
    `_id` through montydb's key encoding and v the document as JSON, which montydb decodes
    with `json.loads`. So documents go in as `INSERT OR IGNORE` in one transaction: O(log n)
    per document, and a duplicate is skipped and counted. Documents that are not plain JSON,
    or a store montydb set up for BSON, go through montydb's own path.
    """
    from montydb.types import bson as monty_bson

    if monty_bson.bson_used is False:
        try:
            rows = [(monty_bson.id_encode(d["_id"]), _json(d).encode()) for d in docs]
        except (TypeError, ValueError):
            pass
        else:
            return _insert_rows_embedded(db, collection, rows)
    return _insert_new_monty(db, collection, docs)


_json = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode


def _embedded_file(db: Database, collection: str) -> Path:
    """The SQLite file of an embedded-store collection (montydb's layout)."""
    import montydb.storage.sqlite as monty_sqlite

    repository: Any = db.client.address  # montydb's: the store's directory
    return Path(repository) / db.name / f"{collection}{monty_sqlite.SQLITE_DB_EXT}"


def _insert_rows_embedded(db: Database, collection: str,
                          rows: list[tuple[bytes, bytes]]) -> Delivery:
    import montydb.storage.sqlite as monty_sqlite

    path = _embedded_file(db, collection)
    if not path.exists():
        with contextlib.suppress(Exception):  # another process may create it meanwhile
            db.create_collection(collection)  # montydb makes the table, in WAL mode
    table = monty_sqlite.SQLITE_RECORD_TABLE
    # mode=rw: never create a file montydb would take for a collection without its table
    with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=rw", uri=True,
                                            timeout=10.0)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        with conn:
            before = conn.total_changes
            conn.executemany(f"INSERT OR IGNORE INTO [{table}] (k, v) VALUES (?, ?)", rows)
            inserted = conn.total_changes - before
    return Delivery(inserted, len(rows) - inserted)


def _insert_new_monty(db: Database, collection: str, docs: list[dict[str, Any]]) -> Delivery:
    """Through montydb's API. It ignores `ordered=False`: a duplicate against a stored document
    rolls the whole batch back (sqlite3.IntegrityError), one within the batch stores the
    documents before it (montydb's BulkWriteError); then the ids already stored are looked up
    and the rest go in."""
    import montydb.errors

    coll = db[collection]
    try:
        coll.insert_many(docs)
        return Delivery(len(docs), 0)
    except (sqlite3.IntegrityError, montydb.errors.BulkWriteError):
        pass
    present = embedded_ids_present(db, collection, [d["_id"] for d in docs])
    fresh: list[dict[str, Any]] = []
    for doc in docs:
        if doc["_id"] not in present:
            present.add(doc["_id"])
            fresh.append(doc)
    if fresh:
        coll.insert_many(fresh)
    return Delivery(len(fresh), len(docs) - len(fresh))


def embedded_ids_present(db: Database, collection: str, ids: Sequence[Any]) -> set[Any]:
    """Which of `ids` the embedded store's `collection` holds.

    montydb answers `{"_id": {"$in": ids}}` by comparing every stored document with every id
    (minutes for 20k against 20k). So this reads the collection's SQLite file directly, one
    primary-key lookup per id, with montydb's own key encoding; should montydb's layout ever
    change, it falls back to one scan of the collection's ids.
    """
    import montydb.storage.sqlite as monty_sqlite
    from montydb.types import bson as monty_bson

    wanted = {monty_bson.id_encode(i): i for i in ids}
    path = _embedded_file(db, collection)
    if not path.exists():
        return set()
    table = monty_sqlite.SQLITE_RECORD_TABLE
    keys = list(wanted)
    present: set[Any] = set()
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as conn:
            for start in range(0, len(keys), 500):
                chunk = keys[start:start + 500]
                marks = ",".join("?" * len(chunk))
                rows = conn.execute(f"SELECT k FROM [{table}] WHERE k IN ({marks})", chunk)
                present.update(wanted[k] for (k,) in rows if k in wanted)
    except (sqlite3.Error, KeyError, TypeError):
        stored = {d["_id"] for d in db[collection].find({}, {"_id": 1})}
        return {i for i in ids if i in stored}
    return present


def register(db: Database, collection: str, docs: list[dict[str, Any]],
             key: str = "proxy") -> int:
    """Replace, for each value of `key` among `docs`, the document of `collection` whose
    `_id` is that value with the last of them (a registry: one document per key, such as a
    proxy and its latest heartbeat). Returns how many were written. Idempotent."""
    latest: dict[Any, dict[str, Any]] = {}
    for doc in docs:
        if isinstance(doc.get(key), str):
            latest[doc[key]] = doc
    for value, doc in latest.items():
        db[collection].replace_one({"_id": value}, {**doc, "_id": value}, upsert=True)
    return len(latest)


def live_proxies(db: Database, now: float, max_age: float) -> list[dict[str, Any]]:
    """The `proxies` documents whose heartbeat is at most `max_age` seconds before `now`
    (wall clock), sorted by proxy id."""
    docs = [d for d in db[PROXIES].find({}) if isinstance(d.get("heartbeat"), int | float)
            and now - d["heartbeat"] <= max_age and isinstance(d.get("_id"), str)]
    return sorted(docs, key=lambda d: str(d["_id"]))


def acquire_lease(db: Database, name: str, holder: str, now: float, period: float) -> bool:
    """Take or renew lease `name` for `holder` until `now + period` (wall clock).

    True if `holder` holds it now: it was free, expired, or already `holder`'s. One document
    per lease, changed only by a conditional update (atomic on a MongoDB-protocol server), so
    of two managers at most one holds it at a time.
    """
    from addons.telemetry import records

    expires = now + period
    try:
        db[LEASES].insert_one(records.lease(name, holder, expires, now, now))
        return True
    except DuplicateKeyError:
        pass
    except Exception as e:  # montydb's own duplicate error
        if "duplicate" not in str(e).lower():
            raise
    renewed = db[LEASES].update_one({"_id": name, "holder": holder},
                                    {"$set": {"expires": expires, "renewed_at": now}})
    if renewed.matched_count:
        return True
    taken = db[LEASES].update_one(
        {"_id": name, "expires": {"$lt": now}},
        {"$set": {"holder": holder, "expires": expires, "acquired_at": now, "renewed_at": now}})
    return bool(taken.matched_count)


def release_lease(db: Database, name: str, holder: str) -> None:
    """Give lease `name` up if `holder` holds it (a standby takes over at once)."""
    db[LEASES].delete_one({"_id": name, "holder": holder})


# ---- reading ------------------------------------------------------------------------------


def _projection(projection: Mapping[str, Any] | Sequence[str] | None) -> dict[str, Any]:
    """A find() projection that never returns `_id`."""
    if projection is None:
        return {"_id": 0}
    if isinstance(projection, str):
        raise TypeError("projection: a mapping or a sequence of field names, not a string")
    if isinstance(projection, Mapping):
        return {**projection, "_id": 0}
    return {**{field: 1 for field in projection}, "_id": 0}


def read_frame(db: Database, collection: str, query: Mapping[str, Any],
               projection: Mapping[str, Any] | Sequence[str] | None = None) -> pd.DataFrame:
    """The documents of `collection` matching `query` as a frame, one row per document.

    `projection` is a find() projection or a list of field names. The frame never has an
    `_id` column; a field missing from a document is NaN in its row. With no match, the frame
    is empty and has the projected columns when they were listed.
    """
    import pandas as pd

    proj = _projection(projection)
    rows = list(db[collection].find(dict(query), proj))
    if not rows:
        included = [k for k, v in proj.items() if k != "_id" and v not in (0, False)]
        return pd.DataFrame(columns=included)
    return pd.DataFrame.from_records(rows).drop(columns="_id", errors="ignore")


def samples_since(db: Database, after_time: float, instance: str | None = None) -> pd.DataFrame:
    """`samples` with `time > after_time` (seconds since the epoch), of one instance or all.

    Sorted by (instance, time), index 0..n-1. Columns: those of the sample documents (at least
    `instance` and `time`, also when empty). On the embedded store the filter runs in SQLite
    (see `_embedded_since`), about ten times faster than montydb's query engine.
    """
    import pandas as pd

    rows = _embedded_since(db, SAMPLES, after_time, instance) if is_embedded(db) else None
    if rows is None:
        query: dict[str, Any] = {"time": {"$gt": after_time}}
        if instance is not None:
            query["instance"] = instance
        frame = read_frame(db, SAMPLES, query)
    else:
        frame = pd.DataFrame.from_records(rows).drop(columns="_id", errors="ignore")
    if frame.empty:
        return frame.reindex(columns=list(dict.fromkeys(["instance", "time", *frame.columns])))
    return frame.sort_values(["instance", "time"], kind="stable", ignore_index=True)


def delete_before(db: Database, collection: str, cutoff: float) -> int:
    """Delete the documents of `collection` whose numeric `time` is below `cutoff`; returns
    how many. On the embedded store this runs in SQLite (montydb's `delete_many` decodes every
    document in Python: ~1 s per 20k)."""
    if is_embedded(db):
        done = _embedded_delete_before(db, collection, cutoff)
        if done is not None:
            return done
    return db[collection].delete_many({"time": {"$lt": cutoff}}).deleted_count


# ---- the embedded store in SQL ------------------------------------------------------------
# montydb keeps a collection as one SQLite table `documents(k, v)` with v the document as
# JSON (when the store is not set up for BSON). SQLite's JSON functions can then filter on a
# field without montydb decoding every document. Mongo compares a number only with numbers,
# so a row matches only where the field is a JSON number.

_NUMERIC_TIME: Final = ("json_type(CAST(v AS TEXT), '$.time') IN ('integer', 'real') "
                        "AND json_extract(CAST(v AS TEXT), '$.time')")


def _embedded_sql_ok(db: Database) -> bool:
    from montydb.types import bson as monty_bson

    return is_embedded(db) and monty_bson.bson_used is False


def _embedded_since(db: Database, collection: str, after_time: float,
                    instance: str | None) -> list[dict[str, Any]] | None:
    """The documents with a numeric `time > after_time` (and `instance`, if given), or None
    when SQL can't be used here."""
    import montydb.storage.sqlite as monty_sqlite

    if not _embedded_sql_ok(db):
        return None
    path = _embedded_file(db, collection)
    if not path.exists():
        return []
    sql = f"SELECT v FROM [{monty_sqlite.SQLITE_RECORD_TABLE}] WHERE {_NUMERIC_TIME} > ?"
    params: list[Any] = [after_time]
    if instance is not None:
        sql += " AND json_extract(CAST(v AS TEXT), '$.instance') = ?"
        params.append(instance)
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=ro", uri=True)) as conn:
            return [json.loads(v) for (v,) in conn.execute(sql, params)]
    except sqlite3.OperationalError:  # no such table (yet), an older SQLite without JSON
        return None


def _embedded_delete_before(db: Database, collection: str, cutoff: float) -> int | None:
    import montydb.storage.sqlite as monty_sqlite

    if not _embedded_sql_ok(db):
        return None
    path = _embedded_file(db, collection)
    if not path.exists():
        return 0
    sql = f"DELETE FROM [{monty_sqlite.SQLITE_RECORD_TABLE}] WHERE {_NUMERIC_TIME} < ?"
    try:
        with contextlib.closing(sqlite3.connect(f"{path.as_uri()}?mode=rw", uri=True,
                                                timeout=10.0)) as conn, conn:
            return conn.execute(sql, (cutoff,)).rowcount
    except sqlite3.OperationalError as e:
        if "no such" in str(e) or "JSON" in str(e):
            return None
        raise
