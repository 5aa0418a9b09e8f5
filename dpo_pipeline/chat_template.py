"""One prompt path for every model: the tokenizer's chat template. GPT-2 has none, so it gets HUMAN_ASSISTANT, the
hh-rlhf transcript format as a template; TRL's DPOTrainer, the evaluation, the judge, the app and the model card then
all render prompts with `tokenizer.apply_chat_template`, and the template is saved with every adapter.
"""

from __future__ import annotations

import os

HUMAN, ASSISTANT = "\n\nHuman:", "\n\nAssistant:"
# No library ships the hh-rlhf format as a template. A system message is text before the first Human turn (a later
# one is a Human turn); an empty message is its marker alone; the last assistant message ends with eos (what TRL
# appends to a text completion).
HUMAN_ASSISTANT = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' and loop.first %}{{ message['content'] }}"
    "{% else %}{{ '\\n\\nAssistant:' if message['role'] == 'assistant' else '\\n\\nHuman:' }}"
    "{% if message['content'] %}{{ ' ' + message['content'] }}{% endif %}"
    "{% if message['role'] == 'assistant' and loop.last %}{{ eos_token }}{% endif %}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '\\n\\nAssistant:' }}{% endif %}"
)


def with_prompt_format(tokenizer, prompt_format: str = "auto"):
    """The tokenizer with the template a run uses: "auto" keeps the model's own chat template and gives a model
    without one (GPT-2) HUMAN_ASSISTANT; "text" is HUMAN_ASSISTANT for any model; "chat" needs the model's own."""
    own = getattr(tokenizer, "chat_template", None)
    if prompt_format == "chat" and (not own or own == HUMAN_ASSISTANT):
        raise ValueError("prompt_format 'chat' needs a model with its own chat template; this tokenizer has none "
                         "(use 'auto' or 'text')")
    if prompt_format == "text" or not own:
        tokenizer.chat_template = HUMAN_ASSISTANT
    return tokenizer


def format_name(tokenizer) -> str:
    """"text" (the Human/Assistant template) or "chat" (the model's own)."""
    return "text" if getattr(tokenizer, "chat_template", None) in (None, HUMAN_ASSISTANT) else "chat"


def prompt_text(tokenizer, prompt) -> str:
    """A prompt (messages) as the model reads it: rendered up to where the assistant's answer begins."""
    return tokenizer.apply_chat_template(list(prompt), tokenize=False, add_generation_prompt=True)


def as_text(pairs, tokenizer) -> dict[str, list[str]]:
    """Conversational pairs' prompt / chosen / rejected as the text the model reads (for reward models and reports):
    an answer is what the template writes after its prompt, end-of-turn token included (for a template that renders a
    prompt differently once an answer follows it: from where the two part)."""
    prompts = list(pairs["prompt"])
    heads = [prompt_text(tokenizer, p) for p in prompts]  # each prompt rendered once, for both of its answers

    def answers(side: str) -> list[str]:
        wholes = (tokenizer.apply_chat_template([*p, *c], tokenize=False) for p, c in zip(prompts, pairs[side]))
        return [whole[len(os.path.commonprefix([head, whole])):] for head, whole in zip(heads, wholes)]

    return {"prompt": heads, "chosen": answers("chosen"), "rejected": answers("rejected")}
