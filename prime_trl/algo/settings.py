"""PRIME's knobs, declared once: `PRIMESettings` (names, defaults, help texts) and `validate_prime_settings`.

Every front end takes its PRIME fields from here rather than declaring them again:

- `prime_trl.trainer.prime_config.PRIMEConfig` (TRL) inherits `PRIMESettings` next to `GRPOConfig`; the fields
  that `GRPOConfig` also has (``num_generations``, ``learning_rate``, ``disable_dropout``) take PRIME's defaults;
- `prime_trl.lightning.module.PRIMEModuleConfig` inherits `PRIMESettings`;
- the demo's `prime_trl.demo.run.RLSettings` declares the few knobs it exposes with `prime_field`, which copies the
  declaration here (help text and default; a different default must say why).

A new PRIME knob is one field below (plus its check in `validate_prime_settings`); the TRL and Lightning configs
get it by inheritance and ``tests/test_settings.py`` checks that every front end agrees with this declaration.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

PRM_UPDATE_MODES = ("single", "double", "none")
PRM_LOSS_TYPES = ("ce", "dpo")
PROCESS_REWARD_NORMS = ("batch", "none")
ADVANTAGE_ESTIMATORS = ("rloo", "grpo", "reinforce")
RESERVED_ADAPTER_NAMES = ("default", "ref")
OUTCOME_LABELS = ("auto", "score", "threshold", "group_mean")


@dataclass
class PRIMESettings:
    """PRIME's settings, shared by the TRL config, the Lightning config and the demo (see the module docstring).

    Defaults follow the official PRIME run (Cui et al., 2025; docs/algorithm.md) adapted to LoRA: the policy and PRM
    learning rates are about 10x the full fine-tune ones, since LoRA needs it.
    """

    # ----- fields GRPOConfig has too, with PRIME's defaults -----------------------------------------------------
    num_generations: int | None = field(
        default=4,
        metadata={"help": "Completions sampled per prompt (K). PRIME uses 4; leave-one-out estimators need >= 2."},
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
        metadata={
            "help": "beta of the implicit reward r = beta * log(pi_prm / pi_ref) (docs/algorithm.md eq. 1). Must be > 0."
        },
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
        metadata={"help": "PRM loss: 'ce' (cross-entropy on outcome labels, eq. 3) or 'dpo' (pairwise, veRL, eq. 3b)."},
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
    share_prompt_prefix: bool = field(
        default=True,
        metadata={
            "help": "Run each prompt once per micro-batch and let the K completions of its group reuse its key/value "
            "states, in the reference and PRM passes and in the policy's log-prob passes; log-probs agree with the "
            "plain forward to float rounding. Applied per micro-batch where rows share a prompt and it saves at "
            "least a quarter of the tokens; skipped, with the reason logged once, for models or set-ups it does not "
            "support (sliding-window attention, FSDP / ZeRO-3, reentrant gradient checkpointing on a gradient pass)."
        },
    )

    # ----- advantages ------------------------------------------------------------------------------------------
    verifier: str | None = field(
        default=None,
        metadata={
            "help": "Name (or index) of the reward function whose scores become the PRM's outcome labels (see "
            "`outcome_label`) and drive the accuracy filter; several comma-separated names for TRL's multi-task "
            "pattern (one reward function per task, None on the other task's rows): a row's score is that of the "
            "first one that scored it. A row no verifier scored is left out of the PRM loss, the filter and the "
            "baselines, and gets zero advantage. Default: the first reward function."
        },
    )
    outcome_label: str = field(
        default="auto",
        metadata={
            "help": "How a verifier score becomes the PRM's outcome label (and the accuracy filter's input): 'score' "
            "(the score clamped to [0, 1]; soft labels allowed), 'threshold' (1 if score > outcome_label_threshold, "
            "else 0), 'group_mean' (1 if the score is above its group's mean, else 0: for length rewards, "
            "reward-model logits, -1/+1), or 'auto' ('score' while every score lies in [0, 1], else 'group_mean'; "
            "a training run keeps 'group_mean' for the rest of the run from the first such batch, with a warning; "
            "PRIMETrainer uses 'group_mean' from the start when the verifier is a reward model, whose scores are logits)."
        },
    )
    outcome_label_threshold: float = field(
        default=0.5,
        metadata={"help": "Threshold of outcome_label='threshold' (e.g. 0.0 for -1/+1 rewards)."},
    )
    advantage_estimator: str = field(
        default="rloo",
        metadata={
            "help": "How process and outcome rewards become advantages: 'rloo' (official PRIME, eq. 6-8), 'grpo' "
            "(GRPO-PRIME, eq. 12) or 'reinforce' (REINFORCE-PRIME, eq. 13)."
        },
    )
    process_reward_coef: float = field(
        default=1.0, metadata={"help": "Weight of the implicit process-reward returns. 0 gives outcome-only RL."}
    )
    outcome_reward_coef: float = field(default=1.0, metadata={"help": "Weight of the outcome-reward returns."})
    process_reward_norm: str = field(
        default="batch",
        metadata={"help": "Process-reward normalisation: 'batch' (divide by the largest |return|, eq. 5) or 'none'."},
    )
    process_reward_accuracy_gate: float | None = field(
        default=None,
        metadata={
            "help": "Scale process_reward_coef by clamp((a - 0.5) / (gate - 0.5), 0, 1), where a is a running mean "
            "(~10 batches) of the PRM's pairwise accuracy on the kept training rows: full weight while the PRM ranks "
            "at least this fraction of pairs right, none at chance or below (a PRM the policy has learned to exploit "
            "stops steering it). A value in (0.5, 1], e.g. 0.7; None: off (the paper)."
        },
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

    def __post_init__(self) -> None:
        validate_prime_settings(self)
        parent = getattr(super(), "__post_init__", None)  # GRPOConfig's, when mixed into PRIMEConfig
        if parent is not None:
            parent()

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> PRIMESettings:
        """The same-named fields of ``config`` (a `PRIMEConfig`, e.g. parsed from a prime-trl YAML, or any object
        with some of them; the others keep their defaults), then ``overrides``."""
        values = {f.name: getattr(config, f.name) for f in fields(cls) if hasattr(config, f.name)}
        return cls(**{**values, **overrides})

    @property
    def uses_prm(self) -> bool:
        """Outcome-only RLOO (process_reward_coef=0 with a frozen PRM) needs no PRM forward at all."""
        return self.process_reward_coef > 0 or self.prm_update != "none"


def prime_field(name: str, default: Any = MISSING, *, why: str | None = None) -> Any:
    """A dataclass field declared as `PRIMESettings` declares ``name`` (same help text and default), for a settings
    class that exposes a few PRIME knobs without inheriting all of them (the demo's `RLSettings`).

    A different ``default`` must come with ``why`` (kept in the field's metadata, and accepted by the agreement test).
    """
    declared = {f.name: f for f in fields(PRIMESettings)}[name]
    metadata = dict(declared.metadata)
    if default is MISSING:
        default = declared.default
    elif default != declared.default:
        if not why:
            raise ValueError(f"prime_field({name!r}) changes the default to {default!r}: say why (why=...).")
        metadata["default_differs_because"] = why
    return field(default=default, metadata=metadata)


def validate_prime_settings(settings: Any) -> None:
    """Check PRIME's own fields on a `PRIMESettings` (or any object with the same-named fields); raises ValueError
    naming the field and the fix."""

    def one_of(name: str, allowed: tuple[str, ...]) -> None:
        value = getattr(settings, name)
        if value not in allowed:
            raise ValueError(f"{name}={value!r} is not supported; choose one of {', '.join(map(repr, allowed))}.")

    one_of("prm_update", PRM_UPDATE_MODES)
    one_of("prm_loss_type", PRM_LOSS_TYPES)
    one_of("process_reward_norm", PROCESS_REWARD_NORMS)
    one_of("advantage_estimator", ADVANTAGE_ESTIMATORS)
    one_of("outcome_label", OUTCOME_LABELS)
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
    gate = settings.process_reward_accuracy_gate
    if gate is not None and not 0.5 < gate <= 1.0:
        raise ValueError(
            f"process_reward_accuracy_gate={gate} must lie in (0.5, 1] (full process reward at that PRM accuracy, "
            "none at chance), e.g. 0.7; or None to turn the gate off."
        )
    if not 0.0 < settings.gamma <= 1.0:
        raise ValueError(f"gamma={settings.gamma} must be in (0, 1].")
    if settings.process_reward_coef < 0 or settings.outcome_reward_coef < 0:
        raise ValueError("process_reward_coef and outcome_reward_coef must be >= 0.")
    if settings.process_reward_coef == 0 and settings.outcome_reward_coef == 0:
        raise ValueError("process_reward_coef and outcome_reward_coef are both 0: nothing would be learned.")
