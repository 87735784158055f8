"""The standard experiment set (`just experiment`): every figure and table of the README.

Three traces, each run under the same policies in virtual time:
- `basic`: the paper's basic experiment (1024 logins at 1/s, then 1024 logouts), and its Fig. 4;
- `week`: a generated EClog-format week with a sale spike on day 5 (sessions become tokens, an
  idle gap longer than the TTL a new login);
- `tenants`: three shops behind one proxy, one filter instance each, with different traffic
  levels and a sale spike at one of them.

Policies: `none`, a sweep of `fixed` uptimes, a sweep of `threshold`s (fractions of the peak
that `none` reached), `ratio` (the paper's rule) and `oracle` (ground truth). `--quick` runs
small versions of the same traces in seconds (CI).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from pathlib import Path

import pandas as pd

from scenarios.basic import BasicParams, basic_trace
from scenarios.eclog import (
    EClogConvertParams,
    EClogGenParams,
    eclog_to_trace,
    generate_eclog,
    read_eclog,
    write_eclog,
)
from scenarios.experiment import ExperimentConfig, PolicyRun, run_policies, with_sample_interval
from scenarios.fig4 import plot_fig4, run_fig4
from scenarios.plots import plot_eclog
from scenarios.report import write_report
from scenarios.trace import Event, Trace, TraceMeta

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scenario:
    """One trace of the standard set and how to judge it."""

    name: str
    title: str
    fixed: tuple[str, ...]
    threshold_fractions: tuple[float, ...]
    sample_interval: float


def eclog_trace(gen: EClogGenParams, convert: EClogConvertParams, csv: Path) -> Trace:
    """Generate EClog-format CSV into `csv`, then read it back as a user's log would be."""
    write_eclog(generate_eclog(gen), csv)
    return eclog_to_trace(read_eclog(csv), convert)


QUICK_WINDOW = (pd.Timestamp("2019-12-01T18:00Z"), pd.Timestamp("2019-12-01T22:00Z"))
"""Quick runs keep the four hours around the first day's 20:00 sale spike."""


def week_trace(quick: bool, work: Path) -> Trace:
    """A generated EClog-format week (four hours of one day when quick) with a sale spike."""
    gen = EClogGenParams(days=1 if quick else 7, spike_day=0 if quick else 4, seed=7,
                         requests_per_hour=600 if quick else 3000,
                         spike_new_users=300 if quick else 3000)
    start, end = QUICK_WINDOW if quick else (None, None)
    convert = EClogConvertParams(logouts=True, name="week", start=start, end=end)
    return eclog_trace(gen, convert, work / "eclog.csv")


def tenants_trace(quick: bool, work: Path) -> Trace:
    """Three shops, one instance each: a big one, a small one, one with a sale spike."""
    days = 1 if quick else 2
    scale = 0.2 if quick else 1.0
    shops = [("big.example", 2400.0, None, 11), ("small.example", 400.0, None, 12),
             ("sale.example", 1200.0, days - 1, 13)]
    events: list[Event] = []
    for host, rate, spike_day, seed in shops:
        gen = EClogGenParams(days=days, start=date(2019, 12, 1), requests_per_hour=rate * scale,
                             spike_day=spike_day, spike_new_users=int(2000 * scale), seed=seed)
        start, end = QUICK_WINDOW if quick else (None, None)
        convert = EClogConvertParams(logouts=True, host=host, name=host, start=start, end=end)
        trace = eclog_trace(gen, convert, work / f"eclog-{host}.csv")
        # Tokens and users are per shop: prefix them so shops never share a session.
        events.extend(Event(e.time, e.kind, f"{host}/{e.user}", f"{host}/{e.token}", e.method,
                            e.host, e.path) for e in trace)
    events.sort(key=lambda e: e.time)
    meta = TraceMeta(name="tenants", description="three shops, one filter instance each",
                     tenants=tuple(h for h, *_ in shops), hosts=tuple(h for h, *_ in shops))
    return Trace.from_events(events, meta)


SCENARIOS = {
    "basic": Scenario("basic", "Basic experiment (1024 logins, then 1024 logouts)",
                      ("fixed:20m", "fixed:5m", "fixed:10m"), (0.5, 0.75), 1.0),
    "week": Scenario("week", "EClog-format week with a sale spike",
                     ("fixed:1h", "fixed:15m", "fixed:4h", "fixed:12h"), (0.5, 0.75), 5.0),
    "tenants": Scenario("tenants", "Three tenants, one instance each",
                        ("fixed:2h", "fixed:30m", "fixed:8h"), (0.5, 0.75), 5.0),
}


def make_trace(name: str, quick: bool, work: Path) -> Trace:
    """The trace of scenario `name` (its EClog CSVs go into `work`)."""
    if name == "basic":
        return basic_trace(BasicParams(count=128 if quick else 1024))
    if name == "week":
        return week_trace(quick, work)
    if name == "tenants":
        return tenants_trace(quick, work)
    raise KeyError(name)


def _kib(size_bytes: float) -> str:
    """A size for a policy spec, at least one Wasm page."""
    return f"{max(size_bytes / 2**10, 64):.0f}KiB"


def run_scenario(scenario: Scenario, out: Path, quick: bool, jobs: int | None,
                 progress: bool) -> pd.DataFrame:
    """Write the trace, run `none` first (thresholds are fractions of its peak), then the rest."""
    out.mkdir(parents=True, exist_ok=True)
    trace_path = out / "trace.jsonl"
    make_trace(scenario.name, quick, out).write_jsonl(trace_path)
    config = with_sample_interval(ExperimentConfig(), scenario.sample_interval)
    fixed: Sequence[str] = scenario.fixed[:1] if quick else scenario.fixed
    fractions = scenario.threshold_fractions[-1:] if quick else scenario.threshold_fractions
    first = run_policies(trace_path, ["none", "ratio", *fixed], config, jobs, progress)
    none = first[0]
    # Thresholds, and the oracle's smallest worthwhile restart, scale with the peak `none` saw.
    peak = float(none.series.groupby("instance")["allocated_bytes"].max().max())
    thresholds = [f"threshold:{_kib(f * peak)}" for f in fractions]
    oracle = f"oracle:min_reclaim={_kib(0.1 * peak)}"
    runs: list[PolicyRun] = first + run_policies(trace_path, [oracle, *thresholds], config, jobs,
                                                 progress)
    main = ["none", *fixed[-2:], *thresholds[-1:], "ratio", oracle]
    return write_report(runs, config, out, scenario.title, main_policies=main)


def run_standard(out: Path, quick: bool = False, jobs: int | None = None,
                 progress: bool = False, only: Sequence[str] = ()) -> dict[str, pd.DataFrame]:
    """Run the standard set into `out`; return the summaries by scenario."""
    summaries = {}
    for name, scenario in SCENARIOS.items():
        if only and name not in only:
            continue
        logger.info("scenario %s", name)
        summaries[name] = run_scenario(scenario, out / name, quick, jobs, progress)
    if not only or "week" in only:
        # One generated EClog-format day, the sale day of the week: requests and active tokens.
        day = pd.Timestamp("2019-12-01T00:00Z") if quick else pd.Timestamp("2019-12-05T00:00Z")
        params = EClogConvertParams(name="EClog-format day with a sale at 20:00", start=day,
                                    end=day + pd.Timedelta(days=1))
        (out / "eclog").mkdir(parents=True, exist_ok=True)
        plot_eclog(out / "week" / "eclog.csv", out / "eclog" / "day.png", params=params)
    if not only or "basic" in only:
        series = run_fig4(count=128 if quick else 1024)
        (out / "fig4").mkdir(parents=True, exist_ok=True)
        series.to_csv(out / "fig4" / "fig4.csv", index=False)
        plot_fig4(series, out / "fig4" / "fig4.png")
    return summaries
