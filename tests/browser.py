"""A headless Chromium driven over the DevTools protocol, for the browser test and docs/screenshots.py.

MLflow's UI is a single-page app: a plain ``chromium --screenshot`` may catch a spinner, and expanding a parent
run takes a click. This drives one page over the DevTools websocket with aiohttp (installed with
``ray[default]``): navigate, wait until a JavaScript condition holds, run JavaScript (clicks), screenshot.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

BINARIES = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def find_chromium() -> str | None:
    """The path of the first Chromium/Chrome binary on PATH, None when there is none."""
    for name in BINARIES:
        path = shutil.which(name)
        if path:
            return path
    return None


class BrowserError(RuntimeError):
    """Chromium did not start, a DevTools call failed, or a page never reached the awaited state."""


class Chromium:
    """One headless Chromium with one page, ``width`` x ``height`` CSS pixels; use as a context manager."""

    def __init__(self, binary: str, width: int = 1400, height: int = 900, start_timeout: float = 60) -> None:
        self.profile = tempfile.TemporaryDirectory(prefix="sophon-chromium-")
        self.log_path = Path(self.profile.name) / "chromium.log"
        with self.log_path.open("w") as log:
            self.process = subprocess.Popen(
                [binary, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--hide-scrollbars",
                 "--no-first-run", "--no-default-browser-check", "--remote-debugging-address=127.0.0.1",
                 "--remote-debugging-port=0", f"--user-data-dir={self.profile.name}/profile",
                 f"--window-size={width},{height}", "about:blank"],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        self.loop = asyncio.new_event_loop()
        self.next_id = 0
        self.session = self.ws = None
        try:
            port = self._devtools_port(start_timeout)
            self.ws_url = self._page_websocket(port)
            self.session, self.ws = self.loop.run_until_complete(self._connect())
            self.call("Page.enable")
            self.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                      mobile=False)
        except BaseException:
            self.close()
            raise

    def _devtools_port(self, timeout: float) -> int:
        """The port Chromium writes to ``<profile>/DevToolsActivePort`` once its DevTools server listens."""
        active = Path(self.profile.name) / "profile" / "DevToolsActivePort"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if active.is_file():
                first = active.read_text().split("\n", 1)[0].strip()
                if first.isdigit():
                    return int(first)
            if self.process.poll() is not None:
                break
            time.sleep(0.2)
        tail = "\n".join(self.log_path.read_text(errors="replace").splitlines()[-20:])
        raise BrowserError(f"Chromium did not open its DevTools port within {timeout:.0f} s:\n{tail}")

    @staticmethod
    def _page_websocket(port: int) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=10) as response:
            targets = json.loads(response.read())
        pages = [t for t in targets if t.get("type") == "page"]
        if not pages:
            raise BrowserError(f"Chromium has no page target: {targets}")
        return pages[0]["webSocketDebuggerUrl"]

    async def _connect(self) -> tuple[Any, Any]:
        import aiohttp  # noqa: PLC0415 - installed with ray[default]

        session = aiohttp.ClientSession()
        return session, await session.ws_connect(self.ws_url, max_msg_size=0)

    async def _call(self, method: str, params: dict[str, Any], timeout: float) -> dict[str, Any]:
        self.next_id += 1
        ident = self.next_id
        await self.ws.send_str(json.dumps({"id": ident, "method": method, "params": params}))

        async def reply() -> dict[str, Any]:
            while True:
                message = json.loads((await self.ws.receive()).data)
                if message.get("id") == ident:
                    if "error" in message:
                        raise BrowserError(f"{method}: {message['error']}")
                    return message.get("result", {})

        try:
            return await asyncio.wait_for(reply(), timeout)
        except asyncio.TimeoutError as err:
            raise BrowserError(f"{method}: no answer within {timeout:.0f} s") from err

    def call(self, method: str, timeout: float = 60, **params: Any) -> dict[str, Any]:
        """One DevTools command; returns its result. Raises BrowserError when it fails."""
        return self.loop.run_until_complete(self._call(method, params, timeout))

    def evaluate(self, expression: str) -> Any:
        """The value of a JavaScript expression in the page (promises awaited)."""
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        if "exceptionDetails" in result:
            raise BrowserError(f"{expression[:80]}...: {result['exceptionDetails'].get('text')}")
        return result.get("result", {}).get("value")

    def goto(self, url: str) -> None:
        """Navigate (a hash change in a single-page app does not reload: load about:blank first)."""
        self.call("Page.navigate", url="about:blank")
        self.call("Page.navigate", url=url)

    def wait_for(self, condition: str, timeout: float = 90, what: str = "") -> None:
        """Poll a JavaScript expression until it is truthy (in JavaScript's sense).

        Raises BrowserError with ``what`` (or the expression) and the page's text when it never is."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.evaluate(f"Boolean({condition})"):
                    return
            except BrowserError:
                pass
            time.sleep(0.5)
        text = self.evaluate("document.body ? document.body.innerText.slice(0, 1500) : ''")
        raise BrowserError(f"page never showed {what or condition} within {timeout:.0f} s; it shows:\n{text}")

    def text(self) -> str:
        """The page's visible text."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def screenshot(self, path: str | Path) -> Path:
        """Write a PNG of the viewport to ``path`` and return it."""
        data = self.call("Page.captureScreenshot", format="png")["data"]
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(base64.b64decode(data))
        return target

    def close(self) -> None:
        """Close the connection and stop Chromium (its whole process group)."""
        if self.ws is not None:
            self.loop.run_until_complete(self.ws.close())
        if self.session is not None:
            self.loop.run_until_complete(self.session.close())
        self.loop.close()
        for sig in (signal.SIGTERM, signal.SIGKILL):
            if self.process.poll() is not None:
                break
            try:
                os.killpg(self.process.pid, sig)
                self.process.wait(timeout=15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                continue
        self.profile.cleanup()

    def __enter__(self) -> Chromium:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- MLflow 3.17's UI (selectors checked against mlflow 3.17.2's bundled pages) ---------------------------------

ML_VIEW = "workflowType=machine_learning"   # MLflow's "Model training" view, not its GenAI overview


def _js(value: object) -> str:
    return json.dumps(value)


def close_assistant(browser: Chromium) -> bool:
    """Close MLflow's "MLflow Assistant" side panel when it is open (it covers a quarter of the page); best effort:
    returns whether it was open and is closed now."""
    clicked = browser.evaluate("""(() => {
      const button = [...document.querySelectorAll('button[aria-label=Close]')].find(b => {
        for (let box = b, i = 0; box && i < 6; box = box.parentElement, i++)
          if ((box.innerText || '').startsWith('MLflow Assistant')) return true;
        return false;
      });
      if (button) button.click();
      return Boolean(button);
    })()""")
    if not clicked:
        return False
    try:
        browser.wait_for("!document.body.innerText.includes('MLflow Assistant')", timeout=10, what="it closed")
    except BrowserError:
        return False
    return True


def show_runs(browser: Chromium, base: str, experiment_id: str, columns: tuple[str, ...] = (),
              oldest_first: bool = False) -> str:
    """The experiment's runs table, with ``columns`` (names in MLflow's column chooser: attributes, metrics,
    params) toggled and every parent run expanded, newest (or ``oldest_first``) first; returns the page's text.

    Raises BrowserError when the table or the nested runs never show."""
    order = "&orderByKey=attributes.start_time&orderByAsc=true" if oldest_first else ""
    browser.goto(f"{base}/#/experiments/{experiment_id}/runs?{ML_VIEW}{order}")
    browser.wait_for("document.querySelectorAll('.ag-row').length > 0 && document.body.innerText.includes('Run Name')",
                     what="the runs table")
    close_assistant(browser)
    if columns:
        browser.evaluate("[...document.querySelectorAll('button')].find(e => e.innerText.trim() === 'Columns').click()")
        browser.wait_for("document.querySelector('[role=dialog] .du-bois-light-tree-treenode')", what="the columns")
        for name in columns:
            found = browser.evaluate(f"""(() => {{
              const node = [...document.querySelectorAll('[role=dialog] .du-bois-light-tree-treenode')]
                .find(n => n.innerText.trim() === {_js(name)});
              if (node) node.querySelector('.du-bois-light-tree-checkbox').click();
              return Boolean(node);
            }})()""")
            if not found:
                raise BrowserError(f"no column {name!r} in MLflow's column chooser")
        browser.evaluate("[...document.querySelectorAll('button')].find(e => e.innerText.trim() === 'Columns').click()")
    rows = browser.evaluate("document.querySelectorAll('.ag-row').length")
    expanders = browser.evaluate(
        "(() => { const b = [...document.querySelectorAll('button[data-component-id*=\"runnamecellrenderer\"]')];"
        " b.forEach(e => e.click()); return b.length; })()")
    if expanders:
        browser.wait_for(f"document.querySelectorAll('.ag-row').length > {rows}", what="the nested runs")
    time.sleep(1)  # let the grid lay the new rows out
    return browser.text()


def show_metric(browser: Chromium, base: str, experiment_id: str, run_id: str, metric: str) -> str:
    """One run's ``metric`` chart, full screen, from the run's "Model metrics" tab; returns the page's text.

    Raises BrowserError when the chart never shows."""
    browser.goto(f"{base}/#/experiments/{experiment_id}/runs/{run_id}/model-metrics?{ML_VIEW}")
    browser.wait_for(f"document.body.innerText.includes({_js(metric)}) && document.querySelector('.js-plotly-plot')",
                     what=f"the {metric} chart")
    close_assistant(browser)
    opened = browser.evaluate(f"""(() => {{
      const title = [...document.querySelectorAll('*')].find(e => e.childElementCount === 0
                      && e.textContent.trim() === {_js(metric)});
      let card = title;
      while (card && card.querySelectorAll('button[data-component-id=fullscreen_button_chartcard]').length !== 1)
        card = card.parentElement;
      if (card) card.querySelector('button[data-component-id=fullscreen_button_chartcard]').click();
      return Boolean(card);
    }})()""")
    if opened:
        browser.wait_for("document.querySelector('[role=dialog] .js-plotly-plot')", what="the full-screen chart")
    time.sleep(1.5)  # plotly's first draw
    return browser.text()


def show_artifact(browser: Chromium, base: str, experiment_id: str, run_id: str, path: str) -> str:
    """The run's artifact browser with ``path`` (an image) selected and drawn; returns the page's text.

    Raises BrowserError when the image never loads."""
    browser.goto(f"{base}/#/experiments/{experiment_id}/runs/{run_id}/artifacts/{path}?{ML_VIEW}")
    browser.wait_for("[...document.images].some(i => i.src.startsWith('blob:') && i.naturalWidth > 300)",
                     what=f"the image {path}")
    close_assistant(browser)
    time.sleep(0.5)
    return browser.text()
