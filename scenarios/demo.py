"""`just demo`: the basic experiment through a real proxy, in about a minute, on embedded defaults.

Starts the auth server (tokens in the embedded store), the upstream shop and `mitmdump` with the
wasm_auth addon on 127.0.0.1 with `wasm_clock_speed` (60 by default: the experiment's 34
minutes of host-clock time take 34 seconds), replays the paper's basic experiment through the
proxy (1024 logins at one per second, each followed by a request, then 1024 logouts), stops
everything, and reads the memory samples the addon stored. It prints a summary and writes the
series and a plot: allocated memory stays at its peak while the cache empties.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from addons.telemetry.store import close_store, open_store, read_frame
from scenarios.basic import BasicParams, basic_trace
from scenarios.fig4 import FIG4_COLUMNS, plot_fig4, summarize_fig4
from scenarios.procs import local_stack, stop
from scenarios.replay import ReplayConfig, replay

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class DemoConfig:
    """What the demo runs."""

    out: Path = Path("results/demo")
    state: Path = Path(".wasm-reclaim/demo")
    count: int = 1024
    speed: float = 60.0
    sample_interval: float = 1.0


def demo_series(samples: pd.DataFrame) -> pd.DataFrame:
    """The stored samples of the demo's instance as a Fig. 4 series (host-clock seconds).

    Reads `time`, `live_entries`, `live_bytes`, `allocated_pages`, `allocated_bytes`.
    """
    s = samples.sort_values("time")
    return pd.DataFrame({
        "t": (s["time"] - s["time"].iloc[0]).round(3),
        "tokens": s["live_entries"].fillna(0).astype("int64"),
        "live_bytes": s["live_bytes"].fillna(0).astype("int64"),
        "allocated_pages": s["allocated_pages"],
        "allocated_bytes": s["allocated_bytes"],
    })[FIG4_COLUMNS].reset_index(drop=True)


def run_demo(config: DemoConfig) -> pd.DataFrame:
    """Run the demo; return the series read back from the store."""
    state = config.state / time.strftime("%Y%m%d-%H%M%S")
    state.mkdir(parents=True, exist_ok=True)
    trace = basic_trace(BasicParams(count=config.count, host="shop.example"))
    print(f"demo: auth server, shop and mitmdump on 127.0.0.1 (logs and store in {state})")
    with ExitStack() as stack:
        # Only logouts evict, as in the paper's filter: a TTL longer than the experiment. Times
        # in the filter's configuration are host-clock times, so the auth timeout scales with
        # the clock: 1 s of wall time.
        local = local_stack(stack, state, options={
            "wasm_clock_speed": f"{config.speed:g}",
            "wasm_sample_interval": f"{config.sample_interval:g}",
            "wasm_filter_config": json.dumps({"ttl_seconds": 2 * config.count + 600,
                                              "timeout_ms": int(1000 * config.speed)}),
        })
        print(f"demo: replaying {config.count} logins then {config.count} logouts at "
              f"{config.speed:g}× through the proxy")
        summary = replay(trace, ReplayConfig(
            proxy=local.proxy, auth=local.auth,
            speed=config.speed, progress=sys.stderr.isatty()))
        print(summary.format())
        time.sleep(2 * config.sample_interval / config.speed + 0.2)  # a last sample
        stop(local.proxy_process, timeout=60)  # the addon flushes; the shipper delivers
    db = open_store(local.store)
    try:
        samples = read_frame(db, "samples", {"instance": "shop.example"})
    finally:
        close_store(db)
    if samples.empty:
        raise RuntimeError(f"no samples in {local.store}: see {state / 'mitmdump.log'}")
    series = demo_series(samples)
    config.out.mkdir(parents=True, exist_ok=True)
    series.to_csv(config.out / "samples.csv", index=False)
    plot_fig4(series, config.out / "demo.png", logins=config.count)
    print(summarize_fig4(series))
    print(f"series: {config.out / 'samples.csv'}\nplot:   {config.out / 'demo.png'}")
    return series
