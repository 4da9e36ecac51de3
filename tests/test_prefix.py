"""Shared-prefix passes (prime_trl.algo.prefix): same log-probs, gradients and training as the plain forward."""

import logging

import pytest
import torch
from datasets import Dataset
from helpers import prime_trainer
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM
from trl.trainer.utils import add_fused_lm_head

import prime_trl.algo.prefix as prefix
from prime_trl.algo.prm import CompletionBatch, ImplicitPRM, add_prm_adapter, completion_log_probs
from prime_trl.tiny import build_model, build_tokenizer

torch.set_num_threads(1)

GROUPS, K, PROMPT, COMPLETION = 3, 4, 14, 9


@pytest.fixture(params=["qwen2", "llama"])
def lora_model(request):
    """A tiny Qwen2 (or Llama, SmolLM2's architecture) with TRL's fused head and a non-zero LoRA adapter (so the
    adapter path matters)."""
    model = build_model(build_tokenizer(), hidden_size=64, num_layers=2, seed=1)
    if request.param == "llama":
        from transformers import LlamaConfig, LlamaForCausalLM

        config = LlamaConfig(
            vocab_size=model.config.vocab_size,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
        )
        torch.manual_seed(1)
        model = LlamaForCausalLM(config)
    add_fused_lm_head(model, outputs=("log_probs", "entropy"))
    return get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))


def grouped_batch(seed: int = 0, shuffle: bool = True) -> CompletionBatch:
    """GROUPS prompts x K completions: left-padded prompts of different lengths, completions with masked tails,
    rows shuffled as TRL's steps_per_generation shuffling leaves them."""
    gen = torch.Generator().manual_seed(seed)
    prompts = torch.randint(5, 200, (GROUPS, PROMPT), generator=gen)
    prompt_mask = torch.ones_like(prompts)
    prompt_mask[0, :5] = 0
    prompt_mask[1, :1] = 0
    prompts = prompts.masked_fill(prompt_mask == 0, 3)
    completions = torch.randint(5, 200, (GROUPS * K, COMPLETION), generator=gen)
    completion_mask = torch.ones_like(completions)
    completion_mask[2, 4:] = 0
    completion_mask[7, 1:] = 0
    order = torch.randperm(GROUPS * K, generator=gen) if shuffle else torch.arange(GROUPS * K)
    return CompletionBatch(
        prompts.repeat_interleave(K, 0)[order],
        prompt_mask.repeat_interleave(K, 0)[order],
        completions[order],
        completion_mask[order],
    )


@pytest.fixture
def count_shared(monkeypatch):
    """Record each shared-prefix forward (active adapter, grad mode), to prove the shared path actually ran."""
    calls = []
    original = prefix.shared_prefix_forward

    def counting(model, *args, **kwargs):
        calls.append((getattr(model, "active_adapter", None), torch.is_grad_enabled()))
        return original(model, *args, **kwargs)

    monkeypatch.setattr(prefix, "shared_prefix_forward", counting)
    return calls


def test_prefix_groups_follow_prompts_not_positions():
    batch = grouped_batch()
    groups = prefix.find_prefix_groups(batch.prompt_ids, batch.prompt_mask)
    assert groups.num_groups == GROUPS
    for row in range(len(batch)):
        first = groups.first_rows[groups.row_group[row]]
        assert torch.equal(batch.prompt_ids[row], batch.prompt_ids[first])
    # Rows with distinct prompts never share, and then sharing is not worth a second pass.
    distinct = batch.select(groups.first_rows)
    single = prefix.find_prefix_groups(distinct.prompt_ids, distinct.prompt_mask)
    assert single.num_groups == GROUPS
    assert not prefix.worth_sharing(single, distinct.prompt_mask, COMPLETION)
    assert prefix.worth_sharing(groups, batch.prompt_mask, COMPLETION)


@pytest.mark.parametrize("fused", [False, True])
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_log_probs_agree_with_plain_forward(lora_model, count_shared, fused, dtype):
    batch = grouped_batch()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == "bf16")
    with torch.no_grad(), autocast:
        plain = completion_log_probs(lora_model, batch, fused)
        shared = completion_log_probs(lora_model, batch, fused, share_prefix=True)
    assert count_shared, "the shared path did not run"
    # bf16 rounds each matmul to 8 bits of mantissa; fp32 agrees to float rounding.
    tolerance = 1e-5 if dtype == "fp32" else 3e-2
    torch.testing.assert_close(shared, plain, atol=tolerance, rtol=tolerance)
    assert plain.abs().mean() > 1.0  # non-trivial log-probs (a random model over a 256-token vocabulary)


def test_entropies_agree_with_plain_forward(lora_model):
    batch = grouped_batch()
    groups = prefix.find_prefix_groups(batch.prompt_ids, batch.prompt_mask)
    with torch.no_grad():
        labels = batch.input_ids.masked_fill(batch.attention_mask == 0, -100)
        labels[:, :-COMPLETION] = -100
        plain = lora_model(
            input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=labels, fused_lm_head=True
        )
        _, entropy = prefix.shared_completion_log_probs(
            lora_model,
            batch.prompt_ids,
            batch.prompt_mask,
            batch.completion_ids,
            batch.completion_mask,
            groups,
            fused=True,
            compute_entropy=True,
        )
    torch.testing.assert_close(entropy, plain.entropy[:, -COMPLETION:], atol=1e-5, rtol=1e-5)


def lora_gradients(model, batch, share: bool) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    log_probs = completion_log_probs(model, batch, fused=True, share_prefix=share)
    # A loss that weighs tokens differently, so every row's gradient matters.
    weights = torch.linspace(-1.0, 1.0, log_probs.numel()).view_as(log_probs)
    (log_probs * batch.completion_mask * weights).sum().backward()
    return {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("checkpointing", [None, "non-reentrant"])
def test_gradients_agree_with_plain_forward(lora_model, count_shared, checkpointing):
    """The gradient flows through the shared prompt states once, summed over the group's completions."""
    lora_model.train()
    if checkpointing:
        lora_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    batch = grouped_batch()
    plain = lora_gradients(lora_model, batch, share=False)
    shared = lora_gradients(lora_model, batch, share=True)
    assert count_shared
    assert plain.keys() == shared.keys() and len(plain) > 0
    for name in plain:
        torch.testing.assert_close(shared[name], plain[name], atol=1e-5, rtol=1e-4, msg=name)


def test_reentrant_checkpointing_is_refused_for_gradient_passes(lora_model):
    lora_model.train()
    lora_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    reason = prefix.unsupported_reason(lora_model, needs_grad=True)
    assert reason is not None and "use_reentrant" in reason
    assert prefix.unsupported_reason(lora_model, needs_grad=False) is None  # no-grad passes still share


def test_sliding_window_models_are_refused():
    model = build_model(build_tokenizer(), hidden_size=32, num_layers=2)
    model.config.use_sliding_window = True
    model.config.sliding_window = 8
    model.config.layer_types = ["sliding_attention", "full_attention"]
    assert "sliding" in prefix.unsupported_reason(model, needs_grad=False)


def test_fallback_reason_is_logged_once(lora_model, caplog, monkeypatch):
    monkeypatch.setattr(prefix, "_logged_reasons", set())
    lora_model.train()
    lora_model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
    with caplog.at_level(logging.WARNING, logger="prime_trl.algo.prefix"):
        for _ in range(3):
            assert not prefix.sharing_enabled(lora_model, True, needs_grad=True, role="test passes")
    assert len([r for r in caplog.records if "use_reentrant" in r.getMessage()]) == 1


def test_prm_step0_rewards_exactly_zero_and_update_matches(lora_model, count_shared):
    """Reference and PRM take the same (shared) path, so a fresh PRM gives exactly zero implicit rewards; and the PRM
    update with sharing equals the one without to float rounding."""
    add_prm_adapter(lora_model, "prm", None, LoraConfig(r=4, target_modules="all-linear"))
    start = {n: p.detach().clone() for n, p in lora_model.named_parameters() if ".prm." in n}
    batch = grouped_batch()
    labels = torch.tensor([0.0, 1.0] * (len(batch) // 2))
    updates = {}
    for share in (True, False):
        with torch.no_grad():
            for name, param in lora_model.named_parameters():
                if name in start:
                    param.copy_(start[name])
        prm = ImplicitPRM(lora_model, "prm", beta=0.05, micro_batch_size=len(batch), share_prompt_prefix=share)
        prm.create_optimizer(learning_rate=1e-2)
        # Plain SGD: Adam's first step is lr * sign(g) for |g| >> eps, which float rounding can flip on tiny g.
        prm.optimizer = torch.optim.SGD(prm.parameters(), lr=1.0)
        out = prm.score_and_update(batch, labels)
        assert torch.equal(out.prm_logps, out.ref_logps)  # exactly, not approximately
        updates[share] = {n: p.detach() - start[n] for n, p in lora_model.named_parameters() if n in start}
    assert count_shared
    assert any(update.abs().max() > 0 for update in updates[False].values())  # lora_B moves at the first step
    for name, update in updates[False].items():
        torch.testing.assert_close(updates[True][name], update, atol=1e-6, rtol=1e-3, msg=name)


def train_adapters(model_dir: str, out_dir: str, share: bool) -> dict[str, torch.Tensor]:
    """Three PRIME steps with TRL's defaults that matter here: non-reentrant gradient checkpointing, and
    steps_per_generation=2 shuffling rows across the policy's micro-batches."""
    prompts = [f"Question {i}: add the numbers below and explain each step.\n" for i in range(12)]
    trainer = prime_trainer(
        AutoModelForCausalLM.from_pretrained(model_dir),
        out_dir,
        Dataset.from_list([{"prompt": p} for p in prompts]),
        per_device_train_batch_size=4,
        steps_per_generation=2,
        num_generations=4,
        max_completion_length=8,
        max_steps=3,
        learning_rate=0.02,
        prm_learning_rate=0.02,
        accuracy_filter=False,
        share_prompt_prefix=share,
        gradient_checkpointing=True,
        seed=5,
    )
    trainer.train()
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}


def test_training_with_sharing_matches_training_without(tiny_model_dir, tmp_path, count_shared):
    shared = train_adapters(tiny_model_dir, str(tmp_path / "shared"), share=True)
    # The policy's loss pass and the PRM's update pass (both with gradients) shared their prompts.
    assert ("default", True) in count_shared and ("prm", True) in count_shared, count_shared
    plain = train_adapters(tiny_model_dir, str(tmp_path / "plain"), share=False)
    moved = 0
    for name, value in plain.items():
        torch.testing.assert_close(shared[name], value, atol=1e-4, rtol=1e-3, msg=name)
        moved += int(value.abs().max() > 0)
    assert moved > 0


def test_qlora_log_probs_and_gradients_agree(tmp_path, count_shared):
    """On a 4-bit (nf4) base the shared and plain passes agree too (bitsandbytes' CPU path)."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    from prime_trl.tiny import save_tiny_model
    from prime_trl.trainer.quantization import protect_4bit_base

    model_dir = save_tiny_model(tmp_path / "tiny", hidden_size=64)
    quantization = BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32
    )
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=quantization)
    add_fused_lm_head(model)
    model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    protect_4bit_base(model)
    batch = grouped_batch()
    with torch.no_grad():
        plain = completion_log_probs(model, batch, fused=True)
        shared = completion_log_probs(model, batch, fused=True, share_prefix=True)
    torch.testing.assert_close(shared, plain, atol=1e-4, rtol=1e-4)
    model.train()
    plain_grads = lora_gradients(model, batch, share=False)
    shared_grads = lora_gradients(model, batch, share=True)
    assert count_shared and plain_grads
    for name in plain_grads:
        torch.testing.assert_close(shared_grads[name], plain_grads[name], atol=1e-4, rtol=1e-3, msg=name)
