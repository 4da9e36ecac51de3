"""SmolLM2-135M-Instruct learning under PRIME vs outcome-only RLOO, on CPU (the configs/smollm2-135m-cpu.yaml recipe).

    python benchmarks/smollm2_learning.py                     # 2 seeds x 2 methods x the recipe's max_steps
    python benchmarks/smollm2_learning.py --seeds 0 --steps 4 --eval_every 2 --eval_prompts 18   # a small run
    python benchmarks/smollm2_learning.py --write_data                    # only (re)write configs/data/*.jsonl
    python benchmarks/smollm2_learning.py --validate_lr 3e-5 1e-4 3e-4 --steps 6   # choose lr on validation

The task: one-digit additions (chat messages: "What is 7 + 5?" + prime_trl.data's math suffix, no system prompt;
SmolLM2's chat template adds its own default system line), graded by
`final_answer_reward` (the boxed answer, else the last number). Measured before choosing it (sampled at T=1,
40 tokens, 24 prompts x 4 samples): 24% right by the last number; boxed-only grading (`math_reward`) gives 0-3% at
T=1, 0.7 and 0.4, because this model rarely boxes its answers, so that task would leave RL nothing to learn from.
The 81 pairs are split by a fixed hash into train (55) and held-out test (26) problems.

Both methods run the recipe's settings from the YAML (one place); RLOO is the same run with the PRM switched off
(``process_reward_coef: 0``, ``prm_update: none``). Every ``--eval_every`` steps the policy samples
``--eval_samples`` completions per held-out prompt at the training temperature; the curve is their accuracy.
Writes ``benchmarks/results/smollm2_learning.json``; ``python benchmarks/report.py`` turns it into a
BENCHMARKS.md section.

``--validate_lr`` chooses the learning rate without touching the test split: every 4th training sum (ranked by
the crc32 of its question, 14 of 55) is held out for validation, PRIME trains on the other 41 with the policy and
PRM learning rates both set to each value (seed 0 unless ``--seeds``), and the validation accuracy is measured by
the same sampled grading at step 0 and at the end. Writes ``benchmarks/results/smollm2_validation.json``, merging
values already there (so values can run in parallel processes, one value each).
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import platform
import sys
import time
import zlib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "configs" / "smollm2-135m-cpu.yaml"
DATA_DIR = REPO / "configs" / "data"
RESULT = REPO / "benchmarks" / "results" / "smollm2_learning.json"
VALIDATION_RESULT = REPO / "benchmarks" / "results" / "smollm2_validation.json"
# Every VALIDATION_STRIDE-th training sum (ranked by a fixed hash) is a validation sum in --validate_lr mode.
VALIDATION_STRIDE = 4

logger = logging.getLogger("smollm2_learning")

# All 26 held-out prompts in one generate call: on CPU a few large batches beat many small ones.
EVAL_PROMPTS_PER_BATCH = 32


def addition_rows() -> dict[str, list[dict]]:
    """All 81 one-digit sums, split by a fixed hash (crc32 mod 3): 26 held out for testing, 55 for training."""
    splits: dict[str, list[dict]] = {"train": [], "test": []}
    for a in range(1, 10):
        for b in range(1, 10):
            question = f"What is {a} + {b}?"
            split = "test" if zlib.crc32(question.encode()) % 3 == 0 else "train"
            splits[split].append({"prompt": question, "answer": str(a + b), "id": f"{a}+{b}"})
    return splits


def validation_ids(ids: list[str]) -> set[str]:
    """The validation sums among training ids ("a+b"): every VALIDATION_STRIDE-th one ranked by the crc32 of its
    question (a fixed, order-independent choice of 14 of the 55)."""
    ranked = sorted(ids, key=lambda i: zlib.crc32(f"What is {i.replace('+', ' + ')}?".encode()))
    return set(ranked[::VALIDATION_STRIDE])


def write_data() -> dict[str, Path]:
    """configs/data/one_digit_sums_{train,test}.jsonl: `prompt` + `answer` rows (the recipe's data files), the
    prompt as chat messages (the question + prime_trl.data's math suffix, no system prompt)."""
    from prime_trl.data import make_prompt

    DATA_DIR.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, rows in addition_rows().items():
        path = DATA_DIR / f"one_digit_sums_{split}.jsonl"
        rows = [{**row, "prompt": make_prompt(row["prompt"], "math", system_prompt=False)} for row in rows]
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        paths[split] = path
    return paths


def recipe() -> dict:
    import yaml

    return yaml.safe_load(CONFIG.read_text())


def held_out_accuracy(trainer, prompts: list[list[dict]], answers: list[str], samples: int, tokens: int, temp: float):
    """Sampled accuracy of the current policy on held-out prompts (the training temperature)."""
    import torch

    from prime_trl.rewards import final_answer_reward

    tokenizer, model = trainer.processing_class, trainer.model
    texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
    was_training = model.training
    model.eval()
    completions = []
    with torch.no_grad():
        for start in range(0, len(texts), EVAL_PROMPTS_PER_BATCH):
            batch = tokenizer(
                texts[start : start + EVAL_PROMPTS_PER_BATCH], return_tensors="pt", padding=True, padding_side="left"
            )
            out = model.generate(
                **batch,
                max_new_tokens=tokens,
                do_sample=True,
                temperature=temp,
                top_p=1.0,
                num_return_sequences=samples,
                pad_token_id=tokenizer.pad_token_id,
            )
            completions += tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    scores = final_answer_reward(completions, answer=[a for a in answers for _ in range(samples)])
    return sum(scores) / len(scores)


def run(method: str, seed: int, options, settings: dict, train, test, name: str | None = None) -> dict:
    """Train `method` on `train` with `settings` for options.steps steps, scoring sampled accuracy on `test` (the
    held-out test split, or the validation sums) every options.eval_every steps and at the end."""
    import torch
    from peft import LoraConfig
    from transformers import TrainerCallback

    from prime_trl import PRIMEConfig, PRIMETrainer
    from prime_trl.rewards import final_answer_reward

    torch.manual_seed(seed)
    config_keys = set(PRIMEConfig.__dataclass_fields__)
    args = {k: v for k, v in settings.items() if k in config_keys}
    args.update(
        output_dir=str(Path(options.work_dir) / (name or f"{method}-{seed}")),
        max_steps=options.steps,
        seed=seed,
        save_strategy="no",
        logging_steps=1,
        report_to="none",
    )
    if method == "rloo":
        args.update(process_reward_coef=0.0, prm_update="none")
    lora = LoraConfig(
        r=settings["lora_r"],
        lora_alpha=settings["lora_alpha"],
        lora_dropout=settings["lora_dropout"],
        target_modules=settings["lora_target_modules"],
    )
    trainer = PRIMETrainer(
        settings["model_name_or_path"],
        args=PRIMEConfig(**args),
        reward_funcs=final_answer_reward,
        train_dataset=train,
        peft_config=lora,
    )
    prompts, answers = list(test["prompt"]), list(test["answer"])
    temperature, tokens = settings.get("temperature", 1.0), settings["max_completion_length"]
    curve: list[list[float]] = []
    step_times: list[float] = []
    eval_times: list[float] = []

    def evaluate(step: int) -> None:
        start = time.perf_counter()
        accuracy = held_out_accuracy(trainer, prompts, answers, options.eval_samples, tokens, temperature)
        eval_times.append(time.perf_counter() - start)
        curve.append([step, accuracy])
        logger.info(
            "%s seed %d step %d: held-out sampled accuracy %.3f (eval %.0f s, last step %.0f s)",
            method,
            seed,
            step,
            accuracy,
            eval_times[-1],
            step_times[-1] if step_times else 0.0,
        )

    class Probe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            step_times.append(time.perf_counter() - self.start)
            logger.info("%s seed %d step %d: %.0f s", method, seed, state.global_step, step_times[-1])
            if state.global_step % options.eval_every == 0 or state.global_step == options.steps:
                evaluate(state.global_step)

    trainer.add_callback(Probe())
    evaluate(0)
    trainer.train()
    rewards = [e["reward"] for e in trainer.state.log_history if "reward" in e]
    return {"curve": curve, "seconds_per_step": step_times, "seconds_per_eval": eval_times, "train_reward": rewards}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="default: 0 1 (0 with --validate_lr)")
    parser.add_argument("--methods", nargs="+", default=["prime", "rloo"], choices=["prime", "rloo"])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default: the recipe's max_steps)")
    parser.add_argument("--eval_every", type=int, default=10)
    parser.add_argument("--eval_prompts", type=int, default=26, help="held-out prompts (at most 26)")
    parser.add_argument("--eval_samples", type=int, default=3)
    parser.add_argument("--work_dir", default="/tmp/prime-trl-smollm2-learning")
    parser.add_argument("--write_data", action="store_true", help="only write the data files and exit")
    parser.add_argument(
        "--validate_lr",
        type=float,
        nargs="+",
        metavar="LR",
        help="validation mode: PRIME with learning_rate = prm_learning_rate = each LR, scored on validation sums "
        "carved out of the training split (the test split is not used)",
    )
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    write_data()
    if options.write_data:
        return 0
    import torch

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from prime_trl.data import load_prime_file

    settings = recipe()
    options.steps = options.steps or settings["max_steps"]
    train = load_prime_file(DATA_DIR / "one_digit_sums_train.jsonl", system_prompt=settings["system_prompt"])
    if options.validate_lr:
        return validate(options, settings, train)
    options.seeds = options.seeds or [0, 1]
    test = load_prime_file(DATA_DIR / "one_digit_sums_test.jsonl", system_prompt=settings["system_prompt"])
    test = test.select(range(min(options.eval_prompts, len(test))))
    runs: dict[str, dict[str, dict]] = {method: {} for method in options.methods}
    for seed in options.seeds:
        for method in options.methods:
            runs[method][str(seed)] = run(method, seed, options, settings, train, test)
            write_report(options, settings, test, runs)  # after every run: a job stopped early keeps what it measured
    return 0


def validate(options, settings: dict, train) -> int:
    """--validate_lr: PRIME at each learning rate (policy and PRM together) on the training sums minus the
    validation ones, validation accuracy at step 0 and at the end; results merged into VALIDATION_RESULT."""
    held = validation_ids(list(train["id"]))
    validation = train.filter(lambda row: row["id"] in held)
    train = train.filter(lambda row: row["id"] not in held)
    options.eval_every = options.steps  # step 0 and the end only: the sweep compares end points
    for seed in options.seeds or [0]:
        for lr in options.validate_lr:
            tuned = {**settings, "learning_rate": lr, "prm_learning_rate": lr}
            result = run("prime", seed, options, tuned, train, validation, name=f"validate-lr{lr:g}-{seed}")
            write_validation(options, settings, len(train), validation, f"{lr:g}", str(seed), result)
    return 0


# Recipe settings the BENCHMARKS.md section quotes.
REPORTED_SETTINGS = ("per_device_train_batch_size", "num_generations", "max_completion_length", "learning_rate")


def write_report(options, settings: dict, test, runs: dict[str, dict[str, dict]]) -> None:
    report = {
        "benchmark": "smollm2_learning",
        "command": "python benchmarks/smollm2_learning.py " + " ".join(sys.argv[1:]),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "machine": _machine(),
        "config": str(CONFIG.relative_to(REPO)),
        "recipe": {key: settings[key] for key in REPORTED_SETTINGS},
        "steps": options.steps,
        "eval": {"prompts": len(test), "samples": options.eval_samples, "every": options.eval_every},
        "runs": runs,
    }
    RESULT.parent.mkdir(parents=True, exist_ok=True)
    RESULT.write_text(json.dumps(report, indent=2))
    logger.info("wrote %s", RESULT)


def _machine() -> dict:
    import torch

    return {"cpu_count": os.cpu_count(), "platform": platform.platform(), "torch_threads": torch.get_num_threads()}


def write_validation(options, settings: dict, n_train: int, validation, lr: str, seed: str, result: dict) -> None:
    """Merge one (lr, seed) run into VALIDATION_RESULT (re-read first: parallel processes each add their values)."""
    report = json.loads(VALIDATION_RESULT.read_text()) if VALIDATION_RESULT.exists() else {}
    runs = report.get("runs", {})
    runs.setdefault(lr, {})[seed] = result
    command = "python benchmarks/smollm2_learning.py " + " ".join(sys.argv[1:])
    report.update(
        benchmark="smollm2_validation",
        commands=sorted(set(report.get("commands", [])) | {command}),
        date=datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        machine=_machine(),
        config=str(CONFIG.relative_to(REPO)),
        recipe_learning_rate=settings["learning_rate"],
        recipe_prm_learning_rate=settings["prm_learning_rate"],
        steps=options.steps,
        train_prompts=n_train,
        validation={"prompts": len(validation), "samples": options.eval_samples, "ids": sorted(validation["id"])},
        runs=dict(sorted(runs.items(), key=lambda item: float(item[0]))),
    )
    VALIDATION_RESULT.parent.mkdir(parents=True, exist_ok=True)
    VALIDATION_RESULT.write_text(json.dumps(report, indent=2))
    logger.info("wrote %s (lr %s seed %s)", VALIDATION_RESULT, lr, seed)


if __name__ == "__main__":
    sys.exit(main())
