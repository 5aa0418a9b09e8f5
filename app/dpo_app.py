"""Chat with a DPO-tuned adapter, side by side with its base model: `streamlit run app/dpo_app.py`.

The adapter is a Hub repo id or a local folder (default: $DPO_APP_ADAPTER, else results/best, else the newest run
under results/). Loading is dpo_pipeline.chat, the chat itself chat_session.py, the blind votes votes.py; this file
is only the page.
"""

from __future__ import annotations

import dataclasses
import random
import time

import pandas as pd
import streamlit as st

import chat_session as session  # app/: streamlit puts the script's folder on the path
import votes
from dpo_pipeline import chat
from dpo_pipeline.errors import first_line

st.set_page_config(page_title="DPO chat", page_icon="💬", layout="wide")
EMPTY = "_(empty answer: the model ended at once)_"


@st.cache_resource(show_spinner="Loading the base model and the adapter…", max_entries=2)
def get_adapter(source: str, base: str) -> chat.LoadedAdapter:
    # Cached per (source, base) for every session of this server: the model is loaded once.
    return chat.load_adapter(source, base or None)


def show_answers(loaded: chat.LoadedAdapter, prompt: str, settings: session.GenerationSettings,
                 compare: bool) -> tuple[str, str | None, float]:
    """Stream the adapter's answer (and the base model's, in a column beside it); return the texts and the time."""
    start = time.perf_counter()

    def stream(use_adapter: bool) -> str:
        text = st.write_stream(session.stream_reply(loaded, prompt, settings, use_adapter=use_adapter))
        text = text.strip() if isinstance(text, str) else ""
        if not text:
            st.markdown(EMPTY)
        return text

    if not compare:
        tuned, base = stream(True), None
    else:
        left, right = st.columns(2)
        with left:
            st.caption("**Base model** (adapter off)")
            base = stream(False)
        with right:
            st.caption("**DPO adapter**")
            tuned = stream(True)
    seconds = time.perf_counter() - start
    st.caption(f"Answered in {seconds:.1f} s")
    return tuned, base, seconds


def show_turn(turn: dict) -> None:
    with st.chat_message("user"):
        st.markdown(turn["user"])
    with st.chat_message("assistant"):
        if turn["base"] is None:
            st.markdown(turn["adapter"] or EMPTY)
        else:
            left, right = st.columns(2)
            left.caption("**Base model** (adapter off)")
            left.markdown(turn["base"] or EMPTY)
            right.caption("**DPO adapter**")
            right.markdown(turn["adapter"] or EMPTY)
        st.caption(f"Answered in {turn['seconds']:.1f} s")


# ---------------------------------------------------------------- sidebar: what to load, how to generate
with st.sidebar:
    st.header("Adapter")
    source = st.text_input("Hub repo id or local folder", value=session.default_source(), key="source",
                           help="e.g. results/best, results/run-smoke or user/my-dpo-adapter").strip()
    base_override = st.text_input("Base model override (optional)", key="base_override",
                                  help="Leave empty to use the base the adapter was trained on").strip()
    st.header("Generation")
    default = session.GenerationSettings()
    settings = session.GenerationSettings(
        max_new_tokens=st.slider("Max new tokens", 8, 512, default.max_new_tokens, step=8),
        temperature=st.slider("Temperature (0 = greedy)", 0.0, 2.0, default.temperature, step=0.05),
        top_p=st.slider("Top-p", 0.05, 1.0, default.top_p, step=0.05),
        repetition_penalty=st.slider("Repetition penalty", 1.0, 2.0, default.repetition_penalty, step=0.05),
        seed=int(st.number_input("Seed", min_value=0, max_value=2**31 - 1, value=default.seed, step=1)),
    )
    compare = st.toggle("Side by side with the base model", value=True, key="compare")
    mode = st.radio("Mode", ["Chat", "Blind A/B vote"], key="mode", horizontal=True,
                    help="Blind A/B: the base model and the adapter answer in a hidden random order; you pick one")
    if st.button("Clear chat"):
        st.session_state.history = []

st.title("DPO chat")
try:
    loaded = get_adapter(source, base_override)
except chat.ChatError as err:
    st.error(str(err))
    st.stop()
except Exception as err:  # anything unforeseen is still one line, never a traceback
    st.error(f"Cannot load {source!r}: {first_line(err)}")
    st.stop()

# A new adapter starts a new conversation.
if st.session_state.get("history_for") != (source, base_override):
    st.session_state.history, st.session_state.history_for = [], (source, base_override)

info = session.describe(loaded)
prompt_style = ("the model's chat template" if loaded.prompt_format == "chat"
                else "the training format `\\n\\nHuman: …\\n\\nAssistant:`")
st.caption(f"Adapter **{info['source']}** on base **{info['base']}** ({info['quantization']}); prompts use "
           f"{prompt_style}, as in training.")
if loaded.base.startswith("offline:gpt2"):  # random weights (offline:smollm2-135m is a real model)
    st.info("The base is dpo_pipeline's offline GPT-2 (real tokenizer, random weights): answers are noise. "
            "It shows the plumbing; train the `full` profile for real answers.")
with st.expander("What is loaded: training configuration and eval metrics"):
    st.write(f"Files: `{info['folder']}`")
    if info["metrics"]:
        # a metric one column lacks (the base has no implicit reward: it is the reference) shows as a dash
        st.dataframe(pd.DataFrame(info["metrics"]).astype(object).fillna("—").astype(str), width="stretch")
    if info["config"]:
        st.dataframe(pd.DataFrame({"value": {k: str(v) for k, v in info["config"].items()}}), width="stretch")
    elif loaded.card:
        st.markdown(loaded.card.split("\n---\n", 1)[-1])  # the model card's body, without its YAML header
    else:
        st.write("No run_config.json, record.json or model card in this adapter.")

if mode == "Blind A/B vote":
    vote_path = votes.votes_file()
    st.subheader("Blind A/B vote")
    st.caption(f"The base model and the adapter answer the same prompt as A and B, in a random order you see only "
               f"after voting. Each vote is appended to `{vote_path}`, a preference file the next round can train "
               "on (`--dataset_name` that file).")
    question = st.text_area("Prompt", max_chars=session.MAX_CHARS, key="vote_prompt")
    if st.button("Answer both", key="vote_answer", type="primary") and question.strip():
        budget = session.prompt_budget(loaded, settings)
        prompt, _ = session.build_prompt(loaded.tokenizer, [], question, max_tokens=budget)
        try:
            tuned, base = (session.reply(loaded, prompt, settings, use_adapter=side) for side in (True, False))
        except chat.ChatError as err:
            st.error(str(err))
        else:
            side = random.SystemRandom().choice("AB")  # hidden: the page shows only A and B
            st.session_state.pending = {"prompt": [{"role": "user", "content": question.strip()}],
                                        "answers": {side: tuned, "B" if side == "A" else "A": base},
                                        "adapter_side": side}
    pending = st.session_state.get("pending")
    if pending:
        left, right = st.columns(2)
        for column, side in ((left, "A"), (right, "B")):
            column.caption(f"**{side}**")
            column.markdown(pending["answers"][side] or EMPTY)
        buttons = st.columns(3)
        choice = next((c for c, column, label in zip(votes.CHOICES, buttons, ("A is better", "B is better", "Tie"))
                       if column.button(label, key=f"vote_{c}")), None)
        if choice:
            votes.append_vote(vote_path, votes.vote_row(
                pending["prompt"], pending["answers"], pending["adapter_side"], choice, adapter=info["source"],
                base=info["base"], settings=dataclasses.asdict(settings)))
            st.session_state.pending = None
            st.session_state.revealed = (f"Saved. A was the {'adapter' if pending['adapter_side'] == 'A' else 'base'}"
                                         f", B the {'base' if pending['adapter_side'] == 'A' else 'adapter'}.")
            st.rerun()
    if st.session_state.get("revealed"):
        st.success(st.session_state.revealed)
    count = votes.tally(votes.read_votes(vote_path), adapter=info["source"])
    if count["n"]:
        low, high = count["win_rate_ci"]
        st.markdown(f"**Adapter win rate from human votes: {count['win_rate']:.2f}** (95% CI {low:.2f}-{high:.2f}; "
                    f"{count['n']} votes: {count['wins']} wins, {count['ties']} ties, {count['losses']} losses; a tie "
                    "counts half)")
    else:
        st.markdown("No votes for this adapter yet.")
    st.stop()

with st.expander("Single prompt (no chat history)"):
    single = st.text_area("Prompt", max_chars=session.MAX_CHARS, key="single")
    if st.button("Generate", key="generate", type="primary") and single.strip():
        prompt, notes = session.build_prompt(loaded.tokenizer, [], single,
                                             max_tokens=session.prompt_budget(loaded, settings))
        for note in notes:
            st.caption(note)
        try:
            show_answers(loaded, prompt, settings, compare)
        except chat.ChatError as err:
            st.error(str(err))

for turn in st.session_state.history:
    show_turn(turn)

message = st.chat_input("Message the model", max_chars=session.MAX_CHARS)
if message:
    turns = [(t["user"], t["adapter"]) for t in st.session_state.history]  # the adapter's side is the conversation
    prompt, notes = session.build_prompt(loaded.tokenizer, turns, message,
                                         max_tokens=session.prompt_budget(loaded, settings))
    with st.chat_message("user"):
        st.markdown(message)
    with st.chat_message("assistant"):
        for note in notes:
            st.caption(note)
        try:
            tuned, base, seconds = show_answers(loaded, prompt, settings, compare)
        except chat.ChatError as err:
            st.error(str(err))
        else:
            st.session_state.history.append({"user": message[:session.MAX_CHARS], "adapter": tuned, "base": base,
                                             "seconds": seconds})
