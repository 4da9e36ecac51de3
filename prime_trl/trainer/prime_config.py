"""`PRIMEConfig`: every PRIME knob as a `GRPOConfig` field, with the official run's defaults (docs/algorithm.md)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from trl import GRPOConfig

logger = logging.getLogger(__name__)

PRM_UPDATE_MODES = ("single", "double", "none")
PRM_LOSS_TYPES = ("ce", "dpo")
PROCESS_REWARD_NORMS = ("batch", "none")
ADVANTAGE_ESTIMATORS = ("rloo", "grpo", "reinforce")
RESERVED_ADAPTER_NAMES = ("default", "ref")
VLLM_SYNC_MODES = ("auto", "merge", "lora")


@dataclass
class PRIMEConfig(GRPOConfig):
    r"""Configuration for [`PRIMETrainer`]: TRL's `GRPOConfig` plus PRIME's implicit-PRM and advantage settings.

    Defaults follow the official PRIME run (Cui et al., 2025) adapted to LoRA: the policy and PRM learning rates
    are about 10x the full fine-tune ones, since LoRA needs it. Fields inherited from `GRPOConfig` whose defaults
    change here: `num_generations=4` (K of the paper), `loss_type="grpo"` (per-sequence token mean, as the official
    code), `learning_rate=1e-5` (LoRA policy), `disable_dropout=True` (so PRM and reference log-probs are
    deterministic and exactly equal at step 0).
    """

    # ----- inherited fields with PRIME defaults -------------------------------------------------------------
    num_generations: int | None = field(
        default=4,
        metadata={"help": "Completions sampled per prompt (K). PRIME uses 4; leave-one-out estimators need >= 2."},
    )
    loss_type: str = field(
        default="grpo",
        metadata={
            "help": "Policy-loss aggregation of TRL (grpo, bnpo, dr_grpo, dapo, ...). PRIME's official code "
            "averages tokens per sequence, then sequences, which is TRL's `grpo`."
        },
    )
    learning_rate: float = field(
        default=1e-5,
        metadata={
            "help": "Policy learning rate. PRIME's full fine-tune used 5e-7; a LoRA policy needs roughly 10-20x more."
        },
    )
    disable_dropout: bool = field(
        default=True,
        metadata={
            "help": "Disable dropout in the model. On by default for PRIME, so that PRM and reference log-probs are "
            "deterministic and the implicit reward is exactly zero at step 0."
        },
    )

    # ----- implicit PRM -----------------------------------------------------------------------------------------
    prime_beta: float = field(
        default=0.05,
        metadata={"help": "beta of the implicit reward r = beta * log(pi_prm / pi_ref) (Eq. 3). Must be > 0."},
    )
    prm_update: str = field(
        default="single",
        metadata={
            "help": "Online PRM update: 'single' (paper: rewards come from the same forward that trains the PRM), "
            "'double' (update, then a fresh forward gives the rewards; the veRL recipe), or 'none' (frozen PRM)."
        },
    )
    prm_loss_type: str = field(
        default="ce",
        metadata={"help": "PRM loss: 'ce' (cross-entropy on outcome labels, Eq. 4) or 'dpo' (pairwise, veRL)."},
    )
    prm_learning_rate: float = field(
        default=1e-5,
        metadata={"help": "AdamW learning rate of the PRM adapter (official full fine-tune: 1e-6; LoRA ~10x)."},
    )
    prm_weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay of the PRM adapter."})
    prm_max_grad_norm: float = field(default=10.0, metadata={"help": "Gradient-norm clip of the PRM update."})
    prm_lr_scheduler_type: str = field(
        default="constant",
        metadata={"help": "Learning-rate schedule of the PRM optimizer (any transformers scheduler name)."},
    )
    prm_warmup_steps: int = field(default=0, metadata={"help": "Warm-up steps of the PRM learning-rate schedule."})
    prm_num_mini_batches: int = field(
        default=1,
        metadata={
            "help": "PRM optimizer steps per generation batch: the kept rows of each process are split into this "
            "many mini-batches, each scored and then updated in order."
        },
    )
    prm_micro_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Rows per PRM forward/backward (gradient accumulation inside a PRM mini-batch). Defaults to "
            "`per_device_train_batch_size`, so the PRM update never needs more memory than a policy micro-step."
        },
    )
    prm_adapter_name: str = field(
        default="prm",
        metadata={"help": "Name of the PRM LoRA adapter on the shared base. Must not be 'default' or 'ref'."},
    )
    prm_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Saved PRM adapter to start from. Default: a zero-initialised adapter (PRM == reference)."},
    )
    prm_lora_r: int | None = field(
        default=None, metadata={"help": "LoRA rank of a new PRM adapter. Default: the policy adapter's rank (or 16)."}
    )
    prm_lora_alpha: int | None = field(
        default=None, metadata={"help": "LoRA alpha of a new PRM adapter. Default: the policy adapter's alpha (or 32)."}
    )

    # ----- advantages ------------------------------------------------------------------------------------------
    verifier: str | None = field(
        default=None,
        metadata={
            "help": "Name (or index) of the reward function whose scores in [0, 1] are the PRM's outcome labels and "
            "drive the accuracy filter. Default: the first reward function."
        },
    )
    advantage_estimator: str = field(
        default="rloo",
        metadata={
            "help": "How process and outcome rewards become advantages: 'rloo' (official PRIME), 'grpo' "
            "(GRPO-PRIME, Eq. 7) or 'reinforce' (REINFORCE-PRIME, Eq. 8)."
        },
    )
    process_reward_coef: float = field(
        default=1.0, metadata={"help": "Weight of the implicit process-reward returns. 0 gives outcome-only RL."}
    )
    outcome_reward_coef: float = field(default=1.0, metadata={"help": "Weight of the outcome-reward returns."})
    process_reward_norm: str = field(
        default="batch",
        metadata={"help": "Process-reward normalisation: 'batch' (divide by the largest |return|) or 'none'."},
    )
    gamma: float = field(default=1.0, metadata={"help": "Discount of the returns over tokens."})
    whiten_advantages: bool = field(
        default=True,
        metadata={"help": "Whiten advantages over all valid tokens of the global batch (official PRIME code)."},
    )
    accuracy_filter: bool = field(
        default=True,
        metadata={
            "help": "Keep only prompts whose group accuracy lies in [accuracy_lower_bound, accuracy_upper_bound]; "
            "the others are left out of the PRM update and get zero advantage."
        },
    )
    accuracy_lower_bound: float = field(default=0.2, metadata={"help": "Lower bound (inclusive) of the filter."})
    accuracy_upper_bound: float = field(default=0.8, metadata={"help": "Upper bound (inclusive) of the filter."})
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
            "the last completed step before re-raising, so no finished work is lost."
        },
    )

    def __post_init__(self):
        validate_prime_settings(self)
        if self.vllm_sync_mode not in VLLM_SYNC_MODES:
            raise ValueError(
                f"vllm_sync_mode={self.vllm_sync_mode!r} is not supported; choose one of {VLLM_SYNC_MODES}."
            )
        super().__post_init__()
        if self.process_reward_coef == 0 and self.prm_update != "none":
            logger.info(
                "process_reward_coef=0: the PRM is still trained (prm_update=%r) and logged but does not affect the "
                "policy. Set prm_update='none' for plain outcome-only RLOO without the PRM cost.",
                self.prm_update,
            )


def validate_prime_settings(settings) -> None:
    """Check PRIME's own fields on a `PRIMEConfig` (or any object with the same-named fields, e.g. the
    Lightning module's config); raises ValueError naming the field and the fix."""

    def one_of(name: str, allowed: tuple[str, ...]) -> None:
        value = getattr(settings, name)
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, allowed))}.")

    one_of("prm_update", PRM_UPDATE_MODES)
    one_of("prm_loss_type", PRM_LOSS_TYPES)
    one_of("process_reward_norm", PROCESS_REWARD_NORMS)
    one_of("advantage_estimator", ADVANTAGE_ESTIMATORS)
    if settings.prime_beta <= 0:
        raise ValueError(f"prime_beta={settings.prime_beta} must be > 0 (PRIME uses 0.05).")
    if (
        settings.num_generations is not None
        and settings.num_generations < 2
        and settings.advantage_estimator != "reinforce"
    ):
        raise ValueError(
            f"num_generations={settings.num_generations} but advantage_estimator={settings.advantage_estimator!r} uses a "
            "leave-one-out / group baseline, which needs at least 2 completions per prompt. Set "
            "num_generations >= 2 (PRIME uses 4)."
        )
    if settings.prm_adapter_name in RESERVED_ADAPTER_NAMES:
        raise ValueError(
            f"prm_adapter_name={settings.prm_adapter_name!r} is reserved: 'default' is the policy adapter and TRL reads "
            "an adapter named 'ref' as its KL reference. Use another name, e.g. 'prm'."
        )
    if not settings.prm_adapter_name.isidentifier():
        raise ValueError(f"prm_adapter_name={settings.prm_adapter_name!r} must be a Python identifier, e.g. 'prm'.")
    if not 0.0 <= settings.accuracy_lower_bound <= settings.accuracy_upper_bound <= 1.0:
        raise ValueError(
            "Need 0 <= accuracy_lower_bound <= accuracy_upper_bound <= 1, got "
            f"[{settings.accuracy_lower_bound}, {settings.accuracy_upper_bound}]."
        )
    if settings.prm_num_mini_batches < 1:
        raise ValueError(f"prm_num_mini_batches={settings.prm_num_mini_batches} must be >= 1.")
    if settings.prm_micro_batch_size is not None and settings.prm_micro_batch_size < 1:
        raise ValueError(f"prm_micro_batch_size={settings.prm_micro_batch_size} must be >= 1 (or None).")
    if not 0.0 < settings.gamma <= 1.0:
        raise ValueError(f"gamma={settings.gamma} must be in (0, 1].")
    if settings.process_reward_coef < 0 or settings.outcome_reward_coef < 0:
        raise ValueError("process_reward_coef and outcome_reward_coef must be >= 0.")
    if settings.process_reward_coef == 0 and settings.outcome_reward_coef == 0:
        raise ValueError("process_reward_coef and outcome_reward_coef are both 0: nothing would be learned.")
