"""Two CPU processes (torchrun, gloo): policy and PRM adapters must end identical on both ranks."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).parent / "scripts" / "ddp_train.py"


@pytest.mark.slow
@pytest.mark.parametrize("loss_type, update", [("ce", "single"), ("dpo", "double")])
def test_two_process_training_keeps_adapters_identical(tiny_model_dir, tmp_path, loss_type, update):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(SCRIPT),
        tiny_model_dir,
        str(tmp_path),
        loss_type,
        update,
    ]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["world"] == rank1["world"] == 2
    for name, after in rank0["after"].items():
        assert torch.equal(after, rank1["after"][name]), f"{name} differs between ranks"
    for role in (".default.", ".prm."):
        moved = [n for n in rank0["after"] if role in n and not torch.equal(rank0["after"][n], rank0["before"][n])]
        assert moved, f"no {role.strip('.')} adapter weight changed"
