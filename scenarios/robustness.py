"""The robustness table: per trace, how a policy (``adaptive`` first) stands against the others.

For each trace, from its summary (one row per policy) and its ``limit`` frontier:

- **dominated by**: the fixed intervals and thresholds with no more mean surplus *and* no more
  auth calls, and less of one (beyond ``tolerance``);
- **× fixed curve**: the policy's mean surplus over the fixed-interval curve's at the same auth
  cost (the curve: ``none`` and every ``fixed:…`` run, their Pareto points joined by straight
  lines; below 1 the policy beats a cron job of the same cost);
- **× limit**: its mean surplus over the offline-optimal frontier's at the same auth cost (1 is
  the best any cold restart schedule could do);
- **auth vs none**: its auth-server requests relative to ``none``.

Targets (issue 12): not dominated, ≤ 0.5 × the fixed curve, ≤ 2 × the limit, ≤ 1.02 × none's
auth calls. Each bound is checked as written (surplus ≤ 0.5 × the curve's), so on a trace with
nothing to reclaim (``none``, the curve and the policy all at 0) it holds, though the share, 0/0,
reads 1. Pure functions over the summaries.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from scenarios.experiment import policy_family
from scenarios.limit import curve_at

TARGETS = {"fixed_share": 0.5, "limit_multiple": 2.0, "auth_vs_none": 1.02}
_ZERO = 1e-9
"""Surplus (MiB) this small is none at all."""

COLUMNS = [
    "trace", "ttl_s", "policy", "mean_surplus_mib", "auth_vs_none", "dominated_by",
    "fixed_share", "limit_multiple", "none_surplus_mib", "meets_targets",
]


def _value(summary: pd.DataFrame, policy: str, column: str) -> float:
    return float(summary.loc[summary["policy"] == policy, column].to_numpy(dtype=np.float64)[0])


def dominated_by(summary: pd.DataFrame, policy: str, tolerance: float = 1e-4) -> list[str]:
    """The fixed and threshold policies that dominate ``policy`` in ``summary``.

    Reads columns policy, mean_surplus_mib, auth_vs_none. A rival dominates when it has no
    more surplus and no more auth calls, and less of one by more than ``tolerance`` (MiB, or
    the same share of none's calls).
    """
    kind = summary["policy"].map(policy_family)  # warm runs are no cold rival
    rivals = summary[kind.isin(["fixed", "threshold"])]
    s, a = (_value(summary, policy, c) for c in ("mean_surplus_mib", "auth_vs_none"))
    no_worse = ((rivals["mean_surplus_mib"] <= s + tolerance)
                & (rivals["auth_vs_none"] <= a + tolerance))
    better = ((rivals["mean_surplus_mib"] < s - tolerance)
              | (rivals["auth_vs_none"] < a - tolerance))
    return [str(p) for p in rivals.loc[no_worse & better, "policy"]]


def fixed_curve_at(summary: pd.DataFrame, auth_vs_none: float) -> float:
    """The fixed-interval curve's mean surplus at an auth cost (``none`` is its 1× end)."""
    kind = summary["policy"].map(policy_family)  # warm runs are no cold rival
    curve = summary[kind.isin(["fixed", "none"])]
    at = max(auth_vs_none, float(curve["auth_vs_none"].min()))
    return curve_at(curve["auth_vs_none"].to_numpy(), curve["mean_surplus_mib"].to_numpy(), at)


def _share(value: float, reference: float) -> float:
    if not math.isfinite(reference):
        return math.nan
    if reference <= _ZERO:
        return 1.0 if value <= _ZERO else math.inf
    return value / reference


def _within(value: float, reference: float, factor: float) -> bool:
    """value ≤ factor × reference (both none at all counts as within)."""
    if reference <= _ZERO:
        return value <= _ZERO
    return value <= factor * reference


def robustness_row(trace: str, summary: pd.DataFrame, limit: pd.DataFrame, ttl_s: float,
                   policy: str = "adaptive") -> dict[str, Any]:
    """One row of the table for ``policy`` on one trace (columns: :data:`COLUMNS`)."""
    s, a = (_value(summary, policy, c) for c in ("mean_surplus_mib", "auth_vs_none"))
    rivals = dominated_by(summary, policy)
    fixed_s = fixed_curve_at(summary, a)
    fixed_share = _share(s, fixed_s)
    limit_s = curve_at(limit["auth_vs_none"].to_numpy(), limit["mean_surplus_mib"].to_numpy(),
                       max(a, float(limit["auth_vs_none"].min())))
    limit_multiple = _share(s, limit_s)
    none = _value(summary, "none", "mean_surplus_mib")
    meets = (not rivals and _within(s, fixed_s, TARGETS["fixed_share"])
             and _within(s, limit_s, TARGETS["limit_multiple"]) and a <= TARGETS["auth_vs_none"])
    return {
        "trace": trace, "ttl_s": ttl_s, "policy": policy, "mean_surplus_mib": s,
        "auth_vs_none": a, "dominated_by": " ".join(rivals), "fixed_share": fixed_share,
        "limit_multiple": limit_multiple, "none_surplus_mib": none, "meets_targets": meets,
    }


def robustness_table(
    traces: Mapping[str, tuple[pd.DataFrame, pd.DataFrame, float]],
    policies: tuple[str, ...] = ("adaptive", "ratio"),
) -> pd.DataFrame:
    """Rows for each trace (name → (summary, limit frontier, TTL)) and policy."""
    rows = [robustness_row(name, summary, limit, ttl, policy)
            for name, (summary, limit, ttl) in traces.items() for policy in policies
            if policy in set(summary["policy"])]
    return pd.DataFrame(rows, columns=COLUMNS)


def robustness_markdown(table: pd.DataFrame) -> str:
    """The table as Markdown, with a line counting the traces where each policy meets every
    target."""
    head = ("| trace | TTL | policy | mean surplus MiB | none's | auth vs none | dominated by | "
            "× fixed curve | × limit | targets |")
    lines = [head, "|" + "|".join("---" for _ in head.split("|")[1:-1]) + "|"]

    def num(x: float, fmt: str) -> str:
        return "–" if not np.isfinite(x) else format(x, fmt)

    for _, r in table.iterrows():
        lines.append(
            f"| {r['trace']} | {r['ttl_s']:.0f} s | `{r['policy']}` | "
            f"{r['mean_surplus_mib']:.3f} | {r['none_surplus_mib']:.3f} | "
            f"{r['auth_vs_none']:.3f}× | {r['dominated_by'] or 'nothing'} | "
            f"{num(r['fixed_share'], '.2f')} | {num(r['limit_multiple'], '.2f')} | "
            f"{'met' if r['meets_targets'] else 'missed'}"
            f"{' (nothing to reclaim)' if r['none_surplus_mib'] <= _ZERO else ''} |"
        )
    counts = table.groupby("policy", sort=False)["meets_targets"].agg(["sum", "count"])
    summary = "; ".join(f"`{p}` meets every target on {int(c['sum'])} of {int(c['count'])} traces"
                        for p, c in counts.iterrows())
    return "\n".join(lines) + f"\n\nTargets: not dominated, ≤ {TARGETS['fixed_share']:g} × the " \
        f"fixed curve, ≤ {TARGETS['limit_multiple']:g} × the limit, ≤ " \
        f"{TARGETS['auth_vs_none']:g} × none's auth calls. {summary}.\n"
