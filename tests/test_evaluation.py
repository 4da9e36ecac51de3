"""prime_trl.apps.evaluation: pass@k and maj@k arithmetic, grading of real benchmark rows, and the evaluation loop."""

import itertools
import json
from math import comb

import pytest

from prime_trl.apps.evaluation import EvalArguments, Generation, evaluate, majority_vote, pass_at_k

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

    def render(self, prompt):
        return prompt if isinstance(prompt, str) else "\n".join(m["content"] for m in prompt)

    def generate(self, prompts, num_samples, greedy):
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


def test_humaneval_canonical_solutions_pass_and_wrong_code_fails(shared_data_dir, tmp_path):
    """Code rows go through the sandboxed verifier: canonical solutions pass, a stub fails."""
    from prime_trl.data import load_humaneval
    from prime_trl.rewards import bwrap_status

    if not bwrap_status()[0]:
        pytest.skip("bubblewrap sandbox unavailable")
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
