"""Run by tests/test_distributed.py under `torchrun --nproc_per_node 2` (CPU, gloo).

Resuming is exact under a multi-process engine: 4 steps in one run give the same adapters as 2 steps, a new
trainer resumed from checkpoint-2, and 2 more steps. Arguments: model_dir out_dir engine (see engines.py).
Rank 0 writes the largest difference, and how far each adapter moved, to <out>/result.json.
"""

import json
import os
import sys

import torch

torch.set_num_threads(1)

from engines import adapters, make_trainer, shutdown  # noqa: E402


def main(model_dir: str, out_dir: str, engine: str) -> None:
    checkpoints = dict(max_steps=4, save_strategy="steps", save_steps=2)
    straight = make_trainer(model_dir, os.path.join(out_dir, "straight"), engine, **checkpoints)
    initial = adapters(straight)
    straight.train()
    expected = adapters(straight)
    resumed = make_trainer(model_dir, os.path.join(out_dir, "resumed"), engine, **checkpoints)
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
    shutdown()
