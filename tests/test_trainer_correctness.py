"""PRIMETrainer trains on what the user believes: multi-task None rewards, non-binary rewards, truncated and filtered
rows, crash-safe checkpoints, what is logged, start points, temperature, and configurations it must refuse."""

import logging
import types
import zlib
from pathlib import Path

import helpers
import pandas as pd
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from test_trainer import LORA, coin_reward, make_args, make_dataset, make_trainer
from transformers import AutoModelForCausalLM, TrainerCallback

from prime_trl import PRIMEConfig, PRIMETrainer
from prime_trl.algo.prm import CompletionBatch, completion_log_probs


def random_batch(rows=8, prompt=5, completion=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return CompletionBatch(
        prompt_ids=torch.randint(3, 200, (rows, prompt), generator=gen),
        prompt_mask=torch.ones(rows, prompt, dtype=torch.long),
        completion_ids=torch.randint(3, 200, (rows, completion), generator=gen),
        completion_mask=torch.ones(rows, completion, dtype=torch.long),
    )


def record_prm_labels(trainer):
    """Wrap the PRM update so each call's (completion ids, mask, labels) is recorded."""
    calls = []
    update = trainer.prm.score_and_update

    def recording(batch, labels, group_ids=None):
        calls.append((batch.completion_ids.clone(), batch.completion_mask.clone(), labels.clone()))
        return update(batch, labels, group_ids=group_ids)

    trainer.prm.score_and_update = recording
    return calls


def policy_params(model):
    return {name: param.detach().clone() for name, param in model.named_parameters() if ".default." in name}


def changed(before, model):
    after = dict(model.named_parameters())
    return [name for name in before if not torch.equal(before[name], after[name])]


# ----- 1. reward functions returning None (TRL's multi-task pattern) --------------------------------------------


def test_unscored_row_is_left_out_of_prm_filter_and_baselines(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, accuracy_lower_bound=0.3, accuracy_upper_bound=0.7)
    trainer.create_optimizer_and_scheduler(num_training_steps=3)
    calls = record_prm_labels(trainer)
    trainer.model.train()
    nan = float("nan")
    # group 0: [1, 0, None, 1]... scored rows 2 of 3 -> 0.67 kept; counting None as 0 would also keep it but label
    # row 2 "wrong". group 1: [1, None, 0, None] -> 0.5 kept; as zeros it would be 0.25 and dropped.
    rewards = torch.tensor([[1.0], [0.0], [nan], [1.0], [1.0], [nan], [0.0], [nan]])
    step = trainer._run_prime_step(random_batch(), rewards, "train")
    assert step.kept.tolist() == [True, True, False, True, True, False, True, False]
    assert torch.all(step.advantages[~step.kept] == 0)
    assert trainer._metrics["train"]["filter/pass_rate"][-1] == 1.0
    assert trainer._metrics["train"]["prime/unscored_rows"][-1] == 3
    (_, _, labels) = calls[-1]
    assert labels.tolist() == [1.0, 0.0, 1.0, 1.0, 0.0]  # the PRM sees the five scored rows, with their labels


def _task_text(completion):
    return completion if isinstance(completion, str) else completion[-1]["content"]


def math_reward(completions, task, **kwargs):
    return [helpers.coin_reward([c])[0] if t == "math" else None for c, t in zip(completions, task, strict=True)]


def code_reward(completions, task, **kwargs):
    """A plain-Python stand-in for a code verifier: 'passes' when the completion has an even byte checksum."""
    return [
        float(zlib.adler32(_task_text(c).encode()) % 2 == 0) if t == "code" else None
        for c, t in zip(completions, task, strict=True)
    ]


def test_multitask_run_labels_each_row_by_its_own_verifier(tiny_model_dir, tmp_path):
    data = Dataset.from_list([{"prompt": f"Q{i}=", "task": "math" if i % 2 else "code"} for i in range(16)])
    trainer = PRIMETrainer(
        tiny_model_dir,
        args=make_args(tmp_path, verifier="math_reward,code_reward", max_steps=2),
        reward_funcs=[math_reward, code_reward],
        train_dataset=data,
        peft_config=LoraConfig(**LORA),
    )
    scored = []
    calculate = trainer._calculate_rewards

    def recording(inputs, prompts, completions, completion_ids_list):
        rewards = calculate(inputs, prompts, completions, completion_ids_list)
        scored.append(rewards.clone())
        return rewards

    trainer._calculate_rewards = recording
    calls = record_prm_labels(trainer)
    trainer.train()
    seen_tasks = set()
    for rewards, (_, _, labels) in zip(scored, calls, strict=True):
        truth = torch.where(torch.isnan(rewards[:, 0]), rewards[:, 1], rewards[:, 0])
        assert not torch.isnan(truth).any(), "every row is scored by exactly one task's verifier"
        group_accuracy = truth.view(-1, 4).mean(-1)
        kept_groups = (group_accuracy >= 0.2) & (group_accuracy <= 0.8)
        # Every group between the bounds (e.g. 50% correct) is kept, and the PRM gets each row's own verdict:
        # a correct code row is never labelled wrong because the math verifier returned None for it.
        torch.testing.assert_close(labels, truth[kept_groups.repeat_interleave(4)])
        for group in torch.nonzero(kept_groups).squeeze(-1).tolist():
            seen_tasks.add("math" if not torch.isnan(rewards[group * 4, 0]) else "code")
    assert seen_tasks == {"math", "code"}
    logged = {k for entry in trainer.state.log_history for k in entry}
    assert "prime/unscored_rows" in logged


# ----- issue 19 item 1: rewards outside [0, 1] ---------------------------------------------------------------


def length_reward(completions, **kwargs):
    return [float(len(_task_text(c))) for c in completions]


def logit_reward(completions, **kwargs):
    """Reward-model-like logits: deterministic values in about [-4, 4]."""
    return [(zlib.crc32(_task_text(c).encode()) % 800) / 100 - 4 for c in completions]


@pytest.mark.parametrize("reward", [length_reward, logit_reward], ids=["length", "logits"])
def test_non_binary_rewards_train_and_warn_once(tiny_model_dir, tmp_path, reward, caplog):
    trainer = make_trainer(tiny_model_dir, tmp_path, reward=reward, max_steps=2)
    before = policy_params(trainer.model)
    with caplog.at_level(logging.WARNING, logger="prime_trl.trainer.prime_trainer"):
        trainer.train()
    assert changed(before, trainer.model), "the policy must move"
    warnings = [r.getMessage() for r in caplog.records if "outside [0, 1]" in r.getMessage()]
    assert len(warnings) == 1 and reward.__name__ in warnings[0] and "outcome_label" in warnings[0]
    assert trainer.prime_settings.outcome_label == "group_mean"


def test_check_verifier_scores_settles_auto_once_and_names_the_verifiers():
    """The shared check (PRIMETrainer and PRIMEModule): 'auto' becomes group_mean at the first score outside [0, 1]
    and stays; an explicit rule is kept; NaN (None) scores are not out of range; the default verifier that leaves
    rows to other functions is named with the fix."""
    from prime_trl.algo.settings import PRIMESettings
    from prime_trl.algo.step import check_verifier_scores

    nan = float("nan")
    names = ["math_reward", "code_reward"]
    settings = PRIMESettings()
    inside = torch.tensor([[0.0, nan], [1.0, nan], [nan, 0.5], [0.25, nan]])
    assert check_verifier_scores(settings, inside, [0, 1], names, verifier_named=True) == []
    assert settings.outcome_label == "auto"
    outside = torch.tensor([[0.0, nan], [nan, -3.0], [nan, 2.0], [1.0, nan]])
    [(key, message)] = check_verifier_scores(settings, outside, [0, 1], names, verifier_named=True)
    assert key == "score_range" and "'code_reward'" in message and "[-3, 2]" in message
    assert settings.outcome_label == "group_mean"
    assert check_verifier_scores(settings, inside, [0, 1], names, verifier_named=True) == []
    assert settings.outcome_label == "group_mean"  # sticky

    explicit = PRIMESettings(outcome_label="threshold")
    [(_, message)] = check_verifier_scores(explicit, outside, [1], names, verifier_named=True)
    assert explicit.outcome_label == "threshold" and "outcome_label='threshold' decides" in message

    [(key, message)] = check_verifier_scores(PRIMESettings(), inside, [0], names, verifier_named=False)
    assert (
        key == "default_verifier" and "None for 1 rows" in message and "verifier='math_reward,code_reward'" in message
    )


class TinyRewardModel(torch.nn.Module):
    """A reward model as TRL sees one (a module, called on tokenized prompt + completion, returning ``.logits``),
    whose logits sit in a narrow band inside [0, 1], as a freshly initialised sequence classifier's often do."""

    def __init__(self, config):
        super().__init__()
        self.config = config  # TRL reads the model's name from it
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def forward(self, input_ids, attention_mask, **kwargs):
        token_sum = (input_ids * attention_mask).sum(-1, keepdim=True)
        return types.SimpleNamespace(logits=0.05 + 0.01 * (token_sum % 7).float() / 7 + self.dummy)


def tiny_reward_model(model_dir):
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_dir)
    config._name_or_path = "tiny-reward-model"
    return TinyRewardModel(config)


def test_reward_model_logits_in_unit_range_are_not_soft_labels(tiny_model_dir, tmp_path, caplog):
    """Logits of ~0.05 read as soft labels would make every group's accuracy ~0.05, so the accuracy filter would drop
    every group and the run would train nothing (TRL's test_training with a tiny reward model did exactly that)."""
    from transformers import AutoTokenizer

    reward_model = tiny_reward_model(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    trainer = PRIMETrainer(
        tiny_model_dir,
        args=make_args(tmp_path, max_steps=2),
        reward_funcs=reward_model,
        reward_processing_classes=tokenizer,
        train_dataset=make_dataset(),
        peft_config=LoraConfig(**LORA),
    )
    calls = record_prm_labels(trainer)
    before = policy_params(trainer.model)
    with caplog.at_level(logging.WARNING, logger="prime_trl.trainer.prime_trainer"):
        trainer.train()
    assert changed(before, trainer.model), "the policy must move"
    assert calls and all(set(labels.tolist()) <= {0.0, 1.0} for _, _, labels in calls), "binary labels"
    assert not any("dropped every group" in r.getMessage() for r in caplog.records)
    assert trainer.prime_settings.outcome_label == "group_mean"


def test_outcome_label_set_by_the_user_is_kept_for_a_reward_model(tiny_model_dir, tmp_path):
    from transformers import AutoTokenizer

    reward_model = tiny_reward_model(tiny_model_dir)
    trainer = PRIMETrainer(
        tiny_model_dir,
        args=make_args(tmp_path, outcome_label="threshold", outcome_label_threshold=0.0),
        reward_funcs=reward_model,
        reward_processing_classes=AutoTokenizer.from_pretrained(tiny_model_dir),
        train_dataset=make_dataset(),
        peft_config=LoraConfig(**LORA),
    )
    assert trainer.prime_settings.outcome_label == "threshold"


def test_fully_filtered_steps_warn_and_leave_policy_untouched(tiny_model_dir, tmp_path, caplog):
    calls = []

    def mixed_then_constant(completions, **kwargs):
        calls.append(1)
        return helpers.coin_reward(completions) if len(calls) == 1 else [1.0] * len(completions)

    trainer = make_trainer(
        tiny_model_dir, tmp_path, reward=mixed_then_constant, max_steps=4, weight_decay=0.1, accuracy_filter=True
    )

    class SnapshotAfterFirstStep(TrainerCallback):
        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step == 1:
                self.policy = policy_params(trainer.model)

    snap = SnapshotAfterFirstStep()
    trainer.add_callback(snap)
    before = policy_params(trainer.model)
    with caplog.at_level(logging.WARNING, logger="prime_trl.trainer.prime_trainer"):
        trainer.train()
    assert changed(before, trainer.model), "step 1 (mixed groups) trains"
    assert not changed(snap.policy, trainer.model), "fully filtered steps: no momentum or weight-decay step either"
    messages = [r.getMessage() for r in caplog.records]
    assert sum("dropped every group" in m for m in messages) == 2  # rate-limited: 1st and 2nd (not 3rd)
    assert any("3 of 4 generation batches" in m for m in messages)


# ----- 4. truncated completions with mask_truncated_completions ----------------------------------------------


def test_masked_row_is_not_a_group_member(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, accuracy_filter=False)
    trainer.create_optimizer_and_scheduler(num_training_steps=3)
    calls = record_prm_labels(trainer)
    trainer.model.train()
    batch = random_batch()
    batch.completion_mask[1] = 0  # what TRL does to a truncated row with mask_truncated_completions=True
    rewards = torch.tensor([[1.0], [1.0], [0.0], [0.0], [1.0], [0.0], [1.0], [0.0]])
    step = trainer._run_prime_step(batch, rewards, "train")
    assert not step.kept[1] and step.kept.sum() == 7
    assert torch.all(step.advantages[1] == 0)
    assert len(calls[-1][2]) == 7, "the masked row is out of the PRM loss"
    # Rows 0, 2, 3 form a group of 3 members: row 0's outcome advantage is 1 - mean(0, 0) > 0, and the two
    # wrong rows have equal negative ones; an implicit 0 for row 1 would not change signs but would change values.
    assert trainer._metrics["train"]["prime/masked_rows"][-1] == 1


# ----- 5. filtered rows out of TRL's loss -------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_policy_gradient_equals_gradient_on_kept_rows(tiny_model_dir, tmp_path, loss_type):
    trainer = make_trainer(tiny_model_dir, tmp_path, loss_type=loss_type, beta=0.04)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = random_batch(seed=3)
    gen = torch.Generator().manual_seed(4)
    kept = torch.tensor([True, True, False, False, True, True, False, False])
    inputs = {
        "prompt_ids": batch.prompt_ids,
        "prompt_mask": batch.prompt_mask,
        "completion_ids": batch.completion_ids,
        "completion_mask": batch.completion_mask,
        "advantages": torch.randn(8, 7, generator=gen) * kept.unsqueeze(-1),
        "old_per_token_logps": -torch.rand(8, 7, generator=gen),
        "ref_per_token_logps": -torch.rand(8, 7, generator=gen),
        "num_items_in_batch": batch.completion_mask[kept].sum(),
    }

    def policy_grads(loss):
        trainer.model.zero_grad()
        loss.backward()
        return {n: p.grad.clone() for n, p in trainer.model.named_parameters() if p.grad is not None}

    full = policy_grads(trainer._compute_loss(trainer.model, {**inputs, "prime_kept": kept}))
    alone = policy_grads(
        trainer._compute_loss(trainer.model, {k: v[kept] if v.dim() else v for k, v in inputs.items()})
    )
    assert full.keys() == alone.keys() and full
    for name in full:
        torch.testing.assert_close(full[name], alone[name], rtol=1e-5, atol=1e-8)


# ----- 2. rescue checkpoint ------------------------------------------------------------------------------------


class CrashInStep3:
    """Raise in the policy loss of step 3, i.e. after step 3's generation has updated the PRM."""

    def __init__(self, trainer):
        self.compute = trainer._compute_loss
        self.trainer = trainer

    def __call__(self, model, inputs):
        if self.trainer.state.global_step == 2:
            raise RuntimeError("out of memory (simulated)")
        return self.compute(model, inputs)


def prm_tensors(checkpoint):
    return load_file(str(Path(checkpoint) / "prm" / "adapter_model.safetensors"))


@pytest.mark.parametrize("saved_at_2", [True, False], ids=["checkpoint-exists", "rescue-written"])
def test_rescue_checkpoint_is_consistent_and_resumes(tiny_model_dir, tmp_path, saved_at_2):
    common = dict(accuracy_filter=False, max_steps=4, save_strategy="steps", save_steps=2)
    straight = make_trainer(tiny_model_dir, tmp_path / "a", **common)
    straight.train()
    expected = prm_tensors(Path(straight.args.output_dir) / "checkpoint-2")

    crash_settings = common if saved_at_2 else {**common, "save_strategy": "no"}
    crashed = make_trainer(tiny_model_dir, tmp_path / "b", **crash_settings)
    crashed._compute_loss = CrashInStep3(crashed)
    with pytest.raises(RuntimeError, match="simulated"):
        crashed.train()
    checkpoint = Path(crashed.args.output_dir) / "checkpoint-2"
    rescued = prm_tensors(checkpoint)
    for name, tensor in expected.items():
        torch.testing.assert_close(rescued[name], tensor, rtol=0, atol=0)
    assert torch.load(checkpoint / "prm_optimizer.pt", weights_only=True)["scheduler"]["last_epoch"] == 2

    resumed = make_trainer(tiny_model_dir, tmp_path / "b", **common)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    want, got = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    for name in (n for n in want if "lora_" in n):
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)


# ----- 3. what is logged -------------------------------------------------------------------------------------


def test_completions_table_holds_prime_advantages_and_implicit_rewards(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, max_steps=1, log_completions=True, log_token_rewards=True)
    steps = []
    prime_step = trainer._run_prime_step

    def recording(batch, rewards, mode):
        step = prime_step(batch, rewards, mode)
        steps.append((batch, step))
        return step

    trainer._run_prime_step = recording
    trainer.train()
    table = pd.read_parquet(Path(trainer.args.output_dir) / "completions" / "completions_00001.parquet")
    batch, step = steps[0]
    mask = batch.completion_mask.float()
    expected = ((step.advantages * mask).sum(-1) / mask.sum(-1).clamp(min=1)).tolist()
    assert table["advantage"].tolist() == pytest.approx(expected, abs=1e-6)
    assert table["implicit_reward"].tolist() == pytest.approx(step.token_rewards.sum(-1).tolist(), abs=1e-6)
    filtered = ~step.kept
    assert all(table["advantage"][i] == 0 for i in torch.nonzero(filtered).squeeze(-1).tolist())
    lengths = batch.completion_mask.sum(-1).tolist()
    assert [len(row) for row in table["token_rewards"]] == lengths
    html = (Path(trainer.args.output_dir) / "completions" / "token_rewards_00001.html").read_text()
    assert html.count("class='tok'") == sum(lengths)


# ----- 6. starting from a trained LoRA adapter ---------------------------------------------------------------


def test_sft_adapter_is_the_start_of_policy_prm_and_reference(tiny_model_dir, tmp_path):
    torch.manual_seed(0)
    sft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir), LoraConfig(**LORA))
    with torch.no_grad():
        for name, param in sft.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)  # a "trained" SFT adapter
    batch = random_batch(rows=4)
    sft.eval()
    with torch.no_grad():
        sft_logps = completion_log_probs(sft, batch, fused=False)
        with sft.disable_adapter():
            base_logps = completion_log_probs(sft, batch, fused=False)
    assert (sft_logps - base_logps).abs().max() > 1e-3
    trainer = PRIMETrainer(sft, args=make_args(tmp_path), reward_funcs=coin_reward, train_dataset=make_dataset())
    scored = trainer.prm.score(batch)
    torch.testing.assert_close(scored.ref_logps, sft_logps, rtol=1e-4, atol=1e-5)
    assert torch.equal(scored.prm_logps, scored.ref_logps)  # PRM == reference at step 0
    with torch.no_grad():
        policy_logps = completion_log_probs(trainer.model, batch, fused=False)
    torch.testing.assert_close(policy_logps, sft_logps, rtol=1e-4, atol=1e-5)


# ----- 7. temperature, fp16, a second train(), PRM init ------------------------------------------------------


def test_prm_log_probs_at_temperature_one_without_full_logits(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, temperature=0.7)
    assert trainer.prm.fused_log_probs, "the PRM must use a fused (chunked) head, not [B, T, vocab] logits"
    batch = random_batch(rows=4)
    scored = trainer.prm.score(batch)
    with torch.no_grad(), trainer.model.disable_adapter():
        reference = completion_log_probs(trainer.model, batch, fused=False)  # plain logits, temperature 1
    torch.testing.assert_close(scored.ref_logps, reference, rtol=1e-5, atol=1e-6)
    # the policy's own fused head still divides by the sampling temperature
    ids = batch.input_ids
    labels = ids.masked_fill(batch.attention_mask == 0, -100)
    with torch.no_grad():
        policy = trainer.model(input_ids=ids, attention_mask=batch.attention_mask, labels=labels, fused_lm_head=True)
    assert not torch.allclose(policy.log_probs[:, -7:].float(), scored.prm_logps, atol=1e-3)


def test_fp16_is_refused_with_the_fix(tmp_path):
    with pytest.raises(ValueError, match="fp16=True is not supported.*bf16=True"):
        PRIMEConfig(output_dir=str(tmp_path), fp16=True, use_cpu=True)


def test_second_train_call_rebuilds_prm_schedule(tiny_model_dir, tmp_path):
    trainer = make_trainer(tiny_model_dir, tmp_path, accuracy_filter=False, max_steps=2, prm_lr_scheduler_type="linear")
    trainer.train()
    assert trainer.prm.scheduler.get_last_lr()[0] == 0.0  # the linear schedule ran out with the first run
    prm_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if ".prm." in n}
    trainer.train()
    after = dict(trainer.model.named_parameters())
    assert any(not torch.equal(prm_before[n], after[n]) for n in prm_before), "the PRM must train in the 2nd run"


def test_prm_config_without_zero_init_is_refused(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match="init_lora_weights=False"):
        PRIMETrainer(
            tiny_model_dir,
            LoraConfig(init_lora_weights=False, **LORA),
            args=make_args(tmp_path),
            reward_funcs=coin_reward,
            train_dataset=make_dataset(),
            peft_config=LoraConfig(**LORA),
        )
