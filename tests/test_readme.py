"""What a user reads agrees with what the programs say: the README's options table and recipe
list, the addon's option help, the manager's and the CLIs' --help, the justfile's recipe docs."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from mitmproxy.test import taddons

from addons.proxywasm.abi import ABI_MARKERS
from addons.wasm_auth import WasmAuth
from manager.__main__ import main as manager_main
from manager.policies import AdaptiveParams, parse_policy
from scenarios.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()


def addon_options() -> dict[str, str]:
    """The addon's options: name → help (from a test with a running event loop, which
    mitmproxy's test context uses)."""
    addon = WasmAuth()
    with taddons.context(addon) as tctx:
        return {name: opt.help for name, opt in tctx.options._options.items()
                if name.startswith("wasm_")}


async def test_the_options_table_lists_every_addon_option() -> None:
    section = README.split("## The mitmproxy addon", 1)[1].split("\n## ", 1)[0]
    listed = set(re.findall(r"^\| `(wasm_\w+)` \|", section, re.MULTILINE))
    assert listed == set(addon_options())


async def test_option_help_agrees_with_the_readme() -> None:
    options = addon_options()
    for marker in ABI_MARKERS:  # every ABI the host runs
        version = marker.removeprefix("proxy_abi_version_").replace("_", ".")
        assert version in options["wasm_filter"]
    # the README's auth server port, not mitmweb's web interface (8081)
    assert "auth=http://127.0.0.1:8090" in options["wasm_cluster"]
    assert "auth=http://127.0.0.1:8090" in README


def test_manager_help_gives_the_adaptive_defaults(capsys) -> None:
    with pytest.raises(SystemExit):
        manager_main(["run", "--help"])
    spec = re.search(r"defaults: (adaptive:\S+)", capsys.readouterr().out)
    assert spec is not None
    assert parse_policy(spec.group(1)) == parse_policy("adaptive") == AdaptiveParams()
    assert dataclasses.asdict(AdaptiveParams())["call_cost_page_s"] == 900.0  # README's B3


def test_every_recipe_is_in_the_readme_and_its_doc_is_one_line() -> None:
    lines = (ROOT / "justfile").read_text().splitlines()
    recipes = []
    for i, line in enumerate(lines):
        m = re.match(r"^([a-z][\w-]*)( [^:]*)?:", line)
        if not m or line.startswith(("set ", "python ")):
            continue
        recipes.append(m.group(1))
        j = i - 1
        while j >= 0 and lines[j].startswith("["):  # attributes
            j -= 1
        if lines[j - 1].startswith("#") and m.group(1) != "default":
            # `just --list` shows only a recipe's last comment line
            raise AssertionError(f"recipe {m.group(1)}: its doc comment spans lines")
    listed = README.split("`just` lists the recipes:", 1)[1].split(".\n", 1)[0]
    for name in recipes:
        if name != "default":
            assert f"`{name}`" in listed, name


def test_eclog_columns_help_gives_the_published_layout(capsys) -> None:
    with pytest.raises(SystemExit):
        main(["eclog-convert", "--help"])
    layout = "IpId,UserId,TimeStamp,HttpMethod,Uri,HttpVersion,ResponseCode,Bytes,Referrer,UserAgent"
    assert layout in README
    assert layout in " ".join(capsys.readouterr().out.split()).replace(", ", ",")
