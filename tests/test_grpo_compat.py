"""Coming from `GRPOTrainer`: the same calling conventions, the same errors, and the PRM on every architecture and
adapter layout TRL trains (issue 19, items 2-4)."""

import logging

import pytest
from peft import LoraConfig
from test_trainer import coin_reward, make_args, make_dataset
from transformers import TrainingArguments
from trl import GRPOConfig

from prime_trl import PRIMEConfig, PRIMETrainer

CPU = dict(use_cpu=True, bf16=False, report_to="none", save_strategy="no")


# ------------------------------------------------------------------------------------------------------------------
# Item 3: the same mistakes give the same errors; GRPO's calling conventions work
# ------------------------------------------------------------------------------------------------------------------


def test_no_reward_source_raises_trls_error(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"^No reward source provided\. Pass `reward_funcs`"):
        PRIMETrainer(tiny_model_dir, args=make_args(tmp_path), train_dataset=make_dataset())


@pytest.mark.parametrize(
    "positional, error_type",
    [
        (coin_reward, TypeError),
        ([coin_reward, coin_reward], TypeError),
        ("trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5", ValueError),
    ],
    ids=["function", "list", "reward-model-id"],
)
def test_reward_funcs_in_the_prm_slot_are_refused_in_one_line(tiny_model_dir, tmp_path, positional, error_type):
    with pytest.raises(error_type, match=r"pass them as reward_funcs=") as error:
        PRIMETrainer(tiny_model_dir, positional, make_args(tmp_path), train_dataset=make_dataset())
    assert "\n" not in str(error.value)


@pytest.mark.parametrize("config_class", [GRPOConfig, TrainingArguments])
def test_parent_config_is_converted_with_a_notice(tiny_model_dir, tmp_path, config_class, caplog):
    extra = dict(num_generations=4, max_completion_length=6, per_device_train_batch_size=8)
    settings = dict(output_dir=str(tmp_path / "out"), learning_rate=0.123, seed=11, **CPU)
    if config_class is GRPOConfig:
        settings.update(extra)
    with caplog.at_level(logging.INFO, logger="prime_trl"):
        trainer = PRIMETrainer(
            tiny_model_dir,
            args=config_class(**settings),
            reward_funcs=coin_reward,
            train_dataset=make_dataset(),
            peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
        )
    assert isinstance(trainer.args, PRIMEConfig)
    # The user's values are kept, PRIME's own fields get PRIMEConfig's defaults.
    assert trainer.args.learning_rate == 0.123 and trainer.args.seed == 11
    assert trainer.args.prime_beta == PRIMEConfig.prime_beta
    if config_class is GRPOConfig:
        assert trainer.args.max_completion_length == 6 and trainer.args.num_generations == 4
    notice = [r.getMessage() for r in caplog.records if "converted to PRIMEConfig" in r.getMessage()]
    assert len(notice) == 1 and "prime_beta=0.05" in notice[0] and config_class.__name__ in notice[0]
