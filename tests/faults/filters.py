"""A filter that misbehaves on request: the `x-fault` header's first letter says how.

- `t`rap: `unreachable`;
- `l`oop: an endless loop (the host's deadline must cut it);
- `g`row: `memory.grow` a page at a time until it fails at the cap, then carry on as if
  nothing happened;
- anything else, or no header: continue, no outbound call.
"""

from __future__ import annotations

from pathlib import Path

import wasmtime

from ..wat import module

FAULT_FILTER = module("""
  (import "env" "proxy_get_header_map_value" (func $get (param i32 i32 i32 i32 i32) (result i32)))
  (data (i32.const 300) "x-fault")
  (func (export "proxy_on_context_create") (param i32 i32))
  (func (export "proxy_on_request_headers") (param i32 i32 i32) (result i32)
    (local $mode i32)
    (if (i32.eqz (call $get (i32.const 0) (i32.const 300) (i32.const 7)
                            (i32.const 200) (i32.const 204)))
      (then (if (i32.gt_u (i32.load (i32.const 204)) (i32.const 0))
        (then (local.set $mode (i32.load8_u (i32.load (i32.const 200))))))))
    (if (i32.eq (local.get $mode) (i32.const 116)) (then unreachable))          ;; 't'rap
    (if (i32.eq (local.get $mode) (i32.const 108)) (then (loop $l (br $l))))   ;; 'l'oop
    (if (i32.eq (local.get $mode) (i32.const 103))                             ;; 'g'row
      (then (loop $g (br_if $g (i32.ne (memory.grow (i32.const 1)) (i32.const -1))))))
    (i32.const 0))
  (func (export "proxy_on_done") (param i32) (result i32) (i32.const 1))
""")


def write_fault_filter(path: Path) -> Path:
    """Compile the fault filter to `path`."""
    path.write_bytes(wasmtime.wat2wasm(FAULT_FILTER))
    return path
