"""Proxy throughput: plain mitmdump against mitmdump with the wasm_auth addon (`just bench`).

Side by side in one run, in interleaved rounds so that drift on a shared machine hits every
variant alike: the same wrk load (cache hits: one token, already verified) against
- `plain`: mitmdump in reverse mode, no addon;
- `addon, logging off`: with the addon (`wasm_log_metrics=false`);
- `addon, logging on`: with the addon writing every request and sample to the spool, and its
  shipper process delivering them to the embedded store.
Reports requests/s per variant and the ratios to plain (SPEC §9: ≥ 0.95 on cache hits; logging
on vs off ≥ 0.95). wrk from Debian's packages; a Python load generator when wrk is missing.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from scenarios.procs import free_port, mitmdump_path, process

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results" / "bench" / "proxy.json"


def wrk(url: str, headers: dict[str, str], seconds: float, connections: int) -> float:
    """Requests per second that wrk achieved (non-2xx answers are an error)."""
    args = ["wrk", "-t1", f"-c{connections}", f"-d{seconds:g}s", "--latency"]
    for k, v in headers.items():
        args += ["-H", f"{k}: {v}"]
    out = subprocess.run([*args, url], capture_output=True, text=True, check=True).stdout
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk saw non-2xx answers:\n{out}")
    match = re.search(r"Requests/sec:\s+([\d.]+)", out)
    if not match:
        raise RuntimeError(f"cannot read wrk's output:\n{out}")
    return float(match.group(1))


def python_load(url: str, headers: dict[str, str], seconds: float, connections: int) -> float:
    """A fallback load generator: `connections` keep-alive clients for `seconds`."""
    import asyncio

    async def run() -> int:
        done = 0
        end = time.monotonic() + seconds
        async with httpx.AsyncClient(limits=httpx.Limits(max_connections=connections)) as c:
            async def worker() -> None:
                nonlocal done
                while time.monotonic() < end:
                    r = await c.get(url, headers=headers)
                    r.raise_for_status()
                    done += 1
            await asyncio.gather(*(worker() for _ in range(connections)))
        return done

    return asyncio.run(run()) / seconds


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0, help="per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--connections", type=int, default=16)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load = wrk if shutil.which("wrk") else python_load
    mitmdump = mitmdump_path()
    env = {"PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp_s, ExitStack() as stack:
        tmp = Path(tmp_s)
        auth_port, shop_port = free_port(), free_port()
        stack.enter_context(process(
            [sys.executable, "-m", "scenarios", "auth-server", "--port", str(auth_port),
             "--no-store"], auth_port, tmp / "auth.log", env))
        shop = [sys.executable, "-m", "scenarios", "shop", "--port", str(shop_port)]
        if shutil.which("nginx"):
            shop.append("--nginx")  # the upstream must not be the bottleneck
        stack.enter_context(process(shop, shop_port, tmp / "shop.log", env))
        token = httpx.post(f"http://127.0.0.1:{auth_port}/login", json={"user": "bench"},
                           timeout=10).json()["token"]
        common = ["--mode", f"reverse:http://127.0.0.1:{shop_port}", "--listen-host",
                  "127.0.0.1", "-q", "--set", "keep_host_header=true"]
        addon = ["-s", str(ROOT / "addons" / "wasm_auth.py"),
                 "--set", f"wasm_cluster=auth=http://127.0.0.1:{auth_port}",
                 "--set", "wasm_admin_listen="]
        variants = {
            "plain": [],
            "addon, logging off": [*addon, "--set", "wasm_log_metrics=false"],
            "addon, logging on": [*addon, "--set", f"wasm_store={tmp / 'store'}",
                                  "--set", f"wasm_spool={tmp / 'spool'}"],
        }
        ports: dict[str, int] = {}
        for name, extra in variants.items():
            port = free_port()
            stack.enter_context(process([mitmdump, *common, "-p", str(port), *extra], port,
                                        tmp / f"mitmdump-{len(ports)}.log", env, timeout=60))
            ports[name] = port
        headers = {"Host": "shop.example", "Authorization": f"Bearer {token}"}
        for port in ports.values():  # warm up: the first request verifies the token
            assert httpx.get(f"http://127.0.0.1:{port}/", headers=headers,
                             timeout=10).status_code == 200
            load(f"http://127.0.0.1:{port}/", headers, 1.0, args.connections)
        rates: dict[str, list[float]] = {name: [] for name in variants}
        for r in range(args.rounds):
            for name, port in ports.items():
                rate = load(f"http://127.0.0.1:{port}/", headers, args.seconds, args.connections)
                rates[name].append(rate)
                print(f"round {r + 1}: {name:<20} {rate:8.0f} req/s", file=sys.stderr)
    median = {name: statistics.median(v) for name, v in rates.items()}
    results: dict[str, Any] = {
        "load_generator": load.__name__, "seconds": args.seconds, "rounds": args.rounds,
        "connections": args.connections, "rates": rates, "median": median,
        "ratio_addon_vs_plain": median["addon, logging off"] / median["plain"],
        "ratio_logging_on_vs_off": median["addon, logging on"] / median["addon, logging off"],
        "ratio_logging_on_vs_plain": median["addon, logging on"] / median["plain"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"| variant ({load.__name__}, {args.connections} connections, cache hits) "
          "| requests/s (median) | vs plain |\n|---|---|---|")
    for name, value in median.items():
        print(f"| {name} | {value:,.0f} | {value / median['plain']:.2f} |")
    print(f"\nlogging on vs off: {results['ratio_logging_on_vs_off']:.2f} (target ≥ 0.95); "
          f"addon vs plain: {results['ratio_addon_vs_plain']:.2f} (target ≥ 0.95)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
