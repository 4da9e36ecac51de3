"""Shared by the torchrun test scripts (CPU, gloo): the trainer arguments that select a multi-process engine, a
small PRIME trainer on a coin-flip reward, and the adapters' full values on every rank."""

import sys
from pathlib import Path

import torch
from datasets import Dataset

from prime_trl import PRIMETrainer
from prime_trl.algo.distributed import full_parameters, full_tensor

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: the set-up the test modules share
from helpers import prime_trainer  # noqa: E402


def engine_args(engine: str) -> dict:
    """``ddp`` (plain data parallel), ``fsdp2`` (torch's fully_shard) or ``zero2`` / ``zero3`` (DeepSpeed)."""
    if engine == "ddp":
        return {}
    if engine == "fsdp2":
        return {"fsdp": "full_shard", "fsdp_config": {"fsdp_version": 2}}
    if engine in ("zero2", "zero3"):
        # No train_batch_size: DeepSpeed derives it from these and the world size.
        config = {
            "zero_optimization": {"stage": int(engine[-1])},
            "train_micro_batch_size_per_gpu": "auto",
            "gradient_accumulation_steps": "auto",
            "gradient_clipping": "auto",
            "zero_allow_untested_optimizer": True,
        }
        return {"deepspeed": config}
    raise ValueError(f"unknown engine {engine!r}")


def make_trainer(model_dir: str, out_dir: str, engine: str, **overrides) -> PRIMETrainer:
    """PRIME on 24 prompts; global batch 12 = 3 groups of 4, so the middle group straddles the two ranks. With
    sharded parameters (FSDP2, ZeRO-3) the accuracy filter is on: the ranks keep different numbers of rows and
    must still run their PRM passes in lockstep."""
    settings = dict(
        per_device_train_batch_size=6,
        num_generations=4,
        max_completion_length=10,
        max_steps=3,
        learning_rate=0.05,
        prm_learning_rate=0.05,
        accuracy_filter=engine in ("fsdp2", "zero3"),
        gradient_checkpointing=False,
        logging_steps=1,
        seed=3,
        **engine_args(engine),
    )
    dataset = Dataset.from_list([{"prompt": f"Q{i}="} for i in range(24)])
    return prime_trainer(model_dir, out_dir, dataset, **{**settings, **overrides})


def adapters(trainer: PRIMETrainer) -> dict[str, torch.Tensor]:
    """Every LoRA weight, whole, also when FSDP2 / ZeRO-3 hold a shard per process (collective: call on all)."""
    lora = {name: param for name, param in trainer.model.named_parameters() if "lora_" in name}
    with full_parameters(list(lora.values())):
        return {name: full_tensor(param).detach().clone() for name, param in lora.items()}


def shutdown() -> None:
    """End a torchrun script in step: every rank waits for the others, then the process group is torn down before
    the interpreter exits, rather than leaving gloo's threads to the interpreter's shutdown (a rank once aborted
    there with "terminate called without an active exception" after its work was done)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
