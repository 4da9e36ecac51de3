"""PRIMETrainer on a tiny local model: what trains, what stays frozen, checkpoints, resume and input errors."""

from pathlib import Path

import helpers
import pytest
import torch
from datasets import Dataset
from helpers import snapshot
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, TrainerCallback

from prime_trl import PRIMETrainer
from prime_trl.algo.prm import CompletionBatch
from prime_trl.rewards.reward_funcs import RewardFunctionError


def coin_reward(completions, answer, **kwargs):
    """Like helpers.coin_reward but needs the dataset's 'answer' column, as real verifiers do."""
    return helpers.coin_reward(completions)


def make_dataset(n=16):
    return Dataset.from_list([{"prompt": f"Q{i}=", "answer": str(i % 10)} for i in range(n)])


def make_args(tmp_path, **overrides):
    settings = dict(
        per_device_train_batch_size=8,
        num_generations=4,
        max_completion_length=12,
        max_steps=3,
        learning_rate=0.05,
        prm_learning_rate=0.05,
        gradient_checkpointing=False,
        logging_steps=1,
        seed=7,
        data_seed=7,
    )
    return helpers.prime_config(tmp_path / "out", **{**settings, **overrides})


LORA = helpers.TINY_LORA


def make_trainer(model_dir, tmp_path, reward=coin_reward, dataset=None, peft=True, **overrides):
    return PRIMETrainer(
        model_dir,
        args=make_args(tmp_path, **overrides),
        reward_funcs=reward,
        train_dataset=dataset if dataset is not None else make_dataset(),
        peft_config=LoraConfig(**LORA) if peft else None,
    )


class StopAtStep(TrainerCallback):
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


def test_policy_and_prm_train_base_stays_frozen(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, accuracy_filter=False)
    before = snapshot(trainer.model)
    trainer.train()
    policy, prm = helpers.assert_only_adapters_moved(before, snapshot(trainer.model))

    # The two optimizers hold disjoint parameter sets: the policy's and the PRM's adapter.
    policy_ids = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    prm_ids = {id(p) for g in trainer.prm.optimizer.param_groups for p in g["params"]}
    named = dict(trainer.model.named_parameters())
    assert policy_ids == {id(named[n]) for n in policy}
    assert prm_ids == {id(named[n]) for n in prm}

    logged = {k for entry in trainer.state.log_history for k in entry}
    for key in ("prm/loss", "prm/accuracy", "prm/update_time", "filter/pass_rate", "process_reward/std"):
        assert key in logged


def test_frozen_zero_prm_gives_exactly_outcome_rloo(tiny_model_dir, tmp_path):
    """At step 0 PRM == reference: PRIME's advantages are outcome-only RLOO's, bit for bit."""
    prime = make_trainer(tiny_model_dir, tmp_path, prm_update="none")
    rloo = make_trainer(tiny_model_dir, tmp_path, prm_update="none", process_reward_coef=0.0)
    gen = torch.Generator().manual_seed(0)
    batch = CompletionBatch(
        prompt_ids=torch.randint(3, 200, (8, 5), generator=gen),
        prompt_mask=torch.ones(8, 5, dtype=torch.long),
        completion_ids=torch.randint(3, 200, (8, 7), generator=gen),
        completion_mask=(torch.arange(7) < torch.randint(1, 8, (8, 1), generator=gen)).long(),
    )
    rewards = torch.tensor([[1.0], [0], [0], [1], [1], [1], [0], [1]])
    prime.model.train()
    rloo.model.train()
    adv_prime = prime._prime_step(batch, rewards, "train")
    adv_rloo = rloo._prime_step(batch, rewards, "train")
    assert adv_prime.abs().sum() > 0
    assert torch.equal(adv_prime, adv_rloo)


def _random_batch(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return CompletionBatch(
        prompt_ids=torch.randint(3, 200, (8, 5), generator=gen),
        prompt_mask=torch.ones(8, 5, dtype=torch.long),
        completion_ids=torch.randint(3, 200, (8, 7), generator=gen),
        completion_mask=(torch.arange(7) < torch.randint(1, 8, (8, 1), generator=gen)).long(),
    )


def test_accuracy_gate_silences_a_prm_below_chance_and_keeps_a_good_one(tiny_model_dir, tmp_path):
    """process_reward_accuracy_gate: with the running PRM accuracy at chance or below, PRIME's advantages are
    outcome-only RLOO's; well above the gate they are ungated PRIME's. 'double' makes the PRM's rewards non-zero."""
    batch, rewards = _random_batch(), torch.tensor([[1.0], [0], [0], [1], [1], [1], [0], [1]])

    def advantages(ema=None, **overrides):
        trainer = make_trainer(tiny_model_dir, tmp_path, prm_update="double", accuracy_filter=False, **overrides)
        trainer.prime_state.prm_accuracy_ema = ema
        trainer.create_optimizer_and_scheduler(num_training_steps=1)  # the PRM's optimizer comes with the policy's
        trainer.model.train()
        return trainer._prime_step(batch, rewards, "train"), trainer

    ungated, _ = advantages()
    outcome_only, _ = advantages(process_reward_coef=0.0)
    assert not torch.allclose(ungated, outcome_only)  # the PRM's rewards do move the advantages
    silenced, trainer = advantages(ema=0.0, process_reward_accuracy_gate=0.7)
    torch.testing.assert_close(silenced, outcome_only, rtol=0, atol=1e-6)
    assert trainer._metrics["train"]["process_reward/coef"] == [0.0]
    assert 0.0 < trainer.prime_state.prm_accuracy_ema <= 0.1  # one batch moved the running mean by 10%
    trusted, _ = advantages(ema=1.0, process_reward_accuracy_gate=0.7)
    torch.testing.assert_close(trusted, ungated, rtol=0, atol=1e-6)


def test_prm_pretrain_batches_update_the_prm_before_the_policy(tiny_model_dir, tmp_path):
    """prm_pretrain_batches=2: the PRM takes 2 extra updates at the first step; the policy and TRL's logs see one
    batch per step as without the warm-up."""
    trainer = make_trainer(tiny_model_dir, tmp_path, accuracy_filter=False, max_steps=2, prm_pretrain_batches=2)
    trainer.train()
    assert {int(state["step"]) for state in trainer.prm.optimizer.state.values()} == {2 + 2}
    assert {int(state["step"]) for state in trainer.optimizer.state.values()} == {2}
    plain = make_trainer(tiny_model_dir, tmp_path, accuracy_filter=False, max_steps=2)
    plain.train()
    tokens = [e["num_tokens"] for e in trainer.state.log_history if "num_tokens" in e]
    plain_tokens = [e["num_tokens"] for e in plain.state.log_history if "num_tokens" in e]
    assert len(tokens) == len(plain_tokens) == 2
    longest_prompt = max(len(trainer.processing_class(row["prompt"])["input_ids"]) for row in make_dataset())
    assert tokens[0] <= 8 * (longest_prompt + 12)  # at most one batch's prompt + completion tokens, not three


def test_prm_pretrain_batches_settle_outcome_label_auto_as_training_does(tiny_model_dir, tmp_path):
    """A warm-up batch whose scores leave [0, 1] settles outcome_label='auto' on group_mean for the rest of the run
    (with its warning), as a training batch does: the later batches, inside [0, 1], keep it."""
    calls = []

    def first_call_wide(completions, **kwargs):
        calls.append(len(completions))
        scores = helpers.coin_reward(completions)
        return [4.0 * score - 1.0 for score in scores] if len(calls) == 1 else scores  # warm-up: -1 or 3

    trainer = make_trainer(
        tiny_model_dir, tmp_path, reward=first_call_wide, accuracy_filter=False, max_steps=1, prm_pretrain_batches=1
    )
    trainer.train()
    assert len(calls) == 2  # one warm-up batch, one training batch
    assert trainer.prime_settings.outcome_label == "group_mean" and "score_range" in trainer._warned


def test_full_finetune_policy_puts_prm_on_one_frozen_copy(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, peft=False, accuracy_filter=False, max_steps=2)
    host = trainer.prm.model
    assert host is not trainer.model and isinstance(host, PeftModel)
    policy_before, host_before = snapshot(trainer.model), snapshot(host)
    trainer.train()
    policy_after, host_after = snapshot(trainer.model), snapshot(host)
    assert any(not torch.equal(policy_before[n], policy_after[n]) for n in policy_before)
    prm_names = [n for n in host_before if ".prm." in n]
    assert prm_names and all(not torch.equal(host_before[n], host_after[n]) for n in prm_names)
    assert all(torch.equal(host_before[n], host_after[n]) for n in host_before if ".prm." not in n)


def test_no_reward_function_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="No reward source provided"):  # TRL's error for the same mistake (issue 19)
        PRIMETrainer(tiny_model_dir, args=make_args(tmp_path), reward_funcs=[], train_dataset=make_dataset())


def test_full_finetune_prm_gets_the_same_adapter_checks(tiny_model_dir, tmp_path):
    """The frozen copy's PRM adapter is added by prm.add_prm_adapter, so a wrong prm path or a PRM LoraConfig PRIME
    cannot honour is refused there too, and the adapter starts frozen like the LoRA path's."""
    with pytest.raises(FileNotFoundError, match="not a saved PEFT adapter directory"):
        PRIMETrainer(
            tiny_model_dir,
            prm=tmp_path / "no-adapter",
            args=make_args(tmp_path),
            reward_funcs=coin_reward,
            train_dataset=make_dataset(),
        )
    # (modules_to_save is supported now, tests/test_grpo_compat.py; LoRA on lm_head is still refused)
    with pytest.raises(ValueError, match="puts LoRA layers on lm_head"):
        PRIMETrainer(
            tiny_model_dir,
            prm=LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]),
            args=make_args(tmp_path),
            reward_funcs=coin_reward,
            train_dataset=make_dataset(),
        )
    trainer = make_trainer(tiny_model_dir, tmp_path, peft=False)
    assert not any(p.requires_grad for p in trainer.prm.parameters())


def test_full_finetune_policy_under_zero3_is_refused(tiny_model_dir, tmp_path, monkeypatch):
    # The frozen copy for the PRM cannot be made from a ZeRO-3-partitioned model; a LoRA policy is the way there.
    monkeypatch.setattr("prime_trl.trainer.prime_trainer.is_deepspeed_zero3_enabled", lambda: True)
    with pytest.raises(NotImplementedError, match="LoRA adapter"):
        make_trainer(tiny_model_dir, tmp_path, peft=False)


@pytest.mark.parametrize(
    "overrides",
    [
        dict(gradient_accumulation_steps=2, steps_per_generation=2, num_iterations=2, max_steps=2),
        dict(prm_update="double", prm_loss_type="dpo", prm_num_mini_batches=2, max_steps=2),
        dict(advantage_estimator="grpo", max_steps=1),
        dict(advantage_estimator="reinforce", max_steps=1, beta=0.04),
        dict(bf16=True, gradient_checkpointing=True, max_steps=2),  # TRL's own defaults
    ],
    ids=["ga-spg-iterations", "double-dpo-minibatches", "grpo", "reinforce-kl", "bf16-checkpointing"],
)
def test_variants_update_prm_once_per_generation(tiny_model_dir, tmp_path, overrides):
    trainer = make_trainer(tiny_model_dir, tmp_path, accuracy_filter=False, **overrides)
    trainer.train()
    args = trainer.args
    generations = (
        trainer.state.global_step
        * args.gradient_accumulation_steps
        // (args.steps_per_generation * args.num_iterations)
    )
    steps = {int(state["step"]) for state in trainer.prm.optimizer.state.values()}
    assert steps == {generations * args.prm_num_mini_batches}


def test_save_model_writes_both_adapters_loadable_by_peft(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, accuracy_filter=False, max_steps=1)
    trainer.train()
    out = tmp_path / "saved"
    trainer.save_model(str(out))
    assert (out / "adapter_config.json").is_file() and (out / "prm" / "adapter_config.json").is_file()
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    loaded.load_adapter(str(out / "prm"), adapter_name="prm")
    trained = dict(trainer.model.named_parameters())
    for name, param in loaded.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, trained[name], rtol=0, atol=0)


def test_resume_matches_uninterrupted_run(tiny_model_dir, tmp_path):
    """4 steps straight == 2 steps, checkpoint, new trainer, resume, 2 more steps (both adapters, PRM optimizer)."""
    common = dict(accuracy_filter=False, max_steps=4, save_strategy="steps", save_steps=2)
    straight = make_trainer(tiny_model_dir, tmp_path / "a", **common)
    straight.train()

    first = make_trainer(tiny_model_dir, tmp_path / "b", **common)
    first.add_callback(StopAtStep(2))  # as if interrupted right after the checkpoint at step 2
    first.train()
    checkpoint = Path(first.args.output_dir) / "checkpoint-2"
    assert (checkpoint / "prm" / "adapter_model.safetensors").is_file()
    assert (checkpoint / "prm_optimizer.pt").is_file()

    resumed = make_trainer(tiny_model_dir, tmp_path / "b", **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected, actual = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    adapters = [n for n in expected if "lora_" in n]
    assert any(".prm." in n for n in adapters)
    for name in adapters:
        torch.testing.assert_close(actual[name], expected[name], rtol=1e-5, atol=1e-7)


def test_resume_keeps_the_settled_outcome_label_and_prm_accuracy(tiny_model_dir, tmp_path):
    """A run whose verifier left [0, 1] (outcome_label='auto' settled on group_mean), with a running PRM accuracy
    (process_reward_accuracy_gate), resumes with both, as the uninterrupted run goes on; an explicit rule wins."""

    def wide_reward(completions, **kwargs):
        return [4.0 * score - 1.0 for score in helpers.coin_reward(completions)]  # -1 or 3

    common = dict(accuracy_filter=False, max_steps=1, save_strategy="steps", save_steps=1)
    common.update(process_reward_accuracy_gate=0.7)
    first = make_trainer(tiny_model_dir, tmp_path, reward=wide_reward, **common)
    first.train()
    assert first.prime_settings.outcome_label == "group_mean" and first.prime_state.prm_accuracy_ema is not None
    checkpoint = str(Path(first.args.output_dir) / "checkpoint-1")

    def resume(**overrides):
        """A new trainer restored from the checkpoint as `train(resume_from_checkpoint=...)` does, before any step
        (a step on out-of-range scores would settle the rule again and hide a lost one)."""
        trainer = make_trainer(tiny_model_dir, tmp_path, reward=wide_reward, **{**common, **overrides})
        assert trainer.prime_settings.outcome_label == trainer.args.outcome_label
        trainer.create_optimizer_and_scheduler(num_training_steps=1)
        trainer._load_optimizer_and_scheduler(checkpoint)
        return trainer

    resumed = resume()
    assert resumed.prime_settings.outcome_label == "group_mean" and resumed.args.outcome_label == "auto"
    assert resumed.prime_state.prm_accuracy_ema == first.prime_state.prm_accuracy_ema
    assert "score_range" in resumed._warned
    assert resume(outcome_label="threshold").prime_settings.outcome_label == "threshold"


# ----- bad input fails early, with the field and the fix in the message -------------------------------------


def test_dataset_without_prompt_column(tiny_model_dir, tmp_path):
    data = Dataset.from_list([{"question": "1+1=", "answer": "2"}] * 8)
    with pytest.raises(ValueError, match="no 'prompt' column.*rename_column"):
        make_trainer(tiny_model_dir, tmp_path, dataset=data)


def test_reward_function_needs_missing_column(tiny_model_dir, tmp_path):
    data = Dataset.from_list([{"prompt": "1+1="}] * 8)
    with pytest.raises(ValueError, match="needs a dataset column 'answer'"):
        make_trainer(tiny_model_dir, tmp_path, dataset=data)


def test_reward_function_wrong_length(tiny_model_dir, tmp_path):
    def short_reward(completions, **kwargs):
        return [1.0] * (len(completions) - 1)

    trainer = make_trainer(tiny_model_dir, tmp_path, reward=short_reward, max_steps=1)
    with pytest.raises(RewardFunctionError, match="'short_reward' returned 7 rewards for 8 completions"):
        trainer.train()


def test_reward_function_raising_names_itself_and_rescue_checkpoint(tiny_model_dir, tmp_path):
    calls = []

    def flaky_reward(completions, answer, **kwargs):
        calls.append(1)
        if len(calls) > 2:
            raise KeyError("boom")
        return coin_reward(completions, answer)

    trainer = make_trainer(tiny_model_dir, tmp_path, reward=flaky_reward, max_steps=5, accuracy_filter=False)
    with pytest.raises(RewardFunctionError, match="'flaky_reward' raised KeyError"):
        trainer.train()
    rescue = Path(trainer.args.output_dir) / "checkpoint-2"
    assert (rescue / "adapter_model.safetensors").is_file()
    assert (rescue / "prm" / "adapter_model.safetensors").is_file()
    assert (rescue / "prm_optimizer.pt").is_file()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(prm_adapter_name="ref"), "prm_adapter_name='ref' is reserved"),
        (dict(prm_adapter_name="default"), "prm_adapter_name='default' is reserved"),
        (dict(num_generations=1, per_device_train_batch_size=2), "needs at least 2 completions"),
        (dict(prm_update="sometimes"), "prm_update='sometimes' is not supported"),
        (dict(accuracy_lower_bound=0.9, accuracy_upper_bound=0.1), "accuracy_lower_bound"),
        (dict(prime_beta=0.0), "prime_beta"),
        (dict(process_reward_accuracy_gate=0.5), "process_reward_accuracy_gate=0.5 must lie in"),
        (dict(prm_pretrain_batches=-1), "prm_pretrain_batches=-1 must be >= 0"),
    ],
)
def test_config_rejects_bad_combinations(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_unknown_verifier_name(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="verifier='math' is not one of the reward functions"):
        make_trainer(tiny_model_dir, tmp_path, verifier="math")


def test_args_must_be_a_config(tiny_model_dir):
    # A GRPOConfig / TrainingArguments is converted (tests/test_grpo_compat.py); anything else is refused.
    with pytest.raises(TypeError, match="args must be a PRIMEConfig, got dict"):
        PRIMETrainer(tiny_model_dir, args={"output_dir": "x"}, reward_funcs=coin_reward)


@pytest.mark.parametrize("generations_eval", [None, 1])
def test_evaluation_scores_with_prm_but_never_updates_it(tiny_model_dir, tmp_path, generations_eval):
    trainer = PRIMETrainer(
        tiny_model_dir,
        args=make_args(tmp_path, per_device_eval_batch_size=4, num_generations_eval=generations_eval),
        reward_funcs=coin_reward,
        train_dataset=make_dataset(),
        eval_dataset=make_dataset(8),
        peft_config=LoraConfig(**LORA),
    )
    trainer.train()
    prm_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".prm." in n}
    metrics = trainer.evaluate()
    assert "eval_prm/accuracy" in metrics and "eval_filter/pass_rate" in metrics
    assert metrics["eval_filter/pass_rate"] == 1.0  # no accuracy filter at evaluation
    for name, param in trainer.model.named_parameters():
        if ".prm." in name:
            assert torch.equal(param, prm_before[name]), "evaluation must not train the PRM"
