"""Helpers shared by the reward functions: completion text and dataset-column checks."""

from __future__ import annotations

from typing import Any


def completion_text(completion: Any) -> str:
    """The text of one TRL completion: a plain string, or a conversational completion (a list of
    ``{"role": ..., "content": ...}`` messages, whose assistant contents are joined; content may also be a list
    of ``{"type": "text", "text": ...}`` parts)."""
    if completion is None:
        return ""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        completion = [completion]
    if isinstance(completion, (list, tuple)):
        messages = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role", "assistant") == "assistant"] or messages
        return "\n".join(_content_text(m.get("content")) for m in assistant)
    raise TypeError(
        f"a completion must be a string or a list of chat messages, got {type(completion).__name__}: {completion!r:.100}"
    )


def _content_text(content: Any) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # multimodal-style parts
        return "".join(part.get("text", "") if isinstance(part, dict) else str(part) for part in content)
    return str(content)


def check_column(name: str, values: Any, expected: int, *, reward: str, hint: str) -> list:
    """Validate a dataset column that TRL passed to a reward function: present, a list, one value per completion."""
    if values is None:
        raise ValueError(
            f"{reward} needs a dataset column named '{name}' ({hint}); TRL passes every dataset column to reward "
            f"functions by name. Add the column to your dataset (prime_trl.data's loaders create it) or rename yours."
        )
    if isinstance(values, (str, bytes, dict)) or not hasattr(values, "__len__"):
        raise TypeError(f"{reward}: '{name}' must be a list with one value per completion, got {type(values).__name__}")
    values = list(values)
    if len(values) != expected:
        raise ValueError(
            f"{reward}: column '{name}' has {len(values)} values but there are {expected} completions; "
            "each completion needs its own row value (TRL repeats columns per generation for you)"
        )
    return values
