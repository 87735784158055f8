"""The live counterpart of the policy experiments (`python -m scenarios live`).

Runs a trace through the real stack on 127.0.0.1: the auth server, the shop, `mitmdump` with
the wasm_auth addon (`wasm_clock_speed` = the replay speed, a fresh embedded store) and the
manager daemon applying a policy through the admin endpoint. Afterwards it reads back what the
store recorded (samples, requests, decisions), builds the same per-sample series as the
simulation (`scenarios.experiment.policy_series`) and compares the SPEC §7 metrics with a
simulated run of the same trace, policy and filter configuration.

Two things differ from the simulation's recording and are evened out before the series is built:

- The live addon samples every `wasm_sample_interval` *and* whenever a request changed the
  allocated memory. The metrics assume evenly spaced samples, so the samples are resampled onto
  a regular grid (`regular_samples`: the newest sample at or before each grid time).
- Samples carry no hit/miss counts; the `requests` collection has one document per request.
  `aggregate_requests` counts each request towards the next grid time of its instance; the
  `requests` and `outbound` counters are rebuilt from them too (see `live_samples`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import secrets
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from addons.telemetry.store import (
    AUTH_CALLS,
    REQUESTS,
    SAMPLES,
    close_store,
    decisions_frame,
    open_store,
    read_frame,
)
from manager.estimate import EstimatorParams
from manager.policies import AdaptiveParams, RatioParams, parse_policy
from scenarios.cli import positive
from scenarios.eclog import EClogConvertParams, EClogGenParams
from scenarios.experiment import (
    ExperimentConfig,
    PolicyRun,
    policy_series,
    run_policy,
    summarize,
)
from scenarios.procs import local_stack, stop
from scenarios.replay import ReplayConfig, ReplaySummary, replay
from scenarios.report import markdown_table, write_report
from scenarios.simulate import SAMPLE_COLUMNS, SimConfig
from scenarios.standard import eclog_trace
from scenarios.trace import LOGOUT_PATH, ScenarioError, Trace

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parent.parent

SAMPLE_INTERVAL = 5.0
"""Host-clock seconds between samples, as in the simulated experiments."""
DECISION_INTERVAL = 30.0
"""Host-clock seconds between manager passes, as in the simulated experiments."""
QUICK_POLICY = "ratio:measure=5m"
"""The quick run's policy: a shorter measurement period, so the rule acts within 40 minutes."""
QUICK_WINDOW = (pd.Timestamp("2019-12-01T19:50Z"), pd.Timestamp("2019-12-01T20:30Z"))
"""The quick trace: 40 minutes around the generated day's 20:00 sale spike."""

COUNT_COLUMNS = ["hits", "misses", "denied", "errors"]
_WORD_COLUMN = {"hit": "hits", "miss": "misses", "deny": "denied", "error": "errors",
                "reset": "errors", "respond": "errors"}
"""The addon's decision words → the simulation's counters (`continue`: no token, not counted)."""


@dataclass
class LiveRun(PolicyRun):
    """A policy run through the real proxy, with what the replayer and the servers saw."""

    state: Path = Path()
    """Logs, spool and embedded stores of the run."""
    replay: ReplaySummary | None = None
    samples: pd.DataFrame = field(default_factory=pd.DataFrame)
    """The samples as stored (before resampling)."""
    auth_latency_s: float | None = None
    """Mean host-clock latency of the answered auth calls (`measured_auth_latency`)."""
    request_log: pd.DataFrame = field(default_factory=pd.DataFrame)
    """The `requests` documents as stored."""


# --------------------------------------------------------------------------------------------
# Configuration shared by the live and the simulated run
# --------------------------------------------------------------------------------------------


AUTH_TIMEOUT_WALL_S = 5.0
"""The filter's auth timeout in wall-clock seconds. Times in the filter's configuration are
host-clock times and the live clock runs `speed` times faster, so the configured timeout is
this × speed: at 120× the filter's default 1 s would be 8 ms of wall time, which a loaded
machine's auth answers miss. The simulation's answers come after `auth_latency`, far below."""


def filter_config(speed: float) -> str:
    """The filter's configuration for both runs: its defaults, with the auth timeout at
    AUTH_TIMEOUT_WALL_S of wall time."""
    return json.dumps({"timeout_ms": max(1, round(AUTH_TIMEOUT_WALL_S * 1000 * speed))})


def experiment_config(speed: float, auth_latency: float | None = None,
                      **judging: Any) -> ExperimentConfig:
    """The simulated counterpart: 5 s samples, 30 s decisions, the live filter configuration.

    `auth_latency`: host-clock seconds until an auth answer (default the simulation's 5 ms);
    the comparison passes what the live run measured. `judging` overrides ExperimentConfig
    fields (warmup_s, min_window_requests…).
    """
    sim = SimConfig(sample_interval=SAMPLE_INTERVAL, decision_interval=DECISION_INTERVAL,
                    plugin_configuration=filter_config(speed))
    if auth_latency is not None:
        sim = dataclasses.replace(sim, auth_latency=auth_latency)
    return ExperimentConfig(sim=sim, **judging)


def measured_auth_latency(auth_calls: pd.DataFrame) -> float | None:
    """The mean host-clock latency of the live run's answered auth calls, in seconds (None
    without any): what a miss cost in filter time, so the simulation can charge the same."""
    if auth_calls.empty or "latency_ms" not in auth_calls:
        return None
    answered = auth_calls
    if "outcome" in auth_calls:
        answered = auth_calls[auth_calls["outcome"] == "ok"]
    latency = pd.to_numeric(answered["latency_ms"], errors="coerce").dropna()
    return float(latency.mean()) / 1000 if len(latency) else None


def quick_trace(work: Path) -> Trace:
    """40 minutes of a generated EClog-format day around a small sale spike (CSV into `work`)."""
    gen = EClogGenParams(days=1, start=date(2019, 12, 1), spike_day=0, seed=7,
                         requests_per_hour=600, spike_new_users=300, spike_duration=1800)
    start, end = QUICK_WINDOW
    convert = EClogConvertParams(logouts=True, name="live-quick", start=start, end=end)
    work.mkdir(parents=True, exist_ok=True)
    return eclog_trace(gen, convert, work / "eclog.csv")


# --------------------------------------------------------------------------------------------
# Pure: from the stored documents to the simulation's samples frame
# --------------------------------------------------------------------------------------------


def regular_samples(samples: pd.DataFrame, interval: float) -> pd.DataFrame:
    """The samples on a regular grid: every `interval` from the first sample time, per instance
    from its first sample, the newest sample at or before the grid time (columns as given,
    `time` replaced by the grid time)."""
    if samples.empty:
        return samples.copy()
    s = samples.sort_values("time", kind="stable")
    t0, t1 = float(s["time"].min()), float(s["time"].max())
    grid = t0 + interval * np.arange(math.floor((t1 - t0) / interval + 1e-9) + 1)
    parts = []
    for _, g in s.groupby("instance", sort=True):
        times = grid[grid >= float(g["time"].min())]
        left = pd.DataFrame({"time": times})
        right = g.rename(columns={"time": "sampled_at"})
        parts.append(pd.merge_asof(left, right, left_on="time", right_on="sampled_at",
                                   direction="backward").drop(columns="sampled_at"))
    return pd.concat(parts, ignore_index=True)[list(samples.columns)]


def aggregate_requests(requests: pd.DataFrame, sample_times: pd.DataFrame) -> pd.DataFrame:
    """Per (instance, sample time): hits, misses, denied and errors of the requests since the
    instance's previous sample time.

    `requests`: time, instance, decision and optionally path (logouts, whose path is the
    filter's logout path, are not counted, as in the simulation). `sample_times`: instance,
    time. A request counts towards the first sample time of its instance at or after it;
    requests after an instance's last sample time count towards that last one. Returns one row
    per row of `sample_times` (zeros where no request fell), columns instance, time, hits,
    misses, denied, errors, and `requests` (every request, logouts and tokenless ones too) and
    `outbound` (the auth calls they made; 0 without an `outbound` column).
    """
    keys = sample_times[["instance", "time"]].drop_duplicates()
    keys = keys.sort_values(["instance", "time"], kind="stable").reset_index(drop=True)
    out = keys.copy()
    for col in [*COUNT_COLUMNS, "requests", "outbound"]:
        out[col] = 0
    if requests.empty or keys.empty:
        return out
    r = requests
    column = r["decision"].map(_WORD_COLUMN).fillna("other")
    if "path" in r.columns:
        bare = r["path"].fillna("").astype(str).str.replace(r"[?#].*$", "", regex=True)
        column = column.where(bare != LOGOUT_PATH, "other")
    outbound = (pd.to_numeric(r["outbound"], errors="coerce").fillna(0) if "outbound" in r
                else pd.Series(0, index=r.index))
    r = r.assign(column=column, calls=outbound)
    last = keys.groupby("instance")["time"].max()
    r = r[r["instance"].isin(last.index)]
    if r.empty:
        return out
    # A request after its instance's last sample time counts towards that last time.
    r = r.assign(at=np.minimum(r["time"].to_numpy(dtype=float),
                               r["instance"].map(last).to_numpy(dtype=float)))
    assigned = pd.merge_asof(
        r.sort_values("at")[["at", "instance", "column", "calls"]],
        keys.rename(columns={"time": "sample_time"}).sort_values("sample_time"),
        left_on="at", right_on="sample_time", by="instance", direction="forward")
    assigned = assigned.dropna(subset=["sample_time"])
    by = ["instance", "sample_time"]
    counts = assigned.groupby([*by, "column"]).size().unstack(fill_value=0)
    counts = counts.reindex(columns=COUNT_COLUMNS, fill_value=0)
    counts["requests"] = assigned.groupby(by).size()
    counts["outbound"] = assigned.groupby(by)["calls"].sum()
    counts = counts.reset_index().rename(columns={"sample_time": "time"})
    merged = keys.merge(counts, on=["instance", "time"], how="left")
    cols = [*COUNT_COLUMNS, "requests", "outbound"]
    merged[cols] = merged[cols].fillna(0).astype("int64")
    return merged[["instance", "time", *cols]]


def live_samples(samples: pd.DataFrame, requests: pd.DataFrame,
                 interval: float = SAMPLE_INTERVAL) -> pd.DataFrame:
    """The stored samples and requests as the simulation's samples frame (SAMPLE_COLUMNS)."""
    if samples.empty:
        return pd.DataFrame(columns=SAMPLE_COLUMNS)
    s = samples.reindex(columns=[c for c in SAMPLE_COLUMNS if c not in COUNT_COLUMNS])
    for col in ("live_entries", "live_bytes"):
        s[col] = pd.to_numeric(s[col], errors="coerce").fillna(0).astype("int64")
    grid = regular_samples(s, interval)
    counts = aggregate_requests(requests, grid[["instance", "time"]])
    cumulative = ["requests", "outbound"]
    merged = grid.drop(columns=cumulative).merge(counts, on=["instance", "time"], how="left")
    merged[[*COUNT_COLUMNS, *cumulative]] = (
        merged[[*COUNT_COLUMNS, *cumulative]].fillna(0).astype("int64"))
    # The generation's request and outbound counters, counted from the requests per grid
    # interval: a sample's counters miss the calls made between the generation's last sample
    # and its restart, which the simulation (restarting right after a sample) never loses.
    merged = merged.sort_values(["instance", "time"], kind="stable")
    merged[cumulative] = merged.groupby(["instance", "generation"])[cumulative].cumsum()
    return merged[SAMPLE_COLUMNS].sort_values(["time", "instance"], ignore_index=True)


def estimator_of(spec: str) -> EstimatorParams:
    """The estimator the policy `spec` uses (the default one for policies without one)."""
    params = parse_policy(spec)
    if isinstance(params, RatioParams | AdaptiveParams):
        return params.estimator
    return EstimatorParams()


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def _auth_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/stats", timeout=10) as r:
        data: dict[str, Any] = json.load(r)
    return data


def run_live(trace: Trace, policy: str = "ratio", speed: float = 60.0,
             state: Path = Path(".wasm-reclaim/live"), policy_args: Sequence[str] = (),
             progress: bool = False, sample_interval: float = SAMPLE_INTERVAL,
             decision_interval: float = DECISION_INTERVAL) -> LiveRun:
    """Replay `trace` through the real proxy at `speed` with the daemon applying `policy`.

    `policy` is a spec as `python -m manager run --policy` takes it (`ratio:measure=5m`);
    `policy_args` are more daemon arguments. Logs, spool and stores go to a new directory under
    `state`. Returns the run with its series built as the simulation builds it.
    """
    parse_policy(policy)  # fail before starting anything
    run_dir = state / time.strftime("%Y%m%d-%H%M%S")
    run_dir.mkdir(parents=True, exist_ok=False)
    token_file = run_dir / "admin-token"
    token_file.write_text(secrets.token_urlsafe(24))
    token_file.chmod(0o600)
    interval_wall = max(0.2, decision_interval / speed)
    print(f"live: auth server, shop, mitmdump and the manager on 127.0.0.1 (state in {run_dir})",
          file=sys.stderr)
    t0 = time.perf_counter()
    with ExitStack() as stack:
        local = local_stack(stack, run_dir, options={
            "wasm_clock_speed": f"{speed:g}", "wasm_sample_interval": f"{sample_interval:g}",
            "wasm_filter_config": filter_config(speed),
            "wasm_admin_token_file": str(token_file),
        })
        store = local.store
        env = {"PYTHONPATH": os.pathsep.join(
            [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
        # The store exists once the shipper created it; the daemon retries until then.
        daemon_log = (run_dir / "manager.log").open("wb")
        stack.callback(daemon_log.close)
        daemon = subprocess.Popen(
            [sys.executable, "-m", "manager", "run", "--store", store,
             "--admin", str(local.admin), "--token-file", str(token_file),
             "--policy", policy, "--interval", f"{interval_wall:g}s",
             # Samples reach the store about a second of wall time late: reach back further.
             "--overlap", f"{max(10.0, 3 * speed):g}s", "--backoff-max", "1s",
             *policy_args],
            stdout=daemon_log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            env={**os.environ, **env})
        stack.callback(stop, daemon)
        time.sleep(2.0)  # a manager that cannot start (bad arguments) has exited by now
        if daemon.poll() is not None:
            raise ScenarioError(f"the manager did not start (exit {daemon.returncode}): "
                                f"{_last_line(run_dir / 'manager.log')}")
        print(f"live: replaying {len(trace)} events ({trace.duration / 60:.1f} min of trace) at "
              f"{speed:g}× with `{policy}` every {interval_wall:g} s", file=sys.stderr)
        summary = replay(trace, ReplayConfig(
            proxy=local.proxy, auth=local.auth, speed=speed, progress=progress))
        print(summary.format(), file=sys.stderr)
        time.sleep(2 * sample_interval / speed + 0.3)  # a last periodic sample
        verified = int(_auth_stats(local.auth).get("requests", {}).get("verify", 0))
        code = stop(daemon)
        if code not in (0, -15):  # it stopped midway: the report would show no policy at all
            raise ScenarioError(f"the manager exited with {code} during the replay: "
                                f"{_last_line(run_dir / 'manager.log')}")
        stop(local.proxy_process, timeout=60)  # the addon flushes; the shipper delivers
    elapsed = time.perf_counter() - t0
    db = open_store(store)
    try:
        samples = read_frame(db, SAMPLES, {})
        requests = read_frame(db, REQUESTS, {}, ["time", "instance", "generation", "decision",
                                                 "path", "status", "outbound"])
        decisions = decisions_frame(db)  # every decision, from the pass batches
        auth_calls = read_frame(db, AUTH_CALLS, {}, ["latency_ms", "outcome"])
    finally:
        close_store(db)
    if samples.empty:
        raise RuntimeError(f"no samples in {store}: see {run_dir / 'mitmdump.log'}")
    frame = live_samples(samples, requests, sample_interval)
    return LiveRun(
        policy=policy,
        series=policy_series(frame, estimator_of(policy)),
        decisions=decisions,
        verify_requests=verified,
        elapsed_s=elapsed,
        requests=len(requests),
        state=run_dir,
        replay=summary,
        samples=samples,
        request_log=requests,
        auth_latency_s=measured_auth_latency(auth_calls),
    )


# --------------------------------------------------------------------------------------------
# Comparing and reporting
# --------------------------------------------------------------------------------------------


def compare(sim: PolicyRun, live: PolicyRun, config: ExperimentConfig) -> pd.DataFrame:
    """The SPEC §7 metrics of both runs side by side: metric, sim, live, diff (live − sim) and
    rel_diff (diff / |sim|, NaN where sim is 0 or missing). Also the requests the filter decided
    (hits, misses, denied, errors)."""
    rows = []
    a, b = summarize(sim.series, config, sim.policy), summarize(live.series, config, live.policy)
    a["decided_requests"] = int(sim.series[COUNT_COLUMNS[:3]].sum().sum())
    b["decided_requests"] = int(live.series[COUNT_COLUMNS[:3]].sum().sum())
    for key, value in a.items():
        if key == "policy":
            continue
        x, y = float(value), float(b[key])
        diff = y - x
        rel = diff / abs(x) if x and math.isfinite(x) else math.nan
        rows.append({"metric": key, "sim": x, "live": y, "diff": diff, "rel_diff": rel})
    return pd.DataFrame(rows, columns=["metric", "sim", "live", "diff", "rel_diff"])


AGREEMENT: dict[str, tuple[str, float]] = {
    "decided_requests": ("relative", 0.01),
    "hit_rate": ("absolute", 0.02),
    "auth_requests": ("relative", 0.10),
    "mean_allocated_mib": ("relative", 0.10),
    "peak_allocated_mib": ("relative", 0.10),
    "mean_required_mib": ("relative", 0.05),
    "restarts": ("absolute", 0.0),
}
"""How close live and simulated must be (metric: kind of difference, bound): the bounds the
README states. `relative` is |live − sim| / |sim|; `absolute` is |live − sim| (hit rate: 0.02 is
2 points)."""


KEEP_UP_LAG_S = SAMPLE_INTERVAL
"""Host-clock seconds the replay may fall behind its schedule (one sample interval)."""
KEEP_UP_FAILED = 0.01
"""Share of proxied requests that may fail (transport errors, 5xx: auth calls timed out)."""


def keep_up_problems(summary: ReplaySummary | None, speed: float,
                     auth_latency_s: float | None) -> list[str]:
    """Why the live run is no counterpart of the simulation: the machine did not keep up at
    `speed` (the replay fell behind by more than KEEP_UP_LAG_S of trace time, more than
    KEEP_UP_FAILED of the requests failed, or an auth answer took longer than a sample
    interval of host clock on average). Empty when it kept up."""
    problems: list[str] = []
    if summary is None:
        return problems
    if summary.max_lag_s is not None and summary.max_lag_s * speed > KEEP_UP_LAG_S:
        problems.append(f"the replay fell {summary.max_lag_s:.1f} s of wall time behind "
                        f"({summary.max_lag_s * speed:,.0f} s of trace time)")
    failed = summary.errors + sum(n for status, n in summary.status.items()
                                  if status.startswith("5"))
    if summary.sent and failed > KEEP_UP_FAILED * summary.sent:
        problems.append(f"{failed} of {summary.sent} requests failed (auth calls timed out "
                        f"after {AUTH_TIMEOUT_WALL_S:g} s or the proxy was unreachable)")
    if auth_latency_s is not None and auth_latency_s > SAMPLE_INTERVAL:
        problems.append(f"an auth answer took {auth_latency_s / speed * 1000:,.0f} ms of wall "
                        f"time on average ({auth_latency_s:,.1f} s of filter time)")
    return problems


def agreement(table: pd.DataFrame) -> pd.DataFrame:
    """The AGREEMENT metrics of a comparison: metric, difference, bound, within (bool)."""
    rows = []
    for _, r in table[table["metric"].isin(list(AGREEMENT))].iterrows():
        kind, bound = AGREEMENT[str(r["metric"])]
        diff = abs(float(r["diff"]))
        if kind == "relative":
            diff = diff / abs(float(r["sim"])) if float(r["sim"]) else (math.inf if diff else 0.0)
        rows.append({"metric": r["metric"], "difference": diff, "kind": kind, "bound": bound,
                     "within": bool(diff <= bound + 1e-12)})
    return pd.DataFrame(rows, columns=["metric", "difference", "kind", "bound", "within"])


def agreement_markdown(agree: pd.DataFrame) -> str:
    def shown(value: float, kind: str) -> str:
        return f"{value:.1%}" if kind == "relative" else f"{value:.4g}"

    lines = ["| metric | difference | bound | within |", "|---|---|---|---|"]
    for _, r in agree.iterrows():
        lines.append(f"| {r['metric']} | {shown(r['difference'], r['kind'])} | "
                     f"{shown(r['bound'], r['kind'])} | {'yes' if r['within'] else '**no**'} |")
    return "\n".join(lines) + "\n"


EXPECTED = """\
Expected differences. Both runs use the same trace, policy code, filter and filter
configuration, 5 s samples and 30 s decisions; the live run differs where the real world does:
- the live clock is wall time × speed, so sample and decision times jitter by scheduling (a
  millisecond of wall time is {ms:g} ms of host clock), and the replayer's lag shifts requests;
- the live addon also samples whenever memory changed; its samples are resampled onto the 5 s
  grid, so a sample may show a state up to one interval old;
- auth latency is real (milliseconds of wall time, × speed on the host clock); the simulation
  is given the mean the live run measured ({latency}), so a miss keeps the
  session's next requests missing for as long in both;
- hit and miss counts, auth requests and memory should match closely; restarts can differ in
  timing (the daemon sees samples about a second of wall time late, and decides on its own
  clock), and each restart moves hits, auth requests and surplus after it.
"""


def comparison_markdown(table: pd.DataFrame, trace: str, policy: str, speed: float,
                        auth_latency_s: float | None = None,
                        problems: Sequence[str] = ()) -> str:
    """The comparison as Markdown: a table, the agreement with its bounds, and what to expect
    of it."""
    lines = [f"# Live vs simulated: `{policy}` on {trace} at {speed:g}×", "",
             "| metric | sim | live | live − sim | relative |", "|---|---|---|---|---|"]
    for metric, x, y, diff, rel in zip(table["metric"], table["sim"], table["live"],
                                       table["diff"], table["rel_diff"], strict=True):
        shown = "–" if not math.isfinite(rel) else f"{rel:+.1%}"
        lines.append(f"| {metric} | {x:,.4g} | {y:,.4g} | {diff:+,.4g} | {shown} |")
    agree = agreement(table)
    verdict = ("every bound holds" if agree["within"].all() else "outside the bounds: "
               + ", ".join(agree.loc[~agree["within"], "metric"]))
    if problems:
        verdict = ("not comparable, the machine did not keep up: " + "; ".join(problems)
                   + f". ({verdict})")
    latency = (f"{auth_latency_s * 1000:,.0f} ms of host clock, "
               f"{auth_latency_s * 1000 / speed:.1f} ms of wall time"
               if auth_latency_s is not None else "none measured: 5 ms")
    return ("\n".join(lines) + f"\n\n## Agreement: {verdict}\n\n" + agreement_markdown(agree)
            + "\n" + EXPECTED.format(ms=speed, latency=latency))


def write_live_report(trace: Trace, live: PolicyRun, out: Path, speed: float,
                      config: ExperimentConfig | None = None) -> pd.DataFrame:
    """The live report in `out`, the simulated run of the same trace and policy in `out/sim`,
    and `comparison.md`/`comparison.csv`; returns the comparison."""
    latency = getattr(live, "auth_latency_s", None)
    config = config or experiment_config(speed, auth_latency=latency)
    out.mkdir(parents=True, exist_ok=True)
    sim = run_policy(trace, live.policy, config)
    live_summary = write_report([live], config, out, "live")
    sim_summary = write_report([sim], config, out / "sim", "simulated")
    table = compare(sim, live, config)
    table.to_csv(out / "comparison.csv", index=False)
    problems = keep_up_problems(getattr(live, "replay", None), speed, latency)
    text = comparison_markdown(table, trace.meta.name or "trace", live.policy, speed, latency,
                               problems)
    (out / "comparison.md").write_text(text)
    logger.info("live summary:\n%s\nsimulated summary:\n%s", markdown_table(live_summary),
                markdown_table(sim_summary))
    return table


# --------------------------------------------------------------------------------------------
# Command line (wired in scenarios/__main__.py)
# --------------------------------------------------------------------------------------------


def live_arguments(p: Any) -> None:
    """Arguments of `python -m scenarios live` (p: an argparse parser)."""
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--trace", type=Path, help="trace (JSON Lines)")
    source.add_argument("--quick", action="store_true",
                        help="40 generated minutes around a small sale spike, measure=5m")
    p.add_argument("--policy", default=None,
                   help=f"policy spec for the daemon and the simulation (default: ratio; "
                        f"{QUICK_POLICY} with --quick)")
    p.add_argument("--speed", type=positive, default=60.0,
                   help="wasm_clock_speed and replay speed")
    p.add_argument("--out", type=Path, default=Path(".wasm-reclaim/live/report"),
                   help="output directory (results/live holds the README's copy)")
    p.add_argument("--state", type=Path, default=Path(".wasm-reclaim/live"),
                   help="logs, spool and embedded stores (a new subdirectory per run)")
    p.add_argument("--manager-arg", action="append", default=[], metavar="ARG",
                   help="more arguments for `python -m manager run` (repeatable)")


def _last_line(log: Path) -> str:
    """The last line a process wrote to `log` (its error, for a process that exited)."""
    lines = log.read_text(errors="replace").strip().splitlines() if log.exists() else []
    return lines[-1] if lines else f"nothing in {log}"


def live_command(a: Any) -> int:
    """Run `python -m scenarios live`; the exit code."""
    if a.policy:
        try:
            parse_policy(a.policy)
        except ValueError as e:
            raise ScenarioError(f"--policy: {e}") from None
    if a.quick:
        trace = quick_trace(a.out)
        trace.write_jsonl(a.out / "trace.jsonl")
    else:
        trace = Trace.read_jsonl(a.trace)
        counts = trace.counts()
        if not counts["request"] + counts["logout"]:  # nothing goes through the proxy
            raise ScenarioError(f"{a.trace}: the trace has no requests to replay")
    policy = a.policy or (QUICK_POLICY if a.quick else "ratio")
    run = run_live(trace, policy, a.speed, a.state, a.manager_arg, progress=sys.stderr.isatty())
    table = write_live_report(trace, run, a.out, a.speed)
    print((a.out / "comparison.md").read_text(), end="")
    print(f"written to {a.out}/ (live), {a.out / 'sim'}/ (simulated), "
          f"{a.out / 'comparison.md'}; state in {run.state}")
    problems = keep_up_problems(run.replay, a.speed, run.auth_latency_s)
    if problems:
        print(f"python -m scenarios live: this machine did not keep up at {a.speed:g}×: "
              f"{'; '.join(problems)}; the comparison does not hold (try a lower --speed)",
              file=sys.stderr)
        return 1
    agree = agreement(table)
    if not agree["within"].all():
        print(f"python -m scenarios live: live and simulated differ beyond the bounds in "
              f"{', '.join(agree.loc[~agree['within'], 'metric'])}", file=sys.stderr)
        return 1
    return 0
