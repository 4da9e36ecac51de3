"""Prompts in, completions out, the way TRL's `GRPOTrainer` does it: for the code that generates outside TRL's
trainer (the Lightning module, ``prime-trl eval`` and ``prime-trl score``), so that all of it tokenises prompts, sets
up padding and EOS and cuts completions exactly as training with `PRIMETrainer` does. Padding uses TRL's own
`trl.trainer.utils.pad`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

logger = logging.getLogger(__name__)

__all__ = ["cut_at_first_eos", "left_padded_prompts", "pad_and_eos_token_ids", "prompt_token_ids", "render_prompt"]


def render_prompt(tokenizer, prompt: str | list[dict], chat_template_kwargs: dict | None = None) -> str:
    """The text the model sees: the chat template (with the assistant turn opened) for message lists, the string
    itself for plain prompts (TRL's "standard" format, as the demo task uses). `prompt_token_ids` gives the ids."""
    if isinstance(prompt, str):
        return prompt
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(
            list(prompt), tokenize=False, add_generation_prompt=True, **(chat_template_kwargs or {})
        )
    logger.warning("The tokenizer has no chat template; joining the messages' contents as plain text.")
    return "\n\n".join(message["content"] for message in prompt)


def prompt_token_ids(tokenizer, prompt: str | list[dict], chat_template_kwargs: dict | None = None) -> list[int]:
    """The prompt's token ids exactly as TRL's GRPOTrainer tokenises it in training.

    Chat messages: the chat template, whose text already holds any BOS, tokenised without special tokens. A plain
    string: tokenised *with* the tokenizer's special tokens (TRL calls ``processing_class(text=prompts)``), so a
    BOS-adding tokenizer (Llama, Mistral, Gemma) puts its BOS first, as in training.
    """
    if isinstance(prompt, str):
        return tokenizer(prompt)["input_ids"]
    return tokenizer(render_prompt(tokenizer, prompt, chat_template_kwargs), add_special_tokens=False)["input_ids"]


def left_padded_prompts(prompt_ids: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids, mask)`` ``[B, P]`` of prompts left-padded with ``pad_id`` (generation continues them on the right)."""
    from trl.trainer.utils import pad  # imported here: eval and score import this module without needing TRL yet

    ids = [torch.tensor(row, dtype=torch.long) for row in prompt_ids]
    masks = [torch.ones_like(row) for row in ids]
    return pad(ids, padding_value=pad_id, padding_side="left"), pad(masks, padding_value=0, padding_side="left")


def pad_and_eos_token_ids(tokenizer, model) -> list[int]:
    """Set up padding as `GRPOTrainer` does and return the ids that end a completion.

    The tokenizer gets its EOS as pad token when it has none; the model's config and generation config take the
    tokenizer's pad id; every EOS id the model's generation config declares ends a completion, and so does the
    tokenizer's own (first, when the model does not declare it).
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    model.config.get_text_config().pad_token_id = tokenizer.pad_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    declared = model.generation_config.eos_token_id
    declared = [] if declared is None else [declared] if isinstance(declared, int) else list(declared)
    return declared if tokenizer.eos_token_id in declared else [tokenizer.eos_token_id, *declared]


def cut_at_first_eos(
    completion_ids: torch.Tensor, eos_ids: Sequence[int], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generated ``[B, T]`` tokens -> ``(ids, mask)``: ``mask`` is 1 up to and including each row's first EOS (all
    ones for a row that hit the length limit), ids after it become ``pad_id``, and columns that no row uses are
    dropped (docs/algorithm.md section 1)."""
    is_eos = torch.isin(completion_ids, torch.tensor(list(eos_ids), device=completion_ids.device))
    eos_index = torch.where(is_eos.any(1), is_eos.int().argmax(1), completion_ids.shape[1])
    positions = torch.arange(completion_ids.shape[1], device=completion_ids.device)
    mask = (positions <= eos_index[:, None]).long()
    width = int(mask.sum(1).max()) if len(mask) else 0
    mask = mask[:, :width]
    return completion_ids[:, :width].masked_fill(mask == 0, pad_id), mask
