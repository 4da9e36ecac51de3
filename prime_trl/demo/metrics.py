"""Process-level metrics of the demo: implicit rewards of held-out completions, PRM accuracy, step localisation.

These answer the question outcome accuracy cannot: does the implicit PRM (``beta * log pi_prm / pi_ref`` per
token, PRIME Eq. 3) reflect *step* correctness, or only answer correctness? The demo task knows the truth for
every written step (``prime_trl.demo.task.first_wrong_step``), so we can check directly:

- ``heldout_prm_accuracy``: the paper's pairwise PRM accuracy (Fig. 5), on held-out completions grouped by prompt.
- ``localisation``: for completions with a wrong step, how often the step with the lowest implicit reward (summed
  over its tokens) is the *first* wrong step, against the chance rate ``1 / number of written steps``.

Used by the demo (``prime_trl.demo.run``) and by ``benchmarks/learning.py``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from peft import PeftModel
from transformers import PreTrainedTokenizerBase

from prime_trl.apps.scoring import implicit_rewards
from prime_trl.demo.task import first_wrong_step, problem_from_prompt, step_reward_sums, step_token_spans

logger = logging.getLogger(__name__)

__all__ = [
    "heldout_prm_accuracy",
    "localisation",
    "localisation_hit",
    "process_metrics",
]

# Step sums closer than this count as tied: an untrained (zero) PRM gives exactly 0.0 for every step.
_TIE_TOLERANCE = 1e-9


def heldout_prm_accuracy(sequence_rewards: Sequence[float], labels: Sequence[float], group_size: int) -> float:
    """Pairwise PRM accuracy on held-out groups of ``group_size`` consecutive completions of one prompt.

    The paper's measure (as ``prime_trl.algo.core.prm_pairwise_accuracy``: per group, pairs weighted by ``|label
    difference|``, credit when the implicit rewards order them as the labels do; mean over groups), with two
    changes for held-out data, where no accuracy filter runs: groups whose completions all have the same label
    are left out (they hold no pair to order) instead of counting 0.5, and a pair with equal rewards gets half
    credit (the core metric's strict ``>`` would count it right or wrong depending on the row order). An
    untrained PRM, whose rewards are all zero, therefore scores exactly 0.5.

    Returns:
        The mean over informative groups, or NaN if there is none.
    """
    rewards = torch.tensor(list(sequence_rewards), dtype=torch.float64).view(-1, group_size)
    outcomes = torch.tensor(list(labels), dtype=torch.float64).view(-1, group_size)
    label_diff = outcomes.unsqueeze(-1) - outcomes.unsqueeze(-2)  # [G, K, K]
    reward_diff = rewards.unsqueeze(-1) - rewards.unsqueeze(-2)
    tied = reward_diff.abs() <= _TIE_TOLERANCE
    credit = torch.where(tied, 0.5, ((reward_diff > 0) == (label_diff > 0)).double())
    weight = label_diff.abs() * torch.triu(torch.ones(group_size, group_size, dtype=torch.bool), diagonal=1)
    total = weight.sum(dim=(-1, -2))
    informative = total > 0
    if not informative.any():
        return float("nan")
    per_group = (weight * credit).sum(dim=(-1, -2))[informative] / total[informative]
    return float(per_group.mean())


def localisation_hit(step_sums: Sequence[float], first_wrong: int) -> float:
    """Credit for one completion: 1 if its lowest-reward step is the first wrong step, 0 if not.

    Ties share the credit (``1 / number tied`` if the first wrong step is among them): an uninformative PRM that
    gives every step the same reward then scores exactly the chance rate, rather than whatever rate the tie-break
    (e.g. "take the first") happens to favour.
    """
    if not 0 <= first_wrong < len(step_sums):
        raise ValueError(f"first_wrong={first_wrong} is not one of the {len(step_sums)} steps")
    lowest = min(step_sums)
    tied = [k for k, value in enumerate(step_sums) if math.isclose(value, lowest, rel_tol=0.0, abs_tol=_TIE_TOLERANCE)]
    return 1.0 / len(tied) if first_wrong in tied else 0.0


def localisation(step_sums: Sequence[Sequence[float]], first_wrong: Sequence[int | None]) -> dict[str, float]:
    """Step localisation over completions: ``rate`` (mean ``localisation_hit``), ``chance`` (mean of
    ``1 / number of written steps``) and ``n`` (completions with a wrong step; the others are skipped)."""
    hits, chances = [], []
    for sums, wrong in zip(step_sums, first_wrong, strict=True):
        if wrong is None or not sums:
            continue
        hits.append(localisation_hit(sums, wrong))
        chances.append(1.0 / len(sums))
    n = len(hits)
    return {
        "rate": sum(hits) / n if n else float("nan"),
        "chance": sum(chances) / n if n else float("nan"),
        "n": n,
    }


def process_metrics(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    completions: Sequence[Sequence[str]],
    rewards: Sequence[Sequence[float]],
    prm_adapter: str = "prm",
    beta: float = 0.05,
) -> dict[str, Any]:
    """Held-out PRM accuracy and step localisation of the PRM adapter on sampled completions.

    Args:
        model: the `PeftModel` carrying ``prm_adapter``.
        prompts: ``P`` task prompts.
        completions: ``[P][S]`` sampled completions (``S`` per prompt, the PRM-accuracy group size).
        rewards: ``[P][S]`` their outcome rewards (1.0 right answer, else 0.0).

    Returns:
        ``prm_accuracy``, ``localisation`` (rate), ``localisation_chance``, ``localisation_n``.
    """
    flat_prompts = [p for p, comps in zip(prompts, completions) for _ in comps]
    flat_completions = [c for comps in completions for c in comps]
    flat_rewards = [r for row in rewards for r in row]
    scored = implicit_rewards(
        model, tokenizer, flat_prompts, flat_completions, beta=beta, adapter_name=prm_adapter, batch_size=256
    )
    token_rewards = [row_rewards for _, row_rewards in scored]

    group_size = len(completions[0])
    prm_accuracy = heldout_prm_accuracy([float(t.sum()) for t in token_rewards], flat_rewards, group_size)

    sums, wrong = [], []
    for prompt, completion, rewards_t in zip(flat_prompts, flat_completions, token_rewards):
        sums.append(step_reward_sums(rewards_t, step_token_spans(completion, tokenizer)))
        wrong.append(first_wrong_step(problem_from_prompt(prompt), completion))
    loc = localisation(sums, wrong)
    return {
        "prm_accuracy": prm_accuracy,
        "localisation": loc["rate"],
        "localisation_chance": loc["chance"],
        "localisation_n": loc["n"],
    }
