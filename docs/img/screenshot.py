"""Screenshot of a page as a first-time visitor sees it, minus MLflow's assistant panel. Used by render.sh.

    python docs/img/screenshot.py URL OUT.png [--size 1400x800] [--wait-for TEXT] [--timeout 60]

Drives headless Chromium over the DevTools protocol (aiohttp's websocket client; aiohttp comes with Ray and MLflow)
instead of `chromium --screenshot`, for two things that flag cannot do: to mark MLflow's assistant as already
shown, before the page's own scripts run (MLflow 3 opens its assistant side panel on a browser's first visit, and it
would take a third of the picture), and to wait until the page shows TEXT (the runs table has loaded) rather than
for a fixed virtual time.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

# MLflow's useLocalStorage keys are `${key}_v${version}`: the first-visit auto-open of the assistant, and the panel
PREPARE = """
try {
  localStorage.setItem("mlflow.assistant.fab.autoOpenedOnFirstLoad_v1", "true");
  localStorage.setItem("mlflow.assistant.panelOpen_v1", "false");
} catch (e) {}
"""


class Page:
    """One tab over the DevTools websocket: `call` sends a command and returns its result."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws, self.next_id = ws, 0

    async def call(self, method: str, **params: object) -> dict:
        self.next_id += 1
        await self.ws.send_json({"id": self.next_id, "method": method, "params": params})
        async for msg in self.ws:
            reply = json.loads(msg.data)
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error'].get('message')}")
                return reply.get("result", {})
        raise RuntimeError(f"{method}: the browser closed the connection")


async def shoot(port: int, url: str, out: Path, width: int, height: int, wait_for: str, timeout: float) -> None:
    async with aiohttp.ClientSession() as http:
        async with http.put(f"http://127.0.0.1:{port}/json/new?about:blank") as resp:
            target = await resp.json(content_type=None)
        async with http.ws_connect(target["webSocketDebuggerUrl"], max_msg_size=0) as ws:
            page = Page(ws)
            await page.call("Page.enable")
            await page.call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                            mobile=False)
            await page.call("Page.addScriptToEvaluateOnNewDocument", source=PREPARE)
            await page.call("Page.navigate", url=url)
            check = f"document.body !== null && document.body.innerText.includes({json.dumps(wait_for)})"
            deadline = time.monotonic() + timeout
            while True:
                shown = await page.call("Runtime.evaluate", expression=check, returnByValue=True)
                if shown.get("result", {}).get("value") is True:
                    break
                if time.monotonic() > deadline:
                    raise RuntimeError(f"{url} did not show {wait_for!r} within {timeout:g} s")
                await asyncio.sleep(0.5)
            await asyncio.sleep(2)  # let the last requests settle (column widths, icons)
            shot = await page.call("Page.captureScreenshot", format="png")
            out.write_bytes(base64.b64decode(shot["data"]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("url")
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", default="1400x800", help="window WIDTHxHEIGHT in CSS pixels")
    parser.add_argument("--wait-for", default="matching runs", help="text the page shows once it has loaded")
    parser.add_argument("--timeout", type=float, default=60.0)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.split("x"))
    browser = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if browser is None:
        sys.exit("screenshot.py: needs Chromium (Debian: apt-get install chromium)")
    with tempfile.TemporaryDirectory() as profile:
        proc = subprocess.Popen(
            [browser, "--headless=new", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             f"--user-data-dir={profile}", "--remote-debugging-address=127.0.0.1", "--remote-debugging-port=0",
             "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        try:
            active = Path(profile) / "DevToolsActivePort"  # the port Chromium chose, on the file's first line
            for _ in range(200):
                if active.is_file() and active.read_text().strip():
                    break
                time.sleep(0.1)
            else:
                sys.exit("screenshot.py: Chromium did not open its DevTools port")
            port = int(active.read_text().split()[0])
            asyncio.run(shoot(port, args.url, args.out, width, height, args.wait_for, args.timeout))
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
