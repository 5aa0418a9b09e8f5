"""The app as a user sees it: `streamlit run` on 127.0.0.1, a real headless Chromium driven by Playwright.

The adapter is pushed to the loopback Hub double first and the app loads it by repo id, so this also runs the whole
push -> Hub -> app path. The screenshot goes to tmp (and to $DPO_APP_SCREENSHOT, e.g. docs/app.png, when set).
Needs Debian's Chromium at /usr/bin/chromium (`apt-get install -y chromium`); `playwright install` is not used.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hub_double import TOKEN, USER, HubDouble, make_tiny_adapter
from serve import serve_app  # app/serve.py (conftest puts app/ on the path)

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage"]
REPO = f"{USER}/tiny-dpo-chat"
SERVED = {}  # what the module's app server writes to: its votes file

pytestmark = pytest.mark.skipif(not Path(CHROMIUM).exists(),
                                reason=f"no Chromium at {CHROMIUM}: apt-get install -y chromium")


def hub_env(hub: HubDouble, home: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGING"))}
    return {**env, "HF_ENDPOINT": hub.url, "HF_HOME": str(home), "HF_HUB_DISABLE_TELEMETRY": "1"}


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    """The app served by `streamlit run`, its adapter pushed to (and fetched from) the Hub double; killed after."""
    tmp = tmp_path_factory.mktemp("browser")
    adapter = make_tiny_adapter(tmp / "adapter", load_in_4bit=True)
    with HubDouble() as hub:
        push = subprocess.run(
            [sys.executable, "-c", "import sys; from dpo_pipeline.hub import push_adapter; "
                                   "print(push_adapter(sys.argv[1], sys.argv[2]))", str(adapter), REPO],
            env={**hub_env(hub, tmp / "hf-push"), "HF_TOKEN": TOKEN}, capture_output=True, text=True, timeout=120)
        assert push.stdout.startswith(f"Pushed 7 files to new public repo {REPO}"), push.stdout + push.stderr
        SERVED["votes"] = tmp / "votes.jsonl"
        env = {**hub_env(hub, tmp / "hf-app"), "DPO_APP_ADAPTER": REPO, "DPO_VOTES_FILE": str(SERVED["votes"])}
        with open(tmp / "streamlit.log", "w") as log:
            try:
                with serve_app(env, log) as url:
                    yield url
            except RuntimeError as err:
                pytest.fail(f"{err}: " + (tmp / "streamlit.log").read_text()[-2000:])


@pytest.mark.slow  # starts the app and Chromium
def test_chat_in_a_real_browser(app_url, tmp_path):
    from playwright.sync_api import expect, sync_playwright

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_url, wait_until="domcontentloaded")
            box = page.get_by_test_id("stChatInputTextArea")
            box.wait_for(timeout=120_000)  # the model is downloaded from the Hub double and loaded first
            assert f"Adapter {REPO} on base offline:gpt2-tiny (4-bit NF4)" in page.inner_text("body")

            # Short answers (64 -> 24 new tokens, steps of 8): a quicker test and a tidier screenshot.
            max_new_tokens = page.locator('input[type=range][aria-label="Max new tokens"]')
            max_new_tokens.focus()
            for _ in range(5):
                max_new_tokens.press("ArrowLeft")
            expect(max_new_tokens).to_have_value("24")

            box.fill("Tell me about owls.")
            box.press("Enter")
            messages = page.get_by_test_id("stChatMessage")
            messages.nth(1).get_by_text("Answered in").wait_for(timeout=120_000)  # both answers are done
            assert "Tell me about owls." in messages.nth(0).inner_text()
            answer = messages.nth(1).inner_text()
            assert "Base model" in answer and "DPO adapter" in answer
            base, tuned = answer.split("Base model (adapter off)")[1].split("Answered in")[0].split("DPO adapter")
            assert len(base.split()) >= 2 and len(tuned.split()) >= 2, answer  # two answers, not just the titles
            assert not page.get_by_test_id("stException").count()

            shot = tmp_path / "app.png"
            page.screenshot(path=str(shot))
            assert shot.stat().st_size > 20_000
            if os.environ.get("DPO_APP_SCREENSHOT"):  # refresh the committed screenshot: docs/app.png
                target = ROOT / os.environ["DPO_APP_SCREENSHOT"]
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(shot, target)

            # A repo the Hub does not have: one message in the page, no traceback.
            source = page.get_by_role("textbox", name="Hub repo id or local folder")
            source.fill(f"{USER}/no-such-adapter")
            source.press("Enter")
            page.get_by_test_id("stAlert").filter(has_text=f"No model repo '{USER}/no-such-adapter' on the Hub") \
                .wait_for(timeout=60_000)
            expect(page.get_by_test_id("stAlert")).to_have_count(1)  # the page stopped at the one message
            assert not page.get_by_test_id("stException").count() and "Traceback" not in page.inner_text("body")
        finally:
            browser.close()


@pytest.mark.slow  # starts the app and Chromium
def test_blind_votes_cast_in_the_page_become_a_preference_file_and_move_the_win_rate(app_url):
    import json

    from playwright.sync_api import sync_playwright

    import votes
    from dpo_pipeline.data import load_preferences

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(app_url, wait_until="domcontentloaded")
            page.get_by_test_id("stChatInputTextArea").wait_for(timeout=120_000)
            page.get_by_text("Blind A/B vote").click()
            page.get_by_text("No votes for this adapter yet.").wait_for(timeout=60_000)
            shown = []
            for question, button in (("Tell me about owls.", "A is better"), ("What is rain?", "Tie")):
                page.get_by_role("textbox", name="Prompt").fill(question)
                page.get_by_role("button", name="Answer both").click()
                page.get_by_role("button", name=button).wait_for(timeout=120_000)
                body = page.inner_text("body")
                shown.append(body)
                assert "adapter" not in body.split("Answer both")[-1].split("A is better")[0].lower()  # order hidden
                page.get_by_role("button", name=button).click()
                page.get_by_text("Saved. A was the").wait_for(timeout=60_000)
            page.get_by_text("2 votes").wait_for(timeout=60_000)
            final = page.inner_text("body")
            assert not page.get_by_test_id("stException").count()
        finally:
            browser.close()

    rows = votes.read_votes(SERVED["votes"])
    assert [r["prompt"][0]["content"] for r in rows] == ["Tell me about owls.", "What is rain?"]
    assert rows[0]["vote"] in ("adapter", "base") and rows[1]["vote"] == "tie"
    assert rows[0]["chosen"][0]["content"].split()[0] in shown[0]  # the answer shown as A became "chosen"
    assert rows[0]["adapter"] == REPO and rows[0]["settings"]["max_new_tokens"] > 0
    assert f"human votes: {votes.tally(rows)['win_rate']:.2f}" in final  # the page's running win rate

    # cut the file mid-line, as a killed write would: the earlier votes are still read, and the next round's
    # loader takes them as a preference file (the tie dropped by its cleaning)
    text = SERVED["votes"].read_text()
    SERVED["votes"].write_text(text + text.splitlines()[0][:40])
    assert len(votes.read_votes(SERVED["votes"])) == 2
    data = load_preferences(str(SERVED["votes"]), test_fraction=0.0)
    assert data.report.rows_read == 2 and data.report.dropped["tie_vote"] == 1 and len(data.train) == 1
    votes.append_vote(SERVED["votes"], rows[0])  # the cut tail goes, the new vote lands whole
    assert len(votes.read_votes(SERVED["votes"])) == 3 and json.loads(SERVED["votes"].read_text().splitlines()[-1])
