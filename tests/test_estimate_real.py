"""The estimator on series from the real filter under the real host (virtual time).

The manager reads only allocated pages, requests and outbound calls; here its estimate of the
required memory is compared with the filter's own ground truth (live bytes + base), on the
paper's basic experiment and on a rise-peak-fall load. The errors are printed (`-s`) and bounded.
"""

from __future__ import annotations

import numpy as np
import pytest

from manager.estimate import EstimatorParams
from scenarios.basic import BasicParams, basic_trace
from scenarios.experiment import policy_series
from scenarios.simulate import SimConfig, simulate
from scenarios.trace import Event, Trace


def rise_peak_fall() -> Trace:
    """New users arrive at a rate that rises for 20 min, peaks, and falls for 20 min; each
    comes back a few times (hits), and the entry expires a TTL after the login.

    The rise starts at once: the estimator learns k and the TTL only from growth and expiry
    it sees in its 15-min measurement period (paper §3). A load that barely grows then leaves
    it on its defaults (TTL 600 s, k 63) and it overestimates a shorter TTL's cache.
    """
    rng = np.random.default_rng(3)
    events = []
    t, u = 0.0, 0
    while t < 3600:
        rate = 0.3 + 2.7 * max(0.0, 1 - abs(t - 1200) / 1200)  # users per second
        t += rng.exponential(1 / rate)
        user, token = f"u{u}", f"t{u}"
        events.append(Event.login(t, user, token, "shop"))
        for k in range(int(rng.integers(1, 6))):
            events.append(Event.request(t + 15 * k, user, token, "shop"))
        u += 1
    return Trace.from_events(events)


def error_kib(trace: Trace, config: SimConfig) -> tuple[float, float]:
    """Mean absolute error of the estimated required memory (KiB), and the true peak (KiB)."""
    series = policy_series(simulate(trace, config).samples, EstimatorParams())
    est = series.dropna(subset=["required_est"])
    err = (est["required_est"] - est["required_true"]).abs().mean() / 1024
    return float(err), float(series["required_true"].max() / 1024)


@pytest.mark.parametrize(("name", "trace", "config"), [
    ("basic", basic_trace(BasicParams(count=1024)),
     SimConfig(sample_interval=1.0, plugin_configuration='{"ttl_seconds": 600}')),
    ("rise-peak-fall", rise_peak_fall(),
     SimConfig(sample_interval=5.0, plugin_configuration='{"ttl_seconds": 300}')),
])
def test_estimate_tracks_the_filters_ground_truth(name, trace, config) -> None:
    mae, peak = error_kib(trace, config)
    print(f"\n{name}: required memory, mean absolute error {mae:.1f} KiB "
          f"({100 * mae / peak:.1f}% of the true peak, {peak:.0f} KiB)")
    assert peak > 256  # the load really fills the cache
    assert mae < 0.1 * peak
