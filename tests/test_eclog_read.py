"""EClog files as published: numeric timestamps in any of their units, and rows cut short."""

from __future__ import annotations

import bz2
import gzip
import io
import lzma
import re
import tarfile
import zipfile
from datetime import UTC, datetime, timedelta

import pandas as pd
import pytest

from scenarios.__main__ import main
from scenarios.eclog import (
    TICKS_AT_EPOCH,
    EClogError,
    eclog_to_trace,
    parse_time,
    parse_times,
    read_eclog,
)

HEADER = "IpId,UserId,TimeStamp,HttpMethod,Uri,HttpVersion,ResponseCode,Bytes,Referrer,UserAgent\n"
T = datetime(2019, 12, 1, 0, 0, 3, tzinfo=UTC)
EPOCH_S = int(T.timestamp())
TICKS = TICKS_AT_EPOCH + EPOCH_S * 10_000_000


def dotnet_ticks(dt: datetime) -> int:
    """What .NET's `DateTime.Ticks` gives: 100 ns since 0001-01-01, computed independently."""
    delta = dt.replace(tzinfo=None) - datetime(1, 1, 1)
    return (delta.days * 86_400 + delta.seconds) * 10_000_000 + delta.microseconds * 10


def csv(*stamps: str, extra: str = "") -> io.StringIO:
    rows = "".join(f"1,5,{s},GET,/p,HTTP/1.1,200,123,-,UA\n" for s in stamps)
    buf = io.StringIO(HEADER + rows + extra)
    buf.name = "log.csv"
    return buf


def test_ticks_constant_is_dotnets() -> None:
    assert TICKS == dotnet_ticks(T) == 637107552030000000


@pytest.mark.parametrize("stamp", [
    str(EPOCH_S),                      # epoch seconds
    f"{EPOCH_S}.0",
    str(EPOCH_S * 1000),               # epoch milliseconds (JavaScript, Java)
    str(EPOCH_S * 1_000_000),          # epoch microseconds
    str(dotnet_ticks(T)),              # .NET DateTime.Ticks, as EClog's TimeStamp is read
    "2019-12-01T00:00:03",
    "01/Dec/2019:01:00:03 +0100",
])
def test_every_time_unit_reads_as_the_same_instant(stamp) -> None:
    df = read_eclog(csv(stamp))
    assert df.loc[0, "time"] == pd.Timestamp(T)


def test_ticks_keep_subsecond_precision() -> None:
    t = parse_times(pd.Series([str(TICKS + 1234567)])).iloc[0]
    assert t == pd.Timestamp(T) + pd.Timedelta(microseconds=123456.7)


def test_a_file_of_ticks_converts_to_a_trace(tmp_path) -> None:
    path = tmp_path / "eclog.csv"
    path.write_text(HEADER + "".join(
        f"1,5,{TICKS + i * 10_000_000},GET,/p{i},HTTP/1.1,200,1,-,UA\n" for i in range(3)))
    out = tmp_path / "t.jsonl"
    assert main(["eclog-convert", str(path), "--out", str(out)]) == 0
    text = out.read_text()
    assert '"start": "2019-12-01T00:00:03+00:00"' in text and '"time": 2.0' in text


@pytest.mark.parametrize(("stamp", "message"), [
    ("inf", r"log\.csv:3: column 'TimeStamp': 'inf' is not a finite number$"),
    ("-inf", r"log\.csv:3: column 'TimeStamp': '-inf' is not a finite number$"),
    ("1e30", r"log\.csv:3: column 'TimeStamp': '1e30' is a number in no known time unit"),
    ("3e17", r"log\.csv:3: column 'TimeStamp': '3e17' is a number in no known time unit"),
    ("99999999999999999", r"'99999999999999999' is a number in no known time unit"),
    (str(EPOCH_S * 10), rf"'{EPOCH_S * 10}' is beyond the supported years 1678-2261"),
    (str(TICKS_AT_EPOCH + 400 * 365 * 86_400 * 10**7), r"is beyond the supported years"),
])
def test_impossible_numbers_are_one_line_errors(stamp, message) -> None:
    with pytest.raises(EClogError, match=message):
        read_eclog(csv(str(EPOCH_S), stamp))


def test_a_short_row_is_an_error_naming_its_line() -> None:
    with pytest.raises(EClogError, match=r"^log\.csv:4: short row \(3 of 10 fields\): columns "
                                         r"'HttpMethod' … 'UserAgent' are missing$"):
        read_eclog(csv(str(EPOCH_S), str(EPOCH_S), extra=f"1,5,{EPOCH_S}\n"))
    with pytest.raises(EClogError, match=r"^log\.csv:2: short row \(6 of 10 fields\): columns "
                                         r"'ResponseCode' … 'UserAgent' are missing$"):
        read_eclog(csv(extra=f"1,5,{EPOCH_S},GET,/p,HTTP/1.1\n"))


@pytest.mark.parametrize("chunksize", [1, 2, 250_000])
def test_a_row_missing_only_its_last_optional_column_is_an_error(chunksize, tmp_path) -> None:
    # Every field the row has is fine, and pandas reads the missing one as "": only the count
    # of fields tells. Blank lines and a quoted line break do not shift the line named.
    rows = (f'1,5,{EPOCH_S},GET,"/a\nb",HTTP/1.1,200,1,-,\n\n'   # ends in an empty field: fine
            f"1,5,{EPOCH_S},GET,/p,HTTP/1.1,200,123,-\n")        # one field short
    with pytest.raises(EClogError, match=r"^log\.csv:6: short row \(9 of 10 fields\): column "
                                         r"'UserAgent' is missing$"):
        read_eclog(csv(str(EPOCH_S), extra=rows), chunksize=chunksize)
    path = tmp_path / "log.csv"
    path.write_text(HEADER + f"1,5,{EPOCH_S},GET,/p,HTTP/1.1,200,123,-,UA\n" + rows)
    with pytest.raises(EClogError, match=rf"^{path}:6: short row \(9 of 10 fields\)"):
        read_eclog(path, chunksize=chunksize)


@pytest.mark.parametrize("suffix", ["csv", "csv.gz", "csv.bz2", "csv.xz", "zip", "tar.gz"])
def test_compressed_files_with_empty_last_fields_read(suffix, tmp_path) -> None:
    # A row ending in an empty field is counted again from the file: decompressed, too.
    text = HEADER + f"1,5,{EPOCH_S},GET,/p,HTTP/1.1,200,123,-,\n"
    path = tmp_path / f"log.{suffix}"
    data = text.encode()
    if suffix == "csv.gz":
        path.write_bytes(gzip.compress(data))
    elif suffix == "csv.bz2":
        path.write_bytes(bz2.compress(data))
    elif suffix == "csv.xz":
        path.write_bytes(lzma.compress(data))
    elif suffix == "zip":
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("log.csv", text)
    elif suffix == "tar.gz":
        (tmp_path / "log.csv").write_bytes(data)
        with tarfile.open(path, "w:gz") as t:
            t.add(tmp_path / "log.csv", arcname="log.csv")
    else:
        path.write_bytes(data)
    df = read_eclog(path)
    assert df.loc[0, "uri"] == "/p" and df.loc[0, "user_agent"] == ""
    short = HEADER + f"1,5,{EPOCH_S},GET,/p,HTTP/1.1,200,123,-\n"
    gz = tmp_path / "short.csv.gz"
    gz.write_bytes(gzip.compress(short.encode()))
    with pytest.raises(EClogError, match=rf"^{gz}:2: short row \(9 of 10 fields\)"):
        read_eclog(gz)


@pytest.mark.parametrize("chunksize", [1, 250_000])
@pytest.mark.parametrize(("rows", "line"), [
    ([f"1,5,{EPOCH_S},GET,/p,HTTP/1.1,200,1,-,UA", f"1,5,{EPOCH_S},GET,/s?q=a,b,HTTP/1.1,200,1,-,UA"], 3),
    ([f"1,5,{EPOCH_S},GET,/s?q=a,b,HTTP/1.1,200,1,-,UA", f"1,5,{EPOCH_S},GET,/p,HTTP/1.1,200,1,-,UA"], 2),
    ([f"1,5,{EPOCH_S},GET,/p,HTTP/1.1,200,1,-,UA,", f"1,5,{EPOCH_S},GET,/s?q=a,b,HTTP/1.1,200,1,-,UA,"], 3),
    ([f"1,5,{EPOCH_S},GET,/p,HTTP/1.1,200,1,-,UA,", f"1,5,{EPOCH_S},GET,/s?q=a,b,HTTP/1.1,200,1,-,UA"], 3),
    ([f"1,5,{EPOCH_S},GET,/p,HTTP/1.1,200,1,-,UA", f"1,5,{EPOCH_S},GET,/p,HTTP/1.1,200,1,-,UA,"], 3),
])
def test_a_long_row_is_an_error_naming_its_line(rows, line, chunksize) -> None:
    # pandas would drop the extra field, shift the columns, or take column 1 as the index.
    with pytest.raises(EClogError, match=rf"^log\.csv:{line}: long row \(1[12] fields, the "
                                         r"header has 10\)"):
        read_eclog(csv(extra="".join(r + "\n" for r in rows)), chunksize=chunksize)


def test_a_field_beyond_the_csv_modules_limit_reads() -> None:
    uri = "/" + "x" * 200_000  # the csv module, which counts the fields, stops at 131072
    df = read_eclog(csv(extra=f"1,5,{EPOCH_S},GET,{uri},HTTP/1.1,200,1,-,\n"))
    assert df.loc[0, "uri"] == uri


@pytest.mark.parametrize("chunksize", [1, 250_000])
def test_a_trailing_comma_on_every_row_is_ignored(chunksize) -> None:
    rows = (f"1,5,{EPOCH_S},GET,/a,HTTP/1.1,200,1,-,UA,\n"
            f"2,,{EPOCH_S},POST,/b,HTTP/1.1,200,1,-,,\n")
    df = read_eclog(csv(extra=rows), chunksize=chunksize)
    assert df["ip"].tolist() == ["1", "2"] and df["uri"].tolist() == ["/a", "/b"]
    assert df["user_agent"].tolist() == ["UA", ""]


@pytest.mark.parametrize("stamp", [
    "9999-12-31T23:59:59", "0001-01-01", "2262-04-12", "01/Dec/9999:00:00:03 +0100",
])
def test_iso_and_apache_times_beyond_the_years_are_one_line_errors(stamp) -> None:
    with pytest.raises(EClogError, match=rf"^log\.csv:3: column 'TimeStamp': '{re.escape(stamp)}' is "
                                         r"beyond the supported years 1678-2261$"):
        read_eclog(csv(str(EPOCH_S), stamp))
    with pytest.raises(EClogError, match=rf"^'{re.escape(stamp)}' is beyond the supported years"):
        parse_time(stamp)


def test_an_empty_required_field_is_an_error() -> None:
    with pytest.raises(EClogError, match=r"^log\.csv:2: column 'HttpMethod' is empty$"):
        read_eclog(csv(extra=f"1,5,{EPOCH_S},,/p,HTTP/1.1,200,1,-,UA\n"))


def test_anonymous_visitors_and_empty_optional_fields_are_fine() -> None:
    df = read_eclog(csv(extra=f"7,,{EPOCH_S},POST,/cart,,,,,\n"))
    assert df.loc[0, "user"] == "" and df.loc[0, "method"] == "POST"
    assert pd.isna(df.loc[0, "status"]) and df.loc[0, "user_agent"] == ""


def test_parse_time_names_the_problem() -> None:
    assert parse_time(str(EPOCH_S * 1000)) == pd.Timestamp(T)
    with pytest.raises(EClogError, match=r"^'inf' is not a finite number$"):
        parse_time("inf")


def test_the_command_line_gives_one_line(tmp_path, capsys) -> None:
    path = tmp_path / "x.csv"
    path.write_text(HEADER + f"1,5,{EPOCH_S},GET,/,HTTP/1.1,200,1,-,UA\n1,5,inf,GET,/,,,,,\n")
    assert main(["eclog-convert", str(path), "--out", str(tmp_path / "t.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err == (f"python -m scenarios eclog-convert: error: {path}:3: column 'TimeStamp': "
                   f"'inf' is not a finite number\n")
    out = str(tmp_path / "t.jsonl")
    path.write_text(HEADER + f"1,5,{EPOCH_S},GET,/,HTTP/1.1,200,1,-,UA\n")
    assert main(["eclog-convert", str(path), "--start", "9999-01-01", "--out", out]) == 2
    assert capsys.readouterr().err == ("python -m scenarios eclog-convert: error: '9999-01-01' "
                                       "is beyond the supported years 1678-2261\n")


# -- a first row of one field more, in a file without trailing commas --------------------------


@pytest.mark.parametrize("chunksize", [1, 250_000])
@pytest.mark.parametrize("newline", ["\n", "\r\n"])
def test_a_long_first_row_ending_empty_is_an_error_without_trailing_commas(
        chunksize, newline) -> None:
    # An unquoted comma in the Uri and an empty UserAgent: 11 fields, the last empty, as if
    # after a trailing comma. The next row has none, so the first one would be read shifted.
    rows = [f"1,5,{EPOCH_S},GET,/s?q=a,b,HTTP/1.1,200,1,-,",
            f"1,5,{EPOCH_S},GET,/p,HTTP/1.1,200,1,-,UA"]
    buf = io.StringIO(HEADER.replace("\n", newline) + newline.join(rows) + newline)
    buf.name = "log.csv"
    with pytest.raises(EClogError, match=r"^log\.csv:2: long row \(11 fields, the header has "
                                         r"10\): an unquoted comma in a value, or a trailing "
                                         r"comma that line 3 lacks\?$"):
        read_eclog(buf, chunksize=chunksize)


def test_a_row_lacking_the_trailing_comma_is_found_past_blank_lines_and_quotes(tmp_path) -> None:
    rows = (f'1,5,{EPOCH_S},GET,/a,HTTP/1.1,200,1,-,UA,\n'
            f'1,5,{EPOCH_S},GET,"/b\nc",HTTP/1.1,200,1,-,UA,\n\n'
            f"1,5,{EPOCH_S},GET,/d,HTTP/1.1,200,1,-,UA\n")
    path = tmp_path / "log.csv.gz"
    path.write_bytes(gzip.compress((HEADER + rows).encode()))
    with pytest.raises(EClogError, match=rf"^{path}:2: long row \(11 fields, the header has 10\)"
                                         r": an unquoted comma in a value, or a trailing comma "
                                         r"that line 6 lacks\?$"):
        read_eclog(path)


def test_trailing_commas_with_blank_lines_and_quoted_line_breaks_read() -> None:
    # Lines that do not end in a comma (a blank one, a line break in quotes) make the rows be
    # counted: every row still ends in the empty field.
    rows = (f'1,5,{EPOCH_S},GET,/a,HTTP/1.1,200,1,-,UA,\n\n'
            f'2,5,{EPOCH_S},GET,"/b\nc",HTTP/1.1,200,1,-,UA,\r\n'
            f"3,5,{EPOCH_S},GET,/d,HTTP/1.1,200,1,-,,")
    df = read_eclog(_buf(HEADER + rows))
    assert df["uri"].tolist() == ["/a", "/b\nc", "/d"]
    assert df["user_agent"].tolist() == ["UA", "UA", ""]


def _buf(text: str) -> io.StringIO:
    buf = io.StringIO(text)
    buf.name = "log.csv"
    return buf


# -- a row without a visitor ------------------------------------------------------------------


@pytest.mark.parametrize("chunksize", [1, 250_000])
def test_a_row_without_a_visitor_names_its_file_and_line(tmp_path, capsys, chunksize) -> None:
    # Counted in the file: a blank line and a line break in quotes come before it, and the row
    # after it ends in an empty field (which moves the field counter past it).
    path = tmp_path / "users.csv"
    path.write_text(HEADER + f'1,5,{EPOCH_S},GET,"/a\nb",HTTP/1.1,200,1,-,UA\n\n'
                    f"-,0,{EPOCH_S},GET,/p,HTTP/1.1,200,1,-,UA\n"
                    f"2,7,{EPOCH_S},GET,/p,HTTP/1.1,200,1,-,\n")
    message = (f"{path}:5: neither a UserId nor an IpId (column 'UserId' is '0', column 'IpId' "
               "is '-')")
    with pytest.raises(EClogError, match=f"^{re.escape(message)}$"):
        read_eclog(path, chunksize=chunksize)
    assert main(["eclog-convert", str(path), "--out", str(tmp_path / "t.jsonl")]) == 2
    assert capsys.readouterr().err == f"python -m scenarios eclog-convert: error: {message}\n"


def test_a_file_without_ip_column_says_so() -> None:
    buf = _buf("UserId,TimeStamp,Uri\n5,1575158403,/a\n0,1575158404,/b\n")
    with pytest.raises(EClogError, match=r"^log\.csv:3: neither a UserId nor an IpId \(column "
                                         r"'UserId' is '0', no IpId column\)$"):
        read_eclog(buf)


def test_other_row_errors_count_blank_lines_too() -> None:
    with pytest.raises(EClogError, match=r"^log\.csv:5: column 'TimeStamp': cannot parse 'soon'"):
        read_eclog(_buf(HEADER + f"1,5,{EPOCH_S},GET,/,HTTP/1.1,200,1,-,UA\n\n\n"
                        "1,5,soon,GET,/,HTTP/1.1,200,1,-,UA\n"))


# -- fractional epoch times -------------------------------------------------------------------


@pytest.mark.parametrize(("stamp", "after"), [
    (f"{EPOCH_S}.123456", pd.Timedelta(microseconds=123456)),           # seconds, to the µs
    (f"{EPOCH_S}.5", pd.Timedelta(milliseconds=500)),
    (f"{EPOCH_S * 1000}.456", pd.Timedelta(microseconds=456)),           # milliseconds
    (f"{EPOCH_S}123.456", pd.Timedelta(microseconds=123456)),
    (f"{EPOCH_S}123456.7", pd.Timedelta(nanoseconds=123456750)),  # µs: the float's 0.25 steps
    (str(TICKS + 1234567), pd.Timedelta(nanoseconds=123456700)),          # ticks among fractions
    (str(EPOCH_S), pd.Timedelta(0)),
])
def test_fractional_epoch_times_keep_their_digits(stamp, after) -> None:
    times = parse_times(pd.Series([f"{EPOCH_S}.25", stamp]))
    assert times.iloc[1] == pd.Timestamp(T) + after
    assert times.iloc[0] == pd.Timestamp(T) + pd.Timedelta(milliseconds=250)


def test_fractional_epoch_times_make_a_trace_without_a_warning() -> None:
    # pytest makes warnings errors: pandas warned "Discarding nonzero nanoseconds".
    df = read_eclog(csv(f"{EPOCH_S}.123456789", f"{EPOCH_S + 1}.5"))
    off = df.loc[0, "time"] - pd.Timestamp(T)  # more digits than a float holds: as near
    assert abs(off - pd.Timedelta(nanoseconds=123456789)) < pd.Timedelta(nanoseconds=120)
    trace = eclog_to_trace(df)
    assert trace.meta.start == T + timedelta(microseconds=123456)  # rounded down to the µs
    assert [e.time for e in trace.events] == [0.0, 0.0, 1.376544]
