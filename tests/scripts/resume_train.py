"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (CPU, gloo).

Resuming is exact under a multi-process engine: 4 steps in one run give the same adapters as 2 steps, a new
trainer resumed from checkpoint-2, and 2 more steps. Arguments: model_dir out_dir engine (see engines.py).
Rank 0 writes the largest difference, and how far the PRM moved, to <out>/result.json.
"""

import json
import os
import sys
import zlib

import torch
from engines import engine_args, is_sharded

torch.set_num_threads(1)

from datasets import Dataset  # noqa: E402
from peft import LoraConfig  # noqa: E402

from prime_trl import PRIMEConfig, PRIMETrainer  # noqa: E402
from prime_trl.distributed import full_parameters  # noqa: E402


def coin_reward(completions, **kwargs):
    return [float(zlib.crc32(c.encode()) % 2) for c in completions]


def build(model_dir: str, out_dir: str, engine: str) -> PRIMETrainer:
    args = PRIMEConfig(
        output_dir=out_dir,
        per_device_train_batch_size=6,
        num_generations=4,
        max_completion_length=10,
        max_steps=4,
        learning_rate=0.05,
        prm_learning_rate=0.05,
        accuracy_filter=is_sharded(engine),
        use_cpu=True,
        bf16=False,
        report_to="none",
        save_strategy="steps",
        save_steps=2,
        logging_steps=1,
        seed=3,
        **engine_args(engine),
    )
    return PRIMETrainer(
        model_dir,
        args=args,
        reward_funcs=coin_reward,
        train_dataset=Dataset.from_list([{"prompt": f"Q{i}="} for i in range(24)]),
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )


def adapters(trainer: PRIMETrainer) -> dict[str, torch.Tensor]:
    lora = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
    with full_parameters(list(lora.values())):
        return {n: p.detach().clone() for n, p in lora.items()}


def main(model_dir: str, out_dir: str, engine: str) -> None:
    straight = build(model_dir, os.path.join(out_dir, "straight"), engine)
    initial = adapters(straight)
    straight.train()
    expected = adapters(straight)
    resumed = build(model_dir, os.path.join(out_dir, "resumed"), engine)
    resumed.train(resume_from_checkpoint=os.path.join(out_dir, "straight", "checkpoint-2"))
    actual = adapters(resumed)
    if int(os.environ.get("RANK", 0)) == 0:
        result = {
            "max_abs_diff": max((expected[n] - actual[n]).abs().max().item() for n in expected),
            "prm_moved": max((expected[n] - initial[n]).abs().max().item() for n in expected if ".prm." in n),
            "policy_moved": max((expected[n] - initial[n]).abs().max().item() for n in expected if ".default." in n),
        }
        with open(os.path.join(out_dir, "result.json"), "w") as file:
            json.dump(result, file)


if __name__ == "__main__":
    main(*sys.argv[1:4])
