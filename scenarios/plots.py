"""Plots of traces: request rate and tokens over time (PNG via matplotlib's Agg canvas).

No pyplot and no global backend switch: figures are plain :class:`matplotlib.figure.Figure`
objects, which render with Agg when saved to PNG, so this works headless and in threads.
"""

from __future__ import annotations

from datetime import datetime, timedelta
from pathlib import Path

import matplotlib.dates as mdates
import numpy as np
import pandas as pd
from matplotlib.backend_bases import FigureCanvasBase
from matplotlib.figure import Figure

from scenarios.eclog import EClogColumns, EClogConvertParams, eclog_to_trace, read_eclog
from scenarios.trace import ScenarioError, Trace, live_tokens


def rates(trace: Trace, bin_seconds: float = 60.0) -> pd.DataFrame:
    """Per bin of ``bin_seconds``: ``requests`` (requests and logouts), ``logins``.

    Index ``time``: the bin's start in trace seconds.
    """
    df = trace.to_frame()
    n_bins = int(trace.duration // bin_seconds) + 1
    bins = (df["time"] // bin_seconds).astype("int64")
    traffic = np.bincount(bins[df["kind"] != "login"], minlength=n_bins)
    logins = np.bincount(bins[df["kind"] == "login"], minlength=n_bins)
    index = pd.Index(np.arange(n_bins) * bin_seconds, name="time")
    return pd.DataFrame({"requests": traffic, "logins": logins}, index=index)


def plot_trace(
    trace: Trace,
    out: str | Path,
    *,
    ttl: float = 600.0,
    bin_seconds: float = 60.0,
    title: str | None = None,
) -> Path:
    """Two panels: requests and logins per bin; logged-in tokens and tokens within ``ttl`` of
    their last use (≈ what the filter's cache holds). Writes ``out`` (PNG) and returns it."""
    r = rates(trace, bin_seconds)
    live = live_tokens(trace)
    cached = live_tokens(trace, linger=ttl)
    start = trace.meta.start

    def x(seconds: pd.Index) -> list[datetime] | np.ndarray:
        if start is None:
            return np.asarray(seconds, dtype=np.float64) / 3600.0
        return [start + timedelta(seconds=float(s)) for s in seconds]

    fig = Figure(figsize=(12, 6.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    per = "minute" if bin_seconds == 60 else f"{bin_seconds:g} s"
    top.fill_between(x(r.index), r["requests"], step="post", color="tab:blue", alpha=0.35, lw=0)
    top.step(
        x(r.index),
        r["requests"],
        where="post",
        color="tab:blue",
        lw=0.8,
        label=f"requests per {per}",
    )
    top.step(
        x(r.index),
        r["logins"],
        where="post",
        color="tab:orange",
        lw=0.8,
        label=f"logins (new sessions) per {per}",
    )
    top.set_ylabel(f"events per {per}")
    top.legend(loc="upper left", frameon=False)
    top.grid(alpha=0.3)
    top.set_ylim(bottom=0)

    bottom.step(
        x(cached.index),
        cached.to_numpy(),
        where="post",
        color="tab:red",
        lw=1.2,
        label=f"tokens used within the last {ttl:g} s (≈ cached entries)",
    )
    bottom.step(
        x(live.index),
        live.to_numpy(),
        where="post",
        color="tab:green",
        lw=1.0,
        label="sessions in progress (login → last request or logout)",
    )
    bottom.set_ylabel("tokens")
    bottom.legend(loc="upper left", frameon=False)
    bottom.grid(alpha=0.3)
    bottom.set_ylim(bottom=0)
    if start is None:
        bottom.set_xlabel("hours since the trace start")
    else:
        locator = mdates.AutoDateLocator(minticks=6, maxticks=14)  # type: ignore[no-untyped-call]
        bottom.xaxis.set_major_locator(locator)
        formatter = mdates.ConciseDateFormatter(locator)  # type: ignore[no-untyped-call]
        bottom.xaxis.set_major_formatter(formatter)
        bottom.set_xlabel("time (UTC)")
    counts = trace.counts()
    fig.suptitle(
        title
        or f"{trace.meta.name}: {counts['request'] + counts['logout']:,} requests, "
        f"{counts['login']:,} logins, {len(trace.users()):,} users",
        fontsize=12,
    )
    path = Path(out)
    fig.savefig(path, dpi=110)
    return path


def check_plot_path(out: str | Path, name: str = "--out") -> None:
    """Refuse a file name whose suffix matplotlib cannot write (no suffix: PNG)."""
    suffix = Path(out).suffix
    formats = FigureCanvasBase.get_supported_filetypes()
    if suffix and suffix[1:].lower() not in formats:
        raise ScenarioError(f"{name}: matplotlib cannot write a {suffix} file; use one of "
                            f"{', '.join('.' + f for f in sorted(formats))}")


def plot_eclog(
    csv: str | Path,
    out: str | Path,
    *,
    columns: EClogColumns | None = None,
    params: EClogConvertParams | None = None,
    bin_seconds: float = 60.0,
) -> Path:
    """Plot an EClog-format CSV (e.g. a generated day): read, map to a trace, plot."""
    p = params or EClogConvertParams(name=Path(csv).stem)
    trace = eclog_to_trace(read_eclog(csv, columns), p)
    return plot_trace(trace, out, ttl=p.ttl, bin_seconds=bin_seconds)
