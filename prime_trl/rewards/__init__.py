"""Verifiers (TRL reward functions) for PRIME's outcome labels.

* `math_reward(completions, answer)`: last ``\\boxed{}`` vs the reference answer, via HF math-verify, with a hard
  per-check time limit (worker processes).
* `code_reward(completions, tests)`: the last ```python block, run against a test program or stdin/stdout cases
  in a bubblewrap sandbox with resource limits.
* `task_reward(completions, task, ...)`: routes each row by its ``task`` column ("math" / "code"); ``verifier``
  is its former, deprecated name.

`make_math_reward`, `make_code_reward` and `make_task_reward` build variants with other settings. See
docs/verifiers.md for the sandbox's guarantees and limits.
"""

from prime_trl.rewards.code import (
    IOTests,
    assemble_program,
    code_reward,
    extract_code,
    make_code_reward,
    outputs_match,
    parse_tests,
    score_code,
)
from prime_trl.rewards.math import (
    MathGrader,
    extract_boxed,
    extract_final_answer,
    final_answer_reward,
    grade_answer,
    make_math_reward,
    math_reward,
)
from prime_trl.rewards.sandbox import (
    UNSANDBOXED_ENV,
    CaseResult,
    ProgramResult,
    Sandbox,
    SandboxLimits,
    SandboxUnavailableError,
    bwrap_status,
)
from prime_trl.rewards.verifier import TASKS, make_task_reward, make_verifier, task_reward, verifier

__all__ = [
    "TASKS",
    "UNSANDBOXED_ENV",
    "CaseResult",
    "IOTests",
    "MathGrader",
    "ProgramResult",
    "Sandbox",
    "SandboxLimits",
    "SandboxUnavailableError",
    "assemble_program",
    "bwrap_status",
    "code_reward",
    "extract_boxed",
    "extract_final_answer",
    "final_answer_reward",
    "extract_code",
    "grade_answer",
    "make_code_reward",
    "make_math_reward",
    "make_task_reward",
    "make_verifier",
    "math_reward",
    "outputs_match",
    "parse_tests",
    "score_code",
    "task_reward",
    "verifier",
]
