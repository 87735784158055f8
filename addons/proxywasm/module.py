"""The module and its linking: a .wasm compiled once and linked against the host calls.

`FilterModule` checks that the module is a Proxy-Wasm filter (an ABI marker, its memory, an
allocator), then defines every function it imports on a `Linker`: the host calls of
`exports.HOSTCALLS` with their signatures checked, and a named stub for anything else (a status
if the signature allows one, else a trap), so a filter importing something exotic still loads.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import wasmtime

from . import _wasmtime as raw
from .abi import ABI_0_1_0_CALLBACKS, ABI_MARKERS, CALLBACKS, Status, WasiErrno
from .exports import HOSTCALLS
from .vm import ACTIVE

logger = logging.getLogger(__name__)


class FilterLoadError(Exception):
    """The .wasm is not a usable Proxy-Wasm filter; the message says why."""


class FilterModule:
    """A Proxy-Wasm module compiled once and linked against the host functions."""

    def __init__(self, wasm: bytes, name: str = "filter") -> None:
        self.name = name
        try:
            self.module = wasmtime.Module(raw.engine(), wasm)
        except wasmtime.WasmtimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
            raise FilterLoadError(f"{name}: not a valid WebAssembly module: {first}") from e
        exports = {e.name for e in self.module.exports}
        versions = [m for m in ABI_MARKERS if m in exports]
        if not versions:
            legacy = sorted(n for n in exports if n.startswith("proxy_abi_version_"))
            has = f" (it has {', '.join(legacy)})" if legacy else ""
            raise FilterLoadError(
                f"{name}: not a supported Proxy-Wasm filter: it exports neither "
                f"{' nor '.join(ABI_MARKERS)}{has}"
            )
        self.abi_version = versions[0].removeprefix("proxy_abi_version_").replace("_", ".")
        self.exports = frozenset(exports)
        self._check_callbacks()
        main = next((e.type for e in self.module.exports if e.name == "main"), None)
        self.main_params = len(main.params) if isinstance(main, wasmtime.FuncType) else 0
        self.imports = frozenset(imp.name or "" for imp in self.module.imports)
        if "memory" not in exports:
            raise FilterLoadError(f"{name}: the module does not export its memory as 'memory'")
        if "proxy_on_memory_allocate" not in exports and "malloc" not in exports:
            raise FilterLoadError(
                f"{name}: the module exports neither proxy_on_memory_allocate nor malloc"
            )
        self.unimplemented: list[str] = []
        linker = wasmtime.Linker(raw.engine())
        self._define_imports(linker)
        try:
            self.pre = linker.instantiate_pre(self.module)
        except wasmtime.WasmtimeError as e:
            raise FilterLoadError(
                f"{name}: cannot link the module: {raw.summarize(str(e))}") from e

    def _check_callbacks(self) -> None:
        """Refuse a callback export whose type is not the ABI's (see `abi.CALLBACKS`)."""
        expected = dict(CALLBACKS)
        if self.abi_version == "0.1.0":
            expected.update(ABI_0_1_0_CALLBACKS)
        for export in self.module.exports:
            if export.name not in expected:
                continue
            want, ty = _sig(raw.functype(*expected[export.name])), export.type
            if not isinstance(ty, wasmtime.FuncType):
                raise FilterLoadError(
                    f"{self.name}: exports {export.name}, which is not a function; ABI "
                    f"{self.abi_version} defines it as {want}")
            if _sig(ty) != want:
                raise FilterLoadError(
                    f"{self.name}: exports {export.name} with type {_sig(ty)}, but ABI "
                    f"{self.abi_version} defines {want}")

    @classmethod
    def from_file(cls, path: str | os.PathLike[str]) -> FilterModule:
        """Read and compile a .wasm file; errors name the file."""
        p = Path(path)
        try:
            data = p.read_bytes()
        except OSError as e:
            raise FilterLoadError(f"cannot read filter {p}: {e.strerror or e}") from e
        return cls(data, name=str(p))

    def _define_imports(self, linker: wasmtime.Linker) -> None:
        """Define every function the module imports: implemented ones, or named stubs.

        A function imported twice (some toolchains do) is defined once and serves both.
        """
        defined: dict[tuple[str, str], str] = {}
        for imp in self.module.imports:
            ty = imp.type
            if not isinstance(ty, wasmtime.FuncType):
                raise FilterLoadError(
                    f"{self.name}: imports {imp.module}.{imp.name}, which is not a function; "
                    "the host provides only functions"
                )
            key = (imp.module, imp.name or "")
            if key in defined:
                if defined[key] != _sig(ty):
                    raise FilterLoadError(
                        f"{self.name}: imports {imp.module}.{imp.name} twice with different "
                        f"types, {defined[key]} and {_sig(ty)}"
                    )
                continue
            defined[key] = _sig(ty)
            entry = HOSTCALLS.get(key)
            if entry is not None:
                sig, impl = entry
                want = raw.functype(*sig)
                if _sig(ty) != _sig(want):
                    raise FilterLoadError(
                        f"{self.name}: import {imp.module}.{imp.name} has type {_sig(ty)}, "
                        f"but the ABI defines {_sig(want)}"
                    )
                raw.define_host_function(linker, imp.module, imp.name or "", ty, impl, ACTIVE)
            else:
                self.unimplemented.append(f"{imp.module}.{imp.name}")
                raw.define_host_function(
                    linker, imp.module, imp.name or "", ty,
                    _unimplemented(imp.module, imp.name, ty), ACTIVE,
                )
        if self.unimplemented:
            logger.info(
                "%s: imports the host does not implement (they return Unimplemented or trap "
                "if called): %s", self.name, ", ".join(self.unimplemented),
            )


def _sig(ty: wasmtime.FuncType) -> str:
    params = ", ".join(str(p) for p in ty.params)
    results = ", ".join(str(r) for r in ty.results)
    return f"({params}) -> ({results})"


def _unimplemented(module: str, name: str | None, ty: wasmtime.FuncType) -> raw.HostImpl:
    """A stub for an import the host lacks: a status if the signature allows one, else a trap."""
    qualified = f"{module}.{name}"
    results = [str(r) for r in ty.results]
    warned: list[bool] = []

    def call(_vm: object, *_params: int) -> int | None:
        if not warned:
            warned.append(True)
            logger.warning("filter called %s, which this host does not implement", qualified)
        if results == ["i32"] and module == "env":
            return int(Status.UNIMPLEMENTED)
        if results == ["i32"] and module.startswith("wasi_"):
            return int(WasiErrno.NOSYS)
        raise raw.HostTrap(f"unimplemented import {qualified} was called")

    return call
