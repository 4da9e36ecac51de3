"""The embedded demo: PRIME (LoRA policy + LoRA implicit PRM on one frozen base) on the arithmetic task, CPU.

``run_demo`` (what ``prime-trl demo`` / ``make demo`` runs) loads the cached noisy-teacher warm start
(``prime_trl.demo.warmstart``), trains it with `PRIMETrainer` for a few minutes, evaluates held-out accuracy every
few steps, and writes to ``output_dir``:

- the policy adapter at the root and the PRM adapter in ``prm/`` (``trainer.save_model``), plus the warm-started
  base model in ``base/`` so the directory is self-contained;
- ``demo.png``: training reward, held-out accuracy and PRM accuracy over steps;
- ``results.json``: the numbers of the final table and every curve.

The pieces (``RLSettings``, ``make_trainer``, ``train_and_evaluate``, the callbacks) are shared with
``benchmarks/learning.py``, which runs the same loop for PRIME, outcome-only RLOO and TRL's GRPO.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from tqdm.auto import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback
from trl import GRPOConfig, GRPOTrainer

from prime_trl.algo.settings import prime_field
from prime_trl.demo.metrics import process_metrics
from prime_trl.demo.model import DemoModelConfig
from prime_trl.demo.task import TaskConfig, answer_reward, make_splits, problem_from_prompt
from prime_trl.demo.warmstart import (
    DEFAULT_SFT,
    HARD_SFT,
    SPARSE_SFT,
    SYSTEMATIC_SFT,
    SFTConfig,
    evaluate_accuracy,
    get_warm_start,
)
from prime_trl.trainer.prime_config import PRIMEConfig
from prime_trl.trainer.prime_trainer import PRIMETrainer

logger = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_STEPS",
    "DEMO_SETTINGS",
    "DEMO_TASKS",
    "DemoTask",
    "METHODS",
    "HeldOutEvaluator",
    "RLSettings",
    "format_table",
    "make_trainer",
    "plot_run",
    "run_demo",
    "train_and_evaluate",
]

METHODS = ("prime", "rloo", "grpo")
DEFAULT_STEPS = 160
EVAL_SEED = 1234  # every evaluation point samples with the same seed: curves differ by the model, not the draw

# The quick smoke run: an easy task (2-3 operands, additions only) and a deliberately small warm start that
# reaches ~15% accuracy in a few seconds, in a temporary cache; enough mixed groups for the PRM to train.
_QUICK_TASK = TaskConfig(num_operands=(2, 3), operand_range=(1, 9), operators="+")
_QUICK_MODEL = DemoModelConfig(hidden_size=48, num_layers=2, num_heads=2, num_kv_heads=1, intermediate_size=96)
_QUICK_SFT = SFTConfig(num_steps=200, batch_size=32, warmup_steps=10, learning_rate=1e-2)
_TUNED = "a tiny model from scratch learns at much larger rates; chosen on the demo task's validation split"


# --------------------------------------------------------------------------------------------------------------
# Settings and trainers
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RLSettings:
    """Hyper-parameters of one RL run on the demo task (chosen on the validation split, see BENCHMARKS.md).

    The defaults are PRIME's settings chosen on the default task's validation split (``DEMO_SETTINGS``). The PRIME
    knobs (``learning_rate``, ``prm_learning_rate``, ``prime_beta``, ``num_generations``, ``prm_update``,
    ``prm_loss_type``, ``process_reward_norm``) are declared by `prime_field` from `PRIMESettings`: same meaning and
    help text; a default that differs says why.

    Attributes:
        method: ``"prime"`` (PRIMETrainer), ``"rloo"`` (the same trainer, outcome-only: ``process_reward_coef=0``,
            ``prm_update="none"``, so no PRM forward at all) or ``"grpo"`` (TRL's stock `GRPOTrainer`).
        prompts_per_step: prompts per optimizer step; the batch is ``prompts_per_step * num_generations``.
        lora_r, lora_alpha: LoRA shape of the policy (and of the PRM, which copies it).
        temperature: sampling temperature of training (and of the sampled held-out accuracy).

    The policy learning rate uses a constant schedule (so the early part of a curve does not depend on how long the
    run is); the PRM knobs are ignored by rloo / grpo. ``accuracy_lower_bound`` applies to
    prime and rloo (the accuracy filter is shared); at 0 all-wrong groups are kept.
    """

    method: str = "prime"
    learning_rate: float = prime_field("learning_rate", 3e-4, why=_TUNED)
    prm_learning_rate: float = prime_field("prm_learning_rate", 3e-3, why=_TUNED)
    prime_beta: float = prime_field("prime_beta")
    num_generations: int = prime_field("num_generations")
    prompts_per_step: int = 8
    lora_r: int = 16
    lora_alpha: int = 32
    temperature: float = 1.0
    prm_update: str = prime_field("prm_update")
    prm_loss_type: str = prime_field("prm_loss_type")
    process_reward_norm: str = prime_field("process_reward_norm")
    process_reward_coef: float = prime_field("process_reward_coef")
    process_reward_accuracy_gate: float | None = prime_field("process_reward_accuracy_gate")
    accuracy_lower_bound: float = prime_field("accuracy_lower_bound")
    prm_pretrain_batches: int = 0  # PRIMEConfig.prm_pretrain_batches (a TRL-trainer field, not in PRIMESettings)

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# PRIME's settings as chosen on each task's validation split by benchmarks/learning.py (BENCHMARKS.md).
DEMO_SETTINGS = {
    "default": RLSettings(learning_rate=3e-4, prm_learning_rate=3e-3, prime_beta=0.05),
    "hard": RLSettings(learning_rate=3e-4, prm_learning_rate=3e-3, prime_beta=0.2),
}


@dataclass(frozen=True)
class DemoTask:
    """A named variant of the demo task (``prime-trl demo --task <name>``): the problems, the warm start that
    starts RL on them, and PRIME's settings for it.

    Attributes:
        task: what problems look like. sft: the noisy-teacher warm start. settings: PRIME's RL settings.
        description: one line for ``--help`` and the logs.
    """

    task: TaskConfig
    sft: SFTConfig
    settings: RLSettings
    description: str


# The regimes of the learning benchmark (BENCHMARKS.md, one section each). "sparse" and "systematic" reuse the
# default task's validated RL settings (they were not re-tuned on their own validation split).
DEMO_TASKS: dict[str, DemoTask] = {
    "default": DemoTask(TaskConfig(), DEFAULT_SFT, DEMO_SETTINGS["default"], "3-4 operands, random teacher noise"),
    "hard": DemoTask(TaskConfig.hard(), HARD_SFT, DEMO_SETTINGS["hard"], "5-6 operands, random teacher noise"),
    "sparse": DemoTask(
        TaskConfig.sparse(), SPARSE_SFT, DEMO_SETTINGS["default"], "8-step chains, warm start right on ~9% of samples"
    ),
    "systematic": DemoTask(
        TaskConfig(), SYSTEMATIC_SFT, DEMO_SETTINGS["default"], "3-4 operands, teacher errs on '*' steps only"
    ),
}


def make_trainer(
    settings: RLSettings,
    model_path: str | Path,
    tokenizer: PreTrainedTokenizerBase,
    train_dataset: Any,
    task: TaskConfig,
    steps: int,
    seed: int,
    output_dir: str | Path,
    callbacks: Sequence[TrainerCallback] = (),
) -> GRPOTrainer:
    """A trainer for ``settings.method`` on the warm start at ``model_path`` (CPU, float32, LoRA policy).

    All three methods share everything that is not the method itself: model, LoRA shape, learning rate and
    schedule, prompts per step, K, completion length, temperature, seed (so the same prompts in the same order),
    and TRL's clipped loss with ``loss_type="grpo"``.
    """
    common: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=settings.prompts_per_step * settings.num_generations,
        num_generations=settings.num_generations,
        max_completion_length=task.max_completion_tokens,
        temperature=settings.temperature,
        learning_rate=settings.learning_rate,
        lr_scheduler_type="constant",
        max_steps=steps,
        loss_type="grpo",
        disable_dropout=True,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,  # our own progress bar (TRL's would print every log line)
        seed=seed,
        data_seed=seed,
    )
    lora = LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0, target_modules="all-linear")
    kwargs = dict(
        reward_funcs=answer_reward,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=list(callbacks),
    )
    if settings.method == "grpo":
        trainer: GRPOTrainer = GRPOTrainer(str(model_path), args=GRPOConfig(**common), **kwargs)
    else:
        prime = dict(
            prime_beta=settings.prime_beta,
            prm_learning_rate=settings.prm_learning_rate,
            prm_update=settings.prm_update,
            prm_loss_type=settings.prm_loss_type,
            process_reward_norm=settings.process_reward_norm,
            process_reward_coef=settings.process_reward_coef,
            process_reward_accuracy_gate=settings.process_reward_accuracy_gate,
            prm_pretrain_batches=settings.prm_pretrain_batches,
            accuracy_lower_bound=settings.accuracy_lower_bound,
        )
        if settings.method == "rloo":  # no PRM at all; the accuracy filter is shared
            prime.update(
                process_reward_coef=0.0, prm_update="none", process_reward_accuracy_gate=None, prm_pretrain_batches=0
            )
        trainer = PRIMETrainer(str(model_path), args=PRIMEConfig(**common, **prime), **kwargs)
    # disable_tqdm=True makes Trainer print every log dict; the progress bar callback replaces both.
    trainer.remove_callback(PrinterCallback)
    trainer.remove_callback(ProgressCallback)
    return trainer


# --------------------------------------------------------------------------------------------------------------
# Callbacks: held-out evaluation and a progress bar
# --------------------------------------------------------------------------------------------------------------


def evaluate_point(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    num_samples: int,
    greedy: bool = True,
    prm_adapter: str | None = None,
    prime_beta: float = 0.05,
    seed: int = EVAL_SEED,
    process_prompts: int | None = None,
    keep_samples: bool = False,
) -> dict[str, Any]:
    """Held-out figures of ``model`` (its active adapter) on ``prompts``: sampled accuracy at T=1 (mean over
    ``num_samples`` per prompt), greedy accuracy, all-steps-correct fractions and, with ``prm_adapter``, the
    held-out PRM accuracy and step localisation on the sampled completions of the first ``process_prompts``
    prompts (default all; scoring costs two forward passes per completion, as much as sampling them).
    ``keep_samples`` adds ``samples``: ``(prompts, completions, rewards)`` of those first prompts."""
    start = time.perf_counter()
    result = evaluate_accuracy(
        model, tokenizer, list(prompts), 1.0, num_samples, greedy=greedy, seed=seed, return_completions=True
    )
    completions = result.pop("sampled_completions")
    result.pop("greedy_completions", None)
    result.pop("per_prompt_sampled_accuracy")
    if prm_adapter is not None or keep_samples:
        subset = list(prompts)[:process_prompts] if process_prompts else list(prompts)
        completions = completions[: len(subset)]
        answers = [str(problem_from_prompt(p).answer) for p in subset]
        rewards = [answer_reward(comps, [a] * len(comps)) for comps, a in zip(completions, answers)]
        if prm_adapter is not None:
            result.update(process_metrics(model, tokenizer, subset, completions, rewards, prm_adapter, prime_beta))
            result["process_prompts"] = len(subset)
        if keep_samples:
            result["samples"] = (subset, completions, rewards)
    result["seconds"] = time.perf_counter() - start
    return result


class HeldOutEvaluator(TrainerCallback):
    """Evaluates the policy on a fixed held-out prompt set before training and every ``every`` steps (and at the
    last step); ``history`` holds one dict per point (``step`` plus `evaluate_point`'s figures). The PRM figures
    use the first ``process_prompts`` prompts (``None``: all).

    With ``score_fixed_set``, every point also scores the PRM on the *same* completions - the ones sampled
    before training (the warm start's) - under ``*_fixed`` keys: that separates how good the PRM is from how
    hard the current policy's own mistakes are to localise.

    Call ``attach(trainer)`` after building the trainer: the callback needs the live model and its PRM adapter.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        prompts: Sequence[str],
        every: int,
        num_samples: int = 4,
        greedy: bool = True,
        seed: int = EVAL_SEED,
        process_prompts: int | None = 200,
        score_fixed_set: bool = False,
    ):
        self.tokenizer = tokenizer
        self.process_prompts = process_prompts
        self.score_fixed_set = score_fixed_set
        self.fixed_samples: tuple[list[str], list[list[str]], list[list[float]]] | None = None
        self.prompts = list(prompts)
        self.every = max(1, every)
        self.num_samples = num_samples
        self.greedy = greedy
        self.seed = seed
        self.history: list[dict[str, Any]] = []
        self.trainer: GRPOTrainer | None = None

    def attach(self, trainer: GRPOTrainer) -> None:
        self.trainer = trainer

    def _prm_adapter(self) -> str | None:
        """The PRM adapter to score with: only a PRIME run that trains its PRM has one worth scoring, and only when
        the PRM sits on the policy's own base (LoRA policy), which is the model this callback evaluates."""
        trainer = self.trainer
        if not isinstance(trainer, PRIMETrainer) or trainer.args.prm_update == "none":
            return None
        return trainer.args.prm_adapter_name if trainer.prm.model is trainer.model else None

    def evaluate(self, step: int) -> dict[str, Any]:
        point: dict[str, Any] = {"step": step}
        adapter, beta = self._prm_adapter(), getattr(self.trainer.args, "prime_beta", 0.05)
        keep = self.score_fixed_set and self.fixed_samples is None
        point.update(
            evaluate_point(
                self.trainer.model,
                self.tokenizer,
                self.prompts,
                self.num_samples,
                self.greedy,
                adapter,
                beta,
                self.seed,
                self.process_prompts,
                keep_samples=keep,
            )
        )
        if keep:
            self.fixed_samples = point.pop("samples")
        if self.score_fixed_set and adapter is not None:
            fixed = process_metrics(self.trainer.model, self.tokenizer, *self.fixed_samples, adapter, beta)
            point.update({f"{key}_fixed": value for key, value in fixed.items()})
        self.history.append(point)
        logger.info("held-out @%d: %s", step, {k: v for k, v in point.items() if isinstance(v, float)})
        return point

    def on_train_begin(self, args, state, control, **kwargs):
        if not self.history:
            self.evaluate(state.global_step)

    def on_step_end(self, args, state, control, **kwargs):
        step = state.global_step
        if step % self.every == 0 or step == state.max_steps:
            self.evaluate(step)


class ProgressBar(TrainerCallback):
    """A tqdm bar over optimizer steps with the latest training reward, PRM accuracy and held-out accuracy."""

    def __init__(self, evaluator: HeldOutEvaluator | None = None, desc: str = "PRIME", disable: bool = False):
        self.evaluator = evaluator
        self.desc = desc
        self.disable = disable
        self.bar: tqdm | None = None
        self.postfix: dict[str, str] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        self.bar = tqdm(total=state.max_steps, desc=self.desc, disable=self.disable, mininterval=1.0)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        if "reward" in logs:
            self.postfix["reward"] = f"{logs['reward']:.2f}"
        if "prm/accuracy" in logs:
            self.postfix["prm_acc"] = f"{logs['prm/accuracy']:.2f}"

    def on_step_end(self, args, state, control, **kwargs):
        if self.evaluator is not None and self.evaluator.history:
            self.postfix["held_out"] = f"{self.evaluator.history[-1]['sampled_accuracy']:.1%}"
        if self.bar is not None:
            self.bar.set_postfix(self.postfix, refresh=False)
            self.bar.update(state.global_step - self.bar.n)

    def on_train_end(self, args, state, control, **kwargs):
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------------------------
# One run: train and evaluate
# --------------------------------------------------------------------------------------------------------------


def _train_log(trainer: GRPOTrainer) -> list[dict[str, float]]:
    """Per-step training figures from ``trainer.state.log_history`` (logging every step)."""
    keys = ("reward", "prm/accuracy", "prm/loss", "filter/pass_rate", "completions/mean_length", "step_time")
    rows = []
    for entry in trainer.state.log_history:
        if "reward" in entry and "step" in entry:
            rows.append({"step": entry["step"], **{k: float(entry[k]) for k in keys if k in entry}})
    return rows


def train_and_evaluate(
    settings: RLSettings,
    model_path: str | Path,
    task: TaskConfig,
    train_dataset: Any,
    eval_prompts: Sequence[str],
    steps: int,
    seed: int,
    output_dir: str | Path,
    eval_every: int,
    eval_samples: int = 4,
    greedy: bool = True,
    progress: bool = True,
    desc: str | None = None,
    score_fixed_set: bool = False,
) -> tuple[GRPOTrainer, dict[str, Any]]:
    """Train one run and evaluate it on ``eval_prompts`` every ``eval_every`` steps (and before and at the end).
    ``score_fixed_set``: see `HeldOutEvaluator`.

    Returns:
        ``(trainer, record)``; ``record`` has ``settings``, ``seed``, ``steps``, ``train`` (per-step log),
        ``eval`` (the held-out points), ``train_seconds`` (wall time of ``train()``, evaluations included) and
        ``eval_seconds`` (the evaluations' share of it).
    """
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    evaluator = HeldOutEvaluator(
        tokenizer, eval_prompts, eval_every, eval_samples, greedy, score_fixed_set=score_fixed_set
    )
    bar = ProgressBar(evaluator, desc=desc or settings.method, disable=not progress)
    trainer = make_trainer(
        settings, model_path, tokenizer, train_dataset, task, steps, seed, output_dir, [evaluator, bar]
    )
    evaluator.attach(trainer)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    record = {
        "settings": settings.to_dict(),
        "seed": seed,
        "steps": steps,
        "train": _train_log(trainer),
        "eval": evaluator.history,
        "train_seconds": seconds,
        "eval_seconds": sum(point["seconds"] for point in evaluator.history),
    }
    return trainer, record


# --------------------------------------------------------------------------------------------------------------
# Reporting: table and plot
# --------------------------------------------------------------------------------------------------------------


def _mean_tail(rows: Sequence[dict[str, float]], key: str, fraction: float = 0.2) -> float | None:
    """Mean of ``key`` over the last ``fraction`` of the rows that have it (a less noisy "final" training value)."""
    values = [row[key] for row in rows if key in row]
    if not values:
        return None
    tail = values[-max(1, math.ceil(len(values) * fraction)) :]
    return sum(tail) / len(tail)


def format_table(results: dict[str, Any]) -> str:
    """The demo's final table: held-out accuracy before / after, PRM accuracy, steps and time."""
    before, after = results["before"], results["after"]

    def pct(value: float | None) -> str:
        return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"

    lines = [
        f"{'':34s}{'before':>10s}{'after':>10s}",
        f"{'held-out accuracy, sampled T=1':34s}{pct(before['sampled_accuracy']):>10s}{pct(after['sampled_accuracy']):>10s}",
        f"{'held-out accuracy, greedy':34s}{pct(before.get('greedy_accuracy')):>10s}{pct(after.get('greedy_accuracy')):>10s}",
        f"{'all steps right (sampled)':34s}{pct(before['sampled_all_steps_correct']):>10s}"
        f"{pct(after['sampled_all_steps_correct']):>10s}",
        f"{'PRM pairwise accuracy, held-out':34s}{pct(before.get('prm_accuracy')):>10s}{pct(after.get('prm_accuracy')):>10s}",
        f"{'PRM pairwise accuracy, training':34s}{'':>10s}{pct(results.get('prm_accuracy_train')):>10s}",
        f"{'first wrong step = lowest reward':34s}{pct(before.get('localisation')):>10s}"
        f"{pct(after.get('localisation')):>10s}   (chance {pct(after.get('localisation_chance'))})",
        f"steps {results['steps']}, {results['num_eval_prompts']} held-out prompts x {results['eval_samples']} "
        f"samples, time {results['seconds']['total'] / 60:.1f} min "
        f"(training {results['seconds']['train'] / 60:.1f} min incl. evaluation {results['seconds']['eval'] / 60:.1f} min)",
    ]
    return "\n".join(lines)


def _rolling(values: Sequence[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def plot_run(record: dict[str, Any], path: str | Path, title: str = "PRIME on the demo task") -> Path | None:
    """Three panels over steps: training reward, held-out accuracy (sampled and greedy), PRM pairwise accuracy
    (training batches and held-out) with step localisation. Returns ``path``, or ``None`` without matplotlib
    (``pip install prime-trl[plot]``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed; skipping the plot (pip install 'prime-trl[plot]').")
        return None
    train, evals = record["train"], record["eval"]
    window = max(1, len(train) // 20)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))

    steps = [row["step"] for row in train]
    rewards = [row["reward"] for row in train]
    axes[0].plot(steps, rewards, alpha=0.3, color="C0", label="per step")
    axes[0].plot(steps, _rolling(rewards, window), color="C0", label=f"mean of {window}")
    axes[0].set(title="training reward (answer right)", xlabel="step", ylim=(0, 1))
    axes[0].legend()

    eval_steps = [p["step"] for p in evals]
    axes[1].plot(eval_steps, [p["sampled_accuracy"] for p in evals], "o-", label="sampled, T=1")
    if all("greedy_accuracy" in p for p in evals):
        axes[1].plot(eval_steps, [p["greedy_accuracy"] for p in evals], "s-", label="greedy")
    axes[1].plot(eval_steps, [p["sampled_all_steps_correct"] for p in evals], "^--", label="all steps right (T=1)")
    axes[1].set(title="held-out accuracy", xlabel="step", ylim=(0, 1))
    axes[1].legend()

    prm_rows = [row for row in train if "prm/accuracy" in row]
    if prm_rows:
        prm_values = [row["prm/accuracy"] for row in prm_rows]
        axes[2].plot([r["step"] for r in prm_rows], prm_values, alpha=0.3, color="C2")
        axes[2].plot(
            [r["step"] for r in prm_rows], _rolling(prm_values, window), color="C2", label="PRM acc., training batches"
        )
    held_out = [p for p in evals if "prm_accuracy" in p]
    if held_out:
        axes[2].plot(
            [p["step"] for p in held_out],
            [p["prm_accuracy"] for p in held_out],
            "o-",
            color="C3",
            label="PRM acc., held-out",
        )
    localised = [p for p in evals if "localisation" in p]
    if localised:
        steps_l = [p["step"] for p in localised]
        axes[2].plot(steps_l, [p["localisation"] for p in localised], "s-", color="C4", label="first wrong step found")
        axes[2].plot(steps_l, [p["localisation_chance"] for p in localised], ":", color="C4", label="... by chance")
    axes[2].axhline(0.5, color="grey", lw=0.8, ls=":")
    axes[2].set(title="implicit PRM: pairwise accuracy, localisation", xlabel="step", ylim=(0, 1))
    if prm_rows or held_out:
        axes[2].legend(fontsize=8)

    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# --------------------------------------------------------------------------------------------------------------
# The demo
# --------------------------------------------------------------------------------------------------------------


@dataclass
class _DemoPlan:
    """What a demo run does (the full demo, or the quick smoke run)."""

    steps: int
    eval_every: int
    eval_prompts: int
    eval_samples: int
    model_config: DemoModelConfig = field(default_factory=DemoModelConfig)
    sft_config: SFTConfig | None = None


def _plan(steps: int, quick: bool, eval_every: int | None, eval_prompts: int | None, eval_samples: int | None):
    if quick:
        plan = _DemoPlan(steps=steps, eval_every=2, eval_prompts=32, eval_samples=4, model_config=_QUICK_MODEL)
        plan.sft_config = _QUICK_SFT
    else:
        plan = _DemoPlan(steps=steps, eval_every=max(1, steps // 8), eval_prompts=500, eval_samples=4)
    return replace(
        plan,
        eval_every=eval_every or plan.eval_every,
        eval_prompts=eval_prompts or plan.eval_prompts,
        eval_samples=eval_samples or plan.eval_samples,
    )


def run_demo(
    steps: int | None = None,
    seed: int = 0,
    output_dir: str = "prime-demo",
    quick: bool = False,
    hard: bool = False,
    task: str = "default",
    settings: RLSettings | None = None,
    eval_every: int | None = None,
    eval_prompts: int | None = None,
    eval_samples: int | None = None,
    cache_dir: str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Run PRIME on the demo task and report what it learned.

    Args:
        steps: optimizer steps (default ``DEFAULT_STEPS``; 4 with ``quick``).
        seed: seed of the warm start (built and cached on first use; seed 0 usually is already), of the prompt
            order and of training.
        output_dir: where the adapters (policy at the root, PRM in ``prm/``), the base model (``base/``),
            ``demo.png`` and ``results.json`` go.
        quick: a smoke run (seconds): an easy task (2-3 operand additions) with a tiny warm start built in a
            temporary cache, a few steps, a small evaluation. Ignores ``hard``.
        hard: the hard task variant (5-6 operands) and its warm start; the same as ``task="hard"``.
        task: a name in ``DEMO_TASKS`` (default, hard, sparse, systematic): the problems and their warm start.
        settings: RL hyper-parameters (default ``DEMO_TASKS[task].settings``: PRIME as tuned on the validation split
            by ``benchmarks/learning.py``).
        eval_every, eval_prompts, eval_samples: held-out evaluation every N steps on the first ``eval_prompts``
            test prompts with ``eval_samples`` samples each (defaults: steps/8, all 500, 4).
        cache_dir: warm-start cache root (default ``$PRIME_TRL_CACHE`` or ``~/.cache/prime_trl``).
        progress: show progress bars.

    Returns:
        The figures (also written to ``<output_dir>/results.json``): ``before`` / ``after`` held-out figures,
        ``prm_accuracy_train``, ``steps``, ``seconds``, the curves and the paths written.
    """
    total_start = time.perf_counter()
    steps = steps if steps is not None else (4 if quick else DEFAULT_STEPS)
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if task not in DEMO_TASKS:
        raise ValueError(f"task={task!r} is not a demo task; choose one of {', '.join(DEMO_TASKS)}")
    if hard and task not in ("default", "hard"):
        raise ValueError(f"hard=True and task={task!r} contradict each other; pass only task")
    task_name = "quick" if quick else "hard" if hard else task
    plan = _plan(steps, quick, eval_every, eval_prompts, eval_samples)
    if not quick:
        plan.sft_config = DEMO_TASKS[task_name].sft
    settings = settings or DEMO_TASKS["default" if quick else task_name].settings
    if settings.method != "prime":
        raise ValueError("the demo runs PRIME; benchmarks/learning.py compares it with rloo and grpo")
    task_config = _QUICK_TASK if quick else DEMO_TASKS[task_name].task
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)

    temp_cache = tempfile.mkdtemp(prefix="prime-demo-cache-") if quick and cache_dir is None else None
    try:
        model_path = get_warm_start(
            task_config,
            plan.model_config,
            plan.sft_config,
            seed=seed,
            cache_dir=temp_cache or cache_dir,
            progress=progress,
        )
        sizes = dict(n_train=300, n_validation=16, n_test=32) if quick else {}  # the quick task has ~800 problems
        splits = make_splits(0, task_config, **sizes)
        prompts = list(splits["test"]["prompt"][: plan.eval_prompts])
        logger.info("demo: %s task, %d steps, warm start %s", task_name, steps, model_path)
        with tempfile.TemporaryDirectory(prefix="prime-demo-run-") as run_dir:
            trainer, record = train_and_evaluate(
                settings,
                model_path,
                task_config,
                splits["train"],
                prompts,
                steps,
                seed,
                run_dir,
                plan.eval_every,
                plan.eval_samples,
                progress=progress,
                desc="PRIME demo",
            )
        trainer.save_model(str(out))  # policy adapter at the root, PRM adapter in prm/ (PRIMETrainer.save_model)
        base_dir = out / "base"
        if base_dir.exists():
            shutil.rmtree(base_dir)
        shutil.copytree(model_path, base_dir)  # the warm start the adapters apply to
    finally:
        if temp_cache is not None:
            shutil.rmtree(temp_cache, ignore_errors=True)

    plot_path = plot_run(record, out / "demo.png", f"PRIME on the demo task ({task_name})")
    results: dict[str, Any] = {
        "task": task_name,
        "task_config": task_config.to_dict(),
        "quick": quick,
        "seed": seed,
        "steps": steps,
        "settings": settings.to_dict(),
        "num_eval_prompts": len(prompts),
        "eval_samples": plan.eval_samples,
        "before": record["eval"][0],
        "after": record["eval"][-1],
        "prm_accuracy_train": _mean_tail(record["train"], "prm/accuracy"),
        "reward_train_final": _mean_tail(record["train"], "reward"),
        "seconds": {
            "total": time.perf_counter() - total_start,
            "train": record["train_seconds"],
            "eval": record["eval_seconds"],
        },
        "files": {
            "policy_adapter": str(out),
            "prm_adapter": str(out / "prm"),
            "base_model": str(base_dir),
            "plot": str(plot_path) if plot_path else None,
            "results": str(out / "results.json"),
        },
        "curves": {"train": record["train"], "eval": record["eval"]},
    }
    (out / "results.json").write_text(json.dumps(results, indent=2))
    print(format_table(results))
    print(f"wrote {out}/ (policy adapter), {out}/prm/ (PRM adapter), {out}/base/ (warm start), demo.png, results.json")
    return results
