"""`PRIMETrainer`: PRIME on TRL's `GRPOTrainer`, with the implicit PRM as a LoRA adapter on the policy's base.

TRL generates, scores with the reward functions and runs the clipped policy loss. This subclass only changes
what happens between scoring and the loss (`_generate_and_score_completions`): the accuracy filter, the online
PRM update, implicit token rewards and PRIME's per-token advantages, which TRL's `_compute_loss` accepts as
``[B, T]``. The formulas are in `prime_trl.algo.core`, the PRM adapter machinery in `prime_trl.algo.prm`.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import random
import time
import types
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from accelerate.utils import gather_object
from peft import LoraConfig, PeftModel
from transformers import PreTrainedModel, TrainerCallback, TrainingArguments
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

import prime_trl.algo.distributed as distributed
import prime_trl.algo.prefix as prefix
from prime_trl.algo.prm import (
    POLICY_ADAPTER,
    PRIME_STATE_NAME,
    PRM_DIR_NAME,
    PRM_STATE_NAME,
    CompletionBatch,
    ImplicitPRM,
    add_prm_adapter,
    attach_prm_adapter,
    check_lora_config,
    check_policy_adapter,
    default_prm_lora_config,
    fused_log_probs_at_temperature_one,
    load_adapter_weights,
    make_implicit_prm,
    save_adapter,
)
from prime_trl.algo.step import (
    PRIMESettings,
    PRIMEState,
    PRIMEStep,
    carried_state,
    check_verifier_scores,
    prime_step,
    restore_carried_state,
    verifier_scores_and_outcome,
)
from prime_trl.apps.scoring import ScoredResponse, html_page
from prime_trl.models import SPECIAL_MODELS, drop_gguf_marker, is_gguf_path, resolve_model
from prime_trl.rewards.reward_funcs import (
    check_dataset_columns,
    guard_reward_function,
    resolve_verifiers,
)
from prime_trl.trainer.grpo_compat import check_prm_argument, check_reward_source, to_prime_config
from prime_trl.trainer.prime_config import PRIMEConfig
from prime_trl.trainer.quantization import is_quantized, protect_4bit_base
from prime_trl.trainer.vllm_sync import LoRAAdapterSync, engine_with_lora, guard_merge_sync, resolve_sync_mode

logger = logging.getLogger(__name__)

__all__ = [
    "PRIME_STATE_NAME",
    "PRM_DIR_NAME",
    "PRM_STATE_NAME",
    "PRIMETrainer",
]  # the checkpoint names live in prime_trl.algo.prm

KEPT_ROWS_KEY = "prime_kept"  # [B] bool in TRL's batch dict: rows that train (see _compute_loss)
ROW_MEAN_LOSSES = ("grpo", "sapo", "dr_grpo", "luspo")  # TRL loss types that divide by the micro-batch's row count


def _resolve_model_source(model, args: PRIMEConfig, processing_class):
    """GGUF start points and prime-trl's model names, before TRL loads the model (prime_trl.models).

    A ``.gguf`` path, ``smollm2-135m`` or ``args.model_init_kwargs["gguf_file"]`` becomes the cached dequantized
    directory (TRL's loader cannot read GGUF files); the rest of ``model_init_kwargs`` (dtype, quantization)
    applies to that directory, so a 4-bit config re-quantizes the dequantized weights (QLoRA). A model instance
    loaded from GGUF loses the marker that would make ``save_pretrained`` fail; its tokenizer is read from the
    GGUF file when none is given.
    """
    if isinstance(model, str):
        init_kwargs = dict(args.model_init_kwargs or {})
        gguf_file = init_kwargs.pop("gguf_file", None)
        if gguf_file is not None or model.lower() in SPECIAL_MODELS or is_gguf_path(model):
            model = resolve_model(model, gguf_file=gguf_file, output_dir=args.output_dir, seed=args.seed)
            args.model_init_kwargs = init_kwargs or None
        return model, args, processing_class
    gguf_file = drop_gguf_marker(model)
    if gguf_file and processing_class is None:
        from transformers import AutoTokenizer

        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        processing_class = AutoTokenizer.from_pretrained(
            inner.config._name_or_path, gguf_file=gguf_file, padding_side="left", truncation_side="left"
        )
    return model, args, processing_class


class PRIMETrainer(GRPOTrainer):
    """PRIME (Cui et al., 2025, arXiv:2502.01456) on TRL's `GRPOTrainer`.

    The policy is the LoRA adapter ``default``; the implicit PRM is a second LoRA adapter (``args.prm_adapter_name``)
    on the same frozen base; the reference for the implicit reward is that base with adapters disabled.

    Args:
        model: hub id or local path, `PreTrainedModel`, or `PeftModel` whose policy adapter is ``default``. A plain
            model with ``peft_config=None`` is trained in full; its PRM then lives on one frozen copy of the
            initial model, which is also the reference. A `PeftModel`'s trained ``default`` adapter (e.g. SFT) is
            merged into a non-quantized base first, so that it starts policy, PRM and reference alike (see
            `merge_start_adapter`).
            initial model, which is also the reference. A ``.gguf`` file (or ``args.model_init_kwargs["gguf_file"]``)
            and the names ``smollm2-135m`` / ``prime-demo`` / ``tiny`` are resolved by `prime_trl.models`.
        prm: ``None`` (a zero-initialised adapter with the policy's LoRA settings, so PRM == reference at step 0),
            a `peft.LoraConfig`, or the directory of a saved PRM adapter (e.g. ``<checkpoint>/prm``).
        args: a `PRIMEConfig`.
        reward_funcs: TRL reward functions. The verifier(s) (``args.verifier``, default the first) give the scores
            that ``args.outcome_label`` turns into the PRM's outcome labels and the accuracy filter's input; the
            weighted sum of all of them (``args.reward_weights``) is the outcome reward of the advantages. A row
            no verifier scored (all returned None) does not train.
        train_dataset, eval_dataset: datasets with a ``prompt`` column plus the columns the reward functions need.
        processing_class: tokenizer (loaded from ``model`` when ``None``).
        peft_config: `peft.LoraConfig` of the policy adapter.
        callbacks, optimizers, quantization_config, reward_processing_classes: as in `GRPOTrainer`.

    Example:
        ```python
        from peft import LoraConfig
        from prime_trl import PRIMEConfig, PRIMETrainer
        from prime_trl.rewards import math_reward

        trainer = PRIMETrainer(
            "Qwen/Qwen2.5-0.5B-Instruct",
            args=PRIMEConfig(output_dir="out"),
            reward_funcs=math_reward,
            train_dataset=dataset,  # columns: prompt, answer
            peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear"),
        )
        trainer.train()
        ```
    """

    _tag_names = ["trl", "prime", "prime-trl"]
    _name = "PRIME"
    _paper = {
        "title": "Process Reinforcement through Implicit Rewards",
        "id": "2502.01456",
        "citation": (
            "@article{cui2025process,\n  title={Process Reinforcement through Implicit Rewards},\n"
            "  author={Cui, Ganqu and Yuan, Lifan and Wang, Zefan and others},\n"
            "  journal={arXiv preprint arXiv:2502.01456},\n  year={2025}\n}"
        ),
    }

    def __init__(
        self,
        model: str | PreTrainedModel | PeftModel,
        prm: LoraConfig | str | os.PathLike | None = None,
        args: PRIMEConfig | None = None,
        *,
        reward_funcs: Callable | list[Callable] | str | list[str] | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config: LoraConfig | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        quantization_config=None,
        reward_processing_classes=None,
        tools: list[Callable] | None = None,
        rollout_func: Callable | None = None,
        environment_factory: Callable | dict[str, Callable] | None = None,
    ):
        check_prm_argument(prm)
        if args is None:
            model_name = model if isinstance(model, str) else type(model).__name__
            args = PRIMEConfig(output_dir=f"{str(model_name).rstrip('/').split('/')[-1]}-PRIME")
        elif isinstance(args, TrainingArguments) and not isinstance(args, PRIMEConfig):
            args = to_prime_config(args)
        elif not isinstance(args, PRIMEConfig):
            raise TypeError(
                f"args must be a PRIMEConfig, got {type(args).__name__}. Build it with PRIMEConfig(...) (it accepts "
                "every GRPOConfig field)."
            )
        if reward_funcs is None:
            reward_funcs = []
        reward_funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        check_reward_source(reward_funcs, environment_factory)  # TRL's error when there is no reward source
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            check_dataset_columns(dataset, name, reward_funcs)
        if peft_config is not None:
            check_lora_config(peft_config, "policy")
        if isinstance(model, PeftModel):
            check_policy_adapter(model, "PRIMETrainer")
            if peft_config is None:
                model, peft_config = merge_start_adapter(model)

        model, args, processing_class = _resolve_model_source(model, args, processing_class)
        quantized = quantization_config is not None or (not isinstance(model, str) and is_quantized(model))
        sync_mode = resolve_sync_mode(args.vllm_sync_mode, quantized, args.vllm_mode) if args.use_vllm else None
        policy_lora = peft_config or (model.peft_config[POLICY_ADAPTER] if isinstance(model, PeftModel) else None)
        if sync_mode == "lora" and policy_lora is None:
            raise ValueError("vllm_sync_mode='lora' pushes the policy's LoRA adapter, so the policy must be LoRA.")
        if sync_mode == "lora" and policy_lora.modules_to_save:
            raise ValueError(
                f"vllm_sync_mode='lora' pushes only LoRA layers to vLLM, so the policy's modules_to_save="
                f"{policy_lora.modules_to_save} copies would never reach it. Use vllm_sync_mode='merge'."
            )
        if args.use_vllm and isinstance(prm, LoraConfig):
            check_lora_config(prm, "PRM", use_vllm=True)  # before TRL starts vLLM
        vllm_engine = engine_with_lora(policy_lora.r) if sync_mode == "lora" else nullcontext()
        with vllm_engine:
            super().__init__(
                model=model,
                reward_funcs=[guard_reward_function(func) for func in reward_funcs],
                args=args,
                train_dataset=train_dataset,
                eval_dataset=eval_dataset,
                processing_class=processing_class,
                reward_processing_classes=reward_processing_classes,
                callbacks=callbacks,
                optimizers=optimizers,
                quantization_config=quantization_config,
                peft_config=peft_config,
                tools=tools,
                rollout_func=rollout_func,
                environment_factory=environment_factory,
            )
        self._install_vllm_sync(sync_mode)
        protect_4bit_base(self.model)  # QLoRA on CPU: eval-mode forwards must not repack the base (see module)
        self.verifier_indices = resolve_verifiers(self.reward_func_names, args.verifier)
        self.prime_settings = PRIMESettings.from_config(args)
        self._label_reward_models_by_group_mean()
        self.prime_state = PRIMEState()
        self._prm_pretrain_pending = args.prm_pretrain_batches > 0
        self.prm = self._build_prm(prm if prm is not None else args.prm_name_or_path)
        self._rewards_per_func: torch.Tensor | None = None
        self._warned: set[str] = set()  # one-time warnings already given
        self._generations = 0  # training generation batches seen, and how many the filter emptied
        self._fully_filtered = 0
        self._kept_since_step = 0  # rows that reached the policy loss since the last optimizer step
        self._skip_policy_step = False
        self._token_views: list[tuple[list[int], list[float], float]] = []  # log_token_rewards: rows since last log
        self._rng_at_step_end: dict | None = None  # for a rescue checkpoint (see _save_rescue_checkpoint)
        if args.save_checkpoint_on_error:
            self.add_callback(_RememberStepEndRNG(self))

    # ------------------------------------------------------------------------------------------------------------
    # Set-up
    # ------------------------------------------------------------------------------------------------------------

    def _label_reward_models_by_group_mean(self) -> None:
        """``outcome_label="auto"`` with a reward model (a sequence classifier) as verifier: its scores are logits, on
        no fixed scale, even when a batch happens to fall inside [0, 1] (a fresh reward model's often do), so they
        are never soft labels: label by ``group_mean`` from the first batch, as "auto" does once a score leaves [0, 1]."""
        if self.prime_settings.outcome_label != "auto":
            return
        models = [
            self.reward_func_names[i]
            for i in self.verifier_indices
            if isinstance(self.reward_funcs[i], torch.nn.Module)
        ]
        if models:
            self.prime_settings.outcome_label = "group_mean"
            logger.info(
                "PRIME: the verifier %s is a reward model (scores are logits), so outcome_label='auto' labels a row "
                "correct when its score is above its group's mean ('group_mean'). Set outcome_label to choose.",
                ", ".join(repr(name) for name in models),
            )

    def _build_prm(self, prm: LoraConfig | str | os.PathLike | None) -> ImplicitPRM:
        """Add the PRM adapter (on the policy's base, or on a frozen copy for a fully fine-tuned policy)."""
        args = self.args
        log_prob_model = None
        if isinstance(self.model, PeftModel):
            host = self.model
            attach_prm_adapter(host, args, prm)
            if self.temperature != 1.0:  # TRL's fused head divides by it; PRIME's log-probs are at temperature 1
                log_prob_model = fused_log_probs_at_temperature_one(host, args.cast_lm_head_to_fp32)
        else:
            host = self._frozen_copy_with_prm(prm)
            logger.info("PRIME: the PRM adapter lives on a frozen copy of the initial model (full fine-tune policy).")
        return make_implicit_prm(
            host, args, fused_log_probs=True, autocast=self.accelerator.autocast, log_prob_model=log_prob_model
        )

    def _frozen_copy_with_prm(self, prm: LoraConfig | str | os.PathLike | None) -> PeftModel:
        """Full fine-tune policy: the PRM is a LoRA adapter on one frozen copy of the initial model, which with
        adapters disabled is also the reference (one extra copy, not two)."""
        if is_deepspeed_zero3_enabled():
            raise NotImplementedError(
                "A fully fine-tuned policy under DeepSpeed ZeRO-3 would need a partitioned frozen copy of the model for "
                "the PRM, which prime-trl does not build. Train the policy as a LoRA adapter (peft_config=LoraConfig(...)"
                " or --use_peft), which ZeRO-3 supports, or use FSDP2 / ZeRO-2."
            )
        base = copy.deepcopy(self.accelerator.unwrap_model(self.model))
        # The copied fused-head forward still calls the *original* model's forward; restore the class forward and
        # add a fresh fused head at temperature 1 (PRIME's log-probs are never temperature-scaled).
        base.__dict__.pop("forward", None)
        add_fused_lm_head(base, temperature=1.0)
        base.requires_grad_(False)
        default_config = default_prm_lora_config(
            None, self.args.prm_lora_r, self.args.prm_lora_alpha, model=base, use_vllm=self.args.use_vllm
        )
        host = add_prm_adapter(base, self.args.prm_adapter_name, prm, default_config, self.args.use_vllm)
        if self.args.gradient_checkpointing:
            host.gradient_checkpointing_enable(gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
            host.enable_input_require_grads()
        return host

    def _install_vllm_sync(self, sync_mode: str | None) -> None:
        """The policy adapter, and only it, reaches vLLM (see prime_trl.trainer.vllm_sync)."""
        if sync_mode == "merge" and isinstance(self.model, PeftModel):
            guard_merge_sync(self.vllm_generation, self.model)
        elif sync_mode == "lora":
            LoRAAdapterSync(
                self.model,
                Path(self.args.output_dir) / "vllm_policy_adapter",
                is_main_process=self.args.should_save,
                wait_for_everyone=self.accelerator.wait_for_everyone,
            ).install(self.vllm_generation)

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The policy's scheduler (TRL), then the PRM's own optimizer and scheduler, sized to the same run."""
        new_run = self.lr_scheduler is None  # Trainer drops its scheduler at each train() call, keeps the optimizer
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        args = self.args
        generations = math.ceil(
            num_training_steps * args.gradient_accumulation_steps / (args.steps_per_generation * self.num_iterations)
        )
        total_steps = max(1, generations * args.prm_num_mini_batches)
        if self.prm.optimizer is None:
            self.prm.create_optimizer_for_run(args, generations)
        elif new_run:  # a second train(): like the policy's, the PRM's schedule is sized to this run
            self.prm.create_scheduler(args.prm_lr_scheduler_type, args.prm_warmup_steps, total_steps)
        return scheduler

    # ------------------------------------------------------------------------------------------------------------
    # The PRIME step: runs inside TRL's scoring step, once per generation batch
    # ------------------------------------------------------------------------------------------------------------

    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        self._rewards_per_func = rewards_per_func  # [N_global, n_funcs], gathered over processes by TRL
        return rewards_per_func

    def _generate_and_score_completions(self, inputs: list[dict[str, Any]]) -> dict[str, torch.Tensor | Any]:
        mode = "train" if self.model.training else "eval"
        if mode == "train" and self._prm_pretrain_pending:
            self._pretrain_prm(inputs)
        output = super()._generate_and_score_completions(inputs)
        batch = CompletionBatch(
            output["prompt_ids"],
            output["prompt_mask"],
            output["completion_ids"],
            output["completion_mask"],
            tool_mask=output.get("tool_mask"),  # tools / environments / rollout_func's env_mask (see CompletionBatch)
        )
        start_time = time.perf_counter()
        step = self._run_prime_step(batch, self._rewards_per_func, mode)
        output["advantages"] = step.advantages
        output[KEPT_ROWS_KEY] = step.kept
        # dapo / cispo normalise by the tokens of the generation batch: count only the rows that train.
        loss_mask = batch.completion_mask * output["tool_mask"] if "tool_mask" in output else batch.completion_mask
        kept_tokens = (loss_mask * step.kept.unsqueeze(-1)).sum()
        output["num_items_in_batch"] = self.accelerator.gather(kept_tokens).sum()
        self._log_prime_rows(batch, step)
        self._metrics[mode]["prime/scoring_time"].append(time.perf_counter() - start_time)
        return output

    def _pretrain_prm(self, inputs: list[dict[str, Any]]) -> None:
        """``args.prm_pretrain_batches`` PRM updates before the policy's first one, each on fresh samples of the first
        step's prompts from the initial policy (accuracy filter as in training); the advantages are discarded and
        TRL's logs and metrics of these extra generations are put back as they were."""
        self._prm_pretrain_pending = False
        saved = copy.deepcopy(self._metrics), copy.deepcopy(self._logs), self.state.num_input_tokens_seen
        accuracies = []
        for _ in range(self.args.prm_pretrain_batches):
            output = super()._generate_and_score_completions(inputs)
            batch = CompletionBatch(
                output["prompt_ids"],
                output["prompt_mask"],
                output["completion_ids"],
                output["completion_mask"],
                tool_mask=output.get("tool_mask"),
            )
            self._check_verifier_scores(self._rewards_per_func)  # the warm-up's labels follow the run's rule too
            scores, outcome = verifier_scores_and_outcome(
                self._rewards_per_func, self.verifier_indices, self.reward_weights
            )
            step = prime_step(self.prm, batch, scores, outcome, self.prime_settings, self.num_generations)
            accuracies.append(step.metrics.get("prm/accuracy"))
        self._metrics, self._logs, self.state.num_input_tokens_seen = saved
        logger.info("PRIME: PRM warm-up on %d batches (training-batch PRM accuracy %s).", len(accuracies), accuracies)

    def _prime_step(self, batch: CompletionBatch, rewards_per_func: torch.Tensor, mode: str) -> torch.Tensor:
        """The PRIME step (PRM update in training mode); returns the per-token advantages ``[B_local, T_local]`` for
        this process's rows (docs/algorithm.md section 2, steps 3-6)."""
        return self._run_prime_step(batch, rewards_per_func, mode).advantages

    def _run_prime_step(self, batch: CompletionBatch, rewards_per_func: torch.Tensor, mode: str) -> PRIMEStep:
        """`_prime_step` with everything it gives: advantages, implicit token rewards, kept rows, metrics."""
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        if mode == "train":
            self._check_verifier_scores(rewards_per_func)
            if self.args.save_checkpoint_on_error and self.prime_settings.prm_update != "none":
                self._remember_prm_state()
        scores, outcome = verifier_scores_and_outcome(rewards_per_func, self.verifier_indices, self.reward_weights)
        step = prime_step(
            self.prm, batch, scores, outcome, self.prime_settings, group_size, mode == "train", self.prime_state
        )
        for name, value in step.metrics.items():
            self._metrics[mode][name].append(value)
        if mode == "train":
            self._count_filtered(step.metrics["filter/pass_rate"])
        return step

    # ------------------------------------------------------------------------------------------------------------
    # The policy loss sees the rows that train, and only them
    # ------------------------------------------------------------------------------------------------------------

    def _compute_loss(self, model, inputs):
        """TRL's policy loss, with the gradient of the micro-batch's kept rows alone.

        Rows of filtered groups, unscored rows and masked (truncated) rows have zero advantage, but left in TRL's
        loss they would still count in its denominators (rows for ``grpo`` / ``dr_grpo``, tokens for ``bnpo``) and in
        the KL and entropy terms, shrinking the step with the kept fraction. The official code removes filtered
        prompts from the batch; here they are masked out of TRL's loss mask (``tool_mask``, which TRL multiplies into
        every loss term and metric, leaving the forward and the row count per process unchanged, as collectives
        need) and the row-mean losses are rescaled from ``B`` rows to the kept ones. A micro-batch without any kept
        row contributes exactly zero.
        """
        inputs = dict(inputs)  # the buffered batch is reused over num_iterations: never modify it
        kept = inputs.pop(KEPT_ROWS_KEY, None)
        if kept is None or not self.model.training:
            return super()._compute_loss(model, inputs)
        num_kept = int(kept.sum())
        self._kept_since_step += num_kept
        if self.accelerator.sync_gradients:  # the window's last micro-batch: decide whether the optimizer steps
            self._decide_policy_step()
        row_mask = kept.to(inputs["completion_mask"].dtype).unsqueeze(-1)
        inputs["tool_mask"] = inputs["tool_mask"] * row_mask if "tool_mask" in inputs else row_mask
        loss = super()._compute_loss(model, inputs)
        if self.loss_type in ROW_MEAN_LOSSES and 0 < num_kept < len(kept):
            if self._entropy_bonus_enabled:
                self._warn_once(
                    "entropy_scale",
                    "PRIME: with loss_type=%r and an entropy bonus, the bonus is rescaled with the policy loss to the "
                    "kept rows of each micro-batch.",
                    self.loss_type,
                )
            loss = loss * (len(kept) / num_kept)
        return loss

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        prm_ids = {id(p) for p in self.prm.parameters()}
        leaked = [p for group in optimizer.param_groups for p in group["params"] if id(p) in prm_ids]
        if leaked:
            raise RuntimeError(
                f"{len(leaked)} PRM parameters ended up in the policy optimizer; the PRM adapter must be inactive "
                "when training starts (do not call set_adapter on the PRM before train())."
            )
        self._skip_empty_policy_steps(optimizer)
        return optimizer

    def _decide_policy_step(self) -> None:
        """At the last micro-batch of an accumulation window, before its backward (DeepSpeed steps inside it): skip
        the optimizer step when no process kept any row in the whole window."""
        kept = torch.tensor(float(self._kept_since_step), device=self.accelerator.device)
        self._kept_since_step = 0
        if self.accelerator.num_processes > 1:
            kept = self.accelerator.reduce(kept, reduction="sum")
        self._skip_policy_step = kept.item() == 0

    def _skip_empty_policy_steps(self, optimizer: torch.optim.Optimizer) -> None:
        """An optimizer step whose micro-batches held no kept row on any process is skipped: with zero gradients,
        AdamW's momentum and weight decay would still move the policy on a step that had nothing to learn from.
        (The decision is taken once per window in `_decide_policy_step`; DeepSpeed calls ``step`` once per group.)"""
        step = optimizer.step

        def step_if_anything_kept(self_optimizer, *args, **kwargs):
            if self._skip_policy_step:
                return None
            return step(*args, **kwargs)

        # A bound method: torch's LR scheduler re-wraps `optimizer.step` through its `__func__`.
        optimizer.step = types.MethodType(step_if_anything_kept, optimizer)

    # ------------------------------------------------------------------------------------------------------------
    # What is logged: PRIME's advantages and implicit rewards in TRL's completions table
    # ------------------------------------------------------------------------------------------------------------

    def _log_prime_rows(self, batch: CompletionBatch, step: PRIMEStep) -> None:
        """Replace GRPO's advantages in TRL's completions table (``log_completions=True``) by PRIME's, and add each
        row's implicit reward ``r(y) = sum_t r_t`` (Eq. 2; column ``implicit_reward``) and, with
        ``log_token_rewards=True``, its per-token implicit rewards (column ``token_rewards``).

        PRIME's advantages are per token; the ``advantage`` column holds each row's mean advantage over its
        completion tokens (0 for rows that do not train: filtered groups, unscored or masked rows)."""
        if not self.log_completions:
            return
        mask = batch.completion_mask.float()
        row_advantage = (step.advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)
        all_advantages = distributed.gather_rows(row_advantage).tolist()
        all_rewards = distributed.gather_rows(step.token_rewards.sum(-1)).tolist()
        logged = self._logs["advantages"]
        tail = min(len(all_advantages), len(logged))
        for offset in range(tail):
            logged[len(logged) - tail + offset] = all_advantages[len(all_advantages) - tail + offset]
        self._logs["extra"]["implicit_reward"].extend(all_rewards)
        if self.args.log_token_rewards:
            lengths = batch.completion_mask.sum(-1).tolist()
            rows = [rewards[:length] for rewards, length in zip(step.token_rewards.tolist(), lengths, strict=True)]
            ids = [row[:length] for row, length in zip(batch.completion_ids.tolist(), lengths, strict=True)]
            all_rows = gather_object(rows)
            self._logs["extra"]["token_rewards"].extend(all_rows)
            self._token_views.extend(zip(gather_object(ids), all_rows, all_rewards, strict=True))

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """TRL's logging, plus (``log_token_rewards=True``) an HTML heat map of the logged completions' implicit
        token rewards: ``<output_dir>/completions/token_rewards_<step>.html``, and to Weights & Biases as HTML."""
        if self._token_views and self.accelerator.is_main_process and self.log_completions:
            self._write_token_view()
        self._token_views.clear()
        super().log(logs, start_time)

    def _write_token_view(self) -> None:
        tokenizer = self.processing_class
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # processors wrap the tokenizer
        views = [
            ScoredResponse(
                text=tokenizer.decode(ids),
                tokens=[tokenizer.decode([token]) for token in ids],
                token_rewards=rewards,
                steps=[tokenizer.decode(ids)],
                step_spans=[(0, len(ids))],
                step_rewards=[reward],
                reward=reward,
            )
            for ids, rewards, reward in self._token_views[-(self.num_completions_to_print or 0) :]
        ]
        page = html_page(views, title=f"Implicit token rewards, step {self.state.global_step}")
        directory = Path(self.args.output_dir) / "completions"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"token_rewards_{self.state.global_step:05d}.html").write_text(page)
        if self.args.report_to and "wandb" in self.args.report_to:
            import wandb

            if wandb.run is not None:
                wandb.log({"token_rewards": wandb.Html(page)})

    # ------------------------------------------------------------------------------------------------------------
    # Runs that would train on nothing say so
    # ------------------------------------------------------------------------------------------------------------

    def _warn_once(self, key: str, message: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            logger.warning(message, *args)

    def _check_verifier_scores(self, rewards_per_func: torch.Tensor) -> None:
        """Warn (once) when a verifier's scores leave [0, 1] (``outcome_label="auto"`` then stays ``group_mean``),
        and when the default verifier leaves rows unscored that other reward functions scored (TRL's multi-task
        pattern needs ``verifier`` to name them all): `check_verifier_scores`, shared with `PRIMEModule`."""
        for key, message in check_verifier_scores(
            self.prime_settings,
            rewards_per_func,
            self.verifier_indices,
            self.reward_func_names,
            verifier_named=self.args.verifier is not None,
        ):
            self._warn_once(key, message)

    def _count_filtered(self, pass_rate: float) -> None:
        """A generation batch the accuracy filter emptied trains nothing: warn, rate-limited (1st, 2nd, 4th, ...)."""
        self._generations += 1
        if pass_rate > 0:
            return
        self._fully_filtered += 1
        if self._fully_filtered & (self._fully_filtered - 1) == 0:
            settings = self.prime_settings
            logger.warning(
                "PRIME: the accuracy filter dropped every group of this batch (%d of %d batches so far): no group's "
                "accuracy lay in [%g, %g], so neither the policy nor the PRM learns from it. If every completion "
                "gets the same label, check the verifier and outcome_label (now %r); otherwise widen "
                "accuracy_lower_bound / accuracy_upper_bound, raise num_generations, or set accuracy_filter=False.",
                self._fully_filtered,
                self._generations,
                settings.accuracy_lower_bound,
                settings.accuracy_upper_bound,
                settings.outcome_label,
            )

    def _report_filtered_run(self) -> None:
        if self._generations and self._fully_filtered * 2 > self._generations:
            logger.warning(
                "PRIME: %d of %d generation batches of this run were fully filtered by the accuracy filter and "
                "trained nothing. See the warnings above for the fix (outcome_label, accuracy bounds, "
                "accuracy_filter=False).",
                self._fully_filtered,
                self._generations,
            )

    # ------------------------------------------------------------------------------------------------------------
    # The policy's log-prob passes (TRL's loss, old and reference log-probs) with shared prompt prefixes
    # ------------------------------------------------------------------------------------------------------------

    def _get_per_token_logps_and_entropies(
        self,
        model,
        input_ids,
        attention_mask,
        logits_to_keep,
        batch_size=None,
        compute_entropy=False,
        compute_aux_loss=False,
        **multimodal_inputs,
    ):
        """TRL's per-token log-probs and entropies, with each chunk's distinct prompts run once and their key/value
        states shared by the chunk's rows (`prime_trl.algo.prefix`) when ``share_prompt_prefix`` allows it; chunks
        without repeated prompts, multimodal inputs and MoE auxiliary losses take TRL's own pass."""
        plain = functools.partial(
            super()._get_per_token_logps_and_entropies,
            model,
            compute_entropy=compute_entropy,
            compute_aux_loss=compute_aux_loss,
            **multimodal_inputs,
        )
        if any(value is not None for value in multimodal_inputs.values()) or compute_aux_loss:
            if self.args.share_prompt_prefix:
                prefix.log_fallback_once("policy log-prob passes with multimodal inputs or an MoE auxiliary loss")
            return plain(input_ids, attention_mask, logits_to_keep, batch_size=batch_size)
        needs_grad = torch.is_grad_enabled()
        if not prefix.sharing_enabled(model, self.args.share_prompt_prefix, needs_grad, "policy log-prob passes"):
            return plain(input_ids, attention_mask, logits_to_keep, batch_size=batch_size)
        batch_size = batch_size or input_ids.size(0)
        all_logps, all_entropies = [], []
        for start in range(0, input_ids.size(0), batch_size):
            rows = slice(start, start + batch_size)
            prompt_ids, prompt_mask = input_ids[rows, :-logits_to_keep], attention_mask[rows, :-logits_to_keep]
            completion_ids, completion_mask = input_ids[rows, -logits_to_keep:], attention_mask[rows, -logits_to_keep:]
            groups = prefix.find_prefix_groups(prompt_ids, prompt_mask)
            if prefix.worth_sharing(groups, prompt_mask, logits_to_keep):
                with self.accelerator.autocast():
                    logps, entropies = prefix.shared_completion_log_probs(
                        model, prompt_ids, prompt_mask, completion_ids, completion_mask, groups, True, compute_entropy
                    )
            else:
                logps, entropies, _ = plain(input_ids[rows], attention_mask[rows], logits_to_keep)
            all_logps.append(logps)
            all_entropies.append(entropies)
        entropies = torch.cat(all_entropies) if compute_entropy else None
        return torch.cat(all_logps), entropies, None

    # ------------------------------------------------------------------------------------------------------------
    # Checkpoints: policy adapter at the root (TRL), PRM adapter in prm/, PRM optimizer + scheduler beside it
    # ------------------------------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Policy adapter (TRL) at ``output_dir``, PRM adapter in ``output_dir/prm``. Called on every process, as
        `Trainer.save_model` is: gathering a sharded PRM adapter is a collective."""
        super().save_model(output_dir, _internal_call)
        prm_dir = Path(output_dir or self.args.output_dir) / PRM_DIR_NAME
        save_adapter(self.prm.model, self.prm.adapter_name, prm_dir, is_main_process=self.args.should_save)

    def _save_checkpoint(self, model, trial) -> None:
        super()._save_checkpoint(model, trial)
        if not self.args.should_save:
            return
        checkpoint_dir = Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        if self.prm.optimizer is not None:
            torch.save(self.prm.state_dict(), checkpoint_dir / PRM_STATE_NAME)
        # The settled outcome_label, the running PRM accuracy, the warnings given: a resumed run goes on as one.
        carried = carried_state(self.prime_settings, self.prime_state, self._warned)
        (checkpoint_dir / PRIME_STATE_NAME).write_text(json.dumps(carried, indent=2))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        prm_dir = Path(checkpoint) / PRM_DIR_NAME
        if not (prm_dir / "adapter_config.json").is_file():
            raise FileNotFoundError(f"Checkpoint {checkpoint} has no PRM adapter in {prm_dir}; cannot resume PRIME.")
        load_adapter_weights(self.prm.model, self.prm.adapter_name, prm_dir)
        carried_path = Path(checkpoint) / PRIME_STATE_NAME
        if carried_path.is_file():
            carried = json.loads(carried_path.read_text())
            restore_carried_state(carried, self.args.outcome_label, self.prime_settings, self.prime_state, self._warned)
        state_path = Path(checkpoint) / PRM_STATE_NAME
        if state_path.is_file():
            self.prm.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
        else:
            logger.warning(
                "Checkpoint %s has no %s; the PRM optimizer restarts from scratch.", checkpoint, PRM_STATE_NAME
            )

    def train(self, *args, **kwargs):
        """`Trainer.train`, plus: on an exception or Ctrl-C in a single process, save the last completed step; at
        the end, say so if most generation batches were fully filtered."""
        self._generations = self._fully_filtered = 0
        try:
            output = super().train(*args, **kwargs)
        except BaseException:
            if (
                self.args.save_checkpoint_on_error
                and self.accelerator.num_processes == 1
                and self.state.global_step > 0
            ):
                self._save_rescue_checkpoint()
            raise
        self._report_filtered_run()
        return output

    def _remember_prm_state(self) -> None:
        """Before a training PRM update, keep the PRM adapter and optimizer state (three adapter-sized copies, in CPU
        memory) so that a rescue checkpoint can hold the PRM of the last completed step, not one update ahead."""
        if self.prm.optimizer is None:
            return
        adapter = {id(p): p.detach().to("cpu", copy=True) for p in self.prm.parameters()}
        ema = self.prime_state.prm_accuracy_ema  # the PRIME step moves it too
        self._prm_snapshot = (self.state.global_step, adapter, _to_cpu(self.prm.state_dict()), ema)

    def _save_rescue_checkpoint(self) -> None:
        """Write ``checkpoint-<global_step>``, the state after the last completed step, unless it already exists.

        The error may come after the next step's PRM update (it runs when that step generates, e.g. out of memory
        in the policy forward that follows): the PRM is then rolled back to its state at the step's start, so
        resuming does not apply that update twice."""
        step = self.state.global_step
        checkpoint_dir = Path(self._get_output_dir(trial=None)) / f"{PREFIX_CHECKPOINT_DIR}-{step}"
        if checkpoint_dir.exists():
            logger.error(
                "Training stopped by an error; %s (the last completed step) is already saved and is left as it is. "
                "Resume with train(resume_from_checkpoint=True).",
                checkpoint_dir,
            )
            return
        snapshot = getattr(self, "_prm_snapshot", None)
        if snapshot is not None and snapshot[0] == step:  # the PRM was updated for the step that did not finish
            with torch.no_grad():
                for param in self.prm.parameters():
                    param.copy_(snapshot[1][id(param)])
            self.prm.load_state_dict(snapshot[2])
            self.prime_state.prm_accuracy_ema = snapshot[3]
        if self._rng_at_step_end is not None:  # the saved RNG state is that of the step's end, as a regular save's
            _set_rng_state(self._rng_at_step_end)
        logger.error(
            "Training stopped by an error; saving %s (the last completed step) before re-raising. Resume with "
            "train(resume_from_checkpoint=True).",
            checkpoint_dir,
        )
        try:
            self._save_checkpoint(self.model, trial=None)
        except Exception:  # the original error matters more than a failed rescue
            logger.exception("Could not write the rescue checkpoint.")


def merge_start_adapter(model: PeftModel) -> tuple[PreTrainedModel | PeftModel, LoraConfig | None]:
    """Make a `PeftModel`'s trained ``default`` adapter (e.g. an SFT adapter) the start of all three models.

    The reference is the base with adapters disabled and a new PRM adapter starts at zero, so left as it is the
    reference and the PRM would start from the bare base while the policy starts from the adapter. On a
    non-quantized base the adapter is merged into the base and a fresh ``default`` adapter with the same settings
    becomes the policy: policy, PRM and reference all start as the adapted model. On a 4-bit base merging would
    re-quantize the weights and lose the adapter, so the model is left as it is, with a warning: the policy starts
    from the adapter, the reference and the PRM from the 4-bit base.

    Returns ``(model, peft_config)`` for `GRPOTrainer`: the merged base and the policy's `LoraConfig`, or the
    model unchanged and ``None``.
    """
    if is_quantized(model):
        logger.warning(
            "PRIME: the PeftModel's 'default' adapter sits on a quantized base, where it cannot be merged without "
            "loss: the policy starts from the adapter, but the reference (adapters disabled) and the PRM start from "
            "the bare base, so the implicit rewards start at log(pi_base / pi_ref) != 0 for the policy's samples. "
            "To start all three from the adapted model, merge the adapter into a bf16 base, quantize that, and pass "
            "it with peft_config=LoraConfig(...)."
        )
        return model, None
    if list(model.peft_config) != ["default"]:
        return model, None  # other adapters (e.g. a saved PRM) are the user's choice; leave the model as given
    config = copy.deepcopy(model.peft_config["default"])
    config.inference_mode = False
    trained = any(bool(p.detach().abs().sum() > 0) for n, p in model.named_parameters() if "lora_B" in n)
    logger.info(
        "PRIME: merging the PeftModel's 'default' adapter into its base (%s); a fresh 'default' adapter with the same "
        "LoRA settings is the policy, so policy, PRM and reference start from the same model.",
        "trained" if trained else "still at its initialisation",
    )
    return model.merge_and_unload(), config


def _to_cpu(state: Any) -> Any:
    """A copy of a (nested) state dict with every tensor copied to CPU memory."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {key: _to_cpu(value) for key, value in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_to_cpu(value) for value in state)
    return copy.deepcopy(state)


def _get_rng_state() -> dict:
    """The random states a checkpoint saves (`Trainer._save_rng_state`, single process)."""
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "cpu": torch.random.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.random.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.random.set_rng_state(state["cpu"])
    if "cuda" in state:
        torch.cuda.random.set_rng_state(state["cuda"])


class _RememberStepEndRNG(TrainerCallback):
    """Keeps the random state at the end of each optimizer step, where a regular checkpoint would save it, so that
    a rescue checkpoint written mid-step resumes with the same random stream as one written at the step's end."""

    def __init__(self, trainer: PRIMETrainer):
        self.trainer = trainer

    def on_step_end(self, args, state, control, **kwargs):
        if self.trainer.accelerator.num_processes == 1:
            self.trainer._rng_at_step_end = _get_rng_state()
