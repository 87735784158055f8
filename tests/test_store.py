"""The metrics store: the same tests on FerretDB (MongoDB protocol) and on the embedded store."""

from __future__ import annotations

import math
import multiprocessing
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from bson import ObjectId
from pymongo.errors import BulkWriteError, ConnectionFailure, DuplicateKeyError

from addons.telemetry import records
from addons.telemetry import store as st

from .servers import free_port

# ---- fixtures ------------------------------------------------------------------------------


@pytest.fixture(params=["ferretdb", "embedded"])
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[st.Database]:
    """A fresh database: on FerretDB (a unique name, dropped after) or an embedded store."""
    if request.param == "embedded":
        database = st.open_store(str(tmp_path / "store"))
        yield database
        st.close_store(database)
        return
    uri = request.getfixturevalue("mongo_uri")
    database = st.open_store(uri, f"t_{uuid.uuid4().hex[:12]}")
    yield database
    database.client.drop_database(database.name)
    st.close_store(database)


def sample(instance: str, t: float, pages: int = 17, **extra: Any) -> dict[str, Any]:
    return {"time": t, "instance": instance, "tenant": instance, "generation": 0,
            "allocated_pages": pages, "allocated_bytes": pages * 65536, "requests": int(t),
            "outbound": int(t) // 2, **extra}


# ---- names and opening ---------------------------------------------------------------------


def test_collection_names_are_the_contract() -> None:
    assert st.DATABASE == "wasm_reclaim"
    assert st.COLLECTIONS == ("requests", "auth_calls", "samples", "restarts", "decisions",
                              "users", "tokens", "proxies", "leases", "sample_batches",
                              "decision_batches")
    assert set(st.TIME_SERIES) <= set(st.BY_INSTANCE_TIME) <= set(st.COLLECTIONS)
    assert all(st.valid_collection_name(c) for c in st.COLLECTIONS)


@pytest.mark.parametrize(("uri", "shown"), [
    ("mongodb://127.0.0.1:27017/", "mongodb://127.0.0.1:27017/"),
    ("mongodb://alice:s3cret@db.example:27017/wasm?authSource=admin",
     "mongodb://db.example:27017/wasm?authSource=admin"),
    ("mongodb://alice@h1:1,h2:2", "mongodb://h1:1,h2:2"),
    ("mongodb+srv://u:p%40ss@cluster.example/?retryWrites=true",
     "mongodb+srv://cluster.example/?retryWrites=true"),
    ("mongodb://h/?authMechanism=MONGODB-AWS&authMechanismProperties=AWS_SESSION_TOKEN:tok",
     "mongodb://h/?authMechanism=MONGODB-AWS&authMechanismProperties=***"),
    ("mongodb://h/?tlsCertificateKeyFilePassword=pw&tls=true",
     "mongodb://h/?tlsCertificateKeyFilePassword=***&tls=true"),
    (".wasm-reclaim/store", ".wasm-reclaim/store"),
])
def test_redact_drops_credentials(uri: str, shown: str) -> None:
    assert st.redact(uri) == shown


@pytest.mark.parametrize(("name", "valid"), [
    ("samples", True), ("a.b", True), ("", False), ("bad$name", False), ("a/b", False),
    ("system.users", False), ("x" * 101, False), ("nul\0", False),
])
def test_valid_collection_name(name: str, valid: bool) -> None:
    assert st.valid_collection_name(name) is valid


def test_open_store_creates_the_embedded_store(tmp_path: Path) -> None:
    path = tmp_path / "a" / "b"
    db = st.open_store(str(path))
    assert st.is_embedded(db) and db.name == st.DATABASE
    assert (path / "wasm_reclaim.sqlite3").stat().st_mode & 0o777 == 0o600
    assert path.stat().st_mode & 0o777 == 0o700
    db.samples.insert_many([sample("x", 1.0)])
    st.close_store(db)
    again = st.open_store(str(path), "other")
    assert again.name == "other" and again.samples.count_documents({}) == 0
    st.close_store(again)
    assert st.open_store(str(path)).samples.count_documents({}) == 1


def test_open_store_refuses_an_old_montydb_store_in_one_line(tmp_path: Path) -> None:
    (tmp_path / ".monty.storage").write_text("sqlite")  # what montydb left there
    with pytest.raises(ValueError, match=r"older wasm-reclaim \(montydb\).*move it aside") as e:
        st.open_store(str(tmp_path))
    assert "\n" not in str(e.value)


def test_an_unreachable_server_fails_on_first_use_within_the_timeout() -> None:
    db = st.open_store(f"mongodb://127.0.0.1:{free_port()}/", timeout=0.2)
    assert not st.is_embedded(db)
    with pytest.raises(ConnectionFailure):
        db.samples.count_documents({})
    st.close_store(db)


# ---- indexes -------------------------------------------------------------------------------


def test_ensure_indexes(db: st.Database) -> None:
    st.ensure_indexes(db)
    st.ensure_indexes(db)  # idempotent
    if st.is_embedded(db):
        assert set(db.list_collection_names()) >= set(st.COLLECTIONS)
    for name in st.BY_INSTANCE_TIME:
        keys = [list(ix["key"].items()) for ix in db[name].list_indexes()]
        assert [("proxy", 1), ("instance", 1), ("time", 1)] in keys, name
        assert [("time", 1)] in keys, name
    db.users.insert_one({"name": "alice"})
    with pytest.raises(DuplicateKeyError):
        db.users.insert_one({"name": "alice"})
    db.tokens.insert_one({"hash": "h1"})
    with pytest.raises(DuplicateKeyError):
        db.tokens.insert_one({"hash": "h1"})


# ---- writing -------------------------------------------------------------------------------


def test_insert_new_stores_each_document_once(db: st.Database) -> None:
    docs = [sample("a", float(i)) | {"_id": f"b-{i}"} for i in range(100)]
    assert st.insert_new(db, st.SAMPLES, docs[:60]) == st.Delivery(60, 0)
    again = [*docs[40:], docs[99]]  # 20 stored already, 40 new, one twice in the batch
    assert st.insert_new(db, st.SAMPLES, [dict(d) for d in again]) == st.Delivery(40, 21)
    assert sorted(d["_id"] for d in db.samples.find({}, {"_id": 1})) == sorted(
        d["_id"] for d in docs)
    assert st.insert_new(db, st.SAMPLES, []) == st.Delivery(0, 0)


def test_insert_new_rejects_what_bson_cannot_encode(db: st.Database) -> None:
    docs: list[dict[str, Any]] = [{"_id": "ok1"}, {"_id": "big", "n": 2**70}, {"_id": "ok2"}]
    result = st.insert_new(db, st.REQUESTS, docs)
    if st.is_embedded(db):  # JSON-encoded: any int fits
        assert result == st.Delivery(3, 0)
    else:
        assert result == st.Delivery(2, 0, [(docs[1], st.INVALID_DOCUMENT)])
    assert db.requests.count_documents({"_id": {"$in": ["ok1", "ok2"]}}) == 2


def test_samples_go_in_with_one_batch_per_proxy(db: st.Database) -> None:
    """`insert_samples` stores the samples and, per proxy, one batch holding the same
    documents column by column, numbered from 1 per writer; readers find them by newest
    sample time; a writer prunes its own by delivery time."""
    writer = st.BatchWriter()
    docs = [sample("a", 1.0, proxy="p1") | {"_id": "s1", "live_bytes": None},
            sample("b", 2.5, proxy="p2") | {"_id": "s2"},
            sample("a", 3.0, proxy="p1") | {"_id": "s3", "state": "running"}]
    assert st.insert_samples(db, docs, writer, 1000.0) == st.Delivery(3, 0)
    assert db.samples.count_documents({}) == 3
    st.insert_samples(db, [sample("a", 4.0, proxy="p1") | {"_id": "s4"}], writer, 1010.0)
    batches = {(b["proxy"], b["seq"]): b for b in st.read_sample_batches(db, -math.inf)}
    assert sorted(batches) == [("p1", 1), ("p1", 2), ("p2", 1)]
    first = batches["p1", 1]
    assert (first["run"], first["time"], first["first"], first["count"], first["shipped_at"]) \
        == (writer.run, 3.0, 1.0, 2, 1000.0)
    columns = records.unpack_columns(first)
    assert columns["_id"] == ["s1", "s3"] and columns["time"] == [1.0, 3.0]
    assert columns["live_bytes"] == [None, None] and columns["state"] == [None, "running"]
    assert set(first) == set(records.SAMPLE_BATCH_FIELDS)
    assert sorted((b["proxy"], b["seq"]) for b in st.read_sample_batches(db, 2.9)) == [
        ("p1", 1), ("p1", 2)]
    assert "columns" not in st.read_sample_batches(db, 2.9, columns=False)[0]
    assert [b["seq"] for b in st.read_sample_batches(db, 2.9, exclude=[first["_id"]])] == [2]
    assert st.prune_sample_batches(db, ["p1"], 1005.0) == 1
    assert sorted((b["proxy"], b["seq"]) for b in st.read_sample_batches(db, -math.inf)) == [
        ("p1", 2), ("p2", 1)]
    assert st.prune_sample_batches(db, [], 2000.0) == 0
    assert st.prune_sample_batches(db, None, 2000.0) == 2  # every proxy's


def test_a_sample_batch_holds_what_json_cannot_say_plainly() -> None:
    """NaN (a store's own NaN is spooled as null anyway) and integers beyond 64 bits survive
    packing; an unencodable value is written as text."""
    big = records.sample_batch("p", "r", 1, [{"x": 2**70, "y": math.nan, "time": 1.0}], 0.0)
    assert big["time"] == 1.0 and records.unpack_columns(big)["x"] == [2**70]
    plain = records.sample_batch("p", "r", 2, [{"y": math.inf, "z": ObjectId("0" * 24)}], 0.0)
    assert records.unpack_columns(plain) == {"y": [None], "z": ["0" * 24]}
    assert plain["time"] is None and plain["count"] == 1


def _decision_columns(instances: list[str], actions: list[str]) -> dict[str, list[Any]]:
    n = len(instances)
    fields = {"instance": instances, "generation": [0] * n, "time": [10.0] * n,
              "decided_at": [10.0] * n, "action": actions, "reason": ["why"] * n,
              "required_pages": [None if i % 2 else 3.5 for i in range(n)]}
    return records.decision_columns(
        ["p1"] * n, fields, [65536] * n, record_ids=[f"m-{i}" for i in range(n)],
        decided_at=1000.0, policy_spec="fixed:30m", requested_by="manager:fixed",
        dry_run=False, outcomes=["restarted" if a == "restart" else "keep" for a in actions],
        details=[None] * n, admin_results=[{"generation": 1} if a == "restart" else None
                                           for a in actions])


def test_decision_columns_are_the_decision_documents() -> None:
    """One builder: a decision document is a row of `decision_columns`, field for field."""
    columns = _decision_columns(["a", "b"], ["restart", "keep"])
    a, b = records.rows(columns)
    assert a == records.decision(
        "p1", {"instance": "a", "generation": 0, "time": 10.0, "decided_at": 10.0,
               "action": "restart", "reason": "why", "required_pages": 3.5}, 65536,
        record_id="m-0", decided_at=1000.0, policy_spec="fixed:30m",
        requested_by="manager:fixed", dry_run=False, outcome="restarted", detail=None,
        admin_result={"generation": 1})
    assert list(a) == list(b) and a["now"] == 10.0 and a["decided_at"] == 1000.0
    assert (a["required_bytes"], b["required_bytes"]) == (3.5 * 65536, None)
    assert (a["applied"], b["applied"]) == (True, False)
    assert records.rows(columns, [1]) == [b]


def test_decision_batches_hold_every_decision(db: st.Database,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """A pass's decisions go into `decision_batches` (several documents beyond
    DECISION_BATCH_MAX); `read_decisions` gives back each decision as its document, by pass."""
    monkeypatch.setattr(records, "DECISION_BATCH_MAX", 2)
    first = _decision_columns(["a", "b", "c"], ["keep", "restart", "keep"])
    later = {**_decision_columns(["a"], ["keep"]), "_id": ["m-3"], "decided_at": [1005.0]}
    batches = records.decision_batches("m", 1, first, 10.0, 1000.0)
    assert [(b["part"], b["count"], b["restarts"]) for b in batches] == [(0, 2, 1), (1, 1, 0)]
    assert all(set(b) == set(records.DECISION_BATCH_FIELDS) for b in batches)
    st.ensure_indexes(db)
    # Newest first in the collection: the reader orders them by pass.
    st.insert_new(db, st.DECISION_BATCHES, records.decision_batches("m", 2, later, 15.0, 1005.0))
    st.insert_new(db, st.DECISION_BATCHES, batches)
    assert st.read_decisions(db) == records.rows(first) + records.rows(later)
    assert [d["_id"] for d in st.read_decisions(db, {"time": {"$gt": 12.0}})] == ["m-3"]
    frame = st.decisions_frame(db)
    assert frame["instance"].tolist() == ["a", "b", "c", "a"] and "_id" not in frame.columns
    assert st.decisions_frame(db, {"time": {"$gt": 99.0}}).empty


def test_delete_before(db: st.Database) -> None:
    db.samples.insert_many([sample("a", float(t)) for t in range(10)]
                           + [{"time": "5", "instance": "a"}, {"instance": "no time"}])
    assert st.delete_before(db, st.SAMPLES, 4.0) == 4
    assert sorted(str(d.get("time")) for d in db.samples.find({})) == [
        "4.0", "5", "5.0", "6.0", "7.0", "8.0", "9.0", "None"]
    assert st.delete_before(db, "never_written", 1.0) == 0


def test_the_managers_records_are_pruned_by_time(db: st.Database) -> None:
    """`prune_manager_records` deletes the decision batches and restart decisions before the
    cutoff (samples' clock), and nothing else; `delete_sample_batches` deletes by `_id`."""
    st.ensure_indexes(db)
    columns = _decision_columns(["a", "b"], ["restart", "keep"])
    for seq, now in enumerate((10.0, 20.0, 30.0), 1):
        ids = {**columns, "_id": [f"m{seq}-0", f"m{seq}-1"], "time": [now, now]}
        st.insert_new(db, st.DECISION_BATCHES, records.decision_batches("m", seq, ids, now, now))
        st.insert_new(db, st.DECISIONS, records.rows(ids, [0]))
    db.samples.insert_many([sample("a", 5.0) | {"_id": "s"}])
    assert st.prune_manager_records(db, 20.0) == 2  # the batch of 10 and its restart
    assert sorted(b["time"] for b in db.decision_batches.find({})) == [20.0, 30.0]
    assert sorted(d["_id"] for d in db.decisions.find({})) == ["m2-0", "m3-0"]
    assert db.samples.count_documents({}) == 1
    assert st.prune_manager_records(db, 20.0) == 0
    writer = st.BatchWriter()
    st.insert_samples(db, [sample("a", 6.0, proxy="p1") | {"_id": "s6"}], writer, 1.0)
    st.insert_samples(db, [sample("a", 7.0, proxy="p1") | {"_id": "s7"}], writer, 2.0)
    first = f"{writer.run}-p1-1"
    assert st.delete_sample_batches(db, [first, "never-written"]) == 1
    assert [b["seq"] for b in st.read_sample_batches(db, -math.inf)] == [2]
    assert st.delete_sample_batches(db, []) == 0


def test_queries_mean_the_same_on_both_stores(db: st.Database) -> None:
    """The part of MongoDB's query language we use, on FerretDB and on the embedded store
    (which runs some conditions in SQL and the rest in Python): the same answers."""
    when = datetime(2026, 11, 29, 12, 0, 0)
    db.samples.insert_many([
        sample("a", 1.0) | {"_id": "a1", "issued": when, "hit": True},
        sample("a", 2.0) | {"_id": "a2", "issued": when + timedelta(hours=1), "hit": 1},
        sample("b", 3.0) | {"_id": "b3", "nested": {"x": [1, None, "é"]}},
        {"_id": "t", "time": "2.5", "instance": "a"},  # a string never compares with numbers
        {"_id": 7, "time": 4, "instance": "c", "generation": None},
    ])

    def ids(query: dict[str, Any], **kw: Any) -> list[Any]:
        return [d["_id"] for d in db.samples.find(query, {"_id": 1}, **kw)]

    assert sorted(ids({"time": {"$gt": 1.5}}), key=str) == [7, "a2", "b3"]
    assert sorted(ids({"time": {"$gte": "2"}}), key=str) == ["t"]
    assert ids({"instance": "a", "time": {"$lte": 2}}, sort=[("time", -1)]) == ["a2", "a1"]
    assert sorted(ids({"instance": {"$in": ["b", "c"]}}), key=str) == [7, "b3"]
    assert sorted(ids({"time": {"$in": [4, "2.5"]}}), key=str) == [7, "t"]
    assert ids({"_id": 7}) == [7] and ids({"_id": {"$in": ["a1", "zz"]}}) == ["a1"]
    assert sorted(ids({"$or": [{"instance": "b"}, {"time": 4}]}), key=str) == [7, "b3"]
    assert sorted(ids({"instance": {"$ne": "a"}}), key=str) == [7, "b3"]
    assert ids({"nested": {"$exists": True}}) == ["b3"]
    assert ids({"nested.x": "é"}) == ["b3"]
    assert ids({"hit": True}) == ["a1"] and ids({"hit": 1}) == ["a2"]
    assert ids({"generation": None, "instance": "c"}) == [7]
    assert ids({"issued": {"$lt": when + timedelta(minutes=30)}}) == ["a1"]
    assert ids({"time": {"$gt": 0}}, sort=[("time", 1)], limit=2) == ["a1", "a2"]
    assert [d["time"] for d in db.samples.find({"instance": "a"}).sort("time", -1).limit(1)
            ] == ["2.5"]  # a string sorts after the numbers
    got = db.samples.find_one({"_id": "b3"}, {"nested": 1, "_id": 0})
    assert got == {"nested": {"x": [1, None, "é"]}}
    assert db.samples.find_one({"_id": "a1"})["issued"] == when  # type: ignore[index]
    assert db.samples.count_documents({"instance": "a"}) == 3
    assert db.samples.count_documents({"instance": "a", "hit": {"$exists": False}}) == 1


def test_writes_mean_the_same_on_both_stores(db: st.Database) -> None:
    db.leases.insert_one({"_id": "m", "holder": "x", "expires": 5.0})
    with pytest.raises(DuplicateKeyError):
        db.leases.insert_one({"_id": "m"})
    assert db.leases.update_one({"_id": "m", "holder": "y"}, {"$set": {"expires": 9.0}}
                                ).matched_count == 0
    done = db.leases.update_one({"_id": "m", "expires": {"$lt": 6}},
                                {"$set": {"holder": "y"}, "$inc": {"n": 2}})
    assert (done.matched_count, done.modified_count) == (1, 1)
    assert db.leases.find_one({"_id": "m"}) == {"_id": "m", "holder": "y", "expires": 5.0,
                                                "n": 2}
    up = db.leases.update_one({"_id": "new"}, {"$set": {"holder": "z"}}, upsert=True)
    assert up.upserted_id == "new"
    assert db.leases.find_one({"_id": "new"}, {"_id": 0}) == {"holder": "z"}
    db.leases.replace_one({"_id": "new"}, {"holder": "w"}, upsert=True)
    assert db.leases.find_one({"_id": "new"}) == {"_id": "new", "holder": "w"}
    assert db.leases.update_many({"holder": {"$in": ["w", "y"]}}, {"$unset": {"n": ""}}
                                 ).matched_count == 2
    assert db.leases.delete_one({"holder": {"$exists": True}}).deleted_count == 1
    assert db.leases.count_documents({}) == 1
    st.ensure_indexes(db)
    db.tokens.insert_one({"hash": "h", "issued": datetime(2026, 1, 1)})
    with pytest.raises(BulkWriteError) as e:  # unordered: the rest go in, the duplicate is named
        db.tokens.insert_many([{"hash": "g"}, {"hash": "h"}, {"hash": "i"}], ordered=False)
    assert e.value.details["nInserted"] == 2
    assert [(w["index"], w["code"]) for w in e.value.details["writeErrors"]] == [(1, 11000)]
    assert db.tokens.delete_many({"$or": [{"hash": "g"}, {"issued": {
        "$lt": datetime(2026, 2, 1, tzinfo=UTC)}}]}).deleted_count == 2
    assert [d["hash"] for d in db.tokens.find({})] == ["i"]


def test_the_embedded_store_answers_the_managers_queries_from_an_index(tmp_path: Path) -> None:
    db: Any = st.open_store(str(tmp_path / "store"))
    st.ensure_indexes(db)
    for query, sort, index in [({"time": {"$gt": 5.0}}, (), "i:samples:time_1"),
                               ({}, [("time", -1)], "i:samples:time_1"),  # the newest sample
                               ({"proxy": "p", "instance": "a", "time": {"$gt": 1}}, (),
                                "i:samples:proxy_1_instance_1_time_1")]:
        sql, params, rest = db.samples.select_sql(query, sort, 1)
        assert rest == {}
        plan = " ".join(str(row) for row in db.conn.execute(f"EXPLAIN QUERY PLAN {sql}", params))
        assert f"USING INDEX {index}" in plan and "TEMP B-TREE" not in plan, (query, plan)
    st.close_store(db)


def test_the_embedded_store_keeps_what_json_lacks(tmp_path: Path) -> None:
    db = st.open_store(str(tmp_path / "store"))
    doc = {"_id": ObjectId(), "when": datetime(2026, 11, 29, 23, 0, 0, 123000),
           "aware": datetime(2026, 11, 29, 23, 0, tzinfo=UTC), "raw": b"\x00\xff",
           "nan": math.nan, "inf": -math.inf, "text": '{"$date": 1}', "big": 2**70,
           "lone": "caf\udce9", "nested": {"x": [1.5, None, "é"]}}
    db.misc.insert_one(doc)
    got = db.misc.find_one({"_id": doc["_id"]})
    assert got is not None and got["_id"] == doc["_id"] and got["when"] == doc["when"]
    assert got["aware"] == datetime(2026, 11, 29, 23, 0) and got["raw"] == b"\x00\xff"
    assert math.isnan(got["nan"]) and got["inf"] == -math.inf and got["text"] == doc["text"]
    assert got["big"] == 2**70 and got["lone"] == "caf\udce9" and got["nested"] == doc["nested"]
    flat = {"_id": "f", "lone": "x\udce9", "big": -(2**70), "time": 1.5}  # orjson refuses these
    db.misc.insert_one(dict(flat))
    assert db.misc.find_one({"_id": "f"}) == flat
    assert db.misc.count_documents({"time": {"$gt": 1.0}}) == 1
    st.close_store(db)


def test_embedded_recovery_of_a_large_batch_inserts_only_the_new_half(tmp_path: Path) -> None:
    """A shipper restarted after a crash re-delivers a batch: only the new half is inserted.
    (How fast is a benchmark figure: tests/bench/store.py.)"""
    db = st.open_store(str(tmp_path / "store"))
    docs = [sample("a", float(t)) | {"_id": f"id-{t}"} for t in range(10_000)]
    st.insert_new(db, st.SAMPLES, [dict(d) for d in docs[:5_000]])
    assert st.insert_new(db, st.SAMPLES, [dict(d) for d in docs]) == st.Delivery(5_000, 5_000)
    assert db.samples.count_documents({}) == 10_000
    st.close_store(db)


# ---- reading -------------------------------------------------------------------------------


def test_read_frame(db: st.Database) -> None:
    db.requests.insert_many([
        {"time": 1.0, "instance": "a", "decision": "allow", "hit": True, "latency": 0.5},
        {"time": 2.0, "instance": "b", "decision": "deny", "hit": False},
    ])
    frame = st.read_frame(db, st.REQUESTS, {})
    assert "_id" not in frame.columns and len(frame) == 2
    frame = frame.sort_values("time", ignore_index=True)
    assert frame["decision"].tolist() == ["allow", "deny"]
    assert frame["latency"].iloc[0] == 0.5 and math.isnan(frame["latency"].iloc[1])
    listed = st.read_frame(db, st.REQUESTS, {"instance": "b"}, ["time", "hit"])
    assert listed.to_dict("records") == [{"time": 2.0, "hit": False}]
    mapped = st.read_frame(db, st.REQUESTS, {"time": {"$gte": 2.0}}, {"latency": 0, "hit": 0})
    assert sorted(mapped.columns) == ["decision", "instance", "time"]
    assert list(st.read_frame(db, st.REQUESTS, {"instance": "zz"}, ["time", "hit"]).columns) == [
        "time", "hit"]
    assert st.read_frame(db, "nothing_here", {}).empty
    with pytest.raises(TypeError):
        st.read_frame(db, st.REQUESTS, {}, "time")


def test_samples_since(db: st.Database) -> None:
    db.samples.insert_many([sample("b", 3.0), sample("a", 2.0), sample("b", 1.0),
                            sample("a", 5.0, gauge=7), sample("a", 4.0), sample("b", 9.0)])
    frame = st.samples_since(db, 1.0)
    assert list(zip(frame["instance"], frame["time"], strict=True)) == [
        ("a", 2.0), ("a", 4.0), ("a", 5.0), ("b", 3.0), ("b", 9.0)]
    assert list(frame.index) == [0, 1, 2, 3, 4] and "_id" not in frame.columns
    assert frame["allocated_bytes"].tolist() == [17 * 65536] * 5
    assert frame["gauge"].isna().tolist() == [True, True, False, True, True]
    one = st.samples_since(db, 2.0, instance="a")
    assert one["time"].tolist() == [4.0, 5.0] and set(one["instance"]) == {"a"}
    empty = st.samples_since(db, 100.0)
    assert empty.empty and list(empty.columns)[:2] == ["instance", "time"]
    assert isinstance(empty, pd.DataFrame)


# ---- the embedded store across processes ---------------------------------------------------

BATCH = 200
BATCHES = 30


def _writer(path: str, ready: Any, done: Any) -> None:
    db = st.open_store(path)
    ready.wait(60)  # all three processes are up
    for b in range(BATCHES):  # as the shipper writes, a batch every 50 ms
        st.insert_new(db, st.SAMPLES, [sample(f"i{k % 4}", b + k / BATCH) | {"_id": f"{b}-{k}"}
                                       for k in range(BATCH)])
        time.sleep(0.05)
    st.close_store(db)
    done.set()


def _reader(path: str, ready: Any, done: Any, out: Any) -> None:
    """Reads until the writer is done; reports (reads, counts seen, problems)."""
    db = st.open_store(path)
    ready.wait(60)
    counts: list[int] = []
    problems: list[str] = []
    try:
        while True:
            finished = done.is_set()
            docs = list(db.samples.find({}))
            n = db.samples.count_documents({})
            if len(docs) % BATCH or n % BATCH:
                problems.append(f"a partial batch: {len(docs)} documents, count {n}")
            if any(set(d) != set(sample("x", 0.0)) | {"_id"} for d in docs):
                problems.append("a document with missing fields")
            if counts and min(len(docs), n) < counts[-1]:
                problems.append(f"count went back from {counts[-1]} to {min(len(docs), n)}")
            counts.append(max(len(docs), n))
            frame = st.samples_since(db, -1.0)  # through the time index
            if len(frame) % BATCH or len(frame) < counts[-1]:
                problems.append(f"samples_since: {len(frame)} rows after {counts[-1]}")
            if finished:
                break
    except Exception as e:
        problems.append(f"{type(e).__name__}: {e}")
    st.close_store(db)
    out.put((len(counts), counts[-1] if counts else -1, problems))


def test_embedded_store_one_writer_and_concurrent_reader_processes(tmp_path: Path) -> None:
    path = str(tmp_path / "store")
    st.ensure_indexes(st.open_store(path))  # the collections exist before readers come
    ctx = multiprocessing.get_context("spawn")
    ready, done, out = ctx.Barrier(3), ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_writer, args=(path, ready, done))]
    procs += [ctx.Process(target=_reader, args=(path, ready, done, out)) for _ in range(2)]
    for p in procs:
        p.start()
    results = [out.get(timeout=60) for _ in range(2)]
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    for reads, last, problems in results:
        assert problems == []
        assert last == BATCH * BATCHES
        assert reads >= 2, "the reader must have read while the writer wrote"
    assert st.open_store(path).samples.count_documents({}) == BATCH * BATCHES


# ---- registries and leases -----------------------------------------------------------------


def test_register_keeps_one_document_per_proxy(db: st.Database) -> None:
    docs = [{"_id": f"x-{i}", "proxy": p, "heartbeat": float(i), "admin_url": f"http://{p}"}
            for i, p in enumerate(["a", "b", "a"])]
    assert st.register(db, st.PROXIES, docs[:2]) == 2
    assert st.register(db, st.PROXIES, docs) == 2  # again, and a's newer heartbeat wins
    stored = {d["_id"]: d for d in db[st.PROXIES].find({})}
    assert set(stored) == {"a", "b"} and stored["a"]["heartbeat"] == 2.0
    assert [d["_id"] for d in st.live_proxies(db, now=3.0, max_age=1.5)] == ["a"]
    assert [d["_id"] for d in st.live_proxies(db, now=3.0, max_age=10)] == ["a", "b"]


def test_lease_has_one_holder_until_it_expires(db: st.Database) -> None:
    assert st.acquire_lease(db, "manager", "m1", now=100.0, period=10.0)
    assert not st.acquire_lease(db, "manager", "m2", now=105.0, period=10.0)  # standby
    assert st.acquire_lease(db, "manager", "m1", now=108.0, period=10.0)  # renewed to 118
    assert not st.acquire_lease(db, "manager", "m2", now=117.0, period=10.0)
    assert st.acquire_lease(db, "manager", "m2", now=118.5, period=10.0)  # m1 died: taken
    assert not st.acquire_lease(db, "manager", "m1", now=119.0, period=10.0)
    st.release_lease(db, "manager", "m1")  # not m1's any more: nothing happens
    assert not st.acquire_lease(db, "manager", "m1", now=119.0, period=10.0)
    st.release_lease(db, "manager", "m2")
    assert st.acquire_lease(db, "manager", "m1", now=119.5, period=10.0)
