"""`task_reward`: routes each row to the math or the code verifier by its ``task`` column.

(Named `verifier` before; in PRIME's settings ``verifier`` names the reward function that labels the PRM.)
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prime_trl.rewards._common import check_column
from prime_trl.rewards.code import code_reward
from prime_trl.rewards.math import math_reward

__all__ = ["TASKS", "make_task_reward", "make_verifier", "task_reward", "verifier"]

TASKS = ("math", "code")


def make_task_reward(
    math_fn: Callable[..., list[float]] | None = None, code_fn: Callable[..., list[float]] | None = None
) -> Callable[..., list[float]]:
    """A `task_reward` that uses the given math and code reward functions (defaults: `math_reward`, `code_reward`),
    e.g. ``make_task_reward(code_fn=make_code_reward(limits=SandboxLimits(timeout=5)))``."""

    def task_reward(completions: list, task: list | None = None, **kwargs: Any) -> list[float]:
        return _route(completions, task, math_fn or math_reward, code_fn or code_reward, kwargs)

    task_reward.__doc__ = _TASK_REWARD_DOC
    return task_reward


def _route(completions: list, task: list | None, math_fn, code_fn, kwargs: dict) -> list[float]:
    n = len(completions)
    tasks = check_column("task", task, n, reward="task_reward", hint='"math" or "code" per row')
    unknown = sorted({str(t) for t in tasks if t not in TASKS})
    if unknown:
        raise ValueError(
            f"task_reward: unknown task value(s) {unknown}; each row's 'task' must be one of {list(TASKS)}"
        )
    scores = [0.0] * n
    for name, fn in (("math", math_fn), ("code", code_fn)):
        rows = [i for i, t in enumerate(tasks) if t == name]
        if not rows:
            continue
        # Row-aligned columns (lists with one value per completion) are cut down to this task's rows; other
        # arguments (trainer_state, log_metric, ...) pass through unchanged.
        sub_kwargs = {key: [value[i] for i in rows] if _is_column(value, n) else value for key, value in kwargs.items()}
        sub_scores = fn(completions=[completions[i] for i in rows], task=[name] * len(rows), **sub_kwargs)
        if len(sub_scores) != len(rows):
            raise RuntimeError(f"task_reward: the {name} reward returned {len(sub_scores)} scores for {len(rows)} rows")
        for i, s in zip(rows, sub_scores):
            scores[i] = float(s)
    return scores


def _is_column(value: Any, n: int) -> bool:
    """A per-row column: a list (or other sequence, e.g. a `datasets` Column) with one value per completion."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__getitem__") or not hasattr(value, "__len__"):
        return False
    return len(value) == n


_TASK_REWARD_DOC = """TRL reward function for data sets that mix math and code rows, as PRIME's did.

    Each row's ``task`` column ("math" or "code") picks the verifier: `math_reward` (needs an ``answer`` column)
    or `code_reward` (needs ``tests``; uses ``code_prefix``/``entry_point`` if present). Columns a row does not
    use may be None. Returns one float per completion.
    """

task_reward = make_task_reward()
task_reward.__doc__ = _TASK_REWARD_DOC

# Former names (deprecated): the function keeps working under them.
verifier = task_reward
make_verifier = make_task_reward
