"""Proxy throughput: plain mitmdump against mitmdump with the wasm_auth addon (`just bench`).

Side by side in one run, in interleaved rounds (each starting with the next variant) so that
drift on a shared machine hits every variant alike, and each round's ratios to plain are
reported besides the ratios of the medians: the same wrk load (cache hits: one token, already
verified) against
- `plain`: mitmdump in reverse mode, no addon;
- `empty addon`: mitmdump with `-s tests/bench/empty_addon.py`, a script with the addon's five
  flow hooks doing nothing: what mitmproxy itself costs for a script addon (the control);
- `plain, heap frozen`: mitmdump with `-s tests/bench/frozen_plain.py`, which freezes the
  start-up heap as the addon does (`wasm_auth.freeze_start_heap`) and has no hooks: the
  control that shows the addon's cost without the collector time the freeze saves;
- `addon, logging off`: with the addon (`wasm_log_metrics=false`);
- `addon, logging on`: with the addon writing every request and sample to the spool, and its
  shipper process delivering them to the embedded store.
Reports requests/s per variant and the ratios to plain (SPEC §9: ≥ 0.95 on cache hits; logging
on vs off ≥ 0.95), and each mitmdump's CPU time per request (from /proc, Linux).

Where the processes run. By default each mitmdump runs on a CPU of its own (the last;
`taskset`) and everything else on the others: the load generator, the servers, and the
processes a mitmdump starts (the addon's shipper, which `taskset` would otherwise pin beside
it). The variants are loaded one after the other, so each is measured as SPEC §9's baselines
were, a mitmdump saturating one core, and its rate is set by its own CPU time per request.
`--concurrent`
loads every variant at the same time on that one CPU instead, so that they share whatever else
the machine does; but then the scheduler switches between four or five busy mitmdumps every
few milliseconds, each one's caches are cold again every few requests, and a variant pays for
the code and data it touches as well as for the instructions it runs: a harsher condition than
a proxy with a core of its own, reported beside the other (`results/bench/proxy-concurrent.json`).
`--no-pin`: the OS places everything. wrk from Debian's packages; a Python load generator when
wrk is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from scenarios.procs import free_port, mitmdump_path, process
from tests.bench import ROOT, load_note, mitmdump_variants

RESULTS = ROOT / "results" / "bench" / "proxy.json"
RESULTS_CONCURRENT = ROOT / "results" / "bench" / "proxy-concurrent.json"


def cpu_seconds(pid: int) -> float | None:
    """CPU time (user + system) of process `pid` so far; None where /proc cannot say."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pin_cpus() -> tuple[set[int], int] | None:
    """Give the mitmdumps a CPU of their own: this process (and so the load generator and the
    servers it starts) moves to the other CPUs, and each mitmdump starts under `taskset` on
    the last one. Then a variant's rate is what its own CPU time per request allows, not how
    the OS shared two cores between it and wrk. None where it cannot be done (one CPU, no
    `taskset`, no affinity calls)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None
    if len(cpus) < 2 or shutil.which("taskset") is None:
        return None
    others = set(cpus[:-1])
    os.sched_setaffinity(0, others)
    return others, cpus[-1]


def move_children(pid: int, cpus: set[int]) -> int:
    """Move every process that process `pid` started (the addon's shipper) to `cpus`: they inherited the mitmdump's CPU from `taskset`, where they would take its
    time, which a proxy on a machine of several cores does not give up to them. Returns how
    many were moved."""
    import psutil

    moved = 0
    for child in psutil.Process(pid).children(recursive=True):
        try:
            child.cpu_affinity(sorted(cpus))
            moved += 1
        except psutil.Error:  # it has just exited
            pass
    return moved


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
    parser.add_argument("--concurrent", action="store_true",
                        help="load every variant at once in each round (a loaded machine)")
    parser.add_argument("--no-pin", dest="pin", action="store_false",
                        help="let the OS place every process (default: the mitmdumps on the "
                             "last CPU, the load generator and the servers on the others)")
    parser.add_argument("--split", action="store_true",
                        help="add `addon, hooks off`: the addon loaded and running with its "
                             "request hooks unbound (tests/bench/unhook.py), which splits its "
                             "cost into mitmproxy's dispatch to it and its hooks' work")
    parser.add_argument("--out", type=Path, default=None,
                        help=f"default: {RESULTS_CONCURRENT.relative_to(ROOT)} with --concurrent, "
                             f"else {RESULTS.relative_to(ROOT)}")
    args = parser.parse_args(argv)
    if args.out is None:
        args.out = RESULTS_CONCURRENT if args.concurrent else RESULTS
    load = wrk if shutil.which("wrk") else python_load
    pinned = pin_cpus() if args.pin else None
    load_before = os.getloadavg()[0]
    mitmdump = mitmdump_path()
    env = {"PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="bench-proxy-") as tmp_s, ExitStack() as stack:
        tmp = Path(tmp_s)
        # the upstream must not be the bottleneck
        token, common, variants = mitmdump_variants(stack, tmp, nginx=bool(shutil.which("nginx")))
        if args.split:
            variants["addon, hooks off"] = [*variants["addon, logging off"], "-s",
                                            str(ROOT / "tests" / "bench" / "unhook.py")]
        ports: dict[str, int] = {}
        pids: dict[str, int] = {}
        for name, extra in variants.items():
            port = free_port()
            taskset = ["taskset", "-c", str(pinned[1])] if pinned else []
            proc = stack.enter_context(process(
                [*taskset, mitmdump, *common, "-p", str(port), *extra], port,
                tmp / f"mitmdump-{len(ports)}.log", env, timeout=60))
            ports[name], pids[name] = port, proc.pid
        headers = {"Host": "shop.example", "Authorization": f"Bearer {token}"}
        for port in ports.values():  # warm up: the first request verifies the token
            assert httpx.get(f"http://127.0.0.1:{port}/", headers=headers,
                             timeout=10).status_code == 200
            load(f"http://127.0.0.1:{port}/", headers, 1.0, args.connections)
        # Each mitmdump's child processes (the shipper has started by now) leave its CPU.
        moved = {name: move_children(pid, pinned[0]) if pinned else 0
                 for name, pid in pids.items()}
        rates: dict[str, list[float]] = {name: [] for name in variants}
        cpu_us: dict[str, list[float]] = {name: [] for name in variants}
        def measure(name: str) -> tuple[float, float | None]:
            """Load variant `name`: its requests/s and CPU µs per request."""
            before = cpu_seconds(pids[name])
            rate = load(f"http://127.0.0.1:{ports[name]}/", headers, args.seconds,
                        args.connections)
            after = cpu_seconds(pids[name])
            if before is None or after is None or rate <= 0:
                return rate, None
            return rate, (after - before) / (rate * args.seconds) * 1e6

        for r in range(args.rounds):
            if args.concurrent:
                with ThreadPoolExecutor(len(ports)) as pool:
                    got = dict(zip(ports, pool.map(measure, ports), strict=True))
            else:  # each round starts with the next variant: no variant always goes first
                names = list(ports)
                got = {name: measure(name) for name in names[r % len(names):] + names[:r % len(names)]}
            for name, (rate, per_request) in got.items():
                rates[name].append(rate)
                note = ""
                if per_request is not None:
                    cpu_us[name].append(per_request)
                    note = f", {per_request:6.0f} µs CPU/request"
                print(f"round {r + 1}: {name:<20} {rate:8.0f} req/s{note}", file=sys.stderr)
    median = {name: statistics.median(v) for name, v in rates.items()}
    # Per round, each variant over plain in the same round: drift between rounds cancels out.
    per_round = {name: [a / p for a, p in zip(v, rates["plain"], strict=True)]
                 for name, v in rates.items() if name != "plain"}
    paired = {name: statistics.median(r) for name, r in per_round.items()}
    # How far single rounds scatter: a median this close to a target says little without it.
    spread = {name: (min(r), max(r)) for name, r in per_round.items()}
    # Logging's cost, round by round as well.
    logging_paired = statistics.median(
        on / off for on, off in zip(rates["addon, logging on"], rates["addon, logging off"],
                                    strict=True))
    # The addon's own cost: over a script addon that does nothing, round by round.
    over_empty = {name: statistics.median(a / e for a, e in zip(v, rates["empty addon"],
                                                                 strict=True))
                  for name, v in rates.items() if name.startswith("addon")}
    # The addon over a plain mitmdump whose start-up heap is frozen as the addon freezes it:
    # its cost without the collector time that the freeze saves any mitmdump.
    over_frozen = statistics.median(
        a / f for a, f in zip(rates["addon, logging off"], rates["plain, heap frozen"],
                              strict=True))
    cpu = {name: statistics.median(v) for name, v in cpu_us.items() if v}
    results: dict[str, Any] = {
        "load_generator": load.__name__, "seconds": args.seconds, "rounds": args.rounds,
        "concurrent": args.concurrent,
        "pinned": {"others": sorted(pinned[0]), "mitmdump": pinned[1]} if pinned else None,
        "connections": args.connections, "rates": rates, "median": median,
        "ratio_addon_vs_plain": median["addon, logging off"] / median["plain"],
        "ratio_logging_on_vs_off": median["addon, logging on"] / median["addon, logging off"],
        "ratio_logging_on_vs_plain": median["addon, logging on"] / median["plain"],
        "paired_ratio_vs_plain": paired, "paired_ratio_spread": spread,
        "paired_ratio_vs_empty_addon": over_empty,
        "paired_ratio_vs_plain_heap_frozen": over_frozen,
        "paired_ratio_logging_on_vs_off": logging_paired,
        "cpu_us_per_request": cpu_us, "cpu_us_median": cpu,
        "children_moved": moved,
        "load_before": load_before, "load_after": os.getloadavg()[0],
    }
    if len(cpu) == len(variants):
        results["cpu_ratio_addon_vs_plain"] = cpu["plain"] / cpu["addon, logging off"]
        results["cpu_ratio_logging_on_vs_off"] = cpu["addon, logging off"] / cpu["addon, logging on"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"| variant ({load.__name__}, {args.connections} connections, cache hits) "
          "| requests/s (median) | vs plain | CPU per request (median) | plain's / this |"
          "\n|---|---|---|---|---|")
    for name, value in median.items():
        c = cpu.get(name)
        cpu_cells = (f"{c:,.0f} µs | {cpu['plain'] / c:.2f}" if c and "plain" in cpu
                     else "? | ?")
        print(f"| {name} | {value:,.0f} | {value / median['plain']:.2f} | {cpu_cells} |")

    def rounds(name: str) -> str:
        return f"rounds {spread[name][0]:.3f}–{spread[name][1]:.3f}"

    print(f"\nlogging on vs off: {results['ratio_logging_on_vs_off']:.2f} (target ≥ 0.95); "
          f"addon vs plain: {results['ratio_addon_vs_plain']:.2f} (target ≥ 0.95); "
          f"per round (median of the rounds' ratios): addon {paired['addon, logging off']:.3f} "
          f"({rounds('addon, logging off')}), "
          f"logging on {paired['addon, logging on']:.3f}, an empty addon "
          f"{paired['empty addon']:.3f} vs plain; over the empty addon: addon "
          f"{over_empty['addon, logging off']:.3f}; over plain with its heap frozen as the "
          f"addon freezes it: addon {over_frozen:.3f}; logging on vs off {logging_paired:.3f}")
    if "addon, hooks off" in paired:
        print(f"split: the addon with its request hooks unbound {paired['addon, hooks off']:.3f} "
              f"({rounds('addon, hooks off')}) vs plain: the rest of the addon's gap is its "
              "hooks' work")
    if pinned:
        print(f"mitmdump on CPU {pinned[1]}; wrk, the shop, the auth server and the addon's "
              f"shippers on CPU "
              f"{', '.join(map(str, sorted(pinned[0])))}")
    print(load_note(load_before, results["load_after"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
