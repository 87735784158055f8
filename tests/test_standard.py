"""The standard experiment set in its quick form (what CI runs): outputs exist and agree."""

from __future__ import annotations

import pandas as pd
import pytest

from scenarios.report import safe_name
from scenarios.standard import run_standard


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("results")
    return out, run_standard(out, quick=True, jobs=2, only=["basic", "week"])


@pytest.mark.parametrize("scenario", ["basic", "week"])
def test_outputs_exist(results, scenario) -> None:
    out, summaries = results
    for name in ("summary.csv", "summary.md", "memory.png", "hitrate.png", "tradeoff.png",
                 "rule.png", "trace.jsonl"):
        assert (out / scenario / name).stat().st_size > 0, f"{scenario}/{name}"
    summary = pd.read_csv(out / scenario / "summary.csv")
    assert list(summary["policy"]) == list(summaries[scenario]["policy"])
    for policy in summary["policy"]:
        assert (out / scenario / "series" / f"{safe_name(policy)}.csv").exists()
        assert (out / scenario / "decisions" / f"{safe_name(policy)}.csv").exists()
    assert (out / "fig4" / "fig4.png").exists() and (out / "eclog" / "day.png").exists()


@pytest.mark.parametrize("scenario", ["basic", "week"])
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
