"""mitmweb with the addon, seen in a real browser (`just web-check`).

Starts the auth server, the shop and `mitmweb` with the wasm_auth addon on 127.0.0.1, sends a
miss, a hit, a denial and a logout through the proxy, then opens mitmweb in Debian's headless
Chromium (Selenium with Debian's chromedriver) and checks what a user sees: the flow list's
Comment column with the filter's decisions (`web_columns` left as mitmweb's default), the
`~comment` and `~marked` filters, a flow's Comment tab, and the `wasm.instances` command as
mitmweb's command API returns it. Screenshots go to `--out` (default `results/web/`):
`flows.png` (the flow list), `filtered.png` (`~comment miss`) and `detail.png` (a flow's
comment).

    python -m tests.web_check [--out results/web]

Exit 0 when every check holds, 1 with the failed check, 2 with one line when Chromium or its
driver is missing.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx

from scenarios.procs import free_port, process

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = ("chromium", "chromium-browser", "google-chrome")
DRIVER = "chromedriver"


class CheckFailed(Exception):
    """A check of what mitmweb shows did not hold."""


def find_browser() -> tuple[str, str]:
    """Chromium and chromedriver from PATH (Debian: `apt-get install chromium chromium-driver`)."""
    browser = next((p for p in map(shutil.which, CHROMIUM) if p), None)
    driver = shutil.which(DRIVER)
    if browser is None or driver is None:
        missing = " and ".join(n for n, p in (("chromium", browser), ("chromium-driver", driver))
                               if p is None)
        raise RuntimeError(f"{missing} not installed (Debian: apt-get install chromium "
                           f"chromium-driver; .ci/setup does it as root)")
    return browser, driver


def wait_until(what: str, check: Callable[[], Any], timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
        except Exception as e:  # the page is still rendering
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(0.2)
    raise CheckFailed(f"{what} (last seen: {last!r})")


def send_traffic(proxy: str, auth: str) -> None:
    """A miss, a hit, a denial (an unknown token) and a logout for shop.example."""
    token = httpx.post(f"{auth}/login", json={"user": "alice"}, timeout=10).json()["token"]
    with httpx.Client(base_url=proxy, timeout=30) as client:
        def get(path: str, bearer: str, method: str = "GET") -> int:
            headers = {"Host": "shop.example", "Authorization": f"Bearer {bearer}"}
            return client.request(method, path, headers=headers).status_code

        statuses = [get("/product/1", token), get("/product/2", token),
                    get("/cart", "not-a-token"), get("/logout", token, "POST")]
    if statuses != [200, 200, 401, 200]:
        raise CheckFailed(f"the proxy answered {statuses}, expected [200, 200, 401, 200]")


def run_web_check(out: Path, log_dir: Path) -> list[str]:
    """Run everything; the checks that held, in order (CheckFailed at the first that did not)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys

    browser, driver_path = find_browser()
    env = {"PYTHONPATH": str(ROOT)}
    auth_port, shop_port, proxy_port, web_port = (free_port() for _ in range(4))
    auth, proxy, web = (f"http://127.0.0.1:{p}" for p in (auth_port, proxy_port, web_port))
    held: list[str] = []
    with ExitStack() as stack:
        stack.enter_context(process(
            [sys.executable, "-m", "scenarios", "auth-server", "--port", str(auth_port),
             "--no-store"], auth_port, log_dir / "auth.log", env))
        stack.enter_context(process(
            [sys.executable, "-m", "scenarios", "shop", "--port", str(shop_port)], shop_port,
            log_dir / "shop.log", env))
        mitmweb = shutil.which("mitmweb", path=str(Path(sys.executable).parent)) or "mitmweb"
        stack.enter_context(process(
            [mitmweb, "--set", "web_open_browser=false", "--web-port", str(web_port),
             "--listen-host", "127.0.0.1", "-p", str(proxy_port),
             "--mode", f"reverse:http://127.0.0.1:{shop_port}",
             "-s", str(ROOT / "addons" / "wasm_auth.py"), "--set", "keep_host_header=true",
             "--set", f"wasm_cluster=auth={auth}", "--set", "wasm_admin_listen=",
             "--set", f"wasm_store={log_dir / 'store'}",
             "--set", f"wasm_spool={log_dir / 'spool'}"],
            web_port, log_dir / "mitmweb.log", env, timeout=60))
        send_traffic(proxy, auth)
        held.append("a miss, a hit, a denial and a logout went through mitmweb's proxy")

        options = webdriver.ChromeOptions()
        options.binary_location = browser
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                    "--window-size=1500,850", "--hide-scrollbars"):
            options.add_argument(arg)
        driver = webdriver.Chrome(service=Service(driver_path), options=options)
        stack.callback(driver.quit)
        driver.get(web + "/")

        def comments() -> list[str]:
            cells = driver.find_elements(By.CSS_SELECTOR, ".flow-table td.col-comment")
            return [c.text for c in cells]

        texts = wait_until("four flows with comments in the flow list",
                           lambda: (lambda t: t if len(t) == 4 and all(t) else None)(comments()))
        headers = [h.text for h in driver.find_elements(By.CSS_SELECTOR, ".flow-table th")]
        if "Comment" not in headers:
            raise CheckFailed(f"no Comment column in the flow list: {headers}")
        expected = ["wasm: miss", "wasm: hit", "wasm: deny", "wasm: logout · token evicted"]
        for text, start in zip(texts, expected, strict=True):
            if not text.startswith(start) or "instance shop.example" not in text:
                raise CheckFailed(f"flow comments {texts}, expected them to start with {expected}")
        if " 1 pages" in " ".join(texts):
            raise CheckFailed(f"'1 pages' in {texts}")
        held.append("the flow list shows a Comment column (web_columns untouched) with miss, "
                    "hit, deny and 'logout · token evicted'")
        out.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(out / "flows.png"))

        search = driver.find_element(By.CSS_SELECTOR, "input[placeholder='Search']")
        for query, want in (("~marked", ["wasm: deny"]), ("~comment miss", ["wasm: miss"])):
            search.send_keys(Keys.CONTROL, "a")
            search.send_keys(query)
            def shown(want: list[str] = want) -> list[str] | None:
                texts = comments()
                return texts if [x.split(" · ")[0] for x in texts] == want else None

            got = wait_until(f"{query!r} shows {want}", shown)
            held.append(f"the filter {query!r} shows only {got[0].split(' · ')[0]!r}")
        driver.save_screenshot(str(out / "filtered.png"))
        search.send_keys(Keys.CONTROL, "a")
        search.send_keys(Keys.BACKSPACE)
        wait_until("the filter cleared", lambda: len(comments()) == 4)

        rows = driver.find_elements(By.CSS_SELECTOR, ".flow-table tbody tr")
        logout_row = next(r for r in rows if "logout" in r.text)
        logout_row.click()
        tab = wait_until("a Comment tab in the flow's detail", lambda: driver.find_element(
            By.XPATH, "//nav//a[normalize-space()='Comment']"))
        tab.click()
        body = wait_until("the comment in the detail pane", lambda: (
            lambda t: t if "token evicted" in t else None)(
                driver.find_element(By.CSS_SELECTOR, ".flow-detail").text))
        held.append("a flow's Comment tab shows its decision: "
                    + next(line for line in body.splitlines() if "token evicted" in line))
        driver.save_screenshot(str(out / "detail.png"))

        with httpx.Client(base_url=web, timeout=10) as client:
            client.get("/")
            xsrf = client.cookies.get("_xsrf", "")
            r = client.post("/commands/wasm.instances", json={"arguments": []},
                            headers={"X-XSRFToken": xsrf})
        value = r.json().get("value")
        if not (isinstance(value, list) and value[0][0] == "instance"
                and value[1][0] == "shop.example"):
            raise CheckFailed(f"wasm.instances through mitmweb gave {r.text[:300]}")
        table = dict(zip(value[0], value[1], strict=True))
        held.append(f"wasm.instances through mitmweb's command API: {table}")
    return held


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tests.web_check", description=__doc__.split(
        "\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "results" / "web",
                   help="directory for the screenshots")
    a = p.parse_args(argv)
    try:
        find_browser()
    except RuntimeError as e:
        print(f"web-check: {e}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="web-check-") as tmp:
        try:
            held = run_web_check(a.out, Path(tmp))
        except (CheckFailed, subprocess.SubprocessError, RuntimeError, TimeoutError) as e:
            print(f"web-check: FAILED: {e}", file=sys.stderr)
            log = Path(tmp) / "mitmweb.log"
            if log.exists():
                print(log.read_text(errors="replace")[-3000:], file=sys.stderr)
            return 1
    for line in held:
        print(f"ok  {line}")
    print(f"screenshots: {a.out / 'flows.png'}, {a.out / 'filtered.png'}, {a.out / 'detail.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
