"""Tiny causal LMs and tokenizers built locally (no downloads), for tests, the demo and notebooks.

The tokenizer is character level: a byte-level BPE vocabulary with no merges, so every byte of the text is one
token and any text can be encoded. It is built as a ``Qwen2Tokenizer`` from the start because transformers 5
reloads a tokenizer saved next to a ``qwen2`` config as ``Qwen2Tokenizer`` whatever class wrote it; building it
as that class keeps the ids identical after a save / load round trip.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from transformers import GenerationConfig, Qwen2Config, Qwen2ForCausalLM, Qwen2Tokenizer
from transformers.convert_slow_tokenizer import bytes_to_unicode

__all__ = ["CHATML_TEMPLATE", "PAD_TOKEN", "EOS_TOKEN", "build_tokenizer", "build_model", "save_tiny_model"]

PAD_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|im_start|>"
EOS_TOKEN = "<|im_end|>"

# ChatML, as Qwen2 models use it; `add_generation_prompt` opens the assistant turn.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def build_tokenizer(alphabet: str | None = None, chat_template: str | None = CHATML_TEMPLATE) -> Qwen2Tokenizer:
    """A character-level tokenizer.

    Args:
        alphabet: characters to include. ``None`` (default) covers all 256 bytes, so any text encodes; a small
            alphabet gives a smaller vocabulary (characters outside it are dropped when encoding).
        chat_template: Jinja chat template (ChatML by default); ``None`` for a plain-text-only tokenizer.

    Returns:
        A ``Qwen2Tokenizer`` with ``<|endoftext|>`` as pad, ``<|im_end|>`` as EOS and ``<|im_start|>`` as an extra
        special token, padding on the left (what generation wants).
    """
    byte_to_char = bytes_to_unicode()
    if alphabet is None:
        byte_values = range(256)
    else:
        byte_values = sorted({b for ch in alphabet for b in ch.encode("utf-8")})
    vocab = {byte_to_char[b]: i for i, b in enumerate(byte_values)}
    tokenizer = Qwen2Tokenizer(
        vocab=vocab,
        merges=[],
        unk_token=None,
        bos_token=None,
        eos_token=EOS_TOKEN,
        pad_token=PAD_TOKEN,
        additional_special_tokens=[BOS_TOKEN],
        padding_side="left",  # a constructor argument, so save_pretrained records it
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    return tokenizer


def build_model(
    tokenizer: Qwen2Tokenizer,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 1024,
    seed: int = 0,
) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM sized for CPU tests (about 100k parameters by default).

    The generation config stops on the tokenizer's EOS and pads with its pad token.
    """
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_kv_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=None,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Qwen2ForCausalLM(config)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=True
    )
    return model


def save_tiny_model(directory: str | os.PathLike, alphabet: str | None = None, **model_kwargs) -> Path:
    """Build a tokenizer and model and save both to ``directory`` (usable wherever a hub id is expected)."""
    directory = Path(directory)
    tokenizer = build_tokenizer(alphabet)
    model = build_model(tokenizer, **model_kwargs)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory
