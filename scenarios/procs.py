"""Starting and stopping local servers for demos and tests, on 127.0.0.1."""

from __future__ import annotations

import os
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


def wait_for_port(port: int, timeout: float = 20.0, proc: subprocess.Popen[bytes] | None = None,
                  log: Path | None = None) -> None:
    """Wait until something accepts connections on 127.0.0.1:`port`.

    Raises RuntimeError with the end of `log` if `proc` exits first, TimeoutError otherwise.
    """
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            text = log.read_text(errors="replace")[-3000:] if log and log.exists() else ""
            args = proc.args if isinstance(proc.args, list | tuple) else [proc.args]
            raise RuntimeError(f"{Path(str(args[0])).name} exited with {proc.returncode} "
                               f"before listening on port {port}:\n{text}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout} s")


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
            timeout: float = 30.0) -> Iterator[subprocess.Popen[bytes]]:
    """Start `args` (output to `log`), wait for `port`, yield the process, then stop it."""
    with log.open("wb") as out:
        proc = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})})
    try:
        wait_for_port(port, timeout, proc, log)
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
         "--store", str(run_dir / "auth-store")], auth_port, run_dir / "auth.log", env))
    stack.enter_context(process(
        [sys.executable, "-m", "scenarios", "shop", "--port", str(shop_port)], shop_port,
        run_dir / "shop.log", env))
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
