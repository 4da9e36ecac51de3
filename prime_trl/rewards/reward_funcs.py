"""Reward functions as PRIME uses them: checked against the dataset before training, guarded while training.

Shared by `PRIMETrainer` and the Lightning `PRIMEModule`.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

import torch
from trl.trainer.utils import get_callable_name

__all__ = [
    "TRL_REWARD_KWARGS",
    "RewardFunctionError",
    "check_dataset_columns",
    "guard_reward_function",
    "reward_func_list",
    "resolve_verifier",
    "resolve_verifiers",
]

# Keyword arguments TRL itself passes to every reward function (the rest are dataset columns).
TRL_REWARD_KWARGS = {
    "prompts",
    "completions",
    "completion_ids",
    "trainer_state",
    "log_extra",
    "log_metric",
    "environments",
}


class RewardFunctionError(RuntimeError):
    """A reward function raised or returned something other than one score per completion."""


def reward_func_list(reward_funcs: Any, owner: str) -> list:
    """``reward_funcs`` as a non-empty list (one function, or a list / tuple of them); ``owner`` names the caller."""
    funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
    if not funcs:
        raise ValueError(f"{owner} needs at least one reward function: the verifier that labels completions.")
    return funcs


def resolve_verifier(reward_func_names: list[str], verifier: str | None) -> int:
    """Index of the verifier among the reward functions: ``None`` -> the first, else a name or an index."""
    if verifier is None:
        return 0
    if verifier.isdigit() and int(verifier) < len(reward_func_names):
        return int(verifier)
    if verifier in reward_func_names:
        return reward_func_names.index(verifier)
    raise ValueError(f"verifier={verifier!r} is not one of the reward functions {reward_func_names} (name or index).")


def resolve_verifiers(reward_func_names: list[str], verifier: str | None) -> list[int]:
    """Indices of the verifiers: ``None`` -> ``[0]``, else comma-separated names or indices (see `resolve_verifier`)."""
    if verifier is None:
        return [0]
    return [resolve_verifier(reward_func_names, part.strip()) for part in verifier.split(",")]


def check_dataset_columns(dataset, name: str, reward_funcs: list) -> None:
    """Fail before any work when the dataset lacks ``prompt`` or a column a reward function requires."""
    if dataset is None:
        return
    if isinstance(dataset, dict):
        for split, part in dataset.items():
            check_dataset_columns(part, f"{name}[{split!r}]", reward_funcs)
        return
    columns = getattr(dataset, "column_names", None)
    if columns is None:  # e.g. an IterableDataset without known features: checked when the first batch arrives
        return
    if "prompt" not in columns:
        raise ValueError(
            f"{name} has no 'prompt' column (columns: {columns}). PRIMETrainer needs a 'prompt' column of strings or "
            "chat messages; rename yours, e.g. dataset.rename_column('question', 'prompt'), or build the dataset "
            "with prime_trl.data."
        )
    for func in reward_funcs:
        if not callable(func) or isinstance(func, torch.nn.Module):
            continue
        for param in inspect.signature(func).parameters.values():
            required = param.default is inspect.Parameter.empty and param.kind in (
                inspect.Parameter.POSITIONAL_OR_KEYWORD,
                inspect.Parameter.KEYWORD_ONLY,
            )
            if required and param.name not in TRL_REWARD_KWARGS and param.name not in columns:
                raise ValueError(
                    f"Reward function {get_callable_name(func)!r} needs a dataset column {param.name!r}, but {name} "
                    f"has columns {columns}. Add the column (or rename an existing one to {param.name!r})."
                )


def _check_rewards(name: str, rewards: Any, num_completions: int) -> list[float | None]:
    if not isinstance(rewards, (list, tuple)) and not (isinstance(rewards, torch.Tensor) and rewards.dim() == 1):
        raise RewardFunctionError(
            f"Reward function {name!r} returned {type(rewards).__name__}; it must return a list with one float "
            f"(or None) per completion ({num_completions} here)."
        )
    rewards = rewards.tolist() if isinstance(rewards, torch.Tensor) else list(rewards)
    if len(rewards) != num_completions:
        raise RewardFunctionError(
            f"Reward function {name!r} returned {len(rewards)} rewards for {num_completions} completions; it must "
            "return exactly one reward per completion, in order."
        )
    bad = [r for r in rewards if r is not None and not isinstance(r, (int, float))]
    if bad:
        raise RewardFunctionError(f"Reward function {name!r} returned non-numeric rewards, e.g. {bad[0]!r}.")
    return rewards


def guard_reward_function(func):
    """Wrap a reward function so that a crash or a malformed return names the function and what went wrong."""
    if not callable(func) or isinstance(func, (str, torch.nn.Module)):
        return func
    name = get_callable_name(func)

    def explain(error: Exception, kwargs: dict) -> RewardFunctionError:
        columns = sorted(k for k in kwargs if k not in TRL_REWARD_KWARGS)
        return RewardFunctionError(
            f"Reward function {name!r} raised {type(error).__name__}: {error} (while scoring "
            f"{len(kwargs.get('completions', []))} completions; dataset columns passed: {columns})."
        )

    if inspect.iscoroutinefunction(func):

        async def guarded(*args, **kwargs):
            try:
                rewards = await func(*args, **kwargs)
            except RewardFunctionError:
                raise
            except Exception as error:
                raise explain(error, kwargs) from error
            return _check_rewards(name, rewards, len(kwargs["completions"]))

    else:

        def guarded(*args, **kwargs):
            try:
                rewards = func(*args, **kwargs)
            except RewardFunctionError:
                raise
            except Exception as error:
                raise explain(error, kwargs) from error
            return _check_rewards(name, rewards, len(kwargs["completions"]))

    functools.update_wrapper(guarded, func)
    guarded.__name__ = name
    return guarded
