"""The robustness table's judgement of one policy on one trace (scenarios/robustness.py)."""

from __future__ import annotations

import pandas as pd

from scenarios.robustness import robustness_markdown, robustness_row, robustness_table


def summary(rows: list[tuple[str, float, float]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["policy", "mean_surplus_mib", "auth_vs_none"])


LIMIT = pd.DataFrame({"auth_vs_none": [1.0, 1.01, 1.1], "mean_surplus_mib": [0.08, 0.02, 0.0]})


def test_a_policy_under_half_the_fixed_curve_meets_the_targets() -> None:
    s = summary([("none", 0.10, 1.0), ("fixed:2h", 0.04, 1.02), ("fixed:30m", 0.01, 1.08),
                 ("adaptive", 0.02, 1.01)])
    row = robustness_row("t", s, LIMIT, 600.0)
    # the fixed curve at 1.01× is halfway from none (0.10) to fixed:2h (0.04): 0.07
    assert abs(row["fixed_share"] - 0.02 / 0.07) < 1e-9
    assert abs(row["limit_multiple"] - 1.0) < 1e-9
    assert row["dominated_by"] == "" and row["meets_targets"]


def test_a_dominated_policy_misses_and_names_its_rival() -> None:
    s = summary([("none", 0.10, 1.0), ("fixed:2h", 0.04, 1.02), ("adaptive", 0.05, 1.03)])
    row = robustness_row("t", s, LIMIT, 600.0)
    assert row["dominated_by"] == "fixed:2h" and not row["meets_targets"]


def test_nothing_to_reclaim_meets_the_share_bound_but_not_a_dearer_auth_bound() -> None:
    quiet = summary([("none", 0.0, 1.0), ("fixed:2h", 0.0, 1.02), ("adaptive", 0.0, 1.0)])
    limit = pd.DataFrame({"auth_vs_none": [1.0], "mean_surplus_mib": [0.0]})
    row = robustness_row("quiet", quiet, limit, 300.0)
    assert row["fixed_share"] == 1.0 and row["meets_targets"]
    assert "met (nothing to reclaim)" in robustness_markdown(robustness_table(
        {"quiet": (quiet, limit, 300.0)}, policies=("adaptive",)))
    # restarting for nothing at a cost still misses the auth target
    costly = summary([("none", 0.0, 1.0), ("adaptive", 0.0, 1.05)])
    assert not robustness_row("quiet", costly, limit, 300.0)["meets_targets"]
