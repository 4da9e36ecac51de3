"""Learning benchmark: PRIME vs outcome-only RLOO vs TRL's GRPO on the demo task, CPU.

Methods (``prime_trl.demo.run.RLSettings.method``), all from the same cached warm start, LoRA policy, with the
same prompts per step (same seed -> same prompt order), completions per prompt, completion length,
temperature, number of steps and TRL's clipped loss (``loss_type="grpo"``):

- ``prime``  `PRIMETrainer`: implicit PRM (second LoRA adapter, online CE update), RLOO on process + outcome
- ``rloo``   the same trainer with ``process_reward_coef=0, prm_update="none"``: outcome-only RLOO, no PRM pass
- ``grpo``   TRL's stock `GRPOTrainer` (default ``scale_rewards``, ``beta=0``)

Two phases per task (``default``: 3-4 operands; ``hard``: 5-6 operands, lower-noise warm start):

1. ``tune``: a small grid (``TUNE_GRID``) on the *validation* split; per method the setting with the best mean
   final sampled validation accuracy is chosen.
2. ``final``: the chosen settings on the *test* split, ``--seeds`` seeds each.

Optional extra phases (not run by default; ~25 min on 2 cores):

3. ``ablation``: outcome-only RLOO at PRIME's chosen policy learning rate (when it differs from RLOO's own), so
   that PRIME and RLOO differ only by the process reward.
4. ``diagnostic``: PRIME's final runs of the first two seeds again (same seeds, so the same training) with the
   PRM also scored, at every evaluation point, on the *fixed* completions sampled before training: that tells
   a PRM that got worse apart from policy mistakes that got harder to localise.
5. ``pilot`` (``--tasks default``): the six seed-0 validation runs that narrowed the grid (``PILOTS``, ~12 min).
6. ``knobs``: PRIME's chosen settings with one other knob changed (``KNOBS``: K, batch size, normalisation,
   double update, DPO PRM loss; the batch size also for RLOO) on the validation split with the tuning seeds
   (~30 min per task).

7. ``regime`` (issue 16; ``--regimes``, ``--seeds``): where PRIME's dense reward should pay off, each regime a
   controlled PRIME vs outcome-only RLOO comparison at the same settings (``REGIMES``): ``sparse`` /
   ``sparse_lb0`` (8-step chains, a warm start right on ~9% of samples; filter [0.2, 0.8] / lower bound 0),
   ``systematic`` (a warm start whose teacher erred on ``*`` steps only), ``prm_gate`` / ``prm_pretrain`` (remedies
   for the PRM losing to the policy on the default task, against its final / ablation runs), ``prm_pretrain_short``
   (the PRM warm-up in 40-step runs with their own PRIME and RLOO arms). Writes
   ``benchmarks/results/regime_<name>.json`` and ``.png``.

Every run is its own subprocess (``OMP_NUM_THREADS=1``, one torch thread; ``--jobs`` at a time) and writes
``benchmarks/results/learning_runs/<task>/<phase>/<name>.json``; existing files are skipped, so an interrupted
benchmark resumes where it stopped. At the end ``benchmarks/results/learning_<task>.json`` and ``.png`` are
written. Held-out evaluation (every ``--eval-every`` steps, before training and at the end, same prompts and
same sampling seed at every point): sampled accuracy at T=1 (mean over ``--eval-samples`` per prompt; the
headline), greedy accuracy, all-steps-correct fractions, and for PRIME the held-out PRM pairwise accuracy and
step localisation (``prime_trl.demo.metrics``).

    python benchmarks/learning.py                                  # tune + final, both tasks, 2 jobs
    python benchmarks/learning.py --tasks default --phases final --seeds 0 1 2 3
    python benchmarks/learning.py --phases ablation diagnostic     # the optional extra phases
    python benchmarks/learning.py --tasks default --phases pilot    # the pilots that narrowed the grid
    python benchmarks/learning.py --aggregate-only                 # rebuild the JSON / PNG from run files
    python benchmarks/learning.py --phases regime --regimes sparse_lb0 systematic --seeds 0 1 2 --jobs 1
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

RESULTS = REPO / "benchmarks" / "results"
RUNS = RESULTS / "learning_runs"
TASK_NAMES = ("default", "hard")  # the tuned tasks; the other demo tasks are regimes (REGIMES)
METHOD_ORDER = ("prime", "rloo", "grpo")

logger = logging.getLogger("learning")

# Steps / evaluation shared by every run of a phase (the CLI can override them; they are part of the run key).
DEFAULTS = dict(steps=160, eval_every=20, eval_prompts=500, eval_samples=4)
TUNE_DEFAULTS = dict(steps=160, eval_every=80, eval_prompts=300, eval_samples=4)

# The validation grid: (method, RLSettings overrides). Fields not listed keep RLSettings' defaults (K=4, 8 prompts
# per step, LoRA r=16 / alpha=32, T=1, beta 0.05). Pilots (seed 0, validation) narrowed it: a policy lr of 1e-3
# learns in ~25 steps but degrades greedy accuracy; a PRM lr of 1e-2 makes the PRM anti-learn (held-out pairwise
# accuracy < 0.5) even with the policy frozen, while 3e-3 reaches ~0.87 in 50 steps with the policy frozen.
TUNE_GRID: list[tuple[str, dict[str, float]]] = [
    *[(m, {"learning_rate": lr}) for m in ("rloo", "grpo") for lr in (3e-4, 1e-3)],
    ("prime", {"learning_rate": 3e-4, "prm_learning_rate": 1e-3}),
    ("prime", {"learning_rate": 3e-4, "prm_learning_rate": 3e-3}),
    ("prime", {"learning_rate": 1e-3, "prm_learning_rate": 3e-3}),
    ("prime", {"learning_rate": 3e-4, "prm_learning_rate": 3e-3, "prime_beta": 0.2}),
]
TUNE_SEEDS = (100, 101)  # validation runs use their own seeds, disjoint from the final ones

# PRIME's other knobs, each changed alone from a method's chosen settings (``--phases knobs``; validation split, the
# tuning seeds and shape, so each row compares directly with the tuning table). K=8 keeps the batch at 32 rows; the
# larger batch is also run for outcome-only RLOO, so that a gain from the batch alone is not read as PRIME's.
KNOBS: list[tuple[str, dict[str, Any]]] = [
    ("prime", {"num_generations": 8, "prompts_per_step": 4}),
    ("prime", {"prompts_per_step": 16}),
    ("rloo", {"prompts_per_step": 16}),
    ("prime", {"process_reward_norm": "none"}),
    ("prime", {"prm_update": "double"}),
    ("prime", {"prm_loss_type": "dpo"}),
]

# The pilots that narrowed the grid (default task, validation, seed 0; ``--phases pilot``). A policy lr of 1e-7
# keeps the policy (nearly) frozen, to see how the PRM learns on a fixed sample distribution.
PILOT_SHAPE = dict(eval_every=25, eval_prompts=300, eval_samples=4)
PILOTS: list[tuple[str, dict[str, float], int]] = [
    ("prime", {"learning_rate": 1e-3, "prm_learning_rate": 1e-3}, 200),
    ("rloo", {"learning_rate": 1e-3}, 200),
    ("prime", {"learning_rate": 3e-4, "prm_learning_rate": 1e-2}, 200),
    ("rloo", {"learning_rate": 3e-4}, 200),
    ("prime", {"learning_rate": 1e-7, "prm_learning_rate": 1e-2}, 100),
    ("prime", {"learning_rate": 1e-7, "prm_learning_rate": 3e-3}, 100),
]


# Regimes where PRIME's dense reward should pay off (issue 16; ``--phases regime``). Each is a controlled comparison
# of PRIME with outcome-only RLOO at the *same* settings - the default task's validated PRIME settings, policy lr
# 3e-4 for both methods (RLOO's own validation optimum on the default task, 1e-3, ended 0.5 points higher there)
# - not re-tuned per regime (CPU budget). Arms labelled "prime" and "rloo" give the verdict; other arms are shown
# beside them. An arm may name an existing phase ("final", "ablation") to reuse those runs as its baseline.
REGIME_BASE = {"learning_rate": 3e-4, "prm_learning_rate": 3e-3}


@dataclass(frozen=True)
class Arm:
    label: str
    method: str
    overrides: dict[str, Any] = field(default_factory=dict)
    phase: str = "regime"


@dataclass(frozen=True)
class Regime:
    """One comparison: a demo task, its arms, the run shape (steps / evaluation) and what it tests."""

    task: str
    arms: tuple[Arm, ...]
    shape: dict[str, int]
    question: str


# Reduced shapes (2 shared CPU cores): an 8-step chain costs ~2-3x a default-task step to generate and score.
_SPARSE_SHAPE = dict(steps=30, eval_every=15, eval_prompts=100, eval_samples=4)
_SHORT_SHAPE = dict(steps=40, eval_every=20, eval_prompts=150, eval_samples=4)  # default-task-length chains
# The default task's final shape with fewer evaluations: evaluation never touches the training RNG, so these runs
# train exactly as the final phase's and compare with them at the shared evaluation steps.
_REMEDY_SHAPE = dict(steps=160, eval_every=40, eval_prompts=500, eval_samples=4)
_DEFAULT_BASELINES = (
    Arm("prime_plain", "prime", phase="final"),
    Arm("rloo", "rloo", {}, phase="ablation"),
)
REGIMES: dict[str, Regime] = {
    "sparse": Regime(
        "sparse",
        (Arm("prime", "prime"), Arm("rloo", "rloo")),
        _SPARSE_SHAPE,
        "8-step chains, a warm start aimed at 5-15% right samples (measured below); accuracy filter [0.2, 0.8] as in the paper",
    ),
    "sparse_lb0": Regime(
        "sparse",
        (Arm("prime", "prime", {"accuracy_lower_bound": 0.0}), Arm("rloo", "rloo", {"accuracy_lower_bound": 0.0})),
        _SPARSE_SHAPE,
        "the sparse task with the filter's lower bound at 0: all-wrong groups reach PRIME's PRM and advantages",
    ),
    "systematic": Regime(
        "systematic",
        (Arm("prime", "prime"), Arm("rloo", "rloo")),
        _SHORT_SHAPE,
        "default task, a warm start whose teacher erred on '*' steps only (half of them), never on '+' / '-'",
    ),
    "prm_gate": Regime(
        "default",
        (Arm("prime", "prime", {"process_reward_accuracy_gate": 0.7}), *_DEFAULT_BASELINES),
        _REMEDY_SHAPE,
        "the PRM losing to the policy: process reward gated by the training-batch PRM accuracy (gate 0.7)",
    ),
    "prm_pretrain": Regime(
        "default",
        (Arm("prime", "prime", {"prm_pretrain_batches": 4}), *_DEFAULT_BASELINES),
        _REMEDY_SHAPE,
        "the PRM losing to the policy: 4 PRM warm-up batches before the policy's first update",
    ),
    # Self-contained (its own plain-PRIME and RLOO runs from the same warm start), so it does not lean on the final
    # phase's runs: a warm start rebuilt elsewhere need not match theirs bit for bit.
    "prm_pretrain_short": Regime(
        "default",
        (
            Arm("prime", "prime", {"prm_pretrain_batches": 4}),
            Arm("prime_plain", "prime"),
            Arm("rloo", "rloo"),
        ),
        _SHORT_SHAPE,
        "4 PRM warm-up batches before the policy's first update, 40-step runs with their own PRIME and RLOO baselines",
    ),
}


def regime_specs(name: str, seeds: Sequence[int], arms: Sequence[str] | None = None) -> dict[str, list]:
    """Per arm label, the run specs of regime ``name`` (baseline arms in their own phase and shape)."""
    regime = REGIMES[name]
    specs = {}
    for arm in regime.arms:
        if arms is not None and arm.label not in arms:
            continue
        settings = {**REGIME_BASE, **arm.overrides}
        if arm.method != "prime":
            settings.pop("prm_learning_rate")
        if arm.phase == "regime":
            shape = regime.shape
        else:  # the existing runs of that phase: their settings and shape exactly
            settings = {k: v for k, v in settings.items() if k in ("learning_rate", "prm_learning_rate")}
            shape = DEFAULTS
        specs[arm.label] = [RunSpec(regime.task, arm.phase, arm.method, s, settings, **shape) for s in seeds]
    return specs


# --------------------------------------------------------------------------------------------------------------
# One run
# --------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RunSpec:
    """Everything that determines one run (its file name hashes all of it)."""

    # ``settings`` holds overrides of RLSettings' defaults, and only they enter the file name: a change of those
    # defaults must not be made without re-running (or spelling out the field in every grid entry).
    task: str
    phase: str  # "tune" (and pilots) evaluate on the validation split; "final", "ablation", "diagnostic" on test
    method: str
    seed: int
    settings: dict[str, Any] = field(default_factory=dict)  # RLSettings overrides
    steps: int = DEFAULTS["steps"]
    eval_every: int = DEFAULTS["eval_every"]
    eval_prompts: int = DEFAULTS["eval_prompts"]
    eval_samples: int = DEFAULTS["eval_samples"]

    @property
    def split(self) -> str:
        return "validation" if self.phase in ("tune", "pilot") else "test"

    def key(self) -> str:
        payload = json.dumps(asdict(self), sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:10]

    @property
    def path(self) -> Path:
        return RUNS / self.task / self.phase / f"{self.method}-seed{self.seed}-{self.key()}.json"

    def label(self) -> str:
        extras = ",".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(self.settings.items())
        )
        return f"{self.task}/{self.phase}/{self.method}[{extras}] seed {self.seed}"


def task_config(name: str):
    """The demo task's problems (``prime_trl.demo.run.DEMO_TASKS``: default, hard, sparse, systematic)."""
    from prime_trl.demo.run import DEMO_TASKS

    return DEMO_TASKS[name].task


def run_one(spec: RunSpec) -> dict[str, Any]:
    """Train and evaluate one run in this process; returns its record (also written to ``spec.path``)."""
    import torch

    torch.set_num_threads(1)
    from prime_trl.demo.run import DEMO_TASKS, RLSettings, train_and_evaluate
    from prime_trl.demo.task import make_splits
    from prime_trl.demo.warmstart import get_warm_start

    task = task_config(spec.task)
    settings = RLSettings(method=spec.method, **spec.settings)
    # one warm start per task; the RL seed varies
    model_path = get_warm_start(task, sft_config=DEMO_TASKS[spec.task].sft, seed=0, progress=False)
    splits = make_splits(0, task)
    prompts = list(splits[spec.split]["prompt"][: spec.eval_prompts])
    with tempfile.TemporaryDirectory(prefix="prime-learning-") as output_dir:
        _, record = train_and_evaluate(
            settings,
            model_path,
            task,
            splits["train"],
            prompts,
            spec.steps,
            spec.seed,
            output_dir,
            spec.eval_every,
            spec.eval_samples,
            progress=False,
            score_fixed_set=spec.phase == "diagnostic",
        )
    record.update(spec=asdict(spec), warm_start=str(model_path), finished=time.strftime("%Y-%m-%dT%H:%M:%S%z"))
    spec.path.parent.mkdir(parents=True, exist_ok=True)
    tmp = spec.path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record))
    tmp.rename(spec.path)  # a result file is always complete: its existence means "done"
    return record


def run_specs(specs: Sequence[RunSpec], jobs: int) -> list[RunSpec]:
    """Run the specs whose result file is missing, ``jobs`` subprocesses at a time (each single-threaded); returns
    the ones that failed (their log is beside where the result file would be)."""
    todo = [s for s in specs if not s.path.is_file()]
    logger.info("%d runs, %d already done, %d to run with %d jobs", len(specs), len(specs) - len(todo), len(todo), jobs)
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRL_EXPERIMENTAL_SILENCE="1")
    running: list[tuple[RunSpec, subprocess.Popen, float, Any]] = []
    queue = list(todo)
    done, failed = 0, []
    while queue or running:
        while queue and len(running) < jobs:
            spec = queue.pop(0)
            spec.path.parent.mkdir(parents=True, exist_ok=True)
            log = open(spec.path.with_suffix(".log"), "w")
            command = [sys.executable, __file__, "--worker", json.dumps(asdict(spec))]
            process = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)
            running.append((spec, process, time.time(), log))
        time.sleep(2)
        for item in list(running):
            spec, process, started, log = item
            if process.poll() is None:
                continue
            running.remove(item)
            log.close()
            done += 1
            status = "ok" if process.returncode == 0 and spec.path.is_file() else f"FAILED (rc {process.returncode})"
            logger.info("[%d/%d] %s: %s in %.0fs", done, len(todo), spec.label(), status, time.time() - started)
            if status != "ok":
                failed.append(spec)
    return failed


def load_runs(specs: Sequence[RunSpec]) -> list[dict[str, Any]]:
    return [json.loads(s.path.read_text()) for s in specs if s.path.is_file()]


# --------------------------------------------------------------------------------------------------------------
# Aggregation helpers (unit-tested in tests/test_demo.py)
# --------------------------------------------------------------------------------------------------------------


def mean_se(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard error of the mean (sample std / sqrt(n)), min, max and n of ``values`` (NaNs dropped)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    n = len(values)
    if n == 0:
        return {"mean": float("nan"), "se": float("nan"), "min": float("nan"), "max": float("nan"), "n": 0}
    se = statistics.stdev(values) / math.sqrt(n) if n > 1 else float("nan")
    return {"mean": statistics.fmean(values), "se": se, "min": min(values), "max": max(values), "n": n}


def steps_to_reach(steps: Sequence[float], values: Sequence[float], target: float) -> float | None:
    """First step at which a curve reaches ``target``, interpolating linearly between evaluation points.

    ``None`` if the curve never reaches it. A curve that starts at or above the target reaches it at its first
    step.
    """
    if len(steps) != len(values) or not steps:
        raise ValueError("steps and values must be non-empty and of equal length")
    if values[0] >= target:
        return float(steps[0])
    for (s0, v0), (s1, v1) in zip(zip(steps, values), zip(steps[1:], values[1:])):
        if v1 >= target:
            return s0 + (s1 - s0) * (target - v0) / (v1 - v0)  # v0 < target <= v1, so v1 > v0
    return None


def mean_curve(runs: Sequence[dict[str, Any]], key: str) -> tuple[list[int], list[dict[str, float]]]:
    """Per evaluation step, ``mean_se`` over runs of ``eval[key]`` (steps present in every run only)."""
    per_run = [{p["step"]: p.get(key) for p in run["eval"]} for run in runs]
    steps = sorted(set.intersection(*(set(r) for r in per_run))) if per_run else []
    return steps, [mean_se([r[s] for r in per_run if r[s] is not None]) for s in steps]


def train_curve(runs: Sequence[dict[str, Any]], key: str, bin_size: int) -> tuple[list[float], list[float]]:
    """A per-step training metric (e.g. ``prm/accuracy``), mean over runs and over bins of ``bin_size`` steps."""
    bins: dict[int, list[float]] = {}
    for run in runs:
        for row in run["train"]:
            if key in row:
                bins.setdefault((int(row["step"]) - 1) // bin_size, []).append(row[key])
    keys = sorted(bins)
    return [(k + 0.5) * bin_size for k in keys], [statistics.fmean(bins[k]) for k in keys]


def summarise_method(runs: Sequence[dict[str, Any]], target: float | None) -> dict[str, Any]:
    """Final figures of one method over seeds, its curves, and its steps to reach ``target`` (RLOO's final)."""
    finals = [run["eval"][-1] for run in runs]
    step_times = [[r["step_time"] for r in run["train"] if "step_time" in r] for run in runs]
    summary: dict[str, Any] = {
        "seeds": [run["seed"] for run in runs],
        "settings": runs[0]["settings"],
        "steps": runs[0]["steps"],
        "train_minutes": mean_se([run["train_seconds"] / 60 for run in runs]),
        # TRL's per-step wall time (generation + scoring + update, evaluations excluded), median per run
        "step_seconds": mean_se([statistics.median(times) for times in step_times if times]),
    }
    for key in (
        "sampled_accuracy",
        "greedy_accuracy",
        "sampled_all_steps_correct",
        "greedy_all_steps_correct",
        "prm_accuracy",
        "localisation",
        "localisation_chance",
    ):
        if all(key in f for f in finals):
            summary[f"final_{key}"] = mean_se([f[key] for f in finals])
            summary[f"final_{key}"]["per_seed"] = [f[key] for f in finals]
    curves = {}
    for key in (
        "sampled_accuracy",
        "greedy_accuracy",
        "sampled_all_steps_correct",
        "prm_accuracy",
        "localisation",
        "localisation_chance",
    ):
        if all(key in run["eval"][-1] for run in runs):
            steps, stats = mean_curve(runs, key)
            curves[key] = {"steps": steps, "mean": [s["mean"] for s in stats], "se": [s["se"] for s in stats]}
    summary["curves"] = curves
    if any("prm/accuracy" in row for run in runs for row in run["train"]):
        x, y = train_curve(runs, "prm/accuracy", bin_size=10)
        summary["curves"]["train_prm_accuracy"] = {"steps": x, "mean": y}
    x, y = train_curve(runs, "reward", bin_size=10)
    summary["curves"]["train_reward"] = {"steps": x, "mean": y}
    if target is not None:
        curve = curves["sampled_accuracy"]
        summary["steps_to_rloo_final"] = steps_to_reach(curve["steps"], curve["mean"], target)
        per_seed = []
        for run in runs:
            points = run["eval"]
            per_seed.append(
                steps_to_reach([p["step"] for p in points], [p["sampled_accuracy"] for p in points], target)
            )
        summary["steps_to_rloo_final_per_seed"] = per_seed
    return summary


# --------------------------------------------------------------------------------------------------------------
# Phases
# --------------------------------------------------------------------------------------------------------------


def tune_specs(task: str, seeds: Sequence[int], grid: Sequence[tuple] = tuple(TUNE_GRID)) -> list[RunSpec]:
    return [RunSpec(task, "tune", m, s, dict(o), **TUNE_DEFAULTS) for m, o in grid for s in seeds]


def choose_settings(task: str, seeds: Sequence[int]) -> tuple[dict, list[dict]]:
    """Per method, the grid setting with the best mean final validation sampled accuracy; and the whole table."""
    table = []
    for method, settings in TUNE_GRID:
        runs = load_runs(tune_specs(task, seeds, [(method, settings)]))
        if not runs:
            continue
        accuracy = mean_se([r["eval"][-1]["sampled_accuracy"] for r in runs])
        table.append({"method": method, "settings": settings, "validation_sampled_accuracy": accuracy})
    chosen = {}
    for method in METHOD_ORDER:
        rows = [row for row in table if row["method"] == method]
        if rows:
            chosen[method] = max(rows, key=lambda row: row["validation_sampled_accuracy"]["mean"])["settings"]
    return chosen, table


def final_specs(task: str, chosen: dict, seeds: Sequence[int], overrides: dict[str, int]) -> list[RunSpec]:
    shape = {**DEFAULTS, **overrides}
    return [RunSpec(task, "final", m, s, dict(chosen[m]), **shape) for m in METHOD_ORDER if m in chosen for s in seeds]


def knob_specs(task: str, chosen: dict, seeds: Sequence[int], knobs: Sequence[tuple] = tuple(KNOBS)) -> list[RunSpec]:
    """Each method at its chosen settings with one knob changed (validation split, tuning seeds and shape)."""
    return tune_specs(
        task, seeds, [(method, {**chosen[method], **change}) for method, change in knobs if method in chosen]
    )


def summarise_knobs(task: str, chosen: dict, seeds: Sequence[int]) -> list[dict[str, Any]]:
    """One row per knob that has runs: the method, the change and its mean final validation figures."""
    rows = []
    for method, change in KNOBS:
        runs = load_runs(knob_specs(task, chosen, seeds, [(method, change)]))
        if not runs:
            continue
        last = [run["eval"][-1] for run in runs]
        prm_accuracy = [point["prm_accuracy"] for point in last if point.get("prm_accuracy") is not None]
        rows.append(
            {
                "method": method,
                "change": change,
                "seeds": [run["seed"] for run in runs],
                "validation_sampled_accuracy": mean_se([point["sampled_accuracy"] for point in last]),
                "validation_prm_accuracy": mean_se(prm_accuracy) if prm_accuracy else None,
                "train_seconds": statistics.fmean(run["train_seconds"] for run in runs),
            }
        )
    return rows


def pilot_specs() -> list[RunSpec]:
    return [RunSpec("default", "pilot", m, 0, dict(o), steps=n, **PILOT_SHAPE) for m, o, n in PILOTS]


def summarise_pilots(runs: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per pilot: its settings and the held-out (validation) figures at every evaluation point."""
    keys = ("sampled_accuracy", "greedy_accuracy", "prm_accuracy", "localisation", "localisation_chance")
    return [
        {
            "method": run["spec"]["method"],
            "settings": run["spec"]["settings"],
            "steps": run["steps"],
            "eval": [{"step": p["step"], **{k: p[k] for k in keys if k in p}} for p in run["eval"]],
        }
        for run in runs
    ]


def ablation_specs(task: str, chosen: dict, seeds: Sequence[int], overrides: dict[str, int]) -> list[RunSpec]:
    """RLOO at PRIME's policy learning rate (nothing if the two methods chose the same one)."""
    if "prime" not in chosen or "rloo" not in chosen:
        return []
    settings = {**chosen["rloo"], "learning_rate": chosen["prime"]["learning_rate"]}
    if settings == chosen["rloo"]:
        return []
    return [RunSpec(task, "ablation", "rloo", s, settings, **{**DEFAULTS, **overrides}) for s in seeds]


def diagnostic_specs(task: str, chosen: dict, seeds: Sequence[int], overrides: dict[str, int]) -> list[RunSpec]:
    """PRIME's final runs of (up to) the first two seeds, with the PRM also scored on the fixed step-0 samples."""
    if "prime" not in chosen:
        return []
    shape = {**DEFAULTS, **overrides}
    return [RunSpec(task, "diagnostic", "prime", s, dict(chosen["prime"]), **shape) for s in list(seeds)[:2]]


def summarise_ablation(runs: Sequence[dict[str, Any]], target: float | None) -> dict[str, Any] | None:
    if not runs:
        return None
    return {"method": "rloo at PRIME's policy learning rate", **summarise_method(runs, target)}


def summarise_diagnostic(runs: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    """Seed-mean curves of the PRM on the policy's own samples and on the fixed step-0 samples."""
    if not runs:
        return None
    curves = {}
    for key in (
        "prm_accuracy",
        "localisation",
        "localisation_chance",
        "prm_accuracy_fixed",
        "localisation_fixed",
        "localisation_chance_fixed",
    ):
        steps, stats = mean_curve(runs, key)
        curves[key] = {"steps": steps, "mean": [s["mean"] for s in stats], "se": [s["se"] for s in stats]}
    return {"seeds": [r["seed"] for r in runs], "settings": runs[0]["settings"], "curves": curves}


def compare(prime: dict[str, float], rloo: dict[str, float]) -> dict[str, Any]:
    """PRIME - RLOO of two ``mean_se`` final figures, its standard error (independent seeds) and the verdict:
    PRIME beats / loses to RLOO when the difference exceeds 2 standard errors, else a tie."""
    diff = prime["mean"] - rloo["mean"]
    se = math.sqrt(prime["se"] ** 2 + rloo["se"] ** 2)
    if math.isnan(se):
        verdict = "n/a (fewer than 2 seeds)"
    elif diff > 2 * se:
        verdict = "PRIME beats RLOO"
    elif diff < -2 * se:
        verdict = "PRIME loses to RLOO"
    else:
        verdict = "tie (within 2 s.e.)"
    return {"diff": diff, "se": se, "verdict": verdict}


def aggregate_regime(name: str, seeds: Sequence[int], command: str) -> dict[str, Any] | None:
    """The report of one regime (``regime_<name>.json``): every arm's summary against RLOO's final accuracy, PRIME
    vs RLOO's difference with its verdict, and PRIME's steps to reach RLOO's final as a fraction of RLOO's."""
    regime = REGIMES[name]
    runs = {
        label: sorted(load_runs(specs), key=lambda r: r["seed"]) for label, specs in regime_specs(name, seeds).items()
    }
    runs = {label: rs for label, rs in runs.items() if rs}
    if "prime" not in runs or "rloo" not in runs:
        return None
    rloo_final = mean_se([r["eval"][-1]["sampled_accuracy"] for r in runs["rloo"]])
    arms = {label: summarise_method(rs, rloo_final["mean"]) for label, rs in runs.items()}
    for arm in regime.arms:
        if arm.label in arms:
            arms[arm.label].update(method=arm.method, overrides=arm.overrides, phase=arm.phase)
    prime_steps, rloo_steps = arms["prime"]["steps_to_rloo_final"], arms["rloo"]["steps_to_rloo_final"]
    everything = [r for rs in runs.values() for r in rs]
    first = runs["prime"][0]
    return {
        "benchmark": "learning_regime",
        "regime": name,
        "task": regime.task,
        "question": regime.question,
        "task_config": task_config(regime.task).to_dict(),
        "command": command,
        "machine": machine(),
        "date": " .. ".join(sorted({min(r["finished"] for r in everything), max(r["finished"] for r in everything)})),
        "warm_start": first["warm_start"],
        "base_settings": REGIME_BASE,
        "evaluation": {
            "split": "test",
            "prompts": first["spec"]["eval_prompts"],
            "samples_per_prompt": first["spec"]["eval_samples"],
            "every_steps": first["spec"]["eval_every"],
            "temperature": 1.0,
        },
        "steps": first["steps"],
        "start": {
            key: statistics.fmean(r["eval"][0][key] for r in everything)
            for key in ("sampled_accuracy", "greedy_accuracy", "sampled_all_steps_correct")
        },
        "arms": arms,
        "comparison": compare(arms["prime"]["final_sampled_accuracy"], arms["rloo"]["final_sampled_accuracy"]),
        "rloo_final_sampled_accuracy": rloo_final["mean"],
        "steps_fraction_prime_to_rloo_final": prime_steps / rloo_steps
        if prime_steps is not None and rloo_steps
        else None,
    }


def plot_regime(report: dict[str, Any], path: Path) -> None:
    """Held-out sampled accuracy per arm (mean over seeds, band = +-1 s.e.) and PRIME's PRM over training."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, (label, arm) in enumerate(report["arms"].items()):
        curve = arm["curves"]["sampled_accuracy"]
        se = [0.0 if math.isnan(v) else v for v in curve["se"]]
        color = {"prime": "C3", "rloo": "C0"}.get(label, f"C{i + 2}")
        axes[0].plot(curve["steps"], curve["mean"], "o-", ms=3, color=color, label=label)
        axes[0].fill_between(
            curve["steps"],
            [m - e for m, e in zip(curve["mean"], se)],
            [m + e for m, e in zip(curve["mean"], se)],
            color=color,
            alpha=0.2,
        )
        curves = arm["curves"] if arm.get("method") == "prime" else {}  # outcome-only RLOO logs an untrained PRM
        if "prm_accuracy" in curves:
            axes[1].plot(
                curves["prm_accuracy"]["steps"],
                curves["prm_accuracy"]["mean"],
                "o-",
                color=color,
                label=f"{label}: held-out",
            )
        if "train_prm_accuracy" in curves:
            c = curves["train_prm_accuracy"]
            axes[1].plot(c["steps"], c["mean"], "-", color=color, alpha=0.5, label=f"{label}: training batches")
        if "localisation" in curves:
            c = curves["localisation"]
            axes[1].plot(c["steps"], c["mean"], "s--", color=color, alpha=0.7, label=f"{label}: localisation")
    axes[0].set(title="held-out accuracy, sampled T=1", xlabel="step")
    axes[0].legend()
    axes[1].axhline(0.5, color="grey", lw=0.8, ls=":")
    axes[1].set(title="PRIME's implicit PRM: pairwise accuracy, localisation", xlabel="step", ylim=(0, 1))
    axes[1].legend(fontsize=7)
    seeds = len(report["arms"]["prime"]["seeds"])
    fig.suptitle(f"Regime {report['regime']} ({report['task']} task, {seeds} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def machine() -> dict[str, Any]:
    return {
        "uname": " ".join(platform.uname()),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "note": "2 cores shared with other jobs; every run single-threaded, --jobs runs at a time",
    }


def aggregate(
    task: str,
    runs: list[dict],
    chosen: dict,
    tuning: list[dict],
    tune_seeds: Sequence[int],
    command: str,
    ablation: Sequence[dict] = (),
    diagnostic: Sequence[dict] = (),
    extras_command: str | None = None,
    pilots: Sequence[dict] = (),
) -> dict[str, Any]:
    """The benchmark's report for one task (written to learning_<task>.json)."""
    by_method = {m: [r for r in runs if r["spec"]["method"] == m] for m in METHOD_ORDER}
    by_method = {m: sorted(rs, key=lambda r: r["seed"]) for m, rs in by_method.items() if rs}
    rloo_final = None
    if "rloo" in by_method:
        rloo_final = mean_se([r["eval"][-1]["sampled_accuracy"] for r in by_method["rloo"]])["mean"]
    methods = {m: summarise_method(rs, rloo_final) for m, rs in by_method.items()}
    start = [r["eval"][0] for r in runs]
    spec = runs[0]["spec"]
    report: dict[str, Any] = {
        "benchmark": "learning",
        "task": task,
        "task_config": task_config(task).to_dict(),
        "command": command,
        "machine": machine(),
        # when the runs behind the figures finished (the report itself can be rebuilt any time)
        "date": " .. ".join(sorted({min(r["finished"] for r in runs), max(r["finished"] for r in runs)})),
        "aggregated": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "warm_start": runs[0]["warm_start"],
        "evaluation": {
            "split": "test",
            "prompts": spec["eval_prompts"],
            "samples_per_prompt": spec["eval_samples"],
            "every_steps": spec["eval_every"],
            "temperature": 1.0,
        },
        "steps": spec["steps"],
        "chosen_settings": chosen,
        "tuning": {"split": "validation", "seeds": list(tune_seeds), "shape": TUNE_DEFAULTS, "table": tuning},
        "start": {
            key: statistics.fmean(p[key] for p in start)
            for key in ("sampled_accuracy", "greedy_accuracy", "sampled_all_steps_correct", "greedy_all_steps_correct")
        },
        "methods": methods,
        "ablation": summarise_ablation(ablation, rloo_final),
        "diagnostic": summarise_diagnostic(diagnostic),
        "extras_command": extras_command if (ablation or diagnostic) else None,
        "pilots": (
            {
                "command": "python benchmarks/learning.py --tasks default --phases pilot",
                "runs": summarise_pilots(pilots),
            }
            if pilots
            else None
        ),
    }
    if "rloo" in methods and "prime" in methods:
        rloo_steps = methods["rloo"]["steps_to_rloo_final"]
        prime_steps = methods["prime"]["steps_to_rloo_final"]
        report["rloo_final_sampled_accuracy"] = rloo_final
        report["steps_fraction_prime_to_rloo_final"] = (
            prime_steps / rloo_steps if prime_steps is not None and rloo_steps else None
        )
        report["steps_fraction_prime_to_rloo_final_of_total"] = (
            prime_steps / spec["steps"] if prime_steps is not None else None
        )
    return report


def plot(report: dict[str, Any], path: Path) -> None:
    """Curves of one task: held-out sampled / greedy accuracy, all-steps-correct, PRIME's PRM accuracy and
    localisation (mean over seeds, band = +-1 standard error)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = report["methods"]
    colors = {"prime": "C3", "rloo": "C0", "grpo": "C2"}
    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    panels = [
        ("sampled_accuracy", "held-out accuracy, sampled T=1"),
        ("greedy_accuracy", "held-out accuracy, greedy"),
        ("sampled_all_steps_correct", "all steps right (sampled T=1)"),
    ]
    for ax, (key, title) in zip(axes, panels):
        for method, summary in methods.items():
            curve = summary["curves"].get(key)
            if not curve:
                continue
            se = [0.0 if math.isnan(s) else s for s in curve["se"]]
            lo = [m - s for m, s in zip(curve["mean"], se)]
            hi = [m + s for m, s in zip(curve["mean"], se)]
            ax.plot(curve["steps"], curve["mean"], "o-", ms=3, color=colors[method], label=method)
            ax.fill_between(curve["steps"], lo, hi, color=colors[method], alpha=0.2)
        ablation = (report.get("ablation") or {}).get("curves", {}).get(key)
        if ablation:
            ax.plot(ablation["steps"], ablation["mean"], "--", color="C0", alpha=0.7, label="rloo @ PRIME's lr")
        ax.set(title=title, xlabel="step")
        ax.legend()
    ax = axes[3]
    prime = methods.get("prime", {}).get("curves", {})
    if "prm_accuracy" in prime:
        ax.plot(
            prime["prm_accuracy"]["steps"], prime["prm_accuracy"]["mean"], "o-", color="C3", label="PRM acc., held-out"
        )
    if "train_prm_accuracy" in prime:
        c = prime["train_prm_accuracy"]
        ax.plot(c["steps"], c["mean"], "-", color="C1", alpha=0.7, label="PRM acc., training batches")
    if "localisation" in prime:
        ax.plot(prime["localisation"]["steps"], prime["localisation"]["mean"], "s-", color="C4", label="localisation")
        chance = prime.get("localisation_chance")
        if chance:
            ax.plot(chance["steps"], chance["mean"], ":", color="C4", label="localisation chance")
    fixed = (report.get("diagnostic") or {}).get("curves", {})
    if fixed.get("localisation_fixed", {}).get("steps"):
        c = fixed["localisation_fixed"]
        ax.plot(c["steps"], c["mean"], "s--", color="C5", label="localisation, fixed step-0 samples")
        c = fixed["prm_accuracy_fixed"]
        ax.plot(c["steps"], c["mean"], "o--", color="C6", label="PRM acc., fixed step-0 samples")
    ax.axhline(0.5, color="grey", lw=0.8, ls=":")
    ax.set(title="PRIME's implicit PRM (held-out)", xlabel="step", ylim=(0, 1))
    ax.legend(fontsize=8)
    fig.suptitle(f"Learning benchmark, {report['task']} task ({len(methods.get('prime', {}).get('seeds', []))} seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------


def run_regimes(
    names: Sequence[str], seeds: Sequence[int], jobs: int, arms: Sequence[str] | None, aggregate_only: bool
) -> list[RunSpec]:
    """Run (unless ``aggregate_only``) and report the regimes: ``regime_<name>.json`` / ``.png`` per regime."""
    failed: list[RunSpec] = []
    for name in names:
        if not aggregate_only:  # seed by seed across arms, so that a cut-short run still compares the arms
            by_arm = regime_specs(name, seeds, arms).values()
            todo = [spec for per_seed in zip(*by_arm) for spec in per_seed if spec.phase == "regime"]
            failed += run_specs(todo, jobs)  # baseline arms (final / ablation phase) are run by their own phase
        command = f"python benchmarks/learning.py --phases regime --regimes {name} --seeds {' '.join(map(str, seeds))}"
        report = aggregate_regime(name, seeds, command)
        if report is None:
            logger.warning("regime %s: no PRIME or no RLOO runs yet; nothing to report", name)
            continue
        (RESULTS / f"regime_{name}.json").write_text(json.dumps(report, indent=2))
        plot_regime(report, RESULTS / f"regime_{name}.png")
        logger.info("wrote %s: %s", RESULTS / f"regime_{name}.json", report["comparison"])
    return failed


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", nargs="+", choices=TASK_NAMES, default=list(TASK_NAMES))
    parser.add_argument(
        "--phases",
        nargs="+",
        choices=("pilot", "tune", "final", "ablation", "diagnostic", "knobs", "regime"),
        default=["tune", "final"],
    )
    parser.add_argument(
        "--regimes", nargs="+", choices=list(REGIMES), default=list(REGIMES), help="regimes of --phases regime"
    )
    parser.add_argument("--arms", nargs="+", help="only these arms of each regime (default: all)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3], help="seeds of the final runs")
    parser.add_argument("--tune-seeds", nargs="+", type=int, default=list(TUNE_SEEDS))
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (each single-threaded)")
    for name in ("steps", "eval_every", "eval_prompts", "eval_samples"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, help=f"final runs' {name} ({DEFAULTS[name]})")
    parser.add_argument("--aggregate-only", action="store_true", help="only rebuild the reports from run files")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")

    if options.worker:
        spec = RunSpec(**json.loads(options.worker))
        record = run_one(spec)
        print(json.dumps({"done": str(spec.path), "final": record["eval"][-1]["sampled_accuracy"]}))
        return

    overrides = {k: getattr(options, k) for k in DEFAULTS if getattr(options, k) is not None}
    shape = "".join(f" --{k.replace('_', '-')} {v}" for k, v in overrides.items())
    seeds = " ".join(map(str, options.seeds))
    tune = " ".join(map(str, options.tune_seeds))
    tune_seeds = tuple(options.tune_seeds)
    failed: list[RunSpec] = []
    if "pilot" in options.phases and not options.aggregate_only:
        failed += run_specs(pilot_specs(), options.jobs)
    if "regime" in options.phases:
        failed += run_regimes(options.regimes, options.seeds, options.jobs, options.arms, options.aggregate_only)
        options.tasks = []  # a regime run never re-runs or re-aggregates the per-task phases
    for task in options.tasks:
        if "tune" in options.phases and not options.aggregate_only:
            failed += run_specs(tune_specs(task, tune_seeds), options.jobs)
        chosen, tuning = choose_settings(task, tune_seeds)
        if not chosen:
            logger.warning("%s: no tuning results; nothing to run or report", task)
            continue
        logger.info("%s: chosen settings %s", task, chosen)
        specs = final_specs(task, chosen, options.seeds, overrides)
        if "final" in options.phases and not options.aggregate_only:
            failed += run_specs(specs, options.jobs)
        extras = {
            "ablation": ablation_specs(task, chosen, options.seeds, overrides),
            "diagnostic": diagnostic_specs(task, chosen, options.seeds, overrides),
        }
        if "knobs" in options.phases and not options.aggregate_only:
            failed += run_specs(knob_specs(task, chosen, tune_seeds), options.jobs)
        for phase, phase_specs in extras.items():
            if phase in options.phases and not options.aggregate_only:
                failed += run_specs(phase_specs, options.jobs)
        runs = load_runs(specs)
        if not runs:
            continue
        # The commands that reproduce this task's figures (the run files make re-running them cheap).
        base = f"python benchmarks/learning.py --tasks {task} --seeds {seeds} --tune-seeds {tune}{shape}"
        command = f"{base} --phases tune final"
        report = aggregate(
            task,
            runs,
            chosen,
            tuning,
            tune_seeds,
            command,
            ablation=load_runs(extras["ablation"]),
            diagnostic=load_runs(extras["diagnostic"]),
            extras_command=f"{base} --phases ablation diagnostic",
            pilots=load_runs(pilot_specs()) if task == "default" else (),
        )
        report["knobs"] = {
            "command": f"python benchmarks/learning.py --tasks {task} --tune-seeds {tune} --phases knobs",
            "rows": summarise_knobs(task, chosen, tune_seeds),
        }
        (RESULTS / f"learning_{task}.json").write_text(json.dumps(report, indent=2))
        plot(report, RESULTS / f"learning_{task}.png")
        logger.info("wrote %s", RESULTS / f"learning_{task}.json")
    if failed:  # the reports above use the runs that exist; the failures must not pass unnoticed
        logger.error(
            "%d runs failed: %s", len(failed), "; ".join(str(spec.path.with_suffix(".log")) for spec in failed)
        )
        sys.exit(1)


if __name__ == "__main__":
    main()
