"""Code verifier: extraction, test formats, scoring, HumanEval, the combined verifier, and the sandbox policy."""

from __future__ import annotations

import json

import pytest
from helpers import require_bwrap

from prime_trl.rewards import (
    Sandbox,
    SandboxLimits,
    SandboxUnavailableError,
    assemble_program,
    code_reward,
    extract_code,
    make_code_reward,
    outputs_match,
    parse_tests,
    task_reward,
    verifier,
)
from prime_trl.rewards import sandbox as sandbox_module
from prime_trl.rewards.code import IOTests


@pytest.fixture(scope="module")
def bwrap():
    require_bwrap()


def fenced(code: str) -> str:
    return f"Here is my solution.\n```python\n{code}\n```\nDone."


# ----------------------------------------------------------------------------- pure helpers
def test_extract_code():
    assert extract_code("```python\na = 1\n```\ntext\n```python\nb = 2\n```") == "b = 2\n"
    assert extract_code("```py\nc = 3\n```") == "c = 3\n"
    assert extract_code("```Python3\nd = 4\n```") == "d = 4\n"
    assert extract_code("x = 5") == "x = 5"  # no block: the whole text
    assert extract_code("```python\ne = 1\n```\n```python\nf = 2\n") == "f = 2\n"  # truncated final block


def test_parse_tests():
    assert parse_tests("assert f(1) == 2") == "assert f(1) == 2"
    spec = parse_tests('{"inputs": ["1\\n"], "outputs": ["2\\n"]}')
    assert spec == IOTests(["1\n"], ["2\n"])
    assert parse_tests({"inputs": [[1]], "outputs": [[2]], "fn_name": "f"}).fn_name == "f"
    with pytest.raises(ValueError, match="2 inputs but 1 outputs"):
        parse_tests({"inputs": ["1", "2"], "outputs": ["1"]})
    with pytest.raises(ValueError, match="lists under 'inputs' and 'outputs'"):
        parse_tests({"inputs": "1", "outputs": ["1"]})
    with pytest.raises(ValueError, match="empty"):
        parse_tests("   ")
    with pytest.raises(TypeError, match="test program"):
        parse_tests(42)


@pytest.mark.parametrize(
    "actual,expected,ok",
    [
        ("3\n", "3", True),
        ("3   \n\n", "3\n", True),
        ("1 2\n3 4", "1 2  \n3 4\n", True),
        ("0.3333333", "0.333333", True),
        ("0.34", "0.333333", False),
        ("3.0", "3", False),  # an integer is expected: no float tolerance
        ("YES", "yes", False),
        ("1\n2", ["1", "2"], True),
        ("", "0", False),
    ],
)
def test_outputs_match(actual, expected, ok):
    assert outputs_match(actual, expected) is ok


def test_assemble_program_humaneval_style():
    prefix = 'from typing import List\n\ndef helper(x):\n    return x * 2\n\ndef target(xs: List[int]) -> int:\n    """Doc."""\n'
    full = "def target(xs: List[int]) -> int:\n    return sum(helper(x) for x in xs)\n"
    program = assemble_program(full, prefix, "target")
    assert program.startswith(prefix.rstrip()) and program.endswith(full)  # prefix kept: imports and helper
    body = "    return sum(helper(x) for x in xs)\n"
    assert assemble_program(body, prefix, "target") == prefix + body  # continuation of the stub
    assert assemble_program(full, None, None) == full
    namespace: dict = {}
    exec(assemble_program(full, prefix, "target"), namespace)
    exec(assemble_program(body, prefix, "target"), namespace)
    assert namespace["target"]([1, 2]) == 6


# ----------------------------------------------------------------------------- scoring in the sandbox
def test_test_program_scores(bwrap):
    tests = "assert add(1, 2) == 3\nassert add(-1, 1) == 0\n"
    completions = [
        fenced("def add(a, b):\n    return a + b"),
        fenced("def add(a, b):\n    return a - b"),
        [{"role": "assistant", "content": fenced("def add(a, b):\n    return a + b")}],
        "def add(a, b):\n    return a + b",  # no fence: the whole text is the program
        fenced("def add(a, b) return a + b"),  # syntax error
        "I don't know.",
    ]
    assert code_reward(completions, [tests] * len(completions)) == [1.0, 0.0, 1.0, 1.0, 0.0, 0.0]


def test_stdin_stdout_scores_fraction_of_cases(bwrap):
    tests = {"inputs": ["1 2\n", "10 20\n", "5 5\n"], "outputs": ["3\n", "30\n", "10\n"]}
    right = fenced("a, b = map(int, input().split())\nprint(a + b)")
    partly = fenced("import sys\na, b = map(int, sys.stdin.read().split())\nprint(a + b if a < 5 else 0)")
    crash = fenced("raise RuntimeError")
    scores = code_reward([right, partly, crash, right], [tests, tests, tests, json.dumps(tests)])
    assert scores == pytest.approx([1.0, 1 / 3, 0.0, 1.0])


def test_stdin_stdout_programs_that_exit_or_use_main_guard(bwrap):
    tests = {"inputs": ["4\n"], "outputs": ["16\n"]}
    programs = [
        "import sys\nn = int(input())\nprint(n * n)\nsys.exit(0)",
        "def main():\n    print(int(input()) ** 2)\nif __name__ == '__main__':\n    main()",
        "import sys\nprint(int(input()) ** 2)\nsys.exit(1)",  # non-zero exit: a runtime error
    ]
    assert code_reward([fenced(p) for p in programs], [tests] * 3) == [1.0, 1.0, 0.0]


def test_function_call_cases(bwrap):
    tests = {"fn_name": "solve", "inputs": [[1, 2], [[1, 2, 3], 0]], "outputs": [[3], [[1, 2, 3]]]}
    good = fenced("def solve(a, b):\n    return a + b if isinstance(a, int) else a")
    tuples = fenced("def solve(a, b):\n    return a + b if isinstance(a, int) else tuple(a)")  # JSON: tuple == list
    wrong = fenced("def solve(a, b):\n    return 0")
    leetcode = fenced("class Solution:\n    def solve(self, a, b):\n        return a + b if isinstance(a, int) else a")
    assert code_reward([good, tuples, wrong, leetcode], [tests] * 4) == [1.0, 1.0, 0.0, 1.0]


def test_reward_function_contract(bwrap):
    tests = ["assert f() == 1"] * 2
    completions = [fenced("def f():\n    return 1")] * 2
    scores = code_reward(
        completions,
        tests=tests,
        prompts=["p", "p"],
        completion_ids=[[1], [2]],
        trainer_state=None,
        log_extra=lambda *a: None,
        log_metric=lambda *a: None,
        task=["code", "code"],
        answer=[None, None],
    )
    assert scores == [1.0, 1.0] and all(type(s) is float for s in scores)
    with pytest.raises(ValueError, match="needs a dataset column named 'tests'"):
        code_reward(completions)
    with pytest.raises(ValueError, match="'tests' has 1 values but there are 2 completions"):
        code_reward(completions, tests=tests[:1])
    with pytest.raises(ValueError, match="2 inputs but 1 outputs"):
        code_reward(completions, tests=[{"inputs": ["1", "2"], "outputs": ["1"]}] * 2)


def test_parallel_workers_give_the_same_scores(bwrap):
    tests = ["assert sq(3) == 9"] * 6
    completions = [fenced(f"def sq(x):\n    return x * {'x' if i % 2 else 2}") for i in range(6)]
    serial = make_code_reward(max_workers=1)(completions, tests)
    parallel = make_code_reward(max_workers=4)(completions, tests)
    assert serial == parallel == [0.0, 1.0] * 3


@pytest.mark.slow
def test_humaneval_canonical_solutions_pass_and_stubs_fail(bwrap, shared_data_dir):
    from prime_trl.data import load_humaneval

    dataset = load_humaneval(path=shared_data_dir)
    raw = [json.loads(line) for line in open(shared_data_dir / "humaneval.jsonl")]
    assert len(dataset) == len(raw) == 164
    columns = {"tests": dataset["tests"], "code_prefix": dataset["code_prefix"], "entry_point": dataset["entry_point"]}
    # a chat-style answer: the whole function in a fenced block
    full = [fenced(r["prompt"] + r["canonical_solution"]) for r in raw]
    scores = code_reward(full, **columns)
    assert scores == [1.0] * 164, [r["task_id"] for r, s in zip(raw, scores) if s != 1.0]
    # HumanEval's original format: only the body, which continues the prompt's stub
    assert code_reward([r["canonical_solution"] for r in raw], **columns) == [1.0] * 164
    # the body replaced by `pass`: the function returns None and every check fails
    stubs = [fenced(r["prompt"] + "    pass\n") for r in raw]
    scores = code_reward(stubs, **columns)
    assert scores == [0.0] * 164, [r["task_id"] for r, s in zip(raw, scores) if s != 0.0]


# ----------------------------------------------------------------------------- combined verifier
def test_task_reward_routes_rows_by_task(bwrap):
    completions = [
        "\\boxed{4}",
        fenced("def f():\n    return 4"),
        "\\boxed{5}",
        fenced("print(int(input()) + 1)"),
    ]
    scores = task_reward(
        completions,
        task=["math", "code", "math", "code"],
        answer=["4", None, "4", ""],
        tests=[None, "assert f() == 4", "", {"inputs": ["1"], "outputs": ["2"]}],
        trainer_state=None,
        log_metric=lambda *a: None,
    )
    assert scores == [1.0, 1.0, 0.0, 1.0]


def test_task_reward_errors():
    assert verifier is task_reward  # the deprecated name
    with pytest.raises(ValueError, match="unknown task value"):
        task_reward(["x"], task=["physics"], answer=["1"])
    with pytest.raises(ValueError, match="needs a dataset column named 'task'"):
        task_reward(["x"], answer=["1"])
    with pytest.raises(ValueError, match="needs a dataset column named 'answer'"):
        task_reward(["\\boxed{1}"], task=["math"])


# ----------------------------------------------------------------------------- secure by default / opt-out
def _no_bwrap(monkeypatch):
    monkeypatch.setattr(
        sandbox_module, "bwrap_status", lambda python=None: (False, "bwrap (bubblewrap) is not installed")
    )
    monkeypatch.delenv(sandbox_module.UNSANDBOXED_ENV, raising=False)


def test_refuses_without_a_sandbox(monkeypatch):
    _no_bwrap(monkeypatch)
    with pytest.raises(SandboxUnavailableError, match="apt-get install bubblewrap"):
        Sandbox()
    with pytest.raises(SandboxUnavailableError, match="PRIME_TRL_ALLOW_UNSANDBOXED"):
        make_code_reward()([fenced("x = 1")], ["assert x == 1"])
    with pytest.raises(SandboxUnavailableError):
        Sandbox(isolation="bwrap")


def test_explicit_opt_out_warns_and_keeps_limits(monkeypatch):
    _no_bwrap(monkeypatch)
    monkeypatch.setattr(sandbox_module, "_warned", False)
    monkeypatch.setenv(sandbox_module.UNSANDBOXED_ENV, "1")
    with pytest.warns(RuntimeWarning, match="WITHOUT A SANDBOX"):
        sandbox = Sandbox(SandboxLimits(timeout=2.0, memory_mb=512))
    assert not sandbox.isolated
    assert sandbox.run_program("def f():\n    return 1", "assert f() == 1").passed
    assert not sandbox.run_program("import os\nos._exit(0)", "assert False").passed
    assert sandbox.run_program("while True:\n    pass", "pass").status in ("timeout", "crashed")
    assert not sandbox.run_program("x = bytearray(2 << 30)", "pass").passed  # over the address-space limit
    results = sandbox.run_cases("print(int(input()) * 2)", ["21\n"])
    assert results[0].status == "ok" and results[0].stdout == "42\n"


def test_opt_out_by_argument(monkeypatch):
    _no_bwrap(monkeypatch)
    monkeypatch.setattr(sandbox_module, "_warned", False)
    with pytest.warns(RuntimeWarning, match="WITHOUT A SANDBOX"):
        reward = make_code_reward(isolation="none", limits=SandboxLimits(timeout=5.0))
        assert reward([fenced("x = 2")], ["assert x == 2"]) == [1.0]


def test_bad_isolation_value():
    with pytest.raises(ValueError, match="isolation must be"):
        Sandbox(isolation="docker")


# ----------------------------------------------------------------------------- the judge's channel
def test_wire_round_trip_and_bounds():
    from prime_trl.rewards import _wire

    def no_handles(value):
        raise TypeError(type(value).__name__)

    value = [None, True, 3, -(2**100), 2.5, float("inf"), 1 + 2j, "s", b"\x00b", (1, (2,)), {1, 2}, frozenset({3})]
    value.append({"k": [1], (1, 2): "t"})
    line = _wire.dumps({"value": _wire.encode(value, no_handles)})
    assert _wire.decode(_wire.loads(line)["value"], no_handles, no_handles) == value
    c_dumps, c_loads = _wire.c_codec()
    assert c_loads(c_dumps({"a": [1, "x"]})[:-1]) == {"a": [1, "x"]}
    deep = b"[" * 200_000 + b"]" * 200_000
    for bad in (deep, b'{"$x": 1}', b'{"$s": [[1]]}', b'{"$d": [[1]]}', b"[1] trailing", b"\xff"):
        with pytest.raises(_wire.WireError):
            _wire.decode(_wire.loads(bad), no_handles, no_handles)
        with pytest.raises(_wire.WireError):
            _wire.decode(c_loads(bad), no_handles, no_handles)
    with pytest.raises(_wire.WireError, match="deeper"):
        nested: list = []
        for _ in range(_wire.MAX_DEPTH + 2):
            nested = [nested]
        _wire.decode(nested, no_handles, no_handles)


def test_judge_calls_objects_through_handles_and_refuses_what_cannot_cross(bwrap):
    sandbox = Sandbox(SandboxLimits(timeout=5.0))
    stack = (
        "class Stack:\n    def __init__(self):\n        self.items = []\n    def push(self, x):\n"
        "        self.items.append(x)\n    def pop(self):\n        return self.items.pop()\n"
        "def evens(n):\n    yield from range(0, n, 2)\nLIMIT = (3, {'a': [1.5]})\n"
    )
    tests = (
        "s = Stack()\ns.push(1)\ns.push((2, 'b'))\nassert s.pop() == (2, 'b')\nassert s.items == [1]\n"
        "assert list(evens(5)) == [0, 2, 4]\nassert LIMIT == (3, {'a': [1.5]})\nassert repr(s).startswith('<candidate')\n"
    )
    assert sandbox.run_program(stack, tests).passed
    mutate = "def fill(xs, d, s):\n    xs.sort()\n    d['k'] = 1\n    s.add(3)\n    return None\n"
    tests = "xs, d, s = [3, 1, 2], {}, set()\nassert fill(xs, d, s) is None\nassert (xs, d, s) == ([1, 2, 3], {'k': 1}, {3})"
    assert sandbox.run_program(mutate, tests).passed
    result = sandbox.run_program("def apply(f, x):\n    return f(x)\n", "assert apply(lambda v: v + 1, 1) == 2")
    assert not result.passed and "cannot pass a function to the candidate" in result.detail
    result = sandbox.run_program(
        "class Yes:\n    def __eq__(self, o):\n        return True\ndef f():\n    return Yes()\n", "assert f() == 1"
    )
    assert not result.passed and result.status == "failed"
    result = sandbox.run_program("def f():\n    return object()\n", "assert f()")
    assert not result.passed and "no truth value" in result.detail


def test_one_broken_row_scores_zero_without_failing_the_batch(bwrap, monkeypatch, caplog):
    from prime_trl.rewards import code as code_module

    real = code_module.score_code

    def flaky(code, *args, **kwargs):
        if "boom" in code:
            raise RuntimeError("machinery failed")
        return real(code, *args, **kwargs)

    monkeypatch.setattr(code_module, "score_code", flaky)
    completions = [fenced("boom = 1"), fenced("def f():\n    return 1")]
    assert code_reward(completions, ["assert f() == 1"] * 2) == [0.0, 1.0]
    assert "row 0 scored 0: RuntimeError: machinery failed" in caplog.text


def test_memory_cgroup_choice_and_fall_back(bwrap, monkeypatch, tmp_path):
    from prime_trl.rewards import _cgroup

    monkeypatch.setenv(_cgroup.CGROUP_ENV, str(tmp_path))  # not a cgroup directory: no group, rlimits only
    assert _cgroup.detect() is None
    sandbox = Sandbox(SandboxLimits(timeout=5.0))
    assert sandbox.memory_cgroup is None
    assert sandbox.run_program("def f():\n    return 2", "assert f() == 2").passed
    monkeypatch.delenv(_cgroup.CGROUP_ENV)
    found = _cgroup.detect()
    if found is None:
        pytest.skip("no writable memory cgroup on this host")
    kind, parent = found
    monkeypatch.setenv(_cgroup.CGROUP_ENV, str(parent))  # the same directory, chosen explicitly
    assert _cgroup.detect() == (kind, parent)
    before = {p.name for p in parent.iterdir() if p.name.startswith("prime-trl-")}
    sandbox = Sandbox(SandboxLimits(timeout=5.0))
    assert sandbox.memory_cgroup == kind
    assert sandbox.run_program("def f():\n    return 2", "assert f() == 2").passed
    assert sandbox.run_cases("print(int(input()) + 1)", ["1"])[0].stdout == "2\n"
    leftover = {p.name for p in parent.iterdir() if p.name.startswith("prime-trl-")} - before
    assert not leftover, f"run cgroups left behind: {leftover}"
