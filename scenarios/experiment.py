"""Compare restart policies on the same trace, in virtual time (SPEC §6, §7).

Every policy runs in its own process over the same trace: the real filter under the real host
on a virtual clock (`scenarios.simulate`), an in-process auth server, a sample of every instance
every `sample_interval`, and the manager's own policy code called exactly as the daemon calls it
(`manager.policies.decide` on the new samples every `decision_interval`). Each run yields a time
series per instance with the ground truth beside it; `summarize` turns the series into the
metrics of SPEC §7, and `scenarios.report` into tables and plots.

Ground truth: the filter's `auth_cache.live_bytes` gauge (bytes of live cache entries) plus the
instance's base (its smallest allocation in the run: a fresh instance) is the *true required*
memory; allocated − true required is the *true surplus*. The ratio policy never sees either.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import copyreg
import ctypes
import functools
import logging
import math
import multiprocessing
import os
import pickle
import signal
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, NoReturn

import numpy as np
import pandas as pd

from addons.proxywasm import FilterModule
from manager.estimate import OBSERVABLE_COLUMNS, OPTIONAL_COLUMNS, EstimatorParams, estimate
from manager.policies import (
    Decision,
    PolicyState,
    Samples,
    decide,
    decisions_frame,
    initial_state,
    parse_policy,
)
from scenarios.simulate import Restart, SimConfig, SimResult, Simulation
from scenarios.trace import Trace

logger = logging.getLogger(__name__)

MANAGER_COLUMNS = (*OBSERVABLE_COLUMNS, *OPTIONAL_COLUMNS, "live_bytes")
"""The sample columns a manager pass reads (`live_bytes` for the oracle): all its controller
gets in an experiment."""

SERIES_COLUMNS = [
    "time", "instance", "generation", "allocated_bytes", "required_true", "surplus_true",
    "required_est", "hits", "misses", "denied", "outbound", "restarted", "live_bytes",
]
"""Per sample and instance. `outbound` is the outbound calls made since the previous sample;
`restarted` is 1 on the first sample of a generation the policy started; `live_bytes` is the
filter's ground-truth gauge."""


@dataclass(frozen=True)
class ExperimentConfig:
    """How every policy of an experiment runs and is judged."""

    sim: SimConfig = field(default_factory=lambda: SimConfig(sample_interval=5.0,
                                                             decision_interval=60.0))
    """Samples every 5 s; the manager's pass every 60 s (its trend window, and how long it waits
    before asking again for a restart: shorter passes only cost time in a simulation)."""
    host_memory_mib: float = 1024.0
    """Host memory for 'instances that fit' (SPEC §7)."""
    hit_window_s: float = 300.0
    """Width of the windows in which the worst hit rate is sought."""
    min_window_requests: int = 20
    """Windows with fewer authenticated requests are not judged (too few to mean anything)."""
    warmup_s: float = 600.0
    """Windows starting before this much time has passed are not judged: every policy starts
    with an empty cache, so the first TTL says nothing about restarts."""


@dataclass
class PolicyRun:
    """One policy over one trace."""

    policy: str
    series: pd.DataFrame
    decisions: pd.DataFrame
    verify_requests: int  # the auth server's /verify requests (not the summary's auth_requests)
    elapsed_s: float
    requests: int


# --------------------------------------------------------------------------------------------
# Running
# --------------------------------------------------------------------------------------------


def run_policy(trace: Trace, spec: str, config: ExperimentConfig) -> PolicyRun:
    """Run `trace` through a fresh host with policy `spec` deciding restarts."""
    return run_shared(trace, [spec], config)[0]


LATER_CHECKPOINTS = 8
"""How many points of `none`'s run a shared run with later policies keeps (see
:func:`run_shared`): one just before the first pass, then evenly over the trace."""


def run_shared(trace: Trace, specs: Sequence[str], config: ExperimentConfig,
               later: Callable[[PolicyRun], Sequence[str]] | None = None,
               meanwhile: Callable[[PolicyRun], None] | None = None) -> list[PolicyRun]:
    """Run every policy of `specs` over `trace`, each exactly as alone, sharing the simulation
    until the policy's first restart.

    Until a policy restarts an instance, its run is `none`'s run: one simulation goes on under
    every policy's decisions (each sees the same samples and keeps its own state). When one
    asks for its first restart the process forks; the child restarts and goes on with that
    policy alone (sending its run back through a pipe), the parent without it. The shared part
    stops once nobody needs it: with `none` among `specs` it runs to the end. The specs must
    restart in one mode (`mode=warm` journals from the start). Linux (fork); the standard set
    runs its policies this way.

    `later` gives more policies once `none`'s run is known (the standard set's thresholds and
    oracle scale with its peak); `none` must be among `specs`. Their runs follow those of
    `specs`, each exactly as alone too. While `none` runs, the process forks
    :data:`LATER_CHECKPOINTS` times, each child waiting just before a pass. Once `none` is done,
    each later policy's passes are replayed over its samples, the same inputs giving the same
    decisions, up to its first restart; the child waiting at the last point before it goes on
    with the policy from there (its state so far sent along). A later policy that never
    restarts has `none`'s run, with its own decisions.

    `meanwhile` is called with `none`'s run while the forked runs go on (this process would
    only wait for them): the standard set computes the trace's limit there.
    """
    if (later is not None or meanwhile is not None) and "none" not in specs:
        raise ValueError("later policies need `none` among the specs: they start from its run")
    branches = [_Branch(spec) for spec in specs if spec != "none"]
    modes = {getattr(b.params, "restart_mode", config.sim.restart_mode) for b in branches}
    if len(modes) > 1:
        raise ValueError(f"policies restarting warm and cold cannot share a run: {list(specs)}")
    # The policies' restart mode (`mode=warm`) decides how the simulated host restarts; the
    # run's metrics come from the samples, so no row per request is kept.
    sim = replace(config.sim, restart_mode=modes.pop() if modes else config.sim.restart_mode,
                  request_log=False, controller_columns=MANAGER_COLUMNS)
    shared = _Shared(branches, keep_trunk="none" in specs)
    if later is not None:
        shared.keep_checkpoints(trace.duration / LATER_CHECKPOINTS)
    t0 = time.perf_counter()
    result: SimResult | None = None
    try:
        result = Simulation(sim, filter_module(sim.filter_path)).run(
            trace, shared if branches or later is not None else None)
    except _TrunkDone:
        pass
    except BaseException:
        if shared.write_fd is not None:  # a forked child never returns to its caller
            shared.send_and_exit(("error", traceback.format_exc()))
        shared.abandon()
        raise
    elapsed = time.perf_counter() - t0
    runs: dict[str, PolicyRun] = {}
    if shared.write_fd is not None:
        if shared.group:  # a checkpoint's child: its policies' runs, and its own forks'
            try:
                if result is not None:
                    runs.update((b.spec, b.run(result, elapsed)) for b in shared.branches)
                runs.update(shared.collect())
            except BaseException:
                shared.send_and_exit(("error", traceback.format_exc()))
            shared.send_and_exit(("ok", runs))
        assert result is not None
        branch = shared.branches[0]
        shared.send_and_exit(("ok", branch.run(result, elapsed)))
    later_specs: list[str] = []
    if result is not None:
        if shared.keep_trunk:
            runs["none"] = _Branch("none").run(result, elapsed)
        try:
            if later is not None:
                later_specs = [spec for spec in dict.fromkeys(later(runs["none"]))
                               if spec not in specs]
                runs.update(shared.resume_later(later_specs, result, elapsed))
            if meanwhile is not None:
                meanwhile(runs["none"])
        except BaseException:
            shared.abandon()
            raise
        runs.update((b.spec, b.run(result, elapsed)) for b in shared.branches)
    runs.update(shared.collect())
    return [runs[spec] for spec in (*specs, *later_specs)]


class _TrunkDone(Exception):
    """Every policy of a shared run has gone its own way, and `none` is not wanted."""


class _Branch:
    """One policy of a shared run: its parameters, state and decisions so far."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.params = parse_policy(spec)
        self.state = initial_state(self.params)
        self.made: list[Decision] = []

    def decide(self, new: Samples, now: float) -> list[Restart]:
        """One manager pass; the instances to restart, each with its decision's mode."""
        decisions, self.state = decide(self.state, new, now, self.params)
        self.made.extend(decisions)
        return [(d.instance, d.mode) for d in decisions if d.action == "restart"]

    @classmethod
    def resumed(cls, spec: str, state: PolicyState, made: list[Decision]) -> _Branch:
        """The branch of `spec` with its state and decisions so far."""
        branch = cls(spec)
        branch.state, branch.made = state, made
        return branch

    def run(self, result: SimResult, elapsed: float) -> PolicyRun:
        """This policy's run, from the simulation it ended in."""
        estimator = getattr(self.params, "estimator", None) or EstimatorParams()
        return PolicyRun(
            policy=self.spec,
            series=policy_series(result.samples, estimator),
            decisions=decisions_frame(self.made),
            verify_requests=result.verify_requests,
            elapsed_s=elapsed,
            requests=result.request_count,
        )


@dataclass
class _Checkpoint:
    """A forked copy of the trunk waiting just before pass `index` (see :func:`run_shared`)."""

    index: int
    pid: int
    command_fd: int  # where it reads `later` (an empty list: nothing to run, it exits)
    result_fd: int  # where its runs come back
    later: list[tuple[str, PolicyState, list[Decision]]] = field(default_factory=list)
    """The later policies it goes on with: spec, state and decisions before this pass."""


class _Shared:
    """The controller of a shared run: every branch decides on the new samples; a branch's
    first restart forks it off (see :func:`run_shared`)."""

    def __init__(self, branches: list[_Branch], keep_trunk: bool) -> None:
        self.branches = branches
        self.keep_trunk = keep_trunk
        self.children: list[tuple[str, int, int]] = []  # spec, pid, read end of its pipe
        self.write_fd: int | None = None  # in a forked child: where its run goes
        self.group = False  # a checkpoint's child: it sends every run it and its forks made
        self.passes: list[tuple[Samples, float]] = []  # recorded for later policies
        self.checkpoints: list[_Checkpoint] = []
        self.checkpoint_every: float | None = None  # seconds of samples between checkpoints
        self.next_checkpoint = -math.inf

    def keep_checkpoints(self, every_s: float) -> None:
        """Record every pass, and fork a checkpoint before the first pass and every `every_s`
        seconds of sample time after it."""
        self.checkpoint_every = max(every_s, 1e-9)

    def __call__(self, new: Samples, now: float) -> list[Restart]:
        if self.checkpoint_every is not None:
            if now >= self.next_checkpoint:
                self.next_checkpoint = now + self.checkpoint_every
                self._checkpoint()  # in a checkpoint's child: returns with later branches
            if self.checkpoint_every is not None:
                self.passes.append((new, now))
        for branch in list(self.branches):
            restarts = branch.decide(new, now)
            if not restarts:
                continue
            if len(self.branches) == 1 and not self.keep_trunk:
                return restarts  # nobody else needs this process: it goes on as this policy
            if self._fork(branch):
                return restarts
        if not self.branches and not self.keep_trunk:
            raise _TrunkDone
        return []

    def _held_fds(self) -> list[int]:
        """The pipe ends this process holds for others (a fork closes its copies)."""
        fds = [fd for _, _, fd in self.children]
        fds += [fd for c in self.checkpoints for fd in (c.command_fd, c.result_fd)]
        return fds + ([self.write_fd] if self.write_fd is not None else [])

    def _become_child(self, branches: list[_Branch], write_fd: int, group: bool) -> None:
        for fd in self._held_fds():
            os.close(fd)
        self.branches, self.keep_trunk, self.write_fd, self.group = (branches, False, write_fd,
                                                                      group)
        self.children, self.checkpoints, self.passes = [], [], []
        self.checkpoint_every = None

    def _fork(self, branch: _Branch) -> bool:
        """Fork `branch` off; True in the child, which goes on with it alone."""
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            _die_with_parent()
            self._become_child([branch], write_fd, group=False)
            return True
        os.close(write_fd)
        self.branches.remove(branch)
        self.children.append((branch.spec, pid, read_fd))
        return False

    def _checkpoint(self) -> None:
        """Fork a copy of the trunk that waits here for later policies to go on with (it exits
        if none are sent); in the parent, return at once."""
        command_read, command_write = os.pipe()
        result_read, result_write = os.pipe()
        index = len(self.passes)
        pid = os.fork()
        if pid != 0:
            os.close(command_read)
            os.close(result_write)
            self.checkpoints.append(_Checkpoint(index, pid, command_write, result_read))
            return
        os.close(command_write)
        os.close(result_read)
        _die_with_parent()
        self._become_child([], result_write, group=True)
        with os.fdopen(command_read, "rb") as f:
            try:
                sent = pickle.load(f)
            except EOFError:  # the trunk failed, or ended without later policies
                sent = None
        if not sent:
            os._exit(0)
        self.branches = [_Branch.resumed(spec, state, made) for spec, state, made in sent]

    def resume_later(self, specs: Sequence[str], result: SimResult,
                     elapsed: float) -> dict[str, PolicyRun]:
        """Start each later policy from the last checkpoint before its first restart (its
        passes so far replayed here); the runs of those that never restart."""
        at_pass = {c.index: c for c in self.checkpoints}
        runs: dict[str, PolicyRun] = {}
        for spec in specs:
            branch = _Branch(spec)
            last: tuple[_Checkpoint, PolicyState, int] | None = None
            restarted = False
            for i, (new, now) in enumerate(self.passes):
                if i in at_pass:
                    last = (at_pass[i], branch.state, len(branch.made))
                if branch.decide(new, now):
                    restarted = True
                    break
            if not restarted:
                runs[spec] = branch.run(result, elapsed)
                continue
            assert last is not None  # a checkpoint waits before the first pass
            checkpoint, state, made = last
            checkpoint.later.append((spec, state, branch.made[:made]))
        for c in self.checkpoints:
            with os.fdopen(c.command_fd, "wb") as f:
                c.command_fd = -1
                _state_pickler(f).dump(c.later)
            if not c.later:
                os.close(c.result_fd)
                os.waitpid(c.pid, 0)
        self.checkpoints = [c for c in self.checkpoints if c.later]
        self.passes = []
        return runs

    def abandon(self) -> None:
        """The trunk failed: stop its forked runs and checkpoints, whatever they are doing."""
        forked: list[tuple[int, tuple[int, ...]]] = [(pid, (fd,)) for _, pid, fd in self.children]
        forked += [(c.pid, (c.command_fd, c.result_fd)) for c in self.checkpoints]
        for pid, fds in forked:
            for fd in fds:
                with contextlib.suppress(OSError):
                    os.close(fd)
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
        self.children, self.checkpoints = [], []

    def send_and_exit(self, payload: tuple[str, Any]) -> NoReturn:
        """In a child: send the outcome to the parent and exit, whatever happens."""
        code = 1
        try:
            assert self.write_fd is not None
            with os.fdopen(self.write_fd, "wb") as f:
                pickle.dump(payload, f, protocol=pickle.HIGHEST_PROTOCOL)
            code = 0 if payload[0] == "ok" else 1
        finally:
            os._exit(code)

    def collect(self) -> dict[str, PolicyRun]:
        """The forked children's runs, and the checkpoints' (waits for each)."""
        runs: dict[str, PolicyRun] = {}
        failed: list[str] = []
        waiting = [(spec, pid, fd, False) for spec, pid, fd in self.children]
        waiting += [(", ".join(spec for spec, _, _ in c.later), c.pid, c.result_fd, True)
                    for c in self.checkpoints]
        for spec, pid, fd, several in waiting:
            with os.fdopen(fd, "rb") as f:
                try:
                    status, payload = pickle.load(f)
                except EOFError:
                    status, payload = "error", "it exited without sending its run"
            os.waitpid(pid, 0)
            if status != "ok":
                failed.append(f"{spec}: {payload}")
            elif several:
                runs.update(payload)
            else:
                runs[spec] = payload
        self.children, self.checkpoints = [], []
        if failed:
            raise RuntimeError("a forked policy run failed: " + "; ".join(failed))
        return runs


def _state_pickler(f: Any) -> pickle.Pickler:
    """A pickler for policy states: their read-only mappings go as the dicts they wrap."""
    pickler = pickle.Pickler(f, protocol=pickle.HIGHEST_PROTOCOL)
    pickler.dispatch_table = {**copyreg.dispatch_table,
                              MappingProxyType: lambda m: (_read_only, (dict(m),))}
    return pickler


def _read_only(mapping: dict[str, Any]) -> MappingProxyType[str, Any]:
    return MappingProxyType(mapping)


def _die_with_parent() -> None:
    """Linux: a forked run ends with the process it came from (an interrupted experiment
    leaves nothing running)."""
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


@functools.cache
def filter_module(path: Path) -> FilterModule:
    """The filter compiled once per process (about 0.6 s each time otherwise); every run still
    gets fresh instances."""
    return FilterModule.from_file(path)


def policy_family(policy: str) -> str:
    """A policy spec's family for tables and plots: its name (`fixed`, `threshold`, `none` …),
    or `warm` for any policy whose restarts run warm (`…,mode=warm`, `adaptive:mode=warm`),
    which must not join the cold sweeps and curves."""
    name, _, rest = policy.partition(":")
    options = {item.strip().lower() for item in rest.split(",")}
    return "warm" if "mode=warm" in options else name.strip().lower()


def run_in_worker(args: tuple[Path, str, ExperimentConfig]) -> PolicyRun:
    """`run_policy` on a trace file (what a worker process runs)."""
    trace_path, spec, config = args
    return run_policy(load_trace(trace_path), spec, config)


def run_shared_in_worker(args: tuple[Path, Sequence[str], ExperimentConfig]) -> list[PolicyRun]:
    """`run_shared` on a trace file (what a worker process runs)."""
    trace_path, specs, config = args
    return run_shared(load_trace(trace_path), specs, config)


def load_trace(path: Path) -> Trace:
    """The trace in `path`, parsed once per process while the file is unchanged: a worker runs
    many policies over the same few traces, and parsing one costs a second or two."""
    stat = path.stat()
    return _read_trace(path.resolve(), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=4)
def _read_trace(path: Path, _mtime_ns: int, _size: int) -> Trace:
    return Trace.read_jsonl(path)


def run_policies(trace_path: Path, specs: Sequence[str], config: ExperimentConfig,
                 jobs: int | None = None, progress: bool = False) -> list[PolicyRun]:
    """Run every policy on the trace, one process each, `jobs` at a time (default: cores)."""
    for spec in specs:
        parse_policy(spec)  # fail before starting anything
    jobs = max(1, min(jobs or multiprocessing.cpu_count(), len(specs)))
    work = [(trace_path, spec, config) for spec in specs]
    runs: dict[str, PolicyRun] = {}
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=len(specs), unit="policy", desc=trace_path.stem)
    ctx = multiprocessing.get_context("spawn" if jobs > 1 else "fork")
    if jobs == 1:
        for item in work:
            run = run_in_worker(item)
            runs[run.policy] = run
            if bar is not None:
                bar.set_postfix_str(f"{run.policy}: {run.requests / run.elapsed_s:,.0f} req/s")
                bar.update()
    else:
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=ctx) as pool:
            futures = {pool.submit(run_in_worker, item): item[1] for item in work}
            for future in concurrent.futures.as_completed(futures):
                run = future.result()
                runs[run.policy] = run
                if bar is not None:
                    bar.set_postfix_str(f"{run.policy}: {run.requests / run.elapsed_s:,.0f} req/s")
                    bar.update()
    if bar is not None:
        bar.close()
    return [runs[spec] for spec in specs]


# --------------------------------------------------------------------------------------------
# Pure: series and metrics
# --------------------------------------------------------------------------------------------


def policy_series(samples: pd.DataFrame, estimator: EstimatorParams) -> pd.DataFrame:
    """The per-sample series of one run (columns: :data:`SERIES_COLUMNS`).

    Reads the simulation's samples (time, instance, generation, allocated_pages/bytes,
    outbound, live_bytes, hits, misses, denied). `required_est` comes from the manager's
    estimator, which reads only the observable columns.
    """
    if samples.empty:
        return pd.DataFrame(columns=SERIES_COLUMNS)
    s = samples.sort_values(["instance", "time"], kind="stable").reset_index(drop=True)
    base = s.groupby("instance")["allocated_bytes"].transform("min")
    required_true = np.minimum(base + s["live_bytes"], s["allocated_bytes"])
    first_of_generation = s.groupby(["instance", "generation"]).cumcount() == 0
    first_generation = s.groupby("instance")["generation"].transform("min")
    restarted = first_of_generation & (s["generation"] > first_generation)
    outbound_delta = s.groupby(["instance", "generation"])["outbound"].diff()
    outbound_delta = outbound_delta.fillna(s["outbound"]).clip(lower=0)
    est = estimate(s, float(s["time"].max()), estimator)
    est = est[["instance", "generation", "time", "required_bytes"]]
    merged = s.assign(
        required_true=required_true,
        surplus_true=s["allocated_bytes"] - required_true,
        outbound=outbound_delta.astype("int64"),
        restarted=restarted.astype("int8"),
    ).merge(est, on=["instance", "generation", "time"], how="left", validate="one_to_one")
    merged["required_est"] = np.minimum(merged["required_bytes"], merged["allocated_bytes"])
    return merged[SERIES_COLUMNS]


def totals(series: pd.DataFrame) -> pd.DataFrame:
    """Per sample time, summed over instances: memory, hits, misses, outbound calls."""
    cols = ["allocated_bytes", "required_true", "surplus_true", "required_est", "hits",
            "misses", "denied", "outbound", "restarted"]
    return series.groupby("time", sort=True)[cols].sum().reset_index()


def summarize(series: pd.DataFrame, config: ExperimentConfig, policy: str = "") -> dict[str, Any]:
    """The metrics of SPEC §7 for one run, from its series alone.

    Samples are evenly spaced, so a time-weighted mean is the mean over sample times of the
    total over instances. Hit rate counts authenticated requests the filter decided (hits and
    misses); the worst window is the lowest hit rate among windows of `hit_window_s` with at
    least `min_window_requests` such requests, after the first `warmup_s`. Auth-server
    requests are the filter's outbound calls. 'Instances that fit' divides the host memory by
    the mean (or peak) allocated memory of one instance.
    """
    t = totals(series)
    n_instances = max(series["instance"].nunique(), 1)
    mib = 2**20
    hits, misses = int(series["hits"].sum()), int(series["misses"].sum())
    start = float(t["time"].min()) if len(t) else 0.0
    window = ((t["time"] - start) // config.hit_window_s).astype("int64")
    per_window = t.groupby(window)[["hits", "misses"]].sum()
    warm = per_window.index * config.hit_window_s >= config.warmup_s
    enough = (per_window["hits"] + per_window["misses"]) >= config.min_window_requests
    judged = per_window[warm & enough]
    worst = (judged["hits"] / (judged["hits"] + judged["misses"])).min() if len(judged) else np.nan
    known = series["required_est"].notna()
    err = (series.loc[known, "required_est"] - series.loc[known, "required_true"])
    mean_alloc_per_instance = t["allocated_bytes"].mean() / n_instances
    peak_alloc_per_instance = series.groupby("instance")["allocated_bytes"].max().mean()
    return {
        "policy": policy,
        "instances": n_instances,
        "mean_allocated_mib": t["allocated_bytes"].mean() / mib,
        "peak_allocated_mib": t["allocated_bytes"].max() / mib,
        "mean_required_mib": t["required_true"].mean() / mib,
        "mean_surplus_mib": t["surplus_true"].mean() / mib,
        "hit_rate": hits / (hits + misses) if hits + misses else np.nan,
        "worst_window_hit_rate": float(worst),
        "auth_requests": int(series["outbound"].sum()),
        "restarts": int(series["restarted"].sum()),
        "fit_on_average": config.host_memory_mib * mib / mean_alloc_per_instance,
        "fit_at_peak": config.host_memory_mib * mib / peak_alloc_per_instance,
        "estimator_mae_kib": float(err.abs().mean() / 1024) if len(err) else np.nan,
        "estimator_bias_kib": float(err.mean() / 1024) if len(err) else np.nan,
    }


def summary_table(runs: Sequence[PolicyRun], config: ExperimentConfig) -> pd.DataFrame:
    """One row per run, with auth-server requests relative to `none` when it ran."""
    rows = pd.DataFrame([summarize(r.series, config, r.policy) for r in runs])
    base = rows.loc[rows["policy"] == "none", "auth_requests"]
    rows["auth_vs_none"] = (
        rows["auth_requests"] / base.iloc[0] if len(base) and base.iloc[0] else np.nan
    )
    return rows


def with_sample_interval(config: ExperimentConfig, seconds: float) -> ExperimentConfig:
    """A copy of `config` sampling every `seconds`."""
    return replace(config, sim=replace(config.sim, sample_interval=seconds))
