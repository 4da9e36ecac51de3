"""Shared-prefix forwards: each distinct prompt of a micro-batch runs once, its K completions reuse its key/value states.

The ``K`` completions of a group share their prompt token for token, so a plain forward over ``[prompt, completion]``
rows repeats the prompt's work ``K`` times. Here a micro-batch is scored in two passes:

1. the *prompt pass* runs each distinct prompt once, without its last token, and records every layer's key/value
   states (a cache that stores rather than appends, so a gradient-checkpointing replay rewrites the same values);
2. the *completion pass* runs, per row, the last prompt token followed by the completion, attending to the prompt
   states of its group (gathered from the shared states, never stored), with the row's own attention mask.

Positions, attention masks and the tokens whose logits are scored are exactly those of the plain forward (left
padding included: the model numbers positions from the left edge of the padded row in both cases), so the log-probs
agree to float rounding. With gradients the group's ``K`` rows send their gradients into the one shared prompt
computation, which is the sum the plain forward would have formed over ``K`` copies.

The rows of a group are found by comparing prompts, not by position, so shuffled micro-batches (TRL's
``steps_per_generation``) and groups split across processes or micro-batches are handled: only rows that are
together in a micro-batch share, and a micro-batch without repeated prompts takes the plain forward.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicLayer

logger = logging.getLogger(__name__)

# Share only when it saves at least this fraction of the micro-batch's tokens: below it the second pass's fixed cost
# (one more trip through every layer) outweighs the repeated prompt work. Measured with benchmarks/prefix_cost.py:
# at 14% saved (12-token prompts, 48-token completions, K=4, demo model) sharing made the PRM passes ~15% slower.
MIN_SAVED_TOKEN_FRACTION = 0.25

_logged_reasons: set[str] = set()


def log_fallback_once(reason: str) -> None:
    """Log, once per process and reason, why a pass falls back to the plain forward."""
    if reason not in _logged_reasons:
        _logged_reasons.add(reason)
        logger.warning("share_prompt_prefix: %s; those passes run without prefix sharing.", reason)


# --------------------------------------------------------------------------------------------------------------
# Caches
# --------------------------------------------------------------------------------------------------------------


class _RecordingLayer(DynamicLayer):
    """Prompt pass: keeps the last key/value states written (overwrite, not append), so a gradient-checkpointing
    replay of the layer leaves the cache as it was."""

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.keys, self.values = key_states, value_states
        return key_states, value_states


class _SharedPrefixLayer(DynamicLayer):
    """Completion pass: returns ``[prompt states of the row's group, new states]`` and stores nothing, so the prompt
    states stay the ones of the prompt pass (in the autograd graph) however often the layer runs."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, row_group: torch.Tensor):
        super().__init__()
        self.dtype, self.device = keys.dtype, keys.device
        self.keys, self.values, self.row_group = keys, values, row_group
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        # index_select's backward sums the K rows' gradients into their group's one prompt row.
        keys = torch.cat([self.keys.index_select(0, self.row_group).to(key_states.dtype), key_states], dim=-2)
        values = torch.cat([self.values.index_select(0, self.row_group).to(value_states.dtype), value_states], dim=-2)
        return keys, values


# --------------------------------------------------------------------------------------------------------------
# When sharing applies
# --------------------------------------------------------------------------------------------------------------


def unsupported_reason(model: torch.nn.Module, needs_grad: bool) -> str | None:
    """Why shared-prefix passes cannot run on ``model`` (``None`` when they can).

    Args:
        model: the model the passes call (possibly wrapped by DDP or PEFT).
        needs_grad: whether the pass back-propagates.
    """
    inner = _unwrap(model)
    config = getattr(inner, "config", None)
    if config is None:
        return f"{type(inner).__name__} has no transformers config"
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    if getattr(text_config, "is_encoder_decoder", False):
        return "the model is an encoder-decoder"
    layer_types = getattr(text_config, "layer_types", None) or []
    if getattr(text_config, "sliding_window", None) and (
        getattr(text_config, "use_sliding_window", True) or any("sliding" in t for t in layer_types)
    ):
        return "the model uses sliding-window attention (its cache drops old prompt states)"
    if any(t not in ("full_attention",) for t in layer_types):
        return f"the model has layer types {sorted(set(layer_types))}; only full attention shares a key/value prefix"
    if _is_sharded(inner):
        return (
            "the model is a DeepSpeed engine or has sharded parameters (FSDP, ZeRO-3); shared-prefix passes are only "
            "tested in one process and with DDP"
        )
    if needs_grad and _checkpointing(inner) == "reentrant":
        return (
            "gradient checkpointing with use_reentrant=True would not carry gradients from the completions back "
            "into the shared prompt states; use gradient_checkpointing_kwargs={'use_reentrant': False}"
        )
    return None


def sharing_enabled(model: torch.nn.Module, requested: bool, needs_grad: bool, role: str) -> bool:
    """``requested`` unless ``model`` cannot share prompt prefixes, in which case the reason is logged once."""
    if not requested:
        return False
    reason = unsupported_reason(model, needs_grad)
    if reason is not None:
        log_fallback_once(f"{role}: {reason}")
    return reason is None


def _is_sharded(model: torch.nn.Module) -> bool:
    from prime_trl.algo.distributed import is_sharded

    param = next(iter(model.parameters()), None)
    return param is not None and is_sharded(param) or type(model).__name__ == "DeepSpeedEngine"


def _checkpoint_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]


def _checkpointing(model: torch.nn.Module) -> str | None:
    """``None`` (off or eval mode), ``"reentrant"`` or ``"non-reentrant"``."""
    for layer in _checkpoint_layers(model):
        if layer.gradient_checkpointing and layer.training:
            func = getattr(layer, "_gradient_checkpointing_func", None)
            keywords = getattr(func, "keywords", {}) or {}
            return "reentrant" if keywords.get("use_reentrant", True) else "non-reentrant"
    return None


@contextmanager
def _cache_through_checkpointing(model: torch.nn.Module):
    """Let checkpointed layers keep the caches: transformers drops ``past_key_values`` in a checkpointed layer,
    since a replay would append to a normal cache twice. Ours are replay-safe (see the cache layers above)."""
    layers = [layer for layer in _checkpoint_layers(model) if layer.gradient_checkpointing and layer.training]
    for layer in layers:
        layer._can_checkpoint_with_cache = True
    try:
        yield
    finally:
        for layer in layers:
            del layer._can_checkpoint_with_cache  # back to the class attribute


# --------------------------------------------------------------------------------------------------------------
# The passes
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PrefixGroups:
    """Which rows of a micro-batch share a prompt: ``first_rows[g]`` is a row holding distinct prompt ``g`` and
    ``row_group[i]`` the distinct prompt of row ``i``."""

    first_rows: torch.Tensor
    row_group: torch.Tensor

    @property
    def num_groups(self) -> int:
        return len(self.first_rows)


def find_prefix_groups(prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> PrefixGroups:
    """Group rows whose prompt (ids and padding) is identical."""
    keys = torch.cat([prompt_ids * prompt_mask, prompt_mask], dim=1)
    _, row_group = torch.unique(keys, dim=0, return_inverse=True)
    num_groups = int(row_group.max()) + 1 if len(row_group) else 0
    first_rows = torch.full((num_groups,), len(row_group), dtype=torch.long, device=row_group.device)
    first_rows.scatter_reduce_(0, row_group, torch.arange(len(row_group), device=row_group.device), reduce="amin")
    return PrefixGroups(first_rows, row_group)


def worth_sharing(groups: PrefixGroups, prompt_mask: torch.Tensor, completion_length: int) -> bool:
    """Whether the repeated prompt tokens are a large enough share of the micro-batch to pay for a second pass."""
    rows, prompt_length = prompt_mask.shape
    if prompt_length < 2 or groups.num_groups == rows:
        return False
    saved = (rows - groups.num_groups) * (prompt_length - 1)
    return saved >= MIN_SAVED_TOKEN_FRACTION * rows * (prompt_length + completion_length)


def shared_prefix_forward(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    groups: PrefixGroups,
    **forward_kwargs: Any,
):
    """Run the two passes and return the completion pass's model output.

    The completion pass's input is ``[last prompt token, completion]`` (``T + 1`` tokens per row) under the full
    ``[prompt, completion]`` attention mask, so its output lines up with the last ``T + 1`` positions of the plain
    forward; ``forward_kwargs`` go to that pass (e.g. ``labels`` + ``fused_lm_head=True`` or ``logits_to_keep``).
    The caller's grad mode and autocast apply to both passes.
    """
    with ExitStack() as stack:
        if _checkpointing(_unwrap(model)) is not None:
            stack.enter_context(_cache_through_checkpointing(_unwrap(model)))
        # 1. The prompt pass: each distinct prompt once, without its last token (that one starts the completion pass).
        recorder = Cache(layer_class_to_replicate=_RecordingLayer)
        model(
            input_ids=prompt_ids[groups.first_rows, :-1],
            attention_mask=prompt_mask[groups.first_rows, :-1],
            past_key_values=recorder,  # written by the attention layers whatever use_cache says
            use_cache=False,
            logits_to_keep=1,  # the logits are not used; keep the head's work to one position
        )
        if len(recorder.layers) == 0:
            raise RuntimeError(
                f"{type(_unwrap(model)).__name__} wrote no key/value states in the prompt pass; set "
                "share_prompt_prefix=False for this model."
            )
        # 2. The completion pass: every row, attending to its group's prompt states.
        shared = Cache(
            layers=[_SharedPrefixLayer(layer.keys, layer.values, groups.row_group) for layer in recorder.layers]
        )
        return model(
            input_ids=torch.cat([prompt_ids[:, -1:], completion_ids], dim=1),
            attention_mask=torch.cat([prompt_mask, completion_mask], dim=1),
            past_key_values=shared,
            use_cache=False,
            **forward_kwargs,
        )


def shared_completion_log_probs(
    model: torch.nn.Module,
    prompt_ids: torch.Tensor,
    prompt_mask: torch.Tensor,
    completion_ids: torch.Tensor,
    completion_mask: torch.Tensor,
    groups: PrefixGroups,
    fused: bool,
    compute_entropy: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Completion log-probs ``[B, T]`` (and the fused head's entropies when ``compute_entropy``) through the shared
    prompt states. Same contract as the plain forward: the log-prob of completion token ``t`` comes from the logits
    at the position before it (docs/algorithm.md, easy-to-get-wrong 1), which for ``t = 0`` is the last prompt token, run per row.

    Args:
        fused: the model carries TRL's fused LM head (``fused_lm_head=True`` returns log-probs, never logits).
        compute_entropy: return the fused head's per-token entropies (``fused`` only).
    """
    num_completion = completion_ids.shape[1]
    if fused:
        # Labels of the completion pass's input [last prompt token, completion]: the fused head shifts them by one.
        labels = torch.cat(
            [torch.full_like(prompt_ids[:, -1:], -100), completion_ids.masked_fill(completion_mask == 0, -100)], dim=1
        )
        outputs = shared_prefix_forward(
            model, prompt_ids, prompt_mask, completion_ids, completion_mask, groups, labels=labels, fused_lm_head=True
        )
        entropy = outputs.entropy[:, -num_completion:] if compute_entropy else None
        return outputs.log_probs[:, -num_completion:], entropy
    if compute_entropy:
        raise ValueError("compute_entropy needs the fused LM head.")
    outputs = shared_prefix_forward(
        model, prompt_ids, prompt_mask, completion_ids, completion_mask, groups, logits_to_keep=num_completion + 1
    )
    log_probs = torch.log_softmax(outputs.logits[:, :-1].float(), dim=-1)
    return log_probs.gather(-1, completion_ids.unsqueeze(-1)).squeeze(-1), None


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
