"""Edges of the commands a user runs: a server that listens and then gives up, a port held by
someone else, a proxy that refuses the HAR replay's filter configuration.

Real processes on 127.0.0.1 (`scenarios.procs.process`, `python -m scenarios har-replay`),
no mocks.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scenarios.procs import StartFailed, free_port, last_error_line, listens_on, process

ROOT = Path(__file__).resolve().parent.parent

LINUX_PROC = Path("/proc/net/tcp").exists()


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


def listen_then(port: int, then: str, after: float = 0.3) -> list[str]:
    """A program that listens on `port`, then, `after` seconds later, runs `then`."""
    return python(
        "import socket, sys, time\n"
        f"s = socket.create_server(('127.0.0.1', {port}))\n"
        f"time.sleep({after})\n"
        f"{then}\n")


@pytest.mark.parametrize(("log", "line"), [
    ("", ""),
    ("starting\nlistening on 8000\n", "listening on 8000"),
    ("[23:34:56.544] wasm_auth: wasm_filter: proxy_on_configure returned false: the filter "
     "failed\nError logged during startup, exiting...\n",
     "wasm_auth: wasm_filter: proxy_on_configure returned false: the filter failed"),
    ("Traceback (most recent call last):\n  File \"x.py\", line 1\n"
     "OSError: [Errno 98] Address already in use\n",
     "OSError: [Errno 98] Address already in use"),
    ("fatal: bad option --frob\nshutting down\n", "fatal: bad option --frob"),
])
def test_last_error_line(log: str, line: str) -> None:
    assert last_error_line(log) == line


def test_last_error_line_is_bounded() -> None:
    assert len(last_error_line("error: " + "x" * 1000, limit=80)) == 80


def test_a_server_that_listens_then_exits_is_one_line(tmp_path: Path) -> None:
    """A program may listen and then give up (mitmdump does, on errors logged during start-up):
    its port was open for a moment, but it did not start."""
    port = free_port()
    log = tmp_path / "server.log"
    args = listen_then(port, "print('starting'); print('fatal: bad option --frob', "
                             "flush=True); sys.exit(3)", after=0.2)
    with pytest.raises(StartFailed) as e, process(args, port, log, timeout=20, settle=5):
        pass
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("python")
    assert f"exited with 3 right after listening on 127.0.0.1:{port}: fatal: bad option --frob" \
        in message
    assert message.endswith(f"(log: {log})")


def test_a_server_that_keeps_running_is_started(tmp_path: Path) -> None:
    port = free_port()
    t0 = time.monotonic()
    with process(listen_then(port, "time.sleep(60)", after=0), port, tmp_path / "ok.log",
                 settle=0.5) as proc:
        assert proc.poll() is None
        assert time.monotonic() - t0 >= 0.5
        socket.create_connection(("127.0.0.1", port), 1).close()
    assert proc.poll() is not None  # stopped on leaving


def test_a_server_that_exits_before_listening_names_its_last_error(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "server.log"
    with pytest.raises(StartFailed, match=r"exited with 1 before listening on 127\.0\.0\.1:\d+: "
                                          r"ValueError: no such store"), \
            process(python("raise ValueError('no such store')"), port, log):
        pass


@pytest.mark.skipif(not LINUX_PROC, reason="tells whose port it is from Linux's /proc")
def test_a_port_held_by_another_process_is_not_taken_for_the_servers(tmp_path: Path) -> None:
    """Another program holds the port (a port that was free a moment ago is not reserved):
    that it answers does not mean ours started."""
    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]
        with pytest.raises(TimeoutError, match=rf"127\.0\.0\.1:{port} is held by another "
                                               r"process, not by python"), \
                process(python("import time; time.sleep(60)"), port, tmp_path / "idle.log",
                        timeout=1.5):
            pass


@pytest.mark.skipif(not LINUX_PROC, reason="tells whose port it is from Linux's /proc")
def test_a_server_that_cannot_listen_says_why(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as other:
        port = other.getsockname()[1]
        with pytest.raises(StartFailed, match=r"exited with 1 before listening on .*: "
                                              r"OSError: \[Errno 98\] Address already in use"), \
                process([sys.executable, "-m", "http.server", "--bind", "127.0.0.1", str(port)],
                        port, tmp_path / "http.log", timeout=20):
            pass


@pytest.mark.skipif(not LINUX_PROC, reason="tells whose port it is from Linux's /proc")
def test_listens_on_tells_a_childs_port_from_a_strangers(tmp_path: Path) -> None:
    """A server may listen from a child process (nginx's workers): that counts as its own."""
    port = free_port()
    parent = subprocess.Popen(python(
        "import subprocess, sys, time\n"
        "subprocess.Popen([sys.executable, '-c', \"import socket, time; "
        f"s = socket.create_server(('127.0.0.1', {port})); time.sleep(60)\"])\n"
        "time.sleep(60)\n"), start_new_session=True)
    try:
        deadline = time.monotonic() + 20
        while listens_on(parent, port) is not True and time.monotonic() < deadline:
            time.sleep(0.05)
        assert listens_on(parent, port) is True
        with socket.create_server(("127.0.0.1", 0)) as other:
            assert listens_on(parent, other.getsockname()[1]) is False
    finally:
        os.killpg(parent.pid, 15)
        parent.wait()


# ---- har-replay: a proxy that does not start stops the replay in one line -------------------


def scenarios_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "scenarios", *args], cwd=cwd,
                          env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL, check=False)


@pytest.mark.e2e
def test_har_replay_stops_when_mitmdump_does_not_start(tmp_path: Path) -> None:
    """The filter refuses its configuration: mitmdump listens, logs the error and exits. The
    replay must not go on against a proxy that is gone (it used to send every request into a
    closed port and report them as failed requests)."""
    assert scenarios_cli("basic", "--count", "2", "--out", "b.jsonl", cwd=tmp_path).returncode == 0
    assert scenarios_cli("har-write", "b.jsonl", "--out", "b.har", cwd=tmp_path).returncode == 0
    done = scenarios_cli("har-replay", "b.har", "--fast", "--json", "--filter-config",
                         json.dumps({"ttl_seconds": "soon"}), cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert done.stdout == ""  # no result: nothing was replayed
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, done.stderr
    assert errors[0].startswith("python -m scenarios har-replay: error: mitmdump exited with 1 ")
    assert '"ttl_seconds" must be a number' in errors[0]  # the filter's own reason
    log = errors[0].rsplit("(log: ", 1)[1].rstrip(")")
    assert Path(log).name == "mitmdump.log" and Path(log).is_file()
    assert "Traceback" not in done.stderr and "some requests failed" not in done.stderr
