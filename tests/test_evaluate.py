"""evaluate.py: Wilson intervals, the length baselines, preference_eval's metrics, and its log-probabilities against a
real TRL 1.16 DPOTrainer's own tokenization, truncation and reference computation. Real tiny GPT-2, no mocks."""

import math

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM
from trl import DPOConfig, DPOTrainer

from dpo_pipeline.chat_template import as_text
from dpo_pipeline.evaluate import BASE_LOGPS, pair_logps, preference_eval, token_ids
from dpo_pipeline.model import add_lora, load_base_model, load_tokenizer, lora_config
from dpo_pipeline.stats import TIE_TOLERANCE, mcnemar, wilson_interval
from dpo_pipeline.synthetic import get_synthetic

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _wilson_by_quadratic(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    # Inverting the score test: the ends are the p where (k/n - p)^2 = z^2 p (1 - p) / n, roots of a p^2 + b p + c.
    p_hat = k / n
    a, b, c = 1 + z * z / n, -(2 * p_hat + z * z / n), p_hat * p_hat
    root = math.sqrt(b * b - 4 * a * c)
    return (-b - root) / (2 * a), (-b + root) / (2 * a)


def test_wilson_interval_inverts_the_score_test_and_matches_newcombes_table():
    for k, n in [(81, 263), (15, 148), (0, 20), (1, 29), (7, 7), (3, 5)]:
        assert wilson_interval(k, n) == pytest.approx(_wilson_by_quadratic(k, n), abs=1e-12)
    # Newcombe (1998), Statistics in Medicine 17:857, Table I, method 3 (score interval, no continuity correction)
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=5e-5)
    assert wilson_interval(15, 148) == pytest.approx((0.0624, 0.1605), abs=5e-5)
    assert wilson_interval(0, 20) == pytest.approx((0.0, 0.1611), abs=5e-5)


def test_wilson_interval_properties():
    assert wilson_interval(0, 0) == (0.0, 1.0)  # no observations, no information
    for n in (1, 5, 40, 1000):
        for k in range(0, n + 1, max(1, n // 7)):
            lo, hi = wilson_interval(k, n)
            assert 0.0 <= lo <= k / n <= hi <= 1.0 and hi - lo > 0
            mirror_lo, mirror_hi = wilson_interval(n - k, n)  # failures are successes of the other outcome
            assert (lo, hi) == pytest.approx((1 - mirror_hi, 1 - mirror_lo), abs=1e-12)
            assert wilson_interval(k, n, z=2.58)[0] <= lo and wilson_interval(k, n, z=2.58)[1] >= hi  # 99% is wider
    assert wilson_interval(0, 10)[0] == 0.0 and wilson_interval(10, 10)[1] == 1.0
    widths = [hi - lo for lo, hi in (wilson_interval(3 * m, 10 * m) for m in (1, 10, 100))]
    assert widths[0] > widths[1] > widths[2]  # more data, tighter interval at the same share


@pytest.fixture(scope="module")
def tokenizer(tiny_gpt2):
    return load_tokenizer(tiny_gpt2)


@pytest.fixture(scope="module")
def mixed_pairs():
    """Synthetic held-out pairs (the calm chosen answer is always the shorter) plus pairs where it is longer, and
    pairs of equal length."""
    pair = lambda chosen, rejected: {"prompt": [{"role": "user", "content": "Say something."}],
                                     "chosen": [{"role": "assistant", "content": chosen}],
                                     "rejected": [{"role": "assistant", "content": rejected}]}
    extra = [pair("hello there, how are you today?", "HI!"), pair("a longer and gentler answer.", "NO."),
             pair("yes.", "no."), pair("fine", "bad")]
    return datasets.Dataset.from_list(get_synthetic(n_pairs=40, seed=3).test.to_list() + extra)


@pytest.fixture
def peft_model(tiny_gpt2):
    model = load_base_model(tiny_gpt2).float().to(DEVICE)
    torch.manual_seed(0)
    return add_lora(model, lora_config(model, r=4))


def _perturb_lora_b(model, seed: int = 0) -> None:
    """A fresh adapter has lora_B = 0 (it is the identity); random lora_B makes it a different model."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if "lora_B" in name:
                parameter.copy_(0.5 * torch.randn(parameter.shape, generator=generator))


def test_length_baselines_count_completion_tokens(peft_model, tokenizer, mixed_pairs):
    # Completion length counted independently: tokens of the rendered prompt + completion (which ends with eos) minus
    # the prompt's (these completions start with a space, so no token merges across the boundary).
    length = lambda prompt, answer: (len(tokenizer(prompt + answer)["input_ids"]) - len(tokenizer(prompt)["input_ids"]))
    text = as_text(mixed_pairs, tokenizer)
    sides = [(length(p, c), length(p, r)) for p, c, r in zip(text["prompt"], text["chosen"], text["rejected"])]
    n = len(sides)
    shorter, longer = sum(c < r for c, r in sides), sum(c > r for c, r in sides)
    ties = n - shorter - longer
    assert shorter and longer and ties  # every case is exercised
    got = preference_eval(peft_model, tokenizer, mixed_pairs, beta=0.1, max_length=64, batch_size=4)["adapter"]
    assert got["shorter_accuracy"] == shorter / n and got["longer_accuracy"] == longer / n
    assert got["length_ties"] == ties / n
    assert got["shorter_accuracy_ci"] == list(wilson_interval(shorter, n))
    assert got["longer_accuracy_ci"] == list(wilson_interval(longer, n))


def test_fresh_adapter_ties_every_pair_and_keeps_the_contract(peft_model, tokenizer, mixed_pairs):
    scores = preference_eval(peft_model, tokenizer, mixed_pairs, beta=0.1, max_length=64, batch_size=4)
    n = len(mixed_pairs)
    length_keys = ("shorter_accuracy", "shorter_accuracy_ci", "longer_accuracy", "longer_accuracy_ci", "length_ties")
    row = scores["adapter"]
    assert row["pairs"] == n and row["reward_ties"] == 1.0 and row["reward_wins"] == 0
    assert row["reward_accuracy"] == 0.0 and row["reward_accuracy_ci"] == list(wilson_interval(0, n))
    assert row["reward_margin"] == pytest.approx(0.0, abs=1e-6)
    assert [row[k] for k in length_keys] == [scores["base"][k] for k in length_keys]  # the same pairs
    assert scores["adapter"]["logp_accuracy"] == scores["base"]["logp_accuracy"]  # the same model twice
    # the base is the reference: it has no implicit reward to rank by (it would tie on every pair)
    assert scores["base"]["pairs"] == n and not [k for k in scores["base"] if k.startswith("reward_")]


def test_trained_looking_adapter_counts_wins_against_the_base(peft_model, tokenizer, mixed_pairs):
    with peft_model.disable_adapter():
        ref_chosen, ref_rejected = pair_logps(peft_model, token_ids(tokenizer, mixed_pairs, 64), 64)
    _perturb_lora_b(peft_model)
    chosen, rejected = pair_logps(peft_model, token_ids(tokenizer, mixed_pairs, 64), 64)
    margins = 0.1 * ((chosen - ref_chosen) - (rejected - ref_rejected))
    wins, logp_wins, n = int((margins > TIE_TOLERANCE).sum()), int((chosen > rejected).sum()), len(mixed_pairs)
    assert 0 < wins < n  # the perturbation moved the rewards both ways

    scores = preference_eval(peft_model, tokenizer, mixed_pairs, beta=0.1, max_length=64, batch_size=3)
    adapter, base = scores["adapter"], scores["base"]
    assert adapter["reward_wins"] == wins and adapter["reward_accuracy"] == wins / n and adapter["reward_ties"] == 0
    assert adapter["reward_accuracy_ci"] == list(wilson_interval(wins, n))
    assert adapter["logp_accuracy"] == logp_wins / n
    assert adapter["logp_accuracy_ci"] == list(wilson_interval(logp_wins, n))
    assert adapter["reward_margin"] == pytest.approx(float(margins.mean()), abs=1e-5)
    assert adapter["chosen_logp_shift"] == pytest.approx(float((chosen - ref_chosen).mean()), abs=1e-4)
    assert base["logp_accuracy"] == int((ref_chosen > ref_rejected).sum()) / n and "reward_ties" not in base


@pytest.mark.slow  # builds a trainer, scores files or runs pip: kept out of the one-minute set
def test_base_scores_are_computed_once_per_base_and_pairs(peft_model, tokenizer, mixed_pairs):
    BASE_LOGPS.clear()
    first = preference_eval(peft_model, tokenizer, mixed_pairs, beta=0.1, max_length=64, batch_size=4)
    _perturb_lora_b(peft_model)  # another adapter on the same base: the next run of a sweep
    second = preference_eval(peft_model, tokenizer, mixed_pairs, beta=0.1, max_length=64, batch_size=4)
    assert len(BASE_LOGPS) == 1 and second["base"] == first["base"] and second["adapter"] != first["adapter"]
    with peft_model.disable_adapter():  # what was remembered is what the base gives now
        fresh = pair_logps(peft_model, token_ids(tokenizer, mixed_pairs, 64), 64, batch_size=4)
    torch.testing.assert_close(next(iter(BASE_LOGPS.values())), fresh, rtol=0, atol=0)
    preference_eval(peft_model, tokenizer, mixed_pairs, beta=0.1, max_length=48, batch_size=4)
    assert len(BASE_LOGPS) == 2  # other lengths: other scores
    with torch.no_grad():  # another base model (one weight changed) is scored afresh
        peft_model.get_base_model().transformer.wte.weight[0, 0] += 1.0
    preference_eval(peft_model, tokenizer, mixed_pairs, beta=0.1, max_length=64, batch_size=4)
    assert len(BASE_LOGPS) == 3


@pytest.mark.slow  # builds a trainer, scores files or runs pip: kept out of the one-minute set
def test_logps_match_trl_dpo_trainer_tokenization_truncation_and_reference(tiny_gpt2, tokenizer, tmp_path):
    pairs = get_synthetic(n_pairs=12, seed=1).train
    max_length = 28  # prompts are 14-18 tokens, prompt + completion 22-34: some sequences are cut, some are not
    model = AutoModelForCausalLM.from_pretrained(tiny_gpt2, dtype=torch.float32)
    args = DPOConfig(output_dir=str(tmp_path / "dpo"), use_cpu=not torch.cuda.is_available(), report_to="none",
                     max_length=max_length, bf16=False, fp16=False)
    trainer = DPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer,
                         peft_config=lora_config(model, r=4))
    _perturb_lora_b(trainer.model)  # the reference must be the base, not the adapter
    rows = trainer.train_dataset.to_list()
    assert len(rows) == len(pairs)  # TRL dropped nothing, so the rows line up with the text pairs
    assert token_ids(tokenizer, pairs, max_length) == [(r["prompt_ids"], r["chosen_ids"], r["rejected_ids"])
                                                       for r in rows]  # the evaluation scores TRL's own tokens
    full_lengths = [len(r["prompt_ids"]) + len(r[side]) for r in rows for side in ("chosen_ids", "rejected_ids")]
    assert min(full_lengths) <= max_length < max(full_lengths)

    ids_only = [{k: r[k] for k in ("prompt_ids", "chosen_ids", "rejected_ids")} for r in rows]
    batch = {k: v.to(trainer.accelerator.device) for k, v in trainer.data_collator(ids_only).items()}
    trl_chosen, trl_rejected = trainer.compute_ref_log_probs(trainer.model, batch)

    tokenized = token_ids(tokenizer, pairs, max_length)
    with trainer.model.disable_adapter():
        pair_chosen, pair_rejected = pair_logps(trainer.model, tokenized, max_length, batch_size=3)
    adapter_chosen = pair_logps(trainer.model, tokenized, max_length, batch_size=4)[0]
    for ours, theirs in [(pair_chosen, trl_chosen), (pair_rejected, trl_rejected)]:
        torch.testing.assert_close(ours, theirs.float().cpu(), atol=1e-3, rtol=0)
    assert (adapter_chosen - trl_chosen.cpu()).abs().max() > 0.01  # the adapter is not the reference


def test_batched_answers_are_the_one_at_a_time_answers(tiny_gpt2, tokenizer):
    from dpo_pipeline.generation import sample_answers

    base = load_base_model(tiny_gpt2).float().to(DEVICE)
    model = add_lora(base, lora_config(base, r=4)).eval()
    prompts = list(get_synthetic(n_pairs=40, seed=2).test["prompt"])[:5]
    prompts.append(prompts[0] * 3)  # a longer prompt: the others are left-padded to it
    answers = lambda batch_size, **decoding: [row["answer"] for row in sample_answers(
        model, tokenizer, prompts, max_new_tokens=10, batch_size=batch_size, **decoding)]
    assert answers(4, seed=0, temperature=0) == answers(1, seed=0, temperature=0)  # greedy: batched = one at a time
    assert tokenizer.padding_side == "right"  # left padding was for generating only
    assert answers(4, seed=3) == answers(4, seed=3)  # the seed is reset per batch: the same draws again


@pytest.mark.slow  # answers and scores with three models: seconds each on a CPU
def test_a_merged_model_folder_is_evaluated_against_the_base_it_names_like_its_adapter(tmp_path):
    from pathlib import Path

    from dpo_pipeline.errors import UsageError
    from dpo_pipeline.evaluate import evaluate_adapter
    from dpo_pipeline.export import merge_adapter
    from hub_double import make_tiny_adapter

    pairs = Path(__file__).parent / "data" / "plain_good.jsonl"
    adapter = make_tiny_adapter(tmp_path / "adapter")
    merged = merge_adapter(adapter, tmp_path / "merged")  # a full model folder, as another trainer's export
    with pytest.raises(UsageError, match="--base"):
        evaluate_adapter(str(merged), str(pairs), split="all")
    from_adapter = evaluate_adapter(str(adapter), str(pairs), split="all")
    from_merged = evaluate_adapter(str(merged), str(pairs), split="all", base="offline:gpt2-tiny", behaviour=2)
    for key in ("pairs", "reward_wins", "logp_accuracy"):
        assert from_merged["policy"][key] == from_adapter["policy"][key]
    assert from_merged["policy"]["reward_margin"] == pytest.approx(from_adapter["policy"]["reward_margin"], abs=1e-4)
    assert from_merged["behaviour"]["models"]["policy"]["kl"] != 0.0  # measured against the named base


def test_policy_against_control_counts_only_the_pairs_one_model_ranks_right():
    policy, control = [1, 1, 1, 0, 1, 1, 1, 0], [1, 0, 0, 0, 0, 0, 1, 0]  # reward_won of each, pair by pair
    test = mcnemar(policy, control)
    assert (test["only_first"], test["only_second"], test["difference"]) == (4, 0, 0.5)
    assert test["p"] == pytest.approx(0.125)  # 4 of 4 discordant pairs one way: 2 * 0.5**4
    assert mcnemar(policy, policy)["p"] == 1.0  # no discordant pair, no evidence
