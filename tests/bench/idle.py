"""What an idle proxy costs: CPU per second of mitmdump with no traffic (`just bench`).

A fleet keeps proxies running that see little traffic, so their background work (the addon's
poll loop, the epoch ticker, the sample and flush loops, the shipper) is what they cost most of
the time. Each variant starts, serves one request (so that the addon has an instance, with its
ticks), settles, and then its CPU time (user + system, from /proc) is read over `--seconds` of
no traffic: plain mitmdump, the empty script addon (`tests/bench/empty_addon.py`), and the
addon with metrics logging off and on (the shipper is a process of its own, not counted).
Linux only (/proc).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx

from scenarios.procs import free_port, mitmdump_path, process
from tests.bench import ROOT, load_note, mitmdump_variants
from tests.bench.proxy import cpu_seconds

RESULTS = ROOT / "results" / "bench" / "idle.json"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=20.0, help="of no traffic")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    load_before = os.getloadavg()[0]
    env = {"PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory(prefix="bench-idle-") as tmp_s, ExitStack() as stack:
        tmp = Path(tmp_s)
        token, common, variants = mitmdump_variants(stack, tmp)
        pids: dict[str, int] = {}
        headers = {"Host": "shop.example", "Authorization": f"Bearer {token}"}
        for i, (name, extra) in enumerate(variants.items()):
            port = free_port()
            proc = stack.enter_context(process(
                [mitmdump_path(), *common, "-p", str(port), *extra], port,
                tmp / f"mitmdump-{i}.log", env, timeout=60))
            pids[name] = proc.pid
            r = httpx.get(f"http://127.0.0.1:{port}/", headers=headers, timeout=10)
            assert r.status_code == 200, f"{name}: {r.status_code}"
        time.sleep(3)  # start-up and the first request's work settle
        before = {name: cpu_seconds(pid) for name, pid in pids.items()}
        time.sleep(args.seconds)
        after = {name: cpu_seconds(pid) for name, pid in pids.items()}
    ms_per_s: dict[str, float | None] = {}
    for name in variants:
        b, a = before[name], after[name]
        ms_per_s[name] = None if a is None or b is None else (a - b) / args.seconds * 1000
    results = {"seconds": args.seconds, "cpu_ms_per_s": ms_per_s,
               "clock_ticks_per_s": os.sysconf("SC_CLK_TCK"),
               "load_before": load_before, "load_after": os.getloadavg()[0]}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1) + "\n")
    print(f"| variant, idle after one request | CPU ms per second ({args.seconds:g} s) |")
    print("|---|---|")
    for name, value in ms_per_s.items():
        print(f"| {name} | {'n/a' if value is None else f'{value:.1f}'} |")
    print(f"\n/proc counts CPU in {1000 / os.sysconf('SC_CLK_TCK'):.0f} ms ticks: "
          f"±{1000 / os.sysconf('SC_CLK_TCK') / args.seconds:.1f} ms a second over this run.")
    print(load_note(load_before, results["load_after"]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
