"""Linking and WASI: duplicate imports, the calls Go's wasip1 runtime makes, wasi_unstable, and
a real Go (GOOS=wasip1, -buildmode=c-shared) filter that starts and runs, in-process and
through a real mitmdump whose start it must not stop by logging at error level."""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import struct
import subprocess
from pathlib import Path

import httpx
import pytest
import wasmtime

from addons.proxywasm import (
    FilterLoadError,
    FilterModule,
    Host,
    HttpCallResponse,
    InProcessDispatcher,
    VirtualClock,
)
from addons.proxywasm.abi import WasiErrno

from .test_lifecycle_proxy import echo_server, mitmdump
from .wat import module, trampolines

OOB = 0xFFFFFF00
ROOT = Path(__file__).resolve().parent.parent
GO_FILTER = ROOT / "tests" / "go" / "tiny"


def test_poll_oneoff_answers_every_subscription_at_once(harness) -> None:
    h = harness(module(trampolines(("wasi_snapshot_preview1", "poll_oneoff"),
                                   ("wasi_snapshot_preview1", "clock_time_get"))))
    # Two subscriptions: a clock (tag 0) and an fd_read on fd 0 (tag 1).
    clock = struct.pack("<QB7xIxxxxQQH6x", 0xAA, 0, 1, 5_000_000, 0, 0)
    fd_read = struct.pack("<QB7xI28x", 0xBB, 1, 0)
    assert len(clock) == len(fd_read) == 48
    h.put(1024, clock + fd_read)
    assert h.call("poll_oneoff", 1024, 2048, 2, 3000) == WasiErrno.SUCCESS
    assert h.u32(3000) == 2
    events = h.vm.read(2048, 64)
    first = struct.unpack_from("<QHB", events, 0)
    second = struct.unpack_from("<QHB", events, 32)
    assert first == (0xAA, 0, 0)  # the clock expired
    assert second == (0xBB, WasiErrno.BADF, 1)  # no such fd to read
    # The sleep was skipped, not waited out: the guest's clock reads as if it had slept.
    assert h.call("clock_time_get", 1, 0, 3100) == WasiErrno.SUCCESS
    assert h.u64(3100) == h.clock.now_ns() + 5_000_000
    assert h.call("poll_oneoff", 1024, 2048, 0, 3000) == WasiErrno.INVAL
    assert h.call("poll_oneoff", OOB, 2048, 1, 3000) == WasiErrno.FAULT
    assert h.call("poll_oneoff", 1024, OOB, 1, 3000) == WasiErrno.FAULT


def test_fd_calls_have_sane_answers(harness) -> None:
    h = harness(module(trampolines(*[("wasi_snapshot_preview1", n) for n in (
        "fd_fdstat_get", "fd_prestat_get", "fd_prestat_dir_name", "fd_fdstat_set_flags",
        "fd_close")])))
    assert h.call("fd_fdstat_get", 1, 1024) == WasiErrno.SUCCESS
    filetype, flags, rights = struct.unpack_from("<BxHxxxxQ", h.vm.read(1024, 24))
    assert (filetype, flags) == (2, 0) and rights & 0x40  # a character device, writable
    assert h.call("fd_fdstat_get", 7, 1024) == WasiErrno.BADF
    assert h.call("fd_fdstat_get", 2, OOB) == WasiErrno.FAULT
    assert h.call("fd_prestat_get", 3, 1024) == WasiErrno.BADF  # no pre-opened directories
    assert h.call("fd_prestat_dir_name", 3, 1024, 10) == WasiErrno.BADF
    assert h.call("fd_fdstat_set_flags", 1, 4) == WasiErrno.SUCCESS
    assert h.call("fd_fdstat_set_flags", 9, 4) == WasiErrno.BADF
    assert h.call("fd_close", 2) == WasiErrno.SUCCESS
    assert h.call("fd_close", 5) == WasiErrno.BADF


def test_wasi_unstable_is_an_alias(harness) -> None:
    h = harness(module(trampolines(("wasi_unstable", "clock_time_get"),
                                   ("wasi_unstable", "fd_write"), ("wasi_unstable", "fd_close"))))
    assert h.call("clock_time_get", 0, 0, 1024) == WasiErrno.SUCCESS
    assert h.u64(1024) == h.clock.now_ns()
    assert h.call("fd_close", 1) == WasiErrno.SUCCESS  # stdout stays open
    assert h.call("fd_close", 3) == WasiErrno.BADF


def test_a_function_imported_twice_links() -> None:
    wat = module("""
  (import "env" "proxy_log" (func $a (param i32 i32 i32) (result i32)))
  (import "env" "proxy_log" (func $b (param i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $c (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $d (param i32 i32 i32 i32) (result i32)))""")
    FilterModule(wasmtime.wat2wasm(wat), name="twice.wat")


def test_the_same_import_with_two_types_is_a_clear_error() -> None:
    wat = module("""
  (import "env" "f" (func $a (param i32) (result i32)))
  (import "env" "f" (func $b (param i64) (result i32)))""")
    with pytest.raises(FilterLoadError, match="twice with different types"):
        FilterModule(wasmtime.wat2wasm(wat), name="twice.wat")


START_LOGGER = trampolines("proxy_log", ("wasi_snapshot_preview1", "fd_write")) + """
  (data (i32.const 1000) "starting badly")
  (func (export "proxy_on_configure") (param i32 i32) (result i32)
    (drop (call $proxy_log (i32.const 4) (i32.const 1000) (i32.const 14)))
    (i32.const 1))
  (func (export "err") (drop (call $proxy_log (i32.const 4) (i32.const 1000) (i32.const 14))))
"""


def test_errors_logged_while_starting_are_warnings(harness, caplog) -> None:
    with caplog.at_level(logging.INFO, logger="wasm_reclaim.guest"):
        h = harness(module(START_LOGGER))
        [start] = [r for r in caplog.records if "starting badly" in r.getMessage()]
        assert start.levelno == logging.WARNING
        h.call("err")  # once started, an error is an error
        assert caplog.records[-1].levelno == logging.ERROR


# ---- a real Go wasip1 filter ---------------------------------------------------------------


def go_filter() -> Path:
    """Build tests/go/tiny with standard Go (cached by source hash and Go version).

    A missing or too old Go fails the test with one line saying so (never a silent skip).
    """
    go = shutil.which("go")
    if go is None:
        pytest.fail("go not found: install Go >= 1.24 to build the Go wasip1 filter",
                    pytrace=False)
    version = subprocess.run([go, "env", "GOVERSION"], capture_output=True, text=True,
                             check=False).stdout.strip()
    numbers = version.removeprefix("go").split(".")
    if not (len(numbers) >= 2 and numbers[0].isdigit() and numbers[1].isdigit()
            and (int(numbers[0]), int(numbers[1])) >= (1, 24)):
        pytest.fail(f"{version or 'go'} is older than go1.24 (go:wasmexport needs Go >= 1.24)",
                    pytrace=False)
    source = (GO_FILTER / "main.go").read_bytes() + (GO_FILTER / "go.mod").read_bytes() + (
        version.encode())
    cache = Path.home() / ".cache" / "wasm-reclaim" / "go-tiny"
    out = cache / f"{hashlib.sha256(source).hexdigest()[:16]}.wasm"
    if not out.exists():
        cache.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, "GOOS": "wasip1", "GOARCH": "wasm", "GOFLAGS": "-mod=mod"}
        tmp = out.with_suffix(".tmp")
        built = subprocess.run([go, "build", "-trimpath", "-buildmode=c-shared", "-o", str(tmp),
                                "."], cwd=GO_FILTER, env=env, capture_output=True, text=True,
                               timeout=600, check=False)
        if built.returncode:
            first = (built.stderr.strip().splitlines() or ["no output"])[0]
            pytest.fail(f"go build of tests/go/tiny failed: {first}", pytrace=False)
        tmp.replace(out)
    return out


def test_go_wasip1_filter_starts_and_runs(caplog) -> None:
    wasm = go_filter()
    module_ = FilterModule.from_file(wasm)
    clock = VirtualClock()
    dispatcher = InProcessDispatcher(lambda call: HttpCallResponse(200), clock.now_ns)
    host = Host(module_, dispatcher, clock=clock)
    with caplog.at_level(logging.INFO, logger="wasm_reclaim.guest"):
        stream = host.instance("go").stream()
        decision = stream.request_headers([(b":path", b"/")])
        stream.close()
    assert decision.action == "continue" and decision.error is None
    assert (b"x-go", b"2019") in decision.request_headers  # the virtual clock's year
    assert "go filter saw a request" in caplog.text
    assert all(r.levelno < logging.ERROR for r in caplog.records)
    host.close()


@pytest.mark.e2e
def test_go_filter_through_a_real_mitmdump(tmp_path) -> None:
    wasm = go_filter()
    with echo_server() as upstream, mitmdump(tmp_path, upstream, wasm) as proxy:
        r = httpx.get(f"{proxy}/go", timeout=10)
        assert r.status_code == 200
        assert '"x-go"' in r.text  # the upstream saw the header the Go filter added
    log = (tmp_path / "mitmdump.log").read_text()
    assert "go filter starting" in log and "Error logged during startup" not in log
