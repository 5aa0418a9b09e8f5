"""The chat app, run headless with Streamlit's AppTest: a chat turn, the side-by-side view, single prompts, limits,
and one clear message for each kind of bad adapter source. The adapter is a tiny one on the offline 4-bit GPT-2."""

import json
import os
import shutil
from pathlib import Path

import pytest
from streamlit.testing.v1 import AppTest

import chat_session  # app/chat_session.py (conftest puts app/ on the path)
from dpo_pipeline import chat
from dpo_pipeline.chat_template import with_prompt_format
from dpo_pipeline.hf import hub_reachable
from offline_models.gpt2 import gpt2_tokenizer
from hub_double import make_tiny_adapter

APP = str(Path(__file__).resolve().parents[1] / "app" / "dpo_app.py")
DEFAULTS = chat_session.GenerationSettings()  # the app's slider defaults


@pytest.fixture(scope="module")
def adapter(tmp_path_factory) -> Path:
    return make_tiny_adapter(tmp_path_factory.mktemp("app") / "adapter", load_in_4bit=True)


@pytest.fixture(scope="module")
def loaded(adapter) -> chat.LoadedAdapter:
    """The same adapter loaded outside the app, to compute the answers the page must show."""
    return chat.load_adapter(str(adapter))


def start(monkeypatch, source) -> AppTest:
    monkeypatch.setenv("DPO_APP_ADAPTER", str(source))
    return AppTest.from_file(APP, default_timeout=120).run()


def expected(loaded, turns, message, use_adapter=True, **settings) -> str:
    gen = chat_session.GenerationSettings(**{**vars(DEFAULTS), **settings})
    prompt, _ = chat_session.build_prompt(loaded.tokenizer, turns, message, max_tokens=chat_session.prompt_budget(loaded, gen))
    return chat_session.reply(loaded, prompt, gen, use_adapter)


def assert_healthy(at: AppTest):
    assert not at.exception and not at.error, [e.value for e in [*at.exception, *at.error]]


@pytest.mark.slow  # loads a model into the app and generates
def test_chat_turns_stream_answers_in_the_training_format(monkeypatch, adapter, loaded):
    at = start(monkeypatch, adapter)
    assert_healthy(at)
    assert "offline:gpt2-tiny" in at.caption[0].value and "4-bit NF4" in at.caption[0].value
    assert at.sidebar.text_input(key="source").value == str(adapter)
    at.toggle(key="compare").set_value(False).run()

    at.chat_input[0].set_value("Tell me about owls.").run()
    assert_healthy(at)
    first = at.session_state.history[0]
    assert first["user"] == "Tell me about owls." and first["base"] is None
    assert first["adapter"] and first["adapter"] == expected(loaded, [], "Tell me about owls.")
    assert [m.name for m in at.chat_message] == ["user", "assistant"]

    # The second turn's prompt carries the first turn, as "\n\nHuman: ...\n\nAssistant: ..." history.
    at.chat_input[0].set_value("And bees?").run()
    second = at.session_state.history[1]["adapter"]
    assert second == expected(loaded, [("Tell me about owls.", first["adapter"])], "And bees?")
    assert second != expected(loaded, [], "And bees?")
    assert [m.name for m in at.chat_message] == ["user", "assistant"] * 2


@pytest.mark.slow  # loads a model into the app and generates
def test_side_by_side_base_and_adapter_answer_the_same_prompt(monkeypatch, adapter, loaded):
    at = start(monkeypatch, adapter)
    at.chat_input[0].set_value("Give me one fact about the moon.").run()
    assert_healthy(at)
    turn = at.session_state.history[0]
    assert turn["base"] == expected(loaded, [], "Give me one fact about the moon.", use_adapter=False)
    assert turn["adapter"] == expected(loaded, [], "Give me one fact about the moon.")
    assert turn["base"] != turn["adapter"]  # same weights, adapter off vs on
    captions = [c.value for c in at.chat_message[1].caption]
    assert captions[:2] == ["**Base model** (adapter off)", "**DPO adapter**"]
    assert captions[2].startswith("Answered in ")


@pytest.mark.slow  # loads a model into the app and generates
def test_generate_button_answers_a_single_prompt_with_the_controls(monkeypatch, adapter, loaded):
    at = start(monkeypatch, adapter)
    at.sidebar.slider[1].set_value(0.0)  # temperature 0: greedy
    at.sidebar.slider[0].set_value(16)  # max new tokens
    at.text_area(key="single").set_value("Why do people like tea?")
    at.button(key="generate").click().run()
    assert_healthy(at)
    shown = [m.value for m in at.expander[1].markdown]
    greedy = dict(temperature=0.0, max_new_tokens=16)
    assert expected(loaded, [], "Why do people like tea?", use_adapter=False, **greedy) in shown
    assert expected(loaded, [], "Why do people like tea?", **greedy) in shown
    assert at.session_state.history == []  # a single prompt is not part of the chat


@pytest.mark.slow  # loads a model into the app and generates
def test_long_input_is_limited_and_old_turns_go_first(monkeypatch, adapter):
    at = start(monkeypatch, adapter)
    at.toggle(key="compare").set_value(False)
    at.chat_input[0].set_value("word " * 1000).run()  # the chat box keeps MAX_CHARS characters
    assert_healthy(at)
    assert len(at.session_state.history[0]["user"]) == chat_session.MAX_CHARS
    # ~400 tokens each: with the first turn the second prompt exceeds the 448-token budget (512 context - 64 new)
    at.chat_input[0].set_value("more " * 400).run()
    assert_healthy(at)
    notes = [c.value for c in at.chat_message[-1].caption]
    assert notes[0] == "1 earlier turn(s) were left out to fit 448 tokens."


@pytest.mark.parametrize("case", ["empty folder", "bad repo id", "hub unreachable", "other base shape",
                                  "mixed run files", "nothing"])
def test_bad_source_is_one_clear_message(monkeypatch, tmp_path, adapter, case):
    if case == "empty folder":
        source, says = tmp_path, "is not an adapter folder: it needs adapter_config.json"
    elif case == "bad repo id":
        source, says = "not a repo!!", "not a Hub repo id of the form user/name"
    elif case == "hub unreachable":
        monkeypatch.setenv("HF_HUB_OFFLINE", "1")
        hub_reachable.cache_clear()
        source, says = "dpo-tester/never-pushed", "the Hugging Face Hub cannot be reached"
    elif case == "other base shape":  # an adapter made on a GPT-2 with other sizes, claiming offline:gpt2-tiny
        source = make_tiny_adapter(tmp_path / "other", other_shape=dict(n_layer=2, n_head=2, n_embd=32))
        says = "does not fit base model 'offline:gpt2-tiny' (its tensor shapes differ)"
    elif case == "mixed run files":
        source = tmp_path / "mixed"
        shutil.copytree(adapter, source)
        config = json.loads((source / "run_config.json").read_text())
        (source / "run_config.json").write_text(json.dumps({**config, "model_name_or_path": "openai-community/gpt2"}))
        says = "this adapter belongs to another base model"
    else:
        source, says = "", "No adapter given"
    at = start(monkeypatch, adapter)  # a good adapter first; then the source is changed in the sidebar
    at.sidebar.text_input(key="source").set_value(str(source)).run()
    hub_reachable.cache_clear()
    assert not at.exception
    assert len(at.error) == 1 and says in at.error[0].value and "\n" not in at.error[0].value
    assert not at.chat_input  # the page stops at the message


def test_default_source_is_env_then_best_then_the_newest_run(monkeypatch, tmp_path, adapter):
    monkeypatch.delenv("DPO_APP_ADAPTER", raising=False)
    assert chat_session.default_source(tmp_path) == ""
    old, new = tmp_path / "runs" / "old", tmp_path / "runs" / "new"
    shutil.copytree(adapter, old)
    shutil.copytree(adapter, new)
    shutil.copytree(adapter, new / "ref")  # a second adapter peft saved inside the run (TRL's reference): no run
    os.utime(old / "adapter_config.json", (1e9, 1e9))
    assert chat_session.default_source(tmp_path) == str(new)
    shutil.copytree(adapter, tmp_path / "best")
    assert chat_session.default_source(tmp_path) == str(tmp_path / "best")
    monkeypatch.setenv("DPO_APP_ADAPTER", "user/repo")
    assert chat_session.default_source(tmp_path) == "user/repo"


def test_prompt_building_keeps_the_newest_turns():
    tok = with_prompt_format(gpt2_tokenizer())  # GPT-2's Human/Assistant chat template
    turns = [(f"question {i} " + "word " * 40, f"answer {i}") for i in range(6)]
    prompt, notes = chat_session.build_prompt(tok, turns, "last one?", max_tokens=120)
    assert prompt.startswith("\n\nHuman: question ") and prompt.endswith("\n\nHuman: last one?\n\nAssistant:")
    assert "answer 5" in prompt and "answer 0" not in prompt and len(tok(prompt)["input_ids"]) <= 120
    assert notes and "earlier turn(s) were left out" in notes[-1]
    alone, notes = chat_session.build_prompt(tok, [], "word " * 500, max_tokens=50)
    assert len(tok(alone)["input_ids"]) <= 51 and alone.endswith("\n\nAssistant:")


TAGS = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}</{{ m['role'] }}>{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}")


def test_a_chat_template_model_is_prompted_with_its_template():
    tok = gpt2_tokenizer()
    tok.chat_template = TAGS
    prompt, _ = chat_session.build_prompt(tok, [("Hi", "Hello")], "A color?")
    assert prompt == "<user>Hi</user><assistant>Hello</assistant><user>A color?</user><assistant>"


def test_an_adapter_from_another_trainer_is_prompted_with_the_template_in_its_folder(tmp_path):
    # a plain TRL run's folder: the adapter and its tokenizer with chat_template.jinja, no run_config.json
    folder = make_tiny_adapter(tmp_path / "elsewhere")
    for name in ("run_config.json", "record.json"):
        (folder / name).unlink()
    tok = gpt2_tokenizer()
    tok.chat_template = TAGS
    tok.save_pretrained(folder)
    assert (folder / "chat_template.jinja").exists()
    loaded = chat.load_adapter(str(folder))
    prompt, _ = chat_session.build_prompt(loaded.tokenizer, [], "A color?")
    assert prompt == "<user>A color?</user><assistant>" and loaded.prompt_format == "chat"
    from dpo_pipeline.card import build_model_card

    card = build_model_card(folder, "me/elsewhere").content
    assert "the model's own chat template" in card and "Human: <message>" not in card
    assert "apply_chat_template(messages" in card


def test_streams_stop_at_the_next_human_turn():
    assert list(chat_session.until_human_turn(iter(["Sure", ", owls.\n", "\nHu", "man: and you?"]))) == ["Sure", ", owls."]
    assert "".join(chat_session.until_human_turn(iter(["a\n", "\nHo", "w"]))) == "a\n\nHow"
    assert "".join(chat_session.until_human_turn(iter(["fine\n\nAssistant: again"]))) == "fine"
