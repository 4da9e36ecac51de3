"""PRIME's formulas as small pure torch functions (no model code).

Shapes follow docs/algorithm.md section 1:

- ``B = G * K`` rows: ``G`` prompt groups of ``K = group_size`` completions each, rows of a group contiguous.
- ``T`` completion positions; ``mask[B, T]`` is 1 on completion tokens up to and including the first EOS.
- ``prm_logps`` / ``ref_logps`` ``[B, T]``: log-probs of the sampled tokens under the PRM adapter and under the
  reference (adapters disabled), both at temperature 1.
- ``scores[B]``: verifier outcome scores in ``[0, 1]``.
- Group membership: a row is a member of its group iff its ``mask`` row is non-empty (and, for scores/labels, iff
  its value is not NaN). Non-members (rows no verifier scored, completions masked by
  ``mask_truncated_completions``, rows of filtered groups) are left out of every group statistic: leave-one-out
  baselines divide by ``members - 1``, group means and stds run over members only, and they get zero advantage.

Equation numbers ``(N)`` refer to docs/algorithm.md, which also gives the paper's own numbers (Cui et al.,
"Process Reinforcement through Implicit Rewards", arXiv:2502.01456). Where the official code (PRIME-RL/PRIME) and
the paper differ, we follow the code and say so (docs/algorithm.md section 4).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "implicit_token_rewards",
    "sequence_implicit_rewards",
    "prm_ce_loss",
    "prm_dpo_loss",
    "normalize_process_rewards",
    "discounted_returns",
    "masked_whiten",
    "rloo_advantages",
    "grpo_prime_advantages",
    "reinforce_prime_advantages",
    "clipped_policy_loss",
    "accuracy_filter",
    "outcome_labels",
    "prm_pairwise_accuracy",
    "accuracy_gate",
]

_EPS_NORM = 1e-6
_EPS_WHITEN = 1e-8


# --------------------------------------------------------------------------------------------------------------
# Implicit rewards and the PRM losses
# --------------------------------------------------------------------------------------------------------------


def implicit_token_rewards(
    prm_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """Dense implicit process reward ``r_t = beta * log(pi_prm(y_t|y_<t) / pi_ref(y_t|y_<t))`` (eq. 1).

    Args:
        prm_logps, ref_logps: ``[B, T]`` token log-probs under PRM and reference.
        mask: ``[B, T]`` completion mask (1 = counts).
        beta: ``prime_beta``.

    Returns:
        ``[B, T]`` rewards, zero where ``mask == 0``.
    """
    return beta * (prm_logps - ref_logps) * mask


def sequence_implicit_rewards(
    prm_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, beta: float
) -> torch.Tensor:
    """Sequence-level implicit reward ``r(y) = beta * sum_t mask * (prm - ref)`` (eq. 2), shape ``[B]``."""
    return implicit_token_rewards(prm_logps, ref_logps, mask, beta).sum(dim=-1)


def prm_ce_loss(
    prm_logps: torch.Tensor, ref_logps: torch.Tensor, mask: torch.Tensor, labels: torch.Tensor, beta: float
) -> torch.Tensor:
    """Cross-entropy PRM loss (eq. 3): BCE-with-logits of ``r(y)`` against the outcome label.

    Args:
        prm_logps, ref_logps, mask: ``[B, T]``.
        labels: ``[B]`` outcome labels in ``[0, 1]`` (soft labels allowed).
        beta: ``prime_beta``.

    Returns:
        Scalar, the mean over rows.
    """
    seq_rewards = sequence_implicit_rewards(prm_logps, ref_logps, mask, beta)
    return F.binary_cross_entropy_with_logits(seq_rewards, labels.to(seq_rewards.dtype))


def prm_dpo_loss(
    prm_logps: torch.Tensor,
    ref_logps: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    beta: float,
    group_log_ratios: torch.Tensor,
    group_labels: torch.Tensor,
) -> torch.Tensor:
    """Pairwise (DPO-style) PRM loss of the veRL PRIME recipe (eq. 3b).

    Each row is compared with the members of its group that it should beat (or lose to): a row with a positive
    label is compared with members of lower score, otherwise with members of higher score. With
    ``Q_j = sum_t mask * (prm - ref)`` for those members, computed beforehand without gradient,
    ``loss_i = -log sigmoid(sign_i * (beta * Q_i - beta * mean_j Q_j))`` where ``sign_i = +1`` if the label is
    positive, else ``-1``. A row with nobody to compare against uses 0 as the baseline (the CE-like limit).

    Args:
        prm_logps, ref_logps, mask: ``[N, T]`` for the ``N`` rows being trained (a micro-batch).
        labels: ``[N]`` outcome labels of those rows.
        beta: ``prime_beta``.
        group_log_ratios: ``[N, K]`` the detached ``Q`` of every member of each row's group.
        group_labels: ``[N, K]`` the labels of every member of each row's group.

    Returns:
        Scalar, the mean over rows.
    """
    own = sequence_implicit_rewards(prm_logps, ref_logps, mask, beta)
    labels = labels.to(own.dtype).unsqueeze(-1)
    positive = labels > 0
    opponents = torch.where(positive, group_labels < labels, group_labels > labels).to(own.dtype)
    n_opponents = opponents.sum(dim=-1)
    opponent_mean = (group_log_ratios.to(own.dtype) * opponents).sum(dim=-1) / n_opponents.clamp(min=1)
    baseline = beta * torch.where(n_opponents > 0, opponent_mean, torch.zeros_like(opponent_mean))
    sign = positive.squeeze(-1).to(own.dtype) * 2 - 1
    return -F.logsigmoid(sign * (own - baseline)).mean()


# --------------------------------------------------------------------------------------------------------------
# Returns, normalisation, whitening
# --------------------------------------------------------------------------------------------------------------


def discounted_returns(values: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """Return-to-go (eq. 4), a reverse discounted cumulative sum along the last axis: ``G_t = sum_{s>=t} gamma^(s-t) values_s``.

    ``values`` ``[B, T]`` should already be zero on masked positions.
    """
    if gamma == 1.0:
        return values.flip(-1).cumsum(-1).flip(-1)
    returns = torch.zeros_like(values)
    running = torch.zeros_like(values[..., 0])
    for t in range(values.shape[-1] - 1, -1, -1):
        running = values[..., t] + gamma * running
        returns[..., t] = running
    return returns


def normalize_process_rewards(rewards: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Batch normalisation of process rewards (eq. 5; official ``prime_norm=batch_norm``).

    ``Z`` is the largest absolute return-to-go ``|sum_{s>=t} rewards_s|`` over all valid positions of the batch;
    dividing by it puts every process return in ``[-1, 1]``.

    Args:
        rewards: ``[B, T]`` token rewards.
        mask: ``[B, T]``.

    Returns:
        ``[B, T]`` ``rewards * mask / (Z + 1e-6)``.
    """
    masked = rewards * mask
    returns = discounted_returns(masked)
    valid_abs = torch.where(mask.bool(), returns.abs(), torch.zeros_like(returns))
    largest = valid_abs.max() if valid_abs.numel() else valid_abs.new_zeros(())
    return masked / (largest + _EPS_NORM)


def masked_whiten(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Whitening (eq. 8): ``(values - mu) / sqrt(var + 1e-8) * mask`` with the masked mean and unbiased (Bessel) masked variance."""
    n = mask.sum()
    mean = (values * mask).sum() / n.clamp(min=1)
    var = (((values - mean) * mask) ** 2).sum() / (n - 1).clamp(min=1)
    return (values - mean) * torch.rsqrt(var + _EPS_WHITEN) * mask


def _last_token_one_hot(mask: torch.Tensor) -> torch.Tensor:
    """``[B, T]`` one-hot at each row's last valid token (the first EOS, or the last token of a truncated row).

    The last position where ``mask`` is 1, not ``sum(mask) - 1``: a tool-calling mask has holes (tool results).
    """
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device)
    last = (positions * (mask > 0)).max(dim=-1).values  # 1-based, 0 for an empty row
    one_hot = torch.zeros_like(mask)
    rows = torch.nonzero(last > 0).squeeze(-1)
    one_hot[rows, last[rows] - 1] = 1
    return one_hot


def _outcome_tokens(scores: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Place each row's score on its last valid token. Returns ``(u, M)``, both ``[B, T]``."""
    one_hot = _last_token_one_hot(mask)
    return scores.to(mask.dtype).unsqueeze(-1) * one_hot, one_hot


def _row_means(values: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
    """Per-row mean of ``values`` over its own mask, ``[B]`` (0 for an empty row)."""
    return (values * source_mask).sum(-1) / source_mask.sum(-1).clamp(min=1)


def _group_sums(per_row: torch.Tensor, group_size: int) -> torch.Tensor:
    """``[B] -> [B]``: each row gets the sum of its group (rows of a group are contiguous)."""
    sums = per_row.view(-1, group_size).sum(-1, keepdim=True)
    return sums.expand(-1, group_size).reshape(-1)


def _members(mask: torch.Tensor) -> torch.Tensor:
    """``[B]`` 1.0 for rows that are members of their group (non-empty mask), else 0.0."""
    return (mask.sum(-1) > 0).to(mask.dtype)


def _leave_one_out(values: torch.Tensor, source_mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """Official-code leave-one-out (eq. 6): ``(n_g * u_t - S_g) / (n_g - 1)`` on the source mask, 0 elsewhere.

    ``S_g`` is the group sum of per-row means and ``n_g`` the number of members of the group (rows with a
    non-empty source mask; ``K`` when nothing is masked out). For a one-hot outcome source this is exactly RLOO,
    ``a_i - mean_{j != i} a_j`` over the members; for process rewards it differs from the paper's leave-one-out by
    ``n_g / (n_g - 1)`` on each token's deviation from its row mean (we follow the code). A group with fewer than
    two members has no baseline and gets 0.
    """
    members = _group_sums(_members(source_mask), group_size).unsqueeze(-1)
    group_sum = _group_sums(_row_means(values, source_mask), group_size).unsqueeze(-1)
    loo = (members * values - group_sum) / (members - 1).clamp(min=1)
    return torch.where(members > 1, loo, torch.zeros_like(loo)) * source_mask


def _member_mean_std(values: torch.Tensor, members: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Group mean and unbiased std of ``values`` ``[G, K]`` over ``members`` ``[G, K]`` (0/1), each ``[G, 1]``."""
    count = members.sum(-1, keepdim=True)
    mean = (values * members).sum(-1, keepdim=True) / count.clamp(min=1)
    var = (((values - mean) * members) ** 2).sum(-1, keepdim=True) / (count - 1).clamp(min=1)
    return mean, var.sqrt()


def _check_groups(batch_rows: int, group_size: int, minimum: int) -> None:
    if group_size < minimum:
        raise ValueError(f"group_size={group_size} but this estimator needs at least {minimum} completions per prompt")
    if batch_rows % group_size != 0:
        raise ValueError(f"batch of {batch_rows} rows is not a whole number of groups of {group_size}")


# --------------------------------------------------------------------------------------------------------------
# Advantage estimators
# --------------------------------------------------------------------------------------------------------------


def rloo_advantages(
    process_rewards: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    process_coef: float = 1.0,
    outcome_coef: float = 1.0,
    gamma: float = 1.0,
    whiten: bool = True,
) -> torch.Tensor:
    """PRIME's default advantage: RLOO on process and outcome rewards, returns summed (eq. 6-8, official code).

    Args:
        process_rewards: ``[B, T]`` (normalised) implicit token rewards.
        scores: ``[B]`` outcome scores.
        mask: ``[B, T]``.
        group_size: ``K`` (>= 2).
        process_coef, outcome_coef: weights of the two sources' returns.
        gamma: discount of the returns.
        whiten: whiten over all valid tokens of the batch (unbiased variance).

    Returns:
        ``[B, T]`` advantages, zero where ``mask == 0``.
    """
    _check_groups(mask.shape[0], group_size, minimum=2)
    process_loo = _leave_one_out(process_rewards * mask, mask, group_size)
    outcome_u, outcome_mask = _outcome_tokens(scores, mask)
    outcome_loo = _leave_one_out(outcome_u, outcome_mask, group_size)
    advantages = process_coef * discounted_returns(process_loo, gamma) + outcome_coef * discounted_returns(
        outcome_loo, gamma
    )
    return masked_whiten(advantages, mask) if whiten else advantages * mask


def grpo_prime_advantages(
    process_rewards: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    group_size: int,
    process_coef: float = 1.0,
    outcome_coef: float = 1.0,
    gamma: float = 1.0,
    whiten: bool = False,
    eps: float = 1e-6,
) -> torch.Tensor:
    """GRPO-PRIME (eq. 12, paper appendix): group-standardised outcome plus standardised process returns.

    Outcome: ``(a_i - mean_g a) / (std_g a + eps)`` on every valid token. Process: leave-one-out centred token
    rewards (as in :func:`rloo_advantages`) divided by the group std of the row means, then discounted returns.
    Both stds are unbiased, as in GRPO.

    Shapes as in :func:`rloo_advantages`; returns ``[B, T]``.
    """
    _check_groups(mask.shape[0], group_size, minimum=2)
    members = _members(mask).view(-1, group_size)  # means and stds over each group's members only
    grouped_scores = torch.nan_to_num(scores.to(mask.dtype)).view(-1, group_size)
    score_mean, score_std = _member_mean_std(grouped_scores, members)
    outcome = (grouped_scores - score_mean) / (score_std + eps)
    outcome = torch.where(members.sum(-1, keepdim=True) > 1, outcome, torch.zeros_like(outcome))
    masked_process = process_rewards * mask
    row_means = _row_means(masked_process, mask).view(-1, group_size)
    process_std = _member_mean_std(row_means, members)[1].expand(-1, group_size).reshape(-1, 1)
    process = _leave_one_out(masked_process, mask, group_size) / (process_std + eps)
    advantages = process_coef * discounted_returns(process, gamma) + outcome_coef * outcome.reshape(-1, 1) * mask
    return masked_whiten(advantages, mask) if whiten else advantages * mask


def reinforce_prime_advantages(
    process_rewards: torch.Tensor,
    scores: torch.Tensor,
    mask: torch.Tensor,
    process_coef: float = 1.0,
    outcome_coef: float = 1.0,
    gamma: float = 1.0,
    whiten: bool = False,
) -> torch.Tensor:
    """REINFORCE-PRIME (eq. 13, paper appendix): ``A_{i,t} = a_i + sum_{s>=t} gamma^(s-t) p_{i,s}``, no baseline.

    Shapes as in :func:`rloo_advantages` (no grouping needed); returns ``[B, T]``.
    """
    process = discounted_returns(process_rewards * mask, gamma)
    outcome = torch.nan_to_num(scores.to(mask.dtype)).unsqueeze(-1)
    advantages = process_coef * process + outcome_coef * outcome * mask
    return masked_whiten(advantages, mask) if whiten else advantages * mask


# --------------------------------------------------------------------------------------------------------------
# Policy loss (TRL computes it in PRIMETrainer; the Lightning module uses this one)
# --------------------------------------------------------------------------------------------------------------


def clipped_policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    epsilon_low: float = 0.2,
    epsilon_high: float = 0.2,
) -> torch.Tensor:
    """TRL's clipped surrogate with per-token advantages and ``loss_type="grpo"`` aggregation (eq. 9, PPO-clip objective).

    ``loss = mean_i [ sum_t mask * -min(rho A, clip(rho, 1-eps_low, 1+eps_high) A) / sum_t mask ]`` with
    ``rho = exp(logps - old_logps)``: a token mean per sequence, then the mean over sequences.

    Args:
        logps: ``[B, T]`` current policy log-probs (with grad), at the sampling temperature.
        old_logps: ``[B, T]`` log-probs of the policy that sampled (``logps.detach()`` when on-policy: ratio 1).
        advantages: ``[B, T]`` per-token advantages (PRIME's) or ``[B, 1]``.
        mask: ``[B, T]`` completion mask.

    Returns:
        Scalar loss.
    """
    ratio = torch.exp(logps - old_logps)
    clipped = torch.clamp(ratio, 1 - epsilon_low, 1 + epsilon_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    return ((per_token * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()


# --------------------------------------------------------------------------------------------------------------
# Filtering and metrics
# --------------------------------------------------------------------------------------------------------------


def accuracy_filter(scores: torch.Tensor, group_size: int, low: float, high: float) -> torch.Tensor:
    """PRIME's online prompt filter (eq. 10): keep group ``g`` iff ``low <= mean(scores of g) <= high``. Returns
    ``bool[G]``.

    The mean runs over the group's members: NaN scores (rows no verifier scored, or masked out) are left out, and a
    group without any member is dropped."""
    _check_groups(scores.shape[0], group_size, minimum=1)
    grouped = scores.view(-1, group_size).float()
    members = ~torch.isnan(grouped)
    count = members.sum(-1)
    group_mean = torch.where(members, grouped, torch.zeros_like(grouped)).sum(-1) / count.clamp(min=1)
    return (count > 0) & (group_mean >= low) & (group_mean <= high)


OUTCOME_LABEL_RULES = ("score", "threshold", "group_mean")


def outcome_labels(scores: torch.Tensor, group_size: int, rule: str, threshold: float = 0.5) -> torch.Tensor:
    """The PRM's outcome labels (eq. 3's ``y``) and the accuracy filter's input, from verifier scores ``[B]``.

    Rules (NaN scores, i.e. rows no verifier scored, stay NaN):

    - ``"score"``: the score itself clamped to ``[0, 1]`` (soft labels; binary verifiers give 0/1).
    - ``"threshold"``: 1 where ``score > threshold``, else 0 (e.g. ``threshold=0`` for -1/+1 rewards).
    - ``"group_mean"``: 1 where the score is above the mean of its group's scored rows, else 0. Works for any
      scale (length rewards, reward-model logits, -1/+1); a group whose scores all tie carries no signal and is
      all 0, which the accuracy filter then drops.
    """
    if rule == "score":
        return scores.clamp(0.0, 1.0)
    if rule == "threshold":
        labels = (scores > threshold).to(scores.dtype)
    elif rule == "group_mean":
        _check_groups(scores.shape[0], group_size, minimum=1)
        grouped = scores.view(-1, group_size)
        scored = ~torch.isnan(grouped)
        filled = torch.where(scored, grouped, torch.zeros_like(grouped))
        mean = filled.sum(-1, keepdim=True) / scored.sum(-1, keepdim=True).clamp(min=1)
        labels = (grouped > mean).to(scores.dtype).view(-1)
    else:
        raise ValueError(f"outcome label rule {rule!r} is not one of {OUTCOME_LABEL_RULES}")
    return torch.where(torch.isnan(scores), scores, labels)


def prm_pairwise_accuracy(seq_rewards: torch.Tensor, scores: torch.Tensor, group_size: int) -> float:
    """The paper's "PRM accuracy" (eq. 11, its Fig. 5): how often the PRM orders pairs of a group as the verifier does.

    Per group, over pairs ``j < k``: ``d = a_j - a_k``, ``s = r_j - r_k``;
    ``acc_g = sum |d| * [(s > 0) == (d > 0)] / sum |d|`` (0.5 when every ``d`` is 0); mean over groups.

    Args:
        seq_rewards: ``[B]`` sequence-level implicit rewards.
        scores: ``[B]`` outcome scores.
        group_size: ``K``.
    """
    _check_groups(scores.shape[0], group_size, minimum=1)
    rewards = seq_rewards.detach().double().view(-1, group_size)
    outcomes = scores.detach().double().view(-1, group_size)
    score_diff = outcomes.unsqueeze(-1) - outcomes.unsqueeze(-2)  # [G, K, K], d[j, k] = a_j - a_k
    reward_diff = rewards.unsqueeze(-1) - rewards.unsqueeze(-2)
    upper = torch.triu(torch.ones(group_size, group_size, dtype=torch.bool, device=scores.device), diagonal=1)
    weight = torch.nan_to_num(score_diff.abs(), nan=0.0) * upper  # pairs with an unscored (NaN) row: no weight
    agrees = ((reward_diff > 0) == (score_diff > 0)).double()
    total = weight.sum(dim=(-1, -2))
    per_group = torch.where(total > 0, (weight * agrees).sum(dim=(-1, -2)) / total.clamp(min=1e-12), 0.5)
    return float(per_group.mean()) if per_group.numel() else 0.5


def accuracy_gate(prm_accuracy: float, gate: float) -> float:
    """Scale of the process-reward coefficient for a PRM of pairwise accuracy ``prm_accuracy`` (an extension, not
    in the paper): ``clamp((prm_accuracy - 0.5) / (gate - 0.5), 0, 1)``.

    Full weight while the PRM orders at least ``gate`` of the verifier's pairs right, falling linearly to 0 at
    chance (0.5): a PRM at or below chance would push the policy towards its own blind spots, so it gets no say.
    """
    if not 0.5 < gate <= 1.0:
        raise ValueError(f"gate={gate} must lie in (0.5, 1]")
    return min(1.0, max(0.0, (prm_accuracy - 0.5) / (gate - 0.5)))
