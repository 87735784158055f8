"""Inline WAT modules for host tests: no build step, one host function at a time."""

from __future__ import annotations

from addons.proxywasm.exports import HOSTCALLS

_T = {"i": "i32", "I": "i64"}

def allocator(first: str = "") -> str:
    """A bump allocator: enough for tests, and it never frees (like linear memory itself).
    `first`: instructions it runs before allocating (a test's way to make it fail)."""
    return f"""
  (global $heap (mut i32) (i32.const 65536))
  (func (export "proxy_on_memory_allocate") (param $n i32) (result i32)
    (local $p i32)
{first}
    (local.set $p (global.get $heap))
    (global.set $heap (i32.add (global.get $heap) (i32.and (i32.add (local.get $n) (i32.const 7))
                                                          (i32.const -8))))
    (if (i32.gt_u (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
      (then (drop (memory.grow (i32.add (i32.const 1) (i32.shr_u
        (i32.sub (global.get $heap) (i32.mul (memory.size) (i32.const 65536)))
        (i32.const 16)))))))
    (local.get $p))
"""


ALLOCATOR = allocator()


def trampolines(*names: tuple[str, str] | str) -> str:
    """Imports of the given host functions, each re-exported as `call_<name>`."""
    imports, exports = [], []
    for item in names:
        module, name = item if isinstance(item, tuple) else ("env", item)
        (params, results), _ = HOSTCALLS[(module, name)]
        p = " ".join(_T[c] for c in params)
        r = " ".join(_T[c] for c in results)
        sig = (f"(param {p})" if p else "") + (f" (result {r})" if r else "")
        imports.append(f'  (import "{module}" "{name}" (func ${name} {sig}))')
        locals_ = " ".join(f"(local.get {i})" for i in range(len(params)))
        exports.append(f'  (func (export "call_{name}") {sig} (call ${name} {locals_}))')
    return "\n".join(imports + exports)


def module(body: str = "", *, abi: str = "0_2_1", memory_pages: int = 2,
           allocator: bool = True, imports: str = "") -> str:
    """A minimal Proxy-Wasm module around `body` (its imports are hoisted to the top)."""
    lines = body.splitlines()
    hoisted = [ln for ln in lines if ln.lstrip().startswith("(import")]
    body = "\n".join(ln for ln in lines if not ln.lstrip().startswith("(import"))
    imports = "\n".join([imports, *hoisted])
    return f"""(module
{imports}
  (memory (export "memory") {memory_pages})
  (func (export "proxy_abi_version_{abi}"))
{ALLOCATOR if allocator else ""}
{body}
)"""
