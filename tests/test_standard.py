"""The standard experiment set in its quick form (what CI runs): outputs exist and agree."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest

from scenarios.report import safe_name
from scenarios.standard import SCENARIOS, chosen, run_scenarios, run_standard


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    return out, run_standard(out, quick=True, jobs=2, only=["basic", "week", "two-sales"])


@pytest.mark.parametrize("scenario", ["basic", "week", "two-sales"])
def test_outputs_exist(results, scenario) -> None:
    out, summaries = results
    for name in ("summary.csv", "summary.md", "memory.png", "hitrate.png", "tradeoff.png",
                 "rule.png", "adaptive.png", "trace.jsonl", "limit.csv"):
        assert (out / scenario / name).stat().st_size > 0, f"{scenario}/{name}"
    summary = pd.read_csv(out / scenario / "summary.csv")
    assert list(summary["policy"]) == list(summaries[scenario]["policy"])
    for policy in summary["policy"]:
        assert (out / scenario / "series" / f"{safe_name(policy)}.csv").exists()
        assert (out / scenario / "decisions" / f"{safe_name(policy)}.csv").exists()
    assert (out / "fig4" / "fig4.png").exists() and (out / "eclog" / "day.png").exists()


@pytest.mark.parametrize("scenario", ["basic", "week", "two-sales"])
def test_summary_agrees_with_the_series_and_oracle_beats_none(results, scenario) -> None:
    out, _ = results
    summary = pd.read_csv(out / scenario / "summary.csv").set_index("policy")
    for policy, row in summary.iterrows():
        series = pd.read_csv(out / scenario / "series" / f"{safe_name(str(policy))}.csv")
        per_time = series.groupby("time")["surplus_true"].sum()
        assert row["mean_surplus_mib"] == pytest.approx(per_time.mean() / 2**20)
        assert row["auth_requests"] == series["outbound"].sum()
        assert row["restarts"] == series["restarted"].sum()
    oracle = next(p for p in summary.index if str(p).startswith("oracle"))
    assert summary.loc[oracle, "mean_surplus_mib"] <= summary.loc["none", "mean_surplus_mib"]
    assert summary.loc["none", "restarts"] == 0


def test_robustness_table_of_the_shaped_traces(results) -> None:
    out, summaries = results
    table = pd.read_csv(out / "robustness.csv")
    assert list(table["trace"]) == ["two-sales", "two-sales"]
    assert list(table["policy"]) == ["adaptive", "ratio"]
    summary = summaries["two-sales"].set_index("policy")
    row = table.iloc[0]
    assert row["mean_surplus_mib"] == pytest.approx(summary.loc["adaptive", "mean_surplus_mib"])
    assert row["auth_vs_none"] == pytest.approx(summary.loc["adaptive", "auth_vs_none"])
    assert "× limit" in (out / "robustness.md").read_text()
    limit = pd.read_csv(out / "two-sales" / "limit.csv")
    assert limit["restarts"].iloc[0] == 0
    assert limit["mean_surplus_mib"].iloc[0] == pytest.approx(
        summary.loc["none", "mean_surplus_mib"], rel=0.25, abs=0.01)
    assert (out / "eclog" / "two-sales.png").stat().st_size > 0


def test_warm_restarts_keep_none_s_auth_calls_and_hit_rate(results) -> None:
    out, summaries = results
    table = pd.read_csv(out / "warm.csv")
    assert list(table["trace"]) == ["basic", "week", "two-sales"]
    assert set(table["policy"]) == {"adaptive:mode=warm"}
    for _, row in table.iterrows():
        summary = summaries[row["trace"]].set_index("policy")
        assert row["auth_vs_none"] == pytest.approx(1.0)  # no auth call from any restart
        assert abs(row["hit_rate_vs_none_points"]) <= 0.1
        assert summary.loc["adaptive:mode=warm", "auth_requests"] == summary.loc[
            "none", "auth_requests"]
    assert "meets every target" in (out / "warm.md").read_text()


def test_the_default_set_holds_varied_shapes_and_two_ttls() -> None:
    default = chosen()
    names = [s.name for s in default]
    assert "week" not in names and not any(s.holdout for s in default)
    shaped = [s for s in default if s.shape is not None]
    assert {s.ttl_s for s in shaped} == {300.0, 600.0}
    shapes = {sale.shape for s in shaped for sale in s.shape.all_sales()}  # type: ignore[union-attr]
    assert shapes == {"flash", "ramp", "long-tail"}
    assert len({s.shape.seed for s in shaped}) == len(shaped)  # type: ignore[union-attr]
    assert any(s.shape is not None and not s.shape.all_sales() for s in shaped)  # a quiet one
    assert all(s.holdout for s in chosen(holdout=True))
    held = {s.shape.seed for s in chosen(holdout=True)}  # type: ignore[union-attr]
    assert not held & {s.shape.seed for s in shaped}  # type: ignore[union-attr]


def test_a_policy_asked_for_twice_runs_once(tmp_path) -> None:
    """On a small trace two threshold fractions can round to one size: the set must still
    finish (it used to wait for a run it had counted twice)."""
    twice = replace(SCENARIOS["basic"], threshold_fractions=(0.75, 0.75))
    summary = run_scenarios([twice], tmp_path, quick=False, jobs=2, progress=False)["basic"]
    thresholds = [p for p in summary["policy"] if p.startswith("threshold:")]
    assert len(thresholds) == 1


def test_a_run_of_some_traces_keeps_the_other_traces_rows(tmp_path: Path) -> None:
    """`--only flash` replaces flash's rows of robustness.md and warm.md, and keeps the rest."""
    from scenarios.standard import write_table

    def md(table: pd.DataFrame) -> str:
        return "\n".join(f"{r.trace} {r.policy} {r.value}" for r in table.itertuples())

    first = pd.DataFrame({"trace": ["basic", "flash", "ramp"], "policy": ["a", "a", "a"],
                          "value": [1.0, 2.0, 3.0]})
    write_table(tmp_path, "t", first, md, keep_others=False)
    rerun = pd.DataFrame({"trace": ["flash"], "policy": ["a"], "value": [9.0]})
    kept = write_table(tmp_path, "t", rerun, md, keep_others=True)
    assert sorted(zip(kept["trace"], kept["value"], strict=True)) == [("basic", 1.0), ("flash", 9.0),
                                                         ("ramp", 3.0)]
    assert "flash a 9.0" in (tmp_path / "t.md").read_text()
    whole = write_table(tmp_path, "t", rerun, md, keep_others=False)
    assert list(whole["trace"]) == ["flash"]


def test_a_run_of_the_default_set_keeps_the_weeks_rows(tmp_path: Path) -> None:
    """The week runs on its own (`--only week`); a later run of the default set replaces its
    traces' rows and keeps the week's, and drops rows of traces it no longer knows."""
    from scenarios.standard import write_table

    def md(table: pd.DataFrame) -> str:
        return "\n".join(f"{r.trace} {r.value}" for r in table.itertuples())

    before = pd.DataFrame({"trace": ["flash", "week", "gone"], "value": [1.0, 2.0, 3.0]})
    write_table(tmp_path, "t", before, md, keep_others=True)
    rerun = pd.DataFrame({"trace": ["flash", "ramp"], "value": [8.0, 9.0]})
    whole = write_table(tmp_path, "t", rerun, md, keep_others=False, only_kept=("week",))
    assert sorted(zip(whole["trace"], whole["value"], strict=True)) == [
        ("flash", 8.0), ("ramp", 9.0), ("week", 2.0)]
    assert "week 2.0" in (tmp_path / "t.md").read_text()
