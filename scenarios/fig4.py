"""The paper's basic experiment (Fig. 4) in virtual time: CSV series and a plot.

1024 users log in at one per second, each followed by one request through the proxy (a cache
miss, so the filter caches the token); then 1024 logouts at one per second evict them. The
filter's live bytes (ground truth) rise and fall with the tokens; its allocated memory rises
and stays at its peak. The TTL is set longer than the experiment so that only logouts evict,
as in the paper's filter.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from addons.proxywasm import WASM_PAGE_SIZE
from scenarios.basic import BasicParams, basic_trace
from scenarios.simulate import SimConfig, SimResult, simulate

FIG4_COLUMNS = ["t", "tokens", "live_bytes", "allocated_pages", "allocated_bytes"]


def fig4_series(result: SimResult) -> pd.DataFrame:
    """Per sample: seconds since start, cached tokens, live bytes, allocated pages and bytes.

    Reads `time`, `live_entries`, `live_bytes`, `allocated_pages`, `allocated_bytes` of the
    samples of the single instance the basic experiment uses.
    """
    s = result.samples
    return pd.DataFrame({
        "t": (s["time"] - result.start).round(3),
        "tokens": s["live_entries"],
        "live_bytes": s["live_bytes"],
        "allocated_pages": s["allocated_pages"],
        "allocated_bytes": s["allocated_bytes"],
    })[FIG4_COLUMNS]


def run_fig4(count: int = 1024, interval: float = 1.0, entry_size: int = 1024,
             progress: bool = False) -> pd.DataFrame:
    """Run the basic experiment through the real filter and host; return the series."""
    trace = basic_trace(BasicParams(count=count, interval=interval))
    ttl = int(2 * count * interval + 60)  # only logouts evict
    config = SimConfig(
        plugin_configuration=f'{{"ttl_seconds": {ttl}, "entry_size": {entry_size}}}',
        sample_interval=interval,
    )
    return fig4_series(simulate(trace, config, progress=progress))


def fig4_title(series: pd.DataFrame, logins: int | None = None) -> str:
    """The plot's title: `logins` as sent, else the peak of cached tokens."""
    n = logins if logins is not None else int(series["tokens"].max())
    return f"Basic experiment: {n} logins then {n} logouts — allocated memory stays at its peak"


def plot_fig4(series: pd.DataFrame, path: Path, logins: int | None = None) -> None:
    """Allocated memory and live bytes (KiB, left) and cached tokens (right) over time.

    `logins`: the logins (and logouts) the experiment sent, for the title; by default the
    peak of cached tokens, which a sample taken just after the last login can miss by one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.8), dpi=110)
    minutes = series["t"] / 60
    ax.plot(minutes, series["allocated_bytes"] / 1024, color="tab:blue", lw=2,
            label="allocated (pages × 64 KiB)")
    ax.plot(minutes, series["live_bytes"] / 1024, color="tab:green", lw=1.5, ls="--",
            label="required: the filter's live bytes")
    ax.fill_between(minutes, series["live_bytes"] / 1024, series["allocated_bytes"] / 1024,
                    color="tab:red", alpha=0.12, label="surplus")
    ax.set_xlabel("time [min]")
    ax.set_ylabel("memory [KiB]")
    ax.set_ylim(bottom=0)
    right = ax.twinx()
    right.plot(minutes, series["tokens"], color="tab:orange", lw=1, label="cached tokens")
    right.set_ylabel("cached tokens")
    right.set_ylim(bottom=0)
    handles = ax.get_legend_handles_labels()[0] + right.get_legend_handles_labels()[0]
    ax.legend(handles=handles, loc="upper left", fontsize=8)
    ax.set_title(fig4_title(series, logins), fontsize=10)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def summarize_fig4(series: pd.DataFrame) -> str:
    """A few lines a person reads: peak, end state, surplus at the end."""
    peak = series.iloc[int(series["allocated_bytes"].to_numpy().argmax())]
    end = series.iloc[-1]
    return "\n".join([
        f"peak tokens            {int(series['tokens'].max())}",
        f"peak allocated         {int(peak['allocated_pages'])} pages "
        f"({int(peak['allocated_bytes']) // 1024} KiB)",
        f"allocated at the end   {int(end['allocated_pages'])} pages "
        f"({int(end['allocated_bytes']) // 1024} KiB) with {int(end['tokens'])} tokens",
        f"live bytes at the end  {int(end['live_bytes'])} (surplus "
        f"{(int(end['allocated_bytes']) - int(end['live_bytes'])) // 1024} KiB, "
        f"{100 * (1 - end['live_bytes'] / end['allocated_bytes']):.0f}% of allocated)",
        f"page size              {WASM_PAGE_SIZE} bytes",
    ])
