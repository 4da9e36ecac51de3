"""The shared PRM machinery (prime_trl.algo.prm): exactness at step 0 and correct gradients under checkpointing."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from prime_trl.algo.prm import CompletionBatch, ImplicitPRM, add_prm_adapter, default_prm_lora_config


def build_host(model_dir, randomize=True, seed=0):
    """A PeftModel with a policy adapter 'default' and a PRM adapter 'prm' on one base."""
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(model_dir)
    policy_config = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0)
    model = get_peft_model(base, policy_config)
    add_prm_adapter(model, "prm", None, default_prm_lora_config(policy_config))
    if randomize:  # non-zero B everywhere, so both adapters really change the forward
        with torch.no_grad():
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.5)
    model.train()
    return model


def make_batch(rows=6, prompt=5, completion=9, seed=0):
    gen = torch.Generator().manual_seed(seed)
    prompt_mask = torch.ones(rows, prompt, dtype=torch.long)
    prompt_mask[0, :2] = 0  # some left padding
    return CompletionBatch(
        prompt_ids=torch.randint(3, 250, (rows, prompt), generator=gen),
        prompt_mask=prompt_mask,
        completion_ids=torch.randint(3, 250, (rows, completion), generator=gen),
        completion_mask=(torch.arange(completion) < torch.randint(1, completion + 1, (rows, 1), generator=gen)).long(),
    )


def sgd_prm(model, **kwargs):
    prm = ImplicitPRM(model, "prm", beta=0.05, micro_batch_size=2, **kwargs)
    prm.create_optimizer(learning_rate=1.0)
    prm.optimizer = torch.optim.SGD(prm.parameters(), lr=1.0)  # param delta == -gradient, exactly
    prm.scheduler = torch.optim.lr_scheduler.LambdaLR(prm.optimizer, lambda _: 1.0)
    return prm


def test_fresh_prm_equals_reference_exactly(tiny_model_dir):
    """Zero-initialised PRM: its log-probs equal the reference's bit for bit, in train mode, under checkpointing."""
    model = build_host(tiny_model_dir, randomize=False)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.enable_input_require_grads()
    prm = ImplicitPRM(model, "prm", beta=0.05, micro_batch_size=4)
    prm.create_optimizer(learning_rate=1e-3)
    batch = make_batch()
    scored = prm.score(batch)
    assert torch.equal(scored.prm_logps, scored.ref_logps)
    updated = prm.score_and_update(batch, torch.tensor([1.0, 0, 1, 0, 1, 0]))  # "single": scored before updating
    assert torch.equal(updated.prm_logps, updated.ref_logps)
    after = prm.score(batch)
    assert not torch.equal(after.prm_logps, after.ref_logps)


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_prm_gradients_identical_with_gradient_checkpointing(tiny_model_dir, use_reentrant):
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    batch = make_batch()

    def prm_step(checkpointing: bool) -> dict[str, torch.Tensor]:
        model = build_host(tiny_model_dir)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.enable_input_require_grads()
        prm = sgd_prm(model)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        prm.score_and_update(batch, labels)
        return {n: before[n] - p.detach() for n, p in model.named_parameters()}  # == gradients (SGD, lr 1)

    plain, checkpointed = prm_step(False), prm_step(True)
    prm_names = [n for n in plain if ".prm." in n]
    assert prm_names and all(plain[n].abs().sum() > 0 for n in prm_names if "lora_A" in n)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], rtol=1e-5, atol=1e-7)
        if ".prm." not in name:
            assert torch.all(plain[name] == 0), f"{name} must not move in a PRM update"


def test_micro_batching_does_not_change_the_update(tiny_model_dir):
    """Loss weights make the update a mean over all rows, however the rows are split into micro-batches."""
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    batch = make_batch()
    deltas = []
    for micro in (1, 4, 6):
        model = build_host(tiny_model_dir)
        prm = sgd_prm(model)
        prm.micro_batch_size = micro
        before = {n: p.detach().clone() for n, p in model.named_parameters() if ".prm." in n}
        prm.score_and_update(batch, labels)
        deltas.append({n: before[n] - p.detach() for n, p in model.named_parameters() if ".prm." in n})
    for other in deltas[1:]:
        for name in deltas[0]:
            torch.testing.assert_close(other[name], deltas[0][name], rtol=1e-4, atol=1e-7)


def test_double_update_rescores_with_updated_prm(tiny_model_dir):
    labels = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    batch = make_batch()
    single = sgd_prm(build_host(tiny_model_dir), update_mode="single")
    double = sgd_prm(build_host(tiny_model_dir), update_mode="double")
    out_single, out_double = single.score_and_update(batch, labels), double.score_and_update(batch, labels)
    torch.testing.assert_close(out_single.ref_logps, out_double.ref_logps, rtol=0, atol=0)
    assert not torch.allclose(out_single.prm_logps, out_double.prm_logps)
    torch.testing.assert_close(out_double.prm_logps, double.score(batch).prm_logps)


def test_dpo_group_context_collects_group_members(tiny_model_dir):
    prm = sgd_prm(build_host(tiny_model_dir), loss_type="dpo")
    batch = make_batch()
    labels = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    log_ratios, member_labels = prm._dpo_group_context(batch, labels, groups)
    assert log_ratios.shape == (6, 3)
    torch.testing.assert_close(member_labels, torch.tensor([[1.0, 0, 0]] * 3 + [[1.0, 1, 0]] * 3))
    assert torch.equal(log_ratios[0], log_ratios[2]) and torch.equal(log_ratios[3], log_ratios[5])
    out = prm.score_and_update(batch, labels, group_ids=groups)
    assert out.loss is not None and out.optimizer_steps == 1


@pytest.mark.parametrize("overrides", [dict(), dict(update_mode="double"), dict(loss_type="dpo")])
def test_batch_with_no_rows_is_skipped_not_fed_to_the_model(tiny_model_dir, overrides):
    """The accuracy filter can leave a process no rows (every group all right or all wrong): scoring and the
    update then make no forward (a zero-row forward fails in the model) and return empty log-probs."""
    prm = sgd_prm(build_host(tiny_model_dir), **overrides)
    empty = make_batch().select(torch.tensor([], dtype=torch.long))
    before = {n: p.detach().clone() for n, p in prm.model.named_parameters() if ".prm." in n}
    scored = prm.score(empty)
    updated = prm.score_and_update(empty, torch.zeros(0), group_ids=torch.zeros(0, dtype=torch.long))
    assert scored.prm_logps.shape == updated.ref_logps.shape == (0, 9)
    assert updated.optimizer_steps == 0
    assert all(torch.equal(p, before[n]) for n, p in prm.model.named_parameters() if ".prm." in n)
