#!/usr/bin/env bash
# Build the conformance filters from three public Proxy-Wasm SDKs, and the ABI 0.1.0 filter
# (see README.md here).
#
#   bash filters/conformance/build.sh [rust] [go] [as] [rust01]     (default: all four)
#
# Each filter is built once per content of its sources, lockfiles, this script and the
# toolchain version, and cached as $HOME/.cache/wasm-reclaim/conformance/<sha>/<sdk>.wasm
# (CONFORMANCE_CACHE overrides the directory); a copy goes to filters/conformance/out/<sdk>.wasm
# for the tests. A missing toolchain is one line naming what to install, and exit code 3.
#
#   rust  cargo build --release --target wasm32-wasip1 --locked   (the proxy-wasm crate)
#   go    GOOS=wasip1 GOARCH=wasm go build -buildmode=c-shared    (Go >= 1.24, no TinyGo)
#   as    npm ci; asc (assemblyscript + @solo-io/proxy-runtime, pinned in package-lock.json)
#   rust01  the same as rust, in rust-abi01/ (the proxy-wasm crate 0.1.4: ABI 0.1.0)
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cache="${CONFORMANCE_CACHE:-$HOME/.cache/wasm-reclaim/conformance}"
out="$here/out"
mkdir -p "$cache" "$out"

missing() { # missing <sdk> <message>
    echo "conformance build: $1: $2" >&2
    exit 3
}

# The sha of an SDK's inputs: its tracked sources (not build outputs), this script, the toolchain.
inputs_sha() { # inputs_sha <dir> <toolchain version text>
    (
        cd "$here/$1"
        find . -type f \
            -not -path './target/*' -not -path './node_modules/*' -not -path './build/*' \
            -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
        sha256sum "$here/build.sh" | cut -d' ' -f1
        printf '%s\n' "$2"
    ) | sha256sum | cut -c1-24
}

finish() { # finish <sdk> <built file> <cache file>
    mkdir -p "$(dirname "$3")"
    cp "$2" "$3.tmp" && mv "$3.tmp" "$3"
    cp "$3" "$out/$1.wasm"
    echo "conformance build: $1: built $out/$1.wasm ($(wc -c <"$3") bytes)"
}

cached() { # cached <sdk> <cache file>: copy a cached build out, or fail
    [[ -f "$2" ]] || return 1
    cp "$2" "$out/$1.wasm"
    echo "conformance build: $1: cached $2"
}

build_cargo() { # build_cargo <sdk> <dir> <crate>: a Rust filter, cached as <sdk>.wasm
    command -v cargo >/dev/null || missing "$1" "cargo not found (install Rust with rustup)"
    local libdir
    libdir="$(rustc --print target-libdir --target wasm32-wasip1 2>/dev/null || true)"
    [[ -n "$libdir" && -d "$libdir" ]] ||
        missing "$1" "the wasm32-wasip1 target is not installed (rustup target add wasm32-wasip1)"
    local sha target="$cache/cargo-target"
    sha="$(inputs_sha "$2" "$(rustc -V)")"
    cached "$1" "$cache/$sha/$1.wasm" && return
    (cd "$here/$2" && CARGO_TARGET_DIR="$target" cargo build --quiet --release --locked \
        --target wasm32-wasip1)
    finish "$1" "$target/wasm32-wasip1/release/$3.wasm" "$cache/$sha/$1.wasm"
}

build_go() {
    command -v go >/dev/null || missing go "go not found (install Go >= 1.24)"
    local version
    version="$(go env GOVERSION)"
    [[ "$(printf '%s\n' go1.24 "$version" | sort -V | head -1)" == go1.24 ]] ||
        missing go "$version is older than go1.24 (go:wasmexport needs Go >= 1.24)"
    local sha
    sha="$(inputs_sha go "$version")"
    cached go "$cache/$sha/go.wasm" && return
    local tmp
    tmp="$(mktemp -d)"
    (cd "$here/go" && GOOS=wasip1 GOARCH=wasm CGO_ENABLED=0 go build -trimpath -buildmode=c-shared \
        -o "$tmp/go.wasm" .)
    finish go "$tmp/go.wasm" "$cache/$sha/go.wasm"
    rm -rf "$tmp"
}

build_as() {
    command -v node >/dev/null || missing as "node not found (install Node.js and npm)"
    command -v npm >/dev/null || missing as "npm not found (install npm)"
    local sha
    sha="$(inputs_sha as "node $(node --version)")"
    cached as "$cache/$sha/as.wasm" && return
    local dir="$here/as"
    if [[ ! -x "$dir/node_modules/.bin/asc" ]] ||
        ! cmp -s "$dir/package-lock.json" "$dir/node_modules/.package-lock.json.src" 2>/dev/null; then
        (cd "$dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
        cp "$dir/package-lock.json" "$dir/node_modules/.package-lock.json.src"
    fi
    local tmp
    tmp="$(mktemp -d)"
    # asc warns about its own standard library; show its output only when it fails.
    if ! (cd "$dir" && node_modules/.bin/asc assembly/index.ts -b "$tmp/as.wasm" \
        --use abort=abort_proc_exit --optimize >"$tmp/asc.log" 2>&1); then
        cat "$tmp/asc.log" >&2
        exit 1
    fi
    finish as "$tmp/as.wasm" "$cache/$sha/as.wasm"
    rm -rf "$tmp"
}

sdks=("$@")
(( ${#sdks[@]} )) || sdks=(rust go as rust01)
for sdk in "${sdks[@]}"; do
    case "$sdk" in
        rust) build_cargo rust rust conformance ;;
        rust01) build_cargo rust01 rust-abi01 conformance_abi01 ;;
        go) build_go ;;
        as) build_as ;;
        *) echo "conformance build: unknown SDK '$sdk' (rust, go, as, rust01)" >&2; exit 2 ;;
    esac
done
