"""Run under `torchrun --nproc_per_node 2`: one PRM update with each rank holding half of the rows must equal a
single-process update on all rows. Mode "replicated" (DDP-style: every rank holds the whole model), "fsdp2"
(the model sharded with torch's fully_shard), "zero3" (DeepSpeed ZeRO-3 engine; PRM adapter outside it) or
"zero3-checkpointing" (the same with gradient checkpointing on the distributed side only). Rank 0 writes the
largest difference to <out>/result.json."""

import json
import sys

import torch
import torch.distributed as dist

torch.set_num_threads(1)

from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from prime_trl.algo.distributed import full_parameters  # noqa: E402
from prime_trl.algo.prm import CompletionBatch, ImplicitPRM, add_prm_adapter, default_prm_lora_config  # noqa: E402


def build(model_dir):
    torch.manual_seed(0)
    model = get_peft_model(
        AutoModelForCausalLM.from_pretrained(model_dir), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")
    )
    add_prm_adapter(model, "prm", None, default_prm_lora_config(model.peft_config["default"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    return model.train()


def sgd_update(model, batch, labels):
    """Returns {name: -gradient} of the PRM adapter after one update (SGD, lr 1)."""
    prm = ImplicitPRM(model, "prm", beta=0.05, micro_batch_size=3, max_grad_norm=1e9)
    prm.create_optimizer(learning_rate=1.0)
    prm.optimizer = torch.optim.SGD(prm.parameters(), lr=1.0)
    prm.scheduler = torch.optim.lr_scheduler.LambdaLR(prm.optimizer, lambda _: 1.0)

    def prm_weights():  # full tensors, also when FSDP2 or ZeRO-3 holds only a shard per process
        with full_parameters(prm.parameters()):
            full = {n: p.full_tensor() if hasattr(p, "full_tensor") else p for n, p in model.named_parameters()}
            return {n: p.detach().clone() for n, p in full.items() if ".prm." in n}

    before = prm_weights()
    prm.score_and_update(batch, labels)
    return {n: p - before[n] for n, p in prm_weights().items()}


def main(model_dir, out_dir, mode):
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    gen = torch.Generator().manual_seed(1)
    rows = 8
    batch = CompletionBatch(
        prompt_ids=torch.randint(3, 250, (rows, 4), generator=gen),
        prompt_mask=torch.ones(rows, 4, dtype=torch.long),
        completion_ids=torch.randint(3, 250, (rows, 6), generator=gen),
        completion_mask=(torch.arange(6) < torch.randint(1, 7, (rows, 1), generator=gen)).long(),
    )
    labels = torch.tensor([1.0, 0, 0, 1, 1, 1, 0, 0])
    # Uneven split on purpose (the accuracy filter leaves ranks with different row counts): 5 rows vs 3.
    mine = torch.arange(0, 5) if rank == 0 else torch.arange(5, rows)

    model = build(model_dir)
    if mode == "fsdp2":
        from torch.distributed.fsdp import fully_shard

        for layer in model.base_model.model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    if mode == "zero3-checkpointing":  # only the distributed side recomputes activations in the backward
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if mode.startswith("zero3"):
        import deepspeed

        policy = [p for n, p in model.named_parameters() if p.requires_grad]
        config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": 3}}
        config["zero_allow_untested_optimizer"] = True
        deepspeed.initialize(model=model, optimizer=torch.optim.SGD(policy, lr=0.0), config=config)
    distributed_delta = sgd_update(model, batch.select(mine), labels[mine])

    if rank == 0:
        dist.destroy_process_group()  # the single-process reference must not see the process group
        reference = sgd_update(build(model_dir), batch, labels)
        diff = max((distributed_delta[n] - reference[n]).abs().max().item() for n in reference)
        scale = max(reference[n].abs().max().item() for n in reference)
        json.dump({"max_abs_diff": diff, "max_abs_update": scale, "world": world}, open(f"{out_dir}/result.json", "w"))
    else:
        dist.destroy_process_group()


if __name__ == "__main__":
    main(*sys.argv[1:4])
