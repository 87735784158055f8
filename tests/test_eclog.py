"""EClog: column mapping, reading, mapping to traces, the generator's statistics, plots, CLI."""

from __future__ import annotations

import io
import json
from dataclasses import replace
from datetime import date

import numpy as np
import pandas as pd
import pytest

from scenarios.__main__ import main
from scenarios.eclog import (
    NORMALISED,
    EClogColumns,
    EClogConvertParams,
    EClogError,
    EClogGenParams,
    Sale,
    check_generator_fits,
    eclog_events,
    eclog_to_trace,
    generate_eclog,
    generator_size,
    hourly_shape,
    parse_time,
    read_eclog,
    spike_density,
    visitors,
    write_eclog,
)
from scenarios.trace import Trace, sessions

HEADER = "IpId,UserId,TimeStamp,HttpMethod,Uri,HttpVersion,ResponseCode,Bytes,Referrer,UserAgent\n"


def csv(*rows: str, header: str = HEADER) -> io.StringIO:
    buf = io.StringIO(header + "".join(r + "\n" for r in rows))
    buf.name = "log.csv"
    return buf


def row(ip: str, user: str, stamp: str, uri: str = "/", method: str = "GET") -> str:
    return f"{ip},{user},{stamp},{method},{uri},HTTP/1.1,200,123,-,UA"


# -- the column mapping ----------------------------------------------------------------------


def test_columns_defaults_are_the_published_header() -> None:
    assert ",".join(EClogColumns().header()) + "\n" == HEADER


@pytest.mark.parametrize(
    "spec",
    [
        "time=Zeit, user=Kunde",
        '{"time": "Zeit", "user": "Kunde"}',
    ],
)
def test_columns_parse(spec: str) -> None:
    cols = EClogColumns.parse(spec)
    assert (cols.time, cols.user, cols.ip) == ("Zeit", "Kunde", "IpId")


def test_columns_from_json_file(tmp_path) -> None:
    path = tmp_path / "cols.json"
    path.write_text(json.dumps({"uri": "Url"}))
    assert EClogColumns.parse(str(path)).uri == "Url"
    assert EClogColumns.parse(f"@{path}").uri == "Url"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("stamp=TimeStamp", r"columns: unknown field\(s\) stamp \(known: bytes, ip, method"),
        ("time", r"columns: 'time' is not field=Column"),
        ("time=", r"columns: field 'time': expected a column name"),
        ('{"time": 3}', r"columns: field 'time': expected a column name, got 3"),
        ('{"time": ', r"columns:1:9: broken JSON"),
        ("missing.json", r"missing.json: cannot read column mapping"),
    ],
)
def test_columns_errors(spec: str, message: str) -> None:
    with pytest.raises(EClogError, match=message):
        EClogColumns.parse(spec)


# -- reading ---------------------------------------------------------------------------------


def test_read_normalises_iso_epoch_and_apache_times() -> None:
    df = read_eclog(
        csv(
            row("1", "5", "2019-12-01T00:00:01"),
            row("2", "0", "1575158402"),
            row("3", "", "2019-12-01 01:00:03+01:00", "/logout", "post"),
            row("4", "7", "01/Dec/2019:00:00:04 +0000"),
            row("5", "8", "1575158405.5"),
        )
    )
    assert list(df.columns) == list(NORMALISED)
    assert str(df["time"].dtype) == "datetime64[ns, UTC]"
    assert (df["time"] - pd.Timestamp("2019-12-01", tz="UTC")).dt.total_seconds().tolist() == [
        1,
        2,
        3,
        4,
        5.5,
    ]
    assert df["method"].tolist() == ["GET", "GET", "POST", "GET", "GET"]
    assert df["status"].dtype == "Int64" and df["status"].tolist() == [200] * 5
    assert visitors(df).tolist() == ["u5", "ip2", "ip3", "u7", "u8"]


def test_read_with_renamed_spaced_and_missing_optional_columns() -> None:
    buf = csv("2019-12-01T00:00:00, /a, 9", header="When, Path, Customer\n")
    df = read_eclog(buf, EClogColumns.parse("time=When,uri=Path,user=Customer"))
    assert df.loc[0, "uri"] == "/a" and df.loc[0, "user"] == "9"
    assert df.loc[0, "method"] == "GET" and df.loc[0, "ip"] == "" and pd.isna(df.loc[0, "bytes"])


@pytest.mark.parametrize(
    ("buf", "message"),
    [
        (
            csv(header="IpId,UserId,Stamp,Uri\n"),
            r"log\.csv:1: column 'TimeStamp' \(field 'time'\) not in the header \[IpId, UserId, "
            r"Stamp, Uri\]; map it with --columns time=<header name>",
        ),
        (csv(header="TimeStamp,Uri\n"), r"log\.csv:1: column 'UserId' \(field 'user'\) not in"),
        (
            csv(row("1", "5", "2019-12-01T00:00:01"), row("1", "5", "yesterday")),
            r"log\.csv:3: column 'TimeStamp': cannot parse 'yesterday' as a time \(ISO-8601, "
            r"Apache, or epoch seconds, milliseconds, microseconds or \.NET ticks\)",
        ),
        (csv(row("1", "5", "")), r"log\.csv:2: column 'TimeStamp' is empty$"),
        (csv(row("1", "5", "1575158400"), "1,5,1575158401,GET,/,HTTP/1.1,200,1"),
         r"log\.csv:3: short row \(8 of 10 fields\): columns 'Referrer' … 'UserAgent' are "
         r"missing$"),
        (io.StringIO(""), r"<csv>:1: empty file, expected a CSV header"),
        (
            csv(row("1", "5", "1575158400"), '1,5,1575158401,GET,"/open'),
            r"log\.csv: not a readable CSV \(after line 1\): Error tokenizing data",
        ),
    ],
)
def test_read_errors_name_the_line(buf: io.StringIO, message: str) -> None:
    with pytest.raises(EClogError, match=message):
        read_eclog(buf)


def test_read_error_line_counts_across_chunks(tmp_path) -> None:
    rows = [row("1", "5", f"{1575158400 + i}") for i in range(25)]
    rows[17] = row("1", "5", "2019-13-45T99:00:00")
    path = tmp_path / "big.csv"
    path.write_text(HEADER + "\n".join(rows) + "\n")
    with pytest.raises(EClogError, match=rf"^{path}:19: column 'TimeStamp': cannot parse"):
        read_eclog(path, chunksize=4)
    rows[17] = row("1", "5", "1575158417")
    path.write_text(HEADER + "\n".join(rows) + "\n")
    assert len(read_eclog(path, chunksize=4)) == 25


def test_parse_time() -> None:
    assert parse_time("2019-12-02") == pd.Timestamp("2019-12-02", tz="UTC")
    assert parse_time("1575244800") == pd.Timestamp("2019-12-02", tz="UTC")
    with pytest.raises(EClogError, match="cannot parse 'tomorrow' as a time"):
        parse_time("tomorrow")


# -- mapping to a trace ----------------------------------------------------------------------


LOG = csv(
    row("1", "5", "1575158400", "/"),  # u5 session 1
    row("2", "0", "1575158400", "http://other.example:8080/x?y=1"),  # ip2 by IpId
    row("1", "5", "1575158700", "/cart", "POST"),  # 300 s later: same session
    row("1", "5", "1575159400", "/p/1"),  # 700 s idle > ttl: session 2
    row("1", "5", "1575159410", "/logout", "POST"),
    row("1", "5", "1575159420", "/"),  # after a logout
)


def log() -> pd.DataFrame:
    LOG.seek(0)
    return read_eclog(LOG)


def test_mapping_sessions_by_idle_gap() -> None:
    t = eclog_to_trace(log())
    got = [(e.time, e.kind, e.user, e.token, e.method, e.host, e.path) for e in t]
    assert got == [
        (0.0, "login", "u5", "u5-1", "", "shop.example", ""),
        (0.0, "request", "u5", "u5-1", "GET", "shop.example", "/"),
        (0.0, "login", "ip2", "ip2-1", "", "other.example:8080", ""),
        (0.0, "request", "ip2", "ip2-1", "GET", "other.example:8080", "/x?y=1"),
        (300.0, "request", "u5", "u5-1", "POST", "shop.example", "/cart"),
        (1000.0, "login", "u5", "u5-2", "", "shop.example", ""),
        (1000.0, "request", "u5", "u5-2", "GET", "shop.example", "/p/1"),
        (1010.0, "request", "u5", "u5-2", "POST", "shop.example", "/logout"),
        (1020.0, "request", "u5", "u5-2", "GET", "shop.example", "/"),
    ]
    assert t.meta.start == pd.Timestamp("2019-12-01", tz="UTC")
    assert t.meta.hosts == ("shop.example", "other.example:8080")
    assert t.meta.extra["ttl"] == 600.0


def test_mapping_with_logouts_window_and_speedup() -> None:
    p = EClogConvertParams(
        logouts=True,
        speedup=10,
        start=pd.Timestamp("2019-12-01T00:01:00"),
        end=pd.Timestamp("2019-12-01T00:30:00Z"),
        host="h",
    )
    t = eclog_to_trace(log(), p)
    got = [(e.time, e.kind, e.token, e.path) for e in t]
    assert got == [
        (24.0, "login", "u5-1", ""),  # (300 - 60) / 10
        (24.0, "request", "u5-1", "/cart"),
        (94.0, "login", "u5-2", ""),
        (94.0, "request", "u5-2", "/p/1"),
        (95.0, "logout", "u5-2", "/logout"),
        (96.0, "login", "u5-3", ""),  # a logout ends the session
        (96.0, "request", "u5-3", "/"),
    ]
    assert t.meta.start == pd.Timestamp("2019-12-01T00:01:00", tz="UTC")


def test_mapping_does_not_modify_its_input_and_handles_empty_windows() -> None:
    df = log()
    before = df.copy()
    eclog_events(df, EClogConvertParams(ttl=5))
    pd.testing.assert_frame_equal(df, before)
    empty = eclog_to_trace(df, EClogConvertParams(start=pd.Timestamp("2030-01-01")))
    assert len(empty) == 0 and empty.meta.start == pd.Timestamp("2030-01-01", tz="UTC")


def test_mapping_rejects_rows_without_identity_and_bad_params() -> None:
    buf = csv(row("1", "5", "1575158400"), row("", "0", "1575158401"))
    with pytest.raises(EClogError, match=r"^log\.csv:3: neither a UserId nor an IpId \(column "
                                         r"'UserId' is '0', column 'IpId' is ''\)$"):
        read_eclog(buf)
    # A frame made otherwise: its row label (the frame's, not the sorted order's).
    frame = log().iloc[[2, 0, 1]].assign(user=["", "5", "5"], ip=["-", "1", "1"])
    with pytest.raises(EClogError, match=r"^row 2: neither a UserId nor an IpId$"):
        eclog_to_trace(frame)
    with pytest.raises(EClogError, match="speedup must be a positive number"):
        EClogConvertParams(speedup=0)
    with pytest.raises(EClogError, match="ttl must be > 0"):
        EClogConvertParams(ttl=0)
    with pytest.raises(EClogError, match="is not after start"):
        EClogConvertParams(start=pd.Timestamp("2020-01-02"), end=pd.Timestamp("2020-01-01"))


# -- the generator ---------------------------------------------------------------------------

WEEK = EClogGenParams(days=7, requests_per_hour=2000, seed=7)


@pytest.fixture(scope="module")
def week() -> tuple[pd.DataFrame, float]:
    return generate_eclog(WEEK), 0.0


def test_generator_makes_a_week_of_traffic(week) -> None:
    # No timed assertion: unit tests check behaviour, benchmarks measure speed.
    df, _ = week
    assert len(df) > 300_000
    assert df["_t"].max() < WEEK.days * 86400


def test_generator_rate_per_hour(week) -> None:
    df, _ = week
    per_hour = len(df) / (WEEK.days * 24)
    assert per_hour == pytest.approx(WEEK.requests_per_hour, rel=0.03)


def test_generator_daily_cycle_peak_and_trough(week) -> None:
    df, _ = week
    hour = (df["_t"] // 3600 % 24).astype(int)
    by_hour = np.bincount(hour, minlength=24) / WEEK.days
    grid = np.arange(0, 24, 1 / 60)
    expected = WEEK.requests_per_hour * hourly_shape(WEEK, grid).reshape(24, 60).mean(axis=1)
    peak, trough = int(WEEK.peak_hour), int(WEEK.peak_hour + 12) % 24
    assert int(np.argmax(by_hour)) in {peak - 1, peak, peak + 1}
    assert int(np.argmin(by_hour)) in {trough - 1, trough, trough + 1}
    ratio = by_hour[peak] / by_hour[trough]
    assert ratio == pytest.approx(expected[peak] / expected[trough], rel=0.2)
    np.testing.assert_allclose(by_hour, expected, rtol=0.2)


def test_generator_sessions_think_times_and_revisits(week) -> None:
    df, _ = week
    # sessions that start in the first six days are complete
    lengths = df.groupby("_session").size()
    first = df.groupby("_session")["_t"].min()
    complete = lengths[first < 6 * 86400]
    assert complete.mean() == pytest.approx(WEEK.session_requests_mean, rel=0.03)
    gaps = df.sort_values(["_session", "_t"]).groupby("_session")["_t"].diff().dropna()
    assert gaps.mean() == pytest.approx(WEEK.think_time_mean, rel=0.05)
    new = df.groupby("_session")["_new"].first()
    assert 1 - new.mean() == pytest.approx(WEEK.revisit_prob, abs=0.02)
    users = df["UserId"]
    assert (users == 0).mean() == pytest.approx(WEEK.anonymous_share, abs=0.05)
    assert set(df["Uri"].iloc[:2000]) >= {"/", "/cart"}


def test_generator_spike_brings_new_users() -> None:
    p = EClogGenParams(days=1, spike_day=0, spike_hour=12, spike_new_users=4000, seed=3)
    df = generate_eclog(p)
    starts = df.groupby("_session").agg(
        t=("_t", "min"), new=("_new", "first"), spike=("_spike", "first")
    )
    assert starts["spike"].sum() == p.spike_new_users
    assert starts.loc[starts["spike"], "new"].all()
    t0 = 12 * 3600
    window = starts[(starts["t"] >= t0) & (starts["t"] < t0 + p.spike_duration)]
    base_sessions = len(window) - p.spike_new_users
    expected_new = (p.spike_new_users + base_sessions * (1 - p.revisit_prob)) / len(window)
    assert window["new"].mean() == pytest.approx(expected_new, abs=0.02)
    assert window["new"].mean() > 0.85
    # the logins rise within minutes, then fall away: busiest 5 min in the first 15 min
    spike_t = starts.loc[starts["spike"], "t"] - t0
    per_5min = np.bincount((spike_t // 300).astype(int), minlength=12)
    assert int(np.argmax(per_5min)) <= 2
    assert per_5min[-1] < per_5min.max() / 10
    density = spike_density(p)
    assert density.sum() == pytest.approx(1.0) and len(density) == 3600


def _sale_starts(df: pd.DataFrame) -> np.ndarray:
    starts = df.groupby("_session").agg(t=("_t", "min"), spike=("_spike", "first"))
    return np.sort(starts.loc[starts["spike"], "t"].to_numpy())


@pytest.mark.parametrize(
    ("shape", "busiest_hour", "share_after_half"),
    [("flash", 0, (0.05, 0.14)), ("ramp", 4, (0.6, 0.8)), ("long-tail", 0, (0.07, 0.14))],
)
def test_generator_sale_shapes(shape: str, busiest_hour: int,
                               share_after_half: tuple[float, float]) -> None:
    sale = Sale.parse(f"0@6:{shape}:5000")
    p = EClogGenParams(days=1, requests_per_hour=100, sales=(sale,), seed=4)
    t = _sale_starts(generate_eclog(p)) - 6 * 3600
    assert len(t) == 5000 and t.min() >= 0 and t.max() <= sale.duration
    per_hour = np.bincount((t // 3600).astype(int))
    # a flash crowd and a long tail peak at once, a ramp late; a long tail lasts 12 h, not 1
    assert int(np.argmax(per_hour)) == busiest_hour
    lo, hi = share_after_half
    assert lo <= float(np.mean(t > sale.duration / 2)) <= hi


def test_generator_merges_several_sales_and_keeps_the_spike() -> None:
    sales = (Sale(day=0, hour=3, new_users=700, shape="ramp", rise=1800, duration=3600),
             Sale(day=1, hour=20, new_users=500, shape="long-tail", rise=300, duration=7200))
    p = EClogGenParams(days=2, requests_per_hour=200, spike_day=0, spike_hour=12,
                       spike_new_users=300, sales=sales, seed=5)
    t = _sale_starts(generate_eclog(p))
    assert len(t) == 1500
    assert np.sum((t >= 3 * 3600) & (t < 4 * 3600)) == 700
    assert np.sum((t >= 12 * 3600) & (t < 13 * 3600)) == 300
    assert np.sum(t >= 86400 + 20 * 3600) == 500
    # the spike alone gives the same sessions as before sales existed
    spike_only = EClogGenParams(days=1, spike_day=0, spike_new_users=300, seed=5)
    assert spike_only.all_sales() == (Sale(day=0, hour=20, new_users=300),)


@pytest.mark.parametrize(("spec", "message"), [
    ("x", "invalid literal"), ("1:sideways", "shape must be one of"), ("1@25", "hour"),
    ("1:ramp:10:1h:2h", "0 < rise < duration"), ("1:flash:1:1:1:1", "too many fields"),
])
def test_sale_spec_errors(spec: str, message: str) -> None:
    with pytest.raises(EClogError, match=message):
        Sale.parse(spec)


def test_sale_spec() -> None:
    assert Sale.parse("4@20:flash:3000") == Sale(day=4, hour=20, new_users=3000)
    assert Sale.parse("1@9:ramp:2000:8h") == Sale(day=1, hour=9, new_users=2000, shape="ramp",
                                                  rise=0.8 * 8 * 3600, duration=8 * 3600)
    assert Sale.parse("2:long-tail").duration == 12 * 3600
    with pytest.raises(EClogError, match="sale's day"):
        EClogGenParams(days=2, sales=(Sale(day=2),))


def test_generator_is_deterministic_under_its_seed() -> None:
    p = EClogGenParams(days=1, requests_per_hour=500, spike_day=0, spike_new_users=200)
    a, b = generate_eclog(p), generate_eclog(p)
    pd.testing.assert_frame_equal(a, b)
    c = generate_eclog(replace(p, seed=p.seed + 1))
    assert len(a) != len(c) or not a["_t"].equals(c["_t"])


def test_generator_lognormal_sessions() -> None:
    p = EClogGenParams(days=2, requests_per_hour=1000, session_length="lognormal")
    df = generate_eclog(p)
    assert df.groupby("_session").size().mean() == pytest.approx(8, rel=0.1)


def test_generator_parameters_are_checked() -> None:
    with pytest.raises(EClogError, match=r"spike_day must be in \[0, 0\]"):
        EClogGenParams(days=1, spike_day=1)
    with pytest.raises(EClogError, match="peak_to_trough must be >= 1"):
        EClogGenParams(peak_to_trough=0.5)
    with pytest.raises(EClogError, match="revisit_prob"):
        EClogGenParams(revisit_prob=1)


@pytest.mark.parametrize("time_format", ["iso", "epoch"])
def test_generated_csv_to_trace_recovers_the_sessions(tmp_path, time_format) -> None:
    p = EClogGenParams(
        days=1,
        requests_per_hour=1500,
        revisit_prob=0,
        think_time_sigma=0.5,
        logout_prob=0,
        time_format=time_format,
        start=date(2020, 1, 6),
    )
    df = generate_eclog(p)
    path = tmp_path / "day.csv"
    write_eclog(df, path)
    assert path.read_text().splitlines()[0] + "\n" == HEADER
    t = eclog_to_trace(read_eclog(path))
    c = t.counts()
    assert c["request"] == len(df)
    assert c["login"] == df["_session"].nunique()
    assert t.meta.start is not None and t.meta.start.date() == date(2020, 1, 6)
    assert np.mean([s.requests for s in sessions(t)]) == pytest.approx(8, rel=0.05)


def test_generator_writes_the_mapped_header(tmp_path) -> None:
    cols = EClogColumns.parse("time=When,user=Customer")
    df = generate_eclog(EClogGenParams(days=1, requests_per_hour=100), cols)
    path = tmp_path / "x.csv"
    write_eclog(df, path, chunksize=50)
    assert path.read_text().splitlines()[0].split(",")[:3] == ["IpId", "Customer", "When"]
    assert len(read_eclog(path, cols)) == len(df)


# -- plots and CLI ---------------------------------------------------------------------------


def test_cli_generate_convert_plot(tmp_path, capsys) -> None:
    day = tmp_path / "day.csv"
    argv = ["eclog-generate", "--out", str(day), "--requests-per-hour", "400", "--seed", "2"]
    assert main([*argv, "--spike-day", "0", "--spike-users", "300", "--columns", "time=T"]) == 0
    header = day.read_text().splitlines()[0].split(",")
    assert "T" in header
    out = tmp_path / "day.jsonl"
    conv = ["eclog-convert", str(day), "--out", str(out), "--columns", "time=T", "--speedup", "60"]
    assert main([*conv, "--start", "2019-12-01T06:00", "--end", "2019-12-01T18:00"]) == 0
    t = Trace.read_jsonl(out)
    assert t.meta.name == "day" and t.meta.extra["speedup"] == 60
    assert 0 < t.duration <= 12 * 3600 / 60
    png = tmp_path / "day.png"
    assert main(["eclog-plot", str(day), "--out", str(png), "--columns", "time=T"]) == 0
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000
    capsys.readouterr()
    assert main(["eclog-convert", str(day), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "column 'TimeStamp' (field 'time') not in the header" in err


def test_generator_size_estimates_the_requests(week) -> None:
    requests, need = generator_size(WEEK)
    assert requests == pytest.approx(len(week[0]), rel=0.03)
    assert need == pytest.approx(requests * 512 + 7 * 86_400 * 48)
    spike = EClogGenParams(days=1, spike_day=0, spike_new_users=4000, seed=3)
    assert generator_size(spike)[0] == pytest.approx(len(generate_eclog(spike)), rel=0.03)


def test_generator_refuses_what_does_not_fit_in_memory() -> None:
    week = EClogGenParams(days=7)
    check_generator_fits(week, available=10**9)
    with pytest.raises(EClogError, match=(
            r"^generator: 70 days at 3000 requests/hour make about 5e\+06 requests, which "
            r"need about 2\.87 GB of memory to generate \(512 bytes a request\); 1 GB is "
            r"available, enough for 24 days at this rate: ask for fewer --days or a lower "
            r"--requests-per-hour$")):
        check_generator_fits(replace(week, days=70), available=10**9)
    with pytest.raises(EClogError, match=r"^generator: 1 day at 3000 requests/hour and the sales "
                                         r"make about 8e\+08 requests.*; 1 GB is available: ask "
                                         r"for fewer --days, a lower --requests-per-hour or "
                                         r"smaller sales$"):
        check_generator_fits(EClogGenParams(spike_day=0, spike_new_users=10**8),
                             available=10**9)


@pytest.mark.parametrize(("args", "message"), [
    (["--days", "100000"], "generator: 100000 days from 2019-12-01 run past 2262-04-11, beyond "
                           "the times an EClog file can hold (years 1678-2261): at most 88520 "
                           "days\n"),
    (["--requests-per-hour", "1e9"], "generator: 1 day at 1e+09 requests/hour make about 2.4e+10 "
                                     "requests, which need about 12.3 TB of memory to generate"),
    (["--requests-per-hour", "inf"], "generator: requests_per_hour must be > 0 and finite\n"),
    (["--sale", "0:flash:10:infs"], "generator: a sale's duration must be finite\n"),
    (["--start", "1600-01-01"], "generator: start 1600-01-01 is before 1677-09-22"),
])
def test_cli_generate_refuses_sizes_that_cannot_fit(tmp_path, capsys, args, message) -> None:
    out = tmp_path / "x.csv"
    assert main(["eclog-generate", "--out", str(out), *args]) == 2  # at once, nothing allocated
    err = capsys.readouterr().err
    assert err.startswith(f"python -m scenarios eclog-generate: error: {message}")
    assert err.count("\n") == 1 and not out.exists()


def test_a_log_longer_than_a_trace_may_run_asks_for_a_speedup() -> None:
    df = read_eclog(csv(row("1", "5", "2019-12-01T00:00:00"), row("1", "5", "2021-12-01")))
    with pytest.raises(EClogError, match=r"^two: the requests run 731 days of trace time, beyond "
                                         r"a trace's limit of 366 days: compress time "
                                         r"\(--speedup 2 or more\) or keep a window"):
        eclog_to_trace(df, EClogConvertParams(name="two"))
    assert eclog_to_trace(df, EClogConvertParams(speedup=2)).duration == 731 * 86_400 / 2


def test_cli_generate_rejects_bad_parameters(tmp_path, capsys) -> None:
    out = str(tmp_path / "x.csv")
    assert main(["eclog-generate", "--out", out, "--spike-day", "3"]) == 2
    assert "spike_day must be in [0, 0]" in capsys.readouterr().err
    assert main(["eclog-generate", "--out", out, "--start", "Dec 1"]) == 2
    assert "--start: 'Dec 1' is not a date" in capsys.readouterr().err
