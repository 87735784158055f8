"""Starting and stopping local servers for demos and tests, on 127.0.0.1."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path


def mitmdump_path() -> str:
    """The mitmdump of this Python environment (beside the interpreter), else the one on PATH."""
    beside = Path(sys.executable).parent / "mitmdump"
    return str(beside) if beside.exists() else shutil.which("mitmdump") or "mitmdump"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class StartFailed(RuntimeError):
    """A process started to serve a port exited before it served (or right after it began to):
    one line naming the program, its exit code and the last error line of its log."""


ERROR_WORDS = re.compile(r"error|exception|fatal|panic|fail|cannot|can't|unable|refused|denied|"
                         r"invalid|not found|no such|in use|usage:|abort", re.IGNORECASE)
"""What marks a log line as the reason a program gave up."""

STARTUP_TRAILERS = ("Error logged during startup", "Errors logged during startup")
"""mitmproxy's own last words after errors at start-up: the line before says what they were."""


def last_error_line(text: str, limit: int = 300) -> str:
    """The last line of `text` that reads like an error (else its last non-empty line), without
    a leading ``[hh:mm:ss.mmm]`` time stamp, at most `limit` characters; empty for no text."""
    lines = [re.sub(r"^\[[0-9:.]+\]\s*", "", line).strip() for line in text.splitlines()]
    lines = [line for line in lines if line and not line.startswith(STARTUP_TRAILERS)]
    errors = [line for line in lines if ERROR_WORDS.search(line)]
    line = (errors or lines or [""])[-1]
    return line if len(line) <= limit else line[:limit - 1] + "…"


def _program(proc: subprocess.Popen[bytes]) -> str:
    given = proc.args
    args = ([os.fsdecode(a) for a in given] if isinstance(given, list | tuple)
            else [os.fsdecode(given) if isinstance(given, str | bytes | os.PathLike) else "?"])
    name = Path(args[0]).name
    if name.startswith("python") and len(args) > 2 and args[1] == "-m":
        name = f"{name} -m {args[2]}"
    return name


def _failed(proc: subprocess.Popen[bytes], port: int, log: Path | None, when: str) -> StartFailed:
    text = log.read_text(errors="replace")[-20000:] if log and log.exists() else ""
    reason = last_error_line(text) or "it printed nothing"
    where = f" (log: {log})" if log else ""
    return StartFailed(f"{_program(proc)} exited with {proc.returncode} {when} 127.0.0.1:{port}: "
                       f"{reason}{where}")


def listens_on(proc: subprocess.Popen[bytes], port: int) -> bool | None:
    """Whether `proc` (or a process it started: nginx's workers) holds a socket listening on
    TCP `port` (psutil); None where that cannot be told (it has gone, or its sockets cannot be
    read)."""
    import psutil

    try:
        parent = psutil.Process(proc.pid)
        family = [parent, *parent.children(recursive=True)]
    except psutil.Error:
        return None
    readable = False
    for member in family:
        try:
            sockets = member.net_connections(kind="tcp")
        except psutil.Error:
            continue
        readable = True
        if any(c.status == psutil.CONN_LISTEN and c.laddr and c.laddr.port == port
               for c in sockets):
            return True
    return False if readable else None


SETTLE_MIN, SETTLE_MAX = 0.25, 1.0
"""Bounds of the seconds a started process must keep listening before it counts as started."""


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None,
                  log: Path | None = None, settle: float | None = 0.0) -> None:
    """Wait until `proc` (or, without it, anything) accepts connections on 127.0.0.1:`port`.

    With `proc`: a listener that is not `proc`'s own (or a child's, as psutil tells) does not
    count, and once `proc` listens it must keep running and listening for `settle` more
    seconds, since a program may listen before it gives up (mitmdump exits on errors logged
    during start-up after its proxy listens); `settle=None`: as long as it took to listen,
    between :data:`SETTLE_MIN` and :data:`SETTLE_MAX` (a loaded machine is slower at both).
    Raises :class:`StartFailed` (one line: the exit code and the last error line of `log`) if
    `proc` exits first, TimeoutError otherwise."""
    started = time.monotonic()
    deadline = started + timeout
    others = False
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise _failed(proc, port, log, "before listening on")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
        except OSError:
            time.sleep(0.05)
            continue
        if proc is None:
            return
        if listens_on(proc, port) is False:
            others = True  # someone else's port: ours will fail to listen, or time out
            time.sleep(0.1)
            continue
        took = time.monotonic() - started
        _settle(proc, port, log,
                min(SETTLE_MAX, max(SETTLE_MIN, took)) if settle is None else settle)
        return
    if others and proc is not None:
        raise TimeoutError(f"127.0.0.1:{port} is held by another process, not by "
                           f"{_program(proc)} (pid {proc.pid}), after {timeout} s")
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout} s")


def _settle(proc: subprocess.Popen[bytes], port: int, log: Path | None, settle: float) -> None:
    """`proc` listens: fail if it exits, or stops listening, within `settle` seconds."""
    until = time.monotonic() + settle
    while time.monotonic() < until:
        time.sleep(min(0.05, max(0.0, until - time.monotonic())))
        if proc.poll() is not None:
            raise _failed(proc, port, log, "right after listening on")
    try:
        socket.create_connection(("127.0.0.1", port), 0.5).close()
    except OSError:
        try:
            proc.wait(2)  # closing its port is often the first step of exiting
        except subprocess.TimeoutExpired:
            raise StartFailed(f"{_program(proc)} stopped listening on 127.0.0.1:{port} right "
                              f"after it began" + (f" (log: {log})" if log else "")) from None
        raise _failed(proc, port, log, "right after listening on") from None


def stop(proc: subprocess.Popen[bytes], timeout: float = 20.0) -> int:
    """SIGTERM, wait, then SIGKILL if it must; the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return int(proc.returncode)


@contextmanager
def process(args: Sequence[str], port: int, log: Path, env: dict[str, str] | None = None,
            timeout: float = 30.0, settle: float | None = None,
            ) -> Iterator[subprocess.Popen[bytes]]:
    """Start `args` (output to `log`), wait until it listens on `port` and keeps running
    (:func:`wait_for_port`, `settle` seconds; default: as long as it took to listen), yield
    the process, then stop it. Raises :class:`StartFailed` in one line if it exits first."""
    with log.open("wb") as out:
        proc = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    try:
        wait_for_port(port, timeout, proc, log, settle)
        yield proc
    finally:
        stop(proc)


@dataclass(frozen=True)
class Stack:
    """The URLs and files of a local stack started by :func:`local_stack`."""

    auth: str
    proxy: str
    admin: str | None
    store: str
    spool: Path
    proxy_process: subprocess.Popen[bytes]


def local_stack(stack: ExitStack, run_dir: Path, *, store: str | None = None,
                options: dict[str, str] | None = None, quiet: bool = True) -> Stack:
    """Start the auth server, the shop and mitmdump with the addon on 127.0.0.1.

    Logs, spool and the auth server's embedded store live in `run_dir`; the addon's metrics go
    to `store` (default: an embedded store in `run_dir`). `options` are addon options
    (`wasm_clock_speed`, `wasm_admin_token`, …) merged over the defaults here — merged, because
    mitmproxy ignores a script whose option is given twice. The admin endpoint listens when
    `wasm_admin_token` or `wasm_admin_token_file` is among them. `quiet=False` keeps
    mitmdump's log lines (warnings and up, no flows) in the log. `stack` stops it all.
    """
    root = Path(__file__).resolve().parent.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    auth_port, shop_port, proxy_port, admin_port = (free_port() for _ in range(4))
    paths = [str(root), *filter(None, [os.environ.get("PYTHONPATH")])]
    env = {"PYTHONPATH": os.pathsep.join(paths)}
    store = store or str(run_dir / "store")
    spool = run_dir / "spool"
    auth = f"http://127.0.0.1:{auth_port}"
    options = options or {}
    admin = (f"127.0.0.1:{admin_port}"
             if {"wasm_admin_token", "wasm_admin_token_file"} & options.keys() else "")
    stack.enter_context(process(
        [sys.executable, "-m", "scenarios", "auth-server", "--port", str(auth_port),
         "--store", str(run_dir / "auth-store")], auth_port, run_dir / "auth.log", env,
        settle=SETTLE_MIN))  # our servers fail before they listen: a short settle will do
    stack.enter_context(process(
        [sys.executable, "-m", "scenarios", "shop", "--port", str(shop_port)], shop_port,
        run_dir / "shop.log", env, settle=SETTLE_MIN))
    settings = {
        "wasm_cluster": f"auth={auth}", "wasm_store": store, "wasm_spool": str(spool),
        "wasm_admin_listen": admin, "keep_host_header": "true", **options,
    }
    sets = [arg for name, value in settings.items() for arg in ("--set", f"{name}={value}")]
    proxy = stack.enter_context(process(
        [mitmdump_path(), *(["-q"] if quiet else ["--set", "flow_detail=0"]),
         "-s", str(root / "addons" / "wasm_auth.py"),
         "--mode", f"reverse:http://127.0.0.1:{shop_port}", "--listen-host", "127.0.0.1",
         "-p", str(proxy_port), *sets], proxy_port, run_dir / "mitmdump.log", env, timeout=60))
    return Stack(auth, f"http://127.0.0.1:{proxy_port}", f"http://{admin}" if admin else None,
                 store, spool, proxy)
