"""The conformance build script: a missing toolchain is one line and exit code 3; a build is
cached by the sha of its inputs."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from .conformance_stack import BUILD

pytestmark = pytest.mark.conformance


def run(sdk: str, cache: Path, path: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PATH": path, "CONFORMANCE_CACHE": str(cache)}
    return subprocess.run(["bash", str(BUILD), sdk], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.parametrize(("sdk", "tool"), [("rust", "cargo"), ("go", "go")])
def test_a_missing_toolchain_is_one_line(sdk: str, tool: str, tmp_path: Path) -> None:
    bare = tmp_path / "bin"  # a PATH with bash and coreutils but not the toolchain
    bare.mkdir()
    for name in ("bash", "dirname", "mkdir", "cat", "sha256sum", "cut", "find", "sort", "xargs",
                 "printf", "cp", "mv", "wc", "mktemp", "rm", "head", "cmp"):
        found = shutil.which(name)
        assert found, name
        (bare / name).symlink_to(found)
    assert shutil.which(tool, path=str(bare)) is None
    proc = run(sdk, tmp_path / "cache", str(bare))
    assert proc.returncode == 3
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"conformance build: {sdk}: {tool} not found (install ")


def test_a_build_is_cached(tmp_path: Path) -> None:
    if shutil.which("cargo") is None:
        pytest.fail("cargo not found: the Rust conformance filter cannot be built", pytrace=False)
    first = run("rust", tmp_path, os.environ["PATH"])
    assert first.returncode == 0, first.stderr
    assert "rust: built" in first.stdout
    [cached] = list(tmp_path.glob("*/rust.wasm"))
    again = run("rust", tmp_path, os.environ["PATH"])
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == f"conformance build: rust: cached {cached}"
