"""Tables and plots of a policy comparison (`python -m scenarios experiment`).

Writes, for one trace, into its output directory:
- `summary.csv` and `summary.md`: one row per policy (SPEC §7 metrics);
- `series/<policy>.csv`: the per-sample series each metric is computed from;
- `decisions/<policy>.csv`: every decision the manager's policy code made, with its reason;
- `memory.png`: allocated, required (estimated and true) and surplus over time, restarts marked;
- `hitrate.png`: cache hit rate over time;
- `tradeoff.png`: mean surplus against extra auth-server requests, fixed and threshold sweeps as
  lines, the offline-optimal frontier ("limit") when given, adaptive, ratio and oracle as points,
  and the policies whose restarts run warm (`mode=warm`) as their own points;
- `rule.png`, `adaptive.png`: the ratio and adaptive rules at work on the busiest instance.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from scenarios.experiment import (
    ExperimentConfig,
    PolicyRun,
    policy_family,
    summary_table,
    totals,
)

MIB = 2**20

COLUMNS = {
    "policy": "policy",
    "mean_allocated_mib": "mean allocated MiB",
    "peak_allocated_mib": "peak allocated MiB",
    "mean_surplus_mib": "mean surplus MiB",
    "hit_rate": "hit rate",
    "worst_window_hit_rate": "worst 5-min hit rate",
    "auth_requests": "auth requests",
    "auth_vs_none": "auth vs none",
    "restarts": "restarts",
    "fit_on_average": "fit (avg)",
    "fit_at_peak": "fit (peak)",
    "estimator_mae_kib": "estimator MAE KiB",
}


def safe_name(policy: str) -> str:
    """A file name for a policy spec (`fixed:30m` → `fixed_30m`)."""
    return re.sub(r"[^A-Za-z0-9.-]+", "_", policy).strip("_")


def markdown_table(summary: pd.DataFrame) -> str:
    """The summary as a Markdown table with readable numbers."""
    table = summary[list(COLUMNS)].rename(columns=COLUMNS)
    lines = ["| " + " | ".join(table.columns) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    for _, row in table.iterrows():
        cells = []
        for key, value in row.items():
            col = str(key)
            if isinstance(value, str):
                cells.append(f"`{value}`")
            elif pd.isna(value):
                cells.append("–")
            elif "hit rate" in col:
                cells.append(f"{value:.1%}")
            elif col in ("auth requests", "restarts"):
                cells.append(f"{int(value):,}")
            elif col.startswith("fit"):
                cells.append(f"{value:,.0f}")
            elif col == "auth vs none":
                cells.append(f"{value:.2f}×")
            else:
                cells.append(f"{value:,.2f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_report(runs: Sequence[PolicyRun], config: ExperimentConfig, out: Path,
                 title: str, main_policies: Sequence[str] | None = None,
                 limit: pd.DataFrame | None = None) -> pd.DataFrame:
    """Write tables, series and plots for `runs` (and the `limit` frontier on the trade-off
    plot, when given); return the summary."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "series").mkdir(exist_ok=True)
    (out / "decisions").mkdir(exist_ok=True)
    for run in runs:
        run.series.to_csv(out / "series" / f"{safe_name(run.policy)}.csv", index=False)
        run.decisions.to_csv(out / "decisions" / f"{safe_name(run.policy)}.csv", index=False)
    summary = summary_table(runs, config)
    summary.to_csv(out / "summary.csv", index=False)
    (out / "summary.md").write_text(f"# {title}\n\n" + markdown_table(summary))
    shown = [r for r in runs if main_policies is None or r.policy in main_policies]
    plot_memory(shown, out / "memory.png", title)
    plot_hit_rate(shown, config, out / "hitrate.png", title)
    plot_tradeoff(summary, out / "tradeoff.png", title, limit)
    for name, file in (("ratio", "rule.png"), ("adaptive", "adaptive.png")):
        rule = next((r for r in runs if r.policy.split(":")[0] == name), None)
        if rule is not None and len(rule.decisions):
            plot_rule(rule, out / file, title)
    return summary


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _hours(t: pd.Series, start: float) -> pd.Series:
    return (t - start) / 3600


def plot_memory(runs: Sequence[PolicyRun], path: Path, title: str) -> None:
    """Per policy: allocated, required (true and estimated), surplus; restarts as ticks."""
    plt = _pyplot()
    fig, axes = plt.subplots(len(runs), 1, figsize=(11, 1.9 * len(runs) + 0.8), sharex=True,
                             squeeze=False, dpi=100)
    start = min(float(r.series["time"].min()) for r in runs if len(r.series))
    top = max(float(totals(r.series)["allocated_bytes"].max()) for r in runs) / MIB
    for ax, run in zip(axes[:, 0], runs, strict=True):
        t = totals(run.series)
        x = _hours(t["time"], start)
        ax.fill_between(x, t["required_true"] / MIB, t["allocated_bytes"] / MIB,
                        color="tab:red", alpha=0.15, lw=0, label="surplus (true)")
        ax.plot(x, t["allocated_bytes"] / MIB, color="tab:blue", lw=1.2, label="allocated")
        ax.plot(x, t["required_true"] / MIB, color="tab:green", lw=1, label="required (true)")
        ax.plot(x, t["required_est"] / MIB, color="black", lw=0.8, ls=":",
                label="required (estimated)")
        restarts = x[t["restarted"] > 0]
        if len(restarts):
            ax.plot(restarts, np.full(len(restarts), top * 1.02), "v", color="tab:purple",
                    ms=4, label="restart")
        ax.set_ylim(0, top * 1.08)
        ax.set_ylabel("MiB")
        ax.set_title(f"{run.policy}: {int(run.series['restarted'].sum())} restarts", fontsize=9,
                     loc="left")
        ax.grid(alpha=0.25)
    axes[0, 0].legend(loc="upper right", fontsize=7, ncol=5)
    axes[-1, 0].set_xlabel("time [h]")
    fig.suptitle(f"{title}: memory of all instances", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_hit_rate(runs: Sequence[PolicyRun], config: ExperimentConfig, path: Path,
                  title: str) -> None:
    """Hit rate per `hit_window_s` window, one line per policy."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 3.6), dpi=100)
    start = min(float(r.series["time"].min()) for r in runs if len(r.series))
    for run in runs:
        t = totals(run.series)
        window = ((t["time"] - start) // config.hit_window_s).astype("int64")
        w = t.groupby(window)[["hits", "misses"]].sum()
        w = w[(w["hits"] + w["misses"]) >= config.min_window_requests]
        ax.plot(w.index * config.hit_window_s / 3600, w["hits"] / (w["hits"] + w["misses"]),
                lw=1, label=run.policy)
    ax.set_ylim(0, 1.02)
    ax.set_ylabel(f"hit rate per {config.hit_window_s / 60:g} min")
    ax.set_xlabel("time [h]")
    ax.grid(alpha=0.25)
    ax.legend(fontsize=7, ncol=4, loc="lower right")
    ax.set_title(f"{title}\ncache hit rate", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_tradeoff(summary: pd.DataFrame, path: Path, title: str,
                  limit: pd.DataFrame | None = None) -> None:
    """Mean surplus (x) against auth requests relative to `none` (y): lower-left is better.

    ``limit``: the offline-optimal frontier (columns mean_surplus_mib, auth_vs_none), drawn as a
    staircase of what can be reached at each auth cost.
    """
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5), dpi=100)
    if limit is not None and len(limit):
        frontier = limit.sort_values("auth_vs_none")
        top = float(summary["auth_vs_none"].max())
        shown = frontier[frontier["auth_vs_none"] <= max(top, 1.0) * 1.02]
        ax.plot(shown["mean_surplus_mib"], shown["auth_vs_none"], color="black", lw=1.2,
                ls="--", marker=".", ms=4, label="limit (offline optimum)", zorder=1)
    kind = summary["policy"].map(policy_family)
    for family, color, marker in (("fixed", "tab:blue", "o"), ("threshold", "tab:orange", "s")):
        sweep = summary[kind == family].sort_values("mean_surplus_mib")
        if len(sweep):
            ax.plot(sweep["mean_surplus_mib"], sweep["auth_vs_none"], marker=marker, color=color,
                    lw=1, ms=5, label=f"{family} (sweep)")
            for _, row in sweep.iterrows():
                ax.annotate(row["policy"].split(":", 1)[1], (row["mean_surplus_mib"],
                            row["auth_vs_none"]), fontsize=7, xytext=(3, 3),
                            textcoords="offset points", color=color)
    for family, color, marker in (("adaptive", "tab:purple", "P"), ("ratio", "tab:red", "*"),
                                  ("oracle", "tab:green", "D"), ("none", "gray", "X")):
        point = summary[kind == family]
        if len(point):
            ax.plot(point["mean_surplus_mib"], point["auth_vs_none"], marker, color=color,
                    ms=12 if marker == "*" else 8, label=family, ls="none")
    warm = summary[kind == "warm"]
    if len(warm):
        ax.plot(warm["mean_surplus_mib"], warm["auth_vs_none"], "^", color="tab:cyan", ms=9,
                ls="none", label="warm restarts")
        for _, row in warm.iterrows():
            ax.annotate(row["policy"].replace(",mode=warm", "").replace(":mode=warm", ""),
                        (row["mean_surplus_mib"], row["auth_vs_none"]), fontsize=7,
                        xytext=(3, -9), textcoords="offset points", color="tab:cyan")
    ax.set_xlabel("mean surplus [MiB] (true, all instances)")
    ax.set_ylabel("auth-server requests relative to none")
    ax.grid(alpha=0.25)
    ax.legend(fontsize=8)
    ax.set_title(f"{title}\nsurplus against extra auth load (lower left is better)",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def busiest_window(series: pd.DataFrame, hours: float) -> tuple[float, float]:
    """The `hours`-long window (start, end; times of the series) around the peak allocation."""
    t = totals(series)
    peak = float(t["time"].to_numpy()[int(t["allocated_bytes"].to_numpy().argmax())])
    start = max(float(t["time"].min()), peak - hours * 3600 / 4)
    return start, min(float(t["time"].max()), start + hours * 3600)


def plot_rule(run: PolicyRun, path: Path, title: str, hours: float = 8.0) -> None:
    """A rule (ratio, adaptive) at work on its busiest instance: P, required, surplus, baseline.

    Reads the run's series (allocated, required_est, restarted) and its decisions (the
    baseline the rule compares with, once learned), around the peak allocation.
    """
    plt = _pyplot()
    busiest = run.series.groupby("instance")["allocated_bytes"].max().idxmax()
    s = run.series[run.series["instance"] == busiest]
    d = run.decisions[run.decisions["instance"] == busiest]
    start, end = busiest_window(s, hours)
    s = s[(s["time"] >= start) & (s["time"] <= end)]
    d = d[(d["time"] >= start) & (d["time"] <= end)]
    fig, ax = plt.subplots(figsize=(11, 4.2), dpi=100)
    x = (s["time"] - start) / 3600
    kib = 1024
    ax.plot(x, s["allocated_bytes"] / kib, color="tab:blue", lw=1.5, label="P: allocated")
    ax.plot(x, s["required_est"] / kib, color="black", lw=1, label="R: required (estimated)")
    ax.plot(x, (s["allocated_bytes"] - s["required_est"]) / kib, color="tab:red", lw=1,
            label="S: surplus (estimated)")
    ax.plot(x, s["required_true"] / kib, color="tab:green", lw=0.8, ls="--",
            label="required (true, not seen by the rule)")
    if "baseline_bytes" in d and d["baseline_bytes"].notna().any():
        b = d.dropna(subset=["baseline_bytes"])
        ax.step((b["time"] - start) / 3600, b["baseline_bytes"] / kib, where="post",
                color="tab:purple", lw=1.2, ls="-.", label="baseline")
    for t in x[s["restarted"] > 0]:
        ax.axvline(t, color="tab:purple", lw=0.8, alpha=0.6)
    restarts = d[d["action"] == "restart"]
    if len(restarts):
        ax.plot((restarts["time"] - start) / 3600,
                restarts["allocated_bytes"] / kib, "v", color="tab:purple", ms=7,
                label="restart decision")
    ax.set_xlabel(f"time [h] from {pd.Timestamp(start, unit='s'):%Y-%m-%d %H:%M} (UTC)")
    ax.set_ylabel("KiB")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.25)
    ax.legend(fontsize=7, loc="upper right")
    ax.set_title(f"{title}: the {run.policy.split(':')[0]} rule on {busiest}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
