"""The implicit PRM as a LoRA adapter: adapter set-up, log-probs at temperature 1, and the online update.

Shared by `PRIMETrainer` (TRL) and `PRIMEModule` (Lightning); the math lives in `prime_trl.algo.core`.

The PRM is an adapter named e.g. ``prm`` on a `peft.PeftModel`. The reference is the same model with every
adapter disabled. With a LoRA policy this is the policy's own base (one set of base weights serves policy, PRM
and reference); with a fully fine-tuned policy it is one frozen copy of the initial model.
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, fields
from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict
from peft.utils import load_peft_weights
from trl.trainer.utils import disable_dropout_in_model, use_adapter

import prime_trl.algo.core as core
import prime_trl.algo.distributed as distributed
import prime_trl.algo.prefix as prefix

logger = logging.getLogger(__name__)

# The adapter names and checkpoint layout both frameworks use: the policy is the adapter ``default`` (TRL's name for
# the adapter it trains); a saved run has the policy adapter at its root, the PRM adapter in ``prm/`` and (TRL
# checkpoints) the PRM optimizer and scheduler state beside it.
POLICY_ADAPTER = "default"
PRM_DIR_NAME = "prm"
PRM_STATE_NAME = "prm_optimizer.pt"
PRIME_STATE_NAME = "prime_state.json"  # TRL checkpoints: `prime_trl.algo.step.carried_state`

# LoRA initialisations that rewrite the base weights; the reference (the base) would no longer be the SFT model.
_BASE_MODIFYING_INITS = ("pissa", "olora", "loftq", "corda", "eva", "orthogonal")


# --------------------------------------------------------------------------------------------------------------
# Batches and log-probs
# --------------------------------------------------------------------------------------------------------------


@dataclass
class CompletionBatch:
    """Token tensors of ``B`` prompt + completion rows: prompts left-padded ``[B, P]``, completions right-padded
    ``[B, T]``; ``completion_mask`` is 1 on completion tokens up to and including the first EOS.

    ``tool_mask`` (TRL's, for tool calling, environments and ``rollout_func``'s ``env_mask``) is 0 on tokens the
    policy did not generate (tool results, environment turns) and 1 elsewhere; ``None`` when there are none. Such
    tokens stay in the context (attended to, as ``completion_mask`` says) but are never scored: `loss_mask` is
    what the PRM loss, the token rewards and the advantages use.
    """

    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    completion_ids: torch.Tensor
    completion_mask: torch.Tensor
    tool_mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return self.completion_ids.shape[0]

    def select(self, rows: torch.Tensor | slice) -> CompletionBatch:
        return CompletionBatch(
            **{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[rows] for f in fields(self)}
        )

    @property
    def loss_mask(self) -> torch.Tensor:
        """``[B, T]``: 1 on the completion tokens the policy generated (TRL's ``completion_mask * tool_mask``)."""
        if self.tool_mask is None:
            return self.completion_mask
        return self.completion_mask * self.tool_mask.to(self.completion_mask.dtype)

    @property
    def input_ids(self) -> torch.Tensor:
        return torch.cat([self.prompt_ids, self.completion_ids], dim=1)

    @property
    def attention_mask(self) -> torch.Tensor:
        return torch.cat([self.prompt_mask, self.completion_mask], dim=1)


def completion_log_probs(
    model: torch.nn.Module, batch: CompletionBatch, fused: bool, share_prefix: bool = False
) -> torch.Tensor:
    """Log-probs ``[B, T]`` of the completion tokens at temperature 1.

    The log-prob of completion token ``t`` comes from the logits at the position before it (docs/algorithm.md, easy-to-get-wrong 1).

    Args:
        model: a causal LM (possibly a `PeftModel`).
        batch: the rows to score.
        fused: use TRL's fused LM head (``model(..., fused_lm_head=True)``), which never materialises the
            ``[B, T, vocab]`` logits. Only valid when the head was added with temperature 1.
        share_prefix: run each distinct prompt of the batch once and let its rows reuse its key/value states
            (`prime_trl.algo.prefix`), when the model supports it and it saves enough work; the log-probs agree
            with the plain forward to float rounding. The caller must pick the same value for passes whose results
            are compared exactly (the reference and the PRM).
    """
    if share_prefix:
        groups = prefix.find_prefix_groups(batch.prompt_ids, batch.prompt_mask)
        if prefix.worth_sharing(groups, batch.prompt_mask, batch.completion_ids.shape[1]):
            log_probs, _ = prefix.shared_completion_log_probs(
                model, batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask, groups, fused
            )
            return log_probs.float()
    input_ids, attention_mask = batch.input_ids, batch.attention_mask
    num_completion = batch.completion_ids.shape[1]
    if fused:
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        labels[:, :-num_completion] = -100
        outputs = model(input_ids=input_ids, attention_mask=attention_mask, labels=labels, fused_lm_head=True)
        return outputs.log_probs[:, -num_completion:].float()
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=num_completion + 1).logits
    # Row by row: a float32 log-softmax of one row at a time, never of the whole [B, T, vocab] logits.
    rows = zip(logits[:, :-1], batch.completion_ids, strict=True)
    return torch.stack([row.float().log_softmax(-1).gather(-1, ids.unsqueeze(-1)).squeeze(-1) for row, ids in rows])


def fused_log_probs_at_temperature_one(model: PeftModel, cast_lm_head_to_fp32: bool = False) -> Callable:
    """A forward of ``model``'s base with TRL's fused (chunked) LM head at temperature 1, for PRM and reference
    log-probs when the base's own fused head (the policy's) divides by a sampling temperature != 1.

    The base keeps its current forward; the returned one is used only where passed (``log_prob_model``). LoRA
    layers live in the modules, so the adapter selected around a call (`use_adapter`) applies to either forward."""
    from trl.trainer.utils import add_fused_lm_head

    base = model.get_base_model()
    policy_forward = base.forward
    add_fused_lm_head(base, temperature=1.0, cast_lm_head_to_fp32=cast_lm_head_to_fp32)
    temperature_one_forward = base.forward
    base.forward = policy_forward
    return temperature_one_forward


# --------------------------------------------------------------------------------------------------------------
# Adapter set-up and persistence
# --------------------------------------------------------------------------------------------------------------


def check_lora_config(config: LoraConfig, role: str, use_vllm: bool = False) -> None:
    """Reject LoRA settings PRIME cannot honour, with the fix in the message."""
    if not isinstance(config, LoraConfig):
        raise TypeError(f"The {role} adapter must be a peft.LoraConfig, got {type(config).__name__}.")
    init = config.init_lora_weights
    if isinstance(init, str) and init.lower().startswith(_BASE_MODIFYING_INITS):
        raise ValueError(
            f"The {role} adapter uses init_lora_weights={init!r}, which rewrites the base weights; the PRIME "
            "reference is the base with adapters disabled, so it would no longer be the starting model. Use "
            "init_lora_weights=True (or 'gaussian')."
        )
    if role == "PRM" and config.modules_to_save and use_vllm:
        raise ValueError(
            f"The PRM adapter sets modules_to_save={config.modules_to_save} and use_vllm=True: TRL's vLLM weight "
            "sync renames only the policy's full-module copies (modules_to_save.default.*), so the PRM's copies would "
            "reach vLLM under names it does not know. Give the PRM LoRA layers only (prm=LoraConfig(..., "
            "modules_to_save=None)) or train without vLLM."
        )
    targets = config.target_modules
    names = [targets] if isinstance(targets, str) else list(targets or [])
    if "lm_head" in names:
        raise ValueError(
            f"The {role} adapter puts LoRA layers on lm_head; TRL computes log-probs from lm_head.weight directly, so "
            "they would be ignored. Remove 'lm_head' from target_modules (modules_to_save=['lm_head'] works: each "
            "adapter then trains its own copy of the head)."
        )


def _lora_refused_names(model: torch.nn.Module, names: set[str]) -> set[str]:
    """The module names among ``names`` that PEFT refuses to wrap with LoRA on this architecture (the Mamba mixers'
    ``out_proj`` / ``conv1d`` of NemotronH, Falcon-H1, Mamba, ...), by asking PEFT's own check."""
    try:
        from peft.tuners.tuners_utils import _check_lora_target_modules_mamba as peft_check
    except ImportError:  # a PEFT without the check: it will not refuse either
        return set()
    probe = LoraConfig()
    refused = set()
    for name in names:
        try:
            peft_check(probe, model, name)
        except ValueError:
            refused.add(name)
    return refused


def _linear_module_names(model: torch.nn.Module) -> set[str]:
    """Leaf names of the model's linear layers, without the output head (what PEFT's ``all-linear`` means)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.Linear) and module is not head and name
    }


def default_target_modules(model: torch.nn.Module | None) -> str | list[str]:
    """The PRM adapter's default targets: ``"all-linear"``, minus the modules PEFT refuses on this architecture.

    On hybrid Mamba models (e.g. NemotronH) that drops the mixers' ``out_proj`` (PEFT's rule) and keeps every
    other linear layer, attention and Mamba ``in_proj`` included; everywhere else it is exactly ``"all-linear"``.
    """
    if model is None:
        return "all-linear"
    linear = _linear_module_names(model)
    refused = _lora_refused_names(model, linear | {"conv1d"})
    if not refused:
        return "all-linear"
    return sorted(linear - refused)


def check_lora_targets(config: LoraConfig, model: torch.nn.Module, role: str) -> None:
    """Refuse, before the adapter is built, targets that LoRA cannot wrap on this architecture, naming the module
    and the targets that work."""
    targets = config.target_modules
    if targets is None or (isinstance(targets, str) and targets != "all-linear"):
        return  # PEFT's per-architecture defaults, or a regex: PEFT checks those itself
    names = _linear_module_names(model) if targets == "all-linear" else set(targets)
    refused = _lora_refused_names(model, names)
    if refused:
        model_type = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
        raise ValueError(
            f"The {role} adapter targets {sorted(refused)} ({targets!r}), Mamba mixer modules of this {model_type} "
            f"model that LoRA cannot wrap. Use target_modules={default_target_modules(model)!r}"
            + (" or leave prm=None (its default skips them)." if role == "PRM" else ".")
        )


def check_policy_adapter(model: PeftModel, owner: str) -> None:
    """A `PeftModel` given as the policy must carry its LoRA policy adapter under the name ``default``."""
    if POLICY_ADAPTER not in model.peft_config:
        raise ValueError(
            f"The PeftModel's adapters are {list(model.peft_config)}; {owner} trains the adapter named "
            f"'{POLICY_ADAPTER}' as the policy. Load your policy adapter under the name '{POLICY_ADAPTER}'."
        )
    check_lora_config(model.peft_config[POLICY_ADAPTER], "policy")


def check_new_prm_config(config: LoraConfig) -> None:
    """A new PRM adapter must start as the reference (eq. 1's r_t = 0 at step 0): LoRA's ``B`` initialised to 0."""
    if config.init_lora_weights is False:
        raise ValueError(
            "The PRM LoraConfig sets init_lora_weights=False, which initialises both LoRA matrices randomly: the PRM "
            "would differ from the reference at step 0 and its implicit rewards would start as noise. Use "
            "init_lora_weights=True (or 'gaussian'), or pass a trained PRM adapter directory as prm=."
        )


def default_prm_lora_config(
    policy_config: LoraConfig | None,
    r: int | None = None,
    alpha: int | None = None,
    model: torch.nn.Module | None = None,
    use_vllm: bool = False,
) -> LoraConfig:
    """A new PRM adapter's settings: the policy's LoRA settings (or r=16, alpha=32 on the linear layers LoRA can
    wrap in ``model``, see `default_target_modules`), with dropout 0 (deterministic rewards) and zero-initialised
    ``B`` so that PRM == reference at step 0.

    The policy's ``modules_to_save`` are kept: the PRM then trains its own copies of those modules (the policy
    has its own, the reference uses the base's). Not with vLLM, whose weight sync knows only the policy's copies.
    """
    if policy_config is not None:
        config = copy.deepcopy(policy_config)
    else:
        config = LoraConfig(r=16, lora_alpha=32, target_modules=default_target_modules(model), task_type="CAUSAL_LM")
    config.lora_dropout = 0.0
    config.init_lora_weights = True
    if use_vllm:
        config.modules_to_save = None  # see check_lora_config
    config.inference_mode = False
    if r is not None:
        config.r = r
    if alpha is not None:
        config.lora_alpha = alpha
    return config


def freeze_adapter(model: PeftModel, adapter_name: str) -> None:
    """Set ``requires_grad=False`` on one adapter (``set_adapter`` / ``use_adapter`` turn it on when active)."""
    for param in adapter_parameters(model, adapter_name):
        param.requires_grad_(False)


def adapter_parameters(model: torch.nn.Module, adapter_name: str) -> list[torch.nn.Parameter]:
    """The parameters of one adapter, identified by PEFT's ``.<adapter_name>.`` naming."""
    marker = f".{adapter_name}."
    return [param for name, param in model.named_parameters() if marker in name]


def add_prm_adapter(
    model: torch.nn.Module,
    adapter_name: str,
    prm: LoraConfig | str | Path | None,
    default_config: LoraConfig,
    use_vllm: bool = False,
) -> PeftModel:
    """Add the PRM adapter to ``model``: from a saved adapter directory, a `LoraConfig`, or ``default_config``.

    ``model`` is either the policy's `PeftModel` (the adapter is added beside the policy adapter, frozen and inactive;
    the active adapter does not change) or a plain model (a fully fine-tuned policy's frozen copy), which is wrapped
    in a `PeftModel` whose only adapter is the PRM. Returns the `PeftModel` carrying the adapter.
    """
    is_peft = isinstance(model, PeftModel)
    if is_peft and adapter_name in model.peft_config:
        raise ValueError(f"The model already has an adapter named {adapter_name!r}; choose another prm_adapter_name.")
    if isinstance(prm, (str, os.PathLike)):
        path = Path(prm)
        if not (path / "adapter_config.json").is_file():
            raise FileNotFoundError(
                f"prm={str(prm)!r} is not a saved PEFT adapter directory (no adapter_config.json). Pass the `prm/` "
                "folder of a prime-trl checkpoint or output directory."
            )
        config = LoraConfig.from_pretrained(str(path))
        check_lora_config(config, "PRM", use_vllm)
        check_lora_targets(config, model, "PRM")
        config.inference_mode = False
    else:
        path = None
        config = prm if prm is not None else default_config
        check_lora_config(config, "PRM", use_vllm)
        check_new_prm_config(config)
        check_lora_targets(config, model, "PRM")
        if config.lora_dropout:
            logger.warning(
                "The PRM LoraConfig has lora_dropout=%s; implicit rewards will be noisy. PRIME uses 0.",
                config.lora_dropout,
            )
    if is_peft:
        model.add_adapter(adapter_name, config)
    else:
        model = get_peft_model(model, config, adapter_name=adapter_name)
    if path is not None:
        load_adapter_weights(model, adapter_name, path)
    freeze_adapter(model, adapter_name)
    return model


def attach_prm_adapter(model: PeftModel, config, prm: LoraConfig | str | Path | None = None) -> None:
    """Add the PRM adapter ``config.prm_adapter_name`` next to the policy adapter ``default`` of ``model``.

    ``config`` is a `PRIMEConfig` (or anything with its ``prm_*`` fields); a new adapter copies the policy's LoRA
    settings (see `default_prm_lora_config`).
    """
    use_vllm = bool(getattr(config, "use_vllm", False))
    default_config = default_prm_lora_config(
        model.peft_config[POLICY_ADAPTER], config.prm_lora_r, config.prm_lora_alpha, use_vllm=use_vllm
    )
    add_prm_adapter(model, config.prm_adapter_name, prm, default_config, use_vllm)


def make_implicit_prm(
    host: PeftModel,
    config,
    *,
    fused_log_probs: bool,
    autocast: Callable[[], AbstractContextManager] = nullcontext,
    log_prob_model: Callable | None = None,
) -> ImplicitPRM:
    """The online PRM for the adapter ``config.prm_adapter_name`` on ``host``, configured by the same-named
    fields of a `PRIMESettings` (`PRIMEConfig` or the Lightning module's config). Both frameworks build it here;
    with ``config.disable_dropout`` the host's dropout is switched off (deterministic PRM and reference log-probs)."""
    if config.disable_dropout:
        disable_dropout_in_model(host)
    logger.info(
        "PRIME: PRM adapter %r with %d trainable parameters.",
        config.prm_adapter_name,
        sum(p.numel() for p in adapter_parameters(host, config.prm_adapter_name)),
    )
    return ImplicitPRM(
        host,
        config.prm_adapter_name,
        beta=config.prime_beta,
        loss_type=config.prm_loss_type,
        update_mode=config.prm_update,
        micro_batch_size=config.prm_micro_batch_size or config.per_device_train_batch_size,
        num_mini_batches=config.prm_num_mini_batches,
        max_grad_norm=config.prm_max_grad_norm,
        fused_log_probs=fused_log_probs,
        autocast=autocast,
        share_prompt_prefix=getattr(config, "share_prompt_prefix", False),
        log_prob_model=log_prob_model,
    )


def save_adapter(model: PeftModel, adapter_name: str, directory: str | Path, is_main_process: bool = True) -> None:
    """Write one adapter as a standalone PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors``),
    loadable with ``PeftModel.from_pretrained(base, directory)`` or ``model.load_adapter(directory, name)``.

    When the adapter is sharded (FSDP2, DeepSpeed ZeRO-3) gathering it is a collective: every process calls this,
    and only the one with ``is_main_process`` writes."""
    from safetensors.torch import save_file

    with distributed.full_parameters(adapter_parameters(model, adapter_name)):
        state = get_peft_model_state_dict(model, adapter_name=adapter_name)
        state = {key: distributed.full_tensor(value).detach().cpu().clone() for key, value in state.items()}
    if not is_main_process:
        return
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    save_file(state, str(directory / "adapter_model.safetensors"))
    config = copy.deepcopy(model.peft_config[adapter_name])
    config.inference_mode = True
    config.save_pretrained(str(directory))


def load_adapter_weights(model: PeftModel, adapter_name: str, directory: str | Path) -> None:
    """Load weights saved by `save_adapter` (or PEFT) into an existing adapter, checking nothing is missed."""
    state = load_peft_weights(str(directory), device=str(next(model.parameters()).device))
    with distributed.full_parameters(adapter_parameters(model, adapter_name), modify=True):  # ZeRO-3: collective
        result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    missing = [key for key in result.missing_keys if f".{adapter_name}." in key]
    if missing:
        raise RuntimeError(f"Loading the {adapter_name!r} adapter from {directory} left {len(missing)} weights unset.")


# --------------------------------------------------------------------------------------------------------------
# The online PRM
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PRMOutput:
    """What one PRM pass over a batch gives back (rows in the order they came in)."""

    prm_logps: torch.Tensor  # [N, T] detached, the log-probs the token rewards are computed from
    ref_logps: torch.Tensor  # [N, T]
    loss: float | None = None  # global mean PRM loss over the mini-batches (None without an update)
    grad_norm: float | None = None  # mean pre-clip gradient norm over the PRM optimizer steps
    update_seconds: float = 0.0
    optimizer_steps: int = 0


class ImplicitPRM:
    """Owns the PRM adapter's optimizer and runs PRIME's online PRM update (docs/algorithm.md section 2, step 5).

    Args:
        model: the `PeftModel` carrying the adapter. In data-parallel training pass the *unwrapped* model: the
            PRM's gradients are summed here, not by the DDP wrapper.
        adapter_name: the PRM adapter.
        beta: ``prime_beta``.
        loss_type: ``"ce"`` or ``"dpo"``.
        update_mode: ``"single"``, ``"double"`` or ``"none"``.
        micro_batch_size: rows per forward / backward.
        num_mini_batches: PRM optimizer steps per call of `score_and_update`.
        max_grad_norm: clip of the PRM gradient norm.
        fused_log_probs: whether ``model`` (or ``log_prob_model``) carries TRL's fused LM head at temperature 1.
        autocast: factory of the mixed-precision context used for every forward.
        share_prompt_prefix: score each distinct prompt of a micro-batch once, its rows sharing its key/value
            states (`prime_trl.algo.prefix`), where the model supports it; the reference and the PRM always take
            the same path, so their log-probs stay exactly equal while the PRM equals the reference.
        log_prob_model: the forward that computes log-probs, when it is not ``model`` itself (e.g. a fused head at
            temperature 1 on ``model``'s base while the policy's own head divides by the sampling temperature).
    """

    def __init__(
        self,
        model: PeftModel,
        adapter_name: str,
        *,
        beta: float,
        loss_type: str = "ce",
        update_mode: str = "single",
        micro_batch_size: int = 4,
        num_mini_batches: int = 1,
        max_grad_norm: float = 10.0,
        fused_log_probs: bool = False,
        autocast: Callable[[], AbstractContextManager] = nullcontext,
        share_prompt_prefix: bool = False,
        log_prob_model: Callable | None = None,
    ):
        self.model = model
        self.log_prob_model = log_prob_model if log_prob_model is not None else model
        self.adapter_name = adapter_name
        self.beta = beta
        self.loss_type = loss_type
        self.update_mode = update_mode
        self.micro_batch_size = micro_batch_size
        self.num_mini_batches = num_mini_batches
        self.max_grad_norm = max_grad_norm
        self.fused_log_probs = fused_log_probs
        self.autocast = autocast
        self.share_prompt_prefix = share_prompt_prefix
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None

    # ----- parameters and optimizer -----

    def parameters(self) -> list[torch.nn.Parameter]:
        return adapter_parameters(self.model, self.adapter_name)

    def create_optimizer(
        self,
        learning_rate: float,
        weight_decay: float = 0.0,
        scheduler_type: str = "constant",
        warmup_steps: int = 0,
        total_steps: int | None = None,
    ) -> None:
        """AdamW over the PRM adapter only, plus a transformers learning-rate schedule."""
        self.optimizer = torch.optim.AdamW(self.parameters(), lr=learning_rate, weight_decay=weight_decay)
        self.create_scheduler(scheduler_type, warmup_steps, total_steps)

    def create_scheduler(self, scheduler_type: str = "constant", warmup_steps: int = 0, total_steps: int | None = None):
        """A fresh learning-rate schedule on the existing optimizer (e.g. for a second training run)."""
        from transformers import get_scheduler

        self.scheduler = get_scheduler(
            scheduler_type, self.optimizer, num_warmup_steps=warmup_steps, num_training_steps=total_steps
        )

    def create_optimizer_for_run(self, config, num_generation_batches: int | None) -> None:
        """`create_optimizer` from the ``prm_*`` fields of a `PRIMESettings`, with the schedule sized for a run of
        ``num_generation_batches`` PRIME steps (``prm_num_mini_batches`` PRM optimizer steps each; ``None`` when the
        run's length is unknown, which only constant schedules accept)."""
        total_steps = (
            max(1, num_generation_batches * config.prm_num_mini_batches) if num_generation_batches is not None else None
        )
        self.create_optimizer(
            config.prm_learning_rate,
            config.prm_weight_decay,
            config.prm_lr_scheduler_type,
            config.prm_warmup_steps,
            total_steps=total_steps,
        )

    def state_dict(self) -> dict:
        return {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])

    # ----- forwards -----

    def _adapter(self, adapter: str | None) -> AbstractContextManager:
        """Activate ``adapter`` on the host model (``None``: every adapter off, i.e. the reference)."""
        return use_adapter(self.model, adapter)

    def _log_probs(self, batch: CompletionBatch, adapter: str | None, share_prefix: bool) -> torch.Tensor:
        """Completion log-probs under ``adapter`` (``None``: adapters disabled = reference), no gradient."""
        with torch.no_grad(), self._adapter(adapter), self.autocast():
            return completion_log_probs(self.log_prob_model, batch, self.fused_log_probs, share_prefix)

    def _share_prefix(self) -> bool:
        """Whether this call's passes share prompt prefixes. Decided once per call for the reference and the PRM
        together (for the gradient pass when there is one), so both take the same path (docs/algorithm.md, easy-to-get-wrong 5)."""
        if self.log_prob_model is not self.model:  # a separate temperature-1 forward: plain passes only
            return False
        needs_grad = self.update_mode != "none"
        return prefix.sharing_enabled(self.model, self.share_prompt_prefix, needs_grad, "PRM and reference passes")

    def _micro_batches(self, rows: torch.Tensor) -> Iterator[torch.Tensor | None]:
        """Row indices of each micro-batch.

        With sharded parameters (FSDP2, ZeRO-3) every forward and backward is a collective, so all processes must
        run the same number of micro-batches even when the accuracy filter left them different row counts: a process
        that runs out yields ``None``, meaning a placeholder pass that contributes nothing.
        """
        # No empty chunk: splitting zero rows gives one, and a model forward on zero rows fails.
        chunks: list[torch.Tensor | None] = [chunk for chunk in rows.split(self.micro_batch_size) if len(chunk)]
        if self._lockstep():
            count = int(distributed.all_reduce_max(torch.tensor(len(chunks), device=rows.device)))
            chunks += [None] * (count - len(chunks))
        yield from chunks

    def _lockstep(self) -> bool:
        return distributed.is_distributed() and distributed.is_sharded(self.parameters()[0])

    def _placeholder(self, batch: CompletionBatch) -> CompletionBatch:
        """A one-row batch whose completion is fully masked: a forward that takes part in the collectives."""
        ids = batch.completion_ids.new_zeros(1, 1)
        return CompletionBatch(ids, torch.ones_like(ids), ids, torch.zeros_like(ids))

    def score(self, batch: CompletionBatch) -> PRMOutput:
        """PRM and reference log-probs without any update (``prm_update="none"`` and evaluation)."""
        prm_parts, ref_parts = [], []
        share = self._share_prefix()
        for rows in self._micro_batches(torch.arange(len(batch), device=batch.completion_ids.device)):
            micro = batch.select(rows) if rows is not None else self._placeholder(batch)
            # Reference and PRM see identical micro-batches, so at step 0 (PRM == reference) the rewards are
            # exactly zero rather than O(1e-7) noise that normalisation would blow up (docs/algorithm.md, easy-to-get-wrong 5).
            ref_logps = self._log_probs(micro, None, share)
            prm_logps = self._log_probs(micro, self.adapter_name, share)
            if rows is not None:
                ref_parts.append(ref_logps)
                prm_parts.append(prm_logps)
        return PRMOutput(prm_logps=_cat_rows(prm_parts, batch), ref_logps=_cat_rows(ref_parts, batch))

    def score_and_update(
        self, batch: CompletionBatch, labels: torch.Tensor, group_ids: torch.Tensor | None = None
    ) -> PRMOutput:
        """One online PRM update on ``batch`` (this process's rows) and the log-probs for the token rewards.

        Args:
            batch: ``N`` rows, each group's rows together (groups may continue on other processes).
            labels: ``[N]`` outcome labels in ``[0, 1]``.
            group_ids: ``[N]`` global group index of each row; needed by the DPO loss.

        Every process must call this together (gradients and counts are summed over processes), even with
        ``N = 0``.
        """
        if self.update_mode == "none":
            return self.score(batch)
        if self.optimizer is None:
            raise RuntimeError("ImplicitPRM.create_optimizer() must be called before score_and_update().")
        start_time = time.perf_counter()
        device = batch.completion_ids.device
        group_context = self._dpo_group_context(batch, labels, group_ids) if self.loss_type == "dpo" else None

        mini_batches = torch.arange(len(batch), device=device).tensor_split(self.num_mini_batches)
        # Each row's loss is weighted by 1 / (rows of its mini-batch over all processes); summing the gradients
        # over processes then gives the exact global mean, however unevenly the filter left rows per process.
        global_rows = distributed.all_reduce_sum(torch.tensor([len(m) for m in mini_batches], device=device).float())
        params = self.parameters()
        share = self._share_prefix()
        prm_parts, ref_parts, losses, grad_norms = [], [], [], []
        for mini_rows, mini_size in zip(mini_batches, global_rows.tolist(), strict=True):
            if mini_size == 0:
                continue
            mini_loss = torch.zeros((), device=device)
            for rows in self._micro_batches(mini_rows):
                micro = batch.select(rows) if rows is not None else self._placeholder(batch)
                ref_logps = self._log_probs(micro, None, share)
                # Forward and backward both inside the adapter context: with gradient checkpointing the backward
                # re-runs the forward, and it must see the PRM adapter active (docs/algorithm.md, easy-to-get-wrong 7).
                with torch.enable_grad(), self._adapter(self.adapter_name), self.autocast():
                    prm_logps = completion_log_probs(self.log_prob_model, micro, self.fused_log_probs, share)
                    if rows is None:  # placeholder pass (sharded parameters): join the collectives, add nothing
                        (prm_logps.sum() * 0).backward()
                        continue
                    loss = self._loss(prm_logps, ref_logps, micro, labels[rows], rows, group_context)
                    (loss * len(rows) / mini_size).backward()
                mini_loss += loss.detach() * len(rows) / mini_size
                prm_parts.append(prm_logps.detach())
                ref_parts.append(ref_logps)
            # ZeRO-3 partitions the adapter but leaves it out of its engine: step on the gathered full values.
            with distributed.full_parameters(params, modify=True):
                distributed.all_reduce_gradients(params)
                grad_norms.append(float(torch.nn.utils.clip_grad_norm_(params, self.max_grad_norm)))
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            self.scheduler.step()
            losses.append(float(distributed.all_reduce_sum(mini_loss)))

        if self.update_mode == "double":
            rescored = self.score(batch)
            prm_logps, ref_logps = rescored.prm_logps, rescored.ref_logps
        else:
            prm_logps, ref_logps = _cat_rows(prm_parts, batch), _cat_rows(ref_parts, batch)
        return PRMOutput(
            prm_logps=prm_logps,
            ref_logps=ref_logps,
            loss=sum(losses) / len(losses) if losses else None,
            grad_norm=sum(grad_norms) / len(grad_norms) if grad_norms else None,
            update_seconds=time.perf_counter() - start_time,
            optimizer_steps=len(losses),
        )

    def _loss(
        self,
        prm_logps: torch.Tensor,
        ref_logps: torch.Tensor,
        micro: CompletionBatch,
        labels: torch.Tensor,
        rows: torch.Tensor,
        group_context: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        mask = micro.loss_mask.to(prm_logps.dtype)
        if self.loss_type == "ce":
            return core.prm_ce_loss(prm_logps, ref_logps, mask, labels, self.beta)
        group_log_ratios, group_labels = group_context
        return core.prm_dpo_loss(
            prm_logps, ref_logps, mask, labels, self.beta, group_log_ratios[rows], group_labels[rows]
        )

    def _dpo_group_context(
        self, batch: CompletionBatch, labels: torch.Tensor, group_ids: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """For every local row, the detached ``Q = sum_t (prm - ref)`` and labels of all members of its group
        (``[N, K]`` each), gathered over processes since a group may straddle them."""
        if group_ids is None:
            raise ValueError("The DPO PRM loss needs group_ids for every row.")
        scored = self.score(batch)
        log_ratios = ((scored.prm_logps - scored.ref_logps) * batch.loss_mask).sum(-1)
        all_ratios = distributed.gather_rows(log_ratios)
        all_labels = distributed.gather_rows(labels.to(log_ratios.dtype))
        all_groups = distributed.gather_rows(group_ids)
        same_group = group_ids.unsqueeze(-1) == all_groups.unsqueeze(0)  # [N, N_global]
        group_size = int(same_group.sum(-1).max()) if len(group_ids) else 0
        # Stack each row's group members as [N, K]. A group may have fewer trained rows than K (unscored or masked
        # rows are left out): pad with a sentinel member whose NaN label makes it nobody's opponent.
        sentinel = len(all_ratios)
        all_ratios = torch.cat([all_ratios, all_ratios.new_zeros(1)])
        all_labels = torch.cat([all_labels, all_labels.new_full((1,), float("nan"))])
        members = []
        for row in same_group:
            found = torch.nonzero(row).squeeze(-1)
            members.append(torch.cat([found, found.new_full((group_size - len(found),), sentinel)]))
        index = torch.stack(members) if members else torch.zeros(0, group_size, dtype=torch.long)
        return all_ratios[index], all_labels[index]


def _cat_rows(parts: list[torch.Tensor], batch: CompletionBatch) -> torch.Tensor:
    if parts:
        return torch.cat(parts)
    return batch.completion_mask.new_zeros(batch.completion_mask.shape, dtype=torch.float32)
