"""`python -m scenarios`: every sub-command meets bad input with one line on stderr and exit 2,
never a traceback; a closed pipe (`… | head`) ends it quietly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from scenarios.__main__ import COMMANDS, main
from scenarios.fig4 import fig4_title
from scenarios.standard import SCENARIOS
from scenarios.trace import Event, Trace

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "broken.jsonl").write_text("not json\n")
    (tmp_path / "oops.har").write_text(
        '{"log": {"entries": [{"startedDateTime": "2020-01-01T00:00:00Z", "request": '
        '{"method": "GET", "url": "http://a/", "headers": "oops"}}]}}')
    (tmp_path / "inf.csv").write_text("TimeStamp,Uri,UserId\ninf,/,1\n")
    assert main(["basic", "--out", str(tmp_path / "ok.jsonl"), "--count", "2"]) == 0
    Trace((Event.login(0, "u", "t"),)).write_jsonl(tmp_path / "logins.jsonl")  # no request
    (tmp_path / "ok.csv").write_text("TimeStamp,Uri,UserId\n2019-12-01T00:00:01,/,1\n")
    return tmp_path


# Each sub-command with input that must be refused before anything starts.
BAD = {
    "basic": [["--out", "x.jsonl", "--count", "-1"], ["--out", "x.jsonl", "--interval", "nan"],
              ["--out", "missing-dir/x.jsonl"]],
    "eclog-generate": [["--out", "g.csv", "--days", "0"], ["--out", "g.csv", "--start", "May"]],
    "eclog-convert": [["inf.csv", "--out", "t.jsonl"], ["nope.csv", "--out", "t.jsonl"],
                      ["inf.csv", "--out", "t.jsonl", "--ttl", "-1"],
                      ["inf.csv", "--out", "t.jsonl", "--columns", "bogus=X"]],
    "eclog-plot": [["nope.csv", "--out", "p.png"], ["inf.csv", "--out", "p.png", "--bin", "0"],
                   ["ok.csv", "--out", "p.txt"]],
    "har-write": [["broken.jsonl", "--out", "x.har"], ["ok.jsonl", "--out", "x.har",
                                                       "--base", "noon"]],
    "har-read": [["oops.har", "--out", "t.jsonl"], ["broken.jsonl", "--out", "t.jsonl"]],
    "har-replay": [["oops.har"], ["nope.har"], ["oops.har", "--speed", "0"]],
    "info": [["broken.jsonl"], ["ok.jsonl", "--ttl", "-5"]],
    "demo": [["--speed", "0"], ["--count", "0"]],
    "experiment": [["--trace", "ok.jsonl", "--out", "e", "--policies", "bogus"],
                   ["--trace", "ok.jsonl", "--out", "e", "--sample-interval", "0"],
                   ["--trace", "ok.jsonl", "--out", "e", "--jobs", "0"],
                   ["--trace", "nope.jsonl", "--out", "e"],
                   ["--trace", "logins.jsonl", "--out", "e", "--policies", "none"],
                   ["--trace", "ok.jsonl", "--out", "e", "--policies", "none",
                    "--filter-config", '{"ttl_seconds": -5}']],
    "standard": [["--jobs", "0"], ["--only", "nothing"]],
    "fig4": [["--count", "0"], ["--interval", "inf"]],
    "auth-server": [["--port", "99999"], ["--fail-rate", "2", "--no-store", "--port", "0"]],
    "shop": [["--port", "99999"], ["--port", "http"]],
    "replay": [["ok.jsonl", "--proxy", "notaurl"], ["ok.jsonl", "--speed", "0"],
               ["ok.jsonl", "--proxy", "http://127.0.0.1:99999"],
               ["ok.jsonl", "--auth", "http://[::1"],
               ["ok.jsonl", "--concurrency", "0"], ["nope.jsonl"]],
    "live": [["--quick", "--speed", "0"], ["--quick", "--policy", "bogus"],
             ["--trace", "nope.jsonl"], ["--trace", "logins.jsonl"]],
    "store": [["export", "requests", "--store", "nope-dir"], ["export", "nothing"],
              ["export", "requests", "--store", "mongodb://127.0.0.1:1/", "--timeout", "0.2"],
              ["list", "--store", "mongodb+srv://nonexistent.invalid/"]],
}


def test_every_command_has_bad_input_cases() -> None:
    assert {c.name for c in COMMANDS} == set(BAD)


@pytest.mark.parametrize(("command", "args"), [
    (command, args) for command, cases in BAD.items() for args in cases])
def test_bad_input_is_one_line_and_exit_2(files, monkeypatch, capsys, command, args) -> None:
    monkeypatch.chdir(files)
    with pytest.raises(SystemExit) as exit_info:
        sys.exit(main([command, *args]))
    err = capsys.readouterr().err
    assert exit_info.value.code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], err
    assert "Traceback" not in err


def test_filter_config_takes_a_file(files, monkeypatch, capsys) -> None:
    """`--filter-config @path` reads the file, as wasm_filter_config does."""
    monkeypatch.chdir(files)
    (files / "config.json").write_text('{"ttl_seconds": 300}')
    assert main(["har-replay", "nope.har", "--filter-config", "@config.json"]) == 2
    err = capsys.readouterr().err
    assert "nope.har: no such file" in err and "--filter-config" not in err, err
    assert main(["har-replay", "nope.har", "--filter-config", "@missing.json"]) == 2
    assert "--filter-config: cannot read missing.json" in capsys.readouterr().err


def test_a_closed_pipe_ends_quietly(tmp_path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    # `fig4 --csv` prints more than a pipe holds; `head -1` reads one line and closes it.
    done = subprocess.run(
        f"{sys.executable} -m scenarios fig4 --count 1200 --csv --out {tmp_path / 'f'} | head -1",
        shell=True, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.stdout == "t,tokens,live_bytes,allocated_pages,allocated_bytes\n"
    assert done.stderr == "", done.stderr


def test_headings_say_what_was_run() -> None:
    assert SCENARIOS["basic"].heading(quick=True) == "Basic experiment (128 logins, then 128 logouts)"
    assert "1024 logins" in SCENARIOS["basic"].heading(quick=False)
    # The demo's last sample before the logouts may show 1023 cached tokens: the title says
    # what was sent.
    series = pd.DataFrame({"tokens": [0, 1023, 0]})
    assert fig4_title(series, logins=1024).startswith("Basic experiment: 1024 logins then 1024")
    assert fig4_title(series).startswith("Basic experiment: 1023 logins")
