"""What the step-cost benchmarks (``overhead.py``, ``prefix_cost.py``) share: the trainer arguments and reward of a
timed run, its LoRA / 4-bit set-up, the timing of a step's pieces, and the driver's subprocess and summaries.

Not a benchmark itself; the two scripts import it from this directory (``python benchmarks/<script>.py`` puts it
first on ``sys.path``). Heavy libraries are imported inside the functions that need them, so that the drivers stay
light and only the run processes load torch and TRL.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).parent / "results"
# The pieces of a step that `StepTimer` times; ``scoring`` contains the other three.
TIMED_PIECES = ("generation", "reference_forward", "prm_update", "scoring")


def rss_mb(field: str) -> float:
    """``VmRSS`` (now) or ``VmHWM`` (peak) of this process, in MB."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def summarise(values: list[float]) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def coin_reward(completions, **kwargs) -> list[float]:
    """A deterministic pseudo-random 0/1 verdict per completion (plain text or chat), so groups are mixed."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]
    return [float(zlib.crc32(text.encode()) % 2) for text in texts]


def trainer_args(
    output_dir: str, rows: int, num_generations: int, max_completion_length: int, max_steps: int
) -> dict[str, Any]:
    """`GRPOConfig` / `PRIMEConfig` arguments of a timed run: CPU, float32, no checkpoints or reporting, GRPO's loss
    without KL (``beta=0``), so that GRPO and PRIME variants differ only in what PRIME adds."""
    return dict(
        output_dir=output_dir,
        per_device_train_batch_size=rows,
        num_generations=num_generations,
        max_completion_length=max_completion_length,
        max_steps=max_steps,
        learning_rate=1e-5,
        loss_type="grpo",
        beta=0.0,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        seed=0,
    )


def lora_config():
    """The policy's (and the PRM's) LoRA adapter in every variant."""
    from peft import LoraConfig

    return LoraConfig(r=16, lora_alpha=32, target_modules="all-linear")


def nf4_config():
    """The 4-bit (nf4) base of the QLoRA variants, computing in float32 on CPU."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)


class StepTimer:
    """Times each optimizer step of a TRL trainer after ``warmup`` steps, and the pieces of it seen from outside:
    generation, scoring (`_generate_and_score_completions`, which contains generation and the PRIME step) and, with
    ``prm``, the PRM's reference forwards and its update (which contains the reference forwards).

    Also records each generation batch's mean prompt and completion length (tokens), and the last batch the PRM
    updated on (``last_prm_batch``).
    """

    def __init__(self, trainer, warmup: int, clock: Callable[[], float] = time.perf_counter, prm=None):
        from transformers import TrainerCallback

        self.clock, self.warmup = clock, warmup
        self.timings = dict.fromkeys(TIMED_PIECES, 0.0)
        self.step_times: list[float] = []
        self.wall_times: list[float] = []
        self.splits: list[dict[str, float]] = []
        self.prompt_tokens: list[float] = []
        self.completion_tokens: list[float] = []
        self.last_prm_batch = None

        trainer._generate = self._timed("generation", trainer._generate)
        score = self._timed("scoring", trainer._generate_and_score_completions)

        def score_and_count(*args, **kwargs):
            output = score(*args, **kwargs)
            self.prompt_tokens.append(float(output["prompt_mask"].sum(1).float().mean()))
            self.completion_tokens.append(float(output["completion_mask"].sum(1).float().mean()))
            return output

        trainer._generate_and_score_completions = score_and_count
        if prm is not None:
            log_probs = prm._log_probs

            def reference_timed(batch, adapter, share):
                start = clock()
                try:
                    return log_probs(batch, adapter, share)
                finally:
                    if adapter is None:  # the reference pass (adapters off)
                        self.timings["reference_forward"] += clock() - start

            prm._log_probs = reference_timed
            update = self._timed("prm_update", prm.score_and_update)

            def update_and_keep(batch, *args, **kwargs):
                self.last_prm_batch = batch
                return update(batch, *args, **kwargs)

            prm.score_and_update = update_and_keep

        timer = self

        class StepClock(TrainerCallback):
            def on_step_begin(self, args, state, control, **kwargs):
                for key in timer.timings:
                    timer.timings[key] = 0.0
                self.start, self.wall_start = clock(), time.perf_counter()

            def on_step_end(self, args, state, control, **kwargs):
                if state.global_step > timer.warmup:
                    timer.step_times.append(clock() - self.start)
                    timer.wall_times.append(time.perf_counter() - self.wall_start)
                    timer.splits.append(dict(timer.timings))

        trainer.add_callback(StepClock())

    def _timed(self, name: str, function: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = self.clock()
            try:
                return function(*args, **kwargs)
            finally:
                self.timings[name] += self.clock() - start

        return wrapper

    def split(self) -> dict[str, float]:
        """Median over the timed steps of each piece (as measured: ``scoring`` and ``prm_update`` nest others)."""
        return {key: statistics.median(s[key] for s in self.splits) for key in TIMED_PIECES}

    def step_seconds(self) -> float:
        return statistics.median(self.step_times)

    def breakdown(self) -> dict[str, float]:
        """The median step split into disjoint pieces: generation, reference forward, the PRM update without its
        reference forwards (its own forward + backward + step), the rest of scoring, and the policy update
        (everything after scoring: the policy's forward + backward + optimizer step)."""
        split, total = self.split(), self.step_seconds()
        return {
            "generation": split["generation"],
            "reference_forward": split["reference_forward"],
            "prm_update": split["prm_update"] - split["reference_forward"],
            "other_scoring": split["scoring"] - split["generation"] - split["prm_update"],
            "policy_update": total - split["scoring"],
        }


def run_worker(script: str, variant: str, arguments: list[str]) -> dict:
    """``python script --worker variant *arguments`` in its own single-threaded, offline process (its own peak
    RSS); its last stdout line is the run's JSON result."""
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    command = [sys.executable, script, "--worker", variant, *arguments]
    result = subprocess.run(command, env=env, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{variant} run failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def write_result(name: str, report: dict) -> None:
    """Print ``report`` and write it to ``results/<name>.json`` (what `report.py` reads)."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    out = RESULTS_DIR / f"{name}.json"
    out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"wrote {out}")
