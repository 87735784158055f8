"""The warm-against-cold table of the standard set (scenarios.warm_table)."""

from __future__ import annotations

import pandas as pd
import pytest

from scenarios.experiment import policy_family
from scenarios.warm_table import warm_markdown, warm_rows, warm_table


@pytest.mark.parametrize(("policy", "family"), [
    ("none", "none"), ("fixed:30m", "fixed"), ("threshold:1MiB", "threshold"),
    ("adaptive", "adaptive"), ("adaptive:mode=warm", "warm"), ("fixed:15m,mode=warm", "warm"),
    ("fixed:15m, mode=cold", "fixed"), ("oracle:min_reclaim=64KiB", "oracle"),
])
def test_policy_family(policy: str, family: str) -> None:
    assert policy_family(policy) == family


def summary(rows: list[tuple[str, float, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["policy", "mean_surplus_mib", "auth_vs_none", "hit_rate"])


def test_warm_rows_against_none_and_the_best_cold_policy() -> None:
    s = summary([
        ("none", 0.50, 1.00, 0.865),
        ("fixed:1h", 0.20, 1.01, 0.863),
        ("fixed:15m", 0.05, 1.10, 0.850),   # less surplus, but beyond the auth budget
        ("adaptive", 0.15, 1.015, 0.864),
        ("adaptive:mode=warm", 0.12, 1.00, 0.865),
        ("fixed:15m,mode=warm", 0.30, 1.00, 0.8649),
        ("fixed:5m,mode=warm", 0.01, 1.03, 0.865),
    ])
    rows = warm_rows("week", s).set_index("policy")
    assert list(rows.index) == ["adaptive:mode=warm", "fixed:15m,mode=warm", "fixed:5m,mode=warm"]
    a = rows.loc["adaptive:mode=warm"]
    assert (a["best_cold"], a["lowest_cold"]) == ("adaptive", "fixed:15m")
    assert a["hit_rate_vs_none_points"] == pytest.approx(0.0)
    assert bool(a["meets_targets"])
    assert not bool(rows.loc["fixed:15m,mode=warm", "meets_targets"])  # more surplus
    assert not bool(rows.loc["fixed:5m,mode=warm", "meets_targets"])   # auth above 1.00×
    text = warm_markdown(warm_table({"week": s}))
    assert "`adaptive:mode=warm` meets every target on 1 of 1 traces" in text


def test_no_warm_runs_no_rows() -> None:
    s = summary([("none", 0.5, 1.0, 0.86), ("fixed:1h", 0.2, 1.01, 0.86)])
    assert warm_rows("week", s).empty and warm_table({"week": s}).empty
