"""The metrics spool (MetricsLog) and its shipper, against the embedded store and FerretDB."""

from __future__ import annotations

import errno
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from addons.telemetry import records, spool
from addons.telemetry import store as st
from addons.telemetry.shipper import Shipper, ship
from addons.telemetry.spool import MetricsLog, ready_segments

from .servers import FERRETDB_BIN, free_port, process

ROOT = Path(__file__).resolve().parent.parent


# ---- helpers -------------------------------------------------------------------------------


def wait_until(pred: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.02)
    raise AssertionError(f"{what}: not within {timeout} s")


def request_doc(i: int) -> dict[str, Any]:
    """A realistic `requests` document."""
    return {"time": 1_700_000_000.0 + i / 10, "instance": f"shop{i % 3}", "tenant": "shop",
            "generation": 1, "method": "GET", "path": f"/item/{i}", "decision": "allow",
            "hit": i % 4 != 0, "status": 200, "latency": 0.000123 * (i % 7), "pages": 17}


def spool_lines(spool_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for p in ready_segments(spool_dir)
            for line in p.read_text().splitlines()]


def all_ids(db: st.Database, collection: str) -> list[str]:
    return [d["_id"] for d in db[collection].find({}, {"_id": 1})]


class Running:
    """`shipper.run(**kw)` in a thread, until `finish()` (stop, drain, close the store)."""

    def __init__(self, shipper: Shipper, **kw: bool) -> None:
        self.shipper = shipper
        self.result: list[int] = []
        self.thread = threading.Thread(target=lambda: self.result.append(shipper.run(**kw)),
                                       daemon=True)
        self.thread.start()

    def finish(self) -> int:
        if self.thread.ident is not None and not self.result:
            self.shipper.stop()
            self.thread.join(30)
            assert not self.thread.is_alive(), "the shipper did not stop"
            self.shipper.close()
        return self.result[0]


@contextmanager
def running(shipper: Shipper, **kw: bool) -> Iterator[Running]:
    """A running shipper, finished (and checked to exit 0) at the end of the block."""
    run = Running(shipper, **kw)
    try:
        yield run
    finally:
        assert run.finish() == 0


def ferretdb_args(port: int, data: Path) -> list[str]:
    data.mkdir(exist_ok=True)
    return [str(FERRETDB_BIN), "--listen-addr", f"127.0.0.1:{port}",
            "--sqlite-url", f"file:{data}/"]


def warned(caplog: pytest.LogCaptureFixture, text: str) -> bool:
    return any(text in r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


@pytest.fixture
def log_info(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger="addons.telemetry.spool")
    caplog.set_level(logging.INFO, logger="addons.telemetry.shipper")
    return caplog


# ---- MetricsLog ----------------------------------------------------------------------------


def test_write_gives_unique_ids_and_leaves_the_input_alone(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    doc = {"time": 1.0, "instance": "a"}
    for _ in range(1000):
        log.write("requests", doc)
    assert doc == {"time": 1.0, "instance": "a"}
    assert log.buffered == 1000
    assert not list(tmp_path.iterdir()), "write() must not touch the disk"
    assert log.flush() == 1000
    ids = [rec["d"]["_id"] for rec in spool_lines(tmp_path)]
    assert len(set(ids)) == 1000
    assert all(i.startswith(f"{log.boot_id}-") for i in ids)
    other = MetricsLog(tmp_path)  # another proxy run: another boot id
    other.write("requests", doc)
    other.flush()
    assert len({rec["d"]["_id"] for rec in spool_lines(tmp_path)}) == 1001


def test_flush_writes_one_complete_segment_and_rotates(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    assert log.flush() == 0 and not list(tmp_path.iterdir())
    docs = [{"time": 1.5, "n": None, "ok": True, "tags": ["a", "é"], "nested": {"x": [1, 2.5]},
             "text": "line\nbreak \u2603"}, request_doc(1)]
    for d in docs:
        log.write("samples", d)
    assert log.flush() == 2
    log.write("restarts", {"time": 2.0})
    assert log.flush() == 1
    segs = ready_segments(tmp_path)
    assert len(segs) == 2 and segs[0].name < segs[1].name
    assert not list(tmp_path.glob("*.tmp"))
    first = [json.loads(line) for line in segs[0].read_text().splitlines()]
    assert [r["c"] for r in first] == ["samples", "samples"]
    assert [{k: v for k, v in r["d"].items() if k != "_id"} for r in first] == docs
    assert segs[0].read_bytes().endswith(b"\n")
    assert log.status() | {"spool": None} == {
        "spool": None, "buffered": 0, "spooled_docs": 3, "segments_written": 2,
        "segments_pending": 2, "rejected": 0, "escaped": 0, "dropped": 0, "last_error": None}


def test_segments_sort_in_write_order_across_runs(tmp_path: Path) -> None:
    first = MetricsLog(tmp_path)
    for i in range(12):
        first.write("requests", {"i": i})
        first.flush()
    second = MetricsLog(tmp_path)
    second.write("requests", {"i": 12})
    second.flush()
    assert [r["d"]["i"] for r in spool_lines(tmp_path)] == list(range(13))


def test_max_buffer_flushes_at_once(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, max_buffer=10)
    for i in range(9):
        log.write("requests", {"i": i})
    assert log.buffered == 9 and not ready_segments(tmp_path)
    log.write("requests", {"i": 9})
    assert log.buffered == 0 and len(ready_segments(tmp_path)) == 1
    assert log.spooled_docs == 10


def test_concurrent_writes_and_flushes_lose_nothing(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path, max_buffer=500)
    stop = threading.Event()

    def flusher() -> None:
        while not stop.is_set():
            log.flush()

    def writer(k: int) -> None:
        for i in range(5000):
            log.write("requests", {"w": k, "i": i})

    writers = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    f = threading.Thread(target=flusher)
    f.start()
    for w in writers:
        w.start()
    for w in writers:
        w.join()
    stop.set()
    f.join()
    log.flush()
    recs = spool_lines(tmp_path)
    assert len(recs) == 20_000 and len({r["d"]["_id"] for r in recs}) == 20_000
    for k in range(4):  # each writer's documents stay in order
        assert [r["d"]["i"] for r in recs if r["d"]["w"] == k] == list(range(5000))


def test_a_document_json_cannot_encode_is_rejected_alone(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    log = MetricsLog(tmp_path)
    log.write("requests", {"i": 1})
    log.write("requests", {"i": 2, "raw": b"secret-bytes"})
    log.write("samples", {"i": 3})
    assert log.flush() == 2
    assert [r["d"]["i"] for r in spool_lines(tmp_path)] == [1, 3]
    assert log.rejected == 1 and "requests" in (log.last_error or "")
    assert "secret-bytes" not in caplog.text


def test_unwritable_spool_keeps_documents_in_bounded_memory(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    log = MetricsLog(tmp_path, max_buffer=10)
    real = MetricsLog._write_segment

    def disk_full(self: MetricsLog, lines: list[str]) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(MetricsLog, "_write_segment", disk_full)
    for i in range(5):
        log.write("requests", {"i": i})
    assert log.flush() == 0
    assert log.buffered == 5 and "No space left" in (log.last_error or "")
    for i in range(5, 30):  # the inline flush fails too; beyond 2 × max_buffer: dropped
        log.write("requests", {"i": i})
    assert log.buffered == 20 and log.dropped == 10
    assert caplog.text.count("No space left") == 1, "one error line per failure streak"
    monkeypatch.setattr(MetricsLog, "_write_segment", real)
    assert log.flush() == 20
    assert [r["d"]["i"] for r in spool_lines(tmp_path)] == list(range(20))
    assert log.last_error is None


# ---- the shipper ---------------------------------------------------------------------------


def test_shipper_delivers_every_document_once(store_target: tuple[str, str], tmp_path: Path) -> None:
    store, database = store_target
    log = MetricsLog(tmp_path / "spool")
    for i in range(3000):
        log.write("requests", request_doc(i))
        if i % 700 == 0:
            log.flush()
    log.write("samples", {"time": 5.0, "instance": "shop0", "pages": 3, "gauge": None})
    log.flush()
    assert ship(tmp_path / "spool", store, database=database, exit_when_idle=True) == 0
    assert not ready_segments(tmp_path / "spool")
    db = st.open_store(store, database)
    try:
        assert db.requests.count_documents({}) == 3000
        assert db.samples.find_one({}, {"_id": 0}) == {"time": 5.0, "instance": "shop0",
                                                       "pages": 3, "gauge": None}
        assert db.requests.find_one({"path": "/item/7"}, {"_id": 0}) == request_doc(7)
    finally:
        st.close_store(db)


def test_a_segment_delivered_twice_is_stored_once(store_target: tuple[str, str], tmp_path: Path) -> None:
    """A shipper stopped between inserting and deleting a segment: the next one finds the
    documents there already."""
    store, database = store_target
    spool_dir = tmp_path / "spool"
    log = MetricsLog(spool_dir)
    for i in range(200):
        log.write("requests", request_doc(i))
    log.write("samples", {"time": 1.0, "instance": "a"})
    log.flush()
    [segment] = ready_segments(spool_dir)
    saved = segment.read_bytes()
    shipper = Shipper(spool_dir, store, database=database)
    try:
        assert shipper.ship_ready() == 201
        segment.write_bytes(saved)  # the "crash": the delivered segment is still there
        for i in range(200, 300):   # and new documents come after it
            log.write("requests", request_doc(i))
        log.flush()
        assert shipper.ship_ready() == 301
        assert shipper.delivered == 301 and shipper.duplicates == 201
        ids = all_ids(shipper.db, st.REQUESTS)
        assert len(ids) == len(set(ids)) == 300
        assert shipper.db.samples.count_documents({}) == 1
    finally:
        shipper.close()


def test_unreachable_store_keeps_the_spool_then_delivers_everything(
        tmp_path: Path, log_info: pytest.LogCaptureFixture) -> None:
    port = free_port()
    uri = f"mongodb://127.0.0.1:{port}/"
    spool_dir = tmp_path / "spool"
    log = MetricsLog(spool_dir)
    shipper = Shipper(spool_dir, uri, timeout=0.2, backoff=(0.05, 0.2))
    with running(shipper) as shipper_run:
        for i in range(1000):
            log.write("requests", request_doc(i))
            log.write("auth_calls", {"time": float(i), "instance": "a", "status": 200,
                                     "token": "secret-token-value"})
            if i % 100 == 99:
                log.flush()
        wait_until(lambda: warned(log_info, "unreachable ("), what="the outage warning")
        time.sleep(0.5)  # several retries: still one warning, nothing deleted
        assert len(ready_segments(spool_dir)) == 10
        with process(ferretdb_args(port, tmp_path / "fdb"), port, tmp_path / "fdb.log"):
            wait_until(lambda: not ready_segments(spool_dir), what="the spool to drain")
            db = st.open_store(f"mongodb://127.0.0.1:{port}/")
            assert db.requests.count_documents({}) == 1000
            assert db.auth_calls.count_documents({}) == 1000
            ids = all_ids(db, st.REQUESTS) + all_ids(db, st.AUTH_CALLS)
            assert len(set(ids)) == 2000
            st.close_store(db)
            wait_until(lambda: "store back" in log_info.text, what="the recovery line")
            shipper_run.finish()  # before FerretDB stops: it waits for connected clients
    warnings = [r.getMessage() for r in log_info.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert warnings[0].startswith(f"store mongodb://127.0.0.1:{port}/ unreachable (")
    assert f"documents waiting in {spool_dir}" in warnings[0]
    assert "store back: delivered 2000 documents" in log_info.text
    assert "secret-token-value" not in log_info.text


def test_database_stopped_during_traffic_loses_nothing(
        tmp_path: Path, log_info: pytest.LogCaptureFixture) -> None:
    """FerretDB stops during traffic and comes back on the same port and data: every document
    arrives once."""
    port = free_port()
    uri = f"mongodb://127.0.0.1:{port}/"
    data, spool_dir = tmp_path / "fdb", tmp_path / "spool"
    log = MetricsLog(spool_dir)
    written = 0
    done = threading.Event()

    def traffic() -> None:
        nonlocal written
        while not done.is_set():
            for _ in range(50):
                written += 1
                log.write("requests", request_doc(written))
            log.flush()
            time.sleep(0.02)

    shipper = Shipper(spool_dir, uri, timeout=0.2, backoff=(0.05, 0.2))
    proxy = threading.Thread(target=traffic)
    try:
        with running(shipper) as shipper_run:
            with process(ferretdb_args(port, data), port, tmp_path / "fdb1.log"):
                proxy.start()
                wait_until(lambda: shipper.delivered > 1000, what="deliveries before the stop")
            # the database is away; the traffic goes on
            wait_until(lambda: warned(log_info, "unreachable ("), what="the outage warning")
            time.sleep(0.5)
            assert ready_segments(spool_dir), "documents must wait in the spool"
            with process(ferretdb_args(port, data), port, tmp_path / "fdb2.log"):
                time.sleep(0.5)
                done.set()
                proxy.join()
                log.flush()
                wait_until(lambda: not ready_segments(spool_dir), what="the spool to drain")
                db = st.open_store(uri)
                ids = all_ids(db, st.REQUESTS)
                st.close_store(db)
                shipper_run.finish()
    finally:
        done.set()
        if proxy.is_alive():
            proxy.join()
    assert written > 2000
    assert len(ids) == len(set(ids)) == written
    assert "store back" in log_info.text


def test_a_flush_normalizes_non_finite_numbers(tmp_path: Path) -> None:
    log = MetricsLog(tmp_path)
    log.write("samples", {"a": float("nan"), "b": [float("inf"), 1.5], "c": {"d": -float("inf")}})
    assert log.flush() == 1
    [rec] = spool_lines(tmp_path)
    assert {k: v for k, v in rec["d"].items() if k != "_id"} == {
        "a": None, "b": [None, 1.5], "c": {"d": None}}


def test_refused_documents_are_kept_aside_and_the_rest_delivered(
        store_target: tuple[str, str], tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    store, database = store_target
    spool_dir = tmp_path / "spool"
    log = MetricsLog(spool_dir)
    log.write("requests", request_doc(1))
    log.write("bad$name", {"time": 1.0, "secret": "do-not-log"})
    if store.startswith("mongodb://"):  # FerretDB refuses keys starting with "$"
        log.write("requests", {"$where": "do-not-log"})
    log.write("requests", request_doc(2))
    log.flush()
    shipper = Shipper(spool_dir, store, database=database)
    try:
        shipper.ship_ready()
        assert shipper.db.requests.count_documents({}) == 2
        assert not ready_segments(spool_dir)
    finally:
        shipper.close()
    kept = [json.loads(line) for p in (spool_dir / "rejected").iterdir()
            for line in p.read_text().splitlines()]
    expected = {("bad$name", spool.INVALID_COLLECTION)}
    if store.startswith("mongodb://"):
        expected.add(("requests", 2))  # BadValue
    assert {(r["c"], r["e"]) for r in kept} == expected
    assert shipper.rejected == len(expected)
    assert "refused" in caplog.text and "do-not-log" not in caplog.text


def test_an_unfinished_segment_of_a_killed_proxy_is_adopted(tmp_path: Path) -> None:
    spool_dir, store = tmp_path / "spool", str(tmp_path / "store")
    log = MetricsLog(spool_dir)
    for i in range(10):
        log.write("requests", request_doc(i))
    log.flush()
    [segment] = ready_segments(spool_dir)
    torn = segment.read_bytes()[:-20]  # killed in the middle of the last line
    orphan = segment.with_name(segment.name + ".tmp")
    segment.unlink()
    orphan.write_bytes(torn)
    young = spool_dir / "seg-00000000000000000001-abc-00000000.jsonl.tmp"  # being written now
    young.write_bytes(b'{"c":"requests","d":{"_id":"x-1"}}\n')
    old = time.time() - spool.ORPHAN_AGE_S - 1
    os.utime(orphan, (old, old))
    assert ship(spool_dir, store, exit_when_idle=True) == 0
    db = st.open_store(store)
    assert sorted(d["path"] for d in db.requests.find({})) == sorted(
        f"/item/{i}" for i in range(9))
    st.close_store(db)
    assert young.exists() and not orphan.exists()


def test_retention_prunes_the_time_series_only(tmp_path: Path) -> None:
    spool_dir, store = tmp_path / "spool", str(tmp_path / "store")
    log = MetricsLog(spool_dir)
    for t in range(100):
        for c in (st.SAMPLES, st.REQUESTS, st.AUTH_CALLS, st.RESTARTS):
            log.write(c, {"time": 1000.0 + t, "instance": "a"})
    log.flush()
    shipper = Shipper(spool_dir, store, retention=30.0)
    try:
        shipper.ship_ready()
        assert shipper.newest_time == 1099.0
        assert shipper.prune() == 3 * 69
        for c in st.TIME_SERIES:
            times = sorted(d["time"] for d in shipper.db[c].find({}))
            assert times == [1000.0 + t for t in range(69, 100)], c
        assert shipper.db.restarts.count_documents({}) == 100
    finally:
        shipper.close()


def test_retention_is_for_the_embedded_store_only(tmp_path: Path,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    shipper = Shipper(tmp_path / "spool", f"mongodb://127.0.0.1:{free_port()}/", retention=60.0)
    shipper.close()
    assert shipper.retention == 0.0
    assert "applies to the embedded store only" in caplog.text


def test_the_shipper_writes_sample_batches_and_prunes_them_after_a_minute(
        tmp_path: Path) -> None:
    spool_dir, store = tmp_path / "spool", str(tmp_path / "store")
    log = MetricsLog(spool_dir)
    for t in range(10):
        log.write(st.SAMPLES, {"proxy": "p", "time": 1000.0 + t, "instance": f"i{t % 3}"})
    log.write(st.REQUESTS, {"proxy": "p", "time": 1000.0, "instance": "i0"})
    log.flush()
    shipper = Shipper(spool_dir, store)
    try:
        shipper.ship_ready()
        [batch] = list(shipper.db.sample_batches.find({}))
        assert (batch["proxy"], batch["seq"], batch["count"], batch["time"]) == ("p", 1, 10,
                                                                                  1009.0)
        assert records.unpack_columns(batch)["_id"] == [
            d["_id"] for d in shipper.db.samples.find({}).sort("time", 1)]
        shipper._prune_batches()  # younger than a minute: kept
        assert shipper.db.sample_batches.count_documents({}) == 1
        # Another proxy's, abandoned long ago, and one it still prunes itself.
        st.insert_new(shipper.db, st.SAMPLE_BATCHES, [
            {"_id": "gone", "proxy": "gone:8080", "shipped_at": time.time() - 700.0},
            {"_id": "alive", "proxy": "alive:8080", "shipped_at": time.time() - 70.0}])
        shipper._prune_batches(time.time() + st.SAMPLE_BATCH_RETENTION_S + 1)
        assert [d["_id"] for d in shipper.db.sample_batches.find({})] == ["alive"]
        assert shipper.db.samples.count_documents({}) == 10  # the record stays
    finally:
        shipper.close()


def test_no_retention_keeps_everything(tmp_path: Path) -> None:
    shipper = Shipper(tmp_path / "spool", str(tmp_path / "store"))
    log = MetricsLog(tmp_path / "spool")
    log.write(st.SAMPLES, {"time": 1.0})
    log.write(st.SAMPLES, {"time": 1e9})
    log.flush()
    try:
        shipper.ship_ready()
        assert shipper.prune() == 0
        assert shipper.db.samples.count_documents({}) == 2
    finally:
        shipper.close()


def test_one_shipper_per_spool(tmp_path: Path, log_info: pytest.LogCaptureFixture) -> None:
    spool_dir, store = tmp_path / "spool", str(tmp_path / "store")
    log = MetricsLog(spool_dir)
    first = Shipper(spool_dir, store)
    with running(first):
        lock = spool_dir / spool.LOCK_FILE
        wait_until(lambda: lock.exists() and lock.read_text().strip() == str(os.getpid()),
                   what="the lock")
        second = Shipper(spool_dir, store)
        with running(second):
            wait_until(lambda: warned(log_info, "another shipper"), what="the wait message")
            assert f"(pid {os.getpid()})" in log_info.text
        log.write("requests", request_doc(1))
        log.flush()
        wait_until(lambda: not ready_segments(spool_dir), what="delivery by the first")
    assert first.delivered == 1 and second.delivered == 0


# ---- the command line ----------------------------------------------------------------------


def start_cli(tmp_path: Path, *args: str) -> tuple[subprocess.Popen[bytes], Path]:
    err = tmp_path / "shipper.log"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with err.open("wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "addons.telemetry.shipper", "ship", *args], cwd=ROOT,
                                env=env, stdout=subprocess.DEVNULL, stderr=out)
    return proc, err


def test_sigterm_delivers_what_is_ready_then_exits_0(tmp_path: Path) -> None:
    spool_dir, store = tmp_path / "spool", str(tmp_path / "store")
    proc, err = start_cli(tmp_path, "--spool", str(spool_dir), "--store", store)
    try:
        wait_until(lambda: "shipping" in err.read_text(), what="the shipper to start")
        log = MetricsLog(spool_dir)
        for k in range(5):
            for i in range(200):
                log.write("requests", request_doc(k * 200 + i))
            log.flush()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not ready_segments(spool_dir)
    db = st.open_store(store)
    assert db.requests.count_documents({}) == 1000
    st.close_store(db)
    assert "1000 documents delivered" in err.read_text()


def test_sigterm_with_the_store_away_keeps_the_spool(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    log = MetricsLog(spool_dir)
    for i in range(300):
        log.write("requests", request_doc(i))
    log.flush()
    uri = f"mongodb://reader:hunter2@127.0.0.1:{free_port()}/?authSource=admin"
    proc, err = start_cli(tmp_path, "--spool", str(spool_dir), "--store", uri,
                          "--timeout", "0.2")
    try:
        wait_until(lambda: "unreachable" in err.read_text(), what="the outage warning")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0  # it stops during the outage instead of waiting for the store
    finally:
        if proc.poll() is None:
            proc.kill()
    text = err.read_text()
    assert len(ready_segments(spool_dir)) == 1
    assert "300 documents waiting in" in text and "hunter2" not in text
    assert "mongodb://127.0.0.1:" in text


def test_once_exits_1_when_the_store_is_away(tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    MetricsLog(spool_dir).write("requests", {})
    assert ship(spool_dir, f"mongodb://127.0.0.1:{free_port()}/", once=True, timeout=0.2) == 1
    assert ship(spool_dir, str(tmp_path / "store"), once=True) == 0
