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


@pytest.mark.parametrize(("option", "message"), [
    ("wasm_spool={file}/spool", "wasm_auth: wasm_spool: cannot use {file}/spool: Not a directory"),
    ("wasm_admin_token_file={dir}",
     "wasm admin endpoint: token file {dir}: Is a directory: the endpoint is off"),
])
def test_a_path_that_cannot_be_used_is_one_line_and_mitmdump_stops(tmp_path, option,
                                                                   message) -> None:
    (tmp_path / "file").write_text("not a directory\n")
    paths = {"file": str(tmp_path / "file"), "dir": str(tmp_path)}
    done = mitmdump(["-s", str(ROOT / "addons" / "wasm_auth.py"), "--set",
                     option.format(**paths), "--set", f"wasm_store={tmp_path / 'store'}"],
                    tmp_path)
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert message.format(**paths) in output
    assert "Traceback" not in output


def test_a_token_file_others_may_read_is_made_private(tmp_path, caplog) -> None:
    from addons.admin import load_or_create_token

    path = tmp_path / "admin-token"
    path.write_text("t0k3n\n")
    path.chmod(0o644)
    assert load_or_create_token(path) == "t0k3n"
    assert path.stat().st_mode & 0o777 == 0o600
    assert "was readable by others" in caplog.text
