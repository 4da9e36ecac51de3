"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (CPU, gloo).

Trains PRIME for a few steps with groups split across the two processes, saves the model to <out>/saved and
writes, per rank, the adapters before and after training and the grad mode of every shared-prefix pass to
<out>/rank<r>.pt. Arguments: model_dir out_dir
loss_type update engine, where engine is "ddp", "fsdp2", "zero2" or "zero3" (see engines.py).
"""

import os
import sys

import torch

torch.set_num_threads(1)

from engines import adapters, make_trainer, shutdown  # noqa: E402

import prime_trl.algo.prefix as prefix  # noqa: E402

shared_passes = []
_shared_prefix_forward = prefix.shared_prefix_forward


def counting_shared_prefix_forward(*args, **kwargs):
    shared_passes.append(torch.is_grad_enabled())
    return _shared_prefix_forward(*args, **kwargs)


prefix.shared_prefix_forward = counting_shared_prefix_forward
# The prompts here are a few tokens long: share wherever rows repeat a prompt, since this checks correctness, not speed.
prefix.MIN_SAVED_TOKEN_FRACTION = 0.0


def main(model_dir: str, out_dir: str, loss_type: str, update: str, engine: str) -> None:
    trainer = make_trainer(model_dir, out_dir, engine, prm_loss_type=loss_type, prm_update=update)
    before = adapters(trainer)
    trainer.train()
    trainer.save_model(os.path.join(out_dir, "saved"))  # every process: gathering sharded adapters is collective
    rank = int(os.environ.get("RANK", 0))
    world = trainer.accelerator.num_processes
    result = {"before": before, "after": adapters(trainer), "world": world, "shared_passes": shared_passes}
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


if __name__ == "__main__":
    main(*sys.argv[1:6])
    shutdown()
