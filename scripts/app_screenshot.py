"""Screenshot the chat app answering one prompt with a trained adapter (how docs/app.png is made).

    .venv/bin/python scripts/app_screenshot.py results/run-pretrained-cpu "How do I make a good cup of tea?" docs/app.png

Starts `streamlit run app/dpo_app.py` on 127.0.0.1 with the adapter (a local folder or a Hub repo id), asks the
prompt in a headless Chromium (Debian's /usr/bin/chromium, driven by Playwright), waits for the base and adapter
answers, and saves a PNG. Generation settings are the app's defaults.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("adapter", help="adapter folder or Hub repo id")
    parser.add_argument("prompt")
    parser.add_argument("out", help="PNG to write")
    parser.add_argument("--timeout", type=float, default=600, help="seconds to wait for the answers")
    opts = parser.parse_args()
    if not Path(CHROMIUM).exists():
        raise SystemExit(f"error: no Chromium at {CHROMIUM}: apt-get install -y chromium")

    from playwright.sync_api import sync_playwright

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(ROOT / "app" / "dpo_app.py"), "--server.headless", "true",
         "--server.address", "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false",
         "--client.toolbarMode", "minimal"],
        env={**os.environ, "DPO_APP_ADAPTER": opts.adapter}, cwd=ROOT,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 60
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("error: streamlit did not start")
                time.sleep(0.5)
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.goto(url, wait_until="domcontentloaded")
            box = page.get_by_test_id("stChatInputTextArea")
            box.wait_for(timeout=opts.timeout * 1000)  # the model loads first
            box.fill(opts.prompt)
            box.press("Enter")
            page.get_by_test_id("stChatMessage").nth(1).get_by_text("Answered in").wait_for(
                timeout=opts.timeout * 1000)
            Path(opts.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=opts.out, full_page=True)
            browser.close()
    finally:
        server.terminate()
        server.wait(timeout=10)
    print(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
