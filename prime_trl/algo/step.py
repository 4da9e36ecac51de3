"""One PRIME scoring step, independent of the training framework.

Given a batch of completions, their verifier labels and outcome rewards, this runs steps 3-6 of
docs/algorithm.md section 2: accuracy filter, reference + PRM log-probs with the online PRM update, implicit token
rewards, normalisation and per-token advantages. `PRIMETrainer` (TRL) and `PRIMEModule` (Lightning) both call
`prime_step`, so the two paths compute the same tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

import prime_trl.algo.core as core
import prime_trl.algo.distributed as distributed
from prime_trl.algo.prm import CompletionBatch, ImplicitPRM, PRMOutput
from prime_trl.algo.settings import PRIMESettings

# Weight of the newest batch in the running PRM accuracy that gates the process reward (~10-batch memory).
PRM_ACCURACY_EMA_WEIGHT = 0.1


@dataclass
class PRIMEState:
    """What the PRIME step carries from one training batch to the next (one per trainer / module).

    Attributes:
        prm_accuracy_ema: running mean (exponential, weight ``PRM_ACCURACY_EMA_WEIGHT``) of the PRM's pairwise
            accuracy on the kept training rows; ``None`` before the first batch with kept rows.
    """

    prm_accuracy_ema: float | None = None

    def update_prm_accuracy(self, accuracy: float) -> float:
        if self.prm_accuracy_ema is None:
            self.prm_accuracy_ema = accuracy
        else:
            self.prm_accuracy_ema += PRM_ACCURACY_EMA_WEIGHT * (accuracy - self.prm_accuracy_ema)
        return self.prm_accuracy_ema


def carried_state(settings: PRIMESettings, state: PRIMEState, warned: set[str]) -> dict:
    """What a training run carries from batch to batch besides weights, optimizers and random streams, as plain
    values for its checkpoints: the ``outcome_label`` in force (``"auto"`` may have settled on ``"group_mean"``, see
    `check_verifier_scores`), the running PRM accuracy of `PRIMEState` and the one-time warnings already given."""
    return {
        "outcome_label": settings.outcome_label,
        "prm_accuracy_ema": state.prm_accuracy_ema,
        "warned": sorted(warned),
    }


def restore_carried_state(
    saved: dict, configured_label: str, settings: PRIMESettings, state: PRIMEState, warned: set[str]
) -> None:
    """Put a `carried_state` back on resume, so that the run goes on as an uninterrupted one. A settled ``"auto"``
    stays settled only if the resumed run is configured with ``"auto"`` (``configured_label``): an explicit rule
    wins. Keys missing from older checkpoints leave the fresh values."""
    if configured_label == "auto" and saved.get("outcome_label") == "group_mean":
        settings.outcome_label = "group_mean"
    if saved.get("prm_accuracy_ema") is not None:
        state.prm_accuracy_ema = float(saved["prm_accuracy_ema"])
    warned.update(saved.get("warned", ()))


@dataclass
class PRIMEStep:
    """What one PRIME step gives the policy update: per-token advantages, which rows train, and the step's metrics."""

    advantages: torch.Tensor  # [B_local, T_local] for this process's rows
    metrics: dict[str, float]
    token_rewards: torch.Tensor  # [B_local, T_local] implicit rewards before normalisation (0 on rows not scored)
    kept: torch.Tensor  # [B_local] bool: rows that train (scored, not masked out, in a kept group)


def verifier_scores_and_outcome(
    rewards_per_func: torch.Tensor, verifier_indices: int | Sequence[int], reward_weights: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """From TRL's ``rewards_per_func`` ``[B, n_funcs]`` (NaN where a function gave None): each row's verifier score
    and its outcome reward (TRL's weighted sum of all functions, None counting as 0).

    With several verifiers (TRL's multi-task pattern: one reward function per task, each None on the other
    task's rows) a row's score is that of the first verifier, in the given order, that scored it. A row no
    verifier scored gets NaN: `prime_step` leaves it out of the PRM loss, the filter and the baselines.
    """
    indices = [verifier_indices] if isinstance(verifier_indices, int) else list(verifier_indices)
    scores = torch.full_like(rewards_per_func[:, 0], float("nan"))
    for index in reversed(indices):  # the first verifier that scored a row wins
        column = rewards_per_func[:, index]
        scores = torch.where(torch.isnan(column), scores, column)
    outcome = (rewards_per_func * reward_weights.to(rewards_per_func.device)).nansum(dim=1)
    return scores, outcome


def label_rule(settings: PRIMESettings, scores: torch.Tensor) -> str:
    """The `core.outcome_labels` rule for a batch: ``settings.outcome_label``, with ``"auto"`` meaning ``"score"``
    while every (non-NaN) score lies in ``[0, 1]`` and ``"group_mean"`` otherwise."""
    if settings.outcome_label != "auto":
        return settings.outcome_label
    return "score" if _inside_unit_interval(scores) else "group_mean"


def _inside_unit_interval(scores: torch.Tensor) -> bool:
    """Every non-NaN score lies in ``[0, 1]`` (true when none is scored)."""
    scored = scores[~torch.isnan(scores)]
    return scored.numel() == 0 or bool(((scored >= 0) & (scored <= 1)).all())


def check_verifier_scores(
    settings: PRIMESettings,
    rewards_per_func: torch.Tensor,
    verifier_indices: Sequence[int],
    reward_func_names: Sequence[str],
    verifier_named: bool,
) -> list[tuple[str, str]]:
    """The checks of a training batch's scores that `PRIMETrainer` and `PRIMEModule` share, before `prime_step`.

    When a verifier's scores leave ``[0, 1]`` and ``settings.outcome_label`` is ``"auto"``, it becomes
    ``"group_mean"`` in ``settings`` (the caller's own copy) for the rest of the run: labels must not flip rule
    from batch to batch, which `label_rule`'s per-batch choice alone would do.

    Args:
        settings: the run's settings; ``outcome_label`` may be changed as above.
        rewards_per_func: ``[B, n_funcs]`` scores, NaN where a function gave None.
        verifier_indices: the verifier columns.
        reward_func_names: one name per column, for the messages.
        verifier_named: the user set ``verifier`` (otherwise it defaults to the first function).

    Returns:
        ``(key, message)`` warnings; the caller gives each key once per run.
    """
    warnings = []
    for index in verifier_indices:
        column = rewards_per_func[:, index]
        if _inside_unit_interval(column):
            continue
        if settings.outcome_label == "auto":
            settings.outcome_label = "group_mean"
            action = (
                "outcome_label='auto' now labels a row correct when its score is above its group's mean, for the "
                "rest of the run"
            )
        else:
            action = f"outcome_label={settings.outcome_label!r} decides the PRM labels"
        scored = column[~torch.isnan(column)]
        warnings.append(
            (
                "score_range",
                f"PRIME: verifier {reward_func_names[index]!r} returned scores in [{float(scored.min()):.4g}, "
                f"{float(scored.max()):.4g}], outside [0, 1]; {action}. Set outcome_label ('score', 'threshold' with "
                "outcome_label_threshold, 'group_mean') to choose how scores become PRM labels and drive the "
                "accuracy filter.",
            )
        )
    if not verifier_named and rewards_per_func.shape[1] > 1:
        unscored = torch.isnan(rewards_per_func[:, 0])
        scored_elsewhere = unscored & ~torch.isnan(rewards_per_func[:, 1:]).all(-1)
        if scored_elsewhere.any():
            warnings.append(
                (
                    "default_verifier",
                    f"PRIME: the verifier defaults to the first reward function {reward_func_names[0]!r}, which "
                    f"returned None for {int(scored_elsewhere.sum())} rows that other reward functions scored; those "
                    "rows are left out of the PRM and the filter. With one reward function per task, name them all: "
                    f"verifier={','.join(reward_func_names)!r}.",
                )
            )
    return warnings


def prime_step(
    prm: ImplicitPRM | None,
    batch: CompletionBatch,
    labels: torch.Tensor,
    outcome: torch.Tensor,
    settings: PRIMESettings,
    group_size: int,
    train: bool = True,
    state: PRIMEState | None = None,
) -> PRIMEStep:
    """One PRIME step for this process's rows: the accuracy filter, the online PRM update (an optimizer step of the
    PRM when ``train``) and PRIME's per-token advantages.

    Args:
        prm: the implicit PRM (may be ``None`` only when ``settings.uses_prm`` is false).
        batch: this process's ``B_local`` rows; process ``p`` holds global rows ``p*B_local .. (p+1)*B_local-1``.
        labels: ``[B_global]`` verifier scores of every process's rows, NaN where no verifier scored the row; they
            become the PRM's outcome labels and the filter's input through ``settings.outcome_label``
            (`core.outcome_labels`).
        outcome: ``[B_global]`` outcome rewards for the advantages.
        settings: the algorithm's knobs.
        group_size: ``K``; rows of a group are contiguous in the global order.
        train: update the PRM and apply the accuracy filter (evaluation does neither).
        state: carried between training batches; needed by ``settings.process_reward_accuracy_gate`` (without
            it the gate sees only the current batch's PRM accuracy).

    A row is a member of its group when a verifier scored it and its completion mask is not empty (TRL empties it
    for truncated rows with ``mask_truncated_completions=True``). Non-members are left out of the PRM loss, of the
    filter's group accuracy and of the baselines (divisor ``members - 1``), and get zero advantage.

    Every process must call this together.
    """
    device = batch.completion_ids.device
    num_local = len(batch)
    local_rows = slice(distributed.rank() * num_local, (distributed.rank() + 1) * num_local)
    metrics: dict[str, float] = {}
    # The policy's own tokens (tool results / environment turns excluded, as in TRL's loss).
    all_mask = distributed.gather_rows(batch.loss_mask.float())
    unscored = torch.isnan(labels)
    members = ~unscored & (all_mask.sum(-1) > 0)
    labels = core.outcome_labels(
        labels.masked_fill(~members, float("nan")),
        group_size,
        label_rule(settings, labels),
        settings.outcome_label_threshold,
    )
    metrics["prime/unscored_rows"] = float(unscored.sum())
    metrics["prime/masked_rows"] = float((~unscored & ~members).sum())

    # Step 3, accuracy filter: whole groups in or out; filtered rows train neither the PRM nor the policy.
    if settings.accuracy_filter and train:
        kept_groups = core.accuracy_filter(
            labels, group_size, settings.accuracy_lower_bound, settings.accuracy_upper_bound
        )
    else:
        kept_groups = torch.ones(labels.shape[0] // group_size, dtype=torch.bool, device=device)
    kept_rows = kept_groups.repeat_interleave(group_size) & members
    metrics["filter/pass_rate"] = kept_groups.float().mean().item()

    # Steps 4-5: reference and PRM log-probs, and the online PRM update, on this process's kept rows.
    token_rewards = torch.zeros(batch.completion_mask.shape, dtype=torch.float32, device=device)
    if settings.uses_prm:
        local_kept = torch.nonzero(kept_rows[local_rows]).squeeze(-1)
        kept_batch = batch.select(local_kept)
        if train:
            global_index = local_kept + local_rows.start
            prm_out = prm.score_and_update(kept_batch, labels[global_index], group_ids=global_index // group_size)
        else:
            prm_out = prm.score(kept_batch)
        token_rewards[local_kept] = core.implicit_token_rewards(
            prm_out.prm_logps, prm_out.ref_logps, kept_batch.loss_mask.float(), settings.prime_beta
        )
        metrics.update(_prm_update_metrics(prm, prm_out))

    # Step 6 on the global batch, so that groups split over processes and the whitening see every row.
    all_rewards = distributed.gather_rows(token_rewards)
    # Tool results / environment turns (loss_mask 0) get no process reward and no advantage, as in TRL's loss.
    mask = all_mask * kept_rows.unsqueeze(-1)
    metrics.update(_reward_metrics(all_rewards, mask, labels, kept_rows, group_size))
    kept_here = kept_rows[local_rows]
    if mask.sum() == 0:  # every group filtered out: nothing to learn from this batch
        return PRIMEStep(torch.zeros_like(token_rewards), metrics, token_rewards, kept_here)
    if group_size < 2 and settings.advantage_estimator != "reinforce":
        # Only evaluation can get here (num_generations_eval=1): no baseline exists, and the eval loss is a
        # by-product anyway; the PRM metrics above are what evaluation is for.
        return PRIMEStep(torch.zeros_like(token_rewards), metrics, token_rewards, kept_here)
    if settings.process_reward_accuracy_gate is not None and "prm/accuracy" in metrics:
        settings = _gate_process_reward(settings, metrics, state if train else None)
    if settings.process_reward_norm == "batch":
        process_rewards = core.normalize_process_rewards(all_rewards, mask)
    else:
        process_rewards = all_rewards * mask
    advantages = estimate_advantages(process_rewards, outcome, mask, group_size, settings)
    return PRIMEStep(advantages[local_rows, : batch.completion_mask.shape[1]], metrics, token_rewards, kept_here)


# Former name (deprecated): the step also updates the PRM, which the name hid.
prime_advantages = prime_step


def _gate_process_reward(settings: PRIMESettings, metrics: dict[str, float], state: PRIMEState | None) -> PRIMESettings:
    """``settings`` with the process-reward coefficient scaled by ``core.accuracy_gate`` of the running training-batch
    PRM accuracy (this batch's included: its labels are known before the policy moves)."""
    accuracy = metrics["prm/accuracy"]
    if state is not None:
        accuracy = state.update_prm_accuracy(accuracy)
    scale = core.accuracy_gate(accuracy, settings.process_reward_accuracy_gate)
    metrics["process_reward/coef"] = settings.process_reward_coef * scale
    return replace(settings, process_reward_coef=settings.process_reward_coef * scale)


def estimate_advantages(
    process_rewards: torch.Tensor,
    outcome: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    settings: PRIMESettings,
) -> torch.Tensor:
    """Dispatch to the advantage estimator chosen by ``settings.advantage_estimator``; returns ``[B, T]``."""
    common = dict(
        process_coef=settings.process_reward_coef,
        outcome_coef=settings.outcome_reward_coef,
        gamma=settings.gamma,
        whiten=settings.whiten_advantages,
    )
    if settings.advantage_estimator == "rloo":
        return core.rloo_advantages(process_rewards, outcome, mask, group_size, **common)
    if settings.advantage_estimator == "grpo":
        return core.grpo_prime_advantages(process_rewards, outcome, mask, group_size, **common)
    return core.reinforce_prime_advantages(process_rewards, outcome, mask, **common)


def _prm_update_metrics(prm: ImplicitPRM, prm_out: PRMOutput) -> dict[str, float]:
    if prm_out.loss is None:
        return {}
    return {
        "prm/loss": prm_out.loss,
        "prm/grad_norm": prm_out.grad_norm,
        "prm/update_time": prm_out.update_seconds,
        "prm/learning_rate": prm.scheduler.get_last_lr()[0],
    }


def _reward_metrics(
    token_rewards: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, kept_rows: torch.Tensor, group_size: int
) -> dict[str, float]:
    """Implicit-reward statistics over the kept rows of the global batch (PRM accuracy as in the paper's Fig. 5)."""
    if not kept_rows.any():
        return {}
    seq_rewards = token_rewards.sum(-1)
    kept_groups = kept_rows.view(-1, group_size).any(-1).repeat_interleave(group_size)
    member_labels = labels.masked_fill(~kept_rows, float("nan"))  # non-members count in no pair
    metrics = {
        "prm/accuracy": core.prm_pairwise_accuracy(seq_rewards[kept_groups], member_labels[kept_groups], group_size)
    }
    for name, rows in (("correct", kept_rows & (labels >= 0.5)), ("wrong", kept_rows & (labels < 0.5))):
        if rows.any():
            metrics[f"prm/seq_reward_{name}/mean"] = seq_rewards[rows].mean().item()
            metrics[f"prm/seq_reward_{name}/std"] = seq_rewards[rows].std(unbiased=False).item()
    valid = token_rewards[mask.bool()]
    if valid.numel():
        metrics["process_reward/mean"] = valid.mean().item()
        metrics["process_reward/std"] = valid.std(unbiased=False).item()
        metrics["process_reward/abs_max"] = valid.abs().max().item()
    return metrics
