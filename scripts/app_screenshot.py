"""Screenshot the chat app answering one prompt with a trained adapter (how docs/app.png is made).

    .venv/bin/python scripts/app_screenshot.py results/run-pretrained-cpu "How do I make a good cup of tea?" docs/app.png

Starts `streamlit run app/dpo_app.py` on 127.0.0.1 with the adapter (a local folder or a Hub repo id), asks the
prompt in a headless Chromium (Debian's /usr/bin/chromium, driven by Playwright), waits for the base and adapter
answers, and saves a PNG. Generation settings are the app's defaults.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "app"))
from serve import serve_app  # noqa: E402 - app/ is a folder of scripts, not a package
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-dev-shm-usage"]


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

    try:
        with serve_app({**os.environ, "DPO_APP_ADAPTER": opts.adapter}) as url, sync_playwright() as pw:
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
    except RuntimeError as err:  # the app did not start
        raise SystemExit(f"error: {err}") from None
    print(f"wrote {opts.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
