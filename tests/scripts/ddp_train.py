"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (CPU, gloo).

Trains PRIME for a few steps with groups split across the two processes, saves the model to <out>/saved and
writes, per rank, the adapters before and after training to <out>/rank<r>.pt. Arguments: model_dir out_dir loss_type update engine, where
engine is "ddp", "fsdp2", "zero2" or "zero3" (see engines.py). With sharded parameters (FSDP2, ZeRO-3) the
accuracy filter is on, so the processes keep different numbers of rows and must still run their PRM passes in
lockstep.
"""

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


def main(model_dir: str, out_dir: str, loss_type: str, update: str, engine: str) -> None:
    args = PRIMEConfig(
        output_dir=out_dir,
        per_device_train_batch_size=6,  # global batch 12 = 3 groups of 4: the middle group straddles the ranks
        num_generations=4,
        max_completion_length=10,
        max_steps=3,
        learning_rate=0.05,
        prm_learning_rate=0.05,
        prm_loss_type=loss_type,
        prm_update=update,
        accuracy_filter=is_sharded(engine),
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        seed=3,
        **engine_args(engine),
    )
    dataset = Dataset.from_list([{"prompt": f"Q{i}="} for i in range(24)])
    trainer = PRIMETrainer(
        model_dir,
        args=args,
        reward_funcs=coin_reward,
        train_dataset=dataset,
        peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"),
    )

    def adapters() -> dict[str, torch.Tensor]:  # full tensors, also when FSDP2 / ZeRO-3 hold a shard per process
        lora = {n: p for n, p in trainer.model.named_parameters() if "lora_" in n}
        with full_parameters(list(lora.values())):
            return {n: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().clone() for n, p in lora.items()}

    before = adapters()
    trainer.train()
    trainer.save_model(os.path.join(out_dir, "saved"))  # every process: gathering sharded adapters is collective
    rank = int(os.environ.get("RANK", 0))
    world = trainer.accelerator.num_processes
    torch.save({"before": before, "after": adapters(), "world": world}, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:6])
