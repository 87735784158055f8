"""`python -m scenarios store`: the stored collections, listed and exported as CSV."""

from __future__ import annotations

import csv
import io
import json
import uuid

import pymongo
import pytest

from addons.telemetry import records
from addons.telemetry.store import close_store, insert_new, open_store
from scenarios.__main__ import main

DOCS = [
    {"_id": f"r{i}", "time": 100.0 + (3 - i), "instance": "shop.example", "decision": word,
     "path": f"/p{i}", "status": 200, "outbound": int(word == "miss")}
    for i, word in enumerate(["miss", "hit", "logout", "hit"])
]


def fill(store: str) -> None:
    db = open_store(store)
    try:
        assert insert_new(db, "requests", [dict(d) for d in DOCS]).inserted == 4
        assert insert_new(db, "restarts", [{"_id": "x", "time": 1.0, "instance": "a"}]).inserted
    finally:
        close_store(db)


def check_export(store: str, capsys) -> None:
    assert main(["store", "list", "--store", store]) == 0
    listed = dict(line.split() for line in capsys.readouterr().out.splitlines())
    assert listed["requests"] == "4" and listed["restarts"] == "1"
    assert main(["store", "export", "requests", "--store", store]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["path"] for r in rows] == ["/p3", "/p2", "/p1", "/p0"]  # by time
    assert rows[0]["decision"] == "hit" and "_id" not in rows[0]
    assert main(["store", "export", "requests", "--store", store, "--fields",
                 "decision,path", "--query", '{"decision": "hit"}']) == 0
    assert capsys.readouterr().out == "decision,path\nhit,/p3\nhit,/p1\n"
    assert main(["store", "export", "requests", "--store", store, "--format", "jsonl",
                 "--fields", "path,outbound"]) == 0
    lines = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert lines[-1] == {"path": "/p0", "outbound": 1}


def test_export_from_the_embedded_store(tmp_path, capsys) -> None:
    store = str(tmp_path / "store")
    fill(store)
    check_export(store, capsys)
    out = tmp_path / "requests.csv"
    assert main(["store", "export", "requests", "--store", store, "--out", str(out)]) == 0
    assert out.read_text().startswith("time,instance,decision,path,status,outbound\n")


def test_export_decision_batches_one_row_per_decision(tmp_path, capsys) -> None:
    """Every decision of the manager, from its pass batches, one row each (not the packed
    columns), the passes chosen by --query."""
    store = str(tmp_path / "store")
    db = open_store(store)
    try:
        for seq, (now, names) in enumerate([(10.0, ["a", "b"]), (15.0, ["a"])], start=1):
            n = len(names)
            columns = records.decision_columns(
                ["p"] * n, {"instance": names, "time": [now] * n, "decided_at": [now] * n,
                            "action": ["keep"] * n, "reason": ["why"] * n}, [65536] * n,
                record_ids=[f"m-{seq}-{i}" for i in range(n)], decided_at=1000.0 + now,
                policy_spec="ratio", requested_by="manager:ratio", dry_run=False,
                outcomes=["keep"] * n, details=[None] * n, admin_results=[None] * n)
            insert_new(db, "decision_batches",
                       records.decision_batches("m", seq, columns, now, 1000.0 + now))
    finally:
        close_store(db)
    assert main(["store", "export", "decision_batches", "--store", store, "--fields",
                 "instance,time,outcome"]) == 0
    assert capsys.readouterr().out == "instance,time,outcome\na,10.0,keep\nb,10.0,keep\na,15.0,keep\n"
    assert main(["store", "export", "decision_batches", "--store", store, "--fields",
                 "instance,time", "--query", '{"time": {"$gt": 12}}']) == 0
    assert capsys.readouterr().out == "instance,time\na,15.0\n"


def test_reading_never_creates_a_store(tmp_path, capsys) -> None:
    missing = tmp_path / "nothing-here"
    assert main(["store", "list", "--store", str(missing)]) == 2
    assert f"no embedded store at {missing}" in capsys.readouterr().err
    assert not missing.exists()


def test_an_old_montydb_store_is_a_one_line_error(tmp_path, capsys) -> None:
    (tmp_path / ".monty.storage").write_text("sqlite")  # what montydb left there
    (tmp_path / "wasm_reclaim").mkdir()
    assert main(["store", "list", "--store", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "older wasm-reclaim (montydb)" in err and "move it aside" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "wasm_reclaim.sqlite3").exists()


def test_an_unresolvable_srv_store_is_a_one_line_error(capsys) -> None:
    """A mongodb+srv:// host is resolved when the URI is parsed: one that does not resolve
    is a bad --store (exit 2), not a traceback."""
    from manager.__main__ import main as manager_main

    uri = "mongodb+srv://nonexistent.invalid/"
    assert main(["store", "list", "--store", uri]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"python -m scenarios store: error: {uri}: "), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert manager_main(["run", "--store", uri, "--admin", "http://127.0.0.1:9", "--once"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"manager: --store {uri}: "), err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(("name", "why"), [
    ("bad/name", "a database name cannot contain '/'"),
    ("", "a database name cannot be empty"),
    ("x" * 64, "a database name has at most 63 bytes, this one 64"),
    ("café", "the embedded store takes letters, digits, _ and -"),
])
def test_a_bad_database_name_is_a_one_line_error(tmp_path, capsys, name, why) -> None:
    """Said as a bad --database (exit 2), not as a store that is missing or cannot be read:
    by the parser where MongoDB's rules forbid it, else when the embedded store is opened."""
    store = str(tmp_path / "store")
    fill(store)
    for argv in (["list"], ["export", "requests"]):
        try:
            code = main(["store", *argv, "--store", store, "--database", name])
        except SystemExit as e:  # argparse: the usage line, then the error
            code = e.code
            err = capsys.readouterr().err.splitlines()[-1]
            assert f"error: argument --database: {name!r}: {why}" in err
        else:
            err = capsys.readouterr().err
            assert err.startswith(f"python -m scenarios store: error: --database {name!r}: {why}")
            assert len(err.splitlines()) == 1
        assert code == 2 and "Traceback" not in err
    assert sorted(p.name for p in (tmp_path / "store").iterdir()) == ["wasm_reclaim.sqlite3"]


def test_database_name_is_an_argparse_type() -> None:
    """For the parser of `store` (and `auth-server`): MongoDB's rules as a usage error."""
    import argparse

    from scenarios.store_cli import database_name

    assert database_name("wasm_reclaim") == "wasm_reclaim"
    with pytest.raises(argparse.ArgumentTypeError, match=r"cannot contain '\.'"):
        database_name("a.b")


@pytest.mark.mongo
def test_export_from_mongodb(mongo_uri, capsys) -> None:
    name = f"storecli_{uuid.uuid4().hex[:8]}"
    uri = mongo_uri.rstrip("/") + "/" + name
    fill(uri)
    try:
        check_export(uri, capsys)
    finally:
        client: pymongo.MongoClient = pymongo.MongoClient(mongo_uri)  # type: ignore[type-arg]
        client.drop_database(name)
        client.close()
