"""A bad `--set` value for one of the addon's options stops mitmdump with one line. mitmproxy
applies such values when the script's options are added, and drops the error it raises there
without a word: the proxy would run without the filter, every request unauthenticated."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_user_paths import mitmdump

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(("sets", "message"), [
    (["wasm_fail_open=yes"], "wasm_auth: wasm_fail_open: Boolean must be"),
    (["wasm_deadline_ms=abc"], "wasm_auth: wasm_deadline_ms: Not an integer: abc"),
    (["wasm_deadline_ms=100", "wasm_deadline_ms=200"],
     "wasm_auth: Received multiple values for wasm_deadline_ms"),
])
def test_a_bad_set_value_stops_mitmdump_in_one_line(tmp_path, sets, message) -> None:
    args = ["-s", str(ROOT / "addons" / "wasm_auth.py"), "--set", "wasm_admin_listen=",
            "--set", "wasm_log_metrics=false"]
    for value in sets:
        args += ["--set", value]
    done = mitmdump(args, tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert message in output
    assert "Traceback" not in output
    assert sum("wasm_auth:" in line for line in output.splitlines()) == 1
