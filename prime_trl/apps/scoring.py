"""Inspecting an implicit PRM: per-token and per-step rewards, best-of-N reranking, and an HTML heat map.

The implicit PRM of PRIME is a LoRA adapter (``prm``) on a frozen base; the reference is that base with adapters
disabled. The reward of completion token ``y_t`` is (Eq. 3 of arXiv:2502.01456)

    r_t = beta * (log pi_prm(y_t | x, y_<t) - log pi_ref(y_t | x, y_<t))      (temperature 1)

and a response's implicit outcome reward is ``r(y) = sum_t r_t``, the quantity the PRM's cross-entropy loss
fits to outcome labels (``sigmoid(r(y))`` estimates P(correct)). Step rewards are sums of token rewards over a
step's tokens. Reranking picks, among N candidates per problem, the one with the highest aggregated reward
(best-of-N with an implicit PRM, as in Yuan et al., arXiv:2412.01981).

Used by ``prime-trl score``; the functions work on any `PeftModel` carrying a PRM adapter::

    model, tokenizer = load_prm("qwen-prime")           # a prime-trl output dir, its prm/ folder, or a checkpoint
    scored = score_responses(model, tokenizer, prompts, responses, beta=0.05)
    Path("rewards.html").write_text(html_page(scored))
"""

from __future__ import annotations

import bisect
import html
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from prime_trl.algo.core import implicit_token_rewards
from prime_trl.algo.prm import CompletionBatch, completion_log_probs
from prime_trl.algo.rollout import left_padded_prompts, prompt_token_ids, render_prompt

logger = logging.getLogger(__name__)

__all__ = [
    "AGGREGATIONS",
    "STEP_SPLITS",
    "Candidate",
    "Problem",
    "ScoreArguments",
    "ScoredResponse",
    "aggregate",
    "encode_responses",
    "html_page",
    "implicit_rewards",
    "load_problems",
    "load_prm",
    "rerank",
    "score_responses",
    "split_steps",
]

# Named step splitters; anything else given as --step_split is used as a regular expression matching the
# separators. A separator belongs to the step it ends.
STEP_SPLITS = {
    # Eurus-2 action-centric CoT: a step starts at each "[ACTION]" marker that opens a line. A marker inside a
    # line ("Next action: [ADVANCE]", which PRIME's system prompt asks for) only announces the next step.
    "action": r"(?m)^(?=\[[A-Z][A-Z ]*\])",
    "blank": r"\n[ \t]*\n",  # paragraphs
    "newline": r"\n",
    "none": None,  # the whole response is one step
}
AGGREGATIONS = ("sum", "min", "mean", "last")


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ScoreArguments:
    """Settings of ``prime-trl score`` (every field is a ``--flag``; ``--config file.yaml`` works too)."""

    prm: str = field(
        metadata={
            "help": "The PRM adapter: its directory, or a `prime-trl train` output dir / checkpoint-N (its prm/ "
            "folder is used)."
        }
    )
    data: str = field(
        metadata={
            "help": "JSONL of responses to score. Each line: a prompt (string or chat messages) and either "
            "'response' (one) or 'responses' (N candidates); optional labels ('correct'/'score', or "
            "'labels'/'scores' lists), or 'answer'/'task'/'tests' columns to grade with prime_trl's verifiers. "
            "The predictions.jsonl of `prime-trl eval --num_samples N` works as is (rows grouped by id)."
        }
    )
    model: str | None = field(
        default=None,
        metadata={"help": "Base model (hub id or path). Default: base_model_name_or_path of the adapter config."},
    )
    beta: float = field(
        default=0.05,
        metadata={
            "help": "prime_beta the PRM was trained with. It scales every reward, so best-of-N rankings do not depend "
            "on it; the PRM-weighted vote does (its weights sigmoid(r(y)) are the PRM's P(correct) only at the "
            "training beta)."
        },
    )
    step_split: str = field(
        default="auto",
        metadata={
            "help": "How to cut responses into steps: auto (action markers, else blank lines, else newlines), "
            "action ('[ASSESS]'-style markers), blank, newline, none, or a regular expression for the separator "
            "(e.g. ';' for the demo task)."
        },
    )
    aggregate: str = field(
        default="sum",
        metadata={
            "help": "Score of a response for reranking: sum (the implicit outcome reward r(y), what the CE loss "
            "trains), min (lowest step reward), mean (per step), last (last step)."
        },
    )
    append_eos: bool = field(
        default=True,
        metadata={
            "help": "For rows without a 'finished' field: score an EOS token after the response, as PRIME does "
            "for completions that ended (its reward joins the last step). Rows with 'finished' (predictions.jsonl "
            "of `prime-trl eval`) get an EOS exactly when finished is true: a cut-off response has none."
        },
    )
    output_dir: str = field(
        default="score_output",
        metadata={"help": "Writes rewards.jsonl (per token / step / response), rerank.json and rewards.html here."},
    )
    html_max_responses: int = field(default=50, metadata={"help": "Responses shown in rewards.html."})
    print_responses: int = field(default=2, metadata={"help": "Responses whose step rewards are printed."})
    limit: int | None = field(default=None, metadata={"help": "Score only the first N problems."})
    batch_size: int = field(default=8, metadata={"help": "Responses per forward pass."})
    adapter_name: str = field(default="prm", metadata={"help": "Name the PRM adapter is loaded under."})
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, float32, bfloat16, float16."})
    device: str | None = field(default=None, metadata={"help": "Default: cuda if available, else cpu."})
    load_in_4bit: bool = field(
        default=False,
        metadata={
            "help": "Load the base in 4 bits (bitsandbytes), as `prime-trl train --load_in_4bit` (QLoRA) trained "
            "the PRM: the reference and PRM log-probs then come from the same rounded base as in training. Give "
            "the same --dtype, --bnb_4bit_quant_type and --use_bnb_nested_quant as the training run."
        },
    )
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "4-bit type (nf4 or fp4), as in training."})
    use_bnb_nested_quant: bool = field(default=False, metadata={"help": "Nested 4-bit quantization, as in training."})

    def __post_init__(self) -> None:
        if self.aggregate not in AGGREGATIONS:
            raise ValueError(f"aggregate={self.aggregate!r} is not supported; choose one of {list(AGGREGATIONS)}.")
        if self.beta <= 0:
            raise ValueError(f"beta={self.beta} must be > 0 (PRIME uses 0.05).")
        split_steps("check", self.step_split)  # fails early on a bad regular expression


# --------------------------------------------------------------------------------------------------------------
# Steps
# --------------------------------------------------------------------------------------------------------------


def split_steps(text: str, mode: str = "auto") -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the steps of ``text``; they cover the text without gaps.

    ``mode``: ``auto`` (the first of action / blank / newline that cuts the text into several steps), a name in
    `STEP_SPLITS`, or a regular expression matching the separators (each separator stays with the step before).
    """
    if mode == "auto":
        for name in ("action", "blank", "newline"):
            spans = split_steps(text, name)
            if len(spans) > 1:
                return spans
        return [(0, len(text))]
    pattern = STEP_SPLITS[mode] if mode in STEP_SPLITS else mode
    if pattern is None or not text:
        return [(0, len(text))]
    try:
        regex = re.compile(pattern)
    except re.error as error:
        raise ValueError(f"step_split={mode!r} is neither {list(STEP_SPLITS)} nor a valid regex: {error}") from None
    cuts = sorted({m.end() for m in regex.finditer(text) if 0 < m.end() < len(text)})
    bounds = [0, *cuts, len(text)]
    return [(a, b) for a, b in zip(bounds, bounds[1:]) if b > a]


# --------------------------------------------------------------------------------------------------------------
# Loading the PRM
# --------------------------------------------------------------------------------------------------------------


def resolve_prm_dir(path: str | Path) -> Path:
    """The PRM adapter directory for a PRM folder, a ``prime-trl train`` output dir or a checkpoint."""
    path = Path(path)
    for candidate in (path / "prm", path):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    raise FileNotFoundError(
        f"No PRM adapter at {path}: expected adapter_config.json in {path}/prm (a prime-trl output or checkpoint "
        "directory) or in the directory itself."
    )


def load_prm(
    prm: str | Path,
    model: str | None = None,
    adapter_name: str = "prm",
    dtype: str = "auto",
    device: str | None = None,
    quantization_config=None,
):
    """Load the base model with the PRM adapter (inactive until `score_responses` switches it on).

    The base gets TRL's fused LM head at temperature 1, as in training, so scoring never builds the
    ``[B, T, vocab]`` logits: pass ``fused=True`` to `score_responses` / `implicit_rewards`.

    A PRM trained on a 4-bit (QLoRA) base must be scored on the same 4-bit base: pass the training run's
    ``quantization_config`` (`quantization_config_for` builds it from the ``prime-trl train`` flags). Without it
    the base is loaded unquantized and the rewards differ from training's by the 4-bit rounding of the base.

    Returns:
        ``(peft_model, tokenizer)``; the tokenizer comes from the output dir next to ``prm/`` when it has one,
        else from the base model.
    """
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl.trainer.utils import add_fused_lm_head

    from prime_trl.apps.evaluation import _resolve_dtype

    prm_dir = resolve_prm_dir(prm)
    if model is None:
        model = json.loads((prm_dir / "adapter_config.json").read_text()).get("base_model_name_or_path")
        if not model:
            raise ValueError(f"{prm_dir}/adapter_config.json names no base model; pass --model.")
        logger.info("Base model from the adapter config: %s", model)
    from prime_trl.models import resolve_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = resolve_model(model)  # smollm2-135m, prime-demo and .gguf files become a model directory
    if quantization_config is None:
        base = AutoModelForCausalLM.from_pretrained(model, dtype=_resolve_dtype(dtype)).to(device)
    else:
        from prime_trl.trainer.quantization import protect_4bit_base

        base = AutoModelForCausalLM.from_pretrained(
            model, dtype=_resolve_dtype(dtype), quantization_config=quantization_config, device_map={"": device}
        )
        # Training keeps the 4-bit weights in their trainable layout (bitsandbytes' CPU inference repacking
        # rounds differently); score them in the same layout.
        protect_4bit_base(base)
    add_fused_lm_head(base, temperature=1.0)  # before PEFT wraps the model, as TRL requires
    peft_model = PeftModel.from_pretrained(base, str(prm_dir), adapter_name=adapter_name)
    tokenizer_source = next(
        (str(d) for d in (prm_dir.parent, prm_dir) if (d / "tokenizer_config.json").is_file()), model
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return peft_model.eval(), tokenizer


def quantization_config_for(args: ScoreArguments):
    """The `BitsAndBytesConfig` ``prime-trl train`` builds from the same flags (TRL's `get_quantization_config`),
    or None without ``--load_in_4bit``."""
    if not args.load_in_4bit:
        return None
    from trl import ModelConfig, get_quantization_config

    dtype = None if args.dtype == "auto" else args.dtype
    return get_quantization_config(
        ModelConfig(
            load_in_4bit=True,
            dtype=dtype,
            bnb_4bit_quant_type=args.bnb_4bit_quant_type,
            use_bnb_nested_quant=args.use_bnb_nested_quant,
        )
    )


# --------------------------------------------------------------------------------------------------------------
# Implicit rewards
# --------------------------------------------------------------------------------------------------------------


@dataclass
class ScoredResponse:
    """Implicit rewards of one response.

    ``tokens`` are the response's text pieces, one per token (they concatenate to ``text``; an appended EOS is
    the piece ``""``); ``step_spans`` are token index ranges, one per step, and ``steps[i]`` is the text of
    exactly the tokens ``step_spans[i]``, whose rewards sum to ``step_rewards[i]`` (steps are cut at token
    boundaries).
    """

    text: str
    tokens: list[str]
    token_rewards: list[float]
    steps: list[str]
    step_spans: list[tuple[int, int]]
    step_rewards: list[float]
    reward: float  # r(y) = sum of token rewards
    prompt: str = ""
    label: float | None = None
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _token_pieces(tokenizer, text: str, ids: list[int]) -> list[tuple[int, int]]:
    """Character span of each token of ``text`` (fast tokenizers' offsets, else by decoding prefixes)."""
    if getattr(tokenizer, "is_fast", False):
        offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        if len(offsets) == len(ids):
            # Byte-level BPE can give a character to two tokens; make the spans contiguous and non-overlapping.
            spans, position = [], 0
            for _, end in offsets:
                end = max(end, position)
                spans.append((position, end))
                position = end
            return spans
    spans, previous = [], 0
    for i in range(len(ids)):
        end = len(tokenizer.decode(ids[: i + 1], skip_special_tokens=True))
        spans.append((previous, max(end, previous)))
        previous = max(end, previous)
    return spans


def _per_row(flag: bool | Sequence[bool], count: int) -> list[bool]:
    flags = [bool(flag)] * count if isinstance(flag, bool) else [bool(f) for f in flag]
    if len(flags) != count:
        raise ValueError(f"append_eos has {len(flags)} values for {count} responses")
    return flags


def encode_responses(
    tokenizer,
    prompts: Sequence[str | list[dict]],
    responses: Sequence[str],
    append_eos: bool | Sequence[bool],
) -> CompletionBatch:
    """Prompts left-padded, responses right-padded (+ EOS), as TRL's generation batches are laid out.

    ``prompts`` are as in a TRL dataset's ``prompt`` column (chat messages or a plain string) and are tokenised
    exactly as training tokenises them (`prime_trl.algo.rollout.prompt_token_ids`); ``append_eos`` is one
    flag for every response or one per response (an EOS ends a finished response; a cut-off one has none).
    """
    pad = tokenizer.pad_token_id
    prompt_ids = [prompt_token_ids(tokenizer, p) for p in prompts]
    response_ids = [tokenizer(r, add_special_tokens=False)["input_ids"] for r in responses]
    response_ids = [
        ids + [tokenizer.eos_token_id] if eos else ids
        for ids, eos in zip(response_ids, _per_row(append_eos, len(responses)))
    ]
    if not all(prompt_ids):
        # The first response token is scored from the position before it; without a prompt there is none.
        raise ValueError("every response needs a non-empty prompt to be scored")
    prompt_tensor, prompt_mask = left_padded_prompts(prompt_ids, pad)
    response_width = max(1, max(len(ids) for ids in response_ids))
    batch = CompletionBatch(
        prompt_ids=prompt_tensor,
        prompt_mask=prompt_mask,
        completion_ids=torch.full((len(prompts), response_width), pad, dtype=torch.long),
        completion_mask=torch.zeros(len(prompts), response_width, dtype=torch.long),
    )
    for i, r in enumerate(response_ids):
        if r:
            batch.completion_ids[i, : len(r)] = torch.tensor(r)
            batch.completion_mask[i, : len(r)] = 1
    return batch


@torch.no_grad()
def implicit_rewards(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    responses: Sequence[str],
    *,
    beta: float = 0.05,
    adapter_name: str = "prm",
    append_eos: bool | Sequence[bool] = True,
    batch_size: int = 8,
    progress: bool = False,
    fused: bool = False,
) -> list[tuple[list[int], torch.Tensor]]:
    """For each response, its scored token ids and their implicit rewards ``beta * (log pi_prm - log pi_ref)``
    (``[T_i]`` on the CPU, the appended EOS last): the PRM adapter against the same model with every adapter
    disabled. Both passes see the same rows, so an untrained (zero) PRM gives exactly zero rewards.

    ``prompts`` as in `encode_responses`. ``fused``: the model's base carries TRL's fused LM head at temperature
    1 (`load_prm` adds it), so log-probs come without the ``[B, T, vocab]`` logits, as in training."""
    from trl.trainer.utils import use_adapter

    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    if adapter_name not in model.peft_config:
        raise ValueError(f"The model has no adapter {adapter_name!r}; adapters: {list(model.peft_config)}.")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    scored: list[tuple[list[int], torch.Tensor]] = []
    append_eos = _per_row(append_eos, len(prompts))
    starts = range(0, len(prompts), batch_size)
    try:
        for start in tqdm(starts, desc="implicit rewards", unit="batch", disable=not progress or len(starts) < 2):
            batch = encode_responses(
                tokenizer,
                prompts[start : start + batch_size],
                responses[start : start + batch_size],
                append_eos[start : start + batch_size],
            )
            batch = CompletionBatch(
                *(
                    t.to(device)
                    for t in (batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
                )
            )
            with use_adapter(model, None):  # reference: the base with every adapter off
                ref_logps = completion_log_probs(model, batch, fused=fused)
            with use_adapter(model, adapter_name):
                prm_logps = completion_log_probs(model, batch, fused=fused)
            rewards = implicit_token_rewards(prm_logps, ref_logps, batch.completion_mask.float(), beta).cpu()
            for i, length in enumerate(batch.completion_mask.sum(-1).tolist()):
                scored.append((batch.completion_ids[i, :length].tolist(), rewards[i, :length]))
    finally:
        model.train(was_training)
    return scored


def score_responses(
    model,
    tokenizer,
    prompts: Sequence[str | list[dict]],
    responses: Sequence[str],
    *,
    beta: float = 0.05,
    adapter_name: str = "prm",
    step_split: str = "auto",
    append_eos: bool | Sequence[bool] = True,
    batch_size: int = 8,
    progress: bool = True,
    fused: bool = False,
) -> list[ScoredResponse]:
    """Per-token, per-step and sequence implicit rewards of ``responses[i]`` to ``prompts[i]``.

    Args:
        model: a `PeftModel` with the PRM adapter ``adapter_name``; the reference is the same model with every
            adapter disabled.
        tokenizer: its tokenizer.
        prompts: the prompts as in the dataset (chat messages or plain strings; tokenised as in training).
        responses: the responses' text.
        beta: ``prime_beta`` of training.
        step_split: see `split_steps`; steps are then aligned to token boundaries (see `ScoredResponse`).
        append_eos: score an EOS token after each response (finished training completions end with one), or one
            flag per response.
        fused: see `implicit_rewards`.
    """
    append_eos = _per_row(append_eos, len(prompts))
    token_rewards = implicit_rewards(
        model,
        tokenizer,
        prompts,
        responses,
        beta=beta,
        adapter_name=adapter_name,
        append_eos=append_eos,
        batch_size=batch_size,
        progress=progress,
        fused=fused,
    )
    results: list[ScoredResponse] = []
    for prompt, text, eos, (ids, rewards) in zip(prompts, responses, append_eos, token_rewards, strict=True):
        text_ids = ids[:-1] if eos else ids
        shown = render_prompt(tokenizer, prompt)
        results.append(_scored(tokenizer, shown, text, text_ids, rewards.tolist(), step_split))
    return results


def _scored(tokenizer, prompt: str, text: str, ids: list[int], rewards: list[float], step_split: str):
    """Token pieces, steps and their rewards of one response.

    Rewards exist per token, so steps are cut at token boundaries: a token belongs to the step holding its first
    character (an appended EOS to the last step), and a step's text is the text of exactly the tokens whose
    rewards make its step reward. A cut inside a token moves to that token's end; a step left without tokens is
    dropped.
    """
    char_spans = _token_pieces(tokenizer, text, ids)
    tokens = [text[a:b] for a, b in char_spans]
    if len(rewards) > len(ids):  # the appended EOS: an empty piece, part of the last step
        tokens.append("")
    step_starts = [start for start, _ in split_steps(text, step_split)]
    owner = [
        bisect.bisect_right(step_starts, char_spans[t][0]) - 1 if t < len(char_spans) else len(step_starts) - 1
        for t in range(len(tokens))
    ]
    # Tokens are in text order, so each step's tokens are one contiguous range.
    step_spans: list[tuple[int, int]] = []
    for t, step in enumerate(owner):
        if t and step == owner[t - 1]:
            step_spans[-1] = (step_spans[-1][0], t + 1)
        else:
            step_spans.append((t, t + 1))
    return ScoredResponse(
        text=text,
        tokens=tokens,
        token_rewards=rewards,
        steps=["".join(tokens[a:b]) for a, b in step_spans],
        step_spans=step_spans,
        step_rewards=[float(sum(rewards[a:b])) for a, b in step_spans],
        reward=float(sum(rewards)),
        prompt=prompt,
    )


def aggregate(scored: ScoredResponse, how: str = "sum") -> float:
    """One number per response for reranking: ``sum`` (r(y)), ``min`` / ``mean`` / ``last`` over its steps."""
    steps = scored.step_rewards or [scored.reward]
    if how == "sum":
        return scored.reward
    if how == "min":
        return min(steps)
    if how == "mean":
        return sum(steps) / len(steps)
    if how == "last":
        return steps[-1]
    raise ValueError(f"aggregate={how!r} is not one of {list(AGGREGATIONS)}")


# --------------------------------------------------------------------------------------------------------------
# Problems with candidates, and reranking
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Candidate:
    response: str
    label: float | None = None  # 1.0 correct, 0.0 wrong (fractions allowed), None unknown
    answer: str | None = None  # extracted final answer (math), for the majority vote
    finished: bool | None = None  # ended with EOS (None: unknown, --append_eos decides)


@dataclass
class Problem:
    """One prompt with its candidate responses (and, when known, what grading needs)."""

    id: str
    prompt: str | list[dict]
    candidates: list[Candidate]
    row: dict = field(default_factory=dict)  # the grading columns (task, answer, tests, ...)


_RESPONSE_KEYS = ("response", "completion")
_LABEL_KEYS = ("correct", "label", "score")


class ResponseFileError(ValueError):
    """A malformed responses file; the message names the file, the line and the fix."""


def _read_rows(path: str | Path):
    """``(line_number, row)`` of each non-empty line of a JSONL file, with errors that name the line."""
    try:
        handle = open(path, encoding="utf-8")
    except FileNotFoundError:
        raise ResponseFileError(
            f"{path}: no such file. Pass a .jsonl of responses (see --help for its fields)."
        ) from None
    except OSError as error:
        raise ResponseFileError(f"{path}: cannot be read ({error.strerror}).") from None
    with handle:
        for line_number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ResponseFileError(
                    f"{path}:{line_number}: not valid JSON ({error.msg} at column {error.colno}); each line must be "
                    "one JSON object."
                ) from None
            if not isinstance(row, dict):
                raise ResponseFileError(
                    f"{path}:{line_number}: a JSON {type(row).__name__}, not an object; each line must be one "
                    'object such as {"prompt": ..., "responses": [...]}.'
                )
            yield line_number, row


def _list_field(row: dict, keys: Sequence[str], count: int, where: str) -> list | None:
    """The first of ``keys`` present and not null, checked to be a list of ``count`` values; None if absent."""
    key = next((k for k in keys if row.get(k) is not None), None)
    if key is None:
        return None
    values = row[key]
    if not isinstance(values, list):
        raise ResponseFileError(f"{where}: '{key}' must be a list with one value per response, not {values!r}.")
    if len(values) != count:
        raise ResponseFileError(f"{where}: {len(values)} '{key}' for {count} responses; give one per response.")
    return values


def _label(value, key: str, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or isinstance(value, (int, float)):
        return float(value)
    raise ResponseFileError(f"{where}: '{key}' must be a number or true/false (or null: unknown), not {value!r}.")


def load_problems(path: str | Path, limit: int | None = None, reward_fn: Callable | None = None) -> list[Problem]:
    """Read a JSONL of responses (see `ScoreArguments.data`) into problems with labelled candidates.

    Rows with one response are grouped by ``id`` (else by prompt) in file order; greedy rows of a
    ``prime-trl eval`` predictions file are skipped (the samples are the candidates). Missing labels are filled
    in with the verifier when the row has the columns it needs (``answer`` for math, ``tests`` for code). A
    ``finished`` field (one flag, or a list with ``responses``) says whether each response ended with EOS.

    Raises:
        ResponseFileError: a malformed file; the message names the file, the line and the fix.
    """
    problems: dict[str, Problem] = {}
    greedy_rows = 0
    for line_number, row in _read_rows(path):
        where = f"{path}:{line_number}"
        if row.get("mode") == "greedy":
            # `prime-trl eval` output: the sampled completions are the N candidates; the greedy one is not a draw
            # from the same distribution, so it is left out.
            greedy_rows += 1
            continue
        if "prompt" not in row:
            raise ResponseFileError(f"{where}: no 'prompt' field (fields: {sorted(row)}); add the prompt.")
        if not isinstance(row["prompt"], (str, list)) or not row["prompt"]:
            raise ResponseFileError(f"{where}: 'prompt' must be a non-empty string or list of chat messages.")
        if isinstance(row["prompt"], list) and not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in row["prompt"]
        ):
            raise ResponseFileError(
                f"{where}: 'prompt' messages must be objects with string 'role' and 'content' fields."
            )
        if "responses" in row:
            responses = row["responses"]
            if not isinstance(responses, list) or not all(isinstance(r, str) for r in responses):
                raise ResponseFileError(
                    f"{where}: 'responses' must be a list of strings (one per candidate), not {responses!r}; for "
                    "one response use 'response'."
                )
            labels = _list_field(row, ("labels", "scores"), len(responses), where) or [None] * len(responses)
            labels = [_label(value, "labels", where) for value in labels]
            answers = [None] * len(responses)
            finished = row.get("finished")
            if finished is None or isinstance(finished, bool):
                finished = [finished] * len(responses)
            else:
                finished = _list_field(row, ("finished",), len(responses), where)
        else:
            key = next((k for k in _RESPONSE_KEYS if k in row), None)
            if key is None:
                raise ResponseFileError(
                    f"{where}: expected 'response', 'completion' or 'responses' (fields: {sorted(row)})."
                )
            if not isinstance(row[key], str):
                raise ResponseFileError(f"{where}: '{key}' must be a string, not {row[key]!r}.")
            responses = [row[key]]
            label_key = next((k for k in _LABEL_KEYS if k in row), None)
            labels = [_label(row[label_key], label_key, where) if label_key else None]
            finished = [row.get("finished")]
            answers = [row.get("extracted_answer")]
        if any(f is not None and not isinstance(f, bool) for f in finished):
            raise ResponseFileError(f"{where}: 'finished' must be true/false (did the response end with EOS?).")
        problem_id = str(row.get("id") if row.get("id") is not None else json.dumps(row["prompt"]))
        if problem_id not in problems:
            if limit is not None and len(problems) >= limit:
                continue
            grading = {k: row[k] for k in ("task", "answer", "tests", "code_prefix", "entry_point") if k in row}
            problems[problem_id] = Problem(problem_id, row["prompt"], [], grading)
        problems[problem_id].candidates.extend(
            Candidate(r, lab, answer=None if a is None else str(a), finished=f)
            for r, lab, a, f in zip(responses, labels, answers, finished)
        )
    result = list(problems.values())
    if not result:
        why = (
            f"its {greedy_rows} rows are all greedy completions (mode 'greedy'), which are not reranked; run "
            "`prime-trl eval` with --num_samples N to get candidates"
            if greedy_rows
            else "it has no non-empty line"
        )
        raise ResponseFileError(f"{path} holds no responses to score: {why}.")
    _fill_labels_and_answers(result, reward_fn)
    return result


def _has_value(value) -> bool:
    """A grading column that is present: not None and not blank (``0`` is an answer)."""
    return value is not None and str(value).strip() != ""


def _fill_labels_and_answers(problems: list[Problem], reward_fn: Callable | None) -> None:
    from prime_trl.rewards import extract_boxed

    to_grade = []
    for problem in problems:
        task = problem.row.get("task") or ("math" if "answer" in problem.row else None)
        for candidate in problem.candidates:
            # A `prime-trl eval` row carries the answer as its grader read it (`extracted_answer`: with
            # --reward final_answer, the last number when there is no box); other rows vote by their last box.
            if task == "math" and candidate.answer is None:
                candidate.answer = extract_boxed(candidate.response)
            gradable = (task == "math" and _has_value(problem.row.get("answer"))) or (
                task == "code" and _has_value(problem.row.get("tests"))
            )
            if candidate.label is None and gradable:
                to_grade.append((problem, candidate, task))
    if to_grade:
        from prime_trl.apps.evaluation import grade_completions

        rows = [
            {"task": task, **{k: _column_text(p.row.get(k)) for k in ("answer", "tests", "code_prefix", "entry_point")}}
            for p, _, task in to_grade
        ]
        scores = grade_completions(rows, [c.response for _, c, _ in to_grade], reward_fn)
        for (_, candidate, _), score in zip(to_grade, scores):
            candidate.label = score
        logger.info("Graded %d unlabelled responses with the verifier.", len(to_grade))


def _column_text(value) -> str:
    """A grading column as the verifiers take it: text (``0`` -> ``"0"``; test dicts as JSON)."""
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value) if isinstance(value, (dict, list)) else str(value)


def _expected_choice_accuracy(labels: Sequence[float], scores: Sequence[float]) -> float:
    """Correctness of the highest-scoring candidate; ties broken uniformly at random (so: their mean label)."""
    best = max(scores)
    tied = [label for label, score in zip(labels, scores) if score >= best - 1e-12 * max(1.0, abs(best))]
    return sum(tied) / len(tied)


def rerank(
    problems: Sequence[Problem],
    scored: Sequence[Sequence[ScoredResponse]],
    how: str = "sum",
    equivalent: Callable[[list[str], list[str]], list[bool]] | None = None,
) -> dict[str, Any]:
    """Best-of-N with the implicit PRM against random choice and majority vote.

    Only problems with at least two candidates, all labelled, count. Labels >= 1 count as correct.

    Returns:
        ``num_problems``, ``candidates_per_problem`` (mean), accuracies ``prm_rerank`` (the candidate with the
        best aggregated implicit reward), ``random`` (the exact expectation of a uniform pick: the mean fraction
        of correct candidates), ``majority_vote`` and ``prm_weighted_vote`` (math only: the same vote, equivalent
        answers merged alike, each answer weighted by ``sigmoid(r(y))``, the PRM's P(correct); an untrained PRM
        gives every answer 0.5 and so exactly the majority vote) when answers are available, ``oracle`` (some candidate is correct), and ``choices``:
        per problem, the chosen index and every candidate's score.
    """
    from prime_trl.apps.evaluation import majority_vote

    stats: dict[str, list[float]] = {"prm_rerank": [], "random": [], "oracle": []}
    votes: dict[str, list[float]] = {"majority_vote": [], "prm_weighted_vote": []}
    choices = []
    for problem, responses in zip(problems, scored):
        labels = [c.label for c in problem.candidates]
        scores = [aggregate(r, how) for r in responses]
        choices.append({"id": problem.id, "chosen": max(range(len(scores)), key=scores.__getitem__), "scores": scores})
        if len(labels) < 2 or any(label is None for label in labels):
            continue
        correct = [float(label >= 1.0 - 1e-9) for label in labels]
        stats["prm_rerank"].append(_expected_choice_accuracy(correct, scores))
        stats["random"].append(sum(correct) / len(correct))
        stats["oracle"].append(max(correct))
        answers = [c.answer for c in problem.candidates]
        if any(a is not None for a in answers):
            votes["majority_vote"].append(majority_vote(answers, [bool(c) for c in correct], equivalent))
            weights = [_sigmoid(r.reward) for r in responses]
            votes["prm_weighted_vote"].append(
                majority_vote(answers, [bool(c) for c in correct], equivalent, weights=weights)
            )
    counted = len(stats["random"])
    summary: dict[str, Any] = {"num_problems": counted, "aggregate": how}
    if counted:
        summary["candidates_per_problem"] = (
            sum(
                len(p.candidates)
                for p in problems
                if len(p.candidates) > 1 and all(c.label is not None for c in p.candidates)
            )
            / counted
        )
        summary["accuracy"] = {name: sum(values) / counted for name, values in stats.items()}
        for name, values in votes.items():
            if values:
                summary["accuracy"][name] = sum(values) / len(values)
        summary["num_problems_with_answers"] = len(votes["majority_vote"])
    summary["choices"] = choices
    return summary


def _sigmoid(value: float) -> float:
    """``1 / (1 + exp(-value))`` without overflow for large ``|value|``."""
    if value >= 0:
        return 1.0 / (1.0 + math.exp(-value))
    exp = math.exp(value)
    return exp / (1.0 + exp)


# --------------------------------------------------------------------------------------------------------------
# HTML heat map
# --------------------------------------------------------------------------------------------------------------

_CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; max-width: 70em; }
.response { border: 1px solid #ccc; border-radius: 6px; padding: 0.8em; margin: 1em 0; }
.text { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.7; }
.tok { border-radius: 2px; }
.step { border-right: 2px solid #555; margin-right: 1px; }
.eos { font-size: 0.75em; color: #333; border: 1px dotted #555; padding: 0 2px; }
.meta { color: #444; font-size: 0.9em; margin-bottom: 0.4em; }
.correct { color: #1a7f37; font-weight: bold; } .wrong { color: #cf222e; font-weight: bold; }
.legend span { padding: 0 0.6em; font-family: ui-monospace, monospace; }
details pre { white-space: pre-wrap; background: #f6f8fa; padding: 0.5em; }
"""


def _colour(value: float, scale: float) -> str:
    """Green for positive, red for negative rewards; opacity grows with |value| / scale."""
    alpha = min(1.0, abs(value) / scale) if scale > 0 else 0.0
    rgb = "26,160,60" if value >= 0 else "220,40,40"
    return f"rgba({rgb},{alpha:.3f})"


def html_page(
    responses: Sequence[ScoredResponse], title: str = "Implicit process rewards", scale: float | None = None
) -> str:
    """A self-contained HTML page colouring every token by its implicit reward.

    Colours share one scale over the page (default: the 99th percentile of |token reward|, so one outlier does
    not wash out the rest); a dark bar ends each step, and hovering a token or step shows its reward.
    """
    values = sorted(abs(v) for r in responses for v in r.token_rewards)
    if scale is None:
        scale = values[min(len(values) - 1, int(0.99 * len(values)))] if values else 1.0
    scale = scale or 1.0
    parts = [
        "<!DOCTYPE html><html><head><meta charset='utf-8'>",
        f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        "<p>r<sub>t</sub> = &beta; (log &pi;<sub>PRM</sub> &minus; log &pi;<sub>ref</sub>) per token; "
        "hover for values. Bars end steps.</p>",
        "<p class='legend'>"
        + "".join(
            f"<span style='background:{_colour(v, scale)}'>{v:+.3g}</span>"
            for v in (-scale, -scale / 2, 0, scale / 2, scale)
        )
        + "</p>",
    ]
    for index, response in enumerate(responses):
        if response.label is None:
            verdict = ""
        elif response.label >= 1.0 - 1e-9:
            verdict = "<span class='correct'>correct</span> &middot; "
        else:
            verdict = f"<span class='wrong'>wrong</span> (score {response.label:g}) &middot; "
        step_list = ", ".join(f"{v:+.3f}" for v in response.step_rewards)
        parts.append("<div class='response'>")
        parts.append(
            f"<div class='meta'>#{index} &middot; {verdict}r(y) = {response.reward:+.4f} &middot; "
            f"{len(response.steps)} steps: [{step_list}]</div>"
        )
        if response.prompt:
            parts.append(f"<details><summary>prompt</summary><pre>{html.escape(response.prompt)}</pre></details>")
        parts.append("<div class='text'>")
        for step_index, (start, end) in enumerate(response.step_spans):
            step_reward = response.step_rewards[step_index]
            parts.append(f"<span class='step' title='step {step_index}: {step_reward:+.4f}'>")
            for t in range(start, end):
                value = response.token_rewards[t]
                piece = response.tokens[t]
                label = html.escape(piece) if piece else "<span class='eos'>EOS</span>"
                parts.append(
                    f"<span class='tok' style='background:{_colour(value, scale)}' title='{value:+.5f}'>{label}</span>"
                )
            parts.append("</span>")
        parts.append("</div></div>")
    parts.append("</body></html>")
    return "".join(parts)


def format_steps(scored: ScoredResponse, max_chars: int = 60) -> str:
    """A plain-text table of one response's steps and their rewards (what ``prime-trl score`` prints)."""
    lines = [f"r(y) = {scored.reward:+.4f}" + ("" if scored.label is None else f"   label = {scored.label:g}")]
    lines.append("| step | reward | text |")
    lines.append("|---:|---:|---|")
    for index, (text, reward) in enumerate(zip(scored.steps, scored.step_rewards)):
        shown = text.replace("\n", "\\n")
        shown = shown if len(shown) <= max_chars else shown[: max_chars - 3] + "..."
        lines.append(f"| {index} | {reward:+.4f} | {shown.replace('|', '/')} |")
    return "\n".join(lines)


def format_rerank(summary: dict[str, Any]) -> str:
    """The reranking accuracies as a Markdown table."""
    if not summary.get("num_problems"):
        return "rerank: no problem has >= 2 labelled candidates; nothing to compare."
    lines = [
        f"best-of-N over {summary['num_problems']} problems, {summary['candidates_per_problem']:.1f} candidates each "
        f"(aggregate: {summary['aggregate']})",
        "",
        "| selection | accuracy |",
        "|---|---:|",
    ]
    names = {
        "prm_rerank": "implicit PRM (best-of-N)",
        "prm_weighted_vote": "PRM-weighted majority vote",
        "majority_vote": "majority vote",
        "random": "random choice (expected)",
        "oracle": "oracle (any correct)",
    }
    for key, label in names.items():
        if key in summary["accuracy"]:
            lines.append(f"| {label} | {summary['accuracy'][key]:.3f} |")
    return "\n".join(lines)
