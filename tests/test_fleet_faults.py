"""Operator mistakes in a fleet, on real processes: two mitmdumps that were given the same
`wasm_proxy_id` (and share its token file), one FerretDB, one manager that finds the proxies
in the store.

Their documents carry the same `proxy`, so the store cannot tell their samples apart, and they
take turns in the one `proxies` document. The manager must say so (one error line) and restart
none of that id's instances, rather than act on mixed samples through whichever endpoint
registered last.
"""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pymongo
import pytest

from scenarios.procs import free_port, mitmdump_path, process
from tests.test_fleet import stop_processes_using, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.mongo]

ROOT = Path(__file__).resolve().parent.parent
SHARED = "ERROR manager.daemon: two proxies register as proxy id twin"


def test_two_proxies_with_one_proxy_id_are_reported_and_not_restarted(
        tmp_path: Path, mongo_database: tuple[str, pymongo.database.Database[Any]]) -> None:
    uri, db = mongo_database
    token_file = tmp_path / "tokens" / "twin"  # one file: both proxies answer its token
    token_file.parent.mkdir(mode=0o700)
    env = {"PYTHONPATH": str(ROOT)}
    shop_port = free_port()
    upstream = f"http://127.0.0.1:{shop_port}"  # the shop; no auth server: no token sent
    with contextlib.ExitStack() as exits:
        exits.callback(stop_processes_using, tmp_path)  # a shipper outliving its proxy
        exits.enter_context(process([sys.executable, "-m", "scenarios", "shop", "--port",
                                     str(shop_port)], shop_port, tmp_path / "shop.log", env))
        urls = []
        for name in ("a", "b"):
            port, admin = free_port(), free_port()
            sets = {"wasm_proxy_id": "twin", "wasm_store": uri, "wasm_cluster": f"auth={upstream}",
                    "wasm_spool": str(tmp_path / name / "spool"),
                    "wasm_admin_listen": f"127.0.0.1:{admin}",
                    "wasm_admin_token_file": str(token_file), "keep_host_header": "true",
                    "wasm_sample_interval": "0.2"}
            exits.enter_context(process(
                [mitmdump_path(), "-q", "-s", str(ROOT / "addons" / "wasm_auth.py"),
                 "--mode", f"reverse:{upstream}", "--listen-host", "127.0.0.1", "-p", str(port),
                 *[a for k, v in sets.items() for a in ("--set", f"{k}={v}")]],
                port, tmp_path / f"proxy-{name}.log", env, timeout=60))
            urls.append(f"http://127.0.0.1:{port}")
        for url in urls:  # an instance of shop.example on each (no token: 401)
            assert httpx.get(f"{url}/product/1", headers={"Host": "shop.example"}, timeout=10
                             ).status_code == 401
        wait_until("samples of both proxies", lambda: len(db.samples.distinct(
            "started_at", {"proxy": "twin"})) >= 2, timeout=30)

        # Traffic on both all along, so that both keep sampling their instance.
        stop = threading.Event()

        def traffic() -> None:
            with httpx.Client(timeout=10) as client:
                while not stop.wait(0.2):
                    for url in urls:
                        with contextlib.suppress(httpx.HTTPError):
                            client.get(f"{url}/product/1", headers={"Host": "shop.example"})

        pump = threading.Thread(target=traffic, daemon=True)
        pump.start()
        exits.callback(pump.join, 15)
        exits.callback(stop.set)
        log = tmp_path / "manager.log"
        with log.open("wb") as out:
            manager = subprocess.Popen(
                [sys.executable, "-m", "manager", "run", "--store", uri, "--proxies-from-store",
                 "--token-file", str(token_file), "--policy", "fixed:1s", "--interval", "0.5s",
                 "--heartbeat", "15s", "--timeout", "3s"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        exits.callback(lambda: (manager.poll() is None and manager.terminate(),
                                manager.wait(20)))
        # The two take turns in `proxies` every 5 s: seen within two or three turns.
        wait_until("the shared proxy id reported", lambda: SHARED in log.read_text(),
                   timeout=30, log=log)
        time.sleep(1.0)  # a restart asked for before the report has ended
        before = db.restarts.count_documents({})
        time.sleep(6.0)  # over a turn of the `proxies` document: both endpoints asked
        assert manager.poll() is None, log.read_text()[-3000:]
        assert db.restarts.count_documents({}) == before, log.read_text()[-3000:]
        wait_until("the refusals recorded", lambda: db.decisions.count_documents(
            {"outcome": "failed", "detail": "two proxies register as proxy id twin"}) > 0
            or None, timeout=10, log=log)
        text = log.read_text()
        assert text.count(SHARED) == 1, text[-3000:]
        assert "Traceback" not in text
        assert token_file.read_text().strip() not in text
