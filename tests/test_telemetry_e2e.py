"""Metrics delivery and secrets, end to end: a real mitmdump with the addon, the auth server,
the shop, FerretDB or the embedded store, and raw sockets where a client would send bytes that
no well-behaved library sends.

- A request whose path is not UTF-8 never blocks delivery of the others (issue 9.1).
- Credentials in a query string never reach the spool or the store (9.5).
- The database password is not on the shipper's command line (9.6).
- The shipper exits when mitmdump is killed, after delivering what was spooled (9.7).
- Spool and store files are private to the user (9.12).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import stat
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from addons.telemetry import store as st
from scenarios.procs import Stack, local_stack, stop

from .faults.harness import cmdline, raw_request, shipper_of, wait_gone

pytestmark = [pytest.mark.e2e]


@contextlib.contextmanager
def running(tmp: Path, store: str, **options: str) -> Iterator[Stack]:
    with contextlib.ExitStack() as exits:
        yield local_stack(exits, tmp, store=store, quiet=False,
                          options={"termlog_verbosity": "warn", **options})


def login(s: Stack, user: str) -> str:
    r = httpx.post(f"{s.auth}/login", json={"user": user}, timeout=30)
    r.raise_for_status()
    return str(r.json()["token"])


def get(s: Stack, path: str, token: str | None) -> httpx.Response:
    headers = {"Host": "shop.example"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.get(s.proxy + path, headers=headers, timeout=30)


def paths(store: str) -> list[str]:
    db = st.open_store(store, timeout=10)
    try:
        return [d["path"] for d in db[st.REQUESTS].find({}, {"path": 1, "_id": 0})]
    finally:
        st.close_store(db)


def wait_for_paths(store: str, wanted: set[str], timeout: float = 60) -> set[str]:
    deadline = time.monotonic() + timeout
    got: set[str] = set()
    while time.monotonic() < deadline:
        got = set(paths(store)) & wanted
        if got == wanted:
            break
        time.sleep(0.3)
    return got


def spooled(spool: Path) -> set[str]:
    """The paths of the `requests` documents in the spool's ready segments."""
    found = set()
    for segment in spool.glob("seg-*.jsonl"):
        with contextlib.suppress(FileNotFoundError):
            for line in segment.read_text().splitlines():
                record = json.loads(line)
                if record["c"] == st.REQUESTS:
                    found.add(record["d"]["path"])
    return found


@pytest.fixture
def mongo_db(mongo_uri: str) -> Iterator[str]:
    """A fresh database on the MongoDB-protocol server, as a URI; dropped afterwards."""
    name = f"telemetry_{uuid.uuid4().hex[:10]}"
    uri = f"{mongo_uri.rstrip('/')}/{name}"
    yield uri
    db = st.open_store(uri, timeout=10)
    db.client.drop_database(name)
    st.close_store(db)


@pytest.fixture(params=["ferretdb", "embedded"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    if request.param == "ferretdb":
        return str(request.getfixturevalue("mongo_db"))
    return str(tmp_path / "metrics-store")


def test_a_path_that_is_not_utf8_never_blocks_delivery(tmp_path: Path, store: str) -> None:
    with running(tmp_path / "run", store) as s:
        token = login(s, "carol")
        raw = b"GET /caf\xe9/x?q=\xff&\\=1 HTTP/1.1\r\nHost: shop.example\r\n\r\n"
        assert asyncio.run(raw_request(int(s.proxy.rpartition(":")[2]), raw)) == 401
        for i in range(10):
            assert get(s, f"/after/{i}", token).status_code == 200
        assert stop(s.proxy_process, 120) == 0
        log = (tmp_path / "run" / "mitmdump.log").read_text(errors="replace")
    stored = paths(store)
    assert sorted(p for p in stored if p.startswith("/after/")) == sorted(
        f"/after/{i}" for i in range(10)), log[-3000:]
    assert "not all delivered" not in log
    # The poison request itself is stored, escaped losslessly and valid UTF-8.
    poison = [p for p in stored if p.startswith("/caf")]
    assert len(poison) == 1
    poison[0].encode("utf-8")
    from addons.telemetry.spool import unescape_text

    assert unescape_text(poison[0]) == "/caf\udce9/x?q=\udcff&\\=1"


def test_credentials_in_a_query_never_reach_the_spool_or_the_store(tmp_path: Path) -> None:
    store = tmp_path / "metrics-store"
    with running(tmp_path / "run", str(store), wasm_redact_params="my_Secret,sig") as s:
        token = login(s, "dave")
        for path in ("/account?access_token=SEKRIT-1&page=2",
                     "/a?api_key=SEKRIT-2&TOKEN=SEKRIT-3&key=SEKRIT-4",
                     "/b?x=1&my_secret=SEKRIT-5&Sig=SEKRIT-6&keep=ok"):
            assert get(s, path, token).status_code == 200
        assert stop(s.proxy_process, 120) == 0
        spool = s.spool
    stored = set(paths(str(store)))
    assert stored == {"/account?access_token=REDACTED&page=2",
                      "/a?api_key=REDACTED&TOKEN=REDACTED&key=REDACTED",
                      "/b?x=1&my_secret=REDACTED&Sig=REDACTED&keep=ok"}
    for folder in (spool, store):
        for f in folder.rglob("*"):
            if f.is_file():
                assert b"SEKRIT" not in f.read_bytes(), f"a credential in {f}"


def test_the_database_password_is_not_on_the_shippers_command_line(
        tmp_path: Path, mongo_uri: str, monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"telemetry_{uuid.uuid4().hex[:10]}"
    server = mongo_uri.removeprefix("mongodb://").split("/")[0]
    # FerretDB with the SQLite handler takes PLAIN credentials without checking them.
    uri = f"mongodb://wasm:pw-SEKRIT-9@{server}/{name}?authMechanism=PLAIN"
    monkeypatch.setenv("MONGODB_URI", uri)  # mitmdump reads it: not on its command line either
    try:
        with running(tmp_path / "run", "", wasm_store="") as s:
            token = login(s, "erin")
            assert get(s, "/one", token).status_code == 200
            shipper = shipper_of(s.proxy_process.pid)
            assert shipper is not None
            for pid in (shipper, s.proxy_process.pid):
                args = cmdline(pid)
                assert args and not any("SEKRIT" in a for a in args), args
            assert wait_for_paths(uri, {"/one"}) == {"/one"}
    finally:
        db = st.open_store(uri, timeout=10)
        db.client.drop_database(name)
        st.close_store(db)


def test_the_shipper_exits_when_mitmdump_is_killed(tmp_path: Path, mongo_db: str) -> None:
    with running(tmp_path / "run", mongo_db) as s:
        token = login(s, "frank")
        shipper = shipper_of(s.proxy_process.pid)
        assert shipper is not None
        wanted = {f"/before-kill/{i}" for i in range(20)}
        for path in sorted(wanted):
            assert get(s, path, token).status_code == 200
        deadline = time.monotonic() + 60  # the addon spools every 0.5 s: wait until it did
        while time.monotonic() < deadline and not wanted <= spooled(s.spool) | set(
                paths(mongo_db)):
            time.sleep(0.2)
        s.proxy_process.send_signal(signal.SIGKILL)
        s.proxy_process.wait()
        gone = wait_gone(shipper, 30)
        if gone is None:
            os.kill(shipper, signal.SIGKILL)
        assert gone is not None, "the shipper outlived its mitmdump by 30 s"
    assert set(paths(mongo_db)) >= wanted


def test_spool_and_embedded_store_are_private(tmp_path: Path) -> None:
    store = tmp_path / "metrics-store"
    old = os.umask(0o022)  # the usual umask: files 0644, folders 0755 unless made private
    try:
        with running(tmp_path / "run", str(store)) as s:
            token = login(s, "gina")
            assert get(s, "/private", token).status_code == 200
            assert wait_for_paths(str(store), {"/private"}) == {"/private"}
            assert stop(s.proxy_process, 120) == 0
            spool = s.spool
    finally:
        os.umask(old)
    for top in (spool, store):
        for path in [top, *top.rglob("*")]:
            mode = stat.S_IMODE(path.stat().st_mode)
            if path.is_dir():
                assert mode == 0o700, f"{path} is {mode:o}"
            else:
                assert mode == 0o600, f"{path} is {mode:o}"


def test_a_shipper_that_dies_is_started_again_and_delivers(tmp_path: Path) -> None:
    store = str(tmp_path / "metrics-store")
    with running(tmp_path / "run", store) as s:
        token = login(s, "grace")
        shipper = shipper_of(s.proxy_process.pid)
        assert shipper is not None
        os.kill(shipper, signal.SIGKILL)
        assert wait_gone(shipper, 30) is not None
        wanted = {f"/after-kill/{i}" for i in range(5)}
        for path in sorted(wanted):
            assert get(s, path, token).status_code == 200
        again = shipper_of(s.proxy_process.pid)
        assert again is not None and again != shipper
        assert wait_for_paths(store, wanted) >= wanted  # delivered while mitmdump runs
        log = (tmp_path / "run" / "mitmdump.log").read_text(errors="replace")
    assert "wasm shipper exited (status -9): started again" in log
