"""The paths a user takes with a real mitmdump: a bad option value, a second checkout, and the
shipper's log lines.

Each test starts `mitmdump -s addons/wasm_auth.py` as a user would and reads what it printed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scenarios.procs import free_port, mitmdump_path, stop, wait_for_port

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


def mitmdump(args: list[str], cwd: Path, env: dict[str, str] | None = None,
             timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run mitmdump to completion (it exits by itself on a startup error)."""
    return subprocess.run([mitmdump_path(), "--listen-host", "127.0.0.1", "-p", "0", *args],
                          cwd=cwd, env={**os.environ, **(env or {})}, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def serve_briefly(args: list[str], cwd: Path, env: dict[str, str] | None = None,
                  until: str = "") -> str:
    """Start mitmdump, wait until it listens (and has printed `until`, 30 s at most), stop
    it; what it printed."""
    port = free_port()
    log = cwd / "mitmdump.out"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [mitmdump_path(), "--listen-host", "127.0.0.1", "-p", str(port), *args], cwd=cwd,
            env={**os.environ, **(env or {})}, stdout=out, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL)
    try:
        wait_for_port(port, 60, proc, log)
        deadline = time.monotonic() + 30
        while until and until not in log.read_text(errors="replace") and (
                time.monotonic() < deadline):
            time.sleep(0.1)
    finally:
        stop(proc, timeout=30)
    return log.read_text(errors="replace")


@pytest.mark.parametrize(("option", "message"), [
    ("wasm_cluster=auth", "wasm_auth: wasm_cluster: expected NAME=URL, got 'auth'"),
    ("wasm_sample_interval=soon", "wasm_auth: wasm_sample_interval: 'soon' is not a number"),
    ("wasm_filter_config={oops", "wasm_auth: wasm_filter: proxy_on_configure returned false: "
                                 "the filter rejected its plugin configuration"),
    ("wasm_filter=/nonexistent.wasm", "wasm_auth: wasm_filter: cannot read filter"),
])
def test_a_bad_option_value_is_one_line_and_mitmdump_stops(tmp_path, option, message) -> None:
    done = mitmdump(["-s", str(ROOT / "addons" / "wasm_auth.py"), "--set", option,
                     "--set", "wasm_admin_listen=", "--set", "wasm_log_metrics=false"], tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode != 0
    assert message in output
    assert "Traceback" not in output and "direct cause" not in output
    assert sum("wasm_auth:" in line for line in output.splitlines()) == 1


def test_the_script_imports_the_checkout_beside_it(tmp_path) -> None:
    """Two checkouts: the one on PYTHONPATH (as `pip install -e` would put it) and a second
    one whose script the user runs. The second one's `addons` must be the one imported."""
    second = tmp_path / "second"
    shutil.copytree(ROOT / "addons", second / "addons",
                    ignore=shutil.ignore_patterns("__pycache__"))
    (second / "filters").mkdir()
    shutil.copy(ROOT / "filters" / "auth_cache.wasm", second / "filters")
    probe = tmp_path / "probe.py"
    probe.write_text(
        "import logging, sys\n"
        "def running():\n"
        "    for name in ('addons', 'addons.proxywasm.host', 'addons.admin'):\n"
        "        logging.info('probe %s from %s', name, sys.modules[name].__file__)\n")
    env = {"PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    out = serve_briefly(["-s", str(second / "addons" / "wasm_auth.py"), "-s", str(probe),
                         "--set", "wasm_admin_listen=", "--set", "wasm_log_metrics=false"],
                        tmp_path, env)
    lines = [line for line in out.splitlines() if "probe addons" in line]
    assert len(lines) == 3, out
    for line in lines:
        assert str(second / "addons") in line, line


def test_shipper_lines_go_through_mitmproxys_log(tmp_path) -> None:
    """The shipper is a separate process: its lines must reach mitmproxy's log (the console's
    event list), not the terminal under the console."""
    out = serve_briefly(["-s", str(ROOT / "addons" / "wasm_auth.py"),
                         "--set", "wasm_admin_listen=",
                         "--set", f"wasm_store={tmp_path / 'store'}",
                         "--set", f"wasm_spool={tmp_path / 'spool'}"],
                        tmp_path, {"PYTHONPATH": str(ROOT)}, until="wasm shipper: shipping")
    relayed = [line for line in out.splitlines() if "wasm shipper: shipping" in line]
    assert relayed, out
    assert "[wasm shipper]" not in out  # the shipper's own format never reaches the terminal



# ---- HAR replay: one command, local servers, real tokens ---------------------------------------


def scenarios_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scenarios", *args], cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)


def test_har_replay_of_what_har_write_wrote(tmp_path) -> None:
    assert scenarios_cli("basic", "--count", "6", "--out", "b.jsonl", cwd=tmp_path).returncode == 0
    assert scenarios_cli("har-write", "b.jsonl", "--out", "b.har", cwd=tmp_path).returncode == 0
    har = json.loads((tmp_path / "b.har").read_text())
    socket = json.loads(json.dumps(har["log"]["entries"][0]))
    socket["request"]["url"] = "wss://shop.example/live"
    har["log"]["entries"].append(socket)  # skipped, and said once
    (tmp_path / "b.har").write_text(json.dumps(har))
    done = scenarios_cli("har-replay", "b.har", "--fast", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("skipped 1 WebSocket and data: URL entries") == 1, done.stderr
    result = json.loads(done.stdout)
    assert result["ok"] and result["replay"]["status"] == {"200": 12}
    # Each login's request misses (one auth call), each logout evicts its token.
    assert result["decisions"] == {"shop.example": {"miss": 6, "logout": 6}}
    assert result["auth_calls"] == {"200": 6}
    assert Path(result["state"]).resolve().is_relative_to((tmp_path / ".wasm-reclaim").resolve())


def chrome_entry(when: str, url: str, token: str, method: str = "GET") -> dict[str, object]:
    """An entry as Chrome's DevTools saves it for an HTTP/2 request."""
    host = url.split("/")[2]
    path = "/" + url.split("/", 3)[3]
    return {
        "startedDateTime": when, "time": 20.1,
        "request": {
            "method": method, "url": url, "httpVersion": "http/2.0",
            "headers": [{"name": ":authority", "value": host}, {"name": ":method", "value": method},
                        {"name": ":path", "value": path}, {"name": ":scheme", "value": "https"},
                        {"name": "authorization", "value": f"Bearer {token}"},
                        {"name": "accept", "value": "*/*"}],
            "queryString": [], "cookies": [], "headersSize": -1, "bodySize": 0},
        "response": {"status": 200, "statusText": "", "httpVersion": "http/2.0", "headers": [],
                     "cookies": [], "content": {"size": 0, "mimeType": "text/html"},
                     "redirectURL": "", "headersSize": -1, "bodySize": 0, "_transferSize": 0},
        "cache": {}, "timings": {"send": 0.1, "wait": 20, "receive": 0.1},
        "_initiator": {"type": "other"}, "_priority": "VeryHigh", "_resourceType": "document",
    }


def test_har_replay_of_a_chrome_recording(tmp_path) -> None:
    """Pseudo-headers, real-looking tokens and two recorded hosts: each host gets its own
    filter instance, the tokens are registered (hashed) with the local auth server, and no
    recorded token reaches the trace or the store."""
    secret_a, secret_b = "eyJhbGciOiJIUzI1NiJ9.c2VjcmV0LWE.sig-A", "opaque-token-B"
    har = {"log": {"version": "1.2", "creator": {"name": "WebInspector", "version": "537.36"},
                   "pages": [], "entries": [
        # Seconds apart, so that each token's first answer is cached before its next request.
        chrome_entry("2024-05-01T10:00:00.000Z", "https://app.example/", secret_a),
        chrome_entry("2024-05-01T10:00:03.000Z", "https://app.example/api/cart", secret_a),
        chrome_entry("2024-05-01T10:00:03.500Z", "https://api.example:8443/v1/me", secret_b),
        chrome_entry("2024-05-01T10:00:06.000Z", "https://app.example/logout", secret_a, "POST"),
        chrome_entry("2024-05-01T10:00:06.500Z", "https://api.example:8443/v1/me", secret_b),
    ]}}
    (tmp_path / "chrome.har").write_text(json.dumps(har))
    done = scenarios_cli("har-replay", "chrome.har", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["decisions"] == {"app.example": {"miss": 1, "hit": 1, "logout": 1},
                                   "api.example": {"miss": 1, "hit": 1}}
    state = Path(result["state"])
    stored = "".join(p.read_text(errors="replace") for p in state.rglob("*") if p.is_file()
                     and p.suffix in ("", ".jsonl", ".log", ".json"))
    assert secret_a not in stored and secret_b not in stored and secret_a not in done.stdout
