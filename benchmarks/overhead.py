"""What PRIME costs per step, against TRL's GRPO, and what sharing one base saves.

Variants, all on the same random model, prompts, batch and completion length (random models rarely emit EOS,
so every completion runs to the length limit and all variants do the same generation work):

- ``grpo``      TRL's `GRPOTrainer`, LoRA policy (the baseline)
- ``prime``     `PRIMETrainer`: LoRA policy + LoRA PRM on one frozen base, reference = adapters off
- ``separate``  PRIME as the official code does it: a full trainable PRM model and a full frozen reference
                model next to the LoRA policy (same update rule, same micro-batching)
- ``prime_qlora`` PRIME on a 4-bit (nf4) base (only with --qlora; peak memory of QLoRA vs LoRA)

Each run is its own subprocess (so each has its own peak RSS); runs alternate A B C A B C ... and ratios are
taken pair by pair within a round, then summarised by median, min and max. Step time is the wall time of an
optimizer step after warm-up; peak memory is the process's peak RSS minus its RSS just before the model was built.

    python benchmarks/overhead.py --size demo --rounds 3
    python benchmarks/overhead.py --size large --rounds 3 --qlora
"""

from __future__ import annotations

import argparse
import copy
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

SIZES = {
    # the demo model's shape (prime_trl.demo.model.DemoModelConfig), byte-level vocabulary
    "demo": dict(
        hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2, intermediate_size=512, completion=48, prompts=4
    ),
    # ~71M parameters: model compute no longer negligible next to Python overhead
    "large": dict(
        hidden_size=768, num_layers=8, num_heads=12, num_kv_heads=4, intermediate_size=3072, completion=96, prompts=2
    ),
}


# ----------------------------------------------------------------------------------------------------------------
# One run (in its own process)
# ----------------------------------------------------------------------------------------------------------------


def worker(variant: str, size: str, steps: int, warmup: int, model_dir: str) -> dict:
    import torch

    torch.set_num_threads(1)
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from prime_trl import PRIMEConfig, PRIMETrainer
    from prime_trl.algo.prm import ImplicitPRM, completion_log_probs

    shape = SIZES[size]
    rows = 4 * shape["prompts"]
    common = trainer_args(f"/tmp/prime-overhead-{variant}", rows, 4, shape["completion"], warmup + steps)
    dataset = Dataset.from_list([{"prompt": f"Q:{i}+{i % 7}*3=?A:"} for i in range(64)])

    class SeparateModelsPRM(ImplicitPRM):
        """The official layout: a full PRM model and a full reference model (the update rule is unchanged)."""

        def __init__(self, prm_model, ref_model, **kwargs):
            super().__init__(prm_model, "full", **kwargs)
            self.ref_model = ref_model

        def parameters(self):
            return list(self.model.parameters())

        def _adapter(self, adapter):
            from contextlib import nullcontext

            return nullcontext()

        def _log_probs(self, batch, adapter, share=False):
            model = self.ref_model if adapter is None else self.model
            with torch.no_grad(), self.autocast():
                return completion_log_probs(model, batch, fused=False)

    class SeparateModelsPRIMETrainer(PRIMETrainer):
        def _build_prm(self, prm):
            base = self.model.get_base_model()
            prm_model, ref_model = copy.deepcopy(base), copy.deepcopy(base)
            for model in (prm_model, ref_model):
                model.__dict__.pop("forward", None)  # plain forward (the copied fused head points at the original)
            prm_model.requires_grad_(True).train()
            ref_model.requires_grad_(False)
            return SeparateModelsPRM(
                prm_model, ref_model, beta=self.args.prime_beta, micro_batch_size=self.args.per_device_train_batch_size
            )

    baseline_mb = rss_mb("VmRSS")
    if variant == "grpo":
        trainer = GRPOTrainer(
            model_dir,
            reward_funcs=coin_reward,
            args=GRPOConfig(**common),
            train_dataset=dataset,
            peft_config=lora_config(),
        )
    else:
        args = PRIMEConfig(**common, accuracy_filter=False)
        trainer_class = SeparateModelsPRIMETrainer if variant == "separate" else PRIMETrainer
        trainer = trainer_class(
            model_dir,
            args=args,
            reward_funcs=coin_reward,
            train_dataset=dataset,
            peft_config=lora_config(),
            quantization_config=nf4_config() if variant == "prime_qlora" else None,
        )

    # Time split of a step: wrap the pieces we can see from outside.
    timer = StepTimer(trainer, warmup, prm=trainer.prm if variant != "grpo" else None)
    trainer.train()
    params = sum(p.numel() for p in trainer.model.get_base_model().parameters())
    return {
        "variant": variant,
        "size": size,
        "base_parameters": params,
        "step_seconds": timer.step_seconds(),
        "peak_mem_mb": rss_mb("VmHWM") - baseline_mb,
        "breakdown_seconds": timer.breakdown(),
    }


# ----------------------------------------------------------------------------------------------------------------
# Driver: alternate the variants, ratios pair by pair
# ----------------------------------------------------------------------------------------------------------------


def run_variant(variant: str, size: str, steps: int, warmup: int, model_dir: str) -> dict:
    arguments = ["--size", size, "--steps", str(steps), "--warmup", str(warmup), "--model-dir", model_dir]
    return run_worker(__file__, variant, arguments)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", choices=sorted(SIZES), default="demo")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds (pairs per ratio)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per run")
    parser.add_argument("--qlora", action="store_true", help="also run PRIME on a 4-bit base")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    options = parser.parse_args()

    if options.worker:
        print(json.dumps(worker(options.worker, options.size, options.steps, options.warmup, options.model_dir)))
        return

    import tempfile

    from prime_trl.tiny import save_tiny_model

    shape = {k: v for k, v in SIZES[options.size].items() if k not in ("completion", "prompts")}
    model_dir = str(save_tiny_model(tempfile.mkdtemp(prefix=f"overhead-{options.size}-"), **shape))
    variants = ["grpo", "prime", "separate"] + (["prime_qlora"] if options.qlora else [])
    rounds = []
    for index in range(options.rounds):
        runs = {v: run_variant(v, options.size, options.steps, options.warmup, model_dir) for v in variants}
        rounds.append(runs)
        print(
            f"round {index + 1}: "
            + ", ".join(f"{v} {r['step_seconds']:.2f}s {r['peak_mem_mb']:.0f}MB" for v, r in runs.items())
        )

    def ratios(a: str, b: str, key: str) -> dict:
        return summarise([r[a][key] / r[b][key] for r in rounds])

    report = {
        "size": options.size,
        "machine": f"{' '.join(platform.uname())}, {os.cpu_count()} CPUs, every run single-threaded",
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "base_parameters": rounds[0]["prime"]["base_parameters"],
        "command": "python benchmarks/overhead.py " + " ".join(sys.argv[1:]),
        "step_time_ratio_prime_over_grpo": ratios("prime", "grpo", "step_seconds"),
        "peak_mem_ratio_prime_over_grpo": ratios("prime", "grpo", "peak_mem_mb"),
        "peak_mem_ratio_shared_over_separate": ratios("prime", "separate", "peak_mem_mb"),
        "step_time_ratio_separate_over_grpo": ratios("separate", "grpo", "step_seconds"),
        "step_seconds": {v: summarise([r[v]["step_seconds"] for r in rounds]) for v in variants},
        "peak_mem_mb": {v: summarise([r[v]["peak_mem_mb"] for r in rounds]) for v in variants},
        "prime_breakdown_seconds": {
            key: statistics.median(r["prime"]["breakdown_seconds"][key] for r in rounds)
            for key in rounds[0]["prime"]["breakdown_seconds"]
        },
    }
    if options.qlora:
        report["peak_mem_ratio_qlora_over_lora"] = ratios("prime_qlora", "prime", "peak_mem_mb")
        report["step_time_ratio_qlora_over_lora"] = ratios("prime_qlora", "prime", "step_seconds")
    write_result(f"overhead_{options.size}", report)


if __name__ == "__main__":
    main()
