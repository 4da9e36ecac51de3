"""The demo's tokenizer and tiny causal LM (Qwen2 architecture, about a million parameters), built locally."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from typing import Any

import torch
from transformers import Qwen2ForCausalLM, Qwen2Tokenizer

from prime_trl.demo.task import ALPHABET
from prime_trl.tiny import build_model, build_tokenizer

logger = logging.getLogger(__name__)

__all__ = ["DemoModelConfig", "build_demo_model", "build_demo_tokenizer", "count_parameters"]


@dataclass(frozen=True)
class DemoModelConfig:
    """Size of the demo model (a ``Qwen2ForCausalLM`` with tied embeddings); the default has ~0.74M parameters.

    ``max_position_embeddings`` only sizes the rotary cache; prompt + completion stay well under it.
    """

    hidden_size: int = 128
    num_layers: int = 3
    num_heads: int = 4
    num_kv_heads: int = 2
    intermediate_size: int = 512
    max_position_embeddings: int = 256

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_demo_tokenizer() -> Qwen2Tokenizer:
    """Character-level tokenizer over the task's alphabet (30 ids incl. specials), plain text, left padding."""
    return build_tokenizer(alphabet=ALPHABET, chat_template=None)


def build_demo_model(
    tokenizer: Qwen2Tokenizer, config: DemoModelConfig = DemoModelConfig(), seed: int = 0
) -> Qwen2ForCausalLM:
    """A randomly initialised demo model (float32), seeded."""
    return build_model(
        tokenizer,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        num_heads=config.num_heads,
        num_kv_heads=config.num_kv_heads,
        intermediate_size=config.intermediate_size,
        max_position_embeddings=config.max_position_embeddings,
        seed=seed,
    )


def count_parameters(model: torch.nn.Module) -> int:
    """Number of distinct parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())
