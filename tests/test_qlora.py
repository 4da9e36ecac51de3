"""QLoRA on CPU: PRIME on a 4-bit (bitsandbytes nf4) base with both LoRA adapters."""

import pytest
import torch
from datasets import Dataset

from prime_trl.trainer.quantization import is_quantized, protect_4bit_base

bnb = pytest.importorskip("bitsandbytes")
from helpers import prime_trainer  # noqa: E402
from transformers import AutoModelForCausalLM, BitsAndBytesConfig  # noqa: E402

NF4 = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.bfloat16)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    from prime_trl.tiny import save_tiny_model

    # hidden 128 -> two 64-wide quantisation blocks per weight row, so block layout bugs would show
    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-q"), hidden_size=128))


def four_bit_state(model):
    return {
        name: (module.weight.data.clone(), module.weight.quant_state.absmax.clone())
        for name, module in model.named_modules()
        if isinstance(module, bnb.nn.Linear4bit)
    }


def qlora_trainer(model, tmp_path, quantization_config=None):
    return prime_trainer(
        model,
        tmp_path,
        Dataset.from_list([{"prompt": f"Q{i}=", "answer": "1"} for i in range(16)]),
        quantization_config=quantization_config,
        per_device_train_batch_size=8,
        max_completion_length=10,
        max_steps=2,
        learning_rate=0.05,
        prm_learning_rate=0.05,
        accuracy_filter=False,
        gradient_checkpointing=True,
    )


def test_qlora_trains_both_adapters_and_keeps_4bit_base(model_dir, tmp_path):
    trainer = qlora_trainer(model_dir, tmp_path, BitsAndBytesConfig(**NF4))
    assert is_quantized(trainer.model)
    base_before = four_bit_state(trainer.model)
    assert base_before, "the base should be made of Linear4bit layers"
    params_before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    trainer.train()
    params_after = dict(trainer.model.named_parameters())
    for role in (".default.", ".prm."):
        names = [n for n in params_before if role in n]
        assert names and all(not torch.equal(params_before[n], params_after[n]) for n in names)
    for name, (weight, absmax) in four_bit_state(trainer.model).items():
        assert torch.equal(weight, base_before[name][0]) and torch.equal(absmax, base_before[name][1]), name


def test_eval_mode_forward_cannot_break_qlora_training(model_dir, tmp_path):
    """A sanity forward in eval mode (what from_pretrained leaves) repacks 4-bit weights on AVX512-BF16 CPUs;
    PRIMETrainer restores them, and later evaluation-style forwards no longer repack."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, quantization_config=BitsAndBytesConfig(**NF4))
    fresh = four_bit_state(model)
    with torch.no_grad():
        model(torch.tensor([[5, 6, 7, 8]]))  # may repack, depending on the CPU
    trainer = qlora_trainer(model, tmp_path)
    restored = list(four_bit_state(trainer.model).values())  # same layers, renamed by the PEFT wrapper
    assert len(restored) == len(fresh)
    for (weight, _), (fresh_weight, _) in zip(restored, fresh.values(), strict=True):
        assert torch.equal(weight, fresh_weight), "4-bit weight not restored to the trainable layout"
    trainer.model.eval()
    with torch.no_grad():
        trainer.model(torch.tensor([[5, 6, 7, 8]]))
    trainer.model.train()
    trainer.train()  # would raise "a view of a leaf Variable ... in-place operation" on a repacked base
    assert trainer.state.global_step == 2


def test_protect_is_noop_without_4bit_layers(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert protect_4bit_base(model) == 0 and not is_quantized(model)
