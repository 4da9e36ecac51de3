"""Reward functions by name: what ``prime-trl train --reward_funcs`` and ``prime-trl eval --reward`` accept.

A name is a key of `REWARD_FUNCS` or a dotted import path (``my_module.my_reward``; the working directory is
importable, as with ``trl grpo``). Light: the functions are imported on first use.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable

__all__ = ["REWARD_FUNCS", "check_reward_name", "load_reward_func"]

# name -> "module:attribute"
REWARD_FUNCS = {
    "math": "prime_trl.rewards:math_reward",
    "final_answer": "prime_trl.rewards:final_answer_reward",
    "code": "prime_trl.rewards:code_reward",
    "task": "prime_trl.rewards:task_reward",
    "verifier": "prime_trl.rewards:task_reward",  # former name of "task", deprecated
    "demo": "prime_trl.demo.task:answer_reward",
}


def check_reward_name(name: str) -> None:
    """Raise a one-line ``ValueError`` unless ``name`` is a `REWARD_FUNCS` key or a dotted path (not imported)."""
    if name not in REWARD_FUNCS and "." not in name:
        raise ValueError(
            f"unknown reward function {name!r}: use one of {sorted(REWARD_FUNCS)} or a dotted import path "
            "(module.function)."
        )


def load_reward_func(name: str) -> Callable:
    """The reward function called ``name`` (a `REWARD_FUNCS` key or ``module.function``).

    Raises:
        ValueError: an unknown name, or a dotted path that does not import (one line, naming it).
    """
    check_reward_name(name)
    if name in REWARD_FUNCS:
        module_name, attribute = REWARD_FUNCS[name].split(":")
    else:
        module_name, attribute = name.rsplit(".", 1)
        if os.getcwd() not in sys.path:
            sys.path.insert(0, os.getcwd())  # as `trl grpo`: local modules of the working directory
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ValueError(f"cannot import reward function {name!r} ({module_name}.{attribute}): {error}") from error
