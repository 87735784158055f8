"""The standard experiment set (`just experiment`): every figure and table of the README.

Traces, each run under the same policies in virtual time:
- `basic`: the paper's basic experiment (1024 logins at 1/s, then 1024 logouts), and its Fig. 4;
- `tenants`: three shops behind one proxy, one filter instance each, with different traffic
  levels and a sale spike at one of them;
- traffic of varied shapes (:data:`SHAPES`): generated EClog-format days with a flash crowd, a
  slow ramp, a long tail, two sales merged, no sale at all; several seeds and two filter TTLs
  (600 s and 300 s). Each has its robustness row (:mod:`scenarios.robustness`);
- `week` (only when asked, `--only week`: it alone takes longer than the rest): a generated
  EClog-format week with a sale spike on day 5.

Policies: `none`, a sweep of `fixed` uptimes, a sweep of `threshold`s (fractions of the peak
that `none` reached), `adaptive` (the manager's default), `ratio` (the paper's rule) and `oracle`
(ground truth); and `limit`, the offline-optimal frontier, computed from `none`'s run.
`--holdout` runs traces no parameter was tuned on (other seeds and shapes), for validation.
`--quick` runs small versions in seconds (CI).

Every trace, run and limit is a task of one pool of worker processes, so both cores stay busy.
"""

from __future__ import annotations

import concurrent.futures
import json
import logging
import multiprocessing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import date
from pathlib import Path
from typing import Any, Final

import pandas as pd

from manager.policies import parse_duration
from scenarios.basic import BasicParams, basic_trace
from scenarios.eclog import (
    EClogConvertParams,
    EClogGenParams,
    Sale,
    eclog_to_trace,
    generate_eclog,
    read_eclog,
    write_eclog,
)
from scenarios.experiment import (
    ExperimentConfig,
    PolicyRun,
    load_trace,
    policy_family,
    run_shared,
    run_shared_in_worker,
    with_sample_interval,
)
from scenarios.fig4 import plot_fig4, run_fig4
from scenarios.limit import LimitParams, frontier, frontier_table, instance_models
from scenarios.plots import plot_eclog
from scenarios.report import write_report
from scenarios.robustness import robustness_markdown, robustness_table
from scenarios.trace import Event, Trace, TraceMeta
from scenarios.warm_table import warm_markdown, warm_table

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Scenario:
    """One trace of the standard set and how to judge it."""

    name: str
    title: str
    fixed: tuple[str, ...]
    threshold_fractions: tuple[float, ...]
    sample_interval: float
    ttl_s: float = 600.0
    """The filter's TTL (its configuration's ``ttl_seconds``)."""
    shape: EClogGenParams | None = None
    """A generated EClog-format trace (two days of it, from midnight)."""
    default: bool = True
    """Part of the standard set unless asked for by name."""
    holdout: bool = False
    """A validation trace: run with ``--holdout`` only; no parameter was tuned on it."""

    @property
    def filter_config(self) -> str:
        return "" if self.ttl_s == 600.0 else json.dumps({"ttl_seconds": self.ttl_s})

    def heading(self, quick: bool = False) -> str:
        """The title, with the basic experiment's count as run (128 when quick)."""
        return self.title.format(count=basic_count(quick))


def basic_count(quick: bool) -> int:
    """Logins (and logouts) of the basic experiment: the paper's 1024, or 128 when quick."""
    return 128 if quick else 1024


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
    return shops_trace(shops, days, quick, work, "tenants", "three shops, one filter instance each",
                       scale=scale)


def shops_trace(shops: Sequence[tuple[str, float, int | None, int]], days: int, quick: bool,
                work: Path, name: str, description: str, *, scale: float = 1.0) -> Trace:
    """Shops behind one proxy, one instance each: (host, requests per hour, sale day or None,
    seed) each, generated in EClog format and merged (quick: the four hours of QUICK_WINDOW)."""
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
    meta = TraceMeta(name=name, description=description,
                     tenants=tuple(h for h, *_ in shops), hosts=tuple(h for h, *_ in shops))
    return Trace.from_events(events, meta)


def _shape(seed: int, *sales: str, rate: float = 1500.0, days: int = 2) -> EClogGenParams:
    return EClogGenParams(days=days, requests_per_hour=rate, seed=seed,
                          sales=tuple(Sale.parse(spec) for spec in sales))


_FIXED = ("fixed:2h", "fixed:30m", "fixed:6h", "fixed:24h")
_THRESHOLDS = (0.5, 0.75)


def _shaped(name: str, title: str, gen: EClogGenParams, ttl_s: float = 600.0,
            holdout: bool = False) -> Scenario:
    return Scenario(name, title, _FIXED, _THRESHOLDS, 5.0, ttl_s=ttl_s, shape=gen,
                    default=not holdout, holdout=holdout)


SHAPES: Final = (
    _shaped("flash", "Flash crowd (2 days, a sale at 20:00 on day 2)",
            _shape(21, "1@20:flash:2500")),
    _shaped("ramp", "Slow ramp (2 days, a 6-h sale building up from 09:00 on day 2)",
            _shape(22, "1@9:ramp:2500")),
    _shaped("long-tail", "Long tail (2 days, a sale at 20:00 on day 2 fading over 12 h)",
            _shape(23, "1@20:long-tail:2500")),
    _shaped("two-sales", "Two sales merged (a flash crowd on day 1, a ramp on day 2)",
            _shape(24, "0@20:flash:1500", "1@10:ramp:2000")),
    _shaped("quiet", "Quiet (2 days of daily cycles, no sale)", _shape(25, rate=1200.0)),
    _shaped("flash-ttl300", "Flash crowd, another seed, filter TTL 300 s",
            _shape(26, "1@20:flash:2500"), ttl_s=300.0),
    _shaped("two-sales-ttl300", "Two sales merged, another seed, filter TTL 300 s",
            _shape(27, "0@20:flash:1500", "1@10:ramp:2000"), ttl_s=300.0),
)
"""Traffic of varied shapes, seeds and TTLs: the robustness table's rows."""

HOLDOUT: Final = (
    _shaped("holdout-flash", "Held out: a bigger flash crowd, 3000 req/h, seed 41",
            _shape(41, "1@21:flash:4000", rate=3000.0), holdout=True),
    _shaped("holdout-three-sales", "Held out: three sales of three shapes, seed 42",
            _shape(42, "0@12:ramp:1200", "1@8:long-tail:1500", "1@20:flash:1500"),
            holdout=True),
    _shaped("holdout-quiet-ttl300", "Held out: quiet and small (600 req/h), TTL 300 s, seed 43",
            _shape(43, rate=600.0), ttl_s=300.0, holdout=True),
    _shaped("holdout-long-tail-ttl300", "Held out: long tail in the morning, TTL 300 s, seed 44",
            _shape(44, "1@7:long-tail:3000"), ttl_s=300.0, holdout=True),
    # Added in session 6: the first three informed the call price (B3), the last three were
    # generated after it was chosen, to check it
    _shaped("holdout-busy-two-sales", "Held out: 4000 req/h, a long tail, a flash crowd, seed 53",
            _shape(53, "0@13:long-tail:3000", "1@21:flash:3000", rate=4000.0), holdout=True),
    _shaped("holdout-flash-ttl1800", "Held out: flash crowd, filter TTL 1800 s, seed 51",
            _shape(51, "1@19:flash:2500"), ttl_s=1800.0, holdout=True),
    _shaped("holdout-ramp-ttl120", "Held out: slow ramp, filter TTL 120 s, seed 52",
            _shape(52, "1@11:ramp:2500"), ttl_s=120.0, holdout=True),
    _shaped("holdout-three-sales-2500", "Held out: three sales, 2500 req/h, seed 61",
            _shape(61, "0@11:ramp:1800", "0@21:flash:2000", "1@15:long-tail:2500", rate=2500.0),
            holdout=True),
    _shaped("holdout-quiet-busy-ttl300", "Held out: no sale, 3000 req/h, TTL 300 s, seed 62",
            _shape(62, rate=3000.0), ttl_s=300.0, holdout=True),
    _shaped("holdout-night-tail-ttl900", "Held out: long tail from 02:00, TTL 900 s, seed 63",
            _shape(63, "1@2:long-tail:2000", rate=1800.0), ttl_s=900.0, holdout=True),
    # Added in session 9, generated after the last change to the rule (session 7)
    _shaped("holdout-flash-morning", "Held out: a flash crowd at 09:00 on day 1, 2000 req/h, "
            "seed 71", _shape(71, "0@9:flash:2000", rate=2000.0), holdout=True),
    _shaped("holdout-two-ramps-ttl450", "Held out: two slow ramps, TTL 450 s, seed 72",
            _shape(72, "0@10:ramp:1500", "1@14:ramp:2500"), ttl_s=450.0, holdout=True),
    _shaped("holdout-long-tail-busy-ttl900",
            "Held out: 3500 req/h, a long tail at 18:00, TTL 900 s, seed 73",
            _shape(73, "1@18:long-tail:4000", rate=3500.0), ttl_s=900.0, holdout=True),
    _shaped("holdout-quiet-small", "Held out: quiet and small (900 req/h), seed 74",
            _shape(74, rate=900.0), holdout=True),
)
"""Validation traces no parameter was tuned on (``--holdout``)."""

SCENARIOS = {
    "basic": Scenario("basic", "Basic experiment ({count} logins, then {count} logouts)",
                      ("fixed:20m", "fixed:5m", "fixed:10m"), (0.5, 0.75), 1.0),
    "tenants": Scenario("tenants", "Three tenants, one instance each",
                        ("fixed:2h", "fixed:30m", "fixed:8h"), (0.5, 0.75), 5.0),
    **{s.name: s for s in SHAPES},
    "week": Scenario("week", "EClog-format week with a sale spike",
                     ("fixed:1h", "fixed:15m", "fixed:4h", "fixed:12h"), (0.5, 0.75), 5.0,
                     default=False),
    **{s.name: s for s in HOLDOUT},
}


def shaped_trace(scenario: Scenario, quick: bool, work: Path) -> Trace:
    """A generated EClog-format trace of ``scenario.shape`` (when quick: the four hours around
    its last sale's start at a tenth of the rate, or the first day's evening)."""
    gen = scenario.shape
    assert gen is not None
    start = end = None
    if quick:
        sales = gen.all_sales()
        at = (pd.Timestamp(gen.start_time) + pd.Timedelta(days=sales[-1].day, hours=sales[-1].hour)
              if sales else pd.Timestamp(gen.start_time) + pd.Timedelta(hours=18))
        start, end = at - pd.Timedelta(hours=1), at + pd.Timedelta(hours=3)
        gen = replace(gen, requests_per_hour=gen.requests_per_hour / 10,
                      sales=tuple(replace(sale, new_users=sale.new_users // 10)
                                  for sale in sales))
    convert = EClogConvertParams(logouts=True, name=scenario.name, start=start, end=end,
                                 ttl=scenario.ttl_s)
    return eclog_trace(gen, convert, work / "eclog.csv")


def make_trace(name: str, quick: bool, work: Path) -> Trace:
    """The trace of scenario `name` (its EClog CSVs go into `work`)."""
    scenario = SCENARIOS[name]
    if scenario.shape is not None:
        return shaped_trace(scenario, quick, work)
    if name == "basic":
        return basic_trace(BasicParams(count=basic_count(quick)))
    if name == "week":
        return week_trace(quick, work)
    if name == "tenants":
        return tenants_trace(quick, work)
    raise KeyError(name)


def _kib(size_bytes: float) -> str:
    """A size for a policy spec, at least one Wasm page."""
    return f"{max(size_bytes / 2**10, 64):.0f}KiB"


@dataclass
class _Pending:
    """A scenario on its way through the pool."""

    scenario: Scenario
    out: Path
    trace_path: Path
    config: ExperimentConfig
    specs: list[str]
    runs: dict[str, PolicyRun]
    limit: pd.DataFrame | None = None


def _first_specs(scenario: Scenario, quick: bool) -> list[str]:
    fixed: Sequence[str] = scenario.fixed[:1] if quick else scenario.fixed
    return ["none", "adaptive", "ratio", *fixed, *_warm_specs(scenario, quick)]


def _warm_specs(scenario: Scenario, quick: bool) -> list[str]:
    """Warm restarts beside the cold ones: `adaptive`, and (full runs) the shortest fixed
    interval of the scenario's sweep."""
    if quick:
        return ["adaptive:mode=warm"]
    shortest = min(scenario.fixed, key=lambda spec: parse_duration(spec.partition(":")[2]))
    return ["adaptive:mode=warm", f"{shortest},mode=warm"]


def _second_specs(scenario: Scenario, quick: bool, none: PolicyRun) -> list[str]:
    """Thresholds, and the oracle's smallest worthwhile restart, scale with `none`'s peak."""
    fractions = scenario.threshold_fractions[-1:] if quick else scenario.threshold_fractions
    peak = float(none.series.groupby("instance")["allocated_bytes"].max().max())
    return [f"oracle:min_reclaim={_kib(0.1 * peak)}",
            *(f"threshold:{_kib(f * peak)}" for f in fractions)]


def build_trace(args: tuple[str, bool, Path]) -> Path:
    """Make scenario `name`'s trace (its EClog CSVs too) in `where`; the trace file (a pool
    task: generating a two-day trace takes seconds)."""
    name, quick, where = args
    path = where / "trace.jsonl"
    make_trace(name, quick, where).write_jsonl(path)
    return path


def cold_runs_in_worker(
    args: tuple[Path, Sequence[str], ExperimentConfig, Scenario, bool],
) -> tuple[list[PolicyRun], pd.DataFrame]:
    """A scenario's cold policies (`none` among them) in one shared run, with the thresholds and
    the oracle, which scale with `none`'s peak, as its later policies; and the limit, computed
    from `none`'s run while the forked runs go on (a pool task)."""
    trace_path, specs, config, scenario, quick = args
    trace = load_trace(trace_path)
    limit: list[pd.DataFrame] = []

    def later(none: PolicyRun) -> list[str]:
        return _second_specs(scenario, quick, none)

    def meanwhile(none: PolicyRun) -> None:
        limit.append(limit_table(none, trace, scenario.ttl_s))

    runs = run_shared(trace, specs, config, later=later, meanwhile=meanwhile)
    return runs, limit[0]


def _heavy_first(scenario: Scenario) -> int:
    """The order scenarios enter the pool: the longest traces first, so no long run is left
    alone at the end (tenants has three instances and twice the requests; basic is tiny)."""
    return {"tenants": 0, "basic": 2}.get(scenario.name, 1)


def run_scenarios(scenarios: Sequence[Scenario], out: Path, quick: bool, jobs: int | None,
                  progress: bool) -> dict[str, pd.DataFrame]:
    """Run every policy of every scenario in one pool; write each scenario's report (with the
    limit); return the summaries by scenario.

    Everything slow is a pool task, in the order its inputs arrive: each trace is generated,
    then its policies run, sharing a simulation until each one's first restart
    (:func:`~scenarios.experiment.run_shared`): `none` with the other cold policies, the warm
    ones apart. The thresholds and the oracle scale with `none`'s peak: they go on from the
    point of `none`'s run just before their first restart, and the limit is computed from
    `none`'s run, both in the cold policies' task (:func:`cold_runs_in_worker`). The reports
    are written here as scenarios complete.
    """
    pending: dict[str, _Pending] = {}
    for scenario in scenarios:
        where = out / scenario.name
        where.mkdir(parents=True, exist_ok=True)
        config = with_sample_interval(ExperimentConfig(), scenario.sample_interval)
        config = replace(config, sim=replace(config.sim,
                                             plugin_configuration=scenario.filter_config))
        pending[scenario.name] = _Pending(scenario, where, where / "trace.jsonl", config, [], {})
    jobs = max(1, jobs or multiprocessing.cpu_count())
    summaries: dict[str, pd.DataFrame] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=0, unit="run", desc="standard set")
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
        futures: dict[concurrent.futures.Future[Any], tuple[str, str]] = {}

        def add(p: _Pending, specs: Sequence[str]) -> list[str]:
            # Once each: on a small trace two thresholds can round to the same size.
            specs = [spec for spec in dict.fromkeys(specs) if spec not in p.specs]
            p.specs.extend(specs)
            if bar is not None:
                bar.total += len(specs)
                bar.refresh()
            return specs

        def submit(name: str, specs: Sequence[str]) -> None:
            p = pending[name]
            specs = add(p, specs)
            # Cold and warm restarts cannot share a simulation (warm journals from the start).
            # The cold group runs `none` to its end, and then the thresholds and the oracle,
            # which scale with its peak, from the points of its run they need (`later`).
            for mode in ("cold", "warm"):
                group = [spec for spec in specs if (policy_family(spec) == "warm") == (
                    mode == "warm")]
                if mode == "cold":
                    assert "none" in group
                    futures[pool.submit(cold_runs_in_worker, (
                        p.trace_path, group, p.config, p.scenario, quick))] = (name, "cold")
                elif group:
                    futures[pool.submit(run_shared_in_worker, (p.trace_path, group,
                                                                p.config))] = (name, "runs")

        for p in sorted(pending.values(), key=lambda p: _heavy_first(p.scenario)):
            futures[pool.submit(build_trace, (p.scenario.name, quick, p.out))] = (
                p.scenario.name, "trace")
        while futures:
            done, _ = concurrent.futures.wait(futures, return_when="FIRST_COMPLETED")
            for future in done:
                name, task = futures.pop(future)
                p = pending[name]
                if task == "trace":
                    future.result()
                    submit(name, _first_specs(p.scenario, quick))
                    continue
                if task == "cold":  # the later policies' runs come with the cold ones
                    runs, p.limit = future.result()
                    add(p, [run.policy for run in runs])
                else:
                    runs = future.result()
                for run in runs:
                    p.runs[run.policy] = run
                    if bar is not None:
                        bar.set_postfix_str(f"{name} {run.policy}")
                        bar.update()
                if len(p.runs) == len(p.specs) and p.limit is not None:
                    summaries[name] = _report(p, quick)
    if bar is not None:
        bar.close()
    return {s.name: summaries[s.name] for s in scenarios}


def _report(p: _Pending, quick: bool) -> pd.DataFrame:
    """Write the scenario's report: summary, plots, the limit."""
    scenario = p.scenario
    order = [*_first_specs(scenario, quick)]
    order += [spec for spec in p.specs if spec not in order]
    runs = [p.runs[spec] for spec in order]
    fixed = [spec for spec in order if policy_family(spec) == "fixed"]
    thresholds = [spec for spec in order if spec.startswith("threshold:")]
    oracle = next(spec for spec in order if spec.startswith("oracle"))
    main = ["none", *fixed[-2:], *thresholds[-1:], "ratio", "adaptive", oracle,
            *_warm_specs(scenario, quick)]
    assert p.limit is not None
    p.limit.to_csv(p.out / "limit.csv", index=False)
    return write_report(runs, p.config, p.out, scenario.heading(quick), main_policies=main,
                        limit=p.limit)


def limit_table(none: PolicyRun, trace: Trace, ttl_s: float) -> pd.DataFrame:
    """The offline-optimal frontier of a trace (rows like a summary's, policy ``limit``)."""
    params = LimitParams(ttl_s=ttl_s, grid_s=300.0)
    schedules = frontier(instance_models(none.series, trace, params), params)
    duration = float(none.series["time"].max() - none.series["time"].min())
    # the summaries' auth_requests: the filters' outbound calls
    return frontier_table(schedules, max(duration, 1.0), int(none.series["outbound"].sum()))


def run_scenario(scenario: Scenario, out: Path, quick: bool, jobs: int | None,
                 progress: bool) -> pd.DataFrame:
    """One scenario into ``out``: its trace, every policy, the report."""
    return run_scenarios([scenario], out.parent, quick, jobs, progress)[scenario.name]


def chosen(only: Sequence[str] = (), holdout: bool = False) -> list[Scenario]:
    """The scenarios to run: ``only`` by name; else the default set, or the held-out one."""
    if only:
        return [SCENARIOS[name] for name in only]
    return [s for s in SCENARIOS.values() if (s.holdout if holdout else s.default)]


_RUN_ALONE: Final = tuple(name for name, s in SCENARIOS.items() if not s.default and not s.holdout)
"""Traces run only when asked for by name (the week): a run of the default set keeps their
rows in the tables."""


def write_table(out: Path, name: str, table: pd.DataFrame,
                markdown: Callable[[pd.DataFrame], str], keep_others: bool,
                only_kept: Sequence[str] = ()) -> pd.DataFrame:
    """Write a per-trace table to `out/<name>.csv` and `.md`. The rows of other traces of the
    set already in the CSV stay, in their order, and the rerun traces' rows replace theirs: a
    run of some traces (`--only`) keeps the rest, and a run of the default set keeps the week's
    (run on its own, `--only week`). Without `keep_others`, only the scenarios that are not
    part of the set run (`only_kept`) are kept. Returns the table written."""
    path = out / f"{name}.csv"
    if path.exists():
        old = pd.read_csv(path, keep_default_na=False)
        if "trace" in old.columns and list(old.columns) == list(table.columns):
            old = old[~old["trace"].isin(set(table["trace"]))]
            if not keep_others:
                old = old[old["trace"].isin(set(only_kept))]
            table = pd.concat([old, table], ignore_index=True)
            # rows read back come as text where empty; the markdown reads both alike
            table = table.replace({"": None})
    table.to_csv(path, index=False)
    (out / f"{name}.md").write_text(markdown(table))
    return table


def run_standard(out: Path, quick: bool = False, jobs: int | None = None,
                 progress: bool = False, only: Sequence[str] = (),
                 holdout: bool = False) -> dict[str, pd.DataFrame]:
    """Run the standard set (or the held-out traces) into `out`; return the summaries by
    scenario. Writes the robustness table of the shaped traces to `out/robustness.md`."""
    scenarios = chosen(only, holdout)
    summaries = run_scenarios(scenarios, out, quick, jobs, progress)
    shaped = [s for s in scenarios if s.shape is not None or s.name == "tenants"]
    if shaped:
        table = robustness_table(
            {s.name: (summaries[s.name], pd.read_csv(out / s.name / "limit.csv"), s.ttl_s)
             for s in shaped})
        name = "robustness-holdout" if holdout else "robustness"
        write_table(out, name, table, robustness_markdown, keep_others=bool(only),
                    only_kept=_RUN_ALONE)
    warm = warm_table(summaries)
    if len(warm):
        name = "warm-holdout" if holdout else "warm"
        write_table(out, name, warm, warm_markdown, keep_others=bool(only),
                    only_kept=_RUN_ALONE)
    names = {s.name for s in scenarios}
    if "week" in names:
        # One generated EClog-format day, the sale day of the week: requests and active tokens.
        day = pd.Timestamp("2019-12-01T00:00Z") if quick else pd.Timestamp("2019-12-05T00:00Z")
        params = EClogConvertParams(name="EClog-format day with a sale at 20:00", start=day,
                                    end=day + pd.Timedelta(days=1))
        (out / "eclog").mkdir(parents=True, exist_ok=True)
        plot_eclog(out / "week" / "eclog.csv", out / "eclog" / "day.png", params=params)
    if "two-sales" in names:
        (out / "eclog").mkdir(parents=True, exist_ok=True)
        plot_eclog(out / "two-sales" / "eclog.csv", out / "eclog" / "two-sales.png",
                   params=EClogConvertParams(name="Two sales merged: generated EClog format"))
    if "basic" in names:
        series = run_fig4(count=basic_count(quick))
        (out / "fig4").mkdir(parents=True, exist_ok=True)
        series.to_csv(out / "fig4" / "fig4.csv", index=False)
        plot_fig4(series, out / "fig4" / "fig4.png", logins=basic_count(quick))
    return summaries
