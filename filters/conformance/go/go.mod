module wasm-reclaim/conformance

go 1.24
