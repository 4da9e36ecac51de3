"""`PRIMETrainer`: PRIME on TRL's `GRPOTrainer`, with the implicit PRM as a LoRA adapter on the policy's base.

TRL generates, scores with the reward functions and runs the clipped policy loss. This subclass only changes
what happens between scoring and the loss (`_generate_and_score_completions`): the accuracy filter, the online
PRM update, implicit token rewards and PRIME's per-token advantages, which TRL's `_compute_loss` accepts as
``[B, T]``. The formulas are in `prime_trl.algo.core`, the PRM adapter machinery in `prime_trl.algo.prm`.
"""

from __future__ import annotations

import copy
import functools
import logging
import math
import os
import time
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel
from transformers import PreTrainedModel, TrainerCallback
from transformers.integrations import is_deepspeed_zero3_enabled
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import GRPOTrainer
from trl.trainer.utils import add_fused_lm_head

import prime_trl.algo.prefix as prefix
from prime_trl.algo.prm import (
    POLICY_ADAPTER,
    PRM_DIR_NAME,
    PRM_STATE_NAME,
    CompletionBatch,
    ImplicitPRM,
    add_prm_adapter,
    attach_prm_adapter,
    check_lora_config,
    check_policy_adapter,
    default_prm_lora_config,
    load_adapter_weights,
    make_implicit_prm,
    save_adapter,
)
from prime_trl.algo.step import PRIMESettings, PRIMEState, labels_and_outcome, prime_step
from prime_trl.rewards.reward_funcs import check_dataset_columns, guard_reward_function, resolve_verifier
from prime_trl.trainer.prime_config import PRIMEConfig
from prime_trl.trainer.quantization import is_quantized, protect_4bit_base
from prime_trl.trainer.vllm_sync import LoRAAdapterSync, engine_with_lora, guard_merge_sync, resolve_sync_mode

logger = logging.getLogger(__name__)

__all__ = ["PRM_DIR_NAME", "PRM_STATE_NAME", "PRIMETrainer"]  # the checkpoint names live in prime_trl.algo.prm


class PRIMETrainer(GRPOTrainer):
    """PRIME (Cui et al., 2025, arXiv:2502.01456) on TRL's `GRPOTrainer`.

    The policy is the LoRA adapter ``default``; the implicit PRM is a second LoRA adapter (``args.prm_adapter_name``)
    on the same frozen base; the reference for the implicit reward is that base with adapters disabled.

    Args:
        model: hub id or local path, `PreTrainedModel`, or `PeftModel` whose policy adapter is ``default``. A plain
            model with ``peft_config=None`` is trained in full; its PRM then lives on one frozen copy of the
            initial model, which is also the reference.
        prm: ``None`` (a zero-initialised adapter with the policy's LoRA settings, so PRM == reference at step 0),
            a `peft.LoraConfig`, or the directory of a saved PRM adapter (e.g. ``<checkpoint>/prm``).
        args: a `PRIMEConfig`.
        reward_funcs: TRL reward functions. The verifier (``args.verifier``, default the first) gives the PRM's
            outcome labels in [0, 1] and drives the accuracy filter; the weighted sum of all of them
            (``args.reward_weights``) is the outcome reward of the advantages.
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
        reward_funcs: Callable | list[Callable] | str | list[str],
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        peft_config: LoraConfig | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple = (None, None),
        quantization_config=None,
        reward_processing_classes=None,
    ):
        if args is None:
            model_name = model if isinstance(model, str) else type(model).__name__
            args = PRIMEConfig(output_dir=f"{str(model_name).rstrip('/').split('/')[-1]}-PRIME")
        elif not isinstance(args, PRIMEConfig):
            raise TypeError(
                f"args must be a PRIMEConfig, got {type(args).__name__}. Build it with PRIMEConfig(...) (it accepts "
                "every GRPOConfig field)."
            )
        reward_funcs = reward_funcs if isinstance(reward_funcs, list) else [reward_funcs]
        if not reward_funcs:
            raise ValueError("PRIMETrainer needs at least one reward function: the verifier that labels completions.")
        for name, dataset in (("train_dataset", train_dataset), ("eval_dataset", eval_dataset)):
            check_dataset_columns(dataset, name, reward_funcs)
        if peft_config is not None:
            check_lora_config(peft_config, "policy")
        if isinstance(model, PeftModel):
            check_policy_adapter(model, "PRIMETrainer")

        quantized = quantization_config is not None or (not isinstance(model, str) and is_quantized(model))
        sync_mode = resolve_sync_mode(args.vllm_sync_mode, quantized, args.vllm_mode) if args.use_vllm else None
        policy_lora = peft_config or (model.peft_config[POLICY_ADAPTER] if isinstance(model, PeftModel) else None)
        if sync_mode == "lora" and policy_lora is None:
            raise ValueError("vllm_sync_mode='lora' pushes the policy's LoRA adapter, so the policy must be LoRA.")
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
            )
        self._install_vllm_sync(sync_mode)
        protect_4bit_base(self.model)  # QLoRA on CPU: eval-mode forwards must not repack the base (see module)
        self.verifier_index = resolve_verifier(self.reward_func_names, args.verifier)
        self.prime_settings = PRIMESettings.from_config(args)
        self.prime_state = PRIMEState()
        self._prm_pretrain_pending = args.prm_pretrain_batches > 0
        self.prm = self._build_prm(prm if prm is not None else args.prm_name_or_path)
        self._rewards_per_func: torch.Tensor | None = None

    # ------------------------------------------------------------------------------------------------------------
    # Set-up
    # ------------------------------------------------------------------------------------------------------------

    def _build_prm(self, prm: LoraConfig | str | os.PathLike | None) -> ImplicitPRM:
        """Add the PRM adapter (on the policy's base, or on a frozen copy for a fully fine-tuned policy)."""
        args = self.args
        if isinstance(self.model, PeftModel):
            host = self.model
            attach_prm_adapter(host, args, prm)
            # TRL's fused LM head divides by the sampling temperature; PRIME's log-probs are at temperature 1.
            fused = self.temperature == 1.0
        else:
            host = self._frozen_copy_with_prm(prm)
            fused = True
            logger.info("PRIME: the PRM adapter lives on a frozen copy of the initial model (full fine-tune policy).")
        return make_implicit_prm(host, args, fused_log_probs=fused, autocast=self.accelerator.autocast)

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
        default_config = default_prm_lora_config(None, self.args.prm_lora_r, self.args.prm_lora_alpha)
        host = add_prm_adapter(base, self.args.prm_adapter_name, prm, default_config)
        if self.args.gradient_checkpointing:
            host.gradient_checkpointing_enable(gradient_checkpointing_kwargs=self.args.gradient_checkpointing_kwargs)
            host.enable_input_require_grads()
        return host

    def _install_vllm_sync(self, sync_mode: str | None) -> None:
        """The policy adapter, and only it, reaches vLLM (see prime_trl.trainer.vllm_sync)."""
        if sync_mode == "merge" and isinstance(self.model, PeftModel):
            guard_merge_sync(self.vllm_generation, self.model)
        elif sync_mode == "lora":
            LoRAAdapterSync(self.model, Path(self.args.output_dir) / "vllm_policy_adapter").install(
                self.vllm_generation
            )

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        """The policy's scheduler (TRL), then the PRM's own optimizer and scheduler, sized to the same run."""
        scheduler = super().create_scheduler(num_training_steps, optimizer)
        if self.prm.optimizer is None:
            args = self.args
            generations = math.ceil(
                num_training_steps
                * args.gradient_accumulation_steps
                / (args.steps_per_generation * self.num_iterations)
            )
            self.prm.create_optimizer_for_run(args, generations)
        return scheduler

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model)
        prm_ids = {id(p) for p in self.prm.parameters()}
        leaked = [p for group in optimizer.param_groups for p in group["params"] if id(p) in prm_ids]
        if leaked:
            raise RuntimeError(
                f"{len(leaked)} PRM parameters ended up in the policy optimizer; the PRM adapter must be inactive "
                "when training starts (do not call set_adapter on the PRM before train())."
            )
        return optimizer

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
            output["prompt_ids"], output["prompt_mask"], output["completion_ids"], output["completion_mask"]
        )
        start_time = time.perf_counter()
        output["advantages"] = self._prime_step(batch, self._rewards_per_func, mode)
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
                output["prompt_ids"], output["prompt_mask"], output["completion_ids"], output["completion_mask"]
            )
            labels, outcome = labels_and_outcome(self._rewards_per_func, self.verifier_index, self.reward_weights)
            step = prime_step(self.prm, batch, labels, outcome, self.prime_settings, self.num_generations)
            accuracies.append(step.metrics.get("prm/accuracy"))
        self._metrics, self._logs, self.state.num_input_tokens_seen = saved
        logger.info("PRIME: PRM warm-up on %d batches (training-batch PRM accuracy %s).", len(accuracies), accuracies)

    def _prime_step(self, batch: CompletionBatch, rewards_per_func: torch.Tensor, mode: str) -> torch.Tensor:
        """The PRIME step (PRM update in training mode); returns the per-token advantages ``[B_local, T_local]`` for this process's rows (docs/algorithm.md section 2, steps 3-6)."""
        group_size = self.num_generations if mode == "train" else self.num_generations_eval
        labels, outcome = labels_and_outcome(rewards_per_func, self.verifier_index, self.reward_weights)
        step = prime_step(
            self.prm, batch, labels, outcome, self.prime_settings, group_size, mode == "train", self.prime_state
        )
        for name, value in step.metrics.items():
            self._metrics[mode][name].append(value)
        return step.advantages

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
        if self.args.should_save and self.prm.optimizer is not None:
            checkpoint_dir = (
                Path(self._get_output_dir(trial=trial)) / f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            )
            torch.save(self.prm.state_dict(), checkpoint_dir / PRM_STATE_NAME)

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is None:
            return
        prm_dir = Path(checkpoint) / PRM_DIR_NAME
        if not (prm_dir / "adapter_config.json").is_file():
            raise FileNotFoundError(f"Checkpoint {checkpoint} has no PRM adapter in {prm_dir}; cannot resume PRIME.")
        load_adapter_weights(self.prm.model, self.prm.adapter_name, prm_dir)
        state_path = Path(checkpoint) / PRM_STATE_NAME
        if state_path.is_file():
            self.prm.load_state_dict(torch.load(state_path, map_location="cpu", weights_only=True))
        else:
            logger.warning(
                "Checkpoint %s has no %s; the PRM optimizer restarts from scratch.", checkpoint, PRM_STATE_NAME
            )

    def train(self, *args, **kwargs):
        """`Trainer.train`, plus: on an exception or Ctrl-C in a single process, save the last completed step."""
        try:
            return super().train(*args, **kwargs)
        except BaseException:
            if (
                self.args.save_checkpoint_on_error
                and self.accelerator.num_processes == 1
                and self.state.global_step > 0
            ):
                logger.error(
                    "Training stopped by an error; saving checkpoint-%d (the last completed step) before re-raising. "
                    "Resume with train(resume_from_checkpoint=True).",
                    self.state.global_step,
                )
                try:
                    self._save_checkpoint(self.model, trial=None)
                except Exception:  # the original error matters more than a failed rescue
                    logger.exception("Could not write the rescue checkpoint.")
            raise
