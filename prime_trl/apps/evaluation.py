"""Benchmark evaluation of a policy: generate, grade with PRIME's verifiers, report pass@1 / pass@k / maj@k.

Used by ``prime-trl eval`` and reusable from Python::

    from prime_trl.apps.evaluation import EvalArguments, evaluate

    summary = evaluate(EvalArguments(model="Qwen/Qwen2.5-0.5B-Instruct", adapter="qwen-prime", data="math500",
                                     num_samples=8))

Metrics (all averaged over problems):

* ``pass@1 (greedy)``: one greedy completion per problem, the fraction graded correct.
* ``pass@k``: from ``n = num_samples`` sampled completions per problem with ``c`` correct, the unbiased estimator
  ``1 - C(n - c, k) / C(n, k)`` of Chen et al. (2021, "Evaluating Large Language Models Trained on Code").
* ``maj@k`` (math rows only): majority vote over the extracted ``\\boxed{}`` answers of the first ``k`` samples;
  answers are grouped when they are equal after normalisation or equivalent by the math grader. A completion
  without an answer does not vote; ties between answers count as the expected accuracy of a random tie-break.
  Code has no canonical "answer" to vote on, so code rows report pass@k only.

A completion is *correct* when its verifier score is 1 (code with stdin/stdout cases: every case passed).

Generation uses ``transformers`` ``generate`` by default and vLLM when it is installed and a GPU is present
(``backend="auto"``). The vLLM path is not run in this project's CI (CPU only). Every decoding setting is set
explicitly (`decoding_settings`: nothing comes from the model's ``generation_config.json``), prompts are
tokenised as TRL tokenises them in training (`prompt_token_ids`), and each problem's samples come from their own
random streams (`sample_seed`), so results do not depend on ``batch_size``.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm

# Tokenised as training tokenises (shared with the Lightning module); imported from here by `score` too.
from prime_trl.algo.rollout import (
    cut_at_first_eos,
    left_padded_prompts,
    pad_and_eos_token_ids,
    prompt_token_ids,
    render_prompt,
)
from prime_trl.rewards import extract_boxed, extract_final_answer
from prime_trl.rewards.registry import check_reward_name, load_reward_func

logger = logging.getLogger(__name__)

__all__ = [
    "EvalArguments",
    "Generation",
    "Generator",
    "HFGenerator",
    "VLLMGenerator",
    "answer_extractor",
    "evaluate",
    "format_summary",
    "grade_completions",
    "load_eval_dataset",
    "load_policy",
    "majority_vote",
    "pass_at_k",
    "prompt_token_ids",
    "render_prompt",
    "sample_seed",
]

# The columns the verifiers read (see prime_trl.data): passed to `task_reward` as lists, one value per completion.
_GRADING_COLUMNS = ("task", "answer", "tests", "code_prefix", "entry_point")
_BACKENDS = ("auto", "hf", "vllm")


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------


@dataclass
class EvalArguments:
    """Settings of ``prime-trl eval`` (every field is a ``--flag``; ``--config file.yaml`` works too)."""

    model: str = field(
        metadata={
            "help": "Model to evaluate: hub id, local path, a .gguf file or smollm2-135m (the base model when "
            "--adapter is given)."
        }
    )
    data: str = field(
        metadata={
            "help": "Benchmark: math500, gsm8k, aime24, amc23, humaneval, math, eurus, prime-demo (the embedded "
            "arithmetic task), or a .jsonl/.json/.parquet file with prime_trl.data columns or problem/answer."
        }
    )
    adapter: str | None = field(
        default=None,
        metadata={
            "help": "LoRA adapter of the policy, e.g. the output_dir of `prime-trl train` (the policy adapter is "
            "saved at its root; the PRM adapter in prm/ is not used here)."
        },
    )
    split: str | None = field(default=None, metadata={"help": "Split for gsm8k (test/train) and eurus."})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Directory (or file) to read the named data set from. Default: $PRIME_TRL_DATA_DIR or "
            "../shared/data, else the Hugging Face Hub."
        },
    )
    limit: int | None = field(default=None, metadata={"help": "Evaluate only the first N problems."})
    system_prompt: bool = field(
        default=True, metadata={"help": "Prepend PRIME's (Eurus-2) system prompt to chat prompts."}
    )
    greedy: bool = field(default=True, metadata={"help": "Run one greedy completion per problem (pass@1)."})
    num_samples: int = field(
        default=0,
        metadata={"help": "Sampled completions per problem for pass@k / maj@k (0: greedy only)."},
    )
    k: list[int] | None = field(
        default=None,
        metadata={
            "help": "Values of k for pass@k / maj@k (each <= num_samples). Default: 1, 2, 4, ... and num_samples."
        },
    )
    temperature: float = field(default=1.0, metadata={"help": "Sampling temperature (PRIME trains at 1.0)."})
    top_p: float = field(default=1.0, metadata={"help": "Nucleus sampling threshold."})
    max_new_tokens: int = field(default=1024, metadata={"help": "Generation length limit per completion."})
    batch_size: int = field(default=16, metadata={"help": "Sequences per generate call (HF backend)."})
    backend: str = field(
        default="auto",
        metadata={
            "help": "hf (transformers generate), vllm (needs vLLM and a GPU; not run in CI), or auto (vllm "
            "when installed and a GPU is present)."
        },
    )
    dtype: str = field(default="auto", metadata={"help": "Model dtype: auto, float32, bfloat16, float16."})
    device: str | None = field(
        default=None, metadata={"help": "Device for the HF backend (default: cuda if available, else cpu)."}
    )
    seed: int = field(
        default=0,
        metadata={
            "help": "Seed of the sampling: each problem's samples depend only on this seed and the problem's prompt "
            "(not on --batch_size, --limit or the order of the rows)."
        },
    )
    data_seed: int = field(
        default=0, metadata={"help": "Seed that draws the prime-demo problems (independent of --seed)."}
    )
    reward: str = field(
        default="task",
        metadata={
            "help": "Grader, by the names `prime-trl train --reward_funcs` accepts: task (math rows by their last "
            "\\boxed{} answer, code rows by their tests), final_answer (math rows: the boxed answer, else the last "
            "number; for models trained with it), math, code, or module.function."
        },
    )
    output_dir: str = field(
        default="eval_output",
        metadata={"help": "Writes predictions.jsonl (every completion with its grade) and summary.json here."},
    )
    vllm_gpu_memory_utilization: float = field(default=0.9, metadata={"help": "vLLM: fraction of GPU memory."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow custom model code from the hub."})

    def __post_init__(self) -> None:
        if self.backend not in _BACKENDS:
            raise ValueError(f"backend={self.backend!r} is not supported; choose one of {list(_BACKENDS)}.")
        if self.num_samples < 0:
            raise ValueError(f"num_samples={self.num_samples} must be >= 0.")
        if not self.greedy and self.num_samples == 0:
            raise ValueError("Nothing to evaluate: --greedy false and --num_samples 0. Set --num_samples N.")
        if self.k is not None:
            bad = [k for k in self.k if not 1 <= k <= self.num_samples]
            if bad:
                raise ValueError(
                    f"k={bad} is out of range: pass@k / maj@k need 1 <= k <= num_samples ({self.num_samples}). "
                    "Raise --num_samples or lower --k."
                )
        if self.max_new_tokens < 1 or self.batch_size < 1:
            raise ValueError("max_new_tokens and batch_size must be >= 1.")
        if self.num_samples and not self.temperature > 0:
            raise ValueError(
                f"temperature={self.temperature} with --num_samples {self.num_samples}: sampling needs a temperature "
                "> 0 (PRIME trains at 1.0). For greedy decoding use the default --greedy true with --num_samples 0."
            )
        if self.num_samples and not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1] (1.0 keeps the whole distribution).")
        check_reward_name(self.reward)  # a typo fails at parse time; the function is imported by `evaluate`

    def ks(self) -> list[int]:
        """The k values reported: ``k`` if given, else powers of two below ``num_samples`` and ``num_samples``."""
        if self.num_samples == 0:
            return []
        if self.k:
            return sorted(set(self.k))
        powers = [2**i for i in range(int(math.log2(self.num_samples)) + 1)]
        return sorted(set(powers) | {self.num_samples})


# --------------------------------------------------------------------------------------------------------------
# Metrics
# --------------------------------------------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from ``n`` samples of which ``c`` are correct: ``1 - C(n-c, k) / C(n, k)`` (Chen et al.)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    # The product form avoids huge binomials: C(n-c, k) / C(n, k) = prod_{i=n-c+1}^{n} (1 - k / i).
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


_ANSWER_SPACING = re.compile(r"\s+|\\[,;:! ]|\\left|\\right|\\displaystyle")


def _normalize_answer(answer: str) -> str:
    return _ANSWER_SPACING.sub("", answer).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


def majority_vote(
    answers: Sequence[str | None],
    correct: Sequence[bool],
    equivalent: Callable[[list[str], list[str]], list[bool]] | None = None,
    max_groups: int = 16,
    weights: Sequence[float] | None = None,
) -> float:
    """Accuracy of the majority answer: the expected correctness when ties are broken uniformly at random.

    Args:
        answers: extracted answers, ``None`` for a completion without one (it does not vote).
        correct: whether each completion was graded correct.
        equivalent: batched equivalence test ``(preds, golds) -> [bool]`` used to merge groups whose normalised
            strings differ (``1/2`` and ``\\frac{1}{2}``); ``None`` groups by normalised string only. Only the
            ``max_groups`` largest groups are compared (pairs grow quadratically).
        weights: a vote weight per completion (default 1 each); a group's total weight decides. Equal weights
            give exactly the plain majority vote.

    Returns:
        A value in [0, 1] (fractional only when the vote is tied).
    """
    groups: dict[str, list[int]] = {}
    for i, answer in enumerate(answers):
        if answer is not None and answer.strip():
            groups.setdefault(_normalize_answer(answer), []).append(i)
    if not groups:
        return 0.0
    keys = sorted(groups, key=lambda key: -len(groups[key]))
    if equivalent is not None and len(keys) > 1:
        keys = _merge_equivalent(keys[:max_groups], groups, answers, equivalent) + keys[max_groups:]
    weight = [1.0] * len(answers) if weights is None else [float(w) for w in weights]
    # Totals summed in index order, so groups of equally weighted members tie exactly.
    totals = {key: math.fsum(weight[i] for i in sorted(groups[key])) for key in keys}
    best = max(totals.values())
    tied = [key for key in keys if totals[key] >= best - 1e-12 * max(1.0, abs(best))]
    # Each group's correctness is the mean of its members' grades (they agree unless equivalence is fuzzy).
    return sum(sum(correct[i] for i in groups[key]) / len(groups[key]) for key in tied) / len(tied)


def _merge_equivalent(
    keys: list[str], groups: dict[str, list[int]], answers: Sequence[str | None], equivalent: Callable
) -> list[str]:
    """Union the groups whose representative answers are equivalent; returns the surviving keys (mutates groups)."""
    pairs = [(a, b) for i, a in enumerate(keys) for b in keys[i + 1 :]]
    verdicts = equivalent([answers[groups[a][0]] for a, _ in pairs], [answers[groups[b][0]] for _, b in pairs])
    parent = {key: key for key in keys}

    def root(key: str) -> str:
        while parent[key] != key:
            key = parent[key]
        return key

    for (a, b), same in zip(pairs, verdicts):
        if same and root(a) != root(b):
            parent[root(b)] = root(a)
    survivors = []
    for key in keys:
        if root(key) == key:
            survivors.append(key)
        else:
            groups[root(key)].extend(groups.pop(key))
    return survivors


def _math_equivalent(preds: list[str], golds: list[str]) -> list[bool]:
    from prime_trl.rewards.math import _get_default_grader

    return _get_default_grader().grade(preds, golds)


# --------------------------------------------------------------------------------------------------------------
# Data and grading
# --------------------------------------------------------------------------------------------------------------


def load_eval_dataset(args: EvalArguments):
    """The benchmark as a `datasets.Dataset` with prime_trl.data's columns (``prompt``, ``task``, ``answer``, ...).

    ``prime-demo`` problems are drawn with ``args.data_seed`` from the task's held-out partition (``--split``
    picks another), so ``--seed`` changes the samples, never the problems.
    """
    from prime_trl.data import DEMO_DATASET_NAMES, load_dataset_by_name

    if args.data.lower() in DEMO_DATASET_NAMES:
        from datasets import Dataset

        from prime_trl.demo.task import make_dataset

        partition = args.split or "test"
        if partition not in ("train", "validation", "test"):
            raise ValueError(f"--split {partition}: prime-demo has the splits train, validation and test.")
        demo = make_dataset(args.limit or 500, seed=args.data_seed, partition=partition)
        return Dataset.from_dict(
            {
                "prompt": demo["prompt"],
                "task": ["math"] * len(demo),
                "answer": demo["answer"],
                "tests": [""] * len(demo),
                "code_prefix": [""] * len(demo),
                "entry_point": [""] * len(demo),
                "source": ["prime-demo"] * len(demo),
                "id": demo["expression"],
            }
        )
    check_split(args.data, args.split)
    return load_dataset_by_name(
        args.data, args.split, path=args.data_dir, system_prompt=args.system_prompt, limit=args.limit
    )


def check_split(data: str, split: str | None) -> None:
    """Fail when ``split`` is not a split of the named data set (a test-only benchmark has no train split: using
    its test rows instead would silently evaluate something else)."""
    from prime_trl.data import _FILES, canonical_dataset_name

    key = canonical_dataset_name(data)
    if split is None or key is None:
        return
    available = ["train", "validation"] if key == "eurus" else sorted(s for name, s in _FILES if name == key)
    if split not in available:
        raise ValueError(
            f"--split {split}: {data} has only the split(s) {available}; drop --split or choose one of them."
        )


def grade_completions(
    rows: Sequence[dict], completions: Sequence[str], reward_fn: Callable | None = None
) -> list[float]:
    """Verifier scores of ``completions[i]`` for ``rows[i]`` (default `task_reward`: math rows by the boxed answer,
    code rows by sandboxed tests)."""
    if reward_fn is None:
        from prime_trl.rewards import task_reward as reward_fn
    columns = {name: [row.get(name) for row in rows] for name in _GRADING_COLUMNS}
    return [float(score) for score in reward_fn(completions=list(completions), **columns)]


# --------------------------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------------------------


@dataclass
class Generation:
    """One completion: its text (special tokens removed), whether it ended with EOS, and its token count."""

    text: str
    finished: bool
    num_tokens: int


class Generator(Protocol):
    """What `evaluate` needs from a backend."""

    def encode(self, prompt: str | list[dict]) -> list[int]: ...

    def generate(
        self, prompt_ids: Sequence[list[int]], num_samples: int, greedy: bool, seeds: Sequence[int]
    ) -> list[list[Generation]]: ...


def sample_seed(seed: int, prompt: str | list[dict], sample: int) -> int:
    """Seed of one sampled completion: a function of ``seed``, the problem's prompt and the sample's index only,
    so a problem's samples do not change with the batch size, ``--limit`` or the other problems."""
    key = json.dumps([seed, prompt, sample], ensure_ascii=False, sort_keys=True)
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little") >> 2  # room for + sample


def decoding_settings(greedy: bool, temperature: float, top_p: float, max_new_tokens: int) -> dict[str, Any]:
    """Every setting that decides which token comes next, explicit (nothing left for the model's
    ``generation_config.json`` to fill in): plain greedy decoding, or sampling at ``temperature`` / ``top_p``
    from the full distribution (no top-k, min-p or repetition penalty), as PRIME's rollouts are drawn."""
    return {
        "do_sample": not greedy,
        "temperature": 1.0 if greedy else temperature,
        "top_p": 1.0 if greedy else top_p,
        "top_k": 0,
        "min_p": 0.0,
        "typical_p": 1.0,
        "repetition_penalty": 1.0,
        "no_repeat_ngram_size": 0,
        "num_beams": 1,
        "min_new_tokens": 0,
        "max_new_tokens": max_new_tokens,
    }


def _resolve_dtype(dtype: str) -> torch.dtype | str:
    if dtype == "auto":
        return "auto"
    if not hasattr(torch, dtype) or not isinstance(getattr(torch, dtype), torch.dtype):
        raise ValueError(f"dtype={dtype!r} is not a torch dtype; use auto, float32, bfloat16 or float16.")
    return getattr(torch, dtype)


def load_policy(
    model: str,
    adapter: str | None = None,
    dtype: str = "auto",
    device: str | None = None,
    trust_remote_code: bool = False,
):
    """Load ``model`` (plus the LoRA ``adapter``, active) and its tokenizer for generation.

    The tokenizer comes from the adapter directory when it has one (``prime-trl train`` saves it there), else
    from the model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from prime_trl.models import resolve_model

    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if adapter is not None and not (Path(adapter) / "adapter_config.json").is_file():  # before the slow load
        raise FileNotFoundError(
            f"--adapter {adapter}: no adapter_config.json there. Pass the output_dir of `prime-trl train` (the "
            "policy adapter is saved at its root) or a checkpoint-N directory."
        )
    model = resolve_model(model)  # smollm2-135m, prime-demo and .gguf files become a model directory
    policy = AutoModelForCausalLM.from_pretrained(
        model, dtype=_resolve_dtype(dtype), trust_remote_code=trust_remote_code
    )
    tokenizer_source = model
    if adapter is not None:
        from peft import PeftModel

        policy = PeftModel.from_pretrained(policy, adapter)
        if (Path(adapter) / "tokenizer_config.json").is_file():
            tokenizer_source = adapter
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_source, trust_remote_code=trust_remote_code)
    tokenizer.padding_side = "left"  # generation continues the prompt on the right
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return policy.to(device).eval(), tokenizer


class _SeededGumbelSampler:
    """Logits processor that turns greedy decoding into sampling with one random stream per sequence.

    ``argmax(log p + g)`` with ``g`` i.i.d. standard Gumbel noise is an exact draw from ``p`` (the Gumbel-max
    trick). Each row draws its noise from its own `torch.Generator`, seeded by `sample_seed`, so what a row
    samples does not depend on which other rows share its batch (``torch.multinomial`` in ``generate`` would
    use one global stream for the whole batch). The streams live on the model's device (no host copy per step),
    so the same seed gives the same samples on the same kind of device.
    """

    def __init__(self, seeds: Sequence[int], device: torch.device | str):
        self.device = torch.device(device)
        self.generators = [torch.Generator(device=self.device).manual_seed(seed) for seed in seeds]

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        vocab = scores.shape[-1]
        uniform = torch.stack(
            [torch.rand(vocab, generator=g, dtype=torch.float64, device=self.device) for g in self.generators]
        )
        gumbel = -torch.log(-torch.log(uniform.clamp_(min=1e-300)))
        # -inf logits (removed by top-p) stay -inf: they can never be drawn.
        return scores.float() + gumbel.to(device=scores.device, dtype=torch.float32)


@contextlib.contextmanager
def _own_generation_config(model, config):
    """Make ``config`` the model's generation config while generating: ``generate`` fills every field left unset
    from ``model.generation_config`` (the model's generation_config.json), so nothing of it may remain there."""
    saved = model.generation_config
    model.generation_config = config
    try:
        yield
    finally:
        model.generation_config = saved


class HFGenerator:
    """Batched ``transformers`` generation (left padding, stops at EOS) with every decoding setting explicit."""

    def __init__(
        self,
        model,
        tokenizer,
        *,
        max_new_tokens: int = 1024,
        temperature: float = 1.0,
        top_p: float = 1.0,
        batch_size: int = 16,
        progress: bool = True,
    ):
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.batch_size, self.progress = batch_size, progress
        self.eos_ids = pad_and_eos_token_ids(tokenizer, model)  # pad and EOS as GRPOTrainer sets them up

    @classmethod
    def from_args(cls, args: EvalArguments) -> HFGenerator:
        model, tokenizer = load_policy(args.model, args.adapter, args.dtype, args.device, args.trust_remote_code)
        return cls(
            model,
            tokenizer,
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            batch_size=args.batch_size,
        )

    def encode(self, prompt: str | list[dict]) -> list[int]:
        return prompt_token_ids(self.tokenizer, prompt)

    def generation_config(self, greedy: bool):
        """The complete `GenerationConfig` of one call. Sampling runs as greedy decoding over temperature- and
        top-p-processed logits plus per-row Gumbel noise (`_SeededGumbelSampler`), hence ``do_sample=False``."""
        from transformers import GenerationConfig

        settings = decoding_settings(greedy, self.temperature, self.top_p, self.max_new_tokens)
        settings.update(do_sample=False, temperature=1.0, top_p=1.0)  # applied by our own processors
        return GenerationConfig(
            **settings,
            num_return_sequences=1,  # generate() repeats each prompt num_samples times itself
            eos_token_id=self.eos_ids,
            pad_token_id=self.tokenizer.pad_token_id,
            bos_token_id=self.tokenizer.bos_token_id,
            use_cache=True,
        )

    def _logits_processors(self, seeds: list[int], device):
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper

        processors = LogitsProcessorList()
        if self.temperature != 1.0:
            processors.append(TemperatureLogitsWarper(self.temperature))
        if self.top_p < 1.0:
            processors.append(TopPLogitsWarper(self.top_p))
        processors.append(_SeededGumbelSampler(seeds, device))
        return processors

    @torch.no_grad()
    def generate(
        self, prompt_ids: Sequence[list[int]], num_samples: int, greedy: bool, seeds: Sequence[int] | None = None
    ) -> list[list[Generation]]:
        """``[len(prompt_ids)][num_samples]`` completions (greedy: ``num_samples`` must be 1). Sample ``j`` of
        prompt ``i`` draws from the stream seeded ``seeds[i] + j``."""
        if greedy and num_samples != 1:
            raise ValueError("greedy decoding gives one completion per prompt; use num_samples=1")
        seeds = list(seeds) if seeds is not None else [0] * len(prompt_ids)
        config = self.generation_config(greedy)
        device = next(self.model.parameters()).device
        per_call = max(1, self.batch_size // num_samples)
        results: list[list[Generation]] = []
        with _own_generation_config(self.model, config):
            for start in range(0, len(prompt_ids), per_call):
                chunk = [list(ids) for ids in prompt_ids[start : start + per_call]]
                rows = [ids for ids in chunk for _ in range(num_samples)]
                input_ids, attention_mask = (
                    t.to(device) for t in left_padded_prompts(rows, self.tokenizer.pad_token_id)
                )
                extra = {}
                if not greedy:
                    row_seeds = [seed + j for seed in seeds[start : start + per_call] for j in range(num_samples)]
                    extra["logits_processor"] = self._logits_processors(row_seeds, device)
                output = self.model.generate(
                    input_ids=input_ids, attention_mask=attention_mask, generation_config=config, **extra
                )
                generations = self._generations(output[:, input_ids.shape[1] :])
                results.extend(generations[i * num_samples : (i + 1) * num_samples] for i in range(len(chunk)))
        return results

    def _generations(self, new_tokens: torch.Tensor) -> list[Generation]:
        """Completions cut after their first EOS, as training cuts them; ``finished`` when that EOS is there."""
        ids, mask = cut_at_first_eos(new_tokens, self.eos_ids, self.tokenizer.pad_token_id)
        generations = []
        for row, length in zip(ids.tolist(), mask.sum(1).tolist()):
            kept = row[:length]
            text = self.tokenizer.decode(kept, skip_special_tokens=True)
            generations.append(Generation(text, finished=bool(kept) and kept[-1] in self.eos_ids, num_tokens=length))
        return generations


def vllm_requests(
    args: EvalArguments, prompt_ids: Sequence[list[int]], num_samples: int, greedy: bool, seeds: Sequence[int]
) -> tuple[list[dict], list[dict]]:
    """vLLM inputs and per-prompt ``SamplingParams`` keyword arguments.

    Prompts go in as token ids (``{"prompt_token_ids": ...}``): given text, vLLM would tokenise it again with
    the special tokens, putting a second BOS before a chat template that already starts with one. Each prompt
    carries its own seed, so its samples do not depend on the other prompts.
    """
    settings = decoding_settings(greedy, args.temperature, args.top_p, args.max_new_tokens)
    params = {
        "temperature": 0.0 if greedy else settings["temperature"],
        "top_p": settings["top_p"],
        "top_k": -1,  # vLLM's "disabled"
        "min_p": settings["min_p"],
        "repetition_penalty": settings["repetition_penalty"],
        "presence_penalty": 0.0,
        "frequency_penalty": 0.0,
        "max_tokens": settings["max_new_tokens"],
        "min_tokens": settings["min_new_tokens"],
        "n": num_samples,
    }
    inputs = [{"prompt_token_ids": list(ids)} for ids in prompt_ids]
    return inputs, [{**params, "seed": seed} for seed in seeds]


class VLLMGenerator:
    """vLLM generation, the policy adapter applied as a vLLM LoRA adapter. Needs vLLM and a GPU: not run in
    this project's CI (CPU only); the code follows vLLM's documented ``LLM.generate`` / ``LoRARequest`` API, and
    what it sends is built by `vllm_requests` (unit tested)."""

    def __init__(self, args: EvalArguments):
        from vllm import LLM
        from vllm.lora.request import LoRARequest

        lora_rank = None
        if args.adapter is not None:
            lora_rank = json.loads((Path(args.adapter) / "adapter_config.json").read_text())["r"]
        self.llm = LLM(
            model=args.model,
            dtype=args.dtype,
            seed=args.seed,
            enable_lora=args.adapter is not None,
            max_lora_rank=max(16, lora_rank or 16),
            gpu_memory_utilization=args.vllm_gpu_memory_utilization,
            trust_remote_code=args.trust_remote_code,
            generation_config="vllm",  # vLLM's neutral defaults, not the model's generation_config.json
        )
        self.lora = LoRARequest("policy", 1, args.adapter) if args.adapter is not None else None
        self.prompts_per_call = 1024
        self.tokenizer = self.llm.get_tokenizer()
        self.args = args

    def encode(self, prompt: str | list[dict]) -> list[int]:
        return prompt_token_ids(self.tokenizer, prompt)

    def generate(
        self, prompt_ids: Sequence[list[int]], num_samples: int, greedy: bool, seeds: Sequence[int] | None = None
    ) -> list[list[Generation]]:
        from vllm import SamplingParams

        seeds = list(seeds) if seeds is not None else [self.args.seed] * len(prompt_ids)
        inputs, params = vllm_requests(self.args, prompt_ids, num_samples, greedy, seeds)
        outputs = self.llm.generate(inputs, [SamplingParams(**p) for p in params], lora_request=self.lora)
        return [
            [Generation(o.text, o.finish_reason == "stop", len(o.token_ids)) for o in request.outputs]
            for request in outputs
        ]


def make_generator(args: EvalArguments) -> Generator:
    """The backend ``args.backend`` asks for (``auto``: vLLM when importable and a GPU is present)."""
    backend = args.backend
    if backend == "auto":
        backend = "vllm" if importlib.util.find_spec("vllm") and torch.cuda.is_available() else "hf"
    if backend == "vllm":
        if importlib.util.find_spec("vllm") is None:
            raise ImportError("--backend vllm needs vLLM: pip install 'prime-trl[vllm]' (CUDA only).")
        logger.info("Generating with vLLM.")
        return VLLMGenerator(args)
    logger.info("Generating with transformers generate.")
    return HFGenerator.from_args(args)


# --------------------------------------------------------------------------------------------------------------
# The evaluation loop
# --------------------------------------------------------------------------------------------------------------


def evaluate(
    args: EvalArguments,
    generator: Generator | None = None,
    dataset=None,
    reward_fn: Callable | None = None,
) -> dict[str, Any]:
    """Generate, grade and summarise; writes ``predictions.jsonl`` and ``summary.json`` to ``args.output_dir``.

    Args:
        args: the settings.
        generator: a backend (default: `make_generator(args)`); tests pass a fake one.
        dataset: rows to evaluate (default: `load_eval_dataset(args)`).
        reward_fn: verifier with prime_trl.rewards' signature (default: the one ``args.reward`` names).

    Returns:
        The summary (also written to ``summary.json``): ``metrics`` maps metric names to values.
    """
    dataset = load_eval_dataset(args) if dataset is None else dataset
    rows = [dict(row) for row in dataset]
    if not rows:
        raise ValueError(f"--data {args.data} gave no problems.")
    reward_fn = load_reward_func(args.reward) if reward_fn is None else reward_fn
    extract = answer_extractor(args.reward)
    generator = make_generator(args) if generator is None else generator
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    ks = args.ks()

    greedy_correct: list[bool] = []
    sample_correct: list[list[bool]] = []
    sample_answers: list[list[str | None]] = []
    math_rows: list[bool] = []
    lengths: list[int] = []
    finished: list[bool] = []
    no_answer: list[bool] = []

    # Prompts per round of generate + grade + write. HF generate: what fits one batch; vLLM schedules its own
    # batches and is fastest when given many prompts at once.
    chunk_size = max(1, args.batch_size // max(1, args.num_samples)) if args.num_samples else args.batch_size
    chunk_size = getattr(generator, "prompts_per_call", None) or chunk_size
    predictions_path = output_dir / "predictions.jsonl"
    with open(predictions_path, "w", encoding="utf-8") as handle:
        bar = tqdm(range(0, len(rows), chunk_size), desc=f"eval {args.data}", unit="batch")
        for start in bar:
            chunk = rows[start : start + chunk_size]
            prompt_ids = [generator.encode(row["prompt"]) for row in chunk]
            seeds = [sample_seed(args.seed, row["prompt"], 0) for row in chunk]
            runs: list[tuple[str, list[list[Generation]]]] = []
            if args.greedy:
                runs.append(("greedy", generator.generate(prompt_ids, 1, greedy=True, seeds=seeds)))
            if args.num_samples:
                runs.append(("sample", generator.generate(prompt_ids, args.num_samples, greedy=False, seeds=seeds)))
            for mode, generations in runs:
                flat = [(row, g) for row, gens in zip(chunk, generations) for g in gens]
                scores = grade_completions([r for r, _ in flat], [g.text for _, g in flat], reward_fn)
                per_row = len(generations[0]) if generations else 0
                for index, ((row, gen), score) in enumerate(zip(flat, scores)):
                    record = _record(row, gen, score, mode, index % per_row, extract)
                    handle.write(json.dumps(record, ensure_ascii=False) + "\n")
                    lengths.append(gen.num_tokens)
                    finished.append(gen.finished)
                    if row["task"] == "math":
                        no_answer.append(record["extracted_answer"] is None)
                for i, row in enumerate(chunk):
                    correct = [s >= 1.0 - 1e-9 for s in scores[i * per_row : (i + 1) * per_row]]
                    if mode == "greedy":
                        greedy_correct.append(correct[0])
                    else:
                        sample_correct.append(correct)
                        sample_answers.append(
                            [_extract_answer(row, g.text, extract) for g in generations[i]]
                            if row["task"] == "math"
                            else []
                        )
            math_rows.extend(row["task"] == "math" for row in chunk)
            if greedy_correct:
                bar.set_postfix(greedy=f"{sum(greedy_correct) / len(greedy_correct):.3f}")

    metrics: dict[str, float] = {}
    if greedy_correct:
        metrics["pass@1 (greedy)"] = sum(greedy_correct) / len(greedy_correct)
    if sample_correct:
        n = args.num_samples
        for k in ks:
            metrics[f"pass@{k}"] = sum(pass_at_k(n, sum(c), k) for c in sample_correct) / len(sample_correct)
        math_indices = [i for i, is_math in enumerate(math_rows) if is_math]
        for k in ks:
            if k == 1 or not math_indices:
                continue
            votes = [
                majority_vote(sample_answers[i][:k], sample_correct[i][:k], equivalent=_math_equivalent)
                for i in math_indices
            ]
            metrics[f"maj@{k}"] = sum(votes) / len(votes)
    if no_answer:
        metrics["no boxed answer" if extract is extract_boxed else "no answer"] = sum(no_answer) / len(no_answer)
    metrics["truncated"] = 1.0 - sum(finished) / len(finished)
    metrics["mean completion tokens"] = sum(lengths) / len(lengths)

    summary = {
        "data": args.data,
        "model": args.model,
        "adapter": args.adapter,
        "num_problems": len(rows),
        "num_math_problems": sum(math_rows),
        "num_samples": args.num_samples,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "max_new_tokens": args.max_new_tokens,
        "reward": args.reward,
        "decoding": {
            mode: decoding_settings(mode == "greedy", args.temperature, args.top_p, args.max_new_tokens)
            for mode, wanted in (("greedy", args.greedy), ("sampled", args.num_samples > 0))
            if wanted
        },
        "metrics": metrics,
        "predictions": str(predictions_path),
        "settings": asdict(args),
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def answer_extractor(reward: str) -> Callable[[str], str | None]:
    """How a math completion's answer is read for maj@k votes and ``extracted_answer``: as the grader reads it
    (``final_answer``: the boxed answer, else the last number; any other grader: the last ``\\boxed{}``)."""
    return extract_final_answer if reward == "final_answer" else extract_boxed


def _extract_answer(row: dict, text: str, extract: Callable[[str], str | None]) -> str | None:
    return extract(text) if row["task"] == "math" else None


def _record(
    row: dict, generation: Generation, score: float, mode: str, sample: int, extract: Callable[[str], str | None]
) -> dict[str, Any]:
    return {
        "id": row.get("id"),
        "source": row.get("source"),
        "task": row["task"],
        "mode": mode,
        "sample": sample,
        "prompt": row["prompt"],
        "completion": generation.text,
        "extracted_answer": _extract_answer(row, generation.text, extract),
        "answer": row.get("answer"),
        "score": score,
        "correct": score >= 1.0 - 1e-9,
        "finished": generation.finished,
        "num_tokens": generation.num_tokens,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The summary as a Markdown table (what ``prime-trl eval`` prints)."""
    title = f"{summary['data']}: {summary['num_problems']} problems, model {summary['model']}"
    if summary.get("adapter"):
        title += f" + adapter {summary['adapter']}"
    if summary.get("reward"):
        title += f", graded by {summary['reward']}"
    sampled = f" (n={summary['num_samples']}, T={summary['temperature']}, top_p={summary['top_p']})"
    lines = [title, "", "| metric | value |", "|---|---:|"]
    for name, value in summary["metrics"].items():
        label = name + (sampled if name.startswith(("pass@", "maj@")) and "greedy" not in name else "")
        lines.append(f"| {label} | {value:.1f} |" if name == "mean completion tokens" else f"| {label} | {value:.3f} |")
    lines.append("")
    sampling_only = ("temperature", "top_p", "top_k", "min_p", "typical_p")  # no effect on an argmax
    for mode, settings in summary.get("decoding", {}).items():
        shown = [] if settings["do_sample"] else ["argmax"]
        shown += [
            f"{name}={value}"
            for name, value in settings.items()
            if name != "do_sample" and (settings["do_sample"] or name not in sampling_only)
        ]
        lines.append(f"decoding ({mode}): {', '.join(shown)}")
    lines.append(f"predictions: {summary['predictions']}")
    return "\n".join(lines)
