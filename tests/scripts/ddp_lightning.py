"""Run by tests/test_lightning.py under `torchrun --nproc_per_node 2` (CPU, gloo, Lightning's DDP strategy).

Trains `PRIMEModule` for a few steps, each process on its own share of the prompts, saves a Lightning checkpoint
at the end and writes, per rank, to <out>/rank<r>.pt: the adapters before and after training, the prompts the rank
generated for, the world size Lightning saw and the PRM optimizer's step count.
"""

import os
import sys
import zlib

import torch

torch.set_num_threads(1)

import lightning  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from peft import LoraConfig  # noqa: E402

from prime_trl.lightning import PRIMEDataModule, PRIMEModule, PRIMEModuleConfig  # noqa: E402

seen_prompts: list[str] = []


def coin_reward(prompts, completions, **kwargs):
    seen_prompts.extend(prompts)
    return [float(zlib.crc32(c.encode()) % 2) for c in completions]


def main(model_dir: str, out_dir: str, max_steps: str) -> None:
    lightning.seed_everything(3)
    config = PRIMEModuleConfig(
        num_generations=4,
        max_completion_length=10,
        per_device_train_batch_size=4,  # two policy micro-batches per step: exercises DDP's no_sync accumulation
        prm_micro_batch_size=4,
        learning_rate=0.05,
        prm_learning_rate=0.05,
        lr_scheduler_type="constant",
        accuracy_filter=False,
    )
    module = PRIMEModule(
        model_dir, coin_reward, config, peft_config=LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    data = PRIMEDataModule([{"prompt": f"Q{i}="} for i in range(16)], prompts_per_device=2, seed=3)
    adapters = lambda: {n: p.detach().clone() for n, p in module.model.named_parameters() if "lora_" in n}  # noqa: E731
    before = adapters()
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=2,
        strategy="ddp",
        max_steps=int(max_steps),
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[ModelCheckpoint(dirpath=out_dir, filename="last-step")],
    )
    trainer.fit(module, datamodule=data)
    prm_steps = {int(state["step"]) for state in module.prm.optimizer.state.values()}
    torch.save(
        {
            "before": before,
            "after": adapters(),
            "world": trainer.world_size,
            "prompts": seen_prompts,
            "prm_steps": prm_steps,
            "global_step": trainer.global_step,
        },
        os.path.join(out_dir, f"rank{trainer.global_rank}.pt"),
    )


if __name__ == "__main__":
    main(*sys.argv[1:4])
