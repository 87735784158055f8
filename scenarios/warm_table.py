"""Warm against cold restarts, per trace of the standard set (`warm.md`).

For every policy whose restarts run warm (`adaptive:mode=warm`, `fixed:15m,mode=warm` …), one
row: its mean surplus, auth calls and hit rate, beside `none` and the best cold policy — the
cold run with the least mean surplus among those within `CHEAP_AUTH` × none's auth calls (the
auth budget issue 12 gives `adaptive`), and the cold run with the least surplus at any cost.

Targets (issue 12): auth calls 1.00 × none's, the hit rate of `none` within 0.1 point, and
a mean surplus no larger than the best cold policy's (within `CHEAP_AUTH`).

Pure: summaries in (columns policy, mean_surplus_mib, auth_vs_none, hit_rate), frames out.
"""

from __future__ import annotations

from collections.abc import Mapping

import pandas as pd

from scenarios.experiment import policy_family

CHEAP_AUTH = 1.02
"""Cold policies within this many times none's auth calls compete for "best cold"."""
HIT_RATE_POINTS = 0.1
"""The hit rate may differ from none's by this many percentage points."""
AUTH_TOLERANCE = 0.005
"""1.00 × none's auth calls, to this precision."""
SURPLUS_TOLERANCE_MIB = 1e-4

COLUMNS = [
    "trace", "policy", "mean_surplus_mib", "auth_vs_none", "hit_rate", "hit_rate_vs_none_points",
    "best_cold", "best_cold_surplus_mib", "best_cold_auth_vs_none", "lowest_cold",
    "lowest_cold_surplus_mib", "lowest_cold_auth_vs_none", "meets_targets",
]


def warm_rows(trace: str, summary: pd.DataFrame) -> pd.DataFrame:
    """One row per warm policy of one trace's summary (columns :data:`COLUMNS`)."""
    family = summary["policy"].map(policy_family)
    none = summary[summary["policy"] == "none"]
    warm = summary[family == "warm"]
    cold = summary[(family != "warm") & (family != "none")]
    if none.empty or warm.empty:
        return pd.DataFrame(columns=COLUMNS)
    none_hit = float(none["hit_rate"].iloc[0])
    cheap = cold[cold["auth_vs_none"] <= CHEAP_AUTH]
    best = (cheap.sort_values("mean_surplus_mib", kind="stable").iloc[0] if len(cheap)
            else none.iloc[0])
    lowest = (cold.sort_values("mean_surplus_mib", kind="stable").iloc[0] if len(cold)
              else none.iloc[0])
    rows = []
    for _, w in warm.iterrows():
        delta = (float(w["hit_rate"]) - none_hit) * 100
        meets = (abs(float(w["auth_vs_none"]) - 1.0) <= AUTH_TOLERANCE
                 and abs(delta) <= HIT_RATE_POINTS
                 and float(w["mean_surplus_mib"])
                 <= float(best["mean_surplus_mib"]) + SURPLUS_TOLERANCE_MIB)
        rows.append({
            "trace": trace, "policy": w["policy"], "mean_surplus_mib": w["mean_surplus_mib"],
            "auth_vs_none": w["auth_vs_none"], "hit_rate": w["hit_rate"],
            "hit_rate_vs_none_points": delta, "best_cold": best["policy"],
            "best_cold_surplus_mib": best["mean_surplus_mib"],
            "best_cold_auth_vs_none": best["auth_vs_none"], "lowest_cold": lowest["policy"],
            "lowest_cold_surplus_mib": lowest["mean_surplus_mib"],
            "lowest_cold_auth_vs_none": lowest["auth_vs_none"], "meets_targets": bool(meets),
        })
    return pd.DataFrame(rows, columns=COLUMNS)


def warm_table(summaries: Mapping[str, pd.DataFrame]) -> pd.DataFrame:
    """:func:`warm_rows` of every trace (name → summary)."""
    frames = [warm_rows(name, s) for name, s in summaries.items()]
    frames = [f for f in frames if len(f)]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=COLUMNS)


def warm_markdown(table: pd.DataFrame) -> str:
    """The table as Markdown, with a line counting the traces where each policy meets every
    target."""
    head = ("| trace | policy | mean surplus MiB | auth vs none | hit rate (vs none) | best cold "
            f"within {CHEAP_AUTH:g}× auth | lowest cold surplus | targets |")
    lines = [head, "|" + "|".join("---" for _ in head.split("|")[1:-1]) + "|"]
    for _, r in table.iterrows():
        lines.append(
            f"| {r['trace']} | `{r['policy']}` | {r['mean_surplus_mib']:.3f} | "
            f"{r['auth_vs_none']:.3f}× | {r['hit_rate']:.1%} ({r['hit_rate_vs_none_points']:+.2f}"
            f" pt) | `{r['best_cold']}` {r['best_cold_surplus_mib']:.3f} MiB at "
            f"{r['best_cold_auth_vs_none']:.2f}× | `{r['lowest_cold']}` "
            f"{r['lowest_cold_surplus_mib']:.3f} MiB at {r['lowest_cold_auth_vs_none']:.2f}× | "
            f"{'met' if r['meets_targets'] else 'missed'} |")
    if len(table):
        counts = table.groupby("policy", sort=False)["meets_targets"].agg(["sum", "count"])
        met = "; ".join(f"`{p}` meets every target on {int(c['sum'])} of {int(c['count'])} "
                        "traces" for p, c in counts.iterrows())
    else:
        met = "no warm runs"
    return "\n".join(lines) + (
        f"\n\nTargets: {1:.2f} × none's auth calls, none's hit rate within "
        f"{HIT_RATE_POINTS:g} point, mean surplus ≤ the best cold policy's within "
        f"{CHEAP_AUTH:g} × none's auth calls. {met}.\n")


__all__ = ["COLUMNS", "warm_markdown", "warm_rows", "warm_table"]
