"""prime_trl.apps.evaluation: pass@k and maj@k arithmetic, grading of real benchmark rows, and the evaluation loop."""

import itertools
import json
from math import comb

import pytest
import torch
from helpers import bos_tokenizer, require_bwrap, trl_prompt_ids

from prime_trl.apps.evaluation import (
    EvalArguments,
    Generation,
    evaluate,
    format_summary,
    majority_vote,
    pass_at_k,
)

# ----- metrics ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n, c, k", [(1, 0, 1), (1, 1, 1), (4, 1, 1), (4, 1, 2), (5, 2, 3), (8, 3, 8), (10, 0, 4)])
def test_pass_at_k_equals_exhaustive_enumeration(n, c, k):
    """pass@k is the probability that a random k-subset of the n samples holds a correct one."""
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(range(n), k))
    exhaustive = sum(any(samples[i] for i in subset) for subset in subsets) / len(subsets)
    assert pass_at_k(n, c, k) == pytest.approx(exhaustive, abs=1e-12)
    assert pass_at_k(n, c, k) == pytest.approx(1 - comb(n - c, k) / comb(n, k), abs=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError):
        pass_at_k(4, 1, 5)


def test_majority_vote_groups_equal_answers_and_ignores_missing_ones():
    # "7" wins 2:1 over "5" even though most completions have no answer at all.
    assert majority_vote(["7", None, "5", " 7 ", None, None], [True, False, False, True, False, False]) == 1.0
    assert majority_vote(["7", "5", "5"], [True, False, False]) == 0.0
    assert majority_vote([None, None], [False, False]) == 0.0


def test_majority_vote_tie_counts_as_expected_random_tie_break():
    assert majority_vote(["1", "2"], [True, False]) == 0.5
    assert majority_vote(["1", "2", "3"], [True, False, False]) == pytest.approx(1 / 3)


def test_majority_vote_merges_equivalent_answers():
    answers = ["\\frac{1}{2}", "0.5", "3", "3"]
    correct = [True, True, False, False]
    assert majority_vote(answers, correct) == 0.0  # by string, the halves split their votes and "3" wins 2:1:1
    same_value = {"\\frac{1}{2}": 0.5, "0.5": 0.5, "3": 3.0}

    def equivalent(preds, golds):
        return [same_value[p] == same_value[g] for p, g in zip(preds, golds)]

    # Merged, the halves tie with "3" (2 votes each): a coin flip; with a third half they win.
    assert majority_vote(answers, correct, equivalent) == 0.5
    assert majority_vote(answers + ["0.5"], correct + [True], equivalent) == 1.0


def test_default_k_values():
    assert EvalArguments(model="m", data="d", num_samples=8).ks() == [1, 2, 4, 8]
    assert EvalArguments(model="m", data="d", num_samples=6).ks() == [1, 2, 4, 6]
    assert EvalArguments(model="m", data="d", num_samples=0).ks() == []
    with pytest.raises(ValueError, match="num_samples"):
        EvalArguments(model="m", data="d", num_samples=2, k=[4])
    with pytest.raises(ValueError, match="backend"):
        EvalArguments(model="m", data="d", backend="tgi")


# ----- the evaluation loop with a scripted generator ---------------------------------------------------------


class ScriptedGenerator:
    """Answers each prompt with a completion chosen by a function of the prompt (no model)."""

    def __init__(self, respond):
        self.respond = respond
        self.calls = []

    def encode(self, prompt):
        return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)

    def generate(self, prompts, num_samples, greedy, seeds=None):
        self.calls.append((len(prompts), num_samples, greedy))
        return [
            [Generation(self.respond(p, greedy, i), finished=True, num_tokens=5) for i in range(num_samples)]
            for p in prompts
        ]


def load_rows(path, limit):
    with open(path) as handle:
        return [json.loads(line) for line, _ in zip(handle, range(limit))]


def test_math500_gold_answers_grade_correct_and_sampled_metrics(shared_data_dir, tmp_path):
    from prime_trl.data import load_math500

    dataset = load_math500(shared_data_dir, system_prompt=False, limit=4)
    answers = {row["prompt"][-1]["content"]: row["answer"] for row in dataset}

    def respond(prompt, greedy, sample):
        gold = answers[prompt]
        if greedy:
            return f"The answer is \\boxed{{{gold}}}."
        # Samples: the gold answer once, a shared wrong answer three times -> pass@4 = 1, pass@1 = 1/4, maj@4 = 0.
        return f"\\boxed{{{gold}}}" if sample == 0 else "\\boxed{123456789}"

    args = EvalArguments(model="scripted", data="math500", num_samples=4, batch_size=8, output_dir=str(tmp_path))
    summary = evaluate(args, generator=ScriptedGenerator(respond), dataset=dataset)
    metrics = summary["metrics"]
    assert metrics["pass@1 (greedy)"] == 1.0
    assert metrics["pass@1"] == pytest.approx(0.25)
    assert metrics["pass@4"] == 1.0
    assert metrics["maj@4"] == 0.0
    assert metrics["maj@2"] == 0.5  # gold vs wrong, one vote each: a tie
    assert metrics["no boxed answer"] == 0.0

    records = [json.loads(line) for line in open(tmp_path / "predictions.jsonl")]
    assert len(records) == 4 * (1 + 4)
    greedy = [r for r in records if r["mode"] == "greedy"]
    assert all(r["correct"] and r["extracted_answer"] == r["answer"] for r in greedy)
    assert sorted({r["sample"] for r in records if r["mode"] == "sample"}) == [0, 1, 2, 3]
    assert json.loads((tmp_path / "summary.json").read_text())["metrics"] == metrics


@pytest.mark.parametrize(
    "reward, correct, no_answer_metric",
    [("task", 0.0, "no boxed answer"), ("math", 0.0, "no boxed answer"), ("final_answer", 1.0, "no answer")],
)
def test_eval_reward_option_chooses_the_grader(reward, correct, no_answer_metric, tmp_path):
    """A plain-text right answer ("3 + 4 = 7."): boxed-only graders mark it wrong, final_answer right; maj@k votes
    and extracted_answer read the answer as the chosen grader does."""
    rows = [{"prompt": f"What is {a} + 4?", "task": "math", "answer": str(a + 4)} for a in (3, 5)]

    def respond(prompt, greedy, sample):
        a = int(prompt.split()[2])
        return f"{a} + 4 = {a + 4}." if sample < 2 else "I do not know."

    args = EvalArguments(
        model="scripted", data="rows", greedy=False, num_samples=3, reward=reward, output_dir=str(tmp_path)
    )
    summary = evaluate(args, generator=ScriptedGenerator(respond), dataset=rows)
    metrics = summary["metrics"]
    assert summary["reward"] == reward and f"graded by {reward}" in format_summary(summary)
    assert metrics["pass@1"] == pytest.approx(2 / 3 * correct)
    assert metrics["maj@2"] == correct  # two votes for the right answer (none counted when unreadable)
    assert metrics[no_answer_metric] == pytest.approx(1 / 3 if correct else 1.0)
    records = [json.loads(line) for line in open(tmp_path / "predictions.jsonl")]
    right = [r for r in records if r["sample"] < 2]
    assert all(r["extracted_answer"] == (r["answer"] if correct else None) for r in right)


def test_humaneval_canonical_solutions_pass_and_wrong_code_fails(shared_data_dir, tmp_path):
    """Code rows go through the sandboxed verifier: canonical solutions pass, a stub fails."""
    from prime_trl.data import load_humaneval

    require_bwrap()
    dataset = load_humaneval(shared_data_dir, system_prompt=False, limit=3)
    raw = {r["entry_point"]: r for r in load_rows(shared_data_dir / "humaneval.jsonl", 3)}

    def respond(prompt, greedy, sample):
        entry = next(name for name in raw if f"def {name}(" in prompt)
        if greedy:
            return "```python\n" + raw[entry]["prompt"] + raw[entry]["canonical_solution"] + "\n```"
        return f"```python\ndef {entry}(*args):\n    return None\n```"

    args = EvalArguments(model="scripted", data="humaneval", num_samples=2, output_dir=str(tmp_path))
    summary = evaluate(args, generator=ScriptedGenerator(respond), dataset=dataset)
    assert summary["metrics"]["pass@1 (greedy)"] == 1.0
    assert summary["metrics"]["pass@2"] == 0.0
    assert not any(name.startswith("maj@") for name in summary["metrics"])  # no majority vote for code
    assert "no boxed answer" not in summary["metrics"]


# ----- decoding: explicit settings, seeds, tokenisation ---------------------------------------------------------


def tiny_generator(model_dir, **kwargs):
    from prime_trl.apps.evaluation import HFGenerator, load_policy

    model, tokenizer = load_policy(model_dir, dtype="float32", device="cpu")
    return HFGenerator(model, tokenizer, **{"max_new_tokens": 10, **kwargs})


PROMPTS = ["Q:12+7=?A:", "Q:3*4-5=?A:", [{"role": "user", "content": "What is 2+2?"}], "Q:9-8=?A:", "Hello"]


def test_model_generation_config_does_not_leak_into_eval(tiny_model_dir, tmp_path):
    """Greedy completions are the same whatever the model's generation_config.json asks for (a repetition penalty
    as Qwen2.5-Instruct ships, top-k, beams, sampling...): eval sets every decoding field itself."""
    import shutil

    generator = tiny_generator(tiny_model_dir)
    prompt_ids = [generator.encode(p) for p in PROMPTS]
    plain = generator.generate(prompt_ids, 1, greedy=True)
    sampled = generator.generate(prompt_ids, 2, greedy=False, seeds=[1, 2, 3, 4, 5])

    changed = tmp_path / "model"
    shutil.copytree(tiny_model_dir, changed)
    config_file = changed / "generation_config.json"
    config = json.loads(config_file.read_text())
    config.update(repetition_penalty=1.8, top_k=2, num_beams=2, do_sample=True, temperature=0.3, no_repeat_ngram_size=2)
    config_file.write_text(json.dumps(config))
    leaky = tiny_generator(str(changed))
    assert leaky.model.generation_config.repetition_penalty == 1.8  # the file is read...
    assert leaky.generate(prompt_ids, 1, greedy=True) == plain  # ...and ignored
    assert leaky.generate(prompt_ids, 2, greedy=False, seeds=[1, 2, 3, 4, 5]) == sampled
    assert leaky.model.generation_config.repetition_penalty == 1.8  # restored after generating


def test_sampled_completions_do_not_depend_on_batch_size(tiny_model_dir, tmp_path):
    """Each problem's samples depend only on --seed and the problem: the same at batch sizes 1 and 6, and the
    same when the problem is evaluated alone; another seed gives other samples."""
    from prime_trl.apps.evaluation import HFGenerator

    rows = [{"prompt": p, "task": "math", "answer": "1", "id": i} for i, p in enumerate(PROMPTS)]
    generator = tiny_generator(tiny_model_dir, temperature=1.0, top_p=0.95)

    def samples(batch_size, seed=0, subset=rows):
        args = EvalArguments(
            model="tiny",
            data="rows",
            num_samples=3,
            greedy=False,
            max_new_tokens=10,
            temperature=1.0,
            top_p=0.95,
            batch_size=batch_size,
            seed=seed,
            output_dir=str(tmp_path / f"{batch_size}-{seed}-{len(subset)}"),
        )
        generator.batch_size = batch_size
        evaluate(args, generator=generator, dataset=subset, reward_fn=lambda completions, **_: [0.0] * len(completions))
        records = [json.loads(line) for line in open(tmp_path / f"{batch_size}-{seed}-{len(subset)}/predictions.jsonl")]
        return {(r["id"], r["sample"]): r["completion"] for r in records}

    by_one = samples(1)
    assert len(set(by_one.values())) > 5  # really sampled: the samples differ
    assert samples(6) == by_one
    alone = samples(3, subset=rows[2:3])
    assert alone == {key: value for key, value in by_one.items() if key[0] == 2}
    assert samples(6, seed=1) != by_one
    assert isinstance(generator, HFGenerator)


def test_prompts_are_tokenised_as_in_training_with_one_bos(tiny_model_dir):
    from prime_trl.apps.evaluation import prompt_token_ids, vllm_requests

    tokenizer = bos_tokenizer()
    plain, chat = "Q:1+2=?A:", [{"role": "user", "content": "What is 1+2?"}]
    ids = [prompt_token_ids(tokenizer, p) for p in (plain, chat)]
    assert ids == [trl_prompt_ids(tokenizer, [plain])[0], trl_prompt_ids(tokenizer, [chat])[0]]
    assert [row.count(tokenizer.bos_token_id) for row in ids] == [1, 1] and ids[0][0] == tokenizer.bos_token_id

    # The HF generator feeds exactly these ids to the model (left-padded).
    from prime_trl.apps.evaluation import HFGenerator, load_policy

    model, _ = load_policy(tiny_model_dir, dtype="float32", device="cpu")
    seen = []
    original = model.generate

    def spy(input_ids, attention_mask, **kwargs):
        seen.extend(row[mask.bool()].tolist() for row, mask in zip(input_ids, attention_mask))
        return original(input_ids=input_ids, attention_mask=attention_mask, **kwargs)

    model.generate = spy
    generator = HFGenerator(model, tokenizer, max_new_tokens=2)
    generator.generate([generator.encode(p) for p in (plain, chat)], 1, greedy=True)
    assert seen == ids
    # vLLM gets token ids, not text it would tokenise again with a second BOS.
    args = EvalArguments(model="m", data="d", num_samples=2, max_new_tokens=7)
    inputs, params = vllm_requests(args, ids, 2, greedy=False, seeds=[11, 12])
    assert [i["prompt_token_ids"] for i in inputs] == ids
    assert [p["seed"] for p in params] == [11, 12] and params[0]["repetition_penalty"] == 1.0
    assert params[0]["top_k"] == -1 and params[0]["n"] == 2 and params[0]["max_tokens"] == 7


def test_seeded_sampling_draws_from_the_tempered_top_p_distribution():
    """Greedy decoding over the processed logits + per-row Gumbel noise is a draw from softmax(logits / T) cut
    to the top-p nucleus: the empirical frequencies of 6000 seeded draws match it."""
    from transformers import TemperatureLogitsWarper, TopPLogitsWarper

    from prime_trl.apps.evaluation import HFGenerator

    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, -3.0]])
    generator = HFGenerator.__new__(HFGenerator)
    generator.temperature, generator.top_p = 1.5, 0.95
    draws = 6000
    processors = generator._logits_processors(list(range(draws)), "cpu")
    chosen = processors(None, logits.repeat(draws, 1)).argmax(-1)
    frequencies = torch.bincount(chosen, minlength=5).float() / draws
    expected = torch.softmax(TopPLogitsWarper(0.95)(None, TemperatureLogitsWarper(1.5)(None, logits.clone())), -1)[0]
    assert expected[-1] == 0 and frequencies[-1] == 0  # outside the nucleus: never drawn
    assert torch.allclose(frequencies, expected, atol=0.02)
