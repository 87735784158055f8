"""`python -m scenarios store`: what the addon, the manager and the auth server stored, for a
person or a spreadsheet (`list`, `export COLLECTION` as CSV or JSON Lines)."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, TextIO

import pymongo.errors

from addons.telemetry.store import (
    DECISION_BATCHES,
    Database,
    close_store,
    database_problem,
    decisions_frame,
    embedded_exists,
    is_mongo_uri,
    open_store,
    read_frame,
    redact,
)
from scenarios.trace import ScenarioError


def database_name(text: str) -> str:
    """``--database`` as an argparse type: MongoDB's naming rules (a usage error if broken);
    the embedded store's own are checked when it is opened (:func:`opened`)."""
    problem = database_problem(text)
    if problem:
        raise argparse.ArgumentTypeError(f"{text!r}: {problem}")
    return text


@contextmanager
def opened(store: str, database: str, timeout: float) -> Iterator[Database]:
    """The store, opened for reading: an embedded store must exist (reading never creates
    one), and a server that does not answer is a one-line error, as is a database name
    the store cannot take."""
    problem = database_problem(database, embedded=not is_mongo_uri(store))
    if problem:
        raise ScenarioError(f"--database {database!r}: {problem}")
    if not is_mongo_uri(store) and not embedded_exists(store, database):
        raise ScenarioError(f"no embedded store at {store} (give --store: a directory the "
                            f"addon's wasm_store wrote, or a mongodb:// URI)")
    try:
        db = open_store(store, database, timeout=timeout)
    except ValueError as e:
        raise ScenarioError(f"{redact(store)}: {e}") from None
    try:
        yield db
    except pymongo.errors.PyMongoError as e:
        first = str(e).splitlines()[0].split(", Timeout:")[0].split(" (configured timeouts")[0]
        raise ScenarioError(f"{redact(store)}: {first[:200]}") from None
    finally:
        close_store(db)


def list_collections(store: str, database: str = "wasm_reclaim",
                     timeout: float = 5.0) -> list[tuple[str, int]]:
    """(collection, documents) for every collection of the store, by name."""
    with opened(store, database, timeout) as db:
        return [(name, int(db[name].count_documents({})))
                for name in sorted(db.list_collection_names())]


def export_collection(store: str, collection: str, out: TextIO, *, fmt: str = "csv",
                      fields: Sequence[str] | None = None,
                      query: Mapping[str, Any] | None = None, database: str = "wasm_reclaim",
                      timeout: float = 5.0) -> int:
    """Write `collection` (documents matching `query`, by time when they have one) to `out`
    as CSV with a header row, or as JSON Lines; returns the number of documents (rows).

    `decision_batches` is written one row per decision (every decision of the manager, keeps
    too, as a `decisions` document), of the passes `query` selects (by `time`, `decided_at`
    or `manager`)."""
    with opened(store, database, timeout) as db:
        known = sorted(db.list_collection_names())
        if collection not in known:
            raise ScenarioError(f"no collection {collection!r} in {redact(store)} (it has: "
                                f"{', '.join(known) or 'none'})")
        wanted = [*fields, *(["time"] if "time" not in fields else [])] if fields else None
        if collection == DECISION_BATCHES:
            frame = decisions_frame(db, query)
        else:
            frame = read_frame(db, collection, dict(query or {}), wanted)
    if "time" in frame.columns:
        frame = frame.sort_values("time", kind="stable")
    if fields:
        frame = frame.reindex(columns=list(fields))
    if fmt == "jsonl":
        for row in frame.to_dict("records"):
            clean = {k: v for k, v in row.items() if v == v}  # NaN: the field was missing
            out.write(json.dumps(clean, default=str) + "\n")
    else:
        frame.to_csv(out, index=False)
    return len(frame)
