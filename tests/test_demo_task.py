"""The demo task (checker, parser, noisy teacher, splits, step->token spans) and the warm-start cache."""

from __future__ import annotations

import json
import random

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from prime_trl.demo.model import DemoModelConfig, build_demo_tokenizer
from prime_trl.demo.task import (
    ALPHABET,
    TaskConfig,
    all_steps_correct,
    answer_reward,
    boxed_text,
    check_steps,
    first_wrong_step,
    make_dataset,
    make_splits,
    noisy_completion,
    parse_steps,
    partition_of,
    problem_from_expression,
    problem_from_prompt,
    prompt_text,
    reference_completion,
    sample_problem,
    step_reward_sums,
    step_token_spans,
)
from prime_trl.demo.warmstart import SFTConfig, evaluate_accuracy, get_warm_start, load_warm_start, warm_start_key

PROBLEM = problem_from_expression("7+5*3-4")
GOOD = "5*3=15;7+15=22;22-4=18;\\boxed{18}"


# ---------------------------------------------------------------------------------------------- problems / text


def test_reference_chain_respects_precedence():
    assert prompt_text(PROBLEM) == "Q:7+5*3-4=?A:"
    assert reference_completion(PROBLEM) == GOOD
    assert PROBLEM.answer == 18
    # leftmost * first, then + and - strictly left to right
    p = problem_from_expression("2*3+4*5-6")
    assert reference_completion(p) == "2*3=6;4*5=20;6+20=26;26-6=20;\\boxed{20}"
    p = problem_from_expression("9-2-3")
    assert reference_completion(p) == "9-2=7;7-3=4;\\boxed{4}"
    assert problem_from_prompt(prompt_text(p)) == p


@pytest.mark.parametrize("config", [TaskConfig(), TaskConfig.hard()])
def test_sampled_problems_stay_in_range(config):
    rng = random.Random(0)
    for _ in range(300):
        p = sample_problem(rng, config)
        assert config.num_operands[0] <= len(p.operands) <= config.num_operands[1]
        assert all(config.operand_range[0] <= x <= config.operand_range[1] for x in p.operands)
        assert all(0 <= s.result <= 99 for s in p.steps)
        assert len(p.steps) == len(p.operands) - 1
        assert set(prompt_text(p) + reference_completion(p)) <= set(ALPHABET)
        assert len(reference_completion(p)) + 1 <= config.max_completion_tokens


def test_config_validation():
    with pytest.raises(ValueError):
        TaskConfig(num_operands=(1, 3))
    with pytest.raises(ValueError):
        TaskConfig(operators="+/")


# ---------------------------------------------------------------------------------------------- answer checker


def test_answer_reward():
    completions = [
        GOOD,
        "5*3=15;7+15=22;22-4=17;\\boxed{17}",  # wrong answer
        "5*3=15;7+15=22;22-4=18;",  # no box
        "5*3=15;\\boxed{18",  # unclosed box
        "\\boxed{3}\\boxed{18}",  # the last box counts
        "5*3=15;7+15=22;22-4=18;\\boxed{18}xx;1+1=2",  # extra text after the box is ignored
        "\\boxed{ 18 }",  # whitespace inside the box
        "\\boxed{18.0}",  # not an integer
        "",
    ]
    rewards = answer_reward(
        completions,
        ["18"] * len(completions),
        prompts=["Q"] * len(completions),
        completion_ids=None,
        trainer_state=None,
        log_extra=None,
        log_metric=None,
        expression=["7+5*3-4"] * len(completions),
    )
    assert rewards == [1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0, 0.0, 0.0]
    # conversational completions and int answers work too
    assert answer_reward([[{"role": "assistant", "content": GOOD}]], [18]) == [1.0]
    with pytest.raises(ValueError):
        answer_reward([GOOD], ["18", "1"])
    assert boxed_text("a\\boxed{12}b") == "12" and boxed_text("none") is None


# ---------------------------------------------------------------------------------------------- step parser / checker


def test_parse_steps_spans_and_fields():
    steps = parse_steps(GOOD)
    assert [s.text for s in steps] == ["5*3=15", "7+15=22", "22-4=18"]
    assert all(GOOD[s.start : s.end] == s.text for s in steps)
    assert (steps[1].a, steps[1].op, steps[1].b, steps[1].result) == (7, "+", 15, 22)
    assert all(s.well_formed for s in steps)


def test_correct_chain():
    assert check_steps(PROBLEM, GOOD) == [True, True, True]
    assert check_steps(PROBLEM, GOOD, mode="local") == [True, True, True]
    assert first_wrong_step(PROBLEM, GOOD) is None
    assert all_steps_correct(PROBLEM, GOOD)


def test_wrong_step_carried_forward():
    text = "5*3=16;7+16=23;23-4=19;\\boxed{19}"
    assert check_steps(PROBLEM, text) == [False, False, False]  # reference: later steps use a wrong value
    assert check_steps(PROBLEM, text, mode="local") == [False, True, True]  # local: only the error itself
    assert first_wrong_step(PROBLEM, text) == 0
    assert not all_steps_correct(PROBLEM, text)
    # error in the middle, then a second independent error
    text = "5*3=15;7+15=21;21-4=18;\\boxed{18}"
    assert check_steps(PROBLEM, text) == [True, False, False]
    assert check_steps(PROBLEM, text, mode="local") == [True, False, False]
    assert first_wrong_step(PROBLEM, text) == 1
    assert answer_reward([text], ["18"]) == [1.0]  # right answer, wrong process: outcome reward cannot tell


def test_wrong_operands_and_wrong_order():
    # right arithmetic, but + done before * (violates precedence): wrong from step 0
    text = "7+5=12;12*3=36;36-4=32;\\boxed{32}"
    assert check_steps(PROBLEM, text) == [False, False, False]
    assert first_wrong_step(PROBLEM, text) == 0
    # operand copied wrongly (14 instead of 15) but the addition itself is right
    text = "5*3=15;7+14=21;21-4=17;\\boxed{17}"
    assert check_steps(PROBLEM, text, mode="local") == [True, False, True]
    assert first_wrong_step(PROBLEM, text) == 1


def test_malformed_missing_and_extra():
    text = "5*3=15;7+15=;22-4=18;\\boxed{18}"  # malformed middle step
    assert [s.well_formed for s in parse_steps(text)] == [True, False, True]
    # the last step is the reference step at its position (and follows from the true values): right
    assert check_steps(PROBLEM, text) == [True, False, True]
    assert check_steps(PROBLEM, text, mode="local") == [True, False, True]
    assert first_wrong_step(PROBLEM, text) == 1 and not all_steps_correct(PROBLEM, text)
    # missing box: steps still parse, the chain is not complete
    text = "5*3=15;7+15=22;22-4=18"
    assert check_steps(PROBLEM, text) == [True, True, True]
    assert not all_steps_correct(PROBLEM, text)
    # stops early: no wrong step, but not all steps correct
    text = "5*3=15;\\boxed{18}"
    assert first_wrong_step(PROBLEM, text) is None and not all_steps_correct(PROBLEM, text)
    # an extra step is wrong; text after the box is not a step
    text = "5*3=15;7+15=22;22-4=18;18+0=18;\\boxed{18}trailing;1+1=2"
    assert check_steps(PROBLEM, text) == [True, True, True, False]
    assert check_steps(PROBLEM, text, mode="local") == [True, True, True, False]
    assert first_wrong_step(PROBLEM, text) == 3
    # garbage
    assert check_steps(PROBLEM, "hello") == [False]
    assert check_steps(PROBLEM, "") == [] and first_wrong_step(PROBLEM, "") is None
    assert check_steps(PROBLEM, "5*3=15;;22-4=18") == [True, False, True]  # an empty step is malformed
    with pytest.raises(ValueError):
        check_steps(PROBLEM, GOOD, mode="other")


# ---------------------------------------------------------------------------------------------- noisy teacher


@pytest.mark.parametrize("prob", [0.0, 0.2, 0.5])
def test_noisy_teacher_error_rate_and_consistency(prob):
    rng = random.Random(1)
    config = TaskConfig.hard()
    wrong = total = 0
    for _ in range(1500):
        p = sample_problem(rng, config)
        text = noisy_completion(p, rng, prob)
        local = check_steps(p, text, mode="local")
        steps = parse_steps(text)
        assert len(local) == len(p.steps) and all(s.well_formed for s in steps)
        wrong += local.count(False)
        total += len(local)
        # consistent: every written result follows from the values written before it, except the errors,
        # which are off by at most 3 and never negative; the box holds the last written result
        for step, right in zip(steps, local):
            true = {"+": step.a + step.b, "-": step.a - step.b, "*": step.a * step.b}[step.op]
            assert (step.result == true) == right
            assert 0 <= step.result and abs(step.result - true) <= 3
        assert boxed_text(text) == str(steps[-1].result)
        assert (answer_reward([text], [p.answer]) == [1.0]) >= all(local)
    rate = wrong / total
    assert abs(rate - prob) < 0.03, rate  # ~7000 steps: the standard error is < 0.006


def test_systematic_teacher_errs_only_on_its_operators():
    """error_operators="*": every wrong step is a product, at the given rate among products; others are right."""
    rng = random.Random(2)
    wrong_by_op = {"+": 0, "-": 0, "*": 0}
    total_by_op = {"+": 0, "-": 0, "*": 0}
    for _ in range(1500):
        p = sample_problem(rng, TaskConfig.hard())
        text = noisy_completion(p, rng, 0.5, error_operators="*")
        for step, right in zip(parse_steps(text), check_steps(p, text, mode="local")):
            total_by_op[step.op] += 1
            wrong_by_op[step.op] += not right
    assert wrong_by_op["+"] == wrong_by_op["-"] == 0 and total_by_op["+"] > 500 and total_by_op["-"] > 500
    assert abs(wrong_by_op["*"] / total_by_op["*"] - 0.5) < 0.05, wrong_by_op
    with pytest.raises(ValueError, match="error_operators"):
        SFTConfig(error_operators="/")


def test_sparse_task_has_eight_step_chains():
    rng = random.Random(0)
    assert {len(sample_problem(rng, TaskConfig.sparse()).steps) for _ in range(50)} == {8}


# ---------------------------------------------------------------------------------------------- data sets


def test_splits_disjoint_and_deterministic():
    splits = make_splits(seed=0, n_train=2000, n_validation=200, n_test=200)
    prompts = {name: set(ds["prompt"]) for name, ds in splits.items()}
    assert [len(prompts[n]) for n in ("train", "validation", "test")] == [2000, 200, 200]  # no duplicates
    assert not prompts["train"] & prompts["validation"]
    assert not prompts["train"] & prompts["test"]
    assert not prompts["validation"] & prompts["test"]
    for name, ds in splits.items():
        assert all(partition_of(e) == name for e in ds["expression"])
        row = ds[0]
        assert problem_from_prompt(row["prompt"]).answer == int(row["answer"])
    # the held-out sets do not depend on the size of the train split, and are seeded
    again = make_splits(seed=0, n_train=100, n_validation=200, n_test=200)
    assert again["test"]["prompt"] == splits["test"]["prompt"]
    assert make_splits(seed=1, n_train=10, n_validation=10, n_test=200)["test"]["prompt"] != splits["test"]["prompt"]
    # another seed's test prompts are never train prompts of this seed
    other = make_splits(seed=5, n_train=10, n_validation=10, n_test=200)
    assert not set(other["test"]["prompt"]) & prompts["train"]
    ds = make_dataset(50, seed=3)
    assert ds.column_names == ["prompt", "answer", "expression", "num_steps"] and len(set(ds["prompt"])) == 50


# ---------------------------------------------------------------------------------------------- step -> tokens


def test_step_token_spans_and_sums():
    tokenizer = build_demo_tokenizer()
    spans = step_token_spans(GOOD, tokenizer)
    ids = tokenizer(GOOD, add_special_tokens=False)["input_ids"]
    assert [tokenizer.decode(ids[a:b]) for a, b in spans] == ["5*3=15;", "7+15=22;", "22-4=18;"]
    spans_no_sep = step_token_spans(GOOD, tokenizer, include_separator=False)
    assert [tokenizer.decode(ids[a:b]) for a, b in spans_no_sep] == ["5*3=15", "7+15=22", "22-4=18"]
    # a step with no separator after it (truncated completion)
    assert step_token_spans("5*3=15;7+1", tokenizer) == [(0, 7), (7, 10)]
    rewards = torch.zeros(len(ids) + 1)  # + EOS position
    rewards[8] = -1.0  # inside step 1
    rewards[2] = 0.5
    sums = step_reward_sums(rewards, spans)
    assert sums == [0.5, -1.0, 0.0]
    assert min(range(len(sums)), key=sums.__getitem__) == 1


# ---------------------------------------------------------------------------------------------- warm-start cache

TINY_MODEL = DemoModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
TINY_SFT = SFTConfig(num_steps=3, batch_size=4, warmup_steps=1)


def test_warm_start_key_changes_with_every_config():
    base = warm_start_key(TaskConfig(), TINY_MODEL, TINY_SFT, seed=0)
    assert base == warm_start_key(TaskConfig(), TINY_MODEL, TINY_SFT, seed=0)
    others = [
        warm_start_key(TaskConfig.hard(), TINY_MODEL, TINY_SFT, seed=0),
        warm_start_key(TaskConfig(operators="+-"), TINY_MODEL, TINY_SFT, seed=0),
        warm_start_key(
            TaskConfig(),
            DemoModelConfig(hidden_size=48, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64),
            TINY_SFT,
            seed=0,
        ),
        warm_start_key(TaskConfig(), TINY_MODEL, SFTConfig(num_steps=4, batch_size=4, warmup_steps=1), seed=0),
        warm_start_key(
            TaskConfig(), TINY_MODEL, SFTConfig(num_steps=3, batch_size=4, warmup_steps=1, step_error_prob=0.1), seed=0
        ),
        warm_start_key(TaskConfig(), TINY_MODEL, TINY_SFT, seed=1),
        warm_start_key(
            TaskConfig(), TINY_MODEL, SFTConfig(num_steps=3, batch_size=4, warmup_steps=1, error_operators="*"), seed=0
        ),
    ]
    assert len({base, *others}) == 1 + len(others)
    # error_operators at its default is left out of the key, so warm starts cached before the field existed stay valid
    assert "error_operators" not in TINY_SFT.to_dict()


def test_warm_start_cache_reuse_and_rebuild(tmp_path, monkeypatch):
    monkeypatch.delenv("PRIME_TRL_CACHE", raising=False)
    calls = []
    import prime_trl.demo.warmstart as ws

    real_train = ws.train_warm_start
    monkeypatch.setattr(ws, "train_warm_start", lambda *a, **k: calls.append(a) or real_train(*a, **k))

    path = get_warm_start(TaskConfig(), TINY_MODEL, TINY_SFT, seed=0, cache_dir=tmp_path, progress=False)
    assert path == tmp_path / "warmstart" / warm_start_key(TaskConfig(), TINY_MODEL, TINY_SFT, 0)
    assert len(calls) == 1
    meta = json.loads((path / "warmstart.json").read_text())
    assert meta["task"] == TaskConfig().to_dict() and meta["sft"]["num_steps"] == 3
    assert [p.name for p in (tmp_path / "warmstart").iterdir()] == [path.name]  # no temp dirs left behind

    # same config: reused, no training
    assert get_warm_start(TaskConfig(), TINY_MODEL, TINY_SFT, seed=0, cache_dir=tmp_path, progress=False) == path
    assert len(calls) == 1
    # the env var points at the same root
    monkeypatch.setenv("PRIME_TRL_CACHE", str(tmp_path))
    assert get_warm_start(TaskConfig(), TINY_MODEL, TINY_SFT, seed=0, progress=False) == path
    assert len(calls) == 1

    # changed task or model config: a new entry is built
    hard = get_warm_start(TaskConfig.hard(), TINY_MODEL, TINY_SFT, seed=0, cache_dir=tmp_path, progress=False)
    bigger = DemoModelConfig(hidden_size=48, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    other = get_warm_start(TaskConfig(), bigger, TINY_SFT, seed=0, cache_dir=tmp_path, progress=False)
    assert len({path, hard, other}) == 3 and len(calls) == 3

    # an incomplete entry (no meta file, e.g. left by hand) is rebuilt; rebuild=True retrains
    (path / "warmstart.json").unlink()
    assert get_warm_start(TaskConfig(), TINY_MODEL, TINY_SFT, seed=0, cache_dir=tmp_path, progress=False) == path
    assert len(calls) == 4 and (path / "warmstart.json").is_file()
    get_warm_start(TaskConfig(), TINY_MODEL, TINY_SFT, seed=0, cache_dir=tmp_path, rebuild=True, progress=False)
    assert len(calls) == 5
    assert sorted(p.name for p in (tmp_path / "warmstart").iterdir()) == sorted([path.name, hard.name, other.name])


def test_warm_start_loads_and_is_reproducible(tmp_path):
    path = get_warm_start(TaskConfig(), TINY_MODEL, TINY_SFT, seed=0, cache_dir=tmp_path / "a", progress=False)
    again = get_warm_start(TaskConfig(), TINY_MODEL, TINY_SFT, seed=0, cache_dir=tmp_path / "b", progress=False)
    model = AutoModelForCausalLM.from_pretrained(path)
    model2 = AutoModelForCausalLM.from_pretrained(again)
    for (name, a), (_, b) in zip(model.state_dict().items(), model2.state_dict().items()):
        assert torch.equal(a, b), name  # seeded: the same config trains the same weights

    tokenizer = AutoTokenizer.from_pretrained(path)
    original = build_demo_tokenizer()
    text = prompt_text(PROBLEM) + GOOD
    assert tokenizer(text)["input_ids"] == original(text)["input_ids"]
    assert (tokenizer.eos_token_id, tokenizer.pad_token_id, tokenizer.padding_side) == (
        original.eos_token_id,
        original.pad_token_id,
        "left",
    )

    model, tokenizer = load_warm_start(path)
    prompts = make_splits(0, n_train=1, n_validation=1, n_test=6)["test"]
    result = evaluate_accuracy(
        model, tokenizer, prompts, num_samples=2, max_new_tokens=8, batch_size=4, return_completions=True
    )
    assert result["num_prompts"] == 6 and len(result["per_prompt_sampled_accuracy"]) == 6
    assert len(result["sampled_completions"]) == 6 and all(len(c) == 2 for c in result["sampled_completions"])
    for key in ("sampled_accuracy", "sampled_all_steps_correct", "greedy_accuracy", "greedy_all_steps_correct"):
        assert 0.0 <= result[key] <= 1.0
    # seeded sampling: the same seed gives the same completions
    assert (
        evaluate_accuracy(
            model,
            tokenizer,
            prompts,
            num_samples=2,
            max_new_tokens=8,
            batch_size=4,
            greedy=False,
            return_completions=True,
        )["sampled_completions"]
        == result["sampled_completions"]
    )
