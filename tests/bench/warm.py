"""Benchmarks of warm restart (`just bench`): the journal's replay and what it costs.

Measures, with the reference filter under the real host:
- replay time per journaled request and the total time of a warm restart, for journals of
  several sizes (each token: one miss with its auth call, then `hits` hits), beside a cold
  restart of the same instance;
- whether requests wait during a warm restart done in steps on the event loop (the admin
  endpoint's way, `Host.restart_in_steps`) against one done at once (`wasm.restart`): the
  longest wait of a request arriving every millisecond meanwhile, on the wall clock;
- memory after a warm restart against the live bytes: after a peak of logins of which most
  have expired, allocated bytes before and after a warm restart, the filter's live bytes, and
  the same after a cold restart;
- the journal's own memory: its estimate (`Journal.bytes`) against tracemalloc's count;
- what journaling costs a request in steady state, with the journal on and off.

Results print as a Markdown table and are written to `results/bench/warm.json`.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import platform
import statistics
import sys
import time
import tracemalloc
from pathlib import Path
from typing import Any

from addons.proxywasm import (
    FilterModule,
    Host,
    HttpCall,
    HttpCallResponse,
    InProcessDispatcher,
    Limits,
    VirtualClock,
    WallClock,
)
from addons.proxywasm.clock import Clock
from addons.proxywasm.host import FilterInstance
from addons.proxywasm.journal import JournalConfig
from addons.wasm_auth import REPLAY_STEP
from scenarios.simulate import DEFAULT_FILTER

RESULTS = Path(__file__).resolve().parents[2] / "results" / "bench" / "warm.json"
TTL = 600.0
LIVE_BYTES = "auth_cache.live_bytes"


def answer(call: HttpCall) -> HttpCallResponse:
    return HttpCallResponse(200)


class Bench:
    """One instance of the reference filter journaling on `clock`."""

    def __init__(self, module: FilterModule, clock: Clock) -> None:
        self.clock = clock
        self.now = clock.now_ns
        disp = InProcessDispatcher(answer, clock.now_ns, latency_s=0.0)
        self.host = Host(module, disp, clock=clock, limits=Limits(deadline_ms=10_000),
                         plugin_configuration=json.dumps({"ttl_seconds": TTL}).encode(),
                         journal=JournalConfig(TTL + 1, 1024 * 2**20))
        self.inst: FilterInstance = self.host.instance("shop")

    def request(self, token: bytes) -> None:
        s = self.inst.stream()
        d = s.request_headers([(b":method", b"GET"), (b":path", b"/"), (b":authority", b"shop"),
                               (b"authorization", b"Bearer " + token)])
        if d is None:
            self.host.poll()  # latency 0: the answer is due now
            d = s.decision
        assert d is not None and d.action == "continue", d
        s.close()


def fill(b: Bench, clock: VirtualClock, n_tokens: int, hits: int) -> None:
    """`n_tokens` logins spread over half a TTL, each followed by `hits` hits."""
    step = TTL / 2 / n_tokens
    for i in range(n_tokens):
        clock.advance(step)
        token = b"token-%08d" % i
        for _ in range(1 + hits):
            b.request(token)


def bench_replay(module: FilterModule, n_tokens: int, hits: int, runs: int) -> dict[str, Any]:
    """Warm restart of an instance holding `n_tokens` tokens; cold beside it."""
    warm_s, per_entry_us, cold_s, serve_us = [], [], [], []
    entries = journal_bytes = 0
    for _ in range(runs):
        clock = VirtualClock()
        b = Bench(module, clock)
        t0 = time.perf_counter()
        fill(b, clock, n_tokens, hits)
        serve_us.append((time.perf_counter() - t0) / (n_tokens * (1 + hits)) * 1e6)
        assert b.inst.journal is not None
        journal_bytes = b.inst.journal.bytes
        record = b.inst.restart("bench", "bench", "warm")
        assert record.mode == "warm", record.fallback
        entries = record.replayed
        warm_s.append(record.duration_s)
        per_entry_us.append(record.duration_s / record.replayed * 1e6)
        cold_s.append(b.inst.restart("bench", "bench", "cold").duration_s)
        b.host.close()
    return {
        "tokens": n_tokens, "hits_per_token": hits, "entries": entries,
        "journal_mib": journal_bytes / 2**20,
        "warm_ms": statistics.median(warm_s) * 1000,
        "per_entry_us": statistics.median(per_entry_us),
        "serve_us": statistics.median(serve_us),
        "cold_ms": statistics.median(cold_s) * 1000,
    }


async def _waits_during(b: Bench, restart: Any) -> tuple[float, float, int, float]:
    """Send a request every ms while `restart()` runs; (longest wait ms, median wait ms,
    requests served meanwhile, restart wall time s)."""
    waits: list[float] = []
    done = asyncio.Event()

    async def traffic() -> None:
        i = 0
        while not done.is_set():
            due = time.perf_counter()
            await asyncio.sleep(0.001)
            b.request(b"token-%08d" % (i % 1000))  # hits
            waits.append(time.perf_counter() - due - 0.001)
            i += 1

    task = asyncio.create_task(traffic())
    await asyncio.sleep(0.05)
    waits.clear()
    t0 = time.perf_counter()
    await restart()
    elapsed = time.perf_counter() - t0
    done.set()
    await task
    return max(waits) * 1000, statistics.median(waits) * 1000, len(waits), elapsed


def bench_waiting(module: FilterModule, n_tokens: int, hits: int) -> dict[str, Any]:
    """Request waits during a warm restart at once vs in steps, on the wall clock."""
    out: dict[str, Any] = {"tokens": n_tokens, "hits_per_token": hits}
    for how in ("at_once", "in_steps"):
        b = Bench(module, WallClock())
        for i in range(n_tokens):
            token = b"token-%08d" % i
            for _ in range(1 + hits):
                b.request(token)

        async def restart(b: Bench = b, how: str = how) -> None:
            if how == "at_once":
                record = b.inst.restart("bench", "bench", "warm")
            else:
                record = await b.host.restart_in_steps("shop", "bench", "bench", "warm",
                                                       REPLAY_STEP)
            assert record.mode == "warm", record.fallback

        longest, median, served, elapsed = asyncio.run(_waits_during(b, restart))
        out[how] = {"longest_wait_ms": longest, "median_wait_ms": median,
                    "requests_served_meanwhile": served, "restart_ms": elapsed * 1000}
        b.host.close()
    return out


def bench_memory(module: FilterModule, n_tokens: int) -> dict[str, Any]:
    """After a peak of `n_tokens` logins of which 90 % expired: allocated vs live bytes."""
    out: dict[str, Any] = {"tokens_at_peak": n_tokens}
    for mode in ("warm", "cold"):
        clock = VirtualClock()
        b = Bench(module, clock)
        for i in range(n_tokens):
            b.request(b"peak-%08d" % i)
        clock.advance(TTL * 0.8)
        for i in range(n_tokens // 10):
            b.request(b"late-%08d" % i)
        clock.advance(TTL * 0.3)
        b.host.poll()  # the tick evicts the peak's tokens
        before = b.inst.observe()
        record = b.inst.restart("bench", "bench", mode)  # type: ignore[arg-type]
        after = b.inst.observe()
        out[mode] = {
            "allocated_before_kib": record.allocated_bytes_before / 1024,
            "allocated_after_kib": record.allocated_bytes_after / 1024,
            "live_before_kib": before.metrics[LIVE_BYTES] / 1024,
            "live_after_kib": after.metrics[LIVE_BYTES] / 1024,
        }
        b.host.close()
    return out


def bench_journal_memory(module: FilterModule, n_tokens: int, hits: int) -> dict[str, Any]:
    """The journal's estimate of its bytes against tracemalloc's measure of the same."""
    clock = VirtualClock()
    b = Bench(module, clock)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    fill(b, clock, n_tokens, hits)
    gc.collect()
    measured = tracemalloc.get_traced_memory()[0] - base
    tracemalloc.stop()
    assert b.inst.journal is not None
    j = b.inst.journal
    entries = len(j.entries)
    b.host.close()
    return {"entries": entries, "estimate_bytes_per_entry": j.bytes / entries,
            "measured_bytes_per_entry": measured / entries}


def bench_overhead(module: FilterModule, n: int, rounds: int) -> dict[str, Any]:
    """µs per request with journaling on and off, in steady state: `n` tokens requested in
    turn, half a TTL per round (so the journal prunes as it would live), rounds alternating
    between the two hosts so both see the same machine load."""
    hosts = {}
    for journal in (True, False):
        clock = VirtualClock()
        b = Bench(module, clock)
        if not journal:
            b.inst.journal = None
        hosts["on" if journal else "off"] = (b, clock)
    step = TTL / 2 / n
    tokens = [b"token-%08d" % i for i in range(n)]
    per_request: dict[str, list[float]] = {"on": [], "off": []}
    for r in range(rounds):
        for key, (b, clock) in hosts.items():
            t0 = time.perf_counter()
            for token in tokens:
                clock.advance(step)
                b.request(token)
            if r >= 2:  # after the journal filled its window
                per_request[key].append((time.perf_counter() - t0) / n * 1e6)
    out = {key: {"request_us": min(v)} for key, v in per_request.items()}
    b_on = hosts["on"][0]
    assert b_on.inst.journal is not None
    out["journal_entries"] = len(b_on.inst.journal.entries)
    for b, _ in hosts.values():
        b.host.close()
    return out


PARTS = ("replay", "waiting", "memory", "journal_memory", "overhead")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller journals (smoke run)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="JSON results file")
    parser.add_argument("--parts", default=",".join(PARTS),
                        help=f"comma-separated parts to run (default all: {','.join(PARTS)})")
    args = parser.parse_args(argv)
    parts = set(args.parts.split(","))
    if not parts <= set(PARTS):
        parser.error(f"--parts: unknown {', '.join(sorted(parts - set(PARTS)))}")
    module = FilterModule.from_file(DEFAULT_FILTER)
    sizes = [(500, 1)] if args.quick else [(1000, 1), (10_000, 1), (10_000, 4)]
    runs = 1 if args.quick else 3
    print("benchmarking warm restarts …", file=sys.stderr)
    results: dict[str, Any] = {
        "machine": platform.platform(), "python": platform.python_version(),
        "load_average": os.getloadavg()[0],
    }
    if "replay" in parts:
        results["replay"] = [bench_replay(module, n, h, runs) for n, h in sizes]
    if "waiting" in parts:
        results["waiting"] = bench_waiting(module, 500 if args.quick else 5000, 1)
    if "memory" in parts:
        results["memory"] = bench_memory(module, 1000 if args.quick else 10_000)
    if "journal_memory" in parts:
        results["journal_memory"] = bench_journal_memory(module, 500 if args.quick else 5000, 1)
    if "overhead" in parts:
        results["overhead"] = bench_overhead(module, 1000 if args.quick else 5000,
                                             4 if args.quick else 8)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    report(results)
    print(f"\n(written to {args.out})", file=sys.stderr)
    return 0


def report(results: dict[str, Any]) -> None:
    """Print the results as Markdown tables."""
    print(f"load average at the start: {results['load_average']:.1f}\n")
    if "replay" in results:
        print("| journal | entries | journal MiB | warm restart | per entry | serving it live, "
              "per request | cold restart |")
        print("|---|---|---|---|---|---|---|")
        for r in results["replay"]:
            print(f"| {r['tokens']:,} tokens × (1 miss + {r['hits_per_token']} hits) | "
                  f"{r['entries']:,} | {r['journal_mib']:.1f} | {r['warm_ms']:.0f} ms | "
                  f"{r['per_entry_us']:.0f} µs | {r['serve_us']:.0f} µs | {r['cold_ms']:.2f} ms |")
    if "waiting" in results:
        _report_waiting(results["waiting"])
    if "memory" in results:
        _report_memory(results["memory"])
    if "journal_memory" in results:
        j = results["journal_memory"]
        print(f"\njournal memory per entry: estimate {j['estimate_bytes_per_entry']:.0f} B, "
              f"tracemalloc {j['measured_bytes_per_entry']:.0f} B ({j['entries']:,} entries)")
    if "overhead" in results:
        o = results["overhead"]
        print(f"\n| journaling (steady state, {o['journal_entries']:,} entries kept) | "
              "per request |\n|---|---|")
        for k in ("off", "on"):
            print(f"| {k} | {o[k]['request_us']:.1f} µs |")


def _report_waiting(w: dict[str, Any]) -> None:
    print(f"\n| warm restart of {w['tokens']:,} tokens, a request every ms | restart | "
          "longest wait | median wait | served meanwhile |\n|---|---|---|---|---|")
    for how in ("at_once", "in_steps"):
        r = w[how]
        print(f"| {how.replace('_', ' ')} | {r['restart_ms']:.0f} ms | "
              f"{r['longest_wait_ms']:.1f} ms | {r['median_wait_ms']:.2f} ms | "
              f"{r['requests_served_meanwhile']} |")


def _report_memory(m: dict[str, Any]) -> None:
    print(f"\n| after a peak of {m['tokens_at_peak']:,} logins, 90 % expired | allocated "
          "before | allocated after | live bytes after |\n|---|---|---|---|")
    for mode in ("warm", "cold"):
        r = m[mode]
        print(f"| {mode} restart | {r['allocated_before_kib']:,.0f} KiB | "
              f"{r['allocated_after_kib']:,.0f} KiB | {r['live_after_kib']:,.0f} KiB |")


if __name__ == "__main__":
    sys.exit(main())
