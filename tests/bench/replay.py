"""Benchmark of the live replayer (`python -m tests.bench.replay`): can it keep a schedule?

Starts the Python shop and the auth server (embedded store in a temporary directory) as
subprocesses on 127.0.0.1, then replays synthetic traces straight at the shop (no proxy: this
measures the replayer, not mitmproxy): `--users` log in during the first second, then requests
arrive at a constant rate for `--duration` seconds, round robin over the users, then everyone
logs out during one more second.
For each rate it reports the achieved request rate (between the first and the last request),
the largest lag behind schedule (any event), the latency, and the replayer's CPU use (share
of one core: the headroom left on a busy machine); "keeps up" means no errors, an
achieved rate of at least 98 % of the schedule and a lag under `--max-lag` seconds. A last
row replays the fastest trace with `--fast`.

Results print as a Markdown table and are written to `results/bench/replay.json`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from scenarios.replay import ReplayConfig, ReplaySummary, replay
from scenarios.trace import Event, Trace, TraceMeta

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "results" / "bench" / "replay.json"
HOST = "shop.example"


def constant_rate_trace(rate: float, duration: float, users: int) -> Trace:
    """`users` logins spread over the first second, then `rate` requests/s for `duration` s
    (round robin over the users), then the logouts spread over one second."""
    events = [Event.login(i / users, f"u{i}", f"u{i}-1", HOST) for i in range(users)]
    n = round(rate * duration)
    for j in range(n):
        u = j % users
        events.append(Event.request(1.0 + j / rate, f"u{u}", f"u{u}-1", HOST,
                                    f"/products/{j % 997}"))
    end = 1.0 + n / rate
    events += [Event.logout(end + i / users, f"u{i}", f"u{i}-1", HOST) for i in range(users)]
    return Trace.from_events(events, TraceMeta(name=f"constant-{rate:g}"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(port: int, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{proc.args!r} exited with {proc.returncode}")
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port}")


@contextlib.contextmanager
def server(args: Sequence[str], port: int) -> Iterator[str]:
    """Run `python -m scenarios <args> --port <port>`; yield its URL; stop it with SIGTERM."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "scenarios", *args, "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    try:
        _wait(port, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def request_phase_rate(s: ReplaySummary) -> float:
    """Requests per second between the first and the last request's start (from the records)."""
    starts = sorted(r.start for r in s.records if r.kind == "request")
    if len(starts) < 2 or starts[-1] <= starts[0]:
        return 0.0
    return (len(starts) - 1) / (starts[-1] - starts[0])


def row(label: str, target: float | None, s: ReplaySummary, max_lag: float,
        cpu: float) -> dict[str, Any]:
    achieved = request_phase_rate(s)
    keeps_up = (target is not None and s.errors == 0 and achieved >= 0.98 * target
                and (s.max_lag_s or 0.0) <= max_lag)
    return {
        "run": label,
        "target_req_s": target,
        "achieved_req_s": round(achieved, 1),
        "max_lag_s": None if s.max_lag_s is None else round(s.max_lag_s, 4),
        "p50_ms": round(s.latency_ms.get("p50", 0.0), 2),
        "p99_ms": round(s.latency_ms.get("p99", 0.0), 2),
        "sent": s.sent,
        "errors": s.errors,
        "replayer_cpu": round(cpu, 3),
        "keeps_up": keeps_up if target is not None else None,
    }


def timed(trace: Trace, cfg: ReplayConfig) -> tuple[ReplaySummary, float]:
    """Replay; the summary and the replayer's CPU time per wall-clock second (1.0: a core)."""
    cpu0, wall0 = time.process_time(), time.perf_counter()
    s = replay(trace, cfg)
    return s, (time.process_time() - cpu0) / (time.perf_counter() - wall0)


def markdown(rows: list[dict[str, Any]]) -> str:
    head = ("| run | schedule req/s | achieved req/s | max lag s | p50 ms | p99 ms | sent "
            "| errors | replayer CPU | keeps up |")
    out = [head, "|" + "---|" * 10]
    for r in rows:
        lag = "-" if r["max_lag_s"] is None else f"{r['max_lag_s']:.3f}"
        target = "-" if r["target_req_s"] is None else f"{r['target_req_s']:g}"
        keeps = {True: "yes", False: "**no**", None: "-"}[r["keeps_up"]]
        out.append(f"| {r['run']} | {target} | {r['achieved_req_s']:.1f} | {lag} "
                   f"| {r['p50_ms']:.2f} | {r['p99_ms']:.2f} | {r['sent']} | {r['errors']} "
                   f"| {r['replayer_cpu']:.0%} | {keeps} |")
    return "\n".join(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.bench.replay", description=__doc__.split("\n")[0])
    p.add_argument("--rates", default="250,500,1000,2000", help="request rates to try (req/s)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds of requests per rate")
    p.add_argument("--users", type=int, default=100, help="sessions the requests spread over")
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-lag", type=float, default=0.1, help="seconds of lag still 'keeping up'")
    p.add_argument("--out", type=Path, default=RESULTS, help="JSON results")
    a = p.parse_args(argv)
    rates = [float(r) for r in a.rates.split(",")]
    load_before = os.getloadavg()[0]
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-replay-") as tmp, \
            server(["shop"], _free_port()) as shop, \
            server(["auth-server", "--store", f"{tmp}/store"], _free_port()) as auth:
        for rate in rates:
            trace = constant_rate_trace(rate, a.duration, a.users)
            cfg = ReplayConfig(proxy=shop, auth=auth, speed=1.0, concurrency=a.concurrency,
                               keep_records=True)
            s, cpu = timed(trace, cfg)
            r = row(f"{rate:g} req/s for {a.duration:g} s", rate, s, a.max_lag, cpu)
            rows.append(r)
            print(f"{rate:g} req/s: achieved {r['achieved_req_s']}, max lag "
                  f"{s.max_lag_s:.3f} s", file=sys.stderr)
        trace = constant_rate_trace(max(rates), a.duration, a.users)
        s, cpu = timed(trace, ReplayConfig(proxy=shop, auth=auth, fast=True,
                                           concurrency=a.concurrency, keep_records=True))
        rows.append(row(f"--fast ({s.sent} requests)", None, s, a.max_lag, cpu))
    print(markdown(rows))
    result = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "platform": platform.platform(), "load_before": load_before,
                    "load_after": os.getloadavg()[0]},
        "params": {"duration_s": a.duration, "users": a.users, "concurrency": a.concurrency,
                   "max_lag_s": a.max_lag, "target": "the Python shop, no proxy"},
        "rows": rows,
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nresults: {a.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
