"""Code verifier: run the completion's last ```python block against the row's tests in the sandbox.

`tests` (one per row) is either

* a **test program** (str): Python written against the solution's names, assert style; it passes when it
  runs to the end (score 1.0, else 0.0). It runs in a judge process outside the sandbox, which calls the
  solution's functions through a plain-data channel (see `Sandbox.run_program`), so nothing the solution does in
  its own process can reach the verdict. HumanEval rows from `prime_trl.data` look like
  ``<HumanEval test code>\\ncheck(<entry point>)``;
* **stdin/stdout cases**: a dict or a JSON string ``{"inputs": [...], "outputs": [...]}`` (APPS / TACO /
  Eurus-2-RL-Data style); the program reads the input on stdin and its stdout must match the output (trailing
  whitespace ignored; tokens that are decimals in the expected output may differ by 1e-6). With
  ``"fn_name"``, each input is instead the argument list of a call to that function (or `Solution().fn_name`)
  and the JSON of the return value must equal the output. Score = fraction of cases passed.

Optional columns ``code_prefix`` and ``entry_point`` (HumanEval-style rows) say how the completion's code is
combined with the code in the prompt (see `assemble_program`); the judge also runs ``code_prefix`` itself, so the
tests use the prompt's helper functions, not ones the completion redefined.
"""

from __future__ import annotations

import ast
import json
import logging
import math
import os
import re
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from prime_trl.rewards import _wire
from prime_trl.rewards._common import check_column, completion_text
from prime_trl.rewards.sandbox import Sandbox, SandboxLimits

logger = logging.getLogger(__name__)

__all__ = [
    "IOTests",
    "assemble_program",
    "code_reward",
    "extract_code",
    "make_code_reward",
    "outputs_match",
    "parse_tests",
    "score_code",
]

_FENCE = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str:
    """The last ```python (or ```py / ```python3) fenced block of `text`; the whole text if there is none.
    A final block cut off before its closing fence (truncated generation) is taken up to the end."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text


@dataclass(frozen=True)
class IOTests:
    """Stdin/stdout cases, or function-call cases when `fn_name` is set (inputs are argument lists)."""

    inputs: list
    outputs: list
    fn_name: str | None = None


def parse_tests(tests: Any) -> str | IOTests:
    """A row's `tests` value as a test program (str) or `IOTests`; raises ValueError saying what is wrong."""
    if isinstance(tests, str):
        stripped = tests.strip()
        if stripped.startswith("{"):
            try:
                decoded = json.loads(stripped)
            except ValueError:
                decoded = None
            if isinstance(decoded, dict) and ("inputs" in decoded or "outputs" in decoded):
                return parse_tests(decoded)
        if not stripped:
            raise ValueError("code_reward: a row's 'tests' is empty; give a test program or inputs/outputs")
        return tests
    if isinstance(tests, dict):
        inputs, outputs = tests.get("inputs"), tests.get("outputs")
        if not isinstance(inputs, list) or not isinstance(outputs, list):
            raise ValueError(
                "code_reward: stdin/stdout tests need lists under 'inputs' and 'outputs', got keys "
                f"{sorted(tests)} (types {type(inputs).__name__}, {type(outputs).__name__})"
            )
        if len(inputs) != len(outputs):
            raise ValueError(f"code_reward: tests have {len(inputs)} inputs but {len(outputs)} outputs")
        fn_name = tests.get("fn_name") or None
        return IOTests(inputs, outputs, str(fn_name) if fn_name else None)
    raise TypeError(
        "code_reward: each 'tests' value must be a test program (str) or {'inputs': [...], 'outputs': [...]} "
        f"(dict or JSON string), got {type(tests).__name__}"
    )


def _defines(code: str, name: str) -> bool:
    """Whether `code` parses and binds `name` at module level (def, class, assignment or import)."""
    try:
        tree = ast.parse(code)
    except SyntaxError:
        return False
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name == name:
            return True
        if isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            if any(isinstance(t, ast.Name) and t.id == name for t in targets):
                return True
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            if any((alias.asname or alias.name.split(".")[0]) == name for alias in node.names):
                return True
    return False


def assemble_program(code: str, code_prefix: str | None = None, entry_point: str | None = None) -> str:
    """Combine a completion's code with the prompt's code (HumanEval-style rows).

    Without `code_prefix` the code is used as is. With it (HumanEval: imports, helper functions and the target
    function's signature and docstring):

    * the code defines `entry_point` at module level (a complete function, the usual chat answer): the prefix
      goes first, so its imports and helpers exist, and the completion's definition replaces the stub;
    * otherwise the code is taken as the continuation of the prefix (a function body), as in HumanEval's
      original completion format: ``prefix + code``.
    """
    if not code_prefix:
        return code
    if entry_point is None or _defines(code, entry_point):
        return code_prefix.rstrip() + "\n\n\n" + code
    return code_prefix + code


def outputs_match(actual: str, expected: Any) -> bool:
    """Judge stdout against an expected output: equal up to trailing whitespace on lines and at the end; failing
    that, token by token, where tokens that are decimals in the expected output may differ by 1e-6 (relative or
    absolute). A list of expected lines is joined with newlines."""
    if isinstance(expected, list):
        expected = "\n".join(str(x) for x in expected)
    expected = str(expected)
    lines = lambda s: [line.rstrip() for line in s.rstrip().splitlines()]  # noqa: E731
    if lines(actual) == lines(expected):
        return True
    got, want = actual.split(), expected.split()
    if len(got) != len(want):
        return False
    for a, b in zip(got, want):
        if a == b:
            continue
        if not re.fullmatch(r"[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)", b):
            return False
        try:
            if not math.isclose(float(a), float(b), rel_tol=1e-6, abs_tol=1e-6):
                return False
        except ValueError:
            return False
    return True


def _values_match(actual: Any, expected: Any) -> bool:
    """Return-value comparison for function-call cases (after a JSON round trip; floats to 1e-6)."""
    if isinstance(expected, float) or isinstance(actual, float):
        if isinstance(actual, bool) or isinstance(expected, bool):
            return actual == expected
        try:
            return math.isclose(float(actual), float(expected), rel_tol=1e-6, abs_tol=1e-6)
        except (TypeError, ValueError):
            return False
    if isinstance(expected, list) and isinstance(actual, list):
        return len(actual) == len(expected) and all(_values_match(a, e) for a, e in zip(actual, expected))
    if isinstance(expected, dict) and isinstance(actual, dict):
        return actual.keys() == expected.keys() and all(_values_match(actual[k], expected[k]) for k in expected)
    return type(actual) is type(expected) and actual == expected


def _call_output_matches(stdout: str, expected: Any) -> bool:
    """Whether a function-call case's printed JSON (untrusted: size-capped by the sandbox, parsed here with
    bounded depth) equals the expected return value."""
    try:
        value = _wire.loads(stdout)
        _wire.decode(value, _no_handles, _no_handles)  # only for its depth bound; JSON data is returned as is
    except _wire.WireError:
        return False
    # APPS/TACO store a call's expected return value wrapped in a one-element list.
    wrapped = isinstance(expected, list) and len(expected) == 1
    return _values_match(value, expected) or (wrapped and _values_match(value, expected[0]))


def _no_handles(_: Any) -> Any:
    raise _wire.WireError("not plain JSON")


def score_code(
    code: str, tests: Any, sandbox: Sandbox, code_prefix: str | None = None, entry_point: str | None = None
) -> float:
    """Score one program: 1.0/0.0 for a test program, the fraction of passed cases for stdin/stdout tests.

    For a test program, `code_prefix` (the prompt's own code: imports, helper functions) is also run on the
    judge's side before the tests, so the tests use the prompt's helpers even if `code` redefines them, and
    `entry_point` names the function under test (see `Sandbox.run_program`)."""
    spec = parse_tests(tests)
    if isinstance(spec, str):
        result = sandbox.run_program(code, spec, prelude=code_prefix or None, entry_point=entry_point or None)
        logger.debug("code verdict %s %s", result.status, result.detail)
        return 1.0 if result.passed else 0.0
    if not spec.inputs:
        return 0.0
    if spec.fn_name is None:
        inputs = ["\n".join(map(str, x)) if isinstance(x, list) else str(x) for x in spec.inputs]
        results = sandbox.run_cases(code, inputs)
        passed = sum(
            r.status == "ok" and not r.truncated and outputs_match(r.stdout, e) for r, e in zip(results, spec.outputs)
        )
    else:
        inputs = [json.dumps(x if isinstance(x, list) else [x]) for x in spec.inputs]
        results = sandbox.run_cases(code, inputs, fn_name=spec.fn_name)
        passed = sum(
            r.status == "ok" and not r.truncated and _call_output_matches(r.stdout, e)
            for r, e in zip(results, spec.outputs)
        )
    return passed / len(spec.inputs)


def make_code_reward(
    limits: SandboxLimits | None = None,
    max_workers: int | None = None,
    isolation: str = "auto",
    python: str | None = None,
) -> Callable[..., list[float]]:
    """A TRL reward function like `code_reward` with its own settings.

    Args:
        limits: per-run resource limits (`SandboxLimits`: timeout, memory, processes, ...).
        max_workers: programs run in parallel (default: CPU count, at most 8).
        isolation: "auto" / "bwrap" / "none" (see `Sandbox`); "none" runs code unisolated, with a loud warning.
        python: interpreter used inside the sandbox (default: the current one, standard library only).
    """
    state: dict[str, Any] = {}
    lock = threading.Lock()
    workers = max_workers if max_workers is not None else min(8, os.cpu_count() or 1)

    def get_sandbox() -> Sandbox:
        with lock:  # created on first use, so importing or configuring never fails for lack of bwrap
            if "sandbox" not in state:
                state["sandbox"] = Sandbox(limits, isolation=isolation, python=python)
            return state["sandbox"]

    def code_reward(completions: list, tests: list | None = None, **kwargs: Any) -> list[float]:
        return _code_reward(completions, tests, get_sandbox(), max(1, workers), kwargs)

    code_reward.__doc__ = _CODE_REWARD_DOC
    return code_reward


def _code_reward(completions: list, tests: list | None, sandbox: Sandbox, workers: int, kwargs: dict) -> list[float]:
    n = len(completions)
    tests = check_column("tests", tests, n, reward="code_reward", hint="a test program or stdin/stdout cases")
    prefixes = kwargs.get("code_prefix")
    entry_points = kwargs.get("entry_point")
    if prefixes is not None:
        prefixes = check_column("code_prefix", prefixes, n, reward="code_reward", hint="code the prompt supplies")
    if entry_points is not None:
        entry_points = check_column("entry_point", entry_points, n, reward="code_reward", hint="function under test")
    for row_tests in tests:  # fail fast on malformed rows, before starting any program
        if row_tests is not None:
            parse_tests(row_tests)
    programs = []
    for i, completion in enumerate(completions):
        code = extract_code(completion_text(completion))
        programs.append(
            assemble_program(code, prefixes[i] if prefixes else None, entry_points[i] if entry_points else None)
        )

    for i, row_tests in enumerate(tests):
        if row_tests is None:
            raise ValueError(f"code_reward: row {i} has no tests (its 'tests' value is None)")

    def score(i: int) -> float:
        try:
            return score_code(
                programs[i],
                tests[i],
                sandbox,
                prefixes[i] if prefixes else None,
                entry_points[i] if entry_points else None,
            )
        except Exception as exc:  # noqa: BLE001 - one row never fails the batch: it scores 0, with the reason
            logger.warning("code_reward: row %d scored 0: %s: %s", i, type(exc).__name__, str(exc)[:300])
            return 0.0

    if workers == 1 or n <= 1:
        return [score(i) for i in range(n)]
    with ThreadPoolExecutor(max_workers=min(workers, n), thread_name_prefix="prime-trl-code") as pool:
        return list(pool.map(score, range(n)))


_CODE_REWARD_DOC = """TRL reward function: run each completion's code against its row's `tests` in the sandbox.

    Args:
        completions: plain strings or conversational completions; the code is the last ```python block of the
            text (the whole text if there is none).
        tests: one value per row (dataset column ``tests``): a test program (assert style, run by a judge
            process against the solution's functions; 1.0 if it runs to the end) or stdin/stdout cases
            ``{"inputs": [...], "outputs": [...]}``
            as a dict or JSON string (score = fraction of cases passed; ``"fn_name"`` makes them function calls).
        **kwargs: TRL's other arguments and columns; ``code_prefix`` and ``entry_point`` columns, if present, are
            used by `assemble_program` (HumanEval rows).

    Programs run in parallel (bounded workers) in bubblewrap with time, CPU, memory, process and file-size
    limits. A row whose run fails in any way scores 0 (logged); only malformed data raises. Without a working bubblewrap this raises `SandboxUnavailableError` unless you opt out
    (``PRIME_TRL_ALLOW_UNSANDBOXED=1``, or ``make_code_reward(isolation="none")``). Use `make_code_reward` for
    other limits or worker counts.
    """

code_reward = make_code_reward()
code_reward.__doc__ = _CODE_REWARD_DOC
