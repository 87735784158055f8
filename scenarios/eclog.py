"""EClog: HTTP-level access logs of an online store, as a trace (and a generator of look-alikes).

EClog (Chodak, Suchacka and Chawla 2020) is a CSV of the requests that an online store served
over 183 days from 1 December 2019, at 1-second resolution. The dataset cannot be downloaded
here; its ten columns, as public scripts that read it give them, are
``IpId,UserId,TimeStamp,HttpMethod,Uri,HttpVersion,ResponseCode,Bytes,Referrer,UserAgent``.
Every column name lives in ONE place, :class:`EClogColumns`, whose defaults are that header
and which users override (``--columns time=TimeStamp,user=UserId`` or a JSON file).

Three parts, each a plain function:

- :func:`read_eclog`: CSV → normalised DataFrame (columns :data:`NORMALISED`).
- :func:`eclog_events` / :func:`eclog_to_trace`: normalised DataFrame → trace events. Each
  visitor (``UserId``; ``IpId`` when ``UserId`` is empty, ``0`` or ``-``) is one user. Their
  first request is preceded by a login; an idle gap longer than ``ttl`` starts a new session
  with a new login and token ``<user>-<n>``. EClog has no logouts: sessions just end (the
  filter's TTL expires them) unless ``logouts`` is set, in which case a request whose path
  looks like a logout (``logout_pattern``) becomes the session's logout event and the next
  request of that visitor logs in again.
- :func:`generate_eclog`: EClog-format data with daily cycles, sessions, returning visitors
  and an optional sale spike, deterministic under a seed (for tests and demos).
"""

from __future__ import annotations

import bz2
import csv
import gzip
import io
import json
import lzma
import math
import tarfile
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, fields, replace
from datetime import UTC, date, datetime, timedelta
from functools import cache, partial
from pathlib import Path
from typing import IO, Any, Final, Literal, TextIO

import numpy as np
import numpy.typing as npt
import pandas as pd
from tqdm import tqdm

from scenarios.trace import (
    FIELDS,
    KIND_RANK,
    LOGOUT_PATTERN,
    MAX_TRACE_SECONDS,
    ScenarioError,
    Trace,
    TraceMeta,
    span_text,
)


class EClogError(ScenarioError):
    """Bad EClog input or parameters; the message starts with the location."""


# -- the column mapping: the ONE place that knows EClog's header ------------------------------


@dataclass(frozen=True)
class EClogColumns:
    """CSV header name of each EClog field (defaults: the published header).

    Fields: ``ip`` (anonymised client address id), ``user`` (customer id, empty or ``0`` for
    visitors who are not logged in), ``time`` (ISO-8601, epoch seconds, or Apache
    ``01/Dec/2019:00:00:03 +0100``), ``method``, ``uri`` (path and query, or an absolute URL),
    ``version``, ``status``, ``bytes``, ``referrer``, ``user_agent``. Only ``time``, ``uri`` and
    one of ``user``/``ip`` must be in a file's header; optional columns it lacks are filled. Every
    row has every column of its header: a short row is an error (:func:`read_eclog`).
    """

    ip: str = "IpId"
    user: str = "UserId"
    time: str = "TimeStamp"
    method: str = "HttpMethod"
    uri: str = "Uri"
    version: str = "HttpVersion"
    status: str = "ResponseCode"
    bytes: str = "Bytes"
    referrer: str = "Referrer"
    user_agent: str = "UserAgent"

    def mapping(self) -> dict[str, str]:
        """Field name → CSV header name, in header order."""
        return asdict(self)

    def header(self) -> list[str]:
        return list(self.mapping().values())

    def with_overrides(self, overrides: Mapping[str, str]) -> EClogColumns:
        """A copy with some fields renamed; unknown field names are an error."""
        known = {f.name for f in fields(self)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise EClogError(
                f"columns: unknown field(s) {', '.join(unknown)} "
                f"(known: {', '.join(sorted(known))})"
            )
        for k, v in overrides.items():
            if not isinstance(v, str) or not v.strip():
                raise EClogError(f"columns: field {k!r}: expected a column name, got {v!r}")
        return replace(self, **{k: v.strip() for k, v in overrides.items()})

    @classmethod
    def parse(cls, spec: str) -> EClogColumns:
        """From ``field=Header,field=Header``, a JSON object, or a path to a JSON file
        (``@cols.json`` or ``cols.json``)."""
        text = spec.strip()
        source = "columns"
        if text.startswith("@") or text.endswith(".json"):
            path = Path(text.removeprefix("@"))
            source = str(path)
            try:
                text = path.read_text(encoding="utf-8")
            except OSError as e:
                raise EClogError(f"{path}: cannot read column mapping: {e.strerror}") from None
        if text.lstrip().startswith("{"):
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as e:
                raise EClogError(f"{source}:{e.lineno}:{e.colno}: broken JSON: {e.msg}") from None
            if not isinstance(obj, dict):
                raise EClogError(f"{source}: expected a JSON object of field: column")
            return cls().with_overrides(obj)
        overrides: dict[str, str] = {}
        for part in filter(None, (p.strip() for p in text.split(","))):
            key, sep, value = part.partition("=")
            if not sep:
                raise EClogError(f"columns: {part!r} is not field=Column")
            overrides[key.strip()] = value
        return cls().with_overrides(overrides)


NORMALISED: Final = (
    "time",  # datetime64[ns, UTC]
    "ip",  # str ("" when absent)
    "user",  # str, the raw UserId ("" when absent)
    "method",  # str, upper case ("GET" when absent)
    "uri",  # str
    "version",  # str
    "status",  # Int64 (NA when absent or not a number)
    "bytes",  # Int64 (NA when absent or not a number)
    "referrer",  # str
    "user_agent",  # str
)
_ANONYMOUS: Final = frozenset({"", "0", "-", "null", "NULL", "None", "nan"})


# -- reading ---------------------------------------------------------------------------------


def read_eclog(
    source: str | Path | TextIO,
    columns: EClogColumns | None = None,
    *,
    chunksize: int = 250_000,
    progress: bool = False,
) -> pd.DataFrame:
    """Read an EClog CSV (a path or a text buffer) into the :data:`NORMALISED` columns.

    Keeps only the mapped columns (and the last), ``chunksize`` rows at a time; a path ending
    in ``.gz``, ``.bz2``, ``.xz``, ``.zst``, ``.zip`` or ``.tar…`` is decompressed (as pandas
    does). Errors name the file and the line
    (the header is line 1), e.g. ``day.csv:18: column 'TimeStamp': cannot parse …``. A row with
    fewer fields than the header is an error naming the first column it lacks: ``day.csv:7:
    short row (6 of 10 fields): columns 'ResponseCode' … 'UserAgent' are missing``. A row with
    more fields is an error too (``day.csv:9: long row (11 fields, the header has 10): …``),
    except for files whose rows end in a trailing comma: when the first data row has one empty
    field more than the header, every row must end in that empty field, which is ignored (a
    row without it makes the first row a long row, which is an error naming both lines). A row
    with neither a UserId nor an IpId is an error naming its line.
    """
    cols = columns or EClogColumns()
    if isinstance(source, str | Path):
        name = str(source)
        path = Path(source)

        def reopen() -> TextIO:
            return _open_text(path)
    else:
        name = str(getattr(source, "name", "<csv>"))
        text = source.read()  # read twice: by pandas, and for the fields of a row (below)
        source = io.StringIO(text)

        def reopen() -> TextIO:
            return io.StringIO(text.removeprefix("\ufeff"), newline="")
    try:
        header = pd.read_csv(source, nrows=0, skipinitialspace=True, encoding="utf-8-sig")
    except pd.errors.EmptyDataError:
        raise EClogError(f"{name}:1: empty file, expected a CSV header") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as e:
        raise EClogError(f"{name}: not a readable CSV: {e}") from None
    if isinstance(source, io.StringIO):
        source.seek(0)
    present_header = [str(c).strip() for c in header.columns]
    wanted = cols.mapping()
    present = {f: c for f, c in wanted.items() if c in present_header}
    for f in ("time", "uri"):
        if f not in present:
            raise EClogError(_missing_column(name, f, wanted[f], present_header))
    if "user" not in present and "ip" not in present:
        raise EClogError(_missing_column(name, "user", wanted["user"], present_header))
    # The last column is always read: a row without it is the only kind that may be short.
    last = present_header[-1]
    read = {*present.values(), last}
    names = [str(c) for c in header.columns]
    fields = _FieldCounts(reopen, present_header, name)
    # All columns are parsed (pandas does not count the fields of a row beyond `usecols`), and
    # never as the index; a trailing comma on the first data row means one on every row.
    trailing = fields.trailing_comma()
    reader = pd.read_csv(
        source,
        header=0,
        names=[*names, _TRAILING] if trailing else names,
        index_col=False,
        dtype=str,
        keep_default_na=False,
        skipinitialspace=True,
        encoding="utf-8-sig",
        chunksize=chunksize,
    )
    parts: list[pd.DataFrame] = []
    offset = 0
    with reader, fields, tqdm(desc=f"read {Path(name).name}", unit=" rows",
                              disable=not progress) as bar:
        try:
            for chunk in reader:
                if trailing:
                    fields.check_long(offset + np.flatnonzero(
                        (chunk.pop(_TRAILING) != "").to_numpy()))
                chunk = chunk.loc[:, [c for c in chunk.columns if str(c).strip() in read]]
                chunk.columns = [str(c).strip() for c in chunk.columns]
                fields.check(offset + np.flatnonzero((chunk[last] == "").to_numpy()))
                parts.append(normalise(chunk, present, name=name,
                                       line_of=partial(_shifted, fields.line_of, offset)))
                offset += len(chunk)
                bar.update(len(chunk))
        except (pd.errors.ParserError, UnicodeDecodeError) as e:
            if isinstance(e, pd.errors.ParserError) and "Expected" in str(e):
                fields.find_long(offset)  # raises, naming the line
            raise EClogError(f"{name}: not a readable CSV (after line {offset + 1}): {e}") from None
    if not parts:
        return normalise(pd.DataFrame({c: [] for c in present.values()}), present, name=name)
    return pd.concat(parts, ignore_index=True)


def _shifted(line_of: Callable[[int], int], offset: int, i: int) -> int:
    """`line_of` of row `i` of a chunk whose first row is data row `offset`."""
    return line_of(offset + i)


_TRAILING: Final = "\0trailing"  # the empty field after a trailing comma (never a header name)


def _open_text(path: Path) -> TextIO:
    """`path` as text, decompressed as pandas does by its name's ending (``.gz .bz2 .xz .zst
    .zip .tar .tar.gz .tar.bz2 .tar.xz``; a zip or tar archive: its only file)."""
    suffix = path.suffix.lower()
    binary: IO[bytes] | None
    if path.name.lower().endswith((".tar", ".tar.gz", ".tar.bz2", ".tar.xz")):
        archive = tarfile.open(path)  # noqa: SIM115 (open while its member is read)
        member = next((m for m in archive.getmembers() if m.isfile()), None)
        binary = archive.extractfile(member) if member is not None else None
    elif suffix == ".zip":
        with zipfile.ZipFile(path) as archive_zip:  # its member stays open after this
            names = [n for n in archive_zip.namelist() if not n.endswith("/")]
            binary = archive_zip.open(names[0]) if names else None
    elif suffix == ".zst":
        import zstandard  # pandas' own optional dependency for .zst

        binary = zstandard.open(path, "rb")
    elif suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf-8-sig", newline="")
    elif suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf-8-sig", newline="")
    elif suffix == ".xz":
        return lzma.open(path, "rt", encoding="utf-8-sig", newline="")
    else:
        return path.open(encoding="utf-8-sig", newline="")
    if binary is None:
        raise EClogError(f"{path}: no file in the archive")
    return io.TextIOWrapper(binary, encoding="utf-8-sig", newline="")


def _every_line_ends_in_a_comma(f: TextIO, block: int = 1 << 22) -> bool:
    """Whether every line of `f` after the first ends in ``,`` (before ``\n`` or ``\r\n``);
    a blank line does not. Counts in blocks of whole lines, at the speed of ``str.count``."""
    f.readline()
    carry = ""
    while chunk := f.read(block):
        text = carry + chunk
        cut = text.rfind("\n") + 1  # count whole lines only; the rest waits for the next block
        text, carry = text[:cut], text[cut:]
        lines, ended = text.count("\n"), text.count(",\n")
        if ended != lines and ended + text.count(",\r\n") != lines:
            return False
    carry = carry.rstrip("\r")
    return not carry or carry.endswith(",")


class _FieldCounts:
    """Finds short rows (fewer fields than the header) and long rows (more).

    pandas' parser fills a short row's missing fields with "", as if they were empty, so the
    fields of a row whose last field reads "" are counted again with the csv module. A reader
    of the file is opened at the first such row and only moves forward: at most one more pass,
    and none (but for the first row, which tells a trailing comma) for a file whose rows all
    end in a value. pandas stops at a long row (past the
    first) with its own count of lines; the reader then finds the row and its line.
    """

    def __init__(self, reopen: Callable[[], TextIO], header: list[str], name: str) -> None:
        self.reopen = reopen
        self.header = header
        self.name = name
        self.file: TextIO | None = None
        self.reader: Any = None  # csv.reader over `file`, past the header
        self.index = -1  # the data row `row` is (blank lines are no rows, as for pandas)
        self.row: list[str] = []
        self.line = 0  # and its line
        self.trailing = False  # every row ends in a trailing comma (an empty field more)

    def __enter__(self) -> _FieldCounts:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.file is not None:
            self.file.close()

    def _next_row(self) -> list[str]:
        try:
            for row in self.reader:
                if row and row != [""]:
                    return list(row)
        except (csv.Error, UnicodeDecodeError) as e:
            raise EClogError(f"{self.name}: not a readable CSV (after line "
                             f"{self.reader.line_num}): {e}") from None
        return self.header  # (pandas read no more rows than there are)

    def _open(self) -> None:
        if self.file is None:
            csv.field_size_limit(max(csv.field_size_limit(), 2**31 - 1))  # pandas has no limit
            self.file = self.reopen()
            self.reader = csv.reader(self.file, skipinitialspace=True)
            next(self.reader, None)

    def _seek(self, target: int) -> None:
        while self.index < target:
            self.row = self._next_row()
            self.line = self.reader.line_num
            self.index += 1

    def trailing_comma(self) -> bool:
        """Whether the rows end in a trailing comma (one empty field more than the header).

        The first data row tells, and every row must agree: a first row of one field more
        whose last is empty, in a file whose other rows have just the header's fields, is a
        long row (an unquoted comma in a value, and an empty last field), which would be read
        shifted by one column. Raise :class:`EClogError` for it, naming both lines, and for a
        first row that has more fields than the header otherwise."""
        self._open()
        self._seek(0)
        if self.index == 0 and len(self.row) == len(self.header) + 1 and self.row[-1] == "":
            line = self._row_without_trailing_comma()
            if line is not None:
                raise EClogError(
                    f"{self.name}:{self.line}: long row ({len(self.row)} fields, the header has "
                    f"{len(self.header)}): an unquoted comma in a value, or a trailing comma "
                    f"that line {line} lacks?")
            self.trailing = True
            return True
        self.check_long(np.array([0]))
        return False

    def _row_without_trailing_comma(self) -> int | None:
        """The line of the first data row that ends without the trailing comma (as many
        fields as the header, the last not empty), if any.

        A fast pass first: when every line after the header ends in a comma, every row does
        (a line break inside quotes ends no line in a comma). Only otherwise are the rows
        counted, with a second reader of the file."""
        with self.reopen() as f:
            if _every_line_ends_in_a_comma(f):
                return None
        n = len(self.header)
        with self.reopen() as f:
            reader = csv.reader(f, skipinitialspace=True)
            next(reader, None)
            try:
                for row in reader:
                    if len(row) == n and row[-1] != "":
                        return reader.line_num
            except (csv.Error, UnicodeDecodeError) as e:
                raise EClogError(f"{self.name}: not a readable CSV (after line "
                                 f"{reader.line_num}): {e}") from None
        return None

    def check_long(self, rows: npt.NDArray[np.intp]) -> None:
        """Raise :class:`EClogError` for the first of data rows `rows` (ascending) that has
        more fields than the header (and a trailing comma, if the file's rows end in one)."""
        self._open()
        for target in rows:
            self._seek(int(target))
            self._raise_if_long()

    def find_long(self, start: int) -> None:
        """Raise :class:`EClogError` for the first long row from data row `start` on (if any)."""
        self._open()
        self._seek(start)
        while self.row is not self.header:
            self._raise_if_long()
            self._seek(self.index + 1)

    def _raise_if_long(self) -> None:
        n, k = len(self.header), len(self.row)
        if k > n and not (k == n + 1 and self.row[-1] == "" and self.trailing):
            raise EClogError(f"{self.name}:{self.line}: long row ({k} fields, the header has "
                             f"{n}): an unquoted comma in a value?")

    def line_of(self, index: int) -> int:
        """The line that data row `index` ends on (for an error message: the reader starts
        over if it is past the row)."""
        if self.file is not None and index < self.index:
            self.file.close()
            self.file, self.index = None, -1
        self._open()
        self._seek(index)
        return self.line

    def check(self, rows: npt.NDArray[np.intp]) -> None:
        """Raise :class:`EClogError` for the first of data rows `rows` (ascending) that is
        short, naming its line and the column it lacks."""
        if len(rows):
            self._open()
        n = len(self.header)
        for target in rows:
            self._seek(int(target))
            k = len(self.row)
            if k < n:
                missing = (f"column {self.header[k]!r} is missing" if k == n - 1 else
                           f"columns {self.header[k]!r} … {self.header[-1]!r} are missing")
                raise EClogError(f"{self.name}:{self.line}: short row ({k} of {n} fields): "
                                 f"{missing}")


def normalise(
    raw: pd.DataFrame,
    present: Mapping[str, str],
    *,
    name: str = "<csv>",
    first_line: int = 2,
    line_of: Callable[[int], int] | None = None,
) -> pd.DataFrame:
    """Raw string columns (``present``: field → column) → :data:`NORMALISED` columns.

    Error messages name the line of a row: ``line_of(i)`` for ``raw``'s row ``i`` if given
    (:func:`read_eclog` counts them in the file, blank lines and line breaks in quotes
    included), else ``first_line + i``.
    """
    n = len(raw)

    def where(i: int) -> str:
        return f"{name}:{line_of(i) if line_of is not None else first_line + i}"

    def text(field: str, default: str = "") -> pd.Series:
        if field in present:
            return raw[present[field]].astype(str).str.strip().reset_index(drop=True)
        return pd.Series([default] * n, dtype=str)

    # A request always has a time, a URI and (where the column exists) a method: an empty one
    # is an error. (A short row never gets here: `read_eclog` stops at it.)
    for field in ("time", "uri", "method"):
        if field in present:
            empty = (text(field) == "").to_numpy()
            if empty.any():
                i = int(np.argmax(empty))
                raise EClogError(f"{where(i)}: column {present[field]!r} is empty")
    # Every request has a visitor (:func:`visitors`): a UserId, or else an IpId.
    user, ip = text("user"), text("ip")
    anonymous = user.isin(_ANONYMOUS).to_numpy()
    if anonymous.any():
        nobody = anonymous & ip.isin(_ANONYMOUS).to_numpy()
        if nobody.any():
            i = int(np.argmax(nobody))
            raise EClogError(f"{where(i)}: {_nobody(present, user.iloc[i], ip.iloc[i])}")
    time_raw = text("time")
    times, problem = parse_times_checked(time_raw)
    bad = times.isna().to_numpy()
    if bad.any():
        i = int(np.argmax(bad))
        raise EClogError(f"{where(i)}: column {present['time']!r}: "
                         f"{time_problem(time_raw.iloc[i], problem.iloc[i])}")
    method = text("method", "GET").str.upper()
    return pd.DataFrame(
        {
            "time": times,
            "ip": ip,
            "user": user,
            "method": method,
            "uri": text("uri"),
            "version": text("version"),
            "status": pd.to_numeric(text("status"), errors="coerce").astype("Int64"),
            "bytes": pd.to_numeric(text("bytes"), errors="coerce").astype("Int64"),
            "referrer": text("referrer"),
            "user_agent": text("user_agent"),
        },
        columns=list(NORMALISED),
    )


def _nobody(present: Mapping[str, str], user: str, ip: str) -> str:
    """Why a row names no visitor, from the columns it has (``present``: field → column)."""
    said = [f"column {present[f]!r} is {v!r}" if f in present else f"no {header} column"
            for f, header, v in (("user", "UserId", user), ("ip", "IpId", ip))]
    return f"neither a UserId nor an IpId ({', '.join(said)})"


TIME_FORMATS: Final = (
    "ISO-8601, Apache, or epoch seconds, milliseconds, microseconds or .NET ticks"
)
TICKS_AT_EPOCH: Final = 621_355_968_000_000_000
""".NET ``DateTime.Ticks`` (100 ns since 0001-01-01) of 1970-01-01T00:00:00Z."""
# Numbers by magnitude (years 1973-5138 for each epoch unit; .NET ticks from 1585 on):
_NUMERIC_UNITS: Final = (  # (upper bound of |value|, nanoseconds per unit)
    (1e11, 10**9),  # epoch seconds
    (1e14, 10**6),  # epoch milliseconds
    (1e17, 10**3),  # epoch microseconds
)
_TICKS_RANGE: Final = (5e17, 3.2e18)  # DateTime.MinValue + 1585 years .. DateTime.MaxValue
_NS_LIMIT: Final = 9.2e18  # datetime64[ns] holds ±292 years around 1970


def numeric_times(
    numbers: pd.Series, text: pd.Series | None = None
) -> tuple[pd.Series, pd.Series]:
    """Numbers → (nanoseconds since the epoch, Int64 with NA where not a time; why not).

    The unit is told by the magnitude (:data:`_NUMERIC_UNITS`, :data:`_TICKS_RANGE`): a log
    of 2019 has 1.6e9 epoch seconds, 1.6e12 milliseconds, 1.6e15 microseconds and 6.4e17
    .NET ticks (EClog's ``TimeStamp``, as a public script that reads the dataset parses it).
    Why not: ``infinite``, ``unit`` (no known unit) or ``range`` (beyond datetime64[ns]).

    Integers convert exactly. Fractions (a column of them is a float column) keep their
    sub-second part: the whole units and the fraction are scaled apart, and the fraction is
    the shortest decimal of up to 9 digits that the float holds, so ``1575158403.123456`` is
    03.123456 s to the nanosecond (a float holds 6 decimals of epoch seconds, 3 of epoch
    milliseconds; more digits than that are as near as the float is: within 0.12 µs for
    epoch seconds of this century). ``text``, the strings the numbers were read from, reads
    a whole number beyond 2**53 (ticks) among fractions exactly.
    """
    if text is not None and numbers.dtype.kind == "f":
        big = (numbers.abs() >= 2**53).to_numpy()  # whole numbers a float does not hold
        if big.any():
            whole = big & ~text.str.contains("[.eEnN]").to_numpy()  # no point, exponent, inf
            ints = pd.to_numeric(text[whole], errors="coerce") if whole.any() else numbers[:0]
            if ints.dtype.kind in "iu":
                a, a_why = numeric_times(ints)
                b, b_why = numeric_times(numbers[~whole])
                return (pd.concat([a, b]).reindex(numbers.index),
                        pd.concat([a_why, b_why]).reindex(numbers.index))
    v = numbers.to_numpy(dtype=float)
    finite = np.isfinite(v)
    scale = np.zeros(len(v), dtype="int64")  # nanoseconds per unit; 0: not an epoch unit
    assigned = ~finite
    for bound, per_unit in _NUMERIC_UNITS:
        pick = ~assigned & (np.abs(v) < bound)
        scale[pick] = per_unit
        assigned |= pick
    ticks = ~assigned & (v >= _TICKS_RANGE[0]) & (v < _TICKS_RANGE[1])
    unknown = ~assigned & ~ticks
    scale[ticks] = 100
    with np.errstate(invalid="ignore", over="ignore"):
        approx = np.where(ticks, (v - TICKS_AT_EPOCH) * 100, v * scale)
        beyond = finite & ~unknown & ~(np.abs(approx) < _NS_LIMIT)
        ok = finite & ~unknown & ~beyond
        zero = np.where(ticks, TICKS_AT_EPOCH, 0)  # the epoch, in the unit
        if numbers.dtype.kind in "iu":  # exact: ticks have more digits than a float keeps
            w = numbers.to_numpy(dtype="int64")
            ns = (w - zero) * scale
        else:
            ns = _fraction_ns(np.where(ok, v, 0.0), scale, zero)
    why = np.select([~finite, unknown, beyond], ["infinite", "unit", "range"], "")
    out = pd.Series(pd.array(np.where(ok, ns, 0), dtype="Int64"), index=numbers.index)
    out[~ok] = pd.NA
    return out, pd.Series(why, index=numbers.index, dtype=object)


def _fraction_ns(
    v: npt.NDArray[np.float64], scale: npt.NDArray[np.int64], zero: npt.NDArray[np.int64]
) -> npt.NDArray[np.int64]:
    """Nanoseconds since the epoch of times `v` in units of `scale` ns counted from `zero`:
    the whole units exactly; the fraction as the shortest decimal of 0-9 digits within half a
    float step of it (the digits a log wrote, which the float is the nearest to), else as it
    is, to the nanosecond."""
    whole = np.floor(v)
    fraction = v - whole  # exact
    step = np.spacing(np.abs(v))
    part = fraction * scale
    left = np.ones(len(v), dtype=bool)
    for d in range(10):  # distinct decimals of d digits are 10**-d apart: one at most is near
        unit = 10.0**-d
        digits = np.round(fraction / unit)
        hit = left & (unit > 2 * step) & (np.abs(fraction - digits * unit) <= step / 2)
        part = np.where(hit, digits * scale * unit, part)
        left &= ~hit
        if not left.any():
            break
    return np.asarray((whole.astype(np.int64) - zero) * scale + np.round(part).astype(np.int64),
                      dtype=np.int64)


def time_problem(value: str, why: str = "") -> str:
    """Why `value` is not a time, in words (`why` from :func:`numeric_times`)."""
    if why == "infinite":
        return f"{value!r} is not a finite number"
    if why == "unit":
        return f"{value!r} is a number in no known time unit ({TIME_FORMATS})"
    if why == "range":
        return f"{value!r} is beyond the supported years 1678-2261"
    return f"cannot parse {value!r} as a time ({TIME_FORMATS})"


def parse_times(raw: pd.Series) -> pd.Series:
    """Strings → ``datetime64[ns, UTC]``; NaT where a value is not a time.

    Accepted: numbers (epoch seconds, milliseconds or microseconds, or .NET ticks, told apart
    by magnitude: :func:`numeric_times`), ISO-8601 (``2019-12-01T00:00:03``, a space instead
    of ``T``, an optional offset; naive times are UTC), and the Apache log format
    ``01/Dec/2019:00:00:03 +0100``.
    """
    return parse_times_checked(raw)[0]


def parse_times_checked(raw: pd.Series) -> tuple[pd.Series, pd.Series]:
    """:func:`parse_times`, and per value why it is not a time ("" where it is, or unknown)."""
    s = raw.astype(str).str.strip().reset_index(drop=True)
    out = pd.Series(pd.NaT, index=s.index, dtype="datetime64[ns, UTC]")
    reason = pd.Series("", index=s.index, dtype=object)
    numbers = pd.to_numeric(s, errors="coerce")
    is_num = numbers.notna()
    if is_num.any():
        ns, why = numeric_times(numbers[is_num], s[is_num])
        ok = ns.notna()
        out[ns.index[ok]] = pd.to_datetime(ns[ok].astype("int64"), unit="ns", utc=True)
        reason[why.index] = why.to_numpy()
    rest = ~is_num & (s != "")
    if rest.any():
        iso = pd.to_datetime(s[rest], format="ISO8601", utc=True, errors="coerce")
        out[rest] = _as_ns(iso, reason)
        left = rest & out.isna() & (reason == "")
        if left.any():
            apache = pd.to_datetime(
                s[left], format="%d/%b/%Y:%H:%M:%S %z", utc=True, errors="coerce"
            )
            out[left] = _as_ns(apache, reason)
    return out, reason


def _as_ns(times: pd.Series, reason: pd.Series) -> pd.Series:
    """Parsed times (any unit) → ``datetime64[ns, UTC]``; NaT, and ``range`` in `reason`,
    where a time is beyond what nanoseconds hold (years 1678-2261)."""
    lo, hi = pd.Timestamp.min.tz_localize("UTC"), pd.Timestamp.max.tz_localize("UTC")
    beyond = times.notna() & ((times < lo) | (times > hi))
    reason[beyond.index[beyond]] = "range"
    out: pd.Series = times.where(~beyond).dt.as_unit("ns")
    return out


def parse_time(value: str) -> pd.Timestamp:
    """One time for ``--start``/``--end`` (same formats as :func:`parse_times`)."""
    times, reason = parse_times_checked(pd.Series([value]))
    if pd.isna(times.iloc[0]):
        raise EClogError(time_problem(value, reason.iloc[0]))
    return pd.Timestamp(times.iloc[0])


def _missing_column(name: str, field: str, column: str, header: list[str]) -> str:
    return (
        f"{name}:1: column {column!r} (field {field!r}) not in the header "
        f"[{', '.join(header)}]; map it with --columns {field}=<header name>"
    )


# -- mapping to a trace ----------------------------------------------------------------------


@dataclass(frozen=True)
class EClogConvertParams:
    """How EClog requests become trace events.

    ``ttl``: idle seconds (in the log's own time, before speed-up) after which a visitor's next
    request starts a new session with a new login. ``start``/``end``: keep requests with
    ``start <= time < end``. ``speedup``: trace seconds = log seconds / speedup, counted from
    ``start`` (or the first kept request); naive times are UTC. ``host``: upstream host for
    relative URIs.
    ``logouts``: turn logout-looking requests (``logout_pattern``, a regex on the path) into
    logout events that end the session.
    """

    ttl: float = 600.0
    start: pd.Timestamp | None = None
    end: pd.Timestamp | None = None
    speedup: float = 1.0
    host: str = "shop.example"
    logouts: bool = False
    logout_pattern: str = LOGOUT_PATTERN
    name: str = "eclog"

    def __post_init__(self) -> None:
        # Naive times are UTC, like the log's.
        for name in ("start", "end"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _utc(value))
        if not self.ttl > 0:
            raise EClogError(f"ttl must be > 0 seconds, got {self.ttl}")
        if not (self.speedup > 0 and math.isfinite(self.speedup)):
            raise EClogError(f"speedup must be a positive number, got {self.speedup}")
        if self.start is not None and self.end is not None and self.end <= self.start:
            raise EClogError(f"end {self.end} is not after start {self.start}")
        if not self.host:
            raise EClogError("host must not be empty")


def visitors(df: pd.DataFrame) -> pd.Series:
    """Visitor label per row: ``u<UserId>``, or ``ip<IpId>`` when UserId is empty/0.

    Reads ``user`` and ``ip``. Rows with neither are an :class:`EClogError` naming the row's
    index label (:func:`read_eclog` refuses such a row first, naming its file and line).
    """
    user = df["user"].astype(str)
    ip = df["ip"].astype(str)
    anon = user.isin(_ANONYMOUS)
    no_ip = anon & ip.isin(_ANONYMOUS)
    if no_ip.any():
        i = int(np.argmax(no_ip.to_numpy()))
        raise EClogError(f"row {df.index[i]}: neither a UserId nor an IpId")
    return ("u" + user).where(~anon, "ip" + ip)


def _window(df: pd.DataFrame, p: EClogConvertParams) -> pd.DataFrame:
    """Rows with ``start <= time < end``."""
    d = df
    if p.start is not None:
        d = d[d["time"] >= _utc(p.start)]
    if p.end is not None:
        d = d[d["time"] < _utc(p.end)]
    return d


def split_uris(uri: pd.Series, default_host: str) -> tuple[pd.Series, pd.Series]:
    """EClog URIs → (host, path): absolute URLs keep their host, others get ``default_host``;
    paths always start with ``/``."""
    path = uri.astype(str).reset_index(drop=True)
    host = pd.Series([default_host] * len(path), dtype=str)
    absolute = path.str.contains("://", regex=False).to_numpy(dtype=bool)
    if absolute.any():
        parts = path[absolute].str.extract(r"^[A-Za-z][A-Za-z0-9+.-]*://([^/?#]*)(.*)$")
        ok = parts[0].notna() & (parts[0] != "")
        host[absolute] = parts[0].where(ok, default_host).to_numpy()
        path[absolute] = parts[1].where(parts[1].notna(), path[absolute]).to_numpy()
    relative = ~path.str.startswith("/").to_numpy(dtype=bool)
    if relative.any():
        path[relative] = ("/" + path[relative]).to_numpy()
    return host, path


def eclog_events(df: pd.DataFrame, params: EClogConvertParams | None = None) -> pd.DataFrame:
    """Normalised EClog frame → events frame (columns of :meth:`Trace.to_frame`), in order.

    Reads ``time user ip method uri``; does not modify ``df``.
    """
    p = params or EClogConvertParams()
    d = _window(df, p)
    if d.empty:
        return pd.DataFrame({c: pd.Series(dtype=float if c == "time" else str) for c in FIELDS})
    us = _epoch_us(d["time"])
    order = np.argsort(us, kind="stable")
    d = d.iloc[order]
    who = visitors(d).reset_index(drop=True)  # (an error names the row of `df`)
    d = d.reset_index(drop=True)
    us = us[order]
    secs = us / 1e6
    us0 = us[0] if p.start is None else _epoch_us(pd.Series([_utc(p.start)]))[0]
    check_trace_span((us[-1] - us0) / 1e6, p)
    host, path = split_uris(d["uri"], p.host)
    if p.logouts:
        bare = path.str.replace(r"[?#].*$", "", regex=True)  # as trace.looks_like_logout
        is_logout = bare.str.contains(p.logout_pattern, regex=True).to_numpy(dtype=bool)
    else:
        is_logout = np.zeros(len(d), dtype=bool)
    t = pd.Series(secs)
    by = pd.factorize(who)[0]
    gap = t - t.groupby(by).shift()
    after_logout = pd.Series(is_logout).groupby(by).shift(fill_value=False).astype(bool)
    new = (gap.isna() | (gap > p.ttl) | after_logout).to_numpy(dtype=bool)
    n = pd.Series(new.astype(np.int64)).groupby(by).cumsum()
    token = who + "-" + n.astype(str)
    requests = pd.DataFrame(
        {
            "time": (us - us0) / (1e6 * p.speedup),
            "kind": np.where(is_logout, "logout", "request"),
            "user": who,
            "token": token,
            "method": d["method"].astype(str),
            "host": host,
            "path": path,
        }
    )
    logins = requests[new].assign(kind="login", method="", path="")
    events = pd.concat([logins, requests], ignore_index=True)
    seq = np.concatenate([np.flatnonzero(new), np.arange(len(requests))])
    rank = events["kind"].map(KIND_RANK).to_numpy()
    # By time; a login comes right before the request that opens its session.
    ordered = np.lexsort((rank, seq, events["time"].to_numpy()))
    return events.iloc[ordered].reset_index(drop=True)


def eclog_to_trace(df: pd.DataFrame, params: EClogConvertParams | None = None) -> Trace:
    """Normalised EClog frame → :class:`Trace` (see :func:`eclog_events`).

    ``meta.start`` is the wall-clock time of ``t = 0`` (``start``, else the first request),
    rounded down to the microsecond, as the trace's times are (float seconds): a log's
    nanoseconds do not reach the trace.
    """
    p = params or EClogConvertParams()
    events = eclog_events(df, p)
    kept = _window(df, p)["time"]
    first = _utc(p.start) if p.start is not None else (kept.min() if len(kept) else None)
    hosts = tuple(dict.fromkeys(events.loc[events["kind"] != "login", "host"].tolist()))
    meta = TraceMeta(
        name=p.name,
        description=(
            f"EClog requests as sessions (new login after {p.ttl:g} s idle), "
            f"time compressed {p.speedup:g}x"
        ),
        tenants=hosts,
        hosts=hosts,
        start=None if first is None else pd.Timestamp(first).floor("us").to_pydatetime(),
        extra={
            "scenario": "eclog",
            "ttl": p.ttl,
            "speedup": p.speedup,
            "window": [
                None if p.start is None else _utc(p.start).isoformat(),
                None if p.end is None else _utc(p.end).isoformat(),
            ],
            "logouts": p.logouts,
        },
    )
    return Trace.from_frame(events, meta)


def _utc(t: pd.Timestamp | datetime) -> pd.Timestamp:
    ts = pd.Timestamp(t)
    return ts.tz_localize("UTC") if ts.tzinfo is None else ts.tz_convert("UTC")


def _epoch_us(times: pd.Series) -> npt.NDArray[np.int64]:
    """UTC datetimes → whole microseconds since the epoch (rounded down: a trace's times
    are float seconds, which keep microseconds, and its ``meta.start`` a Python datetime)."""
    ns = times.dt.as_unit("ns").astype("int64").to_numpy()
    return np.asarray(ns // 1000, dtype=np.int64)


def check_trace_span(seconds: float, p: EClogConvertParams) -> None:
    """Refuse a log whose kept requests run `seconds` (log time, from ``t = 0``) that, sped
    up by ``p.speedup``, pass a trace's limit (:data:`~scenarios.trace.MAX_TRACE_SECONDS`)."""
    if seconds / p.speedup > MAX_TRACE_SECONDS:
        need = math.ceil(seconds / MAX_TRACE_SECONDS)
        raise EClogError(
            f"{p.name}: the requests run {span_text(seconds / p.speedup)} of trace time, beyond "
            f"a trace's limit of {span_text(MAX_TRACE_SECONDS)}: compress time (--speedup "
            f"{need} or more) or keep a window (--start/--end)")


# -- the generator ---------------------------------------------------------------------------


SaleShape = Literal["flash", "ramp", "long-tail"]
SALE_SHAPES: Final[tuple[SaleShape, ...]] = ("flash", "ramp", "long-tail")


@dataclass(frozen=True)
class Sale:
    """One sale: ``new_users`` NEW visitors whose session starts follow ``shape`` from ``hour``
    on ``day`` (0: the first day), over ``duration`` seconds.

    - ``flash``: a flash crowd; the rate rises linearly for ``rise`` seconds, then decays
      exponentially to 1 % of its peak at ``duration``;
    - ``ramp``: a slow ramp; the rate rises linearly for ``rise`` seconds (most of the sale),
      then falls linearly to 0 at ``duration``;
    - ``long-tail``: a quick rise (``rise``), then a power-law tail, rate ∝ (1 + s/τ)^−1.5 with
      τ = ``duration``/20, cut at ``duration``.
    """

    day: int
    hour: float = 20.0
    new_users: int = 3000
    shape: SaleShape = "flash"
    rise: float = 300.0
    duration: float = 3600.0

    def __post_init__(self) -> None:
        checks = [
            (self.day >= 0, "sale day must be >= 0"),
            (0 <= self.hour < 24, "sale hour must be in [0, 24)"),
            (self.new_users >= 0, "sale new_users must be >= 0"),
            (self.shape in SALE_SHAPES, f"sale shape must be one of {', '.join(SALE_SHAPES)}"),
            (0 < self.rise < self.duration, "a sale needs 0 < rise < duration"),
            (self.duration < math.inf, "a sale's duration must be finite"),
        ]
        for ok, message in checks:
            if not ok:
                raise EClogError(f"generator: {message}")

    @classmethod
    def parse(cls, spec: str) -> Sale:
        """``DAY[@HOUR][:SHAPE[:USERS[:DURATION[:RISE]]]]``, e.g. ``4@20:flash:3000``,
        ``1@9:ramp:2000:8h:6h``, ``2:long-tail``; durations take s, m, h. EClogError if bad."""
        parts = spec.strip().split(":")
        try:
            day_s, _, hour_s = parts[0].partition("@")
            values: dict[str, Any] = {"day": int(day_s)}
            if hour_s:
                values["hour"] = float(hour_s)
            if len(parts) > 1 and parts[1]:
                values["shape"] = parts[1]
            if len(parts) > 2 and parts[2]:
                values["new_users"] = int(parts[2])
            if len(parts) > 3 and parts[3]:
                values["duration"] = _seconds(parts[3])
            shape = values.get("shape", "flash")
            duration = values.get("duration", cls.default_duration(shape))
            values["duration"] = duration
            values["rise"] = (_seconds(parts[4]) if len(parts) > 4 and parts[4]
                              else cls.default_rise(shape, duration))
            if len(parts) > 5:
                raise ValueError("too many fields")
        except ValueError as e:
            raise EClogError(
                f"sale {spec!r}: {e} (expected DAY[@HOUR][:SHAPE[:USERS[:DURATION[:RISE]]]], "
                "e.g. 4@20:flash:3000)") from None
        return cls(**values)

    @staticmethod
    def default_duration(shape: str) -> float:
        """A flash crowd lasts an hour, a ramp 6 h, a long tail 12 h."""
        return {"ramp": 6 * 3600.0, "long-tail": 12 * 3600.0}.get(shape, 3600.0)

    @staticmethod
    def default_rise(shape: str, duration: float) -> float:
        """5 min for a flash crowd or a long tail; 80 % of the sale for a ramp."""
        return 0.8 * duration if shape == "ramp" else min(300.0, duration / 2)

    def density(self) -> npt.NDArray[np.float64]:
        """Share of the sale's new visitors that arrive in each second after it starts."""
        s = np.arange(math.ceil(self.duration), dtype=np.float64) + 0.5
        up = s / self.rise
        if self.shape == "flash":
            tau = (self.duration - self.rise) / math.log(100)
            down = np.exp(-(s - self.rise) / tau)
        elif self.shape == "ramp":
            down = np.maximum(1 - (s - self.rise) / (self.duration - self.rise), 0.0)
        else:
            tau = self.duration / 20
            down = (1 + (s - self.rise) / tau) ** -1.5
        rate = np.where(s < self.rise, up, down)
        return np.asarray(rate / rate.sum(), dtype=np.float64)


def _seconds(text: str) -> float:
    units = {"s": 1.0, "m": 60.0, "h": 3600.0}
    text = text.strip().lower()
    if text and text[-1] in units:
        return float(text[:-1]) * units[text[-1]]
    return float(text)


_FIRST_DAY, _LAST_DAY = date(1677, 9, 22), date(2262, 4, 11)  # whole days datetime64[ns] holds


@dataclass(frozen=True)
class EClogGenParams:
    """A synthetic store's traffic (all times in seconds unless the name says otherwise).

    Sessions start as a Poisson process whose hourly rate follows a daily cosine: its mean is
    ``requests_per_hour / session_requests_mean`` sessions per hour, its maximum at
    ``peak_hour`` is ``peak_to_trough`` times its minimum twelve hours later (the night trough).
    A session has a geometric (or lognormal) number of requests with mean
    ``session_requests_mean`` and lognormal think times with mean ``think_time_mean``. With
    probability ``revisit_prob`` a session belongs to a returning visitor (uniformly one of the
    earlier ones), otherwise to a new one; ``anonymous_share`` of visitors have no UserId (they
    are known by IpId). A registered visitor's session ends with ``/logout`` with probability
    ``logout_prob``.

    The sale spike (when ``spike_day`` is set: 0 is the first day) brings ``spike_new_users``
    NEW visitors whose session starts rise linearly for ``spike_rise`` seconds from
    ``spike_hour`` on that day, then decay exponentially to 1 % of the peak rate at
    ``spike_duration`` seconds: a flash-crowd :class:`Sale`. ``sales`` adds any number of sales
    of any shape (flash crowd, slow ramp, long tail); they overlap freely and merge into one
    trace.
    """

    days: int = 1
    start: date = date(2019, 12, 1)
    requests_per_hour: float = 3000.0
    peak_to_trough: float = 8.0
    peak_hour: float = 20.0
    session_requests_mean: float = 8.0
    session_length: Literal["geometric", "lognormal"] = "geometric"
    session_requests_sigma: float = 1.0
    think_time_mean: float = 30.0
    think_time_sigma: float = 1.0
    revisit_prob: float = 0.3
    anonymous_share: float = 0.4
    logout_prob: float = 0.05
    spike_day: int | None = None
    spike_hour: float = 20.0
    spike_new_users: int = 3000
    spike_rise: float = 300.0
    spike_duration: float = 3600.0
    sales: tuple[Sale, ...] = ()
    time_format: Literal["iso", "epoch"] = "iso"
    seed: int = 1

    def __post_init__(self) -> None:
        checks = [
            (self.days >= 1, "days must be >= 1"),
            (self.start >= _FIRST_DAY,
             f"start {self.start} is before {_FIRST_DAY}, beyond the times an EClog file can "
             "hold (years 1678-2261)"),
            (self.days <= (_LAST_DAY - self.start).days,
             f"{_days(self.days)} from {self.start} run past {_LAST_DAY}, beyond the times "
             f"an EClog file can hold (years 1678-2261): at most {(_LAST_DAY - self.start).days}"
             " days"),
            (0 < self.requests_per_hour < math.inf, "requests_per_hour must be > 0 and finite"),
            (self.peak_to_trough >= 1, "peak_to_trough must be >= 1"),
            (0 <= self.peak_hour < 24, "peak_hour must be in [0, 24)"),
            (self.session_requests_mean >= 1, "session_requests_mean must be >= 1"),
            (self.session_length in ("geometric", "lognormal"), "unknown session_length"),
            (self.think_time_mean > 0, "think_time_mean must be > 0"),
            (self.session_requests_sigma > 0 and self.think_time_sigma > 0, "sigmas must be > 0"),
            (0 <= self.revisit_prob < 1, "revisit_prob must be in [0, 1)"),
            (0 <= self.anonymous_share <= 1, "anonymous_share must be in [0, 1]"),
            (0 <= self.logout_prob <= 1, "logout_prob must be in [0, 1]"),
            (
                self.spike_day is None or 0 <= self.spike_day < self.days,
                f"spike_day must be in [0, {self.days - 1}] (days after start)",
            ),
            (0 <= self.spike_hour < 24, "spike_hour must be in [0, 24)"),
            (self.spike_new_users >= 0, "spike_new_users must be >= 0"),
            (0 < self.spike_rise < self.spike_duration, "need 0 < spike_rise < spike_duration"),
            (all(sale.day < self.days for sale in self.sales),
             f"a sale's day must be in [0, {self.days - 1}] (days after start)"),
            (self.time_format in ("iso", "epoch"), "time_format must be iso or epoch"),
        ]
        for ok, message in checks:
            if not ok:
                raise EClogError(f"generator: {message}")

    @property
    def start_time(self) -> datetime:
        return datetime(self.start.year, self.start.month, self.start.day, tzinfo=UTC)

    def all_sales(self) -> tuple[Sale, ...]:
        """``sales``, with the spike (if ``spike_day`` is set) as a flash-crowd sale first."""
        if self.spike_day is None:
            return self.sales
        spike = Sale(day=self.spike_day, hour=self.spike_hour, new_users=self.spike_new_users,
                     shape="flash", rise=self.spike_rise, duration=self.spike_duration)
        return (spike, *self.sales)

    @property
    def spike_time(self) -> datetime | None:
        """Wall-clock start of the spike."""
        if self.spike_day is None:
            return None
        return self.start_time + timedelta(days=self.spike_day, hours=self.spike_hour)


def hourly_shape(params: EClogGenParams, hour_of_day: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Relative rate at ``hour_of_day`` (mean 1 over a day; peak/trough = ``peak_to_trough``)."""
    a = (params.peak_to_trough - 1) / (params.peak_to_trough + 1)
    h = np.asarray(hour_of_day, dtype=np.float64)
    return np.asarray(1 + a * np.cos(2 * np.pi * (h - params.peak_hour) / 24), dtype=np.float64)


def spike_density(params: EClogGenParams) -> npt.NDArray[np.float64]:
    """Share of the spike's new visitors that arrive in each second after the spike starts."""
    return Sale(day=0, rise=params.spike_rise, duration=params.spike_duration).density()


# Pages: (prefix, number of ids, method, probability). URIs are codes into one vocabulary.
_PAGE_KINDS: Final = (
    ("/", 0, "GET", 0.10),
    ("/category/", 40, "GET", 0.25),
    ("/product/", 20000, "GET", 0.45),
    ("/search?q=", 500, "GET", 0.10),
    ("/cart", 0, "POST", 0.07),
    ("/checkout", 0, "POST", 0.03),
)
_METHODS: Final = ("GET", "POST")


@cache
def _uri_vocabulary() -> tuple[npt.NDArray[np.str_], npt.NDArray[np.int64]]:
    """All generated URIs (then ``/logout`` and ``-``) and each page kind's first code."""
    uris: list[str] = []
    first: list[int] = []
    for prefix, n_ids, _, _ in _PAGE_KINDS:
        first.append(len(uris))
        uris.extend([prefix] if n_ids == 0 else [f"{prefix}{i}" for i in range(1, n_ids + 1)])
    uris.extend(["/logout", "-"])
    return np.array(uris), np.array(first, dtype=np.int64)


_AGENTS: Final = (
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/78.0 Safari/537.36",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64; rv:70.0) Gecko/20100101 Firefox/70.0",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 13_2 like Mac OS X) AppleWebKit/605.1.15 Mobile",
    "Mozilla/5.0 (Linux; Android 9; SM-G960F) AppleWebKit/537.36 Chrome/78.0 Mobile",
    "Mozilla/5.0 (Macintosh; Intel Mac OS X 10_15) AppleWebKit/605.1.15 Safari/605.1.15",
)


GEN_BYTES_PER_REQUEST: Final = 512
"""Peak memory of :func:`generate_eclog` per request, rounded up: measured (peak RSS) at 495-500
bytes with ISO times over 1.4 and 4.3 million requests, 330 with epoch times."""
GEN_BYTES_PER_SECOND: Final = 48
"""And per second of the time it covers (the per-second session-start rates): measured 31."""


def generator_size(params: EClogGenParams) -> tuple[float, float]:
    """(requests, bytes): about how many requests :func:`generate_eclog` makes for `params`
    (the mean rate over every day, and each sale's new visitors' sessions), and the memory
    it needs to make them (:data:`GEN_BYTES_PER_REQUEST`, :data:`GEN_BYTES_PER_SECOND`)."""
    sales = params.all_sales()
    requests = (params.requests_per_hour * 24 * params.days
                + sum(sale.new_users for sale in sales) * params.session_requests_mean)
    seconds = params.days * 86_400 + sum(math.ceil(sale.duration) for sale in sales)
    return requests, requests * GEN_BYTES_PER_REQUEST + seconds * GEN_BYTES_PER_SECOND


def available_memory() -> int | None:
    """Bytes of memory this process may still take: the kernel's ``MemAvailable``, or less
    under a cgroup limit; None where neither can be read (not Linux)."""
    found: list[int] = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            found.append(int(Path(limit).read_text()) - int(Path(usage).read_text()))
        except (OSError, ValueError):  # no such cgroup, or no limit ("max")
            continue
    return max(0, min(found)) if found else None


def check_generator_fits(params: EClogGenParams, available: int | None = None) -> None:
    """Refuse `params` whose traffic would not fit in memory (`available` bytes; default:
    :func:`available_memory`, no check when unknown), in one line, before anything is
    allocated: ``--days 100000`` would otherwise run the machine out of memory."""
    available = available_memory() if available is None else available
    if available is None:
        return
    requests, need = generator_size(params)
    if need <= available:
        return
    per_day = (params.requests_per_hour * 24 * GEN_BYTES_PER_REQUEST
               + 86_400 * GEN_BYTES_PER_SECOND)
    sales = need - per_day * params.days
    days = math.floor((available - sales) / per_day)
    fits = f", enough for {_days(days)} at this rate" if days >= 1 else ""
    raise EClogError(
        f"generator: {_days(params.days)} at {params.requests_per_hour:g} requests/hour"
        f"{' and the sales' if params.all_sales() else ''} make about {requests:.2g} requests, "
        f"which need about {_size(need)} of memory to generate ({GEN_BYTES_PER_REQUEST} bytes "
        f"a request); {_size(available)} is available{fits}: ask for fewer --days"
        f"{', a lower --requests-per-hour or smaller sales' if params.all_sales() else ''}"
        f"{' or a lower --requests-per-hour' if not params.all_sales() else ''}")


def _days(n: int) -> str:
    return "1 day" if n == 1 else f"{n} days"


def _size(n: float) -> str:
    """Bytes in words: ``512 MB``, ``3.7 TB``."""
    for unit in ("bytes", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.3g} {unit}" if unit != "bytes" else f"{n:.0f} bytes"
        n /= 1000
    raise AssertionError  # (unreachable)


def generate_eclog(
    params: EClogGenParams | None = None, columns: EClogColumns | None = None
) -> pd.DataFrame:
    """EClog-format requests, sorted by time, at 1-second resolution.

    Columns: the CSV header of ``columns`` (what :func:`write_eclog` writes) plus the ground
    truth ``_session`` (session number in order of start), ``_new`` (the session is the
    visitor's first), ``_spike`` (the session belongs to the sale spike) and ``_t`` (seconds
    since the start, before rounding). Deterministic for a given ``params`` (seed included).
    """
    p = params or EClogGenParams()
    check_generator_fits(p)
    cols = columns or EClogColumns()
    rng = np.random.default_rng(p.seed)
    horizon = p.days * 86400

    # Session starts: Poisson counts per second, jittered within the second.
    sec = np.arange(horizon, dtype=np.float64)
    sessions_per_s = p.requests_per_hour / p.session_requests_mean / 3600.0
    lam = sessions_per_s * hourly_shape(p, (sec % 86400) / 3600.0)
    counts = rng.poisson(lam)
    base_starts = np.repeat(sec, counts) + rng.random(int(counts.sum()))
    spike_parts = [np.empty(0)]
    for sale in p.all_sales():
        if sale.new_users <= 0:
            continue
        density = sale.density()
        offsets = rng.choice(len(density), size=sale.new_users, p=density)
        t_spike = sale.day * 86400 + sale.hour * 3600
        starts_of_sale = t_spike + offsets + rng.random(sale.new_users)
        spike_parts.append(starts_of_sale[starts_of_sale < horizon])
    spike_starts = np.concatenate(spike_parts)
    starts = np.concatenate([base_starts, spike_starts])
    is_spike = np.concatenate([np.zeros(len(base_starts), bool), np.ones(len(spike_starts), bool)])
    order = np.argsort(starts, kind="stable")
    starts, is_spike = starts[order], is_spike[order]
    n_sessions = len(starts)

    # Visitors: spike sessions and a share of the others are new; the rest return.
    is_new = is_spike | (rng.random(n_sessions) >= p.revisit_prob)
    is_new[:1] = True  # nobody to return yet
    new_before: npt.NDArray[np.int64] = np.cumsum(is_new) - is_new
    visitor = np.cumsum(is_new) - 1
    returning = ~is_new
    visitor[returning] = np.floor(rng.random(int(returning.sum())) * new_before[returning]).astype(
        np.int64
    )
    n_visitors = int(is_new.sum())
    anonymous = rng.random(n_visitors) < p.anonymous_share
    agent = rng.integers(0, len(_AGENTS), n_visitors)

    # Requests per session and their times.
    if p.session_length == "geometric":
        length = rng.geometric(1.0 / p.session_requests_mean, n_sessions)
    else:
        sigma = p.session_requests_sigma
        mu = math.log(p.session_requests_mean) - sigma**2 / 2
        length = np.maximum(1, np.rint(rng.lognormal(mu, sigma, n_sessions))).astype(np.int64)
    session = np.repeat(np.arange(n_sessions), length)
    first = np.concatenate([[0], np.cumsum(length)[:-1]]).astype(np.int64)
    position = np.arange(len(session)) - first[session]
    mu_think = math.log(p.think_time_mean) - p.think_time_sigma**2 / 2
    think = rng.lognormal(mu_think, p.think_time_sigma, len(session))
    think[first] = 0.0
    elapsed = np.cumsum(think)
    elapsed -= elapsed[first][session]
    t = starts[session] + elapsed
    last = position == length[session] - 1

    # Pages, as codes into the URI vocabulary.
    vocab, first_code = _uri_vocabulary()
    logout_code, dash_code = len(vocab) - 2, len(vocab) - 1
    n_req = len(session)
    page = rng.choice(len(_PAGE_KINDS), size=n_req, p=[k[3] for k in _PAGE_KINDS])
    n_ids = np.array([max(k[1], 1) for k in _PAGE_KINDS])[page]
    uri = first_code[page] + np.floor(rng.random(n_req) * n_ids).astype(np.int64)
    method = np.array([_METHODS.index(k[2]) for k in _PAGE_KINDS])[page]
    who = visitor[session]
    logout = last & ~anonymous[who] & (rng.random(n_req) < p.logout_prob)
    uri[logout] = logout_code
    method[logout] = _METHODS.index("POST")
    status = rng.choice(np.array([200, 302, 304, 404]), size=n_req, p=[0.9, 0.04, 0.04, 0.02])
    status[logout] = 302
    size = np.where(status == 200, rng.lognormal(9.5, 1.0, n_req).astype(np.int64), 0)
    referrer = np.where(position == 0, dash_code, np.roll(uri, 1))

    # Order by time (ties: session start order, then position), cut at the horizon.
    keep = t < horizon
    idx = np.flatnonzero(keep)
    whole = np.floor(t[idx]).astype(np.int64)
    idx = idx[np.lexsort((position[idx], session[idx], whole))]
    whole = np.floor(t[idx]).astype(np.int64)
    epoch0 = int(p.start_time.timestamp())
    if p.time_format == "epoch":
        stamp: npt.NDArray[Any] = epoch0 + whole
    else:
        stamp = (np.datetime64(epoch0, "s") + whole).astype(str)
    v = who[idx]
    anon_v = anonymous[v]
    out = pd.DataFrame(
        {
            cols.ip: v + 1,
            cols.user: np.where(anon_v, 0, v + 1),
            cols.time: stamp,
            cols.method: _categorical(method[idx], _METHODS),
            cols.uri: _categorical(uri[idx], vocab),
            cols.version: "HTTP/1.1",
            cols.status: status[idx],
            cols.bytes: size[idx],
            cols.referrer: _categorical(referrer[idx], vocab),
            cols.user_agent: _categorical(agent[v], _AGENTS),
            "_session": session[idx],
            "_new": is_new[session[idx]],
            "_spike": is_spike[session[idx]],
            "_t": t[idx],
        }
    )
    return out


def _categorical(codes: npt.NDArray[Any], names: Any) -> pd.Categorical:
    """Strings as codes into ``names`` (cheap to build for hundreds of thousands of rows)."""
    return pd.Categorical.from_codes(np.asarray(codes, dtype=np.int64), pd.Index(list(names)))


def write_eclog(
    df: pd.DataFrame,
    path: str | Path | TextIO,
    *,
    progress: bool = False,
    chunksize: int = 100_000,
) -> None:
    """Write a generated frame as CSV, without the ground-truth ``_`` columns."""
    out = df.loc[:, [c for c in df.columns if not str(c).startswith("_")]]
    if isinstance(path, str | Path):
        with open(path, "w", encoding="utf-8", newline="") as f:
            write_eclog(out, f, progress=progress, chunksize=chunksize)
        return
    with tqdm(total=len(out), desc="write CSV", unit=" rows", disable=not progress) as bar:
        for i in range(0, max(len(out), 1), chunksize):
            part = out.iloc[i : i + chunksize]
            part.to_csv(path, index=False, header=i == 0)
            bar.update(len(part))
