"""Math verifier: extraction, equivalence through math-verify, hard time limit, real data sets."""

from __future__ import annotations

import json
import os
import re
import signal
import threading

import pytest

from prime_trl.rewards import MathGrader, extract_boxed, make_math_reward, math_reward


@pytest.fixture(scope="module")
def grader() -> MathGrader:
    g = MathGrader(timeout=10.0, num_workers=2)
    yield g
    g.close()


def _jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------- extraction
@pytest.mark.parametrize(
    "text,expected",
    [
        ("so the answer is \\boxed{42}.", "42"),
        ("\\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{\\frac{1}{\\sqrt{2}}}", "\\frac{1}{\\sqrt{2}}"),
        ("$\\fbox{7}$", "7"),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),
        ("\\boxed{(-\\infty, 1\\}}", "(-\\infty, 1\\}"),  # escaped braces do not count
        ("the answer is \\boxed 5 apples", "5"),
        ("\\boxed{3} and then \\boxed{4", "3"),  # a final box cut off by truncation is skipped
        ("no answer here", None),
        ("\\boxed{}", ""),
        ("\\boxedx{3}", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


# ----------------------------------------------------------------------------- equivalence
EQUIVALENT = [
    ("72", "72"),
    ("0.5", "\\frac{1}{2}"),
    ("\\dfrac{1}{2}", "\\frac12"),
    ("\\sqrt{8}", "2\\sqrt{2}"),
    ("\\frac{\\sqrt{3}}{3}", "\\frac{1}{\\sqrt{3}}"),
    ("2,125", "2125"),  # thousands separator
    ("1,450,000", "1450000"),
    ("x = 3", "3"),
    ("3", "x=3"),
    ("(3, \\frac{\\pi}{2})", "\\left( 3, \\frac{\\pi}{2} \\right)"),
    ("[0, 1)", "[0,1)"),
    ("(2,12) \\cup (12,102)", "(2,12)\\cup(12,102)"),
    ("\\{2, 1\\}", "1, 2"),
    ("(x+1)^2", "x^2+2x+1"),
    ("\\begin{pmatrix} 1 \\\\ 2 \\end{pmatrix}", "\\begin{pmatrix}1\\\\2\\end{pmatrix}"),
    ("025", "25"),
    ("27", "27.0"),
    ("10^\\circ", "10"),
    ("\\text{(C)}", "C"),
    ("\\text{Evelyn}", "\\text{Evelyn}"),
    ("6+9i", "9i+6"),
    ("52", "52_8"),  # the base may be left out
    ("52_{8}", "52_8"),
    ("0.333333", "\\frac{1}{3}"),
    ("6.72 \\times 10^{-5}", ".0000672"),
]
NOT_EQUIVALENT = [
    ("73", "72"),
    ("\\frac{1}{3}", "0.33"),
    ("2\\sqrt{3}", "2\\sqrt{2}"),
    ("(0, 1)", "[0, 1]"),
    ("(1, 2)", "(2, 1)"),
    ("x^2+2x", "x^2+2x+1"),
    ("2126", "2,125"),
    ("\\text{(B)}", "C"),
    # hedging: several candidates in one box are not the answer
    ("1, 2, 3, 4, 5, 6", "5"),
    ("5 \\text{ or } 6", "5"),
    ("x", "5"),
    ("", "5"),
    ("\\infty", "5"),
    # math-verify alone accepts these two: it drops base subscripts and rounds floats to 6 decimals
    ("52_9", "52_8"),
    (".0000673", ".0000672"),
]


@pytest.mark.parametrize("pred,gold", EQUIVALENT)
def test_equivalent_answers(grader, pred, gold):
    assert grader.grade([pred], [gold]) == [True]


@pytest.mark.parametrize("pred,gold", NOT_EQUIVALENT)
def test_different_answers(grader, pred, gold):
    assert grader.grade([pred], [gold]) == [False]


def test_math_reward_reward_function_form():
    completions = [
        "Thus \\boxed{\\frac{1}{2}}.",
        [{"role": "assistant", "content": "The total is \\boxed{2,125} dollars."}],
        "I think it is 7.",  # no box: 0
        [{"role": "assistant", "content": [{"type": "text", "text": "\\boxed{27}"}]}],
        None,
    ]
    metrics = {}
    scores = math_reward(
        completions,
        answer=["0.5", "2125", "7", 27.0, "1"],
        prompts=["p"] * 5,
        completion_ids=[[1]] * 5,
        trainer_state=None,
        log_extra=lambda *a: None,
        log_metric=lambda name, value: metrics.__setitem__(name, value),
        task=["math"] * 5,
    )
    assert scores == [1.0, 1.0, 0.0, 1.0, 0.0]
    assert all(isinstance(s, float) for s in scores)
    assert metrics == {"math_reward/no_boxed_answer": pytest.approx(0.4)}


def test_math_reward_column_errors():
    with pytest.raises(ValueError, match="needs a dataset column named 'answer'"):
        math_reward(["\\boxed{1}"])
    with pytest.raises(ValueError, match="'answer' has 2 values but there are 1 completions"):
        math_reward(["\\boxed{1}"], answer=["1", "2"])


def test_math_reward_from_threads():
    """TRL may call reward functions from worker threads, where signal-based timeouts cannot work."""
    results = {}

    def work(k):
        results[k] = math_reward([f"\\boxed{{{k}}}", f"\\boxed{{{k + 1}}}"], answer=[str(k), f"{k}.0"])

    threads = [threading.Thread(target=work, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {k: [1.0, 0.0] for k in range(6)}


# ----------------------------------------------------------------------------- hard time limit
def test_check_slower_than_the_deadline_scores_zero_and_the_grader_recovers():
    slow = MathGrader(timeout=0.5, num_workers=1)  # shorter than math-verify's own (1 s) soft limit
    try:
        assert slow.grade(["(x+1)^{100000}", "5"], ["5", "5"]) == [False, True]
        assert slow.timeouts == 1
        assert slow.grade(["\\frac{10}{2}"], ["5"]) == [True]
    finally:
        slow.close()


def test_hung_worker_is_killed():
    """A worker stuck where no signal reaches it (simulated with SIGSTOP) cannot hang the caller."""
    g = MathGrader(timeout=2.0, num_workers=1)
    try:
        assert g.grade(["2x"], ["x+x"]) == [True]
        os.kill(g._workers[0].proc.pid, signal.SIGSTOP)
        assert g.grade(["2x"], ["x+x"]) == [False]
        assert g.timeouts == 1
        assert g.grade(["2x"], ["x+x"]) == [True]  # a fresh worker took over
    finally:
        g.close()


def test_make_math_reward_settings():
    reward = make_math_reward(timeout=3.0, num_workers=1)
    assert reward.__name__ == "math_reward"
    assert reward(["\\boxed{4}"], answer=["2+2"]) == [1.0]


# ----------------------------------------------------------------------------- real data
def _perturb(answer: str) -> str:
    """A wrong answer derived from a reference: bump its last digit, else change the text or add 1."""
    digits = [m.start() for m in re.finditer(r"\d", answer)]
    if digits:
        i = digits[-1]
        return answer[:i] + str((int(answer[i]) + 1) % 10) + answer[i + 1 :]
    if answer.startswith("\\text{"):
        return "\\text{wrong}"
    return f"({answer}) + 1"


@pytest.mark.slow
def test_math500_reference_solutions_and_perturbed_answers(shared_data_dir, grader):
    rows = _jsonl(shared_data_dir / "math500_test.jsonl")
    assert len(rows) == 500
    # The reference solution's last box graded against the `answer` field. All 500 are accepted; there are no
    # misses to list (the `answer` field was written from the solution's box, so most match as strings and the
    # rest, e.g. "\\frac14" vs "\\frac{1}{4}", by math-verify's equivalence).
    boxed = [extract_boxed(r["solution"]) for r in rows]
    correct = grader.grade(boxed, [r["answer"] for r in rows])
    misses = [(r["unique_id"], r["answer"], b) for r, b, ok in zip(rows, boxed, correct) if not ok]
    assert sum(correct) >= 0.99 * len(rows), misses
    # A wrong answer derived from each row (its last digit bumped, or the text changed) must be graded wrong.
    # Accepted anyway (2 of 500), by design: the bumped digit is a unit's exponent, and units are ignored:
    #   test/geometry/473.json    "864 \\mbox{ inches}^2" vs "864 \\mbox{ inches}^3"
    #   test/prealgebra/1114.json "15\\mbox{ cm}^2"       vs "15\\mbox{ cm}^3"
    # (Bumped bases such as 52_8 -> 52_9 and small decimals such as .0000672 -> .0000673 were accepted by
    # math-verify alone; prime_trl's grader rejects them, see test_different_answers.)
    wrong = [_perturb(r["answer"]) for r in rows]
    accepted = grader.grade(wrong, [r["answer"] for r in rows])
    false_positives = [(r["unique_id"], r["answer"], w) for r, w, ok in zip(rows, wrong, accepted) if ok]
    assert sum(accepted) <= 0.01 * len(rows), false_positives


@pytest.mark.slow
def test_gsm8k_final_answers(shared_data_dir, grader):
    from prime_trl.data import load_gsm8k

    rows = _jsonl(shared_data_dir / "gsm8k_test.jsonl")
    finals = [r["answer"].split("####")[-1].strip() for r in rows]  # as written, e.g. "2,125"
    golds = load_gsm8k("test", path=shared_data_dir)["answer"]  # what the loader gives the trainer: "2125"
    assert grader.grade(finals, golds) == [True] * len(rows)
    scores = math_reward([f"The answer is \\boxed{{{n}}}." for n in finals], answer=golds)
    assert scores == [1.0] * len(rows)
    off_by_one = [str(int(n.replace(",", "")) + 1) for n in finals]
    assert grader.grade(off_by_one, golds) == [False] * len(rows)


def test_small_competition_sets(shared_data_dir, grader):
    from prime_trl.data import load_aime24, load_amc23

    for dataset in (load_aime24(path=shared_data_dir), load_amc23(path=shared_data_dir)):
        answers = dataset["answer"]
        assert math_reward([f"\\boxed{{{a}}}" for a in answers], answer=answers) == [1.0] * len(answers)
    raw = _jsonl(shared_data_dir / "aime24.jsonl")  # zero-padded "025" in the file, "25" from the loader
    assert grader.grade([r["answer"] for r in raw], load_aime24(path=shared_data_dir)["answer"]) == [True] * 30


def test_final_answer_reward_takes_the_box_else_the_last_number():
    from prime_trl.rewards import extract_final_answer, final_answer_reward

    assert extract_final_answer("9 + 4 = 13.") == "13"
    assert extract_final_answer("The sum is 1,250 apples") == "1250"
    assert extract_final_answer("12, no: \\boxed{14} and 15") == "14"
    assert extract_final_answer("no number here") is None
    completions = ["9 + 4 = 13.", "It is 12.", "\\boxed{13} (not 12)", "thirteen"]
    metrics = {}
    scores = final_answer_reward(completions, answer=["13"] * 4, log_metric=lambda k, v: metrics.update({k: v}))
    assert scores == [1.0, 0.0, 1.0, 0.0]
    assert metrics == {"final_answer_reward/no_answer": 0.25}
