"""The embedded store: MongoDB-style collections in one SQLite file per database.

It speaks the part of pymongo's API that wasm-reclaim uses, with pymongo's own result and
error classes, so the rest of the code (and the tests) treat it like a MongoDB server:
`insert_one`, `insert_many(ordered=)`, `find` (filter, projection, `sort`, `limit`) and
`find_one`, `count_documents`, `update_one`/`update_many` (`$set`, `$unset`, `$inc`, `upsert`),
`replace_one`, `delete_one`/`delete_many`, `create_index` (also `unique`), `list_indexes`,
`drop`; `list_collection_names`, `create_collection`, `drop_collection`; the client's `close`
and `drop_database`.

Layout (a documented format of our own, version 1; `README.md`, "What is stored"):

    <directory>/<database>.sqlite3        mode 0600, in a directory of mode 0700, WAL journal
      table "meta"(key TEXT PRIMARY KEY, value TEXT)     layout = 1
      table "c:<collection>"(id TEXT PRIMARY KEY, doc TEXT NOT NULL)   one per collection
      index "i:<collection>:<field>_1…" ON "c:<collection>"(json_extract(doc, '$.<field>'), …)

`doc` is the document as JSON (`_id` included); `id` is the JSON of the `_id`. Types JSON
lacks are one-key objects, as in MongoDB's Extended JSON: a datetime `{"$date": <ms since the
epoch>}` (read back naive, in UTC, as pymongo does), an ObjectId `{"$oid": "<hex>"}`, bytes
`{"$binary": "<base64>"}`, a NaN or infinite float `{"$numberDouble": "NaN"}`. An unsorted
`find` returns rows in the order SQLite reads them (by an index when a condition uses one),
as MongoDB promises no order either.

Queries: a filter's conditions on top-level fields with a number or a string (`=`, `$eq`,
`$gt`, `$gte`, `$lt`, `$lte`, `$in`) and on `_id` (`=`, `$in`) run in SQLite, on the indexes
where there are any; MongoDB compares a number only with numbers and a string only with
strings, and so does the SQL (by `json_type`). Everything else (`$or`, `$ne`, `$exists`,
dotted paths, datetimes, …) is matched in Python on the rows that remain. One difference
from MongoDB: a condition run in SQLite does not look inside an array (`{"instance": "a"}`
does not match `"instance": ["a"]`); our documents never hold arrays in queried fields.
A unique index lets several documents lack the field (MongoDB allows one).

Concurrency: SQLite's WAL journal lets any number of processes read while one writes; writers
wait for each other (up to `BUSY_S`). A read-modify-write (`update_*`, `replace_one`, upserts)
runs in one `BEGIN IMMEDIATE` transaction, so a conditional update (the manager's lease) is
atomic across processes. Each thread gets its own connection.
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import json
import math
import os
import re
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, Final

import orjson
from bson import ObjectId
from pymongo.errors import BulkWriteError, DuplicateKeyError, OperationFailure
from pymongo.results import DeleteResult, InsertManyResult, InsertOneResult, UpdateResult

LAYOUT: Final = 1
SUFFIX: Final = ".sqlite3"
BUSY_S: Final = 30.0
DUPLICATE_KEY: Final = 11000
_CHUNK: Final = 500  # SQL parameters per `IN (…)`

_FIELD = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_DATABASE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,63}")
_EPOCH = dt.datetime(1970, 1, 1)


class UnsupportedQuery(OperationFailure):
    """A filter or update with an operator the embedded store does not implement."""

    def __init__(self, what: str) -> None:
        super().__init__(f"the embedded store does not support {what}")


# ---- encoding -----------------------------------------------------------------------------

_dumps = json.JSONEncoder(separators=(",", ":"), allow_nan=False).encode
_PLAIN: Final = (str, int, bool, type(None))


def _extended(value: Any) -> Any:
    """`value` with the types JSON lacks as Extended-JSON objects (the slow path)."""
    if isinstance(value, dict):
        return {str(k): _extended(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_extended(v) for v in value]
    if isinstance(value, float) and not math.isfinite(value):
        return {"$numberDouble": "NaN" if value != value else
                ("Infinity" if value > 0 else "-Infinity")}
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            value = value.astimezone(dt.UTC).replace(tzinfo=None)
        return {"$date": (value - _EPOCH) // dt.timedelta(milliseconds=1)}
    if isinstance(value, ObjectId):
        return {"$oid": str(value)}
    if isinstance(value, bytes | bytearray | memoryview):
        return {"$binary": base64.b64encode(bytes(value)).decode()}
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise TypeError(f"cannot store a value of type {type(value).__name__}")


def _flat(doc: dict[str, Any]) -> bool:
    """Whether every value of `doc` is a string, an int, a bool, None or a finite float (what
    orjson writes as the stdlib's json does; it would write NaN as null)."""
    for v in doc.values():
        t = type(v)
        if t not in _PLAIN and not (t is float and math.isfinite(v)):
            return False
    return True


def encode(value: Any) -> str:
    """`value` (a document, or an `_id`) as the JSON the store keeps. TypeError or ValueError
    for what it cannot hold.

    A flat document (the metrics) goes through orjson, ~20× faster than the stdlib's json
    here; anything else, or what orjson refuses (an int beyond 64 bits, a lone surrogate),
    through the stdlib's json, and types JSON lacks as Extended-JSON objects."""
    if type(value) is str or (type(value) is dict and _flat(value)):
        try:
            return orjson.dumps(value).decode()
        except TypeError:  # orjson.JSONEncodeError
            pass
    try:
        return _dumps(value)
    except (TypeError, ValueError):
        return _dumps(_extended(value))


def _hook(obj: dict[str, Any]) -> Any:
    if len(obj) == 1:
        (key, value), = obj.items()
        if key == "$date" and isinstance(value, int):
            return _EPOCH + dt.timedelta(milliseconds=value)
        if key == "$oid" and isinstance(value, str):
            return ObjectId(value)
        if key == "$numberDouble" and isinstance(value, str):
            return float(value.replace("Infinity", "inf"))
        if key == "$binary" and isinstance(value, str):
            return base64.b64decode(value)
    return obj


def _unmark(value: Any) -> Any:
    """`value` (fresh from the decoder: changed in place) with the Extended-JSON objects of
    `_extended` turned back into Python values."""
    if type(value) is dict:
        if len(value) == 1:
            back = _hook(value)
            if back is not value:
                return back
        for k, v in value.items():
            if type(v) is dict or type(v) is list:
                value[k] = _unmark(v)
    elif type(value) is list:
        for i, v in enumerate(value):
            if type(v) is dict or type(v) is list:
                value[i] = _unmark(v)
    return value


def decode(text: str) -> Any:
    """A stored JSON text back as Python values."""
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:  # what orjson refuses (a lone surrogate's escape)
        value = json.loads(text)
    return _unmark(value) if '{"$' in text else value


# ---- matching in Python -------------------------------------------------------------------


def _kind(v: Any) -> int:
    """MongoDB's comparison classes: values compare only within one class."""
    if v is None:
        return 0
    if isinstance(v, bool):
        return 5
    if isinstance(v, int | float):
        return 1
    if isinstance(v, str):
        return 2
    if isinstance(v, dict):
        return 3
    if isinstance(v, list):
        return 4
    if isinstance(v, dt.datetime):
        return 6
    if isinstance(v, ObjectId):
        return 7
    return 8


def _norm(v: Any) -> Any:
    if isinstance(v, dt.datetime) and v.tzinfo is not None:
        return v.astimezone(dt.UTC).replace(tzinfo=None)
    if isinstance(v, tuple):
        return list(v)
    return v


_MISSING: Final = object()


def _get(doc: Any, path: str) -> Any:
    for part in path.split("."):
        if isinstance(doc, dict) and part in doc:
            doc = doc[part]
        elif isinstance(doc, list) and part.isdigit() and int(part) < len(doc):
            doc = doc[int(part)]
        else:
            return _MISSING
    return doc


def _equal(a: Any, b: Any) -> bool:
    return _kind(a) == _kind(b) and a == b


def _candidates(value: Any) -> list[Any]:
    """The value itself and, for an array, its elements (MongoDB matches either)."""
    return [value, *value] if isinstance(value, list) else [value]


def _compare(op: str, value: Any, arg: Any) -> bool:
    arg = _norm(arg)
    if op == "$eq":
        if value is _MISSING:
            return arg is None
        return any(_equal(v, arg) for v in _candidates(value))
    if op == "$ne":
        return not _compare("$eq", value, arg)
    if op in ("$in", "$nin"):
        if not isinstance(arg, list | tuple):
            raise UnsupportedQuery(f"{op} with a {type(arg).__name__}")
        found = any(_compare("$eq", value, a) for a in arg)
        return found if op == "$in" else not found
    if op == "$exists":
        return (value is not _MISSING) == bool(arg)
    if op in ("$gt", "$gte", "$lt", "$lte"):
        if value is _MISSING:
            return False
        for v in _candidates(value):
            if _kind(v) != _kind(arg) or _kind(v) in (0, 3, 4):
                continue
            if ((op == "$gt" and v > arg) or (op == "$gte" and v >= arg)
                    or (op == "$lt" and v < arg) or (op == "$lte" and v <= arg)):
                return True
        return False
    raise UnsupportedQuery(f"the operator {op}")


def _field_matches(value: Any, cond: Any) -> bool:
    if isinstance(cond, dict) and cond and all(k.startswith("$") for k in cond):
        for op, arg in cond.items():
            if op == "$not":
                if _field_matches(value, arg):
                    return False
            elif not _compare(op, value, arg):
                return False
        return True
    return _compare("$eq", value, cond)


def matches(doc: Mapping[str, Any], query: Mapping[str, Any]) -> bool:
    """Whether `doc` matches the MongoDB filter `query` (the subset documented above)."""
    for key, cond in query.items():
        if key in ("$and", "$or", "$nor"):
            if not isinstance(cond, list | tuple):
                raise UnsupportedQuery(f"{key} without a list")
            hits = (matches(doc, q) for q in cond)
            ok = all(hits) if key == "$and" else any(hits)
            if ok == (key == "$nor"):
                return False
        elif key.startswith("$"):
            raise UnsupportedQuery(f"the operator {key}")
        elif not _field_matches(_get(doc, key), cond):
            return False
    return True


# ---- SQL ----------------------------------------------------------------------------------


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _table(collection: str) -> str:
    return _quote(f"c:{collection}")


def field_sql(field: str) -> str:
    """The SQL expression of a top-level field; indexes and queries use the same text, so
    SQLite matches one with the other."""
    if not _FIELD.fullmatch(field):
        raise UnsupportedQuery(f"an index or SQL condition on the field {field!r}")
    return f"json_extract(doc, '$.{field}')"


def _type_sql(field: str, value: Any) -> str:
    kinds = "'text'" if isinstance(value, str) else "'integer', 'real'"
    return f"json_type(doc, '$.{field}') IN ({kinds})"


def _sql_value(v: Any) -> bool:
    return (isinstance(v, str) or (isinstance(v, int | float) and not isinstance(v, bool)
                                   and math.isfinite(v)))


_SQL_OPS: Final = {"$eq": "=", "$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}


def _field_where(field: str, cond: Any) -> tuple[list[str], list[Any]] | None:
    """SQL for one field's condition, or None if Python must match it."""
    ops = cond if (isinstance(cond, dict) and cond
                   and all(k.startswith("$") for k in cond)) else {"$eq": cond}
    clauses: list[str] = []
    params: list[Any] = []
    for op, arg in ops.items():
        if field == "_id":
            if op == "$eq":
                try:
                    params.append(encode(arg))
                except (TypeError, ValueError):
                    return None
                clauses.append("id = ?")
            elif op == "$in" and isinstance(arg, list | tuple) and arg:
                try:
                    params.extend(encode(a) for a in arg)
                except (TypeError, ValueError):
                    return None
                clauses.append(f"id IN ({','.join('?' * len(arg))})")
            else:
                return None
            continue
        if not _FIELD.fullmatch(field):
            return None
        expr = field_sql(field)
        if op in _SQL_OPS and _sql_value(arg):
            clauses.append(f"({_type_sql(field, arg)} AND {expr} {_SQL_OPS[op]} ?)")
            params.append(arg)
        elif (op == "$in" and isinstance(arg, list | tuple) and arg
              and all(_sql_value(a) for a in arg)):
            ors = []
            for group in ([a for a in arg if isinstance(a, str)],
                          [a for a in arg if not isinstance(a, str)]):
                if group:
                    ors.append(f"({_type_sql(field, group[0])} AND {expr} IN "
                               f"({','.join('?' * len(group))}))")
                    params.extend(group)
            clauses.append(f"({' OR '.join(ors)})")
        else:
            return None
    return clauses, params


def split_filter(query: Mapping[str, Any] | None
                 ) -> tuple[str, list[Any], dict[str, Any]]:
    """(SQL WHERE text, its parameters, the rest for Python) of a filter."""
    clauses: list[str] = []
    params: list[Any] = []
    rest: dict[str, Any] = {}
    for key, cond in (query or {}).items():
        where = None if key.startswith("$") else _field_where(key, cond)
        if where is None:
            rest[key] = cond
        else:
            clauses.extend(where[0])
            params.extend(where[1])
    return (" AND ".join(clauses) or "1"), params, rest


def _sort_keys(sort: Any) -> list[tuple[str, int]]:
    if sort is None:
        return []
    if isinstance(sort, str):
        return [(sort, 1)]
    out = []
    for item in sort:
        key, direction = (item, 1) if isinstance(item, str) else item
        out.append((str(key), -1 if direction in (-1, "desc", "descending") else 1))
    return out


def _order_sql(keys: list[tuple[str, int]]) -> str:
    """ORDER BY text of a sort, or "" (no order asked: SQLite may then read by an index
    rather than scan in row order, as MongoDB promises no order either)."""
    parts = []
    for key, direction in keys:
        expr = "id" if key == "_id" else field_sql(key)
        parts.append(f"{expr} {'DESC' if direction < 0 else 'ASC'}")
    return f" ORDER BY {', '.join(parts)}" if parts else ""


def project(doc: dict[str, Any], projection: Mapping[str, Any] | Sequence[str] | None
            ) -> dict[str, Any]:
    """`doc` with a find() projection applied (top-level fields)."""
    if not projection:
        return doc
    spec = (dict(projection) if isinstance(projection, Mapping)
            else dict.fromkeys(projection, 1))
    keep_id = bool(spec.pop("_id", 1))
    included = [k for k, v in spec.items() if v not in (0, False)]
    if included:
        out = {"_id": doc["_id"]} if keep_id and "_id" in doc else {}
        for k in included:
            if k in doc:
                out[k] = doc[k]
        return out
    out = {k: v for k, v in doc.items() if k not in spec}
    if not keep_id:
        out.pop("_id", None)
    return out


# ---- the client, databases, collections ---------------------------------------------------


class EmbeddedClient:
    """The embedded store at a directory: a client in pymongo's shape."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._local = threading.local()
        self._lock = threading.Lock()
        self._all: list[sqlite3.Connection] = []
        self._ready: set[str] = set()
        self.created: set[tuple[str, str]] = set()  # (database, collection) tables made

    def __getitem__(self, name: str) -> EmbeddedDatabase:
        return EmbeddedDatabase(self, name)

    def get_database(self, name: str) -> EmbeddedDatabase:
        return self[name]

    def path(self, database: str) -> Path:
        if not _DATABASE.fullmatch(database):
            raise ValueError(f"bad database name {database!r} for the embedded store "
                             "(letters, digits, _ . -)")
        return self.directory / f"{database}{SUFFIX}"

    def connection(self, database: str) -> sqlite3.Connection:
        """This thread's connection to `database`'s file (created as needed)."""
        conns: dict[str, sqlite3.Connection] = self._local.__dict__.setdefault("conns", {})
        conn = conns.get(database)
        if conn is None:
            path = self.path(database)
            if not path.exists():
                with contextlib.suppress(FileExistsError):  # private before SQLite opens it
                    os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            conn = sqlite3.connect(path, timeout=BUSY_S, isolation_level=None,
                                   check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            if database not in self._ready:
                with conn:
                    conn.execute("CREATE TABLE IF NOT EXISTS meta "
                                 "(key TEXT PRIMARY KEY, value TEXT)")
                    conn.execute("INSERT OR IGNORE INTO meta VALUES ('layout', ?)",
                                 (str(LAYOUT),))
                (layout,) = conn.execute("SELECT value FROM meta WHERE key = 'layout'").fetchone()
                if layout != str(LAYOUT):
                    conn.close()
                    raise ValueError(f"{path} has layout {layout} of the embedded store; this "
                                     f"wasm-reclaim reads layout {LAYOUT}")
                self._ready.add(database)
            conns[database] = conn
            with self._lock:
                self._all.append(conn)
        return conn

    def close(self) -> None:
        with self._lock:
            conns, self._all = self._all, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self._local = threading.local()

    def drop_database(self, name: str | EmbeddedDatabase) -> None:
        database = name.name if isinstance(name, EmbeddedDatabase) else name
        self.close()
        self._ready.discard(database)
        self.created = {c for c in self.created if c[0] != database}
        path = self.path(database)
        for extra in ("", "-wal", "-shm"):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(f"{path}{extra}")

    @property
    def address(self) -> str:
        return os.fspath(self.directory)


class EmbeddedDatabase:
    """One database of the embedded store (one SQLite file)."""

    def __init__(self, client: EmbeddedClient, name: str) -> None:
        client.path(name)  # validates the name
        self.client = client
        self.name = name

    def __getitem__(self, name: str) -> EmbeddedCollection:
        return EmbeddedCollection(self, name)

    def __getattr__(self, name: str) -> EmbeddedCollection:
        if name.startswith("_"):
            raise AttributeError(name)
        return self[name]

    def get_collection(self, name: str) -> EmbeddedCollection:
        return self[name]

    @property
    def conn(self) -> sqlite3.Connection:
        return self.client.connection(self.name)

    def list_collection_names(self) -> list[str]:
        rows = self.conn.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                 "AND name LIKE 'c:%'").fetchall()
        return [name[2:] for (name,) in rows]

    def create_collection(self, name: str) -> EmbeddedCollection:
        coll = self[name]
        coll.create()
        return coll

    def drop_collection(self, name: str) -> None:
        self[name].drop()


class _Cursor:
    """find()'s answer: iterate it, or `sort`/`limit` it first."""

    def __init__(self, coll: EmbeddedCollection, query: Mapping[str, Any] | None,
                 projection: Any, sort: Any, limit: int) -> None:
        self._coll, self._query, self._projection = coll, query, projection
        self._sort, self._limit = _sort_keys(sort), limit

    def sort(self, key: Any, direction: int = 1) -> _Cursor:
        self._sort = _sort_keys([(key, direction)] if isinstance(key, str) else key)
        return self

    def limit(self, n: int) -> _Cursor:
        self._limit = n
        return self

    def __iter__(self) -> Iterator[dict[str, Any]]:
        rows = self._coll._select(self._query, self._sort, self._limit)
        return (project(doc, self._projection) for _, doc in rows)


class EmbeddedCollection:
    """One collection: a table of (id, doc)."""

    def __init__(self, database: EmbeddedDatabase, name: str) -> None:
        if not name or "\0" in name or name.startswith("system."):
            raise ValueError(f"bad collection name {name!r}")
        self.database = database
        self.name = name
        self._table = _table(name)

    @property
    def _conn(self) -> sqlite3.Connection:
        return self.database.conn

    def create(self) -> None:
        created = self.database.client.created
        key = (self.database.name, self.name)
        if key not in created:
            self._conn.execute(f"CREATE TABLE IF NOT EXISTS {self._table} "
                               "(id TEXT PRIMARY KEY, doc TEXT NOT NULL)")
            created.add(key)

    def exists(self) -> bool:
        return self._conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND "
                                  "name = ?", (f"c:{self.name}",)).fetchone() is not None

    def drop(self) -> None:
        self._conn.execute(f"DROP TABLE IF EXISTS {self._table}")
        self.database.client.created.discard((self.database.name, self.name))

    # -- indexes --

    def create_index(self, keys: Any, unique: bool = False, **_: Any) -> str:
        fields = _sort_keys(keys)
        name = f"i:{self.name}:" + "_".join(f"{f}_{d}" for f, d in fields)
        cols = ", ".join(f"{field_sql(f)}{' DESC' if d < 0 else ''}" for f, d in fields)
        self.create()
        try:
            self._conn.execute(f"CREATE {'UNIQUE ' if unique else ''}INDEX IF NOT EXISTS "
                               f"{_quote(name)} ON {self._table} ({cols})")
        except sqlite3.IntegrityError as e:
            raise DuplicateKeyError(f"cannot create the unique index {name}: {e}",
                                    DUPLICATE_KEY) from e
        return name.split(":", 2)[2]

    def list_indexes(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = [{"name": "_id_", "key": {"_id": 1}}]
        rows = self._conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index' "
                                  "AND tbl_name = ? AND sql IS NOT NULL", (f"c:{self.name}",))
        for name, sql in rows:
            key = {m.group(1): -1 if m.group(2) else 1 for m in re.finditer(
                r"json_extract\(doc, '\$\.(\w+)'\)( DESC)?", sql)}
            out.append({"name": name.split(":", 2)[2], "key": key,
                        "unique": sql.startswith("CREATE UNIQUE")})
        return out

    # -- reading --

    def select_sql(self, query: Mapping[str, Any] | None, sort: Sequence[tuple[str, int]] = (),
                   limit: int = 0) -> tuple[str, list[Any], dict[str, Any]]:
        """(the SELECT statement, its parameters, the conditions left to Python) of a find."""
        where, params, rest = split_filter(query)
        sql = f"SELECT rowid, doc FROM {self._table} WHERE {where}{_order_sql(list(sort))}"
        if limit and not rest:
            sql += f" LIMIT {int(limit)}"
        return sql, params, rest

    def _select(self, query: Mapping[str, Any] | None, sort: Sequence[tuple[str, int]] = (),
                limit: int = 0) -> list[tuple[int, dict[str, Any]]]:
        sql, params, rest = self.select_sql(query, sort, limit)
        try:
            rows = self._conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return []
            raise
        out = []
        for rowid, text in rows:
            doc = decode(text)
            if rest and not matches(doc, rest):
                continue
            out.append((rowid, doc))
            if limit and len(out) >= limit:
                break
        return out

    def find(self, filter: Mapping[str, Any] | None = None, projection: Any = None,
             *, sort: Any = None, limit: int = 0, **_: Any) -> _Cursor:
        return _Cursor(self, filter, projection, sort, limit)

    def find_one(self, filter: Mapping[str, Any] | None = None,
                 projection: Any = None, *, sort: Any = None, **_: Any) -> dict[str, Any] | None:
        return next(iter(self.find(filter, projection, sort=sort, limit=1)), None)

    def count_documents(self, filter: Mapping[str, Any] | None = None) -> int:
        where, params, rest = split_filter(filter)
        if rest:
            return len(self._select(filter))
        try:
            (n,) = self._conn.execute(f"SELECT COUNT(*) FROM {self._table} WHERE {where}",
                                      params).fetchone()
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return 0
            raise
        return int(n)

    def estimated_document_count(self) -> int:
        return self.count_documents({})

    # -- writing --

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn
        self.create()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    @staticmethod
    def _row(doc: dict[str, Any]) -> tuple[str, str]:
        if "_id" not in doc:
            doc["_id"] = ObjectId()
        return encode(doc["_id"]), encode(doc)

    def _duplicate(self, e: sqlite3.IntegrityError, doc: Mapping[str, Any]) -> DuplicateKeyError:
        return DuplicateKeyError(f"E11000 duplicate key error collection: {self.name} "
                                 f"({e}) _id: {doc.get('_id')!r}", DUPLICATE_KEY,
                                 {"code": DUPLICATE_KEY, "errmsg": str(e)})

    def insert_one(self, document: dict[str, Any]) -> InsertOneResult:
        row = self._row(document)
        try:
            with self._write() as conn:
                conn.execute(f"INSERT INTO {self._table} (id, doc) VALUES (?, ?)", row)
        except sqlite3.IntegrityError as e:
            raise self._duplicate(e, document) from e
        return InsertOneResult(document["_id"], True)

    def insert_many(self, documents: Iterable[dict[str, Any]], ordered: bool = True,
                    **_: Any) -> InsertManyResult:
        docs = list(documents)
        rows = [self._row(d) for d in docs]
        errors: list[dict[str, Any]] = []
        inserted = 0
        with self._write() as conn:
            sql = f"INSERT INTO {self._table} (id, doc) VALUES (?, ?)"
            try:  # the common case: no duplicates, one statement
                conn.execute("SAVEPOINT batch")
                conn.executemany(sql, rows)
                conn.execute("RELEASE batch")
                inserted = len(rows)
            except sqlite3.IntegrityError:
                conn.execute("ROLLBACK TO batch")
                conn.execute("RELEASE batch")
                for index, row in enumerate(rows):
                    try:
                        conn.execute(sql, row)
                        inserted += 1
                    except sqlite3.IntegrityError as e:
                        errors.append({"index": index, "code": DUPLICATE_KEY, "errmsg":
                                       str(self._duplicate(e, docs[index])), "op": docs[index]})
                        if ordered:
                            break
        if errors:
            raise BulkWriteError({"writeErrors": errors, "writeConcernErrors": [],
                                  "nInserted": inserted, "nUpserted": 0, "nMatched": 0,
                                  "nModified": 0, "nRemoved": 0, "upserted": []})
        return InsertManyResult([d["_id"] for d in docs], True)

    def insert_new(self, documents: list[dict[str, Any]]) -> int:
        """Insert the documents whose `_id` (and unique keys) are not there yet, in one
        transaction; returns how many were inserted. TypeError or ValueError (nothing
        written) for a document the store cannot hold."""
        rows = [self._row(d) for d in documents]
        with self._write() as conn:
            before = conn.total_changes
            conn.executemany(f"INSERT OR IGNORE INTO {self._table} (id, doc) VALUES (?, ?)",
                             rows)
            return conn.total_changes - before

    def _delete(self, query: Mapping[str, Any] | None, limit: int) -> DeleteResult:
        where, params, rest = split_filter(query)
        if not self.exists():
            return DeleteResult({"n": 0}, True)
        with self._write() as conn:
            if not rest and not limit:
                n = conn.execute(f"DELETE FROM {self._table} WHERE {where}", params).rowcount
            else:
                ids = [rowid for rowid, _ in self._select(query, limit=limit)]
                n = 0
                for start in range(0, len(ids), _CHUNK):
                    chunk = ids[start:start + _CHUNK]
                    n += conn.execute(f"DELETE FROM {self._table} WHERE rowid IN "
                                      f"({','.join('?' * len(chunk))})", chunk).rowcount
        return DeleteResult({"n": n}, True)

    def delete_one(self, filter: Mapping[str, Any]) -> DeleteResult:
        return self._delete(filter, 1)

    def delete_many(self, filter: Mapping[str, Any]) -> DeleteResult:
        return self._delete(filter, 0)

    def _update(self, query: Mapping[str, Any], change: Any, upsert: bool, limit: int,
                replace: bool) -> UpdateResult:
        if replace:
            if any(str(k).startswith("$") for k in change):
                raise ValueError("replacement document must not contain update operators")
        elif not change or not all(str(k).startswith("$") for k in change):
            raise ValueError("update only works with $ operators")
        matched = modified = 0
        upserted: Any = None
        with self._write() as conn:
            for rowid, doc in self._select(query, limit=limit):
                matched += 1
                new = self._changed(doc, change, replace)
                if new != doc:
                    conn.execute(f"UPDATE {self._table} SET doc = ? WHERE rowid = ?",
                                 (encode(new), rowid))
                    modified += 1
            if not matched and upsert:
                seed = {k: v for k, v in query.items()
                        if not k.startswith("$") and not isinstance(v, dict)}
                new = self._changed(seed, change, replace)
                if "_id" in seed:
                    new["_id"] = seed["_id"]
                try:
                    conn.execute(f"INSERT INTO {self._table} (id, doc) VALUES (?, ?)",
                                 self._row(new))
                except sqlite3.IntegrityError as e:
                    raise self._duplicate(e, new) from e
                upserted = new["_id"]
        raw: dict[str, Any] = {"n": matched + (upserted is not None), "nModified": modified}
        if upserted is not None:
            raw["upserted"] = upserted
        return UpdateResult(raw, True)

    @staticmethod
    def _changed(doc: dict[str, Any], change: Mapping[str, Any], replace: bool
                 ) -> dict[str, Any]:
        if replace:
            new = dict(change)
            if "_id" in doc:
                new = {"_id": doc["_id"], **{k: v for k, v in new.items() if k != "_id"}}
            return new
        new = dict(doc)
        for op, fields in change.items():
            for key, value in fields.items():
                if "." in key:
                    raise UnsupportedQuery(f"{op} of the dotted field {key!r}")
                if op == "$set":
                    new[key] = value
                elif op == "$unset":
                    new.pop(key, None)
                elif op == "$inc":
                    new[key] = new.get(key, 0) + value
                else:
                    raise UnsupportedQuery(f"the update operator {op}")
        return new

    def update_one(self, filter: Mapping[str, Any], update: Mapping[str, Any],
                   upsert: bool = False, **_: Any) -> UpdateResult:
        return self._update(filter, update, upsert, 1, replace=False)

    def update_many(self, filter: Mapping[str, Any], update: Mapping[str, Any],
                    upsert: bool = False, **_: Any) -> UpdateResult:
        return self._update(filter, update, upsert, 0, replace=False)

    def replace_one(self, filter: Mapping[str, Any],
                    replacement: Mapping[str, Any], upsert: bool = False,
                    **_: Any) -> UpdateResult:
        return self._update(filter, replacement, upsert, 1, replace=True)
