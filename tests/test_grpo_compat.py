"""Coming from `GRPOTrainer`: the same calling conventions, the same errors, and the PRM on every architecture and
adapter layout TRL trains (issue 19, items 2-4)."""

import logging

import pytest
import torch
from datasets import Dataset
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
        ("trl-internal-testing/tiny-Qwen2ForSequenceClassification-2.5", FileNotFoundError),
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


# ------------------------------------------------------------------------------------------------------------------
# Item 4: tools, rollout_func, environment_factory; the PRM covers only tokens the policy generated
# ------------------------------------------------------------------------------------------------------------------

TOOL_CALL = '<tool_call>\n{"name": "multiply", "arguments": {"a": 3, "b": 4}}\n</tool_call><|im_end|>'
AFTER_TOOL = "12<|im_end|>"
DIRECT = "7<|im_end|>"


def multiply(a: int, b: int) -> int:
    """
    Multiplies two integers.

    Args:
        a: The first integer.
        b: The second integer.

    Returns:
        The product.
    """
    return a * b


class MultiplyEnv:
    """An environment whose one tool multiplies; it rewards a completion that called it."""

    def reset(self, **kwargs):
        self.calls = 0

    def multiply(self, a: int, b: int) -> int:
        """
        Multiplies two integers.

        Args:
            a: The first integer.
            b: The second integer.

        Returns:
            The product.
        """
        self.calls += 1
        return a * b

    def get_reward(self) -> float:
        return float(self.calls > 0)


def answer_reward(completions, **kwargs):
    return [float("12" in c[-1]["content"]) for c in completions]


@pytest.fixture
def tool_model():
    """A tiny model with a Qwen2.5 chat template, which TRL knows how to parse tool calls from."""
    from trl.chat_template_utils import qwen2_5_chat_template

    from prime_trl.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer(chat_template=qwen2_5_chat_template)
    return build_model(tokenizer, hidden_size=32, num_layers=2), tokenizer


def scripted_generation(tokenizer):
    """Stand-in for TRL's `_generate_single_turn`: even rows call the tool, odd rows answer at once; after a tool
    result the answer is "12". A random tiny model never emits a valid tool call, and the masks are the point."""

    def generate(prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        texts = []
        for row, ids in enumerate(prompt_ids):
            if "<tool_response>" in tokenizer.decode(ids):
                texts.append(AFTER_TOOL)
            else:
                texts.append(TOOL_CALL if row % 2 == 0 else DIRECT)
        return [tokenizer.encode(text, add_special_tokens=False) for text in texts], None

    return generate


def spy_prime_step(monkeypatch):
    """Record every (batch, PRIMEStep) of the trainer, the implicit token rewards (``[B, T]``, placed on the batch's
    rows) and every mask the PRM's CE loss sees."""
    import prime_trl.algo.core as core
    import prime_trl.trainer.prime_trainer as prime_trainer

    seen = {"steps": [], "loss_masks": [], "token_rewards": []}
    original_step, original_loss = prime_trainer.prime_step, core.prm_ce_loss
    original_rewards = core.implicit_token_rewards

    def step(prm, batch, *args, **kwargs):
        result = original_step(prm, batch, *args, **kwargs)
        seen["steps"].append((batch, result))
        return result

    def loss(prm_logps, ref_logps, mask, *args, **kwargs):
        seen["loss_masks"].append(mask.detach().clone())
        return original_loss(prm_logps, ref_logps, mask, *args, **kwargs)

    def rewards(prm_logps, ref_logps, mask, beta):
        result = original_rewards(prm_logps, ref_logps, mask, beta)
        seen["token_rewards"].append(result.detach().clone())
        return result

    monkeypatch.setattr(prime_trainer, "prime_step", step)
    monkeypatch.setattr(core, "prm_ce_loss", loss)
    monkeypatch.setattr(core, "implicit_token_rewards", rewards)
    return seen


def tool_args(tmp_path, **overrides):
    # One micro-batch holding the whole generation batch and no filter: the PRM loss sees every row in order.
    settings = dict(
        max_completion_length=160,
        max_steps=1,
        accuracy_filter=False,
        prm_update="double",  # rewards from the updated PRM, so they are non-zero on the policy's tokens
        prm_micro_batch_size=8,
        prm_learning_rate=0.5,
    )
    settings.update(overrides)
    return make_args(tmp_path, **settings)


def conversational_dataset(n=4):
    return Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is 3*4? ({i})"}]} for i in range(n)])


def check_prm_masks(seen, tokenizer, expect_masked_text):
    """Token by token: the rows' masked-out tokens are exactly the external ones, and the PRM loss, the token
    rewards and the advantages are zero on them and only on them."""
    batch, step = seen["steps"][0]
    assert batch.tool_mask is not None
    loss_mask = batch.loss_mask.bool()
    external = batch.completion_mask.bool() & ~loss_mask
    assert external.any(), "no tool / environment tokens in the batch"
    for row in range(len(batch)):
        ids = batch.completion_ids[row]
        masked_text = tokenizer.decode(ids[external[row]])
        policy_text = tokenizer.decode(ids[loss_mask[row]])
        if external[row].any():
            assert expect_masked_text(masked_text), masked_text
            assert not expect_masked_text(policy_text), policy_text
    # The PRM's CE loss saw exactly TRL's loss mask (completion_mask * tool_mask), one micro-batch, rows in order.
    assert len(seen["loss_masks"]) == 1
    torch.testing.assert_close(seen["loss_masks"][0], batch.loss_mask.float())
    # The step's own call (the last one: the CE loss calls it too); no filter, so every row of the batch, in order.
    token_rewards = seen["token_rewards"][-1]
    assert token_rewards.shape == loss_mask.shape
    assert (token_rewards[external] == 0).all() and (token_rewards[loss_mask] != 0).any()
    assert (step.advantages[external] == 0).all() and (step.advantages[loss_mask] != 0).any()


def test_tools_mask_tool_results_from_prm_rewards_and_advantages(tool_model, tmp_path, monkeypatch):
    model, tokenizer = tool_model
    seen = spy_prime_step(monkeypatch)
    trainer = PRIMETrainer(
        model,
        args=tool_args(tmp_path),
        reward_funcs=answer_reward,
        train_dataset=conversational_dataset(),
        processing_class=tokenizer,
        tools=[multiply],
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    monkeypatch.setattr(trainer, "_generate_single_turn", scripted_generation(tokenizer))
    trainer.train()
    check_prm_masks(seen, tokenizer, lambda text: "<tool_response>" in text and "12" in text)


def test_environment_factory_masks_environment_turns(tool_model, tmp_path, monkeypatch):
    model, tokenizer = tool_model
    seen = spy_prime_step(monkeypatch)
    trainer = PRIMETrainer(
        model,
        args=tool_args(tmp_path),
        train_dataset=conversational_dataset(),
        processing_class=tokenizer,
        environment_factory=MultiplyEnv,  # no reward_funcs: the environment's get_reward is the reward source
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    assert trainer.reward_func_names == ["MultiplyEnv"]
    monkeypatch.setattr(trainer, "_generate_single_turn", scripted_generation(tokenizer))
    trainer.train()
    check_prm_masks(seen, tokenizer, lambda text: "<tool_response>" in text and "12" in text)


def test_rollout_func_env_mask_is_honoured_token_by_token(tool_model, tmp_path, monkeypatch):
    model, tokenizer = tool_model
    seen = spy_prime_step(monkeypatch)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731

    def rollout(prompts, trainer):
        prompt_ids, completion_ids, env_masks = [], [], []
        for row, prompt in enumerate(prompts):
            policy, env, answer = encode("x="), encode(f"[env says {row}]"), encode(f"{row % 3}<|im_end|>")
            prompt_ids.append(encode(prompt))
            completion_ids.append(policy + env + answer)
            env_masks.append([1] * len(policy) + [0] * len(env) + [1] * len(answer))
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": None, "env_mask": env_masks}

    trainer = PRIMETrainer(
        model,
        args=tool_args(tmp_path),
        reward_funcs=lambda completions, **kw: [float(c.endswith("0")) for c in completions],
        train_dataset=make_dataset(),
        processing_class=tokenizer,
        rollout_func=rollout,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )
    trainer.train()
    batch, _ = seen["steps"][0]
    for row in range(len(batch)):
        length = int(batch.completion_mask[row].sum())
        text = tokenizer.decode(batch.completion_ids[row, :length])
        policy, env = encode("x="), encode(text[2 : text.index("]") + 1])
        expected = [1] * len(policy) + [0] * len(env) + [1] * (length - len(policy) - len(env))
        assert batch.loss_mask[row, :length].tolist() == expected, text
    check_prm_masks(seen, tokenizer, lambda text: text.startswith("[env says") and text.endswith("]"))


# ------------------------------------------------------------------------------------------------------------------
# Item 2: the PRM adapter on every architecture and adapter layout TRL trains
# ------------------------------------------------------------------------------------------------------------------


@pytest.fixture
def nemotron_h_model():
    """A tiny hybrid Mamba model (NemotronH: a Mamba2 layer, an attention layer, an MLP layer), random weights."""
    from transformers import NemotronHConfig, NemotronHForCausalLM

    from prime_trl.tiny import build_tokenizer

    tokenizer = build_tokenizer()
    config = NemotronHConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        layers_block_type=["mamba", "attention", "mlp"],
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        mamba_num_heads=4,
        mamba_head_dim=16,
        n_groups=1,
        ssm_state_size=8,
        chunk_size=16,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(0)
    return NemotronHForCausalLM(config), tokenizer


def test_full_finetune_of_a_mamba_hybrid_gets_a_prm_lora_can_wrap(nemotron_h_model, tmp_path):
    model, tokenizer = nemotron_h_model
    trainer = PRIMETrainer(
        model,
        args=make_args(tmp_path, max_steps=1, accuracy_filter=False, max_completion_length=6),
        reward_funcs=coin_reward,
        train_dataset=make_dataset(),
        processing_class=tokenizer,
    )
    wrapped = {name.rsplit(".", 2)[0].rsplit(".", 1)[-1] for name, _ in trainer.prm.model.named_parameters()}
    wrapped = {n for n in wrapped if n.endswith("proj")}
    # PEFT's rule for Mamba mixers: no LoRA on out_proj (or conv1d); every other linear layer is covered.
    assert "out_proj" not in wrapped and {"in_proj", "q_proj", "k_proj", "v_proj", "o_proj", "up_proj"} <= wrapped
    prm_before = {n: p.detach().clone() for n, p in trainer.prm.model.named_parameters() if ".prm." in n}
    policy_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    assert any(not torch.equal(p, trainer.prm.model.get_parameter(n)) for n, p in prm_before.items())
    assert any(not torch.equal(p, trainer.model.get_parameter(n)) for n, p in policy_before.items())


def test_prm_target_lora_cannot_wrap_is_refused_naming_module_and_fix(nemotron_h_model, tmp_path):
    model, tokenizer = nemotron_h_model
    with pytest.raises(ValueError, match=r"targets \['out_proj'\].*Use target_modules=\[.*'in_proj'") as error:
        PRIMETrainer(
            model,
            LoraConfig(r=4, target_modules=["q_proj", "out_proj"]),
            make_args(tmp_path),
            reward_funcs=coin_reward,
            train_dataset=make_dataset(),
            processing_class=tokenizer,
        )
    assert "\n" not in str(error.value)


def test_modules_to_save_each_adapter_trains_its_own_copy_reference_keeps_the_base(tiny_model_dir, tmp_path):
    from trl.trainer.utils import use_adapter

    trainer = PRIMETrainer(
        tiny_model_dir,
        args=make_args(tmp_path, max_steps=2, accuracy_filter=False),
        reward_funcs=coin_reward,
        train_dataset=make_dataset(),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["lm_head"]),
    )
    model = trainer.model

    def head(adapter):
        with use_adapter(model, adapter):
            return model.get_output_embeddings().weight.detach().clone()

    before = {name: head(name) for name in ("default", "prm", None)}
    assert torch.equal(before["prm"], before[None]) and torch.equal(before["default"], before[None])
    trainer.train()
    after = {name: head(name) for name in ("default", "prm", None)}
    assert not torch.equal(after["default"], before["default"])  # the policy's copy trained
    assert not torch.equal(after["prm"], before["prm"])  # the PRM's own copy trained
    assert not torch.equal(after["default"], after["prm"])  # two different copies
    assert torch.equal(after[None], before[None])  # the reference's head is the base's, untouched


def test_prm_modules_to_save_with_vllm_is_refused_before_vllm_starts(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"TRL's vLLM weight sync renames only the policy's"):
        PRIMETrainer(
            tiny_model_dir,
            LoraConfig(r=4, target_modules="all-linear", modules_to_save=["lm_head"]),
            make_args(tmp_path, use_vllm=True, vllm_mode="colocate"),
            reward_funcs=coin_reward,
            train_dataset=make_dataset(),
            peft_config=LoraConfig(r=4, target_modules="all-linear"),
        )
