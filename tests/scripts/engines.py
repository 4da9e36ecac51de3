"""The trainer arguments that select a multi-process engine in the torchrun test scripts (CPU, gloo)."""


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


def is_sharded(engine: str) -> bool:
    return engine in ("fsdp2", "zero3")
