#!/usr/bin/env bash
# Build the reference Proxy-Wasm filter filters/auth_cache.wasm.
#
#   bash filters/build.sh           rebuild filters/auth_cache.wasm
#   bash filters/build.sh --check   rebuild into a temporary file and fail if
#                                   the bytes differ from filters/auth_cache.wasm
#
# Toolchain: clang with the wasm32-wasi target, wasm-ld (lld) and wasi-libc
# (Debian/Ubuntu: apt-get install clang lld wasi-libc; clang 14 is what the
# committed binary was built with). Override the compiler with CC=...
#
# The build is reproducible: no debug info, no names section, relative
# source paths, fixed flags -- the same toolchain gives the same bytes.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
out="$here/auth_cache.wasm"
CC="${CC:-clang}"

sources=(
    auth_cache/ac_cache.c
    auth_cache/ac_config.c
    auth_cache/ac_filter.c
    auth_cache/ac_msg.c
)

flags=(
    --target=wasm32-wasi
    -mexec-model=reactor     # exports _initialize, no _start/main
    -std=c11
    -O2
    -g0
    -Wall -Wextra -Werror
    -fno-ident               # no compiler version string in the output
    -Wl,--strip-all          # no names or custom sections
    -Wl,--stack-first        # a stack overflow traps instead of corrupting data
    -Wl,-z,stack-size=16384  # the filter needs a few KiB of stack
)

build() { # build <output file>
    if ! command -v "$CC" >/dev/null 2>&1; then
        echo "build.sh: '$CC' not found; install clang, lld and wasi-libc" \
             "(apt-get install clang lld wasi-libc) or set CC" >&2
        exit 2
    fi
    # Relative paths only, from a fixed directory, with a fixed locale.
    (cd "$here" && LC_ALL=C "$CC" "${flags[@]}" -o "$1" "${sources[@]}")
}

case "${1:-}" in
    "")
        tmp="$(mktemp "$here/.auth_cache.XXXXXX.wasm")"
        trap 'rm -f "$tmp"' EXIT
        build "$tmp"
        chmod 644 "$tmp"
        mv "$tmp" "$out"
        trap - EXIT
        echo "built $out ($(wc -c <"$out") bytes)"
        ;;
    --check)
        if [[ ! -f "$out" ]]; then
            echo "build.sh --check: $out is missing; run 'bash filters/build.sh'" >&2
            exit 1
        fi
        tmp="$(mktemp "${TMPDIR:-/tmp}/auth_cache.XXXXXX.wasm")"
        trap 'rm -f "$tmp"' EXIT
        build "$tmp"
        if cmp -s "$tmp" "$out"; then
            echo "ok: $out matches its sources"
        else
            echo "build.sh --check: $out differs from a fresh build of" \
                 "filters/auth_cache/*.c ($(wc -c <"$out") vs $(wc -c <"$tmp") bytes);" \
                 "run 'bash filters/build.sh' and commit the result" >&2
            exit 1
        fi
        ;;
    *)
        echo "usage: bash filters/build.sh [--check]" >&2
        exit 2
        ;;
esac
