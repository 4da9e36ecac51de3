"""The embedded demo task: multi-operand integer arithmetic with a written chain of steps.

A problem is an expression over small positive integers, e.g. ``7+5*3-4``. The prompt and the reference
completion are plain text (TRL "standard" format)::

    prompt      Q:7+5*3-4=?A:
    completion  5*3=15;7+15=22;22-4=18;\\boxed{18}        (the model then emits EOS)

**Step order.** Every step reduces one adjacent pair of the current expression: the leftmost ``*`` while there
is one (operator precedence), then the leftmost remaining ``+``/``-`` (left to right). The reduction order is
unique, so every problem has exactly one reference chain; ``num_steps = num_operands - 1``. Multiplying first
makes credit assignment more interesting than pure left to right: a wrong product early in the chain is
carried into additions that are themselves done right.

**Ranges.** Operands are drawn from ``operand_range`` and every intermediate result of the reference chain
must lie in ``value_range`` (default 0..99, so no negative numbers are ever written); problems that leave the
range are redrawn.

**Step labels.** Two labellings of the written steps (both mark malformed text and steps beyond the needed
number as wrong):

- ``"reference"`` (default, the ground truth for process metrics): step ``k`` is right iff it is exactly the
  reference step ``k`` - same operator, operands equal to the true values at that point of the reference
  computation, result equal to the true result. Once a step is wrong, every later step that uses the wrong
  value is wrong too.
- ``"local"``: step ``k`` is right iff it reduces the pair that is due next (by the order above) in the
  expression *as rewritten by the steps written before it*, copies those operands correctly and computes the
  result correctly. A wrong value carried forward consistently is therefore not blamed again; this is the
  label under which the noisy teacher's errors are independent with probability ``step_error_prob``.

The *first* wrong step is the same under both labellings (before it, the written state equals the reference
state), which is what step localisation needs: ``first_wrong_step``.

**Held-out splits.** Every expression belongs to one partition - test, validation or train - by a stable hash
of its text (5% / 5% / 90%), so held-out prompts never appear in any training set, whatever seed drew them.
"""

from __future__ import annotations

import hashlib
import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import datasets

logger = logging.getLogger(__name__)

__all__ = [
    "ALPHABET",
    "Calc",
    "ArithmeticProblem",
    "Step",
    "TaskConfig",
    "all_steps_correct",
    "answer_reward",
    "apply_op",
    "check_steps",
    "boxed_int",
    "boxed_text",
    "first_wrong_step",
    "make_dataset",
    "prompt_text",
    "make_splits",
    "noisy_completion",
    "parse_steps",
    "partition_of",
    "problem_from_expression",
    "problem_from_prompt",
    "reduction_index",
    "reference_completion",
    "sample_problem",
    "sample_problem_in",
    "solve",
    "step_reward_sums",
    "step_token_spans",
]

# Every character the task ever writes (prompt, steps, box). The demo tokenizer covers exactly these.
ALPHABET = "0123456789+-*=?;:QA\\boxed{}"

PROMPT_PREFIX = "Q:"
PROMPT_SUFFIX = "=?A:"
STEP_SEPARATOR = ";"
BOX_OPEN = "\\boxed{"

_STEP_RE = re.compile(r"(\d{1,6})([+\-*])(\d{1,6})=(\d{1,6})")
_EXPR_RE = re.compile(r"\d+(?:[+\-*]\d+)+")
_INT_RE = re.compile(r"\d+")


# --------------------------------------------------------------------------------------------------------------
# Configuration and problems
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TaskConfig:
    """What problems look like. Hashable and JSON-friendly (it keys the warm-start cache).

    Attributes:
        num_operands: inclusive range of the number of operands (``>= 2``); steps = operands - 1.
        operand_range: inclusive range of each operand.
        operators: operators to draw from (a subset of ``"+-*"``), uniformly per position.
        value_range: inclusive range every reference intermediate result (and the answer) must lie in.
    """

    num_operands: tuple[int, int] = (3, 4)
    operand_range: tuple[int, int] = (1, 9)
    operators: str = "+-*"
    value_range: tuple[int, int] = (0, 99)

    def __post_init__(self) -> None:
        if self.num_operands[0] < 2 or self.num_operands[0] > self.num_operands[1]:
            raise ValueError(f"num_operands must be an increasing range starting at >= 2, got {self.num_operands}")
        if not self.operators or set(self.operators) - set("+-*"):
            raise ValueError(f"operators must be a non-empty subset of '+-*', got {self.operators!r}")
        if self.operand_range[0] < 0 or self.operand_range[0] > self.operand_range[1]:
            raise ValueError(f"operand_range must be a non-negative increasing range, got {self.operand_range}")

    @classmethod
    def hard(cls) -> TaskConfig:
        """The harder variant: longer chains (5-6 operands, 4-5 steps), otherwise the same."""
        return cls(num_operands=(5, 6))

    @classmethod
    def sparse(cls) -> TaskConfig:
        """The sparse-success variant: 9 operands (8-step chains), otherwise the same. With its warm start
        (``warmstart.SPARSE_SFT``) most sampled groups are all wrong."""
        return cls(num_operands=(9, 9))

    @property
    def max_completion_tokens(self) -> int:
        """A safe ``max_new_tokens`` for this task (character-level tokens, EOS included).

        Each step is at most ``ddd*ddd=dddd;`` (12 chars, allowing the noisy teacher's carried values to
        overshoot the range), plus ``\\boxed{dddd}`` and EOS.
        """
        return 12 * (self.num_operands[1] - 1) + len(BOX_OPEN) + 5 + 1

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (tuples as lists)."""
        return {
            "num_operands": list(self.num_operands),
            "operand_range": list(self.operand_range),
            "operators": self.operators,
            "value_range": list(self.value_range),
        }


class Calc(NamedTuple):
    """One arithmetic step ``a op b = result`` (of the reference chain)."""

    a: int
    op: str
    b: int
    result: int


@dataclass(frozen=True)
class ArithmeticProblem:
    """A problem and its reference solution.

    Attributes:
        expression: e.g. ``"7+5*3-4"``.
        operands: ``(7, 5, 3, 4)``; operators: ``("+", "*", "-")``.
        steps: the reference chain, ``len(operands) - 1`` ``Calc`` in the order they are written.
        answer: the value of the expression.
    """

    expression: str
    operands: tuple[int, ...]
    operators: tuple[str, ...]
    steps: tuple[Calc, ...]
    answer: int


def apply_op(a: int, op: str, b: int) -> int:
    """``a op b`` for ``op`` in ``+-*``."""
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    raise ValueError(f"unknown operator {op!r}")


def reduction_index(operators: Sequence[str]) -> int:
    """Index of the operator reduced next: the leftmost ``*`` if any, else the leftmost operator."""
    for i, op in enumerate(operators):
        if op == "*":
            return i
    return 0


def solve(operands: Sequence[int], operators: Sequence[str]) -> tuple[Calc, ...]:
    """The reference chain of steps for ``operands`` / ``operators`` (see the module docstring for the order)."""
    if len(operators) != len(operands) - 1:
        raise ValueError("need exactly one operator between consecutive operands")
    values, ops = list(operands), list(operators)
    steps = []
    while ops:
        i = reduction_index(ops)
        calc = Calc(values[i], ops[i], values[i + 1], apply_op(values[i], ops[i], values[i + 1]))
        steps.append(calc)
        values[i : i + 2] = [calc.result]
        del ops[i]
    return tuple(steps)


def problem_from_expression(expression: str) -> ArithmeticProblem:
    """Build an ``ArithmeticProblem`` from an expression string such as ``"7+5*3-4"`` (no range check)."""
    if not _EXPR_RE.fullmatch(expression):
        raise ValueError(f"not an expression of the task: {expression!r}")
    operands = tuple(int(x) for x in _INT_RE.findall(expression))
    operators = tuple(ch for ch in expression if ch in "+-*")
    steps = solve(operands, operators)
    return ArithmeticProblem(expression, operands, operators, steps, steps[-1].result)


def problem_from_prompt(prompt: str) -> ArithmeticProblem:
    """Inverse of ``prompt_text``: ``"Q:7+5*3-4=?A:"`` -> the ``ArithmeticProblem``."""
    if not (prompt.startswith(PROMPT_PREFIX) and prompt.endswith(PROMPT_SUFFIX)):
        raise ValueError(f"not a prompt of the task: {prompt!r}")
    return problem_from_expression(prompt[len(PROMPT_PREFIX) : -len(PROMPT_SUFFIX)])


def _in_range(problem: ArithmeticProblem, config: TaskConfig) -> bool:
    lo, hi = config.value_range
    return all(lo <= step.result <= hi for step in problem.steps)


def sample_problem(rng: random.Random, config: TaskConfig = TaskConfig()) -> ArithmeticProblem:
    """Draw a problem uniformly over operand count, operands and operators, redrawing until it stays in range."""
    for _ in range(100_000):
        n = rng.randint(*config.num_operands)
        operands = [rng.randint(*config.operand_range) for _ in range(n)]
        operators = [rng.choice(config.operators) for _ in range(n - 1)]
        expression = "".join(f"{x}{op}" for x, op in zip(operands, operators)) + str(operands[-1])
        problem = problem_from_expression(expression)
        if _in_range(problem, config):
            return problem
    raise RuntimeError(f"could not draw an in-range problem for {config}")


# Partition of the problem space by a stable hash of the expression (not Python's salted hash()).
PARTITIONS = ("test", "validation", "train")
_PARTITION_BUCKETS = 20  # bucket 0 -> test, 1 -> validation, 2..19 -> train


def partition_of(expression: str) -> str:
    """``"test"``, ``"validation"`` or ``"train"``: the partition this expression belongs to, fixed forever."""
    bucket = int.from_bytes(hashlib.sha256(expression.encode()).digest()[:8], "big") % _PARTITION_BUCKETS
    return PARTITIONS[min(bucket, 2)]


def sample_problem_in(partition: str, rng: random.Random, config: TaskConfig = TaskConfig()) -> ArithmeticProblem:
    """Draw a problem from one partition (rejection sampling on ``partition_of``)."""
    if partition not in PARTITIONS:
        raise ValueError(f"partition must be one of {PARTITIONS}, got {partition!r}")
    while True:
        problem = sample_problem(rng, config)
        if partition_of(problem.expression) == partition:
            return problem


# --------------------------------------------------------------------------------------------------------------
# Text: prompts, reference and noisy-teacher completions
# --------------------------------------------------------------------------------------------------------------


def prompt_text(problem: ArithmeticProblem) -> str:
    """``"Q:<expression>=?A:"``; the completion follows directly."""
    return f"{PROMPT_PREFIX}{problem.expression}{PROMPT_SUFFIX}"


def _format_chain(calcs: Sequence[Calc], answer: int) -> str:
    return "".join(f"{c.a}{c.op}{c.b}={c.result}{STEP_SEPARATOR}" for c in calcs) + f"{BOX_OPEN}{answer}}}"


def reference_completion(problem: ArithmeticProblem) -> str:
    """The correct chain, e.g. ``"5*3=15;7+15=22;22-4=18;\\boxed{18}"`` (no EOS: the tokenizer's EOS follows)."""
    return _format_chain(problem.steps, problem.answer)


def _run_chain(values: list[int], ops: list[str]) -> list[int]:
    """Results of reducing ``values``/``ops`` correctly to the end (used to keep noisy chains non-negative)."""
    return [calc.result for calc in solve(values, ops)]


def noisy_completion(
    problem: ArithmeticProblem,
    rng: random.Random,
    step_error_prob: float,
    max_error: int = 3,
    error_operators: str = "+-*",
) -> str:
    """A noisy-teacher completion: each step whose operator is in ``error_operators`` (default: every step) has a
    wrong result with probability ``step_error_prob``; the other steps are always right. A teacher that errs on
    one operator only (``error_operators="*"``) makes *systematic* errors: the same kind of step is wrong across
    problems.

    A wrong result is the true result (given the values written so far) plus a non-zero offset in
    ``[-max_error, max_error]``. The wrong value is carried consistently: later steps use it as an operand and
    compute correctly from it (unless they draw their own error), and the box holds the last written result.
    Offsets that would make this or any later value negative are skipped; if none fits (rare), the step is
    written correctly, so the realised error rate is a hair below ``step_error_prob``.

    Under ``check_steps(..., mode="local")`` the errors are independent per step with that probability (per step of
    an operator in ``error_operators``).
    """
    values, ops = list(problem.operands), list(problem.operators)
    calcs: list[Calc] = []
    while ops:
        i = reduction_index(ops)
        a, op, b = values[i], ops[i], values[i + 1]
        result = apply_op(a, op, b)
        if op in error_operators and rng.random() < step_error_prob:
            offsets = [d for d in range(-max_error, max_error + 1) if d != 0]
            rng.shuffle(offsets)
            for d in offsets:
                wrong = result + d
                rest_values = values[:i] + [wrong] + values[i + 2 :]
                if wrong >= 0 and all(v >= 0 for v in _run_chain(rest_values, ops[:i] + ops[i + 1 :])):
                    result = wrong
                    break
        calcs.append(Calc(a, op, b, result))
        values[i : i + 2] = [result]
        del ops[i]
    return _format_chain(calcs, values[0])


# --------------------------------------------------------------------------------------------------------------
# Parsing and checking
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Step:
    """One written step of a completion.

    Attributes:
        text: the step's text without its separator, e.g. ``"5*3=15"``.
        start, end: character span of ``text`` in the completion (``completion[start:end] == text``).
        a, op, b, result: the parsed step; all ``None`` when the text is not of the form ``a op b = c``.
    """

    text: str
    start: int
    end: int
    a: int | None = None
    op: str | None = None
    b: int | None = None
    result: int | None = None

    @property
    def well_formed(self) -> bool:
        return self.op is not None

    @property
    def calc(self) -> Calc | None:
        return Calc(self.a, self.op, self.b, self.result) if self.well_formed else None


def boxed_text(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` up to the next ``}`` (the demo's answers never nest braces), or ``None``
    if there is no closed box. Real math answers go through `prime_trl.rewards.math.extract_boxed`, which matches
    braces and knows ``\\fbox``."""
    start = text.rfind(BOX_OPEN)
    if start < 0:
        return None
    close = text.find("}", start + len(BOX_OPEN))
    if close < 0:
        return None
    return text[start + len(BOX_OPEN) : close]


def parse_steps(completion: str) -> list[Step]:
    """Split a completion into its written steps.

    The step region is everything before the first ``\\boxed{`` (the whole text if there is none); it is split
    on ``;``. Each piece is one step - malformed if it is not exactly ``<int><op><int>=<int>`` - except an empty
    piece at the very end (the ``;`` that precedes the box). Text after the box is not a step.
    """
    box = completion.find(BOX_OPEN)
    region = completion if box < 0 else completion[:box]
    pieces = region.split(STEP_SEPARATOR)
    if pieces and pieces[-1] == "":
        pieces.pop()
    steps, pos = [], 0
    for piece in pieces:
        match = _STEP_RE.fullmatch(piece)
        if match:
            a, op, b, c = match.groups()
            steps.append(Step(piece, pos, pos + len(piece), int(a), op, int(b), int(c)))
        else:
            steps.append(Step(piece, pos, pos + len(piece)))
        pos += len(piece) + len(STEP_SEPARATOR)
    return steps


def _completion_text(completion: Any) -> str:
    """Completion text from TRL's standard (str) or conversational (list of messages) format."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, list) and completion and isinstance(completion[-1], dict):
        return str(completion[-1].get("content", ""))
    return str(completion)


def check_steps(problem: ArithmeticProblem, completion: str | Sequence[Step], mode: str = "reference") -> list[bool]:
    """Label every written step right (``True``) or wrong; see the module docstring for the two ``mode`` s.

    Args:
        problem: the problem the completion answers.
        completion: completion text (or its ``parse_steps`` result).
        mode: ``"reference"`` (exactly the reference step at that position) or ``"local"`` (right given the
            values written before it).

    Returns:
        One bool per written step, in order (``[]`` if nothing was written).
    """
    steps = parse_steps(completion) if isinstance(completion, str) else list(completion)
    if mode == "reference":
        return [
            step.well_formed and k < len(problem.steps) and step.calc == problem.steps[k]
            for k, step in enumerate(steps)
        ]
    if mode != "local":
        raise ValueError(f"mode must be 'reference' or 'local', got {mode!r}")
    # Local: replay the written chain on the expression. Each step is meant to reduce the pair due next; the
    # written result (right or wrong) replaces that pair. A malformed step gets the true value of the pair so
    # that later steps are judged against something sensible.
    values, ops = list(problem.operands), list(problem.operators)
    labels = []
    for step in steps:
        if not ops:  # the expression is already fully reduced: extra steps are wrong
            labels.append(False)
            continue
        i = reduction_index(ops)
        a, op, b = values[i], ops[i], values[i + 1]
        right = step.well_formed and (step.a, step.op, step.b) == (a, op, b) and step.result == apply_op(a, op, b)
        labels.append(bool(right))
        values[i : i + 2] = [step.result if step.well_formed else apply_op(a, op, b)]
        del ops[i]
    return labels


def first_wrong_step(problem: ArithmeticProblem, completion: str | Sequence[Step]) -> int | None:
    """Index of the first wrong written step (same under both labellings), or ``None`` if all are right.

    A completion that stops early with every written step right has no wrong step (``None``).
    """
    for k, right in enumerate(check_steps(problem, completion)):
        if not right:
            return k
    return None


def boxed_int(text: str) -> int | None:
    """The non-negative integer in the last ``\\boxed{...}``, or ``None`` (no box, or not an integer)."""
    content = boxed_text(text)
    if content is None:
        return None
    content = content.strip()
    return int(content) if content.isdigit() else None


def all_steps_correct(problem: ArithmeticProblem, completion: str) -> bool:
    """The whole chain is the reference chain (every step right, none missing or extra) and the box is right."""
    labels = check_steps(problem, completion)
    return len(labels) == len(problem.steps) and all(labels) and boxed_int(completion) == problem.answer


def answer_reward(completions: Sequence[Any], answer: Sequence[str | int], **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 iff the last ``\\boxed{N}`` of the completion holds the answer, else 0.0.

    Args:
        completions: ``B`` completions, strings (standard format) or message lists (conversational).
        answer: ``B`` reference answers (the dataset's ``answer`` column, repeated per generation by TRL).
        **kwargs: ignored (``prompts``, ``completion_ids``, ``trainer_state``, ``log_extra``, other columns...).

    Returns:
        ``B`` floats in ``{0.0, 1.0}``. Only the box is graded, not the steps (outcome reward).
    """
    if len(completions) != len(answer):
        raise ValueError(f"{len(completions)} completions but {len(answer)} answers")
    rewards = []
    for completion, ref in zip(completions, answer):
        got = boxed_int(_completion_text(completion))
        rewards.append(1.0 if got is not None and got == int(ref) else 0.0)
    return rewards


# --------------------------------------------------------------------------------------------------------------
# Data sets
# --------------------------------------------------------------------------------------------------------------


def _rows(problems: Sequence[ArithmeticProblem]) -> dict[str, list]:
    return {
        "prompt": [prompt_text(p) for p in problems],
        "answer": [str(p.answer) for p in problems],
        "expression": [p.expression for p in problems],
        "num_steps": [len(p.steps) for p in problems],
    }


def _unique_problems(n: int, rng: random.Random, config: TaskConfig, partition: str | None) -> list[ArithmeticProblem]:
    seen: set[str] = set()
    problems: list[ArithmeticProblem] = []
    for _ in range(200 * n + 10_000):
        if len(problems) == n:
            return problems
        p = sample_problem(rng, config) if partition is None else sample_problem_in(partition, rng, config)
        if p.expression not in seen:
            seen.add(p.expression)
            problems.append(p)
    if len(problems) < n:
        raise RuntimeError(f"only {len(problems)} distinct problems found for n={n} with {config}")
    return problems


def make_dataset(
    n: int, seed: int = 0, config: TaskConfig = TaskConfig(), partition: str | None = "train"
) -> datasets.Dataset:
    """``n`` distinct problems as a TRL-ready dataset.

    Columns: ``prompt`` (str, e.g. ``"Q:7+5*3-4=?A:"``), ``answer`` (str, e.g. ``"18"``; passed by TRL to
    ``answer_reward``), ``expression`` (str) and ``num_steps`` (int). ``partition`` restricts the draw to one
    partition (``None``: any).
    """
    return datasets.Dataset.from_dict(_rows(_unique_problems(n, random.Random(seed), config, partition)))


def make_splits(
    seed: int = 0,
    config: TaskConfig = TaskConfig(),
    n_train: int = 10_000,
    n_validation: int = 500,
    n_test: int = 500,
) -> datasets.DatasetDict:
    """Train / validation / test datasets (columns as ``make_dataset``) with no prompt in two splits.

    Disjointness does not depend on the seed: each split draws from its own hash partition of the problem
    space, so the test prompts of any seed are never training prompts of any seed (including the warm start's).
    """
    # Separate streams per split, so changing n_train does not change the held-out sets.
    sizes = {"train": n_train, "validation": n_validation, "test": n_test}
    splits = {}
    for index, (name, n) in enumerate(sizes.items()):
        rng = random.Random(f"{seed}-{index}-{name}")
        splits[name] = datasets.Dataset.from_dict(_rows(_unique_problems(n, rng, config, name)))
    return datasets.DatasetDict(splits)


# --------------------------------------------------------------------------------------------------------------
# Steps <-> tokens (for step localisation)
# --------------------------------------------------------------------------------------------------------------


def step_token_spans(
    completion: str, tokenizer: Any, steps: Sequence[Step] | None = None, include_separator: bool = True
) -> list[tuple[int, int]]:
    """Token index range ``[t0, t1)`` of each written step, counted from the first completion token.

    Indices are positions in the tokenisation of ``completion`` alone (no special tokens), which is how TRL's
    ``completion_ids`` / ``completion_mask`` index a completion when the text round-trips through the tokenizer
    (exactly so for the demo's character-level tokenizer). A token belongs to a step if its characters overlap
    the step's span. ``include_separator`` extends each span over the ``;`` that ends the step: that token is the
    moment the step is committed to.

    Uses the tokenizer's character offsets when it has them, else re-tokenises prefixes.
    """
    steps = parse_steps(completion) if steps is None else steps
    char_spans = []
    for step in steps:
        end = step.end
        if include_separator and completion[end : end + len(STEP_SEPARATOR)] == STEP_SEPARATOR:
            end += len(STEP_SEPARATOR)
        char_spans.append((step.start, end))

    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(completion, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        spans = []
        for start, end in char_spans:
            inside = [t for t, (s, e) in enumerate(offsets) if s < end and e > start]
            spans.append((inside[0], inside[-1] + 1) if inside else (0, 0))
        return spans

    def n_tokens(text: str) -> int:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])

    return [(n_tokens(completion[:start]), n_tokens(completion[:end])) for start, end in char_spans]


def step_reward_sums(token_rewards: Sequence[float] | Any, spans: Sequence[tuple[int, int]]) -> list[float]:
    """Sum of per-token rewards (a ``[T]`` tensor or list, completion positions) over each step's token span."""
    values = token_rewards.tolist() if hasattr(token_rewards, "tolist") else list(token_rewards)
    return [float(sum(values[t0:t1])) for t0, t1 in spans]
