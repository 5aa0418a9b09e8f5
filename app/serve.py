"""Serve the chat app for a browser: `streamlit run app/dpo_app.py` on a free 127.0.0.1 port, waited for until it
answers, stopped on exit. The screenshot script (scripts/app_screenshot.py) and the browser test use it."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

APP = Path(__file__).with_name("dpo_app.py")


@contextlib.contextmanager
def serve_app(env: dict, log=subprocess.DEVNULL, start_timeout: float = 60):
    """Yields the app's URL; raises RuntimeError when it does not answer within `start_timeout` seconds."""
    with socket.socket() as sock:  # a free port (the OS picks it)
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "streamlit", "run", str(APP), "--server.headless", "true", "--server.address",
         "127.0.0.1", "--server.port", str(port), "--browser.gatherUsageStats", "false", "--client.toolbarMode",
         "minimal"], env=env, cwd=APP.parents[1], stdout=log, stderr=subprocess.STDOUT)
    url, deadline = f"http://127.0.0.1:{port}", time.monotonic() + start_timeout
    try:
        while True:
            try:
                if urllib.request.urlopen(f"{url}/_stcore/health", timeout=2).status == 200:
                    break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise RuntimeError("streamlit did not start") from None
                time.sleep(0.5)
        yield url
    finally:
        server.terminate()
        try:
            server.wait(timeout=10)
        except subprocess.TimeoutExpired:
            server.kill()
