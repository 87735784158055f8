"""The filter's token cache (filters/auth_cache/ac_cache.c) against an oracle.

The C cache is compiled natively with gcc into a shared library (with
UBSan; the whole module is re-run once in a subprocess with ASan preloaded)
and driven through ctypes. Allocation goes through a counting shim wired in
via the cache's allocation indirection (AC_MALLOC/AC_FREE), which also
injects allocation failures. Every operation is compared with an obviously
correct oracle: a dict token -> (expiry, block size).

Also checks that filters/auth_cache.wasm is what filters/build.sh produces.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

ROOT = Path(__file__).resolve().parents[1]
CACHE_C = ROOT / "filters" / "auth_cache" / "ac_cache.c"
U64_MAX = 2**64 - 1
ASAN_ENV = "AC_ORACLE_UNDER_ASAN"  # set in the ASan subprocess
UNDER_ASAN = os.environ.get(ASAN_ENV) == "1"

AC_CACHE_OK, AC_CACHE_ERR_NOMEM = 0, -1
INITIAL_BUCKETS = 16

# Allocation shim: counts live blocks and bytes, can fail the n-th allocation.
SHIM_H = """
#include <stddef.h>
void *ac_test_malloc(size_t n);
void *ac_test_realloc(void *p, size_t n);
void ac_test_free(void *p);
"""
SHIM_C = r"""
#include <stddef.h>
#include <stdlib.h>
#include <string.h>

typedef union { size_t n; max_align_t align; } hdr;
static size_t live_blocks, live_bytes;
static long fail_in = -1; /* 0: the next allocation fails */

void *ac_test_malloc(size_t n) {
    if (fail_in == 0) { fail_in = -1; return NULL; }
    if (fail_in > 0) fail_in--;
    hdr *h = malloc(sizeof(hdr) + n);
    if (h == NULL) return NULL;
    h->n = n;
    live_blocks++;
    live_bytes += n;
    return h + 1;
}
void ac_test_free(void *p) {
    if (p == NULL) return;
    hdr *h = (hdr *)p - 1;
    live_blocks--;
    live_bytes -= h->n;
    free(h);
}
void *ac_test_realloc(void *p, size_t n) {
    void *q = ac_test_malloc(n);
    if (q == NULL || p == NULL) return q;
    size_t old = ((hdr *)p - 1)->n;
    memcpy(q, p, old < n ? old : n);
    ac_test_free(p);
    return q;
}
size_t ac_test_live_blocks(void) { return live_blocks; }
size_t ac_test_live_bytes(void) { return live_bytes; }
void ac_test_fail_in(long n) { fail_in = n; }
"""


# ---------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheLib:
    """ctypes view of one build of ac_cache.c plus the allocation shim."""

    dll: ctypes.CDLL
    header: int  # ac_cache_entry_header_size()

    def block(self, entry_size: int, token_len: int) -> int:
        return max(entry_size, self.header + token_len)


def _compile(tmp: Path, name: str, defines: list[str]) -> CacheLib:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc not found: the cache oracle test compiles ac_cache.c natively")
    (tmp / "shim.h").write_text(SHIM_H)
    (tmp / "shim.c").write_text(SHIM_C)
    sanitize = "address,undefined" if UNDER_ASAN else "undefined"
    out = tmp / f"lib{name}.so"
    cmd = [
        gcc,
        "-std=c11",
        "-O1",
        "-g",
        "-shared",
        "-fPIC",
        "-Wall",
        "-Wextra",
        "-Werror",
        f"-fsanitize={sanitize}",
        "-fno-sanitize-recover=all",
        "-fno-omit-frame-pointer",
        "-include",
        str(tmp / "shim.h"),
        "-DAC_MALLOC=ac_test_malloc",
        "-DAC_REALLOC=ac_test_realloc",
        "-DAC_FREE=ac_test_free",
        *defines,
        str(CACHE_C),
        str(tmp / "shim.c"),
        "-o",
        str(out),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        pytest.fail(f"compiling ac_cache.c failed:\n{' '.join(cmd)}\n{proc.stderr}")

    dll = ctypes.CDLL(str(out))
    vp, sz, u64, c_int = ctypes.c_void_p, ctypes.c_size_t, ctypes.c_uint64, ctypes.c_int
    buf = ctypes.c_char_p
    sigs: dict[str, tuple[list[object], object]] = {
        "ac_cache_new": ([sz], vp),
        "ac_cache_free": ([vp], None),
        "ac_cache_set_entry_size": ([vp, sz], None),
        "ac_cache_lookup": ([vp, buf, sz, u64], c_int),
        "ac_cache_insert": ([vp, buf, sz, u64, u64], c_int),
        "ac_cache_remove": ([vp, buf, sz], c_int),
        "ac_cache_evict_expired": ([vp, u64], sz),
        "ac_cache_live_entries": ([vp], sz),
        "ac_cache_live_bytes": ([vp], sz),
        "ac_cache_bucket_count": ([vp], sz),
        "ac_cache_entry_header_size": ([], sz),
        "ac_cache_block_size": ([vp, sz], sz),
        "ac_test_live_blocks": ([], sz),
        "ac_test_live_bytes": ([], sz),
        "ac_test_fail_in": ([ctypes.c_long], None),
    }
    for fname, (args, res) in sigs.items():
        fn = getattr(dll, fname)
        fn.argtypes = args
        fn.restype = res
    return CacheLib(dll, dll.ac_cache_entry_header_size())


@pytest.fixture(scope="session")
def lib(tmp_path_factory: pytest.TempPathFactory) -> CacheLib:
    """The cache as built for production (full 32-bit hash)."""
    return _compile(tmp_path_factory.mktemp("ac_cache"), "accache", [])


@pytest.fixture(scope="session")
def collide_lib(tmp_path_factory: pytest.TempPathFactory) -> CacheLib:
    """The cache with only 4 distinct hash values: every chain is long."""
    return _compile(
        tmp_path_factory.mktemp("ac_cache_collide"), "accollide", ["-DAC_CACHE_HASH_MASK=0x3u"]
    )


@pytest.fixture(params=["full_hash", "colliding_hash"])
def any_lib(request: pytest.FixtureRequest, lib: CacheLib, collide_lib: CacheLib) -> CacheLib:
    return lib if request.param == "full_hash" else collide_lib


# ---------------------------------------------------------------------------
# The oracle and the state machine
# ---------------------------------------------------------------------------


class Oracle:
    """Obviously correct model: token -> (expiry_ns, block_size)."""

    def __init__(self, header: int, entry_size: int) -> None:
        self.header = header
        self.entry_size = entry_size
        self.entries: dict[bytes, tuple[int, int]] = {}

    def insert(self, tok: bytes, now: int, ttl: int) -> None:
        expiry = min(now + ttl, U64_MAX)
        if tok in self.entries:
            self.entries[tok] = (expiry, self.entries[tok][1])
        else:
            self.entries[tok] = (expiry, max(self.entry_size, self.header + len(tok)))

    def lookup(self, tok: bytes, now: int) -> bool:
        return tok in self.entries and now < self.entries[tok][0]

    def remove(self, tok: bytes) -> bool:
        return self.entries.pop(tok, None) is not None

    def evict(self, now: int) -> int:
        dead = [t for t, (expiry, _) in self.entries.items() if expiry <= now]
        for t in dead:
            del self.entries[t]
        return len(dead)

    def live_bytes(self) -> int:
        return sum(block for _, block in self.entries.values())


# Tokens: tiny ones collide and repeat often; longer ones come back via a Bundle.
SHORT_TOKENS = st.binary(max_size=2)
TOKENS = st.one_of(
    st.binary(max_size=40),
    st.binary(min_size=1000, max_size=1100),  # longer than an entry: header + token
    st.text("ab", min_size=200, max_size=4096).map(str.encode),  # long, nearly equal
)
TIMES = st.one_of(st.integers(0, 5000), st.integers(U64_MAX - 5000, U64_MAX))
TTLS = st.one_of(st.integers(0, 3000), st.just(U64_MAX), st.integers(0, U64_MAX))
ENTRY_SIZES = st.sampled_from([0, 1, 64, 1024, 2048])


class CacheMachine(RuleBasedStateMachine):
    """Drive ac_cache and the Oracle with the same operations."""

    lib: ClassVar[CacheLib]  # set by a subclass per build (see _machine_for)
    tokens = Bundle("tokens")

    def __init__(self) -> None:
        super().__init__()
        self.dll = self.lib.dll
        self.cache: int | None = None
        self.oracle = Oracle(self.lib.header, 0)
        self.base_bytes = 0

    @initialize(entry_size=ENTRY_SIZES)
    def create(self, entry_size: int) -> None:
        assert self.dll.ac_test_live_blocks() == 0
        self.cache = self.dll.ac_cache_new(entry_size)
        assert self.cache
        self.oracle = Oracle(self.lib.header, entry_size)
        # Allocator bytes that are not entries: the struct and the buckets.
        self.base_bytes = self.dll.ac_test_live_bytes() - INITIAL_BUCKETS * ctypes.sizeof(
            ctypes.c_void_p
        )

    @rule(target=tokens, tok=TOKENS)
    def new_token(self, tok: bytes) -> bytes:
        return tok

    def _tok(self, data: st.DataObject) -> bytes:
        return data.draw(st.one_of(self.tokens, SHORT_TOKENS))

    @rule(data=st.data(), now=TIMES, ttl=TTLS)
    def insert(self, data: st.DataObject, now: int, ttl: int) -> None:
        tok = self._tok(data)
        assert self.dll.ac_cache_insert(self.cache, tok, len(tok), now, ttl) == AC_CACHE_OK
        self.oracle.insert(tok, now, ttl)

    @rule(data=st.data(), now=TIMES)
    def lookup(self, data: st.DataObject, now: int) -> None:
        tok = self._tok(data)
        hit = self.dll.ac_cache_lookup(self.cache, tok, len(tok), now)
        assert hit == int(self.oracle.lookup(tok, now))

    @precondition(lambda self: self.oracle.entries)
    @rule(data=st.data(), now=TIMES)
    def lookup_present(self, data: st.DataObject, now: int) -> None:
        tok = data.draw(st.sampled_from(sorted(self.oracle.entries)))
        expiry = self.oracle.entries[tok][0]
        for t in {now, expiry - 1, expiry, min(expiry + 1, U64_MAX)} - {-1}:
            hit = self.dll.ac_cache_lookup(self.cache, tok, len(tok), t)
            assert hit == int(self.oracle.lookup(tok, t)), (t, expiry)

    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        tok = self._tok(data)
        assert self.dll.ac_cache_remove(self.cache, tok, len(tok)) == int(self.oracle.remove(tok))

    @rule(now=TIMES)
    def evict_expired(self, now: int) -> None:
        assert self.dll.ac_cache_evict_expired(self.cache, now) == self.oracle.evict(now)

    @rule(entry_size=ENTRY_SIZES)
    def set_entry_size(self, entry_size: int) -> None:
        self.dll.ac_cache_set_entry_size(self.cache, entry_size)
        self.oracle.entry_size = entry_size

    @rule(n=st.integers(0, 4000))
    def block_size(self, n: int) -> None:
        assert self.dll.ac_cache_block_size(self.cache, n) == self.lib.block(
            self.oracle.entry_size, n
        )

    @invariant()
    def counters_match(self) -> None:
        if self.cache is None:
            return
        assert self.dll.ac_cache_live_entries(self.cache) == len(self.oracle.entries)
        assert self.dll.ac_cache_live_bytes(self.cache) == self.oracle.live_bytes()

    @invariant()
    def allocator_agrees(self) -> None:
        """live_bytes is exactly what the allocator holds for entries."""
        if self.cache is None:
            return
        nb = self.dll.ac_cache_bucket_count(self.cache)
        assert nb >= INITIAL_BUCKETS and nb & (nb - 1) == 0
        assert len(self.oracle.entries) <= nb  # load factor <= 1
        table = self.base_bytes + nb * ctypes.sizeof(ctypes.c_void_p)
        assert self.dll.ac_test_live_bytes() == table + self.oracle.live_bytes()
        assert self.dll.ac_test_live_blocks() == 2 + len(self.oracle.entries)

    def teardown(self) -> None:
        if self.cache is not None:
            self.dll.ac_cache_free(self.cache)
            self.cache = None
        assert self.dll.ac_test_live_blocks() == 0, "ac_cache_free leaked"
        assert self.dll.ac_test_live_bytes() == 0


STATEFUL = settings(
    max_examples=60 if UNDER_ASAN else 150,
    stateful_step_count=60,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def _machine_for(lib: CacheLib) -> type[CacheMachine]:
    return type("CacheMachineForBuild", (CacheMachine,), {"lib": lib})


def test_cache_matches_oracle(any_lib: CacheLib) -> None:
    run_state_machine_as_test(_machine_for(any_lib), settings=STATEFUL)


# ---------------------------------------------------------------------------
# Bulk and edge cases
# ---------------------------------------------------------------------------


def _token(i: int) -> bytes:
    """Distinct tokens of lengths 1..~600, some sharing long prefixes."""
    return (b"t" * (i % 7) * (i % 97)) + i.to_bytes(4, "little")[: 1 + i % 4] + bytes([i % 251])


def test_many_keys_grow_and_shrink(any_lib: CacheLib) -> None:
    dll = any_lib.dll
    c = dll.ac_cache_new(1024)
    oracle = Oracle(any_lib.header, 1024)
    toks = list(dict.fromkeys(_token(i) for i in range(5000)))
    for n, tok in enumerate(toks):
        assert dll.ac_cache_insert(c, tok, len(tok), n, 10_000) == AC_CACHE_OK
        oracle.insert(tok, n, 10_000)
    assert dll.ac_cache_live_entries(c) == len(toks)
    assert dll.ac_cache_live_bytes(c) == oracle.live_bytes()
    assert dll.ac_cache_bucket_count(c) >= len(toks)  # grew by rehash, load <= 1
    for tok in toks:
        assert dll.ac_cache_lookup(c, tok, len(tok), 9_999) == 1
        assert dll.ac_cache_lookup(c, tok + b"x", len(tok) + 1, 0) == 0
    for tok in toks[::2]:
        assert dll.ac_cache_remove(c, tok, len(tok)) == 1
        oracle.remove(tok)
    assert dll.ac_cache_live_bytes(c) == oracle.live_bytes()
    # Entries inserted at time n expire at n + 10_000.
    assert dll.ac_cache_evict_expired(c, 12_000) == oracle.evict(12_000)
    assert dll.ac_cache_live_entries(c) == len(oracle.entries)
    for tok in toks:
        hit = dll.ac_cache_lookup(c, tok, len(tok), 12_000)
        assert hit == int(oracle.lookup(tok, 12_000))
    assert dll.ac_cache_evict_expired(c, U64_MAX) == len(oracle.entries)
    assert dll.ac_cache_live_entries(c) == 0 and dll.ac_cache_live_bytes(c) == 0
    dll.ac_cache_free(c)
    assert dll.ac_test_live_blocks() == 0


def test_entry_layout(lib: CacheLib) -> None:
    dll = lib.dll
    # expiry (8), next, token_len, block_size (a pointer each), hash (4); token follows.
    assert lib.header == 8 + 3 * ctypes.sizeof(ctypes.c_void_p) + 4
    c = dll.ac_cache_new(1024)
    assert dll.ac_cache_block_size(c, 0) == 1024
    assert dll.ac_cache_block_size(c, 1024 - lib.header) == 1024
    assert dll.ac_cache_block_size(c, 1025 - lib.header) == 1025
    dll.ac_cache_insert(c, b"abc", 3, 0, 5)
    dll.ac_cache_set_entry_size(c, 64)
    dll.ac_cache_insert(c, b"abc", 3, 0, 7)  # replace: keeps its 1024-byte block
    dll.ac_cache_insert(c, b"abd", 3, 0, 7)
    assert dll.ac_cache_live_bytes(c) == 1024 + 64
    assert dll.ac_cache_lookup(c, b"abc", 3, 6) == 1
    assert dll.ac_cache_lookup(c, b"abc", 3, 7) == 0  # expired at exactly expiry
    dll.ac_cache_free(c)
    dll.ac_cache_free(None)


def test_empty_token_and_null_pointer(lib: CacheLib) -> None:
    dll = lib.dll
    c = dll.ac_cache_new(0)
    assert dll.ac_cache_insert(c, None, 0, 1, 1) == AC_CACHE_OK
    assert dll.ac_cache_lookup(c, b"", 0, 1) == 1
    assert dll.ac_cache_live_bytes(c) == lib.header
    assert dll.ac_cache_remove(c, None, 0) == 1
    assert dll.ac_cache_remove(c, b"", 0) == 0
    dll.ac_cache_free(c)


def test_expiry_saturates(lib: CacheLib) -> None:
    dll = lib.dll
    c = dll.ac_cache_new(16)
    dll.ac_cache_insert(c, b"k", 1, U64_MAX - 10, 100)
    assert dll.ac_cache_lookup(c, b"k", 1, U64_MAX - 1) == 1
    assert dll.ac_cache_lookup(c, b"k", 1, U64_MAX) == 0
    assert dll.ac_cache_evict_expired(c, U64_MAX - 1) == 0
    assert dll.ac_cache_evict_expired(c, U64_MAX) == 1
    dll.ac_cache_free(c)


def test_out_of_memory(any_lib: CacheLib) -> None:
    dll = any_lib.dll
    # ac_cache_new: failing either allocation returns NULL and leaks nothing.
    for n in (0, 1):
        dll.ac_test_fail_in(n)
        assert not dll.ac_cache_new(1024)
        assert dll.ac_test_live_blocks() == 0
    dll.ac_test_fail_in(-1)

    c = dll.ac_cache_new(1024)
    # A failed insert changes nothing.
    dll.ac_test_fail_in(0)
    assert dll.ac_cache_insert(c, b"a", 1, 0, 10) == AC_CACHE_ERR_NOMEM
    assert dll.ac_cache_live_entries(c) == 0 and dll.ac_cache_live_bytes(c) == 0
    # Fill to the load limit, then fail the rehash: the insert still succeeds.
    for i in range(INITIAL_BUCKETS):
        assert dll.ac_cache_insert(c, bytes([i]), 1, 0, 10) == AC_CACHE_OK
    assert dll.ac_cache_bucket_count(c) == INITIAL_BUCKETS
    dll.ac_test_fail_in(1)  # the entry block succeeds, the bucket array fails
    assert dll.ac_cache_insert(c, b"x", 1, 0, 10) == AC_CACHE_OK
    dll.ac_test_fail_in(-1)
    assert dll.ac_cache_bucket_count(c) == INITIAL_BUCKETS
    assert dll.ac_cache_live_entries(c) == INITIAL_BUCKETS + 1
    for i in range(INITIAL_BUCKETS):
        assert dll.ac_cache_lookup(c, bytes([i]), 1, 5) == 1
    # The next insert grows the table normally.
    assert dll.ac_cache_insert(c, b"y", 1, 0, 10) == AC_CACHE_OK
    assert dll.ac_cache_bucket_count(c) == 2 * INITIAL_BUCKETS
    assert dll.ac_cache_lookup(c, b"x", 1, 5) == 1
    dll.ac_cache_free(c)
    assert dll.ac_test_live_blocks() == 0


# ---------------------------------------------------------------------------
# Whole-module checks: ASan run and reproducible wasm
# ---------------------------------------------------------------------------


@pytest.mark.skipif(UNDER_ASAN, reason="this is the ASan run itself")
def test_oracle_under_asan(tmp_path: Path) -> None:
    """Re-run this module with AddressSanitizer preloaded into Python."""
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc not found: needed to build ac_cache.c with AddressSanitizer")
    libasan = subprocess.run(
        [gcc, "-print-file-name=libasan.so"], capture_output=True, text=True, check=True
    ).stdout.strip()
    if not os.path.isabs(libasan):
        pytest.fail("gcc has no libasan.so (install libasan / gcc's sanitizer runtime)")
    env = dict(os.environ)
    env.update(
        {
            ASAN_ENV: "1",
            "LD_PRELOAD": libasan,
            # Python itself is not built for LeakSanitizer; leaks of the cache are
            # caught by the allocation shim's counters instead.
            "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1",
            "PYTHONDONTWRITEBYTECODE": "1",
        }
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-x",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            str(tmp_path / "asan"),
            "-k",
            "not build_check",
            str(Path(__file__)),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        check=False,
        timeout=600,
    )
    assert proc.returncode == 0, f"ASan run failed:\n{proc.stdout[-5000:]}\n{proc.stderr[-5000:]}"


@pytest.mark.skipif(UNDER_ASAN, reason="not a sanitizer matter")
def test_build_check() -> None:
    """filters/auth_cache.wasm is exactly what filters/build.sh builds."""
    if shutil.which(os.environ.get("CC", "clang")) is None:
        pytest.fail(
            "clang not found: install clang, lld and wasi-libc "
            "(apt-get install clang lld wasi-libc) to build the filter"
        )
    proc = subprocess.run(
        ["bash", str(ROOT / "filters" / "build.sh"), "--check"],
        capture_output=True,
        text=True,
        check=False,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
