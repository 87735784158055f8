"""The policy comparison: runs, series, summary, report files; the summary agrees with the series."""

from __future__ import annotations

import contextlib
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from manager.estimate import EstimatorParams
from manager.policies import Samples, decide, decisions_frame, initial_state, parse_policy
from scenarios.__main__ import main as scenarios_main
from scenarios.__main__ import split_policies
from scenarios.basic import BasicParams, basic_trace
from scenarios.experiment import (
    SERIES_COLUMNS,
    ExperimentConfig,
    PolicyRun,
    filter_module,
    load_trace,
    policy_series,
    run_policies,
    run_shared,
    summary_table,
)
from scenarios.report import safe_name, write_report
from scenarios.simulate import SimConfig, Simulation
from scenarios.trace import Event, Trace


def small_trace() -> Trace:
    """A burst of 300 users who keep coming back, then quiet: memory peaks, then idles."""
    events = []
    for u in range(300):
        t0 = u * 0.5
        events.append(Event.login(t0, f"u{u}", f"t{u}", "shop"))
        for k in range(6):
            events.append(Event.request(t0 + k * 20, f"u{u}", f"t{u}", "shop"))
    events.append(Event.login(2400, "late", "late", "shop"))
    events.append(Event.request(2400, "late", "late", "shop"))
    return Trace.from_events(events)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    path = tmp_path_factory.mktemp("trace") / "small.jsonl"
    small_trace().write_jsonl(path)
    config = ExperimentConfig(sim=SimConfig(sample_interval=2.0, decision_interval=10.0,
                                            plugin_configuration='{"ttl_seconds": 120}'))
    specs = ["none", "fixed:10m", "threshold:128KiB", "ratio:measure=5m,ttl_cap=2m",
             "oracle:min_reclaim=64KiB"]
    return config, run_policies(path, specs, config, jobs=1)


def test_series_and_summary_agree(runs, tmp_path) -> None:
    config, result = runs
    summary = write_report(result, config, tmp_path, "small")
    for name in ("summary.csv", "summary.md", "memory.png", "hitrate.png", "tradeoff.png"):
        assert (tmp_path / name).stat().st_size > 0, name
    for run in result:
        series = pd.read_csv(tmp_path / "series" / f"{safe_name(run.policy)}.csv")
        assert list(series.columns) == SERIES_COLUMNS
        row = summary.set_index("policy").loc[run.policy]
        # Recomputed here, independently of summarize(): per-time totals, then means.
        per_time = series.groupby("time")[["allocated_bytes", "surplus_true"]].sum()
        assert row["mean_allocated_mib"] == pytest.approx(per_time["allocated_bytes"].mean() / 2**20)
        assert row["peak_allocated_mib"] == pytest.approx(per_time["allocated_bytes"].max() / 2**20)
        assert row["mean_surplus_mib"] == pytest.approx(per_time["surplus_true"].mean() / 2**20)
        hits, misses = series["hits"].sum(), series["misses"].sum()
        assert row["hit_rate"] == pytest.approx(hits / (hits + misses))
        assert row["auth_requests"] == series["outbound"].sum() == run.verify_requests
        assert row["restarts"] == series["restarted"].sum()
        assert (series["required_true"] <= series["allocated_bytes"]).all()


def test_policies_behave_as_designed(runs) -> None:
    config, result = runs
    s = summary_table(result, config).set_index("policy")
    assert s.loc["none", "restarts"] == 0 and s.loc["none", "auth_vs_none"] == 1.0
    assert s.loc["fixed:10m", "restarts"] >= 3
    assert s.loc["oracle:min_reclaim=64KiB", "mean_surplus_mib"] <= s.loc["none", "mean_surplus_mib"]
    assert s.loc["oracle:min_reclaim=64KiB", "restarts"] >= 1
    # Restarts free surplus but cost auth requests; none pays no auth overhead.
    for policy in ("fixed:10m", "threshold:128KiB"):
        assert s.loc[policy, "mean_surplus_mib"] < s.loc["none", "mean_surplus_mib"]
        assert s.loc[policy, "auth_vs_none"] >= 1.0
    assert np.isfinite(s["estimator_mae_kib"]).all()


def test_threshold_respects_its_limit(runs) -> None:
    _, result = runs
    run = next(r for r in result if r.policy.startswith("threshold"))
    # Memory may exceed the threshold between a sample and the restart, never for long.
    over = run.series["allocated_bytes"] > 128 * 1024
    assert over.mean() < 0.2


@pytest.mark.parametrize(("text", "specs"), [
    ("none,fixed:30m", ["none", "fixed:30m"]),
    ("ratio:measure=15m,ttl_cap=10m,oracle", ["ratio:measure=15m,ttl_cap=10m", "oracle"]),
    (" none , ratio ", ["none", "ratio"]),
])
def test_split_policies(text, specs) -> None:
    assert split_policies(text) == specs


def test_experiment_command(tmp_path, capsys) -> None:
    trace = tmp_path / "basic.jsonl"
    basic_trace(BasicParams(count=40)).write_jsonl(trace)
    assert scenarios_main(["experiment", "--trace", str(trace), "--policies",
                           "none,fixed:30s,threshold:64KiB", "--out", str(tmp_path / "out"),
                           "--jobs", "1", "--sample-interval", "1"]) == 0
    out = capsys.readouterr().out
    assert "| `fixed:30s` |" in out
    summary = pd.read_csv(tmp_path / "out" / "summary.csv")
    assert list(summary["policy"]) == ["none", "fixed:30s", "threshold:64KiB"]


def test_unknown_policy_fails_before_running(tmp_path, capsys) -> None:
    trace = tmp_path / "basic.jsonl"
    basic_trace(BasicParams(count=5)).write_jsonl(trace)
    with pytest.raises(ValueError, match="sometimes"):
        run_policies(trace, ["none", "sometimes"], ExperimentConfig(), jobs=1)


def test_experiment_filter_config_sets_the_ttl(tmp_path, capsys) -> None:
    # 40 logins 1 s apart, each token used again 90 s later: cached under the default TTL
    # (600 s), expired under a 60-s TTL, so every second request is a miss.
    events = []
    for i in range(40):
        events += [Event.login(float(i), f"u{i}", f"t{i}"),
                   Event(float(i), "request", f"u{i}", f"t{i}", "GET", "shop.example", "/"),
                   Event(90.0 + i, "request", f"u{i}", f"t{i}", "GET", "shop.example", "/")]
    trace = tmp_path / "again.jsonl"
    Trace.from_events(sorted(events, key=lambda e: e.time)).write_jsonl(trace)
    rates = {}
    for name, config in (("default", []), ("short", ["--filter-config", '{"ttl_seconds": 60}'])):
        assert scenarios_main(["experiment", "--trace", str(trace), "--policies", "none",
                               "--out", str(tmp_path / name), "--jobs", "1",
                               "--sample-interval", "1", *config]) == 0
        rates[name] = float(pd.read_csv(tmp_path / name / "summary.csv")["hit_rate"].iloc[0])
    assert rates == {"default": 0.5, "short": 0.0}


@pytest.mark.parametrize(("value", "message"), [
    ("{nope", "--filter-config: not JSON"), ("[1]", "expected a JSON object"),
    ("@/nonexistent/config.json", "cannot read /nonexistent/config.json"),
])
def test_experiment_filter_config_errors(tmp_path, capsys, value, message) -> None:
    trace = tmp_path / "basic.jsonl"
    basic_trace(BasicParams(count=2)).write_jsonl(trace)
    assert scenarios_main(["experiment", "--trace", str(trace), "--out", str(tmp_path / "o"),
                           "--filter-config", value]) == 2
    assert message in capsys.readouterr().err


def test_a_worker_parses_a_trace_once_while_it_is_unchanged(tmp_path) -> None:
    path = tmp_path / "t.jsonl"
    small_trace().write_jsonl(path)
    first = load_trace(path)
    assert load_trace(path) is first  # parsed once: runs of one trace share it
    shorter = Trace.from_events(small_trace().events[:10])
    shorter.write_jsonl(path)
    again = load_trace(path)
    assert again is not first and again.events == shorter.events


def _alone(trace: Trace, spec: str, config: ExperimentConfig) -> tuple[pd.DataFrame, pd.DataFrame,
                                                                        int]:
    """One policy in its own simulation, the plain way: series, decisions, auth calls."""
    params = parse_policy(spec)
    state = initial_state(params)
    made: list = []

    def controller(new: Samples, now: float) -> list[str]:
        nonlocal state
        decisions, state = decide(state, new, now, params)
        made.extend(decisions)
        return [d.instance for d in decisions if d.action == "restart"]

    sim = replace(config.sim, restart_mode=getattr(params, "restart_mode", "cold"))
    result = Simulation(sim, filter_module(sim.filter_path)).run(
        trace, None if spec == "none" else controller)
    estimator = getattr(params, "estimator", None) or EstimatorParams()
    return policy_series(result.samples, estimator), decisions_frame(made), result.verify_requests


def _each_as_alone(runs: list[PolicyRun], trace: Trace, config: ExperimentConfig) -> int:
    """Assert each run is its policy's run alone (series, decisions, auth calls); how many
    of them restarted."""
    restarted = 0
    for run in runs:
        series, decisions, auth = _alone(trace, run.policy, config)
        pd.testing.assert_frame_equal(run.series, series)
        pd.testing.assert_frame_equal(run.decisions, decisions)
        assert run.verify_requests == auth
        restarted += int(series["restarted"].sum() > 0)
    return restarted


@pytest.mark.parametrize("specs", [
    # restarts at different times, one policy that never restarts, `none` kept to the end
    ["none", "fixed:10m", "threshold:128KiB", "ratio:measure=5m,ttl_cap=2m",
     "oracle:min_reclaim=64KiB", "threshold:64MiB"],
    # no `none`: the shared part stops when the last policy goes its own way
    ["fixed:10m", "fixed:20m", "fixed:30m"],
    ["adaptive:mode=warm", "fixed:10m,mode=warm"],
])
def test_a_shared_run_gives_each_policy_its_run_alone(specs) -> None:
    trace = small_trace()
    config = ExperimentConfig(sim=SimConfig(sample_interval=2.0, decision_interval=10.0,
                                            plugin_configuration='{"ttl_seconds": 120}'))
    shared = run_shared(trace, specs, config)
    assert [r.policy for r in shared] == specs
    restarted = _each_as_alone(shared, trace, config)
    assert restarted >= len(specs) - 2  # most policies did fork off


def _later(none: PolicyRun) -> list[str]:
    """Policies that scale with `none`'s run, as the standard set's thresholds and oracle do:
    restarting from the first pass on (fixed:1s), later, late (at 70 % of the trace: from a
    later checkpoint), never (64 MiB); a repeat, and one of the specs."""
    peak = int(none.series["allocated_bytes"].max())
    late = 0.7 * float(none.series["time"].max() - none.series["time"].min())
    return ["fixed:1s", f"threshold:{peak // 2 // 1024}KiB", f"oracle:min_reclaim={peak // 10}",
            f"threshold:{peak // 2 // 1024}KiB", "threshold:64MiB", "fixed:10m",
            f"fixed:{late:.0f}s"]


def _children() -> set[int]:
    """This process's child processes (Linux /proc)."""
    me, found = os.getpid(), set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == me:
                found.add(int(stat.parent.name))
    return found


def test_later_policies_go_on_from_none_s_run_each_as_alone() -> None:
    """`later` policies start from the checkpoint before their first restart (or take
    `none`'s run when they never restart): each run is the one it has alone, and no
    checkpoint process is left."""
    trace = small_trace()
    config = ExperimentConfig(sim=SimConfig(sample_interval=2.0, decision_interval=10.0,
                                            plugin_configuration='{"ttl_seconds": 120}'))
    before = _children()
    seen: list[PolicyRun] = []
    runs = run_shared(trace, ["none", "fixed:10m"], config, later=_later, meanwhile=seen.append)
    assert len(seen) == 1 and seen[0] is runs[0]  # `none`'s run, while the others went on
    later = [spec for spec in dict.fromkeys(_later(runs[0])) if spec != "fixed:10m"]
    assert len(later) == 5
    assert [r.policy for r in runs] == ["none", "fixed:10m", *later]
    restarted = _each_as_alone(runs, trace, config)
    assert restarted == 5  # all but none and 64 MiB
    assert _children() <= before


def test_later_policies_that_fail_leave_no_checkpoint_behind() -> None:
    def later(none: PolicyRun) -> list[str]:
        return ["fixed:10m", "no-such-policy"]

    before = _children()
    with pytest.raises(ValueError, match="no-such-policy"):
        run_shared(small_trace(), ["none"], ExperimentConfig(), later=later)
    assert _children() <= before
    with pytest.raises(ValueError, match="none"):
        run_shared(small_trace(), ["fixed:10m"], ExperimentConfig(), later=later)

    def meanwhile(none: PolicyRun) -> None:
        raise RuntimeError("the limit failed")

    with pytest.raises(RuntimeError, match="the limit failed"):
        run_shared(small_trace(), ["none", "fixed:10m"], ExperimentConfig(),
                   later=lambda none: ["fixed:20m"], meanwhile=meanwhile)
    assert _children() <= before


def test_a_shared_run_restarts_in_one_mode() -> None:
    with pytest.raises(ValueError, match="warm and cold"):
        run_shared(small_trace(), ["fixed:10m", "fixed:10m,mode=warm"], ExperimentConfig())
