"""Small helpers shared by the test modules (pytest puts this directory on sys.path)."""

import zlib


def coin_reward(completions, **kwargs):
    """A deterministic pseudo-random 0/1 verdict per completion, so groups are mixed and advantages non-zero."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(zlib.crc32(text.encode()) % 2) for text in texts]


# The training arguments every CPU test run shares: no accelerator, float32, no reports, no checkpoints (unless
# the test sets save_strategy). Tests add what they exercise: batch shape, steps, learning rates, checkpointing, seed.
CPU_RUN = dict(use_cpu=True, bf16=False, report_to="none", save_strategy="no")
# The LoRA adapter (policy and PRM) of the tiny-model tests.
TINY_LORA = dict(r=4, lora_alpha=8, target_modules="all-linear")


def prime_config(output_dir, **settings):
    """A `PRIMEConfig` for a CPU test run: `CPU_RUN`, then ``settings``."""
    from prime_trl import PRIMEConfig

    return PRIMEConfig(**{**CPU_RUN, "output_dir": str(output_dir), **settings})


def prime_trainer(model, output_dir, train_dataset, reward_funcs=coin_reward, lora=TINY_LORA, **settings):
    """A `PRIMETrainer` for a CPU test run on ``model`` (path or model) with a LoRA policy and PRM (``lora``: the
    `LoraConfig` arguments), configured by `prime_config`. ``quantization_config`` and ``processing_class`` among
    ``settings`` go to the trainer, the rest to the config."""
    from peft import LoraConfig

    from prime_trl import PRIMETrainer

    trainer_kwargs = {key: settings.pop(key) for key in ("quantization_config", "processing_class") if key in settings}
    return PRIMETrainer(
        model,
        args=prime_config(output_dir, **settings),
        reward_funcs=reward_funcs,
        train_dataset=train_dataset,
        peft_config=LoraConfig(**lora),
        **trainer_kwargs,
    )


def snapshot(model) -> dict:
    """A copy of every parameter of ``model``, by name."""
    return {name: param.detach().clone() for name, param in model.named_parameters()}


def assert_only_adapters_moved(before: dict, after: dict, every: bool = True) -> tuple[set, set]:
    """Between two `snapshot`s the policy (``.default.``) and PRM (``.prm.``) LoRA tensors moved (``every`` one of
    them, or at least one of each) and nothing else did: the shared base stays frozen. Returns the names of the
    policy's and the PRM's LoRA tensors."""
    import torch

    changed = {name for name in before if not torch.equal(before[name], after[name])}
    lora = {name for name in before if "lora_" in name}
    policy = {name for name in lora if ".default." in name}
    prm = {name for name in lora if ".prm." in name}
    assert policy and prm and len(lora) < len(before), "expected policy and PRM adapters on a base"
    for role, names in (("policy", policy), ("PRM", prm)):
        moved = names <= changed if every else bool(names & changed)
        assert moved, f"{'not every' if every else 'no'} {role} LoRA tensor moved: {sorted(names - changed)[:3]}"
    assert changed <= policy | prm, f"base weights changed: {sorted(changed - policy - prm)[:3]}"
    return policy, prm


def bos_tokenizer():
    """A byte-level tokenizer that adds a BOS to plain text (as Llama's, Mistral's and Gemma's do) and whose chat
    template writes the BOS itself; same vocabulary size as the tiny model's tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    byte_to_char = bytes_to_unicode()
    vocab = {byte_to_char[b]: b for b in range(256)} | {"<s>": 256, "</s>": 257, "<pad>": 258}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 256)])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tokenizer.chat_template = (
        "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}[assistant]{% endif %}"
    )
    return tokenizer


def trl_prompt_ids(tokenizer, prompts):
    """Prompt ids as TRL's GRPOTrainer tokenises them in training (its own method, on a minimal trainer)."""
    from types import SimpleNamespace

    from trl import GRPOTrainer

    trainer = SimpleNamespace(
        processing_class=tokenizer,
        _is_vlm=False,
        environment_factories=None,
        tools=None,
        chat_template=None,
        chat_template_kwargs={},
    )
    return GRPOTrainer._tokenize_prompts(trainer, prompts)[0]


def require_bwrap() -> None:
    """Skip the calling test module when the bubblewrap sandbox cannot run here, except in CI (``CI`` set, as
    `.ci/run` runs): there `make test` installs bubblewrap, so a sandbox that does not work is a defect to report,
    and the attack suite must fail rather than pass by skipping."""
    import os

    import pytest

    from prime_trl.rewards import bwrap_status

    ok, reason = bwrap_status()
    if ok:
        return
    message = f"bubblewrap sandbox not available here: {reason} (run `make sandbox` as root)"
    if os.environ.get("CI"):
        pytest.fail(message, pytrace=False)
    pytest.skip(message)
