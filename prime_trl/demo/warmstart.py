"""Supervised warm start of the demo model on noisy-teacher demonstrations, cached on disk, and its evaluation.

Why a *noisy* teacher: a model warm-started on clean chains makes few, stubborn errors that RL fixes only
slowly on CPU. Trained on chains where each step is wrong with some probability (the error carried
consistently to the box), the model learns the format and the arithmetic but keeps a calibrated amount of
step-level noise - a middling sampled accuracy that RL (and step-level credit) can improve quickly.

Cache layout: ``<root>/warmstart/<key>/`` holds ``config.json``, ``model.safetensors``, the tokenizer files and
``warmstart.json`` (configs, key, training stats). ``<root>`` is the ``cache_dir`` argument, else
``$PRIME_TRL_CACHE``, else ``$XDG_CACHE_HOME/prime_trl`` (``~/.cache/prime_trl``). ``<key>`` hashes the task,
model and SFT configs, the seed and ``WARMSTART_VERSION``. An entry is built in a temporary directory next to
it and renamed into place when complete, so a crash never leaves a half-written entry.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import datasets
import torch
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from prime_trl.demo.model import DemoModelConfig, build_demo_model, build_demo_tokenizer, count_parameters
from prime_trl.demo.task import (
    ArithmeticProblem,
    TaskConfig,
    all_steps_correct,
    answer_reward,
    noisy_completion,
    problem_from_prompt,
    prompt_text,
    sample_problem_in,
)

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_SFT",
    "HARD_SFT",
    "SPARSE_SFT",
    "SYSTEMATIC_SFT",
    "WARMSTART_VERSION",
    "SFTConfig",
    "cache_root",
    "default_sft_config",
    "evaluate_accuracy",
    "generate_completions",
    "get_warm_start",
    "load_warm_start",
    "train_warm_start",
    "warm_start_key",
]

# Bump when the training code changes in a way that changes the trained weights: it invalidates old caches.
WARMSTART_VERSION = 1
_META_FILE = "warmstart.json"


@dataclass(frozen=True)
class SFTConfig:
    """Hyper-parameters of the supervised warm start.

    Every step draws ``batch_size`` fresh problems from the *train* partition and one noisy-teacher completion
    for each (``step_error_prob``, ``max_error``, ``error_operators``: see ``noisy_completion``). Loss: token cross-entropy on the
    completion and its EOS only (not the prompt). AdamW, linear warm-up, cosine decay to
    ``min_lr_ratio * learning_rate``, grad-norm clipping.
    """

    num_steps: int = 800
    batch_size: int = 64
    learning_rate: float = 3e-3
    warmup_steps: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    step_error_prob: float = 0.25
    max_error: int = 3
    error_operators: str = "+-*"

    def __post_init__(self) -> None:
        if not self.error_operators or set(self.error_operators) - set("+-*"):
            raise ValueError(
                f"SFTConfig.error_operators must be a non-empty subset of '+-*' (the operators whose steps the noisy "
                f"teacher may get wrong), got {self.error_operators!r}"
            )

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict; it keys the warm-start cache. ``error_operators`` appears only when it is not the default
        (every operator), so the keys of warm starts built before the field existed stay valid."""
        data = asdict(self)
        if self.error_operators == SFTConfig.error_operators:
            del data["error_operators"]
        return data


# Tuned (with the default DemoModelConfig) so that sampling at T=1 on the 500 test prompts lands in the 20-50% band
# while greedy decoding is much better (the model knows the arithmetic but samples the teacher's noise): measured
# default task 35% sampled / 86% greedy (seed 0), 32% / 73% (seed 1); hard task 38% / 87% (seed 0), 29% / 68%
# (seed 1). The hard task's longer chains need a lower per-step error rate for the same band. Less training lands
# well below the band (a 4-layer model after 600 steps: 20% / 44%; 400 steps at lr 5e-3 or batch 32: 12-15%),
# so the step count is not a free knob.
DEFAULT_SFT = SFTConfig()
HARD_SFT = SFTConfig(step_error_prob=0.15)
# Sparse success (``TaskConfig.sparse()``, 8-step chains): the default SFT schedule (800 x 64) with a lower step
# error than the default's so that, over 8 steps, the teacher's noise and the model's own errors leave a sampled
# accuracy in the 5-15% band. Measured (seed 0, T=1, 4 samples per prompt): 9.0% sampled / 56% greedy on the first
# 100 test prompts (the regime benchmark's evaluation prompts; its runs' step-0 evaluation, another sampling seed,
# gives 8.0% / 56%), 8.9% / 53% on 500; only 3.5% of samples have every step right (some wrong chains still reach
# the right answer). Training took 21 minutes on a loaded 2-core machine. A shorter warm start (300 steps of 32 at
# step error 0.1) landed at 1.8% sampled / 2% greedy: too little training to learn 8-step arithmetic, so the step
# count is not a free knob here either.
SPARSE_SFT = SFTConfig(step_error_prob=0.2)
# Systematic errors (default task): the teacher errs on multiplications only, so the warm start's mistakes sit on
# one kind of step across problems.
SYSTEMATIC_SFT = SFTConfig(step_error_prob=0.5, error_operators="*")


def default_sft_config(task_config: TaskConfig) -> SFTConfig:
    """The tuned SFT config for a task: ``HARD_SFT`` / ``SPARSE_SFT`` for those variants, else ``DEFAULT_SFT``."""
    return {TaskConfig.hard(): HARD_SFT, TaskConfig.sparse(): SPARSE_SFT}.get(task_config, DEFAULT_SFT)


# --------------------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _torch_threads(num_threads: int | None) -> Iterator[None]:
    """Temporarily set torch's intra-op thread count (``None``: leave it)."""
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def _lr_factor(step: int, config: SFTConfig) -> float:
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.num_steps - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.min_lr_ratio + (1.0 - config.min_lr_ratio) * cosine


def _sft_batch(
    problems: Sequence[ArithmeticProblem], completions: Sequence[str], tokenizer: PreTrainedTokenizerBase
) -> dict[str, torch.Tensor]:
    """Right-padded ``input_ids`` / ``attention_mask`` / ``labels`` ``[N, L]``; labels are -100 off the completion.

    Prompt and completion are tokenised separately, as generation sees them (prompt ids, then generated ids).
    """
    prompt_ids = tokenizer([prompt_text(p) for p in problems], add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(list(completions), add_special_tokens=False)["input_ids"]
    rows = [(p, c + [tokenizer.eos_token_id]) for p, c in zip(prompt_ids, completion_ids)]
    length = max(len(p) + len(c) for p, c in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    labels = torch.full((len(rows), length), -100, dtype=torch.long)
    for i, (p, c) in enumerate(rows):
        n = len(p) + len(c)
        input_ids[i, :n] = torch.tensor(p + c)
        attention_mask[i, :n] = 1
        labels[i, len(p) : n] = torch.tensor(c)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def train_warm_start(
    task_config: TaskConfig | None = None,
    model_config: DemoModelConfig | None = None,
    sft_config: SFTConfig | None = None,
    seed: int = 0,
    progress: bool = True,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, dict[str, Any]]:
    """Build the demo model and train it on noisy-teacher demonstrations (CPU, float32, seeded).

    Defaults: ``TaskConfig()``, ``DemoModelConfig()``, ``default_sft_config(task_config)``.

    Returns:
        ``(model, tokenizer, stats)``; the model is in eval mode; ``stats`` has ``final_loss`` (mean of the last
        50 steps), ``seconds`` and ``num_parameters``.
    """
    task_config = task_config or TaskConfig()
    model_config = model_config or DemoModelConfig()
    sft_config = sft_config or default_sft_config(task_config)
    tokenizer = build_demo_tokenizer()
    model = build_demo_model(tokenizer, model_config, seed=seed)
    model.train()
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=sft_config.learning_rate, weight_decay=sft_config.weight_decay, betas=(0.9, 0.98)
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: _lr_factor(s, sft_config))
    rng = random.Random(f"warmstart-{seed}")  # data stream; the model init uses `seed` directly

    losses: list[float] = []
    start = time.perf_counter()
    bar = tqdm(range(sft_config.num_steps), desc="warm start (SFT)", disable=not progress, mininterval=1.0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for step in bar:
            problems = [sample_problem_in("train", rng, task_config) for _ in range(sft_config.batch_size)]
            completions = [
                noisy_completion(p, rng, sft_config.step_error_prob, sft_config.max_error, sft_config.error_operators)
                for p in problems
            ]
            loss = model(**_sft_batch(problems, completions, tokenizer)).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), sft_config.max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            if step % 10 == 0:
                bar.set_postfix(loss=f"{sum(losses[-10:]) / len(losses[-10:]):.3f}")
    model.eval()
    stats = {
        "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:])),
        "seconds": time.perf_counter() - start,
        "num_parameters": count_parameters(model),
    }
    logger.info("warm start trained: %s", stats)
    return model, tokenizer, stats


# --------------------------------------------------------------------------------------------------------------
# Cache
# --------------------------------------------------------------------------------------------------------------


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """The cache root: ``cache_dir``, else ``$PRIME_TRL_CACHE``, else ``$XDG_CACHE_HOME/prime_trl``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("PRIME_TRL_CACHE"):
        return Path(os.environ["PRIME_TRL_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "prime_trl"


def _key_payload(task_config: TaskConfig, model_config: DemoModelConfig, sft_config: SFTConfig, seed: int) -> dict:
    return {
        "version": WARMSTART_VERSION,
        "task": task_config.to_dict(),
        "model": model_config.to_dict(),
        "sft": sft_config.to_dict(),
        "seed": seed,
    }


def warm_start_key(
    task_config: TaskConfig | None = None,
    model_config: DemoModelConfig | None = None,
    sft_config: SFTConfig | None = None,
    seed: int = 0,
) -> str:
    """16-hex-digit key of a warm start: a hash of every config field, the seed and ``WARMSTART_VERSION``.

    Defaults as ``get_warm_start``.
    """
    task_config = task_config or TaskConfig()
    model_config = model_config or DemoModelConfig()
    sft_config = sft_config or default_sft_config(task_config)
    payload = json.dumps(_key_payload(task_config, model_config, sft_config, seed), sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def _check_tokenizer_roundtrip(tokenizer: PreTrainedTokenizerBase, directory: Path) -> None:
    """The saved tokenizer must reload (as ``AutoTokenizer``) with identical ids, specials and padding side."""
    reloaded = AutoTokenizer.from_pretrained(directory)
    sample = "Q:7+5*3-4=?A:5*3=15;7+15=22;22-4=18;\\boxed{18}"
    same = (
        reloaded(sample)["input_ids"] == tokenizer(sample)["input_ids"]
        and reloaded.get_vocab() == tokenizer.get_vocab()
        and (reloaded.eos_token_id, reloaded.pad_token_id) == (tokenizer.eos_token_id, tokenizer.pad_token_id)
        and reloaded.padding_side == tokenizer.padding_side
    )
    if not same:
        raise RuntimeError(f"the tokenizer saved to {directory} does not reload identically")


def get_warm_start(
    task_config: TaskConfig | None = None,
    model_config: DemoModelConfig | None = None,
    sft_config: SFTConfig | None = None,
    seed: int = 0,
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
    num_threads: int | None = 1,
    progress: bool = True,
) -> Path:
    """Directory of the warm-started model + tokenizer, training and caching it first if needed.

    Args:
        task_config, model_config: default ``TaskConfig()`` / ``DemoModelConfig()``.
        sft_config: default ``default_sft_config(task_config)``.
        seed: model initialisation and data seed.
        cache_dir: cache root (see the module docstring); the entry is ``<root>/warmstart/<key>``.
        rebuild: retrain and replace an existing entry.
        num_threads: torch threads while training (restored afterwards); ``None`` leaves the setting alone.
        progress: show a tqdm bar while training.

    Returns:
        The entry's path; load it with ``load_warm_start`` or ``AutoModelForCausalLM`` / ``AutoTokenizer``
        ``.from_pretrained(path)``.
    """
    task_config = task_config or TaskConfig()
    model_config = model_config or DemoModelConfig()
    sft_config = sft_config or default_sft_config(task_config)
    key = warm_start_key(task_config, model_config, sft_config, seed)
    parent = cache_root(cache_dir) / "warmstart"
    final = parent / key
    if (final / _META_FILE).is_file() and not rebuild:
        logger.info("using cached warm start %s", final)
        return final

    logger.info(
        "training warm start %s (task=%s, model=%s, sft=%s, seed=%d)", key, task_config, model_config, sft_config, seed
    )
    parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{key}.tmp-", dir=parent))
    try:
        with _torch_threads(num_threads):
            model, tokenizer, stats = train_warm_start(task_config, model_config, sft_config, seed, progress)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        _check_tokenizer_roundtrip(tokenizer, tmp)
        meta = {
            "key": key,
            **_key_payload(task_config, model_config, sft_config, seed),
            "stats": stats,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        }
        (tmp / _META_FILE).write_text(json.dumps(meta, indent=2))  # written last: marks a complete entry
        if final.exists():  # rebuild, or a directory left without its meta file: move it aside first
            trash = Path(tempfile.mkdtemp(prefix=f".{key}.old-", dir=parent))
            os.rename(final, trash / key)
            shutil.rmtree(trash, ignore_errors=True)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / _META_FILE).is_file():  # not a concurrent builder that won the race
                raise
            logger.info("another process cached %s first; using its entry", key)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_warm_start(path: str | os.PathLike) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a cached warm start (model in eval mode, float32, CPU)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


# --------------------------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------------------------


def _as_prompts(prompts: datasets.Dataset | Sequence[str] | Sequence[ArithmeticProblem]) -> list[str]:
    if isinstance(prompts, datasets.Dataset):
        return list(prompts["prompt"])
    return [prompt_text(p) if isinstance(p, ArithmeticProblem) else p for p in prompts]


@torch.no_grad()
def generate_completions(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    temperature: float = 1.0,
    num_samples: int = 1,
    max_new_tokens: int = 64,
    batch_size: int = 256,
    greedy: bool = False,
) -> list[list[str]]:
    """Complete each prompt ``num_samples`` times (batched ``generate``, left padding, stops at EOS).

    Sampling is pure temperature sampling (no top-k / top-p), as in RL. Uses the global torch RNG; seed it (or
    use ``evaluate_accuracy``, which does) for reproducible samples.

    Returns:
        ``[len(prompts)][num_samples]`` completion strings, special tokens (EOS, padding) removed.
    """
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    per_call = max(1, batch_size // num_samples)
    out: list[list[str]] = []
    try:
        for i in range(0, len(prompts), per_call):
            chunk = list(prompts[i : i + per_call])
            enc = tokenizer(chunk, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
            enc = {k: v.to(device) for k, v in enc.items()}
            kwargs: dict[str, Any] = (
                {"do_sample": False}
                if greedy
                else {"do_sample": True, "temperature": temperature, "top_k": 0, "top_p": 1.0}
            )
            generated = model.generate(
                **enc,
                max_new_tokens=max_new_tokens,
                num_return_sequences=num_samples,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
                **kwargs,
            )
            texts = tokenizer.batch_decode(generated[:, enc["input_ids"].shape[1] :], skip_special_tokens=True)
            out.extend(texts[j * num_samples : (j + 1) * num_samples] for j in range(len(chunk)))
    finally:
        model.train(was_training)
    return out


def evaluate_accuracy(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: datasets.Dataset | Sequence[str] | Sequence[ArithmeticProblem],
    temperature: float = 1.0,
    num_samples: int = 4,
    max_new_tokens: int | None = None,
    batch_size: int = 256,
    greedy: bool = True,
    seed: int = 0,
    return_completions: bool = False,
) -> dict[str, Any]:
    """Held-out accuracy of a model on task prompts, sampled and greedy.

    Args:
        prompts: a dataset with a ``prompt`` column, prompt strings, or ``ArithmeticProblem`` s (answers and reference
            steps are recovered from the prompt text).
        temperature, num_samples: sampled accuracy averages over ``num_samples`` completions per prompt.
        max_new_tokens: default: enough for the longest reference chain among the prompts, with margin.
        batch_size: sequences per ``generate`` call.
        greedy: also decode greedily (one completion per prompt).
        seed: seeds the sampling (the global torch RNG state is restored afterwards).
        return_completions: include the completions (``[P][num_samples]`` and ``[P]``).

    Returns:
        ``sampled_accuracy`` (mean answer reward over all samples), ``sampled_all_steps_correct`` (fraction of
        samples whose whole chain is the reference chain), ``per_prompt_sampled_accuracy`` (``[P]``), and, if
        ``greedy``, ``greedy_accuracy`` / ``greedy_all_steps_correct``; plus ``num_prompts``, ``num_samples``,
        ``temperature``.
    """
    texts = _as_prompts(prompts)
    problems = [problem_from_prompt(p) for p in texts]
    if max_new_tokens is None:
        max_new_tokens = TaskConfig(num_operands=(2, max(len(p.operands) for p in problems))).max_completion_tokens
    answers = [str(p.answer) for p in problems]

    def score(completions: list[list[str]]) -> tuple[list[float], float]:
        per_prompt, all_steps = [], 0
        for problem, answer, comps in zip(problems, answers, completions):
            rewards = answer_reward(comps, [answer] * len(comps))
            per_prompt.append(sum(rewards) / len(rewards))
            all_steps += sum(all_steps_correct(problem, c) for c in comps)
        return per_prompt, all_steps / sum(len(c) for c in completions)

    result: dict[str, Any] = {"num_prompts": len(texts), "num_samples": num_samples, "temperature": temperature}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        sampled = generate_completions(
            model, tokenizer, texts, temperature, num_samples, max_new_tokens, batch_size, greedy=False
        )
    per_prompt, all_steps = score(sampled)
    result.update(
        sampled_accuracy=sum(per_prompt) / len(per_prompt),
        sampled_all_steps_correct=all_steps,
        per_prompt_sampled_accuracy=per_prompt,
    )
    if return_completions:
        result["sampled_completions"] = sampled
    if greedy:
        greedy_out = generate_completions(model, tokenizer, texts, 1.0, 1, max_new_tokens, batch_size, greedy=True)
        per_prompt_greedy, all_steps_greedy = score(greedy_out)
        result.update(
            greedy_accuracy=sum(per_prompt_greedy) / len(per_prompt_greedy), greedy_all_steps_correct=all_steps_greedy
        )
        if return_completions:
            result["greedy_completions"] = [c[0] for c in greedy_out]
    return result
