"""Small helpers shared by the test modules (pytest puts this directory on sys.path)."""

import zlib


def coin_reward(completions, **kwargs):
    """A deterministic pseudo-random 0/1 verdict per completion, so groups are mixed and advantages non-zero."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(zlib.crc32(text.encode()) % 2) for text in texts]


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
