"""PRIME on PyTorch Lightning: `PRIMEModule`, `PRIMEModuleConfig` and `PRIMEDataModule`.

The same algorithm as `PRIMETrainer` (TRL), for training code built on Lightning (loggers, callbacks,
``ModelCheckpoint``, strategies). The policy is the LoRA adapter ``default``, the implicit PRM a second LoRA adapter
on the same frozen base, the reference that base with adapters disabled. One Lightning training step is one PRIME
step (docs/algorithm.md section 2) on this process's ``B_local = prompts x K`` rows:

1. `PRIMEModule.generate`: ``K`` completions per prompt with the policy adapter active (rows of a group contiguous);
2. `PRIMEModule.score_completions`: the reward functions, gathered over processes -> ``[B_global, n_funcs]``;
3-6. `PRIMEModule.prime_step`: accuracy filter, reference / PRM log-probs, the online PRM update and the
   per-token advantages. It calls `prime_trl.algo.step.prime_step`, the very function `PRIMETrainer` calls,
   with an `ImplicitPRM` built from the same `prime_trl.algo.prm` pieces, so both paths compute the same tensors;
4. `PRIMEModule.policy_update`: TRL's clipped surrogate (``loss_type="grpo"``) and one policy optimizer step.

Optimisation is manual with two optimizers: the policy adapter's AdamW, stepped here (Lightning counts its steps, so
``global_step`` / ``max_steps`` count PRIME steps), and the PRM adapter's AdamW, owned and stepped by `ImplicitPRM`
(which sums the PRM gradients over processes itself: DDP only synchronises parameters that required grad when it
wrapped the module, and the PRM adapter was frozen then).

Checkpoints hold both adapters (not the frozen base), both optimizers and schedulers (Lightning's own
``optimizer_states`` / ``lr_schedulers``), each process's random stream and, with `PRIMEDataModule`, the position in
the epoch, so ``Trainer.fit(..., ckpt_path=...)`` continues exactly as an uninterrupted run.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch.utils.data import DataLoader, DistributedSampler
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig, PreTrainedModel, get_scheduler
from trl import GRPOConfig
from trl.data_utils import is_conversational
from trl.trainer.utils import add_fused_lm_head, get_callable_name

try:
    import lightning.pytorch as pl
    from lightning.pytorch.utilities.warnings import PossibleUserWarning
except ImportError as error:  # pragma: no cover - exercised only without the extra installed
    raise ImportError(
        "prime_trl.lightning.module needs PyTorch Lightning: pip install 'prime-trl[lightning]' (or pip install lightning)."
    ) from error

import prime_trl.algo.core as core
import prime_trl.algo.distributed as distributed
import prime_trl.algo.prefix as prefix
from prime_trl.algo import step as algo_step
from prime_trl.algo.prm import (
    POLICY_ADAPTER,
    PRM_DIR_NAME,
    CompletionBatch,
    ImplicitPRM,
    adapter_parameters,
    attach_prm_adapter,
    check_lora_config,
    check_policy_adapter,
    completion_log_probs,
    fused_log_probs_at_temperature_one,
    make_implicit_prm,
    save_adapter,
)
from prime_trl.algo.rollout import cut_at_first_eos, left_padded_prompts, pad_and_eos_token_ids, prompt_token_ids
from prime_trl.algo.settings import PRIMESettings
from prime_trl.algo.step import (
    PRIMEState,
    PRIMEStep,
    carried_state,
    check_verifier_scores,
    restore_carried_state,
    verifier_scores_and_outcome,
)
from prime_trl.models import drop_gguf_marker, resolve_model

# The reward-function guard and the dataset check are PRIMETrainer's, shared rather than copied.
from prime_trl.rewards.reward_funcs import (
    check_dataset_columns,
    guard_reward_function,
    resolve_verifiers,
    reward_func_list,
)
from prime_trl.trainer.prime_config import PRIMEConfig

logger = logging.getLogger(__name__)

__all__ = ["PRIMEDataModule", "PRIMEModule", "PRIMEModuleConfig"]


# --------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------


def _grpo_field(name: str, **changes: Any) -> Any:
    """A field declared as `GRPOConfig` declares ``name`` (default and help text), so that the Lightning config mirrors
    TRL's fields without restating them; ``changes`` override, e.g. a different ``default``."""
    declared = {f.name: f for f in fields(GRPOConfig)}[name]
    values = {"default": declared.default, "metadata": dict(declared.metadata), **changes}
    return field(**values)


@dataclass
class PRIMEModuleConfig(PRIMESettings):
    """`PRIMEModule`'s settings: PRIME's knobs (inherited from `PRIMESettings`, the declaration `PRIMEConfig` shares)
    plus the TRL / Transformers fields a Lightning step needs, each declared as `GRPOConfig` declares it (same name,
    meaning, default and help). `from_prime_config` copies them from a `PRIMEConfig`.

    How the TRL batch fields map: a Lightning step generates for the prompts of one `PRIMEDataModule` batch
    (``prompts_per_device`` per process) ``num_generations`` completions each, i.e. TRL's generation batch; the policy
    then takes one optimizer step per pass over those rows (``num_iterations`` passes), accumulating gradients over
    micro-batches of ``per_device_train_batch_size`` rows, as TRL does with ``gradient_accumulation_steps ==
    steps_per_generation``. Not mirrored: ``loss_type`` (always ``"grpo"``), the KL term (``beta``; always 0),
    vLLM, reward models given as names or modules (pass Python reward functions), evaluation, and the Trainer-level
    fields that Lightning's own ``Trainer`` arguments replace (``max_steps``, ``precision``, logging, saving).
    """

    # ----- generation -------------------------------------------------------------------------------------------
    max_completion_length: int = _grpo_field("max_completion_length")
    temperature: float = _grpo_field("temperature")
    top_p: float = _grpo_field("top_p")
    top_k: int = _grpo_field("top_k")
    chat_template_kwargs: dict | None = _grpo_field("chat_template_kwargs")
    # ----- policy optimizer (the learning rate is PRIME's, inherited) -------------------------------------------
    weight_decay: float = _grpo_field("weight_decay")
    adam_beta1: float = _grpo_field("adam_beta1")
    adam_beta2: float = _grpo_field("adam_beta2")
    adam_epsilon: float = _grpo_field("adam_epsilon")
    max_grad_norm: float = _grpo_field("max_grad_norm")
    lr_scheduler_type: str = _grpo_field("lr_scheduler_type")
    warmup_steps: int = _grpo_field("warmup_steps")
    epsilon: float = _grpo_field("epsilon")
    epsilon_high: float | None = _grpo_field("epsilon_high")
    per_device_train_batch_size: int = _grpo_field("per_device_train_batch_size")  # rows per policy forward/backward
    num_iterations: int = _grpo_field("num_iterations")
    # GRPOConfig's default is True; off here, as most Lightning runs start small.
    gradient_checkpointing: bool = _grpo_field("gradient_checkpointing", default=False)
    seed: int = _grpo_field("seed")  # seeds this module's own random stream (sampling), offset by the process rank
    # ----- rewards ----------------------------------------------------------------------------------------------
    reward_weights: list[float] | None = _grpo_field("reward_weights")

    def __post_init__(self) -> None:
        super().__post_init__()  # validate_prime_settings: both paths reject the same settings alike
        if self.num_iterations < 1 or self.per_device_train_batch_size < 1:
            raise ValueError("num_iterations and per_device_train_batch_size must be >= 1.")
        if self.temperature <= 0:
            raise ValueError(f"temperature={self.temperature} must be > 0 (PRIME samples at 1.0).")

    @classmethod
    def from_prime_config(cls, config: PRIMEConfig, **overrides) -> PRIMEModuleConfig:
        """The same-named fields of a `PRIMEConfig` (e.g. one parsed from a prime-trl YAML), then ``overrides``."""
        return cls.from_config(config, **overrides)


# --------------------------------------------------------------------------------------------------------------
# The module
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Rollout:
    """One step's completions on this process: ``B_local`` rows, group ``g`` in rows ``g*K .. g*K+K-1``."""

    batch: CompletionBatch
    prompts: list  # [B_local] the prompt of each row (string or chat messages)
    completions: list  # [B_local] decoded completions (string, or one assistant message for chat prompts)
    completion_ids: list[list[int]]  # [B_local] completion tokens up to and including the first EOS


class PRIMEModule(pl.LightningModule):
    """PRIME (Cui et al., 2025, arXiv:2502.01456) as a `LightningModule`; train it with ``lightning.Trainer.fit``.

    Args:
        model: hub id or local path, a `PreTrainedModel` (wrapped with ``peft_config``), or a `PeftModel` whose policy
            adapter is named ``default``. The policy must be LoRA.
        reward_funcs: TRL-style reward functions ``f(prompts, completions, completion_ids, **columns) -> list[float |
            None]``. The verifier (``config.verifier``, default the first) gives the PRM's labels in [0, 1] and drives
            the accuracy filter; the weighted sum of all of them (``config.reward_weights``) is the outcome reward.
        config: `PRIMEModuleConfig` (or build one with `PRIMEModuleConfig.from_prime_config`).
        peft_config: the policy's `LoraConfig` (required unless ``model`` is a `PeftModel`).
        prm: ``None`` (a zero-initialised adapter with the policy's LoRA settings: PRM == reference at step 0), a
            `LoraConfig`, or the directory of a saved PRM adapter (e.g. ``<PRIMETrainer output>/prm``).
        tokenizer: defaults to the model's.
        model_init_kwargs: passed to ``AutoModelForCausalLM.from_pretrained`` when ``model`` is a string; a
            ``gguf_file`` entry (or a ``model`` ending in ``.gguf``, or ``smollm2-135m``) loads a GGUF file, dequantized
            once and cached (`prime_trl.models.resolve_model`).

    Example:
        ```python
        import lightning
        from peft import LoraConfig
        from prime_trl.lightning.module import PRIMEDataModule, PRIMEModule, PRIMEModuleConfig
        from prime_trl.rewards import math_reward

        module = PRIMEModule("Qwen/Qwen2.5-0.5B-Instruct", math_reward, PRIMEModuleConfig(max_completion_length=1024),
                             peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"))
        data = PRIMEDataModule(dataset, prompts_per_device=8)  # columns: prompt, answer
        lightning.Trainer(max_steps=500).fit(module, datamodule=data)
        ```
    """

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel,
        reward_funcs: Callable | Sequence[Callable],
        config: PRIMEModuleConfig | None = None,
        *,
        peft_config: LoraConfig | None = None,
        prm: LoraConfig | str | Path | None = None,
        tokenizer=None,
        model_init_kwargs: dict | None = None,
    ):
        super().__init__()
        self.config = config = config if config is not None else PRIMEModuleConfig()
        self.automatic_optimization = False  # two optimizers, one of them stepped inside the PRM update
        self.strict_loading = False  # checkpoints hold the adapters only; on_load_checkpoint checks they are all there
        self.save_hyperparameters(asdict(config))

        self.reward_funcs = self._check_reward_funcs(reward_funcs)
        self.reward_func_names = [get_callable_name(func) for func in self.reward_funcs]
        weights = config.reward_weights or [1.0] * len(self.reward_funcs)
        if len(weights) != len(self.reward_funcs):
            raise ValueError(
                f"reward_weights has {len(weights)} entries for {len(self.reward_funcs)} reward functions."
            )
        self.reward_weights = torch.tensor(weights, dtype=torch.float32)
        self.verifier_indices = resolve_verifiers(self.reward_func_names, config.verifier)

        self.model = self._build_policy(model, peft_config, model_init_kwargs or {})
        self.tokenizer = self._build_tokenizer(tokenizer)
        self.prm = self._build_prm(prm if prm is not None else config.prm_name_or_path)
        # The run's own copy, as PRIMETrainer's: `check_verifier_scores` may settle outcome_label="auto" in it.
        self.settings = PRIMESettings.from_config(config)
        self.prime_state = PRIMEState()  # carried between batches (process_reward_accuracy_gate)
        self._warned: set[str] = set()  # one-time warnings already given
        self.generation_config = GenerationConfig(
            max_new_tokens=config.max_completion_length,
            do_sample=True,
            pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
            eos_token_id=self.eos_token_ids,
            temperature=config.temperature,
            top_p=config.top_p,
            top_k=config.top_k,
            disable_compile=True,
        )
        # This process's own random stream (CPU + accelerator generator states), used for everything random in a
        # step and saved in checkpoints; created in on_fit_start, when the process rank is known.
        self._rng_state: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------------------------------------------------
    # Set-up
    # ------------------------------------------------------------------------------------------------------------

    @staticmethod
    def _check_reward_funcs(reward_funcs) -> list[Callable]:
        funcs = reward_func_list(reward_funcs, "PRIMEModule")
        for func in funcs:
            if isinstance(func, (str, torch.nn.Module)) or not callable(func):
                raise TypeError(
                    f"PRIMEModule takes Python reward functions, got {type(func).__name__}. Wrap a reward model in a "
                    "function that returns one float per completion."
                )
        return [guard_reward_function(func) for func in funcs]

    def _build_policy(self, model, peft_config: LoraConfig | None, init_kwargs: dict) -> PeftModel:
        """The policy as a `PeftModel` with adapter ``default`` trainable and TRL's fused LM head on its base."""
        if isinstance(model, str):
            # Model names (smollm2-135m, prime-demo) and GGUF files become a loadable directory (prime_trl.models).
            init_kwargs = dict(init_kwargs)
            path = resolve_model(model, gguf_file=init_kwargs.pop("gguf_file", None))
            model = AutoModelForCausalLM.from_pretrained(path, **init_kwargs)
        else:
            drop_gguf_marker(model)
        if isinstance(model, PeftModel):
            if peft_config is not None:
                raise ValueError("Pass either a PeftModel or peft_config, not both.")
            check_policy_adapter(model, "PRIMEModule")
            model.peft_config[POLICY_ADAPTER].inference_mode = False
            for param in adapter_parameters(model, POLICY_ADAPTER):
                param.requires_grad_(True)
        elif peft_config is None:
            raise ValueError(
                "PRIMEModule trains a LoRA policy: pass peft_config=LoraConfig(...) or a PeftModel. (For a fully "
                "fine-tuned policy use PRIMETrainer.)"
            )
        else:
            check_lora_config(peft_config, "policy")
            model = get_peft_model(model, peft_config)
        # Per-token log-probs without materialising [B, T, vocab] logits; the head divides by the sampling
        # temperature, as TRL's policy log-probs do (the PRM uses it only at temperature 1, see _build_prm).
        add_fused_lm_head(model.get_base_model(), temperature=self.config.temperature)
        if self.config.gradient_checkpointing:
            base = model.get_base_model()
            if hasattr(base, "activation_checkpointing_enable"):  # the newer name; the old one now warns
                base.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                base.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            model.enable_input_require_grads()
        model.train()
        return model

    def _build_tokenizer(self, tokenizer):
        if tokenizer is None:
            tokenizer = AutoTokenizer.from_pretrained(self.model.get_base_model().config._name_or_path)
        self.eos_token_ids = pad_and_eos_token_ids(tokenizer, self.model.get_base_model())
        return tokenizer

    def _build_prm(self, prm: LoraConfig | str | Path | None) -> ImplicitPRM:
        """The PRM adapter on the policy's base and its online update, built as `PRIMETrainer` builds them."""
        config = self.config
        attach_prm_adapter(self.model, config, prm)
        # The policy's fused head carries the sampling temperature; PRIME's log-probs are at temperature 1.
        temperature_one = None if config.temperature == 1.0 else fused_log_probs_at_temperature_one(self.model)
        return make_implicit_prm(self.model, config, fused_log_probs=True, log_prob_model=temperature_one)

    def policy_parameters(self) -> list[torch.nn.Parameter]:
        return adapter_parameters(self.model, POLICY_ADAPTER)

    def setup(self, stage: str) -> None:
        precision = str(self.trainer.precision)
        if precision.startswith("16"):
            raise ValueError(
                f"precision={precision!r} is not supported: fp16 loss scaling would apply to the policy loss but not to "
                "the PRM update. Use '32-true' or 'bf16-mixed'."
            )
        dataset = getattr(self.trainer.datamodule, "train_dataset", None) if self.trainer.datamodule else None
        if isinstance(dataset, Sequence) and dataset and isinstance(dataset[0], dict):  # a list of rows
            dataset = SimpleNamespace(column_names=list(dataset[0]))
        check_dataset_columns(dataset, "train_dataset", self.reward_funcs)

    def configure_optimizers(self):
        """AdamW + schedule for the policy adapter, and the PRM's AdamW + schedule created by `ImplicitPRM` (both
        returned, so Lightning checkpoints and restores their states)."""
        config = self.config
        policy_steps = self._total_policy_steps()
        optimizer = torch.optim.AdamW(
            self.policy_parameters(),
            lr=config.learning_rate,
            betas=(config.adam_beta1, config.adam_beta2),
            eps=config.adam_epsilon,
            weight_decay=config.weight_decay,
        )
        scheduler = get_scheduler(
            config.lr_scheduler_type, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=policy_steps
        )
        generations = math.ceil(policy_steps / config.num_iterations) if policy_steps else None
        self.prm.create_optimizer_for_run(config, generations)
        return [optimizer, self.prm.optimizer], [scheduler, self.prm.scheduler]

    def _total_policy_steps(self) -> int | None:
        """Policy optimizer steps of the run (for decaying schedules): ``max_steps``, else Lightning's estimate."""
        if self._trainer is None:
            return None
        if self.trainer.max_steps > 0:
            return self.trainer.max_steps
        return int(self.trainer.estimated_stepping_batches) * self.config.num_iterations

    def on_fit_start(self) -> None:
        if self._rng_state is None:  # not restored from a checkpoint
            self._init_rng()

    # ------------------------------------------------------------------------------------------------------------
    # One PRIME step
    # ------------------------------------------------------------------------------------------------------------

    def training_step(self, rows: list[dict[str, Any]], batch_idx: int) -> torch.Tensor:
        """One PRIME step on this process's prompts ``rows`` (a list of dataset rows with a ``prompt``)."""
        start = time.perf_counter()
        with self._own_rng():
            rollout = self.generate(rows)
            rewards = self.score_completions(rows, rollout)
            step = self.prime_step(rollout.batch, rewards)
            policy_metrics = self.policy_update(rollout.batch, step.advantages)

        # PRIME's metrics (filter pass rate, PRM loss / accuracy, implicit rewards) are global already; the policy
        # loss is this process's and is averaged over processes by sync_dist.
        num_rows = len(rollout.batch)
        self.log_dict(step.metrics, on_step=True, on_epoch=False, batch_size=num_rows)
        self.log_dict(self._reward_metrics(rewards, rollout), on_step=True, on_epoch=False, batch_size=num_rows)
        self.log_dict(policy_metrics, on_step=True, on_epoch=False, batch_size=num_rows, sync_dist=True)
        self.log("prime/step_time", time.perf_counter() - start, on_step=True, on_epoch=False, batch_size=num_rows)
        return torch.tensor(policy_metrics["policy/loss"])

    @torch.no_grad()
    def generate(self, rows: list[dict[str, Any]]) -> Rollout:
        """Sample ``K`` completions per prompt with the policy adapter (docs/algorithm.md, step 1).

        Prompts are tokenized as TRL does and left-padded, completions cut after the first EOS and right-padded
        (`prime_trl.algo.rollout`, shared with ``prime-trl eval`` and ``score``); ``completion_mask`` is 1 up to and
        including the first EOS (all ones for a truncated completion).
        """
        num_generations = self.config.num_generations
        prompts = [row["prompt"] for row in rows for _ in range(num_generations)]
        kwargs = self.config.chat_template_kwargs
        row_ids = [prompt_token_ids(self.tokenizer, row["prompt"], kwargs) for row in rows]
        pad_id = self.tokenizer.pad_token_id
        input_ids, prompt_mask = left_padded_prompts([ids for ids in row_ids for _ in range(num_generations)], pad_id)
        input_ids, prompt_mask = input_ids.to(self.device), prompt_mask.to(self.device)
        prompt_width = input_ids.shape[1]

        with self._generation_mode():
            sequences = self.model.generate(
                input_ids=input_ids, attention_mask=prompt_mask, generation_config=self.generation_config
            )
        completion_ids, completion_mask = cut_at_first_eos(sequences[:, prompt_width:], self.eos_token_ids, pad_id)

        id_lists = [ids[mask.bool()].tolist() for ids, mask in zip(completion_ids.cpu(), completion_mask.cpu())]
        texts = self.tokenizer.batch_decode(id_lists, skip_special_tokens=True)
        if is_conversational({"prompt": prompts[0]}):
            # As TRL: a trailing assistant message in the prompt is a prefix the completion continues.
            completions = [
                [{"role": "assistant", "content": (p[-1]["content"] if p[-1]["role"] == "assistant" else "") + t}]
                for p, t in zip(prompts, texts, strict=True)
            ]
        else:
            completions = texts
        batch = CompletionBatch(input_ids, prompt_mask, completion_ids, completion_mask)
        return Rollout(batch, prompts, completions, id_lists)

    def score_completions(self, rows: list[dict[str, Any]], rollout: Rollout) -> torch.Tensor:
        """Every reward function on this process's completions, gathered over processes (docs/algorithm.md, step 2).

        Reward functions get ``prompts``, ``completions``, ``completion_ids`` and every other dataset column (one
        entry per completion). ``None`` scores become NaN, as in TRL.

        Returns:
            ``[B_global, n_funcs]`` in rank order (process ``p`` holds rows ``p*B_local .. (p+1)*B_local-1``).
        """
        num_generations = self.config.num_generations
        columns = {
            key: [row[key] for row in rows for _ in range(num_generations)]
            for key in rows[0]
            if key not in ("prompt", "completion", "completion_ids")
        }
        rewards = torch.full((len(rollout.batch), len(self.reward_funcs)), torch.nan, device=self.device)
        for index, func in enumerate(self.reward_funcs):
            scores = func(
                prompts=rollout.prompts,
                completions=rollout.completions,
                completion_ids=rollout.completion_ids,
                **columns,
            )
            if inspect.isawaitable(scores):
                scores = asyncio.run(scores)
            rewards[:, index] = torch.tensor([torch.nan if s is None else float(s) for s in scores], device=self.device)
        return distributed.gather_rows(rewards)

    def prime_step(self, batch: CompletionBatch, rewards_per_func: torch.Tensor, train: bool = True) -> PRIMEStep:
        """docs/algorithm.md steps 3-6 (filter, PRM update, implicit rewards, advantages) via the shared
        `prime_trl.algo.step.prime_step` (it was called ``compute_advantages``; that name is a deprecated alias).

        Args:
            batch: this process's ``B_local`` rows.
            rewards_per_func: ``[B_global, n_funcs]`` scores of every process's rows (`score_completions`).
            train: update the PRM and apply the accuracy filter.

        Returns:
            `PRIMEStep` with ``advantages [B_local, T]`` and the step's metrics. Every process must call this together.
        """
        if train:
            for key, message in check_verifier_scores(
                self.settings,
                rewards_per_func,
                self.verifier_indices,
                self.reward_func_names,
                verifier_named=self.config.verifier is not None,
            ):
                if key not in self._warned:
                    self._warned.add(key)
                    logger.warning(message)
        scores, outcome = verifier_scores_and_outcome(rewards_per_func, self.verifier_indices, self.reward_weights)
        return algo_step.prime_step(
            self.prm, batch, scores, outcome, self.settings, self.config.num_generations, train, self.prime_state
        )

    compute_advantages = prime_step  # deprecated: the step also updates the PRM, which the name hid

    def policy_update(self, batch: CompletionBatch, advantages: torch.Tensor) -> dict[str, float]:
        """Clipped policy loss and ``num_iterations`` policy optimizer steps on the rows (docs/algorithm.md, step 7, eq. 9).

        Gradients are accumulated over micro-batches of ``per_device_train_batch_size`` rows, each weighted by its
        share of the rows so that the step's loss is the mean over all of them; DDP averages it over processes.
        """
        config = self.config
        optimizer = self.optimizers()[0]
        scheduler = self.lr_schedulers()[0]
        micro_batches = torch.arange(len(batch), device=self.device).split(config.per_device_train_batch_size)
        epsilon_high = config.epsilon_high if config.epsilon_high is not None else config.epsilon
        old_logps = None
        if config.num_iterations > 1:  # later passes are off-policy: keep the sampling policy's log-probs
            with torch.no_grad():
                old_logps = torch.cat([self._policy_log_probs(batch.select(rows)) for rows in micro_batches])

        total_loss, grad_norms = 0.0, []
        for _ in range(config.num_iterations):
            for index, rows in enumerate(micro_batches):
                last = index == len(micro_batches) - 1
                # Only the last micro-batch's backward all-reduces (DDP); the earlier ones accumulate locally.
                sync = nullcontext() if last else self._no_backward_sync()
                with sync:
                    micro = batch.select(rows)
                    logps = self._policy_log_probs(micro)
                    old = logps.detach() if old_logps is None else old_logps[rows]
                    loss = core.clipped_policy_loss(
                        logps,
                        old,
                        advantages[rows],
                        micro.completion_mask.to(logps.dtype),
                        config.epsilon,
                        epsilon_high,
                    )
                    self.manual_backward(loss * len(rows) / len(batch))
                total_loss += loss.item() * len(rows) / len(batch) / config.num_iterations
            grad_norms.append(float(torch.nn.utils.clip_grad_norm_(self.policy_parameters(), config.max_grad_norm)))
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
        return {
            "policy/loss": total_loss,
            "policy/grad_norm": sum(grad_norms) / len(grad_norms),
            "policy/learning_rate": scheduler.get_last_lr()[0],
        }

    def _policy_log_probs(self, batch: CompletionBatch) -> torch.Tensor:
        """``[B, T]`` policy log-probs at the sampling temperature (the fused head divides by it), as TRL's loss."""
        share = prefix.sharing_enabled(
            self.model, self.config.share_prompt_prefix, torch.is_grad_enabled(), "policy log-prob passes"
        )
        return completion_log_probs(self.model, batch, fused=True, share_prefix=share)

    def _reward_metrics(self, rewards: torch.Tensor, rollout: Rollout) -> dict[str, float]:
        """Outcome rewards over the global batch, and completion lengths on this process."""
        _, outcome = verifier_scores_and_outcome(rewards, self.verifier_indices, self.reward_weights)
        lengths = rollout.batch.completion_mask.sum(1).float()
        metrics = {"reward": outcome.mean().item(), "reward_std": outcome.std().item() if len(outcome) > 1 else 0.0}
        for index, name in enumerate(self.reward_func_names):
            metrics[f"rewards/{name}/mean"] = torch.nanmean(rewards[:, index]).item()
        metrics["completions/mean_length"] = lengths.mean().item()
        # Completions that hit max_completion_length without EOS.
        truncated = ~torch.isin(rollout.batch.completion_ids, torch.tensor(self.eos_token_ids, device=self.device)).any(
            1
        )
        metrics["completions/clipped_ratio"] = truncated.float().mean().item()
        return metrics

    @contextmanager
    def _generation_mode(self) -> Iterator[None]:
        """Generation with the KV cache: gradient checkpointing (active only in train mode) would disable it."""
        if not self.config.gradient_checkpointing:
            yield
            return
        self.model.eval()
        try:
            yield
        finally:
            self.model.train()

    def _no_backward_sync(self):
        block = getattr(self.trainer.strategy, "block_backward_sync", None)
        return block() if block is not None else nullcontext()

    # ------------------------------------------------------------------------------------------------------------
    # The process's own random stream
    # ------------------------------------------------------------------------------------------------------------
    # Every random draw of a step (sampling, any dropout) comes from a stream that only training steps advance and
    # that checkpoints store per process. Data loading and Lightning's internals draw from the global stream at
    # different moments in a resumed run than in an uninterrupted one, so restoring the global state would not do.

    def _init_rng(self) -> None:
        with self._fork_rng():
            torch.manual_seed(self.config.seed + self.global_rank)
            self._rng_state = self._capture_rng()

    def _fork_rng(self):
        devices = [self.device.index or 0] if self.device.type == "cuda" else []
        return torch.random.fork_rng(devices=devices)

    def _capture_rng(self) -> dict[str, torch.Tensor]:
        state = {"cpu": torch.get_rng_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    @contextmanager
    def _own_rng(self) -> Iterator[None]:
        if self._rng_state is None:  # used outside Trainer.fit
            self._init_rng()
        with self._fork_rng():
            torch.set_rng_state(self._rng_state["cpu"])
            if "cuda" in self._rng_state:
                torch.cuda.set_rng_state(self._rng_state["cuda"], self.device)
            yield
            self._rng_state = self._capture_rng()

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints and export
    # ------------------------------------------------------------------------------------------------------------

    def _adapter_keys(self) -> set[str]:
        """Keys of `state_dict` that belong to the policy or PRM adapter (everything else is the frozen base)."""
        markers = (f".{POLICY_ADAPTER}.", f".{self.config.prm_adapter_name}.")
        return {key for key in self.state_dict() if any(marker in key for marker in markers)}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Keep the adapters, not the frozen base (Lightning adds both optimizers and schedulers itself), and store
        every process's random stream and what PRIME carries between batches (the settled ``outcome_label``, the
        running PRM accuracy, the warnings given). Lightning calls this on every process, so the gather is safe."""
        keys = self._adapter_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keys}
        rng = (
            {
                name: distributed.gather_rows(state.to(self.device).unsqueeze(0)).cpu()
                for name, state in self._rng_state.items()
            }
            if self._rng_state
            else {}
        )
        checkpoint["prime"] = {
            "adapters": [POLICY_ADAPTER, self.config.prm_adapter_name],
            "rng_states": rng,
            **carried_state(self.settings, self.prime_state, self._warned),
        }

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        missing = sorted(self._adapter_keys() - checkpoint["state_dict"].keys())
        if missing:
            raise RuntimeError(
                f"The checkpoint lacks {len(missing)} adapter weights (e.g. {missing[0]}); it was not written by a "
                "PRIMEModule with the same LoRA settings and prm_adapter_name."
            )
        prime = checkpoint.get("prime", {})
        restore_carried_state(prime, self.config.outcome_label, self.settings, self.prime_state, self._warned)
        rng = prime.get("rng_states")
        if rng:
            saved_world = rng["cpu"].shape[0]
            if saved_world != self.trainer.world_size:
                logger.warning(
                    "The checkpoint was written by %d processes, this run has %d: sampling will not repeat the "
                    "uninterrupted run exactly.",
                    saved_world,
                    self.trainer.world_size,
                )
            row = self.global_rank % saved_world
            self._rng_state = {name: states[row].clone() for name, states in rng.items()}

    def save_pretrained(self, directory: str | Path) -> None:
        """Write the policy adapter to ``directory`` and the PRM adapter to ``directory/prm`` (PRIMETrainer's layout:
        ``PeftModel.from_pretrained(base, directory)``; ``PRIMETrainer(prm=directory / "prm")`` continues the PRM)."""
        directory = Path(directory)
        save_adapter(self.model, POLICY_ADAPTER, directory)
        save_adapter(self.model, self.config.prm_adapter_name, directory / PRM_DIR_NAME)
        self.tokenizer.save_pretrained(str(directory))


# --------------------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------------------


class _ResumableSampler(DistributedSampler):
    """`DistributedSampler` (each process its own share, reshuffled per epoch from ``seed + epoch``) that can start
    an epoch part-way, so that a run resumed from a mid-epoch checkpoint sees the prompts an uninterrupted run sees."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.resume_at: tuple[int, int] | None = None  # (epoch, samples of this process already consumed in it)

    def __iter__(self) -> Iterator[int]:
        indices = list(super().__iter__())
        if self.resume_at is not None and self.resume_at[0] == self.epoch:
            indices = indices[self.resume_at[1] :]
        self.resume_at = None  # only the first epoch after a resume is partial
        return iter(indices)


class PRIMEDataModule(pl.LightningDataModule):
    """Prompts for `PRIMEModule`: batches of dataset rows (lists of dicts with ``prompt`` plus the reward functions'
    columns), i.e. the same data sets `PRIMETrainer` takes (e.g. from ``prime_trl.data``).

    Args:
        train_dataset: a `datasets.Dataset` or a list of dicts.
        prompts_per_device: prompts per process per step; each gets ``num_generations`` completions.
        shuffle, seed: reshuffle every epoch from ``seed + epoch``, identically on every process.
        num_workers: DataLoader workers.

    Each process reads its own share of every epoch (incomplete last batches are dropped, so all processes take the
    same number of steps). Its position in the epoch is saved in checkpoints and restored on resume.
    """

    def __init__(
        self,
        train_dataset,
        prompts_per_device: int = 8,
        shuffle: bool = True,
        seed: int = 42,
        num_workers: int = 0,
    ):
        super().__init__()
        self.train_dataset = train_dataset
        self.prompts_per_device = prompts_per_device
        self.shuffle = shuffle
        self.seed = seed
        self.num_workers = num_workers
        self._resume_at: tuple[int, int] | None = None  # (epoch, samples of this process consumed in it)
        self._sampler: _ResumableSampler | None = None

    def train_dataloader(self) -> DataLoader:
        world, rank = (self.trainer.world_size, self.trainer.global_rank) if self.trainer else (1, 0)
        if len(self.train_dataset) < self.prompts_per_device * world:
            raise ValueError(
                f"train_dataset has {len(self.train_dataset)} rows, fewer than one step needs "
                f"({self.prompts_per_device} prompts x {world} processes)."
            )
        sampler = _ResumableSampler(
            self.train_dataset, num_replicas=world, rank=rank, shuffle=self.shuffle, seed=self.seed, drop_last=True
        )
        sampler.resume_at, self._resume_at = self._resume_at, None
        self._sampler = sampler
        return DataLoader(
            self.train_dataset,
            batch_size=self.prompts_per_device,
            sampler=sampler,
            drop_last=True,
            collate_fn=list,  # rows stay dicts: prompts may be chat messages, columns arbitrary
            num_workers=self.num_workers,
        )

    def state_dict(self) -> dict[str, int]:
        """The epoch and the batches of it this process has trained on (Lightning's progress counter of the loop)."""
        if self.trainer is None:
            return {}
        done = self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
        return {"epoch": self.trainer.current_epoch, "batches_done": done}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if not state:
            return
        resume_at = (state["epoch"], state["batches_done"] * self.prompts_per_device)
        if self._sampler is not None:  # the loader exists already (strategies that restore after set-up)
            self._sampler.resume_at = resume_at
        else:
            self._resume_at = resume_at
        # Lightning warns that a mid-epoch resume with a plain DataLoader repeats data; this module restores the
        # position itself (the sampler skips what was consumed), so the warning would mislead.
        warnings.filterwarnings(
            "ignore",
            message="You're resuming from a checkpoint that ended before the epoch",
            category=PossibleUserWarning,
        )
