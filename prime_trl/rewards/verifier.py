"""The combined verifier: routes each row to the math or the code verifier by its ``task`` column."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from prime_trl.rewards._common import check_column
from prime_trl.rewards.code import code_reward
from prime_trl.rewards.math import math_reward

__all__ = ["TASKS", "make_verifier", "verifier"]

TASKS = ("math", "code")


def make_verifier(
    math_fn: Callable[..., list[float]] | None = None, code_fn: Callable[..., list[float]] | None = None
) -> Callable[..., list[float]]:
    """A `verifier` that uses the given math and code reward functions (defaults: `math_reward`, `code_reward`),
    e.g. ``make_verifier(code_fn=make_code_reward(limits=SandboxLimits(timeout=5)))``."""

    def verifier(completions: list, task: list | None = None, **kwargs: Any) -> list[float]:
        return _route(completions, task, math_fn or math_reward, code_fn or code_reward, kwargs)

    verifier.__doc__ = _VERIFIER_DOC
    return verifier


def _route(completions: list, task: list | None, math_fn, code_fn, kwargs: dict) -> list[float]:
    n = len(completions)
    tasks = check_column("task", task, n, reward="verifier", hint='"math" or "code" per row')
    unknown = sorted({str(t) for t in tasks if t not in TASKS})
    if unknown:
        raise ValueError(f"verifier: unknown task value(s) {unknown}; each row's 'task' must be one of {list(TASKS)}")
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
            raise RuntimeError(f"verifier: the {name} reward returned {len(sub_scores)} scores for {len(rows)} rows")
        for i, s in zip(rows, sub_scores):
            scores[i] = float(s)
    return scores


def _is_column(value: Any, n: int) -> bool:
    """A per-row column: a list (or other sequence, e.g. a `datasets` Column) with one value per completion."""
    if isinstance(value, (str, bytes, dict)) or not hasattr(value, "__getitem__") or not hasattr(value, "__len__"):
        return False
    return len(value) == n


_VERIFIER_DOC = """TRL reward function for data sets that mix math and code rows, as PRIME's did.

    Each row's ``task`` column ("math" or "code") picks the verifier: `math_reward` (needs an ``answer`` column)
    or `code_reward` (needs ``tests``; uses ``code_prefix``/``entry_point`` if present). Columns a row does not
    use may be None. Returns one float per completion.
    """

verifier = make_verifier()
verifier.__doc__ = _VERIFIER_DOC
