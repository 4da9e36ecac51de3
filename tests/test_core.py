"""Hand-checked examples for prime_trl.algo.core (the arithmetic is in the comments) and PRIME's key properties."""

import math

import pytest
import torch

from prime_trl.algo import core


def t(values):
    return torch.tensor(values, dtype=torch.float64)


def test_implicit_token_rewards():
    # beta * (prm - ref) * mask = 0.5 * [0.5, 0, -2] * [1, 1, 0] = [0.25, 0, 0]
    rewards = core.implicit_token_rewards(t([[-1.0, -2.0, -3.0]]), t([[-1.5, -2.0, -1.0]]), t([[1, 1, 0]]), 0.5)
    torch.testing.assert_close(rewards, t([[0.25, 0.0, 0.0]]))


def test_prm_ce_loss_hand_computed():
    prm = t([[-1.0, -2.0, -9.0], [-1.0, -1.0, -1.0]])
    ref = t([[-1.5, -2.0, 0.0], [-1.0, -1.0, -1.0]])
    mask = t([[1, 1, 0], [1, 1, 1]])
    # row 0: r = 0.5 * (0.5 + 0) = 0.25, label 1 -> -log sigmoid(0.25) = log(1 + e^-0.25)
    # row 1: r = 0 (PRM == reference), label 0 -> -log(1 - sigmoid(0)) = log 2
    expected = (math.log1p(math.exp(-0.25)) + math.log(2)) / 2
    loss = core.prm_ce_loss(prm, ref, mask, t([1.0, 0.0]), beta=0.5)
    assert loss.item() == pytest.approx(expected, rel=1e-12)
    # soft label 0.5 at r = 0: -(0.5 log 0.5 + 0.5 log 0.5) = log 2
    soft = core.prm_ce_loss(prm[1:], ref[1:], mask[1:], t([0.5]), beta=0.5)
    assert soft.item() == pytest.approx(math.log(2), rel=1e-12)


def test_prm_dpo_loss_hand_computed():
    # One group of K=2, labels [1, 0]; Q = sum(prm - ref) = [2, -1]; beta = 0.5, so r = [1, -0.5].
    prm, ref, mask = t([[1.0, 1.0], [-1.0, 0.0]]), t([[0.0, 0.0], [0.0, 0.0]]), t([[1, 1], [1, 1]])
    labels = t([1.0, 0.0])
    group_q, group_labels = t([[2.0, -1.0], [2.0, -1.0]]), t([[1.0, 0.0], [1.0, 0.0]])
    # row 0 (positive) vs lower-scored members {row 1}: baseline 0.5 * -1 = -0.5; -log sigmoid(+(1 - -0.5))
    # row 1 (negative) vs higher-scored members {row 0}: baseline 0.5 * 2 = 1; -log sigmoid(-(-0.5 - 1))
    # both equal -log sigmoid(1.5) = log(1 + e^-1.5)
    loss = core.prm_dpo_loss(prm, ref, mask, labels, 0.5, group_q, group_labels)
    assert loss.item() == pytest.approx(math.log1p(math.exp(-1.5)), rel=1e-12)
    # A row with nobody to compare with uses baseline 0: labels [1, 1] -> row 0 loss = -log sigmoid(1)
    lone = core.prm_dpo_loss(prm[:1], ref[:1], mask[:1], t([1.0]), 0.5, t([[2.0, 2.0]]), t([[1.0, 1.0]]))
    assert lone.item() == pytest.approx(math.log1p(math.exp(-1.0)), rel=1e-12)


def test_normalize_process_rewards_hand_computed():
    rewards = t([[1.0, -2.0, 3.0, 9.0], [0.5, 0.5, 7.0, 7.0]])
    mask = t([[1, 1, 1, 0], [1, 1, 0, 0]])
    # masked row 0 = [1, -2, 3, 0] -> returns-to-go [2, 1, 3, 0]; row 1 = [.5, .5, 0, 0] -> [1, .5, 0, 0]
    # Z = max |return| over valid positions = 3; the 9 and 7s sit on masked positions and are ignored.
    expected = t([[1.0, -2.0, 3.0, 0.0], [0.5, 0.5, 0.0, 0.0]]) / (3 + 1e-6)
    torch.testing.assert_close(core.normalize_process_rewards(rewards, mask), expected)


def test_normalized_returns_lie_in_unit_interval():
    gen = torch.Generator().manual_seed(0)
    rewards = torch.randn(6, 9, generator=gen)
    mask = (torch.arange(9) < torch.randint(1, 10, (6, 1), generator=gen)).double()
    returns = core.discounted_returns(core.normalize_process_rewards(rewards.double(), mask))
    assert returns[mask.bool()].abs().max() <= 1.0


def test_rloo_outcome_only_hand_computed():
    # K=2, scores [1, 0]; row 0 ends at index 1 (L=2), row 1 at index 0 (L=1).
    # Outcome sits on the last token; LOO: (K*a - S)/(K-1) = (2*1 - 1)/1 = 1 and (2*0 - 1)/1 = -1,
    # i.e. a_i - mean_{j != i} a_j. Returns-to-go carry it back to every earlier token.
    mask = t([[1, 1, 0], [1, 0, 0]])
    adv = core.rloo_advantages(torch.zeros_like(mask), t([1.0, 0.0]), mask, group_size=2, whiten=False)
    torch.testing.assert_close(adv, t([[1.0, 1.0, 0.0], [-1.0, 0.0, 0.0]]))
    # Whitened: valid values [1, 1, -1], mean 1/3, unbiased var ((2/3)^2*2 + (4/3)^2)/2 = 4/3.
    std = math.sqrt(4 / 3 + 1e-8)
    whitened = core.rloo_advantages(torch.zeros_like(mask), t([1.0, 0.0]), mask, group_size=2)
    torch.testing.assert_close(whitened, t([[2 / 3 / std, 2 / 3 / std, 0.0], [-4 / 3 / std, 0.0, 0.0]]))


def test_rloo_process_hand_computed():
    process = t([[0.2, 0.4, 0.0], [0.6, 0.0, 0.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    # row means: 0.3 and 0.6, group sum S = 0.9. LOO per token (K=2): 2u - 0.9
    #   row 0: [-0.5, -0.1], row 1: [0.3]; returns-to-go: row 0 [-0.6, -0.1], row 1 [0.3]
    adv = core.rloo_advantages(process, t([0.0, 0.0]), mask, group_size=2, whiten=False)
    torch.testing.assert_close(adv, t([[-0.6, -0.1, 0.0], [0.3, 0.0, 0.0]]))
    # gamma = 0.5: row 0 t=0 -> -0.5 + 0.5 * -0.1 = -0.55; coefficients scale each source.
    discounted = core.rloo_advantages(
        process, t([1.0, 0.0]), mask, 2, process_coef=2.0, outcome_coef=3.0, gamma=0.5, whiten=False
    )
    # outcome LOO: row 0 +1 at t=1 -> [0.5, 1]; row 1 -1 at t=0 -> [-1]
    torch.testing.assert_close(discounted, t([[2 * -0.55 + 3 * 0.5, 2 * -0.1 + 3 * 1.0, 0.0], [2 * 0.3 - 3.0, 0, 0]]))


def test_rloo_needs_two_completions():
    with pytest.raises(ValueError, match="at least 2"):
        core.rloo_advantages(t([[0.0]]), t([1.0]), t([[1.0]]), group_size=1)


def test_grpo_prime_hand_computed():
    process = t([[0.2, 0.4, 0.0], [0.6, 0.0, 0.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    # outcome: scores [1, 0], mean 0.5, unbiased std sqrt(0.5) -> +-0.5/sqrt(0.5) = +-sqrt(0.5) on valid tokens
    # process: LOO tokens [-0.5, -0.1] / [0.3] (as in RLOO) divided by the std of row means [0.3, 0.6] = 0.3/sqrt(2)
    s = 0.3 / math.sqrt(2)
    expected = t([[-0.6 / s + math.sqrt(0.5), -0.1 / s + math.sqrt(0.5), 0.0], [0.3 / s - math.sqrt(0.5), 0, 0]])
    adv = core.grpo_prime_advantages(process, t([1.0, 0.0]), mask, group_size=2, eps=0.0)
    torch.testing.assert_close(adv, expected)


def test_reinforce_prime_hand_computed():
    process = t([[0.2, 0.4, 0.0], [0.6, 0.0, 0.0]])
    mask = t([[1, 1, 0], [1, 0, 0]])
    # A_t = a_i + sum_{s>=t} p_s: row 0 -> [1 + 0.6, 1 + 0.4], row 1 -> [0 + 0.6]
    adv = core.reinforce_prime_advantages(process, t([1.0, 0.0]), mask)
    torch.testing.assert_close(adv, t([[1.6, 1.4, 0.0], [0.6, 0.0, 0.0]]))


def test_discounted_returns_matches_definition():
    values = t([[1.0, 2.0, 4.0]])
    # gamma = 0.5: [1 + 0.5*2 + 0.25*4, 2 + 0.5*4, 4] = [3, 4, 4]
    torch.testing.assert_close(core.discounted_returns(values, 0.5), t([[3.0, 4.0, 4.0]]))
    torch.testing.assert_close(core.discounted_returns(values, 1.0), t([[7.0, 6.0, 4.0]]))


def test_masked_whiten_statistics():
    gen = torch.Generator().manual_seed(1)
    values, mask = torch.randn(5, 7, generator=gen).double(), (torch.rand(5, 7, generator=gen) > 0.3).double()
    out = core.masked_whiten(values, mask)
    valid = out[mask.bool()]
    assert valid.mean().abs() < 1e-12
    assert valid.var(unbiased=True).item() == pytest.approx(1.0, rel=1e-6)
    assert torch.all(out[~mask.bool()] == 0)
    # all-masked input stays finite (every group filtered out)
    assert torch.all(core.masked_whiten(values, torch.zeros_like(mask)) == 0)


def test_accuracy_filter_bounds_inclusive():
    scores = t([1, 0, 0, 0, 1, 1, 1, 1, 1, 0, 1, 0])  # group means 0.25, 1.0, 0.5
    assert core.accuracy_filter(scores, 4, 0.2, 0.8).tolist() == [True, False, True]
    # means exactly on the bounds are kept: 1/5 = 0.2 and 4/5 = 0.8
    edge = t([1, 0, 0, 0, 0, 1, 1, 1, 1, 0])
    assert core.accuracy_filter(edge, 5, 0.2, 0.8).tolist() == [True, True]


def test_prm_pairwise_accuracy_hand_computed():
    # group 1: scores [1, 0, 0], rewards [.5, .1, .7]: pair (0,1) d=1 s=.4 agree; (0,2) d=1 s=-.2 disagree;
    #          (1,2) d=0 weight 0 -> 1/2
    # group 2: scores [.5, 1, 0], rewards [0, 1, -1]: all three pairs agree -> 1
    # group 3: equal scores -> 0.5 by definition
    rewards = t([0.5, 0.1, 0.7, 0.0, 1.0, -1.0, 3.0, 2.0, 1.0])
    scores = t([1, 0, 0, 0.5, 1, 0, 1, 1, 1])
    assert core.prm_pairwise_accuracy(rewards, scores, 3) == pytest.approx((0.5 + 1.0 + 0.5) / 3)


def test_clipped_policy_loss():
    logps = torch.log(torch.tensor([[0.5, 0.5, 0.1], [0.2, 0.2, 0.2]]))
    old = torch.log(torch.tensor([[0.25, 0.5, 0.1], [0.4, 0.2, 0.2]]))  # ratios [[2, 1, 1], [0.5, 1, 1]]
    adv = torch.tensor([[1.0, -1.0, 5.0], [-2.0, 3.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]])
    # Row 0: -min(2*1, 1.2*1) = -1.2 and +1 -> mean -0.1. Row 1: -min(0.5*-2, 0.8*-2) = 1.6, -3, 0 -> mean -1.4/3.
    expected = (-0.1 + (1.6 - 3.0) / 3) / 2
    assert core.clipped_policy_loss(logps, old, adv, mask).item() == pytest.approx(expected, rel=1e-6)
    # On-policy (ratio 1) the gradient is the policy gradient: -A * mask / L per token, averaged over rows.
    logps = logps.clone().requires_grad_(True)
    core.clipped_policy_loss(logps, logps.detach(), adv, mask).backward()
    torch.testing.assert_close(logps.grad, -adv * mask / mask.sum(1, keepdim=True) / 2)


def _reference_rloo(scores, mask, group_size):
    """Outcome-only RLOO written independently: a_i - mean_{j != i} a_j on every valid token, then whitened."""
    grouped = scores.view(-1, group_size)
    others = (grouped.sum(-1, keepdim=True) - grouped) / (group_size - 1)
    advantage = (grouped - others).reshape(-1, 1) * mask
    n = mask.sum()
    mean = advantage.sum() / n
    var = (((advantage - mean) * mask) ** 2).sum() / (n - 1)
    return (advantage - mean) / torch.sqrt(var + 1e-8) * mask


@pytest.mark.parametrize("seed", range(20))
def test_prime_reduces_to_outcome_rloo_at_step_zero(seed):
    """With PRM == reference, every implicit reward is 0 and PRIME's advantages are outcome-only RLOO's."""
    gen = torch.Generator().manual_seed(seed)
    group_size = int(torch.randint(2, 6, (1,), generator=gen))
    rows, width = (
        group_size * int(torch.randint(1, 5, (1,), generator=gen)),
        int(torch.randint(1, 12, (1,), generator=gen)),
    )
    lengths = torch.randint(1, width + 1, (rows, 1), generator=gen)
    mask = (torch.arange(width) < lengths).float()
    scores = torch.randint(0, 2, (rows,), generator=gen).float()
    logps = -torch.rand(rows, width, generator=gen) * 5
    rewards = core.implicit_token_rewards(logps, logps.clone(), mask, beta=0.05)
    assert torch.all(rewards == 0)
    prime = core.rloo_advantages(core.normalize_process_rewards(rewards, mask), scores, mask, group_size)
    outcome_only = core.rloo_advantages(torch.zeros_like(mask), scores, mask, group_size, process_coef=0.0)
    assert torch.equal(prime, outcome_only)
    torch.testing.assert_close(prime, _reference_rloo(scores, mask, group_size), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("seed", range(10))
def test_leave_one_out_outcome_advantages_sum_to_zero_per_group(seed):
    gen = torch.Generator().manual_seed(seed)
    group_size, groups, width = 4, 3, 6
    mask = (torch.arange(width) < torch.randint(1, width + 1, (group_size * groups, 1), generator=gen)).double()
    scores = torch.rand(group_size * groups, generator=gen).double()  # soft scores, e.g. fraction of tests passed
    adv = core.rloo_advantages(torch.zeros_like(mask), scores, mask, group_size, whiten=False)
    per_row = adv[:, 0]  # the outcome advantage is the same on every valid token of a row
    torch.testing.assert_close(per_row.view(groups, group_size).sum(-1), torch.zeros(groups, dtype=torch.float64))


# ----- group membership: unscored (NaN) rows and masked (empty) rows are not members of their group ----------


def test_rloo_leave_one_out_divides_by_members_minus_one():
    # K=3, scores [1, 0, x]; row 2's completion is masked out (e.g. truncated with mask_truncated_completions).
    # Members are rows 0 and 1: LOO over 2 members, divisor 1: [1 - 0, 0 - 1] = [1, -1]; row 2 gets nothing.
    mask = t([[1, 1], [1, 0], [0, 0]])
    adv = core.rloo_advantages(torch.zeros_like(mask), t([1.0, 0.0, 1.0]), mask, group_size=3, whiten=False)
    torch.testing.assert_close(adv, t([[1.0, 1.0], [-1.0, 0.0], [0.0, 0.0]]))
    # The same two rows as a group of their own give the same advantages.
    alone = core.rloo_advantages(torch.zeros_like(mask[:2]), t([1.0, 0.0]), mask[:2], group_size=2, whiten=False)
    torch.testing.assert_close(adv[:2], alone)
    # A group with a single member has no baseline: zero advantage (process rewards included).
    lone = core.rloo_advantages(t([[0.3, 0.1], [0, 0]]), t([1.0, 0.0]), t([[1, 1], [0, 0]]), 2, whiten=False)
    assert torch.all(lone == 0)


def test_grpo_prime_group_statistics_over_members_only():
    process = t([[0.2, 0.4, 0.0], [0.6, 0.0, 0.0], [5.0, 5.0, 5.0]])
    mask = t([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    adv = core.grpo_prime_advantages(process, t([1.0, 0.0, 7.0]), mask, group_size=3, eps=0.0)
    two = core.grpo_prime_advantages(process[:2], t([1.0, 0.0]), mask[:2], group_size=2, eps=0.0)
    torch.testing.assert_close(adv[:2], two)
    assert torch.all(adv[2] == 0)


def test_accuracy_filter_ignores_unscored_rows():
    # group 0: [1, 0, NaN, NaN] -> 1 of 2 scored rows correct = 0.5 (kept); counting NaN as 0 would give 0.25
    # group 1: all unscored -> nothing to learn from, dropped
    scores = t([1, 0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan])
    assert core.accuracy_filter(scores, 4, 0.3, 0.8).tolist() == [True, False]


def test_prm_pairwise_accuracy_ignores_unscored_rows():
    # only the pair (0, 1) is scored: d = 1, s = 0.4 -> agrees; pairs with the NaN row carry no weight
    acc = core.prm_pairwise_accuracy(t([0.5, 0.1, -3.0]), t([1.0, 0.0, math.nan]), 3)
    assert acc == pytest.approx(1.0)


@pytest.mark.parametrize(
    "rule, threshold, expected",
    [
        ("score", 0.5, [1.0, 0.0, 0.25, math.nan, 1.0, 0.0]),  # clamped to [0, 1]
        ("threshold", 0.0, [1.0, 0.0, 1.0, math.nan, 1.0, 0.0]),  # 1 where score > threshold
        # group 0 scored rows [3, -1, 0.25] mean 0.75; group 1 rows [2, -2, ...]: mean 0 -> [1, 0]
        ("group_mean", 0.5, [1.0, 0.0, 0.0, math.nan, 1.0, 0.0]),
    ],
)
def test_outcome_labels_rules(rule, threshold, expected):
    scores = t([3.0, -1.0, 0.25, math.nan, 2.0, -2.0])
    labels = core.outcome_labels(scores, 3, rule, threshold)
    torch.testing.assert_close(labels, t(expected), equal_nan=True)


def test_outcome_labels_group_mean_ties_are_not_correct():
    # a group whose scores all tie carries no signal: all 0, which the accuracy filter then drops
    labels = core.outcome_labels(t([4.0, 4.0, 4.0, 4.0]), 4, "group_mean", 0.5)
    assert labels.tolist() == [0.0, 0.0, 0.0, 0.0]


def test_outcome_sits_on_the_last_policy_token_of_a_mask_with_tool_holes():
    # A tool result (0s) inside the completion: the outcome belongs to the last token the policy generated, not to
    # position sum(mask) - 1 (which here is a tool-result token).
    mask = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0]])
    scores = torch.tensor([1.0, 0.0])
    advantages = core.rloo_advantages(torch.zeros_like(mask), scores, mask, group_size=2, whiten=False)
    # RLOO outcome returns: row 0 gets +1 on every policy token up to its last one (index 5), row 1 gets -1.
    assert advantages[0].tolist() == [1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    assert advantages[1].tolist() == [-1.0, -1.0, -1.0, 0.0, 0.0, 0.0, 0.0]


def test_accuracy_gate_scales_from_chance_to_the_gate():
    assert core.accuracy_gate(0.9, 0.7) == 1.0
    assert core.accuracy_gate(0.7, 0.7) == 1.0
    assert core.accuracy_gate(0.6, 0.7) == pytest.approx(0.5)
    assert core.accuracy_gate(0.5, 0.7) == 0.0
    assert core.accuracy_gate(0.3, 0.7) == 0.0  # below chance: no process reward at all
    with pytest.raises(ValueError, match="gate"):
        core.accuracy_gate(0.8, 0.5)
