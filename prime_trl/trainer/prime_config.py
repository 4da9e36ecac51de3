"""`PRIMEConfig`: TRL's `GRPOConfig` plus PRIME's knobs, which are declared once in `prime_trl.algo.settings`."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from trl import GRPOConfig

# Re-exported: the choices and the checks live with the declaration of PRIME's settings.
from prime_trl.algo.settings import (  # noqa: F401
    ADVANTAGE_ESTIMATORS,
    PRM_LOSS_TYPES,
    PRM_UPDATE_MODES,
    PROCESS_REWARD_NORMS,
    RESERVED_ADAPTER_NAMES,
    PRIMESettings,
    validate_prime_settings,
)

logger = logging.getLogger(__name__)

VLLM_SYNC_MODES = ("auto", "merge", "lora")


@dataclass
class PRIMEConfig(PRIMESettings, GRPOConfig):
    r"""Configuration for [`PRIMETrainer`]: TRL's `GRPOConfig` plus PRIME's implicit-PRM and advantage settings.

    PRIME's fields (and PRIME's defaults of `num_generations=4`, `learning_rate=1e-5`, `disable_dropout=True`) come
    from `prime_trl.algo.settings.PRIMESettings`, the one declaration the Lightning module and the demo share.
    Declared here: what only TRL has, i.e. `loss_type="grpo"` (per-sequence token mean, as the official code), the
    vLLM weight sync and the rescue checkpoint.
    """

    # ----- inherited GRPOConfig field with PRIME's default (TRL only: the Lightning module always uses grpo) -------
    loss_type: str = field(
        default="grpo",
        metadata={
            "help": "Policy-loss aggregation of TRL (grpo, bnpo, dr_grpo, dapo, ...). PRIME's official code "
            "averages tokens per sequence, then sequences, which is TRL's `grpo`."
        },
    )

    # ----- TRL-only PRIME fields --------------------------------------------------------------------------------
    prm_pretrain_batches: int = field(
        default=0,
        metadata={
            "help": "PRM warm-up before the policy moves: at the first training step, sample this many extra "
            "generation batches of that step's prompts from the initial policy and train the PRM on them (the policy "
            "never trains on these samples), so the first process rewards come from a PRM that has seen data. "
            "0: off (the paper)."
        },
    )
    vllm_sync_mode: str = field(
        default="auto",
        metadata={
            "help": "How the policy reaches vLLM (use_vllm=True): 'merge' (TRL: merge the policy adapter into the base "
            "and push full weights), 'lora' (push the policy adapter as a vLLM LoRA adapter; colocate mode only; "
            "required for 4-bit bases, where merging loses the update), or 'auto' (lora on a quantized base, "
            "else merge). The PRM adapter never reaches vLLM."
        },
    )
    save_checkpoint_on_error: bool = field(
        default=True,
        metadata={
            "help": "When training stops on an exception (or Ctrl-C) in a single process, write a checkpoint of "
            "the last completed step before re-raising, so no finished work is lost. An existing checkpoint is "
            "never rewritten; a PRM update made for the unfinished step is rolled back first (this keeps a CPU copy "
            "of the PRM adapter and its optimizer state from before each update)."
        },
    )
    log_token_rewards: bool = field(
        default=False,
        metadata={
            "help": "With log_completions=True, also log each completion's per-token implicit rewards: a "
            "'token_rewards' column in the completions table / parquet, and a coloured token heat map "
            "(completions/token_rewards_<step>.html, and to Weights & Biases as HTML). Off by default: it moves "
            "every token's reward to the main process at each step."
        },
    )

    def __post_init__(self):
        if self.vllm_sync_mode not in VLLM_SYNC_MODES:
            raise ValueError(
                f"vllm_sync_mode={self.vllm_sync_mode!r} is not supported; choose one of {VLLM_SYNC_MODES}."
            )
        if self.fp16:  # before GRPOConfig's own checks, which on a CPU machine would complain about the device
            raise ValueError(
                "fp16=True is not supported: the PRM adapter is updated by its own optimizer, outside the Trainer's "
                "fp16 loss scaling, so its float16 gradients would underflow. Use bf16=True, or float32 (both off)."
            )
        if self.prm_pretrain_batches < 0:
            raise ValueError(
                f"prm_pretrain_batches={self.prm_pretrain_batches} must be >= 0 (0 turns the warm-up off)."
            )
        super().__post_init__()  # PRIMESettings: validate_prime_settings, then GRPOConfig's own checks
        if self.process_reward_coef == 0 and self.prm_update != "none":
            logger.info(
                "process_reward_coef=0: the PRM is still trained (prm_update=%r) and logged but does not affect the "
                "policy. Set prm_update='none' for plain outcome-only RLOO without the PRM cost.",
                self.prm_update,
            )
