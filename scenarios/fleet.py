"""A fleet on one machine: several mitmdump processes with the addon behind HAProxy, one store.

The scale-out recipe of the README, started from Python for the end-to-end test
(`tests/test_fleet.py`): the auth server and the shop, `n` proxies (each with its own
`wasm_proxy_id`, admin endpoint, token file and spool, all writing to one store), and HAProxy
(Debian's `haproxy`) balancing round robin over them on loopback. The manager is started by
the caller, with `--proxies-from-store --token-dir` (it finds the proxies in the store).
"""

from __future__ import annotations

import os
import shutil
import sys
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from subprocess import Popen

from scenarios.procs import free_port, mitmdump_path, process


@dataclass(frozen=True)
class FleetProxy:
    """One proxy of the fleet."""

    proxy_id: str
    url: str
    admin: str
    token_file: Path
    process: Popen[bytes]


@dataclass(frozen=True)
class Fleet:
    """What :func:`start_fleet` started."""

    balancer: str
    auth: str
    shop: str
    proxies: list[FleetProxy]
    token_dir: Path
    store: str


def haproxy_config(listen_port: int, servers: dict[str, int]) -> str:
    """An HAProxy configuration: HTTP round robin on 127.0.0.1 over `servers` (name → port),
    with health checks every 500 ms, and a request whose server refuses the connection sent to
    another one."""
    lines = [
        "global", "    maxconn 1024", "",
        "defaults", "    mode http", "    timeout connect 2s", "    timeout client 30s",
        "    timeout server 30s", "    retries 2", "    option redispatch", "",
        "frontend fleet", f"    bind 127.0.0.1:{listen_port}", "    default_backend proxies",
        "",
        "backend proxies", "    balance roundrobin",
    ]
    lines += [f"    server {name} 127.0.0.1:{port} check inter 500ms fall 2 rise 2"
              for name, port in servers.items()]
    return "\n".join(lines) + "\n"


def haproxy_path() -> str | None:
    """Debian's haproxy (in /usr/sbin, often not on a user's PATH), or None."""
    return shutil.which("haproxy") or next(
        (p for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy") if Path(p).exists()), None)


def start_fleet(stack: ExitStack, run_dir: Path, n: int, store: str,
                options: dict[str, str] | None = None) -> Fleet:
    """Start the auth server, the shop, `n` mitmdumps with the addon (proxy ids `proxy-1`…)
    and HAProxy in front of them. `stack` stops it all. Each proxy's admin token is in
    `token_dir/<proxy id>` (mode 0600), as the manager's `--token-dir` expects."""
    haproxy = haproxy_path()
    if haproxy is None:
        raise RuntimeError("haproxy is not installed (Debian package haproxy; .ci/setup "
                           "installs it)")
    root = Path(__file__).resolve().parent.parent
    run_dir.mkdir(parents=True, exist_ok=True)
    env = {"PYTHONPATH": os.pathsep.join(
        [str(root), *filter(None, [os.environ.get("PYTHONPATH")])])}
    auth_port, shop_port, lb_port = free_port(), free_port(), free_port()
    auth = f"http://127.0.0.1:{auth_port}"
    stack.enter_context(process(
        [sys.executable, "-m", "scenarios", "auth-server", "--port", str(auth_port),
         "--store", str(run_dir / "auth-store")], auth_port, run_dir / "auth.log", env))
    stack.enter_context(process(
        [sys.executable, "-m", "scenarios", "shop", "--port", str(shop_port)], shop_port,
        run_dir / "shop.log", env))
    token_dir = run_dir / "tokens"
    token_dir.mkdir(mode=0o700, exist_ok=True)
    proxies: list[FleetProxy] = []
    for i in range(1, n + 1):
        proxy_id = f"proxy-{i}"
        port, admin_port = free_port(), free_port()
        token_file = token_dir / proxy_id
        settings = {
            "wasm_proxy_id": proxy_id, "wasm_cluster": f"auth={auth}", "wasm_store": store,
            "wasm_spool": str(run_dir / proxy_id / "spool"),
            "wasm_admin_listen": f"127.0.0.1:{admin_port}",
            "wasm_admin_token_file": str(token_file), "keep_host_header": "true",
            **(options or {}),
        }
        sets = [a for name, value in settings.items() for a in ("--set", f"{name}={value}")]
        proc = stack.enter_context(process(
            [mitmdump_path(), "-q", "-s", str(root / "addons" / "wasm_auth.py"),
             "--mode", f"reverse:http://127.0.0.1:{shop_port}", "--listen-host", "127.0.0.1",
             "-p", str(port), *sets], port, run_dir / f"{proxy_id}.log", env, timeout=60))
        proxies.append(FleetProxy(proxy_id, f"http://127.0.0.1:{port}",
                                  f"http://127.0.0.1:{admin_port}", token_file, proc))
    config = run_dir / "haproxy.cfg"
    config.write_text(haproxy_config(lb_port, {
        p.proxy_id: int(p.url.rpartition(":")[2]) for p in proxies}))
    stack.enter_context(process([haproxy, "-f", str(config), "-db"], lb_port,
                                run_dir / "haproxy.log"))
    return Fleet(f"http://127.0.0.1:{lb_port}", auth, f"http://127.0.0.1:{shop_port}",
                 proxies, token_dir, store)
