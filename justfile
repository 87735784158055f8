# wasm-reclaim: run Proxy-Wasm filters in mitmproxy and restart them when little valid cache
# would be lost. `just` lists the recipes; each one installs what it needs first.

set shell := ["bash", "-euo", "pipefail", "-c"]

python := env("PYTHON", "python3")

[private]
default:
    @just --list

# Install the Python packages and the filter's toolchain (idempotent)
[group('setup')]
setup:
    PYTHON={{python}} bash .ci/setup

# The demo on embedded defaults: the basic experiment through a real mitmdump with the addon (~1 min)
[group('run')]
demo *args: setup
    {{python}} -m scenarios demo {{args}}

# The standard experiment set in virtual time: every README figure and table (results/)
[group('run')]
experiment *args: setup
    {{python}} -m scenarios standard --out results {{args}}

# The experiments' live counterpart through the real proxy and daemon (~1 min; report in .wasm-reclaim/live/report/)
[group('run')]
live *args: setup
    {{python}} -m scenarios live --quick {{args}}

# Run the test suite (arguments go to pytest, e.g. `just test -k header`)
[group('check')]
test *args: setup
    {{python}} -m pytest {{args}}

# The conformance suite: filters from the Rust, Go and AssemblyScript SDKs through mitmdump
[group('check')]
conformance *args: setup
    bash filters/conformance/build.sh
    {{python}} -m pytest -m conformance {{args}}

# Lint: ruff and mypy (strict for the packages)
[group('check')]
lint: setup
    {{python}} -m ruff check addons manager scenarios tests
    {{python}} -m mypy

# mitmweb with the addon in headless Chromium: flow list, filters, comments (screenshots in results/web/)
[group('check')]
web-check *args: setup
    {{python}} -m tests.web_check {{args}}

# Benchmarks against SPEC §9: host and filter, store, proxy, replay (results in results/bench/)
[group('check')]
bench: setup
    bash .ci/bench-tools
    {{python}} -m tests.bench.host
    {{python}} -m tests.bench.deadline
    {{python}} -m tests.bench.hostflood
    {{python}} -m tests.bench.store
    {{python}} -m tests.bench.proxy --rounds 7 --seconds 10
    {{python}} -m tests.bench.proxy --concurrent --rounds 5 --seconds 10
    {{python}} -m tests.bench.idle
    {{python}} -m tests.bench.dispatch
    {{python}} -m tests.bench.replay
    {{python}} -m tests.bench.runs
    {{python}} -m tests.bench.manager
    {{python}} -m tests.bench.manager --instances 10000 --window-seconds 13 --runs 3 --learning-runs 1 --passes 5 --out results/bench/manager-10k.json
    {{python}} -m tests.bench.tenants
    {{python}} -m tests.bench.warm

# The fault campaign against real processes on 127.0.0.1, its table as in the README (~35 min; `just faults --quick`: a few)
[group('check')]
faults *args: setup
    {{python}} -m tests.faults {{args}}

# Rebuild filters/auth_cache.wasm from its C sources (reproducible: same bytes each time)
[group('build')]
build-filter: setup
    bash filters/build.sh
