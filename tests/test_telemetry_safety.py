"""What the spool and the shipper do with hostile or sensitive documents, against the embedded
store and FerretDB: text that is not UTF-8 (issue 9.1), credentials in paths (9.5), the store
on the command line (9.6), private files (9.12)."""

from __future__ import annotations

import json
import logging
import os
import stat
import uuid
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as hs

from addons.telemetry import shipper as sh
from addons.telemetry import store as st
from addons.telemetry.shipper import Shipper
from addons.telemetry.spool import (
    ESCAPED,
    MetricsLog,
    escape_document,
    escape_text,
    ready_segments,
    redact_names,
    redact_path,
    unescape_text,
)


def request_doc(path: str, method: str = "GET") -> dict[str, object]:
    return {"time": 1_700_000_000.0, "instance": "shop", "method": method, "path": path,
            "decision": "deny", "status": 401}


def delivered(spool_dir: Path, store: str, database: str) -> tuple[list[dict], Shipper]:
    shipper = Shipper(spool_dir, store, database=database)
    try:
        shipper.ship_ready()
        docs = list(shipper.db[st.REQUESTS].find({}, {"_id": 0}))
    finally:
        shipper.close()
    return docs, shipper


# ---- text that is not UTF-8 ------------------------------------------------------------------

surrogate_text = hs.text(hs.characters(codec=None, exclude_categories=()), max_size=40).map(
    lambda t: t + "\udce9")


@given(surrogate_text)
def test_escaping_is_lossless_and_gives_utf8(text: str) -> None:
    escaped = escape_text(text)
    escaped.encode("utf-8")
    assert unescape_text(escaped) == text


def test_escape_document_names_what_it_escaped() -> None:
    doc = {"path": "/caf\udce9", "n": 1, "nested": {"k\udcff": ["ok", "\udc80"]}}
    out = escape_document(doc)
    assert out["path"] == "/caf\\xe9" and out["n"] == 1
    assert out[ESCAPED] == ["path", "nested.k\\xff.<key>", "nested.k\\xff.1"]
    assert escape_document({"path": "/café"}) == {"path": "/café"}  # valid text stays as is


def test_a_path_that_is_not_utf8_is_spooled_escaped_and_delivered_with_the_rest(
        store_target: tuple[str, str], tmp_path: Path) -> None:
    store, database = store_target
    spool_dir = tmp_path / "spool"
    log = MetricsLog(spool_dir)
    log.write("requests", request_doc("/before"))
    log.write("requests", request_doc("/caf\udce9?q=\udcff\\", method="G\udce9T"))
    log.write("requests", request_doc("/after/é"))
    assert log.flush() == 3
    assert log.escaped == 1
    for segment in ready_segments(spool_dir):
        segment.read_bytes().decode("utf-8")  # valid UTF-8 on disk
    docs, shipper = delivered(spool_dir, store, database)
    assert shipper.rejected == 0 and not ready_segments(spool_dir)
    by_path = {d["path"]: d for d in docs}
    assert set(by_path) == {"/before", "/caf\\xe9?q=\\xff\\\\", "/after/é"}
    poison = by_path["/caf\\xe9?q=\\xff\\\\"]
    assert sorted(poison[ESCAPED]) == ["method", "path"]
    assert unescape_text(poison["path"]) == "/caf\udce9?q=\udcff\\"
    assert unescape_text(poison["method"]) == "G\udce9T"


def test_a_segment_of_an_older_spool_with_lone_surrogates_is_delivered(
        store_target: tuple[str, str], tmp_path: Path) -> None:
    """Spools written before text was escaped hold `\\udcXX` escapes: they must drain too."""
    store, database = store_target
    spool_dir = tmp_path / "spool"
    spool_dir.mkdir()
    lines = [json.dumps({"c": "requests", "d": {**request_doc(p), "_id": f"old-{i}"}})
             for i, p in enumerate(["/a", "/caf\udce9", "/b"])]
    assert "\\udce9" in lines[1]
    (spool_dir / "seg-00000000000000000001-aaaaaaaaaaaa-00000000.jsonl").write_text(
        "\n".join(lines) + "\n")
    docs, shipper = delivered(spool_dir, store, database)
    assert sorted(d["path"] for d in docs) == ["/a", "/b", "/caf\\xe9"]
    assert shipper.rejected == 0 and not ready_segments(spool_dir)


def test_a_document_the_store_still_refuses_is_quarantined_privately(
        mongo_uri: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    database = f"t_{uuid.uuid4().hex[:12]}"
    spool_dir = tmp_path / "spool"
    log = MetricsLog(spool_dir)
    log.write("requests", request_doc("/one"))
    log.write("requests", {**request_doc("/huge"), "n": 2**70})  # BSON has no such integer
    log.write("requests", request_doc("/two"))
    log.flush()
    old = os.umask(0o022)
    try:
        with caplog.at_level(logging.ERROR, logger="addons.telemetry.shipper"):
            docs, shipper = delivered(spool_dir, mongo_uri, database)
    finally:
        os.umask(old)
        db = st.open_store(mongo_uri, database)
        db.client.drop_database(database)
        st.close_store(db)
    assert sorted(d["path"] for d in docs) == ["/one", "/two"]
    assert shipper.rejected == 1
    assert len([r for r in caplog.records if "refused" in r.getMessage()]) == 1
    folder = spool_dir / "rejected"
    [dead] = list(folder.iterdir())
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert stat.S_IMODE(dead.stat().st_mode) == 0o600
    [line] = dead.read_text().splitlines()
    assert json.loads(line)["d"]["path"] == "/huge"


# ---- credentials in paths --------------------------------------------------------------------


@pytest.mark.parametrize(("path", "clean"), [
    ("/account?access_token=abc&page=2", "/account?access_token=REDACTED&page=2"),
    ("/a?api_key=1&TOKEN=2&key=3&apikey=4", "/a?api_key=REDACTED&TOKEN=REDACTED&key=REDACTED"
                                            "&apikey=REDACTED"),
    ("/b?X-Amz-Signature=s&x-amz-credential=c&keep=1",
     "/b?X-Amz-Signature=REDACTED&x-amz-credential=REDACTED&keep=1"),
    ("/c?csrf_token=1&client-secret=2&my_api_key=3&q=key",
     "/c?csrf_token=REDACTED&client-secret=REDACTED&my_api_key=REDACTED&q=key"),
    ("/d?access%5Ftoken=1&token", "/d?access%5Ftoken=REDACTED&token"),
    ("/cart;jsessionid=ABC/item?id=7", "/cart;jsessionid=REDACTED/item?id=7"),
    ("/plain/path", "/plain/path"),
    ("/e?monkey=1&keys=2&tokenizer=3", "/e?monkey=1&keys=2&tokenizer=3"),
    ("/f?token=", "/f?token="),
])
def test_redact_path(path: str, clean: str) -> None:
    assert redact_path(path) == clean


def test_the_operator_adds_parameters_to_redact() -> None:
    names = redact_names(" Tenant-Pass , sig2,")
    assert redact_path("/x?tenant_pass=1&SIG2=2&other=3", names) == (
        "/x?tenant_pass=REDACTED&SIG2=REDACTED&other=3")
    assert redact_path("/x?tenant_pass=1") == "/x?tenant_pass=1"


def test_a_credential_in_a_path_never_reaches_the_spool(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path / "spool", redact=redact_names("session_ref"))
    log.write("requests", request_doc("/account?access_token=SEKRIT-1&session_ref=SEKRIT-2"))
    log.write("auth_calls", {"path": "/verify?token=SEKRIT-3", "status": 200})
    log.write("samples", {"path": "no query", "allocated_pages": 2})
    assert log.flush() == 3
    data = b"".join(p.read_bytes() for p in ready_segments(tmp_path / "spool"))
    assert b"SEKRIT" not in data
    assert b"access_token=REDACTED&session_ref=REDACTED" in data


# ---- the store off the command line, private files -------------------------------------------


def test_the_shipper_reads_its_store_from_the_environment(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    spool_dir = tmp_path / "spool"
    log = MetricsLog(spool_dir)
    log.write("requests", request_doc("/from-env"))
    log.flush()
    store = tmp_path / "store"
    monkeypatch.setenv(sh.STORE_ENV, str(store))
    assert sh.main(["ship", "--spool", str(spool_dir), "--once"]) == 0
    db = st.open_store(str(store))
    try:
        assert [d["path"] for d in db[st.REQUESTS].find({})] == ["/from-env"]
    finally:
        st.close_store(db)


def test_the_spool_is_private(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        spool_dir = tmp_path / "spool"
        log = MetricsLog(spool_dir)
        log.write("requests", request_doc("/x"))
        log.flush()
        shared = tmp_path / "shared"  # a folder that already exists, open to all
        shared.mkdir(mode=0o755)
        MetricsLog(shared)
        store_dir = tmp_path / "store"
        st.close_store(st.open_store(str(store_dir)))
    finally:
        os.umask(old)
    assert stat.S_IMODE(spool_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(shared.stat().st_mode) == 0o700
    assert stat.S_IMODE(store_dir.stat().st_mode) == 0o700
    [segment] = ready_segments(spool_dir)
    assert stat.S_IMODE(segment.stat().st_mode) == 0o600
