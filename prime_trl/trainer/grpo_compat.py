"""`GRPOTrainer`'s calling conventions on `PRIMETrainer`: argument checks and config conversion.

`PRIMETrainer(model, prm, args)` keeps the PRM as its second positional argument, where `GRPOTrainer` takes the
reward functions; a GRPO script that changes only the class name must get a one-line error there, and a
`GRPOConfig` (or plain `TrainingArguments`) passed as ``args`` is converted to a `PRIMEConfig`, as TRL's own
trainers convert a parent config (SFTTrainer with `TrainingArguments`).
"""

from __future__ import annotations

import logging
import os
from dataclasses import MISSING, fields
from pathlib import Path

import torch
from trl import GRPOConfig

from prime_trl.trainer.prime_config import PRIMEConfig

logger = logging.getLogger(__name__)

# TRL's message for the same mistake, so that code (and users) catching it keep working.
NO_REWARD_SOURCE = (
    "No reward source provided. Pass `reward_funcs`, or an `environment_factory` whose environment defines a "
    "`get_reward` method."
)


def check_reward_source(reward_funcs, environment_factory) -> None:
    """Raise TRL's ``ValueError`` when there is no reward function and no environment that could give one."""
    if not reward_funcs and environment_factory is None:
        raise ValueError(NO_REWARD_SOURCE)


def check_prm_argument(prm) -> None:
    """Refuse reward functions or reward models in the PRM slot (`GRPOTrainer`'s second positional argument).

    A valid ``prm`` is ``None``, a `peft.LoraConfig`, or the directory of a saved PRM adapter.
    """
    from peft import LoraConfig

    if prm is None or isinstance(prm, LoraConfig):
        return
    hint = (
        "PRIMETrainer(model, prm, args) takes the implicit PRM as its second argument, where GRPOTrainer takes "
        "reward functions: pass them as reward_funcs=..., e.g. PRIMETrainer(model, args=args, reward_funcs=[...])."
    )
    if isinstance(prm, (str, os.PathLike)):
        if not (Path(prm) / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"prm={str(prm)!r} is not a saved PEFT adapter directory (no adapter_config.json). Pass the `prm/` "
                f"folder of a prime-trl checkpoint or output directory. {hint}"
            )
        return
    if callable(prm) or isinstance(prm, (list, tuple, torch.nn.Module)):
        name = getattr(prm, "__name__", type(prm).__name__)
        raise TypeError(f"prm got a reward function or reward model ({name}), not a PRM. {hint}")
    raise TypeError(
        f"prm must be None, a peft.LoraConfig or a saved PRM adapter directory, got {type(prm).__name__}. {hint}"
    )


def _prime_only_fields() -> dict[str, object]:
    """PRIMEConfig's fields that `GRPOConfig` lacks or defaults differently, with PRIMEConfig's defaults."""
    grpo_defaults = {f.name: f.default for f in fields(GRPOConfig) if f.init}
    return {
        f.name: f.default
        for f in fields(PRIMEConfig)
        if f.init and f.default is not MISSING and grpo_defaults.get(f.name, MISSING) != f.default
    }


def to_prime_config(args) -> PRIMEConfig:
    """Convert a `GRPOConfig` or `TrainingArguments` to a `PRIMEConfig`, keeping every value it sets.

    Fields the source class does not have (PRIME's own, and GRPO's for plain `TrainingArguments`) take
    PRIMEConfig's defaults; one notice lists the PRIME defaults used and the source's values that differ from
    PRIMEConfig's defaults.
    """
    values = args.to_dict()
    values["hub_token"] = args.hub_token  # to_dict hides the token
    values.pop("push_to_hub_token", None)
    if values.get("steps_per_generation") is not None:
        # GRPOConfig derives one from the other; passing both back is refused by its __post_init__.
        values["generation_batch_size"] = None
    prime_fields = _prime_only_fields()
    init_fields = {f.name for f in fields(PRIMEConfig) if f.init}
    prime_args = PRIMEConfig(**{key: value for key, value in values.items() if key in init_fields})
    used = [f"{name}={default!r}" for name, default in prime_fields.items() if name not in values]
    kept = [
        f"{name}={values[name]!r} (PRIMEConfig default {default!r})"
        for name, default in prime_fields.items()
        if name in values and values[name] != default
    ]
    logger.info(
        "args is a %s; converted to PRIMEConfig keeping all its values. PRIME defaults used: %s.%s",
        type(args).__name__,
        ", ".join(used) or "none",
        f" Kept from {type(args).__name__}: {', '.join(kept)}." if kept else "",
    )
    return prime_args
