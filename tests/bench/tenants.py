"""One proxy with 1,000 tenant instances (`python -m tests.bench.tenants`, in `just bench`).

Two parts:

- **Live**: the local stack (auth server, shop, a real mitmdump with the addon, metrics on)
  receives requests for `--tenants` distinct tenants (Host `t<i>.tenants.example`): two
  without a token (the first starts the tenant's instance; neither makes an auth call), then
  four with bearer tokens (a miss, a hit, two more misses: cache entries). Measured: the
  proxy's RSS before (one warm tenant) and after, so its growth per instance; the *time to
  start an instance* as a client sees it: a tenant's first request minus its second (the same
  path once the instance runs), median over the first and over the last 100 tenants (does it
  grow with the number of instances?); the instances the admin API lists.
- **Simulated**: a generated day of `--sim-tenants` shops (EClog format, rates log-uniform in
  20–1,000 requests/hour, one with a sale) through the real filter in virtual time with the
  policies `none` and `ratio` (`scenarios.experiment.run_policy`). From each run's allocated
  memory per instance over the day: *instances that fit in 1 GiB* = 1 GiB / the mean over
  instances of their mean allocated bytes (on average), and 1 GiB / the mean of their peaks
  (all at their peak at once). That counts Wasm linear memory only; the live part gives the
  process's own cost per instance beside it.

Results print as Markdown and go to `results/bench/tenants.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from scenarios.experiment import ExperimentConfig, run_shared, summarize
from scenarios.procs import local_stack
from scenarios.standard import shops_trace
from tests.bench import load_note
from tests.bench.hostflood import rss_kib

RESULTS = Path(__file__).resolve().parents[2] / "results" / "bench" / "tenants.json"
TOKEN = "bench-admin-token"
MIB = 2**20


def progress(message: str) -> None:
    """One line on stderr: where a long run stands."""
    print(f"… {message}", file=sys.stderr, flush=True)


def live(tenants: int, users: int) -> dict[str, Any]:
    """The live part: RSS and instance start time over `tenants` tenants."""
    with tempfile.TemporaryDirectory(prefix="bench-tenants-") as tmp, ExitStack() as stack:
        options = {"wasm_admin_token": TOKEN, "wasm_max_instances": str(2 * tenants + 10)}
        s = local_stack(stack, Path(tmp), options=options)
        pid = s.proxy_process.pid
        with httpx.Client(base_url=s.auth, timeout=30) as auth:
            tokens = [auth.post("/login", json={"user": f"u{i}"}).json()["token"]
                      for i in range(users)]
        statuses: dict[int, int] = {}
        first_ms: list[float] = []
        second_ms: list[float] = []
        with httpx.Client(base_url=s.proxy, timeout=30) as client:

            def get(host: str, token: str | None) -> float:
                headers = {"Host": host}
                if token is not None:
                    headers["Authorization"] = f"Bearer {token}"
                t0 = time.perf_counter()
                r = client.get("/product/1", headers=headers)
                ms = (time.perf_counter() - t0) * 1000
                statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
                return ms

            for i in range(200):
                get("warm.example", tokens[i % users])
            time.sleep(1.5)
            before = rss_kib(pid)
            t0 = time.perf_counter()
            for i in range(tenants):
                if i and i % 100 == 0:
                    progress(f"live: {i:,} of {tenants:,} tenants started "
                             f"({time.perf_counter() - t0:.0f} s)")
                host = f"t{i}.tenants.example"
                first_ms.append(get(host, None))  # starts the instance; no auth call
                second_ms.append(get(host, None))
                for k in (0, 0, 1, 2):  # a miss, a hit, two misses: cache entries
                    get(host, tokens[(i + k) % users])
            seconds = time.perf_counter() - t0
            time.sleep(1.5)
            after = rss_kib(pid)
            listed = httpx.get(f"{s.admin}/instances", timeout=30,
                               headers={"Authorization": f"Bearer {TOKEN}"}).json()
    start = np.array(first_ms) - np.array(second_ms)
    head, tail = start[:100], start[-100:]
    return {
        "tenants": tenants, "instances_listed": len(listed), "statuses": statuses,
        "seconds": seconds, "rss_before_mib": before / 1024, "rss_after_mib": after / 1024,
        "rss_per_instance_kib": (after - before) / tenants,
        "first_request_ms_median": statistics.median(first_ms),
        "second_request_ms_median": statistics.median(second_ms),
        "start_ms_first_100": float(np.median(head)),
        "start_ms_last_100": float(np.median(tail)),
        "start_ms_p90": float(np.percentile(start, 90)),
    }


def simulated(shops: int, quick: bool) -> dict[str, Any]:
    """The simulated part: instances that fit in 1 GiB with none and ratio over a day."""
    rng = np.random.default_rng(3)
    rates = np.exp(rng.uniform(np.log(20.0), np.log(1000.0), shops))
    table = [(f"s{i}.tenants.example", float(rate), 0 if i == 0 else None, 100 + i)
             for i, rate in enumerate(rates)]
    config = ExperimentConfig()
    out: dict[str, Any] = {"shops": shops, "quick": quick}
    with tempfile.TemporaryDirectory(prefix="bench-tenants-sim-") as tmp:
        t0 = time.perf_counter()
        trace = shops_trace(table, 1, quick, Path(tmp), "many-tenants",
                            f"{shops} shops, one instance each")
        out["requests"] = len(trace)
        progress(f"simulated: {len(trace):,} requests of {shops} shops generated "
                 f"({time.perf_counter() - t0:.0f} s); running none and ratio (one simulation "
                 "until ratio's first restart)")
        t0 = time.perf_counter()
        runs = dict(zip(("none", "ratio"), run_shared(trace, ["none", "ratio"], config),
                        strict=True))
        out["simulation_s"] = time.perf_counter() - t0
        progress(f"simulated: done in {out['simulation_s']:.0f} s")
        for policy, run in runs.items():
            row = summarize(run.series, config, policy)
            per_instance = run.series.groupby("instance")["allocated_bytes"]
            out[policy] = {
                "fit_on_average": row["fit_on_average"], "fit_at_peak": row["fit_at_peak"],
                "mean_allocated_kib": float(per_instance.mean().mean() / 1024),
                "mean_peak_kib": float(per_instance.max().mean() / 1024),
                "restarts": row["restarts"], "hit_rate": row["hit_rate"],
                "auth_vs_none": None, "auth_requests": row["auth_requests"],
                "elapsed_s": run.elapsed_s,
            }
    out["ratio"]["auth_vs_none"] = out["ratio"]["auth_requests"] / out["none"]["auth_requests"]
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=1000, help="live tenants")
    parser.add_argument("--users", type=int, default=300, help="logged-in users (tokens)")
    parser.add_argument("--sim-tenants", type=int, default=100, help="simulated shops")
    parser.add_argument("--quick", action="store_true",
                        help="200 live tenants, 20 simulated shops over four hours")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    args = parser.parse_args(argv)
    tenants = 200 if args.quick else args.tenants
    shops = 20 if args.quick else args.sim_tenants
    load_before = os.getloadavg()[0]
    print(f"benchmarking one proxy with {tenants:,} tenants …", file=sys.stderr)
    started = time.perf_counter()
    results: dict[str, Any] = {"live": live(tenants, min(args.users, tenants))}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    progress(f"live: done in {time.perf_counter() - started:.0f} s")
    args.out.write_text(json.dumps(results, indent=2) + "\n")  # the live part, should the rest fail
    print(f"… a simulated day of {shops} shops, none and ratio", file=sys.stderr)
    results["simulated"] = simulated(shops, args.quick)
    results["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
    results["seconds"] = time.perf_counter() - started
    args.out.write_text(json.dumps(results, indent=2) + "\n")

    lv, sim = results["live"], results["simulated"]
    print(f"| measure ({tenants:,} tenants on one mitmdump) | result |\n|---|---|")
    print(f"| proxy RSS: one tenant → {tenants:,} tenants | {lv['rss_before_mib']:.1f} → "
          f"{lv['rss_after_mib']:.1f} MiB ({lv['rss_per_instance_kib']:.0f} KiB per instance; "
          f"{lv['instances_listed']:,} instances listed) |")
    print(f"| time to start an instance (first request − second, median): first 100 / last "
          f"100 tenants | {lv['start_ms_first_100']:.2f} / {lv['start_ms_last_100']:.2f} ms "
          f"(p90 {lv['start_ms_p90']:.2f} ms; a hit takes {lv['second_request_ms_median']:.2f} "
          "ms end to end) |")
    answers = ", ".join(f"{n} × {code}" for code, n in sorted(lv["statuses"].items()))
    print(f"| answers | {answers} |")
    print(f"\n| policy ({sim['shops']} simulated shops, {sim['requests']:,} requests, a "
          f"{'4-hour window' if sim['quick'] else 'day'}) | instances in 1 GiB: on average / "
          "all at their peak | mean allocated / mean peak per instance | restarts | auth vs "
          "none |\n|---|---|---|---|---|")
    for policy in ("none", "ratio"):
        p = sim[policy]
        vs = "1.00×" if policy == "none" else f"{p['auth_vs_none']:.3f}×"
        print(f"| `{policy}` | {p['fit_on_average']:,.0f} / {p['fit_at_peak']:,.0f} | "
              f"{p['mean_allocated_kib']:,.0f} / {p['mean_peak_kib']:,.0f} KiB | "
              f"{p['restarts']} | {vs} |")
    load = results["load_average_1min"]
    print(f"\nThe whole run took {results['seconds']:.0f} s (simulation "
          f"{sim['simulation_s']:.0f} s). " + load_note(load["before"], load["after"]))
    print(f"\n(written to {args.out})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
