"""The demo runner (quick smoke run end to end), its process metrics, and the learning benchmark's helpers."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from prime_trl.apps.scoring import encode_responses, implicit_rewards
from prime_trl.demo.metrics import heldout_prm_accuracy, localisation, localisation_hit, process_metrics
from prime_trl.demo.model import DemoModelConfig, build_demo_model, build_demo_tokenizer
from prime_trl.demo.task import (
    first_wrong_step,
    problem_from_expression,
    step_reward_sums,
    step_token_spans,
)

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))
import learning  # noqa: E402  (benchmarks/learning.py: stdlib-only at import time)

PROMPT = "Q:7+5*3-4=?A:"
# 7+5*3-4: reference 5*3=15; 7+15=22; 22-4=18. Step 1 is wrong (23), step 2 carries the error consistently.
WRONG_AT_1 = "5*3=15;7+15=23;23-4=19;\\boxed{19}"


# ---------------------------------------------------------------------------------------------- the demo


def test_quick_demo_writes_both_adapters_plot_and_results(tmp_path):
    from prime_trl.demo.run import run_demo

    out = tmp_path / "demo"
    results = run_demo(steps=4, seed=0, output_dir=str(out), quick=True, progress=False)

    # Files: policy adapter at the root, PRM adapter in prm/, the base it applies to, the plot and the JSON.
    assert (out / "adapter_config.json").is_file() and (out / "prm" / "adapter_config.json").is_file()
    assert (out / "demo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk["steps"] == results["steps"] == 4
    assert [p["step"] for p in results["curves"]["eval"]] == [0, 2, 4]
    assert [row["step"] for row in results["curves"]["train"]] == [1, 2, 3, 4]
    for key in ("sampled_accuracy", "greedy_accuracy", "sampled_all_steps_correct", "prm_accuracy", "localisation"):
        assert 0.0 <= results["after"][key] <= 1.0
    # Before training the PRM equals the reference: no held-out signal, localisation exactly at chance.
    assert results["before"]["prm_accuracy"] == 0.5
    assert results["before"]["localisation"] == pytest.approx(results["before"]["localisation_chance"])

    # Both adapters load with plain PEFT onto the saved base, and both were trained (LoRA B starts at zero).
    for adapter_dir, name in ((out, "default"), (out / "prm", "default")):
        base = AutoModelForCausalLM.from_pretrained(out / "base")
        model = PeftModel.from_pretrained(base, str(adapter_dir), adapter_name=name)
        lora_b = [p for n, p in model.named_parameters() if "lora_B" in n]
        assert lora_b and any(p.abs().sum() > 0 for p in lora_b), f"{adapter_dir} was not trained"


# ---------------------------------------------------------------------------------------------- metrics


def test_localisation_hit_credits_the_lowest_step_and_splits_ties():
    assert localisation_hit([0.1, -0.5, 0.2], first_wrong=1) == 1.0
    assert localisation_hit([0.1, -0.5, 0.2], first_wrong=0) == 0.0
    assert localisation_hit([0.0, 0.0, 0.0], first_wrong=2) == pytest.approx(1 / 3)  # uninformative = chance
    assert localisation_hit([-1.0, -1.0, 0.0], first_wrong=1) == 0.5
    assert localisation_hit([-1.0, -1.0, 0.0], first_wrong=2) == 0.0
    with pytest.raises(ValueError):
        localisation_hit([0.0, 1.0], first_wrong=2)


def test_localisation_on_hand_built_token_rewards():
    tokenizer = build_demo_tokenizer()
    problem = problem_from_expression("7+5*3-4")
    assert first_wrong_step(problem, WRONG_AT_1) == 1
    spans = step_token_spans(WRONG_AT_1, tokenizer)  # "5*3=15;" -> tokens 0..6, "7+15=23;" -> 7..14, ...
    assert spans == [(0, 7), (7, 15), (15, 23)]
    num_tokens = len(tokenizer(WRONG_AT_1, add_special_tokens=False)["input_ids"]) + 1  # + EOS
    rewards = torch.zeros(num_tokens)
    rewards[11] = -0.3  # inside the first wrong step ("7+15=23;")
    rewards[18] = -0.2  # inside step 2, less negative
    rewards[2] = 0.1
    good = step_reward_sums(rewards, spans)
    assert good == pytest.approx([0.1, -0.3, -0.2])
    blame_later = torch.zeros(num_tokens)
    blame_later[18] = -1.0
    bad = step_reward_sums(blame_later, spans)
    result = localisation([good, bad, [0.0, 0.0, 0.0], [0.0]], [1, 1, 1, None])
    # hits 1, 0 and 1/3 (a three-way tie); the completion without a wrong step is skipped
    assert result["n"] == 3
    assert result["rate"] == pytest.approx((1 + 0 + 1 / 3) / 3)
    assert result["chance"] == pytest.approx(1 / 3)
    assert math.isnan(localisation([], [])["rate"])


def test_heldout_prm_accuracy_orders_pairs_within_groups():
    # group 1: the right completion has the higher reward (1); group 2: reversed (0); group 3: a tie (1/2);
    # group 4: every completion wrong, no pair to order (left out)
    rewards = [0.3, -0.1, -0.2, 0.1, 0.0, 0.0, 0.5, 0.1]
    labels = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0]
    assert heldout_prm_accuracy(rewards, labels, group_size=2) == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    # a zero PRM scores exactly 0.5 whatever the row order; nothing informative gives NaN
    assert heldout_prm_accuracy([0.0] * 4, [1.0, 0.0, 0.0, 1.0], group_size=4) == 0.5
    assert math.isnan(heldout_prm_accuracy([0.1, 0.2], [1.0, 1.0], group_size=2))
    # pairs weigh by their label difference (soft labels)
    assert heldout_prm_accuracy([0.2, 0.1, 0.0], [1.0, 0.5, 0.0], group_size=3) == pytest.approx(1.0)


def test_demo_completions_are_encoded_like_trl_with_eos():
    tokenizer = build_demo_tokenizer()
    batch = encode_responses(tokenizer, ["Q:1+2=?A:", PROMPT], ["1+2=3;\\boxed{3}", WRONG_AT_1], append_eos=True)
    assert batch.prompt_mask[0, 0] == 0 and batch.prompt_mask[1].all()  # prompts left-padded
    lengths = batch.completion_mask.sum(-1).tolist()
    assert lengths == [len("1+2=3;\\boxed{3}") + 1, len(WRONG_AT_1) + 1]  # char tokens + EOS
    assert batch.completion_ids[0, lengths[0] - 1] == tokenizer.eos_token_id
    assert batch.completion_ids[0, lengths[0]] == tokenizer.pad_token_id  # completions right-padded


@pytest.fixture(scope="module")
def peft_demo_model():
    """A small random demo model with a policy adapter and a zero-initialised PRM adapter (PRM == reference)."""
    tokenizer = build_demo_tokenizer()
    config = DemoModelConfig(hidden_size=32, num_layers=1, num_heads=2, num_kv_heads=1, intermediate_size=64)
    base = build_demo_model(tokenizer, config, seed=0)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(base, lora)
    model.add_adapter("prm", lora)
    model.eval()
    return model, tokenizer


def test_untrained_prm_gives_zero_rewards_and_chance_localisation(peft_demo_model):
    model, tokenizer = peft_demo_model
    completions = [[WRONG_AT_1, "5*3=16;7+16=23;23-4=19;\\boxed{19}"], ["5*3=15;7+15=22;22-4=18;\\boxed{18}", "1"]]
    rewards = [row for _, row in implicit_rewards(model, tokenizer, [PROMPT] * 2, completions[0])]
    assert [len(r) for r in rewards] == [len(c) + 1 for c in completions[0]]
    assert all(torch.equal(r, torch.zeros_like(r)) for r in rewards)
    metrics = process_metrics(model, tokenizer, [PROMPT, PROMPT], completions, [[0.0, 0.0], [1.0, 0.0]])
    assert metrics["prm_accuracy"] == 0.5
    assert metrics["localisation_n"] == 3  # the two wrong chains and "1" (one malformed step)
    assert metrics["localisation"] == pytest.approx(metrics["localisation_chance"])
    assert metrics["localisation_chance"] == pytest.approx((1 / 3 + 1 / 3 + 1) / 3)


def test_trained_prm_adapter_changes_the_rewards(peft_demo_model):
    model, tokenizer = peft_demo_model
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".prm." in name and "lora_B" in name:
                param.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
    try:
        ((_, rewards),) = implicit_rewards(model, tokenizer, [PROMPT], [WRONG_AT_1], beta=0.1)
        assert rewards.abs().sum() > 0
    finally:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if ".prm." in name and "lora_B" in name:
                    param.zero_()


# ---------------------------------------------------------------------------------------------- benchmark helpers


def test_steps_to_reach_interpolates_between_evaluations():
    steps, values = [0, 20, 40, 60], [0.3, 0.5, 0.7, 0.65]
    assert learning.steps_to_reach(steps, values, 0.6) == pytest.approx(30.0)
    assert learning.steps_to_reach(steps, values, 0.7) == pytest.approx(40.0)
    assert learning.steps_to_reach(steps, values, 0.2) == 0.0
    assert learning.steps_to_reach(steps, values, 0.8) is None
    # the first crossing counts, not a later one
    assert learning.steps_to_reach([0, 10, 20, 30], [0.1, 0.6, 0.4, 0.6], 0.5) == pytest.approx(8.0)
    with pytest.raises(ValueError):
        learning.steps_to_reach([0, 10], [0.1], 0.5)


def test_mean_se_and_mean_curve():
    stats = learning.mean_se([0.5, 0.7, 0.6, float("nan")])
    assert stats["n"] == 3 and stats["mean"] == pytest.approx(0.6)
    assert stats["se"] == pytest.approx(0.1 / math.sqrt(3))
    assert math.isnan(learning.mean_se([0.4])["se"])
    runs = [
        {"eval": [{"step": 0, "a": 0.2}, {"step": 10, "a": 0.4}, {"step": 20, "a": 0.6}]},
        {"eval": [{"step": 0, "a": 0.4}, {"step": 10, "a": 0.6}]},  # an unfinished run: step 20 is dropped
    ]
    steps, curve = learning.mean_curve(runs, "a")
    assert steps == [0, 10] and [c["mean"] for c in curve] == pytest.approx([0.3, 0.5])


def test_summaries_measure_steps_to_rloo_final_from_the_seed_mean_curve():
    def run(seed, values, method):
        evals = [{"step": 20 * i, "sampled_accuracy": v} for i, v in enumerate(values)]
        train = [{"step": s, "reward": 0.5} for s in range(1, 61)]
        return {
            "seed": seed,
            "settings": {},
            "steps": 60,
            "train_seconds": 60.0,
            "train": train,
            "eval": evals,
            "spec": {"method": method},
        }

    rloo = [run(0, [0.3, 0.5, 0.6, 0.7], "rloo"), run(1, [0.3, 0.4, 0.6, 0.7], "rloo")]
    prime = [run(0, [0.3, 0.7, 0.8, 0.8], "prime"), run(1, [0.3, 0.7, 0.7, 0.8], "prime")]
    summary = learning.summarise_method(prime, target=0.7)
    assert summary["final_sampled_accuracy"]["mean"] == pytest.approx(0.8)
    assert summary["steps_to_rloo_final"] == pytest.approx(20.0)
    assert summary["steps_to_rloo_final_per_seed"] == [20.0, 20.0]
    assert learning.summarise_method(rloo, target=0.7)["steps_to_rloo_final"] == pytest.approx(60.0)


def test_ablation_runs_rloo_at_primes_learning_rate_only_when_it_differs():
    chosen = {"prime": {"learning_rate": 3e-4, "prm_learning_rate": 3e-3}, "rloo": {"learning_rate": 1e-3}}
    specs = learning.ablation_specs("default", chosen, [0, 1], {})
    assert [(s.method, s.phase, s.settings, s.split) for s in specs] == [
        ("rloo", "ablation", {"learning_rate": 3e-4}, "test")
    ] * 2
    chosen["rloo"] = {"learning_rate": 3e-4}
    assert learning.ablation_specs("default", chosen, [0, 1], {}) == []
    # the diagnostic repeats PRIME's final runs of the first two seeds (same settings, test split)
    diagnostic = learning.diagnostic_specs("default", chosen, [5, 6, 7], {})
    assert [(s.seed, s.settings, s.split) for s in diagnostic] == [
        (5, chosen["prime"], "test"),
        (6, chosen["prime"], "test"),
    ]
    # run files are keyed by everything that determines the run
    assert specs[0].path != learning.RunSpec("default", "final", "rloo", 0, {"learning_rate": 3e-4}).path


# ---------------------------------------------------------------------------------------------- the report


def _fake_learning(prime_acc, rloo_acc, fraction, loc, loc_se, chance):
    def method(acc, extra=None):
        summary = {
            "seeds": [0, 1, 2],
            "final_sampled_accuracy": {"mean": acc, "se": 0.01},
            "final_sampled_all_steps_correct": {"mean": acc - 0.01, "se": 0.01},
        }
        summary.update(extra or {})
        return summary

    prime_extra = {
        "final_localisation": {"mean": loc, "se": loc_se},
        "final_localisation_chance": {"mean": chance, "se": 0.0},
        "steps_to_rloo_final": 40.0 if fraction is not None else None,
    }
    return {
        "benchmark": "learning",
        "start": {"sampled_accuracy": 0.35},
        "rloo_final_sampled_accuracy": rloo_acc,
        "steps_fraction_prime_to_rloo_final": fraction,
        "methods": {"prime": method(prime_acc, prime_extra), "rloo": method(rloo_acc), "grpo": method(0.7)},
    }


def test_report_headline_and_goal_verdicts():
    import report

    results = {
        "overhead_demo": {
            "step_time_ratio_prime_over_grpo": {"median": 1.10, "min": 1.0, "max": 1.2, "n": 3},
            "peak_mem_ratio_prime_over_grpo": {"median": 1.12, "min": 1.1, "max": 1.2, "n": 3},
            "peak_mem_ratio_shared_over_separate": {"median": 0.55, "min": 0.5, "max": 0.6, "n": 3},
        },
        "learning_default": _fake_learning(0.80, 0.75, 0.35, loc=0.70, loc_se=0.02, chance=0.36),
        "learning_hard": _fake_learning(0.70, 0.72, None, loc=0.45, loc_se=0.02, chance=0.36),
    }
    figures = report.headline(results)
    assert set(report.HEADLINE_KEYS) <= set(figures)
    assert figures["step_time_ratio_prime_over_grpo"] == 1.10
    assert figures["step_time_ratio_prime_over_grpo_large"] is None  # overhead_large.json absent
    assert figures["final_acc_prime"] == 0.80 and figures["final_acc_start"] == 0.35 and figures["seeds"] == 3
    assert figures["step_localisation_prime"] == 0.70 and figures["steps_fraction_prime_to_rloo_final"] == 0.35
    assert figures["final_acc_prime_hard"] == 0.70 and figures["steps_fraction_prime_to_rloo_final_hard"] is None

    verdicts = {goal: verdict for goal, _, verdict in report.goals(results, figures)}

    def verdict(prefix):
        (match,) = [v for g, v in verdicts.items() if g.startswith(prefix)]
        return match

    assert verdict("Sample efficiency (default") == "**met**"
    assert verdict("Sample efficiency (hard") == "**not met**"  # never reached RLOO's final, ends lower
    assert verdict("Process (default task): more") == "**met**"
    # 0.69 vs 0.71 with s.e. 0.01 each: the difference is within 2 standard errors, and the verdict says so
    assert verdict("Process (hard task): more") == "**not met** (difference within 2 s.e.)"
    assert verdict("Process (default task): PRM") == "**met**"  # 0.70 >= 1.5 x 0.36
    assert verdict("Process (hard task): PRM") == "**not met**"  # 0.45 < 1.5 x 0.36
    assert verdict("Cost: step time PRIME / GRPO (demo") == "**met**"
    assert verdict("Cost: step time PRIME / GRPO (large") == "not measured"
    assert verdict("Cost: peak memory PRIME / GRPO") == "**not met**"
    assert verdict("Cost: peak memory shared") == "**met**"


# ---------------------------------------------------------------------------------------------- regimes (issue 16)


def test_regime_verdict_needs_two_standard_errors():
    assert learning.compare({"mean": 0.60, "se": 0.01}, {"mean": 0.55, "se": 0.01})["verdict"] == "PRIME beats RLOO"
    assert learning.compare({"mean": 0.52, "se": 0.01}, {"mean": 0.55, "se": 0.01})["verdict"] == "PRIME loses to RLOO"
    tie = learning.compare({"mean": 0.56, "se": 0.01}, {"mean": 0.55, "se": 0.01})
    assert tie["verdict"] == "tie (within 2 s.e.)" and math.isclose(tie["se"], math.sqrt(2) * 0.01)


def test_regime_arms_share_settings_and_reuse_the_default_tasks_runs():
    specs = learning.regime_specs("sparse_lb0", [0, 1, 2])
    prime, rloo = specs["prime"], specs["rloo"]
    assert [s.seed for s in prime] == [0, 1, 2] and all(s.split == "test" and s.task == "sparse" for s in prime)
    # the same policy learning rate and filter for both methods: they differ by the process reward only
    assert prime[0].settings == {**rloo[0].settings, "prm_learning_rate": 3e-3}
    assert rloo[0].settings["accuracy_lower_bound"] == 0.0
    # the remedies' baselines are the default task's existing final (PRIME) and ablation (RLOO at PRIME's lr) runs
    gate = learning.regime_specs("prm_gate", [0])
    assert gate["prime_plain"][0] == learning.RunSpec(
        "default", "final", "prime", 0, {"learning_rate": 3e-4, "prm_learning_rate": 3e-3}
    )
    assert gate["rloo"][0] == learning.RunSpec("default", "ablation", "rloo", 0, {"learning_rate": 3e-4})
    assert gate["prime"][0].settings["process_reward_accuracy_gate"] == 0.7 and gate["prime"][0].phase == "regime"


def test_report_regime_headline_keys():
    import report

    def arm(acc):
        return {"seeds": [0, 1, 2], "final_sampled_accuracy": {"mean": acc, "se": 0.01, "min": acc, "max": acc}}

    results = {
        "regime_sparse": {
            "benchmark": "learning_regime",
            "regime": "sparse",
            "date": "2026-12-01",
            "arms": {"prime": arm(0.2), "rloo": arm(0.15)},
            "comparison": learning.compare(arm(0.2)["final_sampled_accuracy"], arm(0.15)["final_sampled_accuracy"]),
            "steps_fraction_prime_to_rloo_final": 0.5,
        }
    }
    figures = report.headline(results)
    assert figures["final_acc_prime_sparse"] == 0.2 and figures["final_acc_rloo_sparse"] == 0.15
    assert figures["seeds_sparse"] == 3 and figures["steps_fraction_prime_to_rloo_final_sparse"] == 0.5
    section = "\n".join(report.section_regime("regime_sparse", results["regime_sparse"]))
    assert "**Verdict: PRIME beats RLOO**" in section and "regime_sparse.png" in section


@pytest.mark.parametrize("prime_final, verdict", [(0.55, "a tie"), (0.95, "a difference beyond 2 s.e.")])
def test_report_real_model_section_reads_ties_as_ties(prime_final, verdict):
    """The SmolLM2 section: per-seed finals and a PRIME - RLOO difference judged against 2 s.e., where the s.e. is
    at least the binomial noise of the held-out samples (two seeds that agree do not make a tiny s.e.)."""
    import report

    def run(final):
        return {"curve": [[0, 0.3], [12, final]], "seconds_per_step": [70.0, 80.0], "train_reward": [0.1, 0.5]}

    result = {
        "benchmark": "smollm2_learning",
        "date": "2026-12-01",
        "steps": 12,
        "eval": {"prompts": 26, "samples": 2, "every": 6},
        "recipe": {
            "per_device_train_batch_size": 16,
            "num_generations": 4,
            "max_completion_length": 32,
            "learning_rate": 1e-4,
        },
        "runs": {"prime": {"0": run(prime_final), "1": run(prime_final)}, "rloo": {"0": run(0.5), "1": run(0.5)}},
    }
    section = "\n".join(report.section_real_model_learning("fake_smollm2", result))
    assert f"{prime_final:.1%} / {prime_final:.1%}" in section and "4 prompts x 4 completions" in section
    assert f"2 seeds each: {verdict}." in section
    # Identical seeds have no spread: the s.e. is the held-out sampling noise, sqrt(p (1 - p) / (52 * 2)).
    assert f"+- {100 * (0.5 * 0.5 / 104) ** 0.5:.1f}%" in section


def test_smollm2_validation_split_is_carved_from_train_only():
    """--validate_lr validates on 14 of the 55 training sums, a fixed choice, never on a test sum."""
    import smollm2_learning

    splits = smollm2_learning.addition_rows()
    train_ids = [row["id"] for row in splits["train"]]
    held = smollm2_learning.validation_ids(train_ids)
    assert len(held) == 14 and held <= set(train_ids)
    assert not held & {row["id"] for row in splits["test"]}
    assert smollm2_learning.validation_ids(train_ids[::-1]) == held  # independent of row order


@pytest.mark.parametrize(
    "finals, verdict",
    [
        ({"3e-05": 0.3, "0.0001": 0.5, "0.0003": 0.4}, "the sweep picks the recipe's value."),
        ({"3e-05": 0.3, "0.0001": 0.5, "0.0003": 0.5}, "the sweep picks the recipe's value (tied with 0.0001, 0.0003)"),
        ({"3e-05": 0.3, "0.0001": 0.45, "0.0003": 0.5}, "prefers 0.0003 over the recipe's value by +5.0"),
    ],
)
def test_report_validation_section_says_whether_the_sweep_picks_the_recipe_lr(finals, verdict):
    import report

    def run(final):
        return {"curve": [[0, 0.25], [8, final]], "seconds_per_step": [40.0], "train_reward": [0.2, 0.4]}

    result = {
        "benchmark": "smollm2_validation",
        "commands": ["python benchmarks/smollm2_learning.py --validate_lr 1e-4"],
        "date": "2026-12-01",
        "steps": 8,
        "train_prompts": 41,
        "recipe_learning_rate": 1e-4,
        "validation": {"prompts": 14, "samples": 4},
        "runs": {lr: {"0": run(final)} for lr, final in finals.items()},
    }
    assert report._kind("smollm2_validation", result) == "real_model_validation"
    section = "\n".join(report.section_real_model_validation("smollm2_validation", result))
    assert verdict in section and "56 per point" in section and "within 2 s.e." in section


def test_demo_tasks_and_bad_task_name():
    from prime_trl.demo.run import DEMO_TASKS, run_demo
    from prime_trl.demo.warmstart import DEFAULT_SFT, HARD_SFT, default_sft_config

    # default and hard keep their warm starts (same SFT configs, so the same cache keys as before)
    assert DEMO_TASKS["default"].sft == DEFAULT_SFT and DEMO_TASKS["hard"].sft == HARD_SFT
    assert default_sft_config(DEMO_TASKS["sparse"].task) == DEMO_TASKS["sparse"].sft
    assert DEMO_TASKS["systematic"].sft.error_operators == "*"
    with pytest.raises(ValueError, match="task='nope' is not a demo task; choose one of default, hard, sparse"):
        run_demo(task="nope")
    with pytest.raises(ValueError, match="contradict"):
        run_demo(task="sparse", hard=True)
