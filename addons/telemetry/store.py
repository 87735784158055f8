"""The metrics store: the one module that knows how to open, index, write and read it.

A store is named by one string (the `wasm_store` option, or the shipper's `--store`):

- `mongodb://…` or `mongodb+srv://…`: a MongoDB-protocol server (MongoDB, FerretDB) through
  pymongo;
- anything else: a directory holding the *embedded store* (`addons/telemetry/embedded.py`):
  MongoDB-style collections in one SQLite file per database, in a documented layout of ours
  (README, "What is stored"), with pymongo's API, results and errors for what we use, and the
  same indexes as on a server (JSON-expression indexes), so the manager's queries are answered
  from an index there too.

Concurrency: any number of processes read the embedded store while others write (SQLite's WAL
journal; `tests/test_store.py` checks it); writers take turns.

Both kinds of database are typed as pymongo's `Database`; the embedded store's duck-types the
subset we use.

Readers get pandas frames (`read_frame`, `samples_since`); pandas is imported on first use so
the shipper process stays small.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, cast

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
DECISIONS: Final = "decisions"    # the manager's restart decisions, with what it did
USERS: Final = "users"            # the auth server's users (unique `name`)
TOKENS: Final = "tokens"          # the auth server's tokens, hashed (unique `hash`)
PROXIES: Final = "proxies"        # each proxy's admin URL and heartbeat (`_id`: the proxy id)
LEASES: Final = "leases"          # which manager is active, until when (`_id`: the lease name)
# The samples again, one document per proxy and delivery, column by column: the manager's inbox
# (`records.sample_batch`), kept SAMPLE_BATCH_RETENTION_S.
SAMPLE_BATCHES: Final = "sample_batches"
# Every decision of the manager (keeps too), one document per pass, column by column
# (`records.decision_batches`; `read_decisions` gives them back one per decision).
DECISION_BATCHES: Final = "decision_batches"

COLLECTIONS: Final = (REQUESTS, AUTH_CALLS, SAMPLES, RESTARTS, DECISIONS, USERS, TOKENS,
                      PROXIES, LEASES, SAMPLE_BATCHES, DECISION_BATCHES)

# Collections read by (proxy, instance, time): each gets that compound index.
BY_INSTANCE_TIME: Final = (REQUESTS, AUTH_CALLS, SAMPLES, RESTARTS, DECISIONS)
# Collections of one document per key, replaced rather than inserted (`register`).
REGISTRIES: Final = (PROXIES,)
# Time series that the shippers' retention prunes (`wasm_retention`, embedded store).
TIME_SERIES: Final = (SAMPLES, REQUESTS, AUTH_CALLS)
# What the manager writes, by `time` on the samples' clock, which its own retention
# (`python -m manager run --retention`) prunes, on either kind of store: every decision (a
# document per pass) and the restart decisions. (`restarts`, the proxies' record of what was
# done, and the registries stay.)
MANAGER_RECORDS: Final = (DECISION_BATCHES, DECISIONS)
# (collection, field) pairs with a unique index, used by the auth server.
UNIQUE_KEYS: Final = ((USERS, "name"), (TOKENS, "hash"))

DATABASE_FORBIDDEN: Final = '/\\. "$'
"""Characters a MongoDB database name cannot contain (with NUL; MongoDB's naming rules)."""

DATABASE_MAX_BYTES: Final = 63
"""MongoDB's database names are shorter than 64 bytes."""

_EMBEDDED_DATABASE: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")
"""What the embedded store takes (addons.telemetry.embedded: the name is a file's)."""



def database_problem(name: str, *, embedded: bool = False) -> str | None:
    """What is wrong with `name` as a database name (MongoDB's rules, and the embedded
    store's with `embedded`), in a few words; None if nothing."""
    if not name:
        return "a database name cannot be empty"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "a database name cannot contain control characters (nor NUL)"
    bad = sorted({c for c in name if c in DATABASE_FORBIDDEN}, key=name.index)
    if bad:
        return (f"a database name cannot contain {' '.join(map(repr, bad))} (MongoDB's rule: "
                "none of / \\ . \" $, a space or NUL)")
    size = len(name.encode("utf-8", "surrogatepass"))
    if size > DATABASE_MAX_BYTES:
        return f"a database name has at most {DATABASE_MAX_BYTES} bytes, this one {size}"
    if embedded and not _EMBEDDED_DATABASE.fullmatch(name):
        return ("the embedded store takes letters, digits, _ and - in a database name (not "
                "first: -)")
    return None


# How long (wall seconds after delivery) a shipper keeps its proxy's sample batches. A manager
# whose passes are further apart reads `samples` instead (it sees a hole in the sequence).
SAMPLE_BATCH_RETENTION_S: Final = 60.0
# Any shipper deletes every proxy's batches this old (those of a proxy that never came back:
# its own shipper prunes them no more); far beyond the retention, so clocks may disagree.
SAMPLE_BATCH_ABANDONED_S: Final = 10 * SAMPLE_BATCH_RETENTION_S

MONGO_SCHEMES: Final = ("mongodb://", "mongodb+srv://")
_MONTY_IDENT: Final = ".monty.storage"  # in the store directory of wasm-reclaim before 2026-11

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
    its SQLite file if needed and made private (mode 0700); a directory holding an old montydb
    store is a one-line `ValueError`, and so is an empty `store`. Close with
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


def embedded_exists(store: str, database: str = DATABASE) -> bool:
    """Whether directory `store` holds database `database` of the embedded store (or an old
    montydb store, which `open_store` then names)."""
    from addons.telemetry.embedded import SUFFIX

    path = Path(store).expanduser()
    return (path / f"{database}{SUFFIX}").is_file() or (path / _MONTY_IDENT).exists()


def _open_embedded(path: Path, database: str) -> Database:
    from addons.telemetry.embedded import EmbeddedClient

    if (path / _MONTY_IDENT).exists():
        raise ValueError(f"{path} holds a store of an older wasm-reclaim (montydb), which this "
                         "one no longer reads: move it aside or delete it")
    path.mkdir(mode=0o700, parents=True, exist_ok=True)  # private: documents and token hashes
    if path.stat().st_mode & 0o077:
        os.chmod(path, 0o700)
    db: Any = EmbeddedClient(path)[database]
    db.conn  # noqa: B018  (opens the file: a bad one fails here, not on first use)
    return cast(Database, db)


def close_store(db: Database) -> None:
    """Close the client behind `db` (its connections, or the embedded store's files)."""
    db.client.close()


def is_embedded(db: Database) -> bool:
    """Whether `db` is the embedded store rather than a MongoDB-protocol server."""
    return not isinstance(db, _Database)


def ensure_indexes(db: Database) -> None:
    """Create the collections and the indexes the manager and the auth server rely on;
    idempotent. (proxy, instance, time) and time alone on `BY_INSTANCE_TIME` (the manager asks
    for new samples of every instance: time > its cursor), unique `users.name` and
    `tokens.hash`. Raises pymongo's errors when the server is unreachable."""
    if is_embedded(db):
        embedded: Any = db
        for name in COLLECTIONS:
            embedded[name].create()
    for name in BY_INSTANCE_TIME:
        db[name].create_index([("proxy", pymongo.ASCENDING), ("instance", pymongo.ASCENDING),
                               ("time", pymongo.ASCENDING)])
        db[name].create_index("time")
    for name, key in UNIQUE_KEYS:
        db[name].create_index(key, unique=True)
    db[SAMPLE_BATCHES].create_index("time")
    db[SAMPLE_BATCHES].create_index([("proxy", pymongo.ASCENDING),
                                     ("shipped_at", pymongo.ASCENDING)])
    db[DECISION_BATCHES].create_index("time")


# ---- writing ------------------------------------------------------------------------------


def valid_collection_name(name: str) -> bool:
    """Whether MongoDB (and the embedded store) accept `name` for a collection of ours."""
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
    """One `INSERT OR IGNORE` transaction; if a document cannot be encoded, one by one."""
    coll: Any = db[collection]
    try:
        inserted = coll.insert_new(docs)
    except (TypeError, ValueError):
        inserted = 0
        rejected: list[tuple[dict[str, Any], int]] = []
        for doc in docs:
            try:
                inserted += coll.insert_new([doc])
            except (TypeError, ValueError):
                rejected.append((doc, INVALID_DOCUMENT))
        return Delivery(inserted, len(docs) - inserted - len(rejected), rejected)
    return Delivery(inserted, len(docs) - inserted)


@dataclass
class BatchWriter:
    """Who writes sample batches (`insert_samples`): `run` names the writer (random, one per
    shipper process), `seq` the last batch number written for each proxy."""

    run: str = field(default_factory=lambda: os.urandom(6).hex())
    seq: dict[str, int] = field(default_factory=dict)


def insert_samples(db: Database, docs: list[dict[str, Any]], writer: BatchWriter,
                   shipped_at: float) -> Delivery:
    """Insert `samples` documents (each with an `_id`, as `insert_new`), then one
    `sample_batches` document per proxy holding the same documents (those the store refused
    excepted). The batches are written after the samples, so a reader that finds a batch finds
    its samples too. A batch number is used once even if writing the batch fails (the reader
    then sees a hole and reads `samples`)."""
    from addons.telemetry import records

    delivery = insert_new(db, SAMPLES, docs)
    refused = {id(d) for d, _ in delivery.rejected}
    by_proxy: dict[str, list[dict[str, Any]]] = {}
    for doc in docs:
        proxy = doc.get("proxy")
        if id(doc) not in refused and isinstance(proxy, str):
            by_proxy.setdefault(proxy, []).append(doc)
    batches = []
    for proxy, group in by_proxy.items():
        seq = writer.seq[proxy] = writer.seq.get(proxy, 0) + 1
        batches.append(records.sample_batch(proxy, writer.run, seq, group, shipped_at))
    insert_new(db, SAMPLE_BATCHES, batches)
    return delivery


def read_sample_batches(db: Database, after: float, *, columns: bool = True,
                        exclude: Sequence[str] = ()) -> list[dict[str, Any]]:
    """The `sample_batches` documents whose newest sample is later than `after` (all of them
    for -inf), except those whose `_id` is in `exclude` (read before), columns still packed
    (`records.unpack_columns`; without them if not `columns`)."""
    query: dict[str, Any] = {} if after == -float("inf") else {"time": {"$gt": after}}
    if exclude:
        query["_id"] = {"$nin": list(exclude)}
    return list(db[SAMPLE_BATCHES].find(query, None if columns else {"columns": 0}))


def prune_sample_batches(db: Database, proxies: Sequence[str] | None, cutoff: float) -> int:
    """Delete the sample batches of `proxies` (None: of every proxy) delivered before `cutoff`
    (wall clock)."""
    if proxies is not None and not proxies:
        return 0
    query: dict[str, Any] = {"shipped_at": {"$lt": cutoff}}
    if proxies is not None:
        query["proxy"] = {"$in": list(proxies)}
    return int(db[SAMPLE_BATCHES].delete_many(query).deleted_count)


def delete_sample_batches(db: Database, ids: Sequence[str]) -> int:
    """Delete the sample batches whose `_id` is in `ids` (the active manager's, once it has
    decided on them: the inbox then holds only what no pass has read, which a server that
    answers no query from an index scans fast). Returns how many."""
    if not ids:
        return 0
    return int(db[SAMPLE_BATCHES].delete_many({"_id": {"$in": list(ids)}}).deleted_count)


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
    # Renewing first: the active manager's every pass is one round trip.
    renewed = db[LEASES].update_one({"_id": name, "holder": holder},
                                    {"$set": {"expires": expires, "renewed_at": now}})
    if renewed.matched_count:
        return True
    try:
        db[LEASES].insert_one(records.lease(name, holder, expires, now, now))
        return True
    except DuplicateKeyError:
        pass
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


def read_decisions(db: Database, query: Mapping[str, Any] | None = None
                   ) -> list[dict[str, Any]]:
    """Every decision of the manager (keeps and restarts), one `decisions` document each, from
    the `decision_batches` matching `query` (all by default: `{"time": {"$gt": t}}` for the
    passes after t on the samples' clock), by pass (`decided_at`, `seq`, `part`) and in each
    pass in the order decided. The restart decisions among them are also in `decisions`."""
    from addons.telemetry import records

    batches = list(db[DECISION_BATCHES].find(dict(query or {})))
    batches.sort(key=lambda b: (b.get("decided_at") or 0.0, str(b.get("manager")),
                                b.get("seq") or 0, b.get("part") or 0))
    return [doc for b in batches for doc in records.unpack_documents(b)]


def decisions_frame(db: Database, query: Mapping[str, Any] | None = None) -> pd.DataFrame:
    """`read_decisions` as a frame, one row per decision (no `_id` column)."""
    import pandas as pd

    docs = read_decisions(db, query)
    if not docs:
        return pd.DataFrame(columns=["instance", "time", "action", "reason"])
    return pd.DataFrame.from_records(docs).drop(columns="_id", errors="ignore")


def samples_since(db: Database, after_time: float, instance: str | None = None) -> pd.DataFrame:
    """`samples` with `time > after_time` (seconds since the epoch), of one instance or all.

    Sorted by (instance, time), index 0..n-1. Columns: those of the sample documents (at least
    `instance` and `time`, also when empty). Answered from the `time` index.
    """
    query: dict[str, Any] = {"time": {"$gt": after_time}}
    if instance is not None:
        query["instance"] = instance
    frame = read_frame(db, SAMPLES, query)
    if frame.empty:
        return frame.reindex(columns=list(dict.fromkeys(["instance", "time", *frame.columns])))
    return frame.sort_values(["instance", "time"], kind="stable", ignore_index=True)


def delete_before(db: Database, collection: str, cutoff: float) -> int:
    """Delete the documents of `collection` whose numeric `time` is below `cutoff`; returns
    how many (answered from the `time` index)."""
    return int(db[collection].delete_many({"time": {"$lt": cutoff}}).deleted_count)


def prune_manager_records(db: Database, cutoff: float) -> int:
    """Delete the manager's records (`MANAGER_RECORDS`) whose `time` (the samples' clock) is
    below `cutoff`: the decision batches of the passes before it and their restart decisions.
    Returns how many documents."""
    return sum(delete_before(db, name, cutoff) for name in MANAGER_RECORDS)
