"""Two CPU processes (torchrun, gloo): PRIME's extra state stays correct across processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPTS = Path(__file__).parent / "scripts"


def torchrun(script: str, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(SCRIPTS / script), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss_type, update, engine", [("ce", "single", "ddp"), ("dpo", "double", "ddp"), ("ce", "single", "fsdp2")]
)
def test_two_process_training_keeps_adapters_identical(tiny_model_dir, tmp_path, loss_type, update, engine):
    torchrun("ddp_train.py", tiny_model_dir, str(tmp_path), loss_type, update, engine)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["world"] == rank1["world"] == 2
    for name, after in rank0["after"].items():
        assert torch.equal(after, rank1["after"][name]), f"{name} differs between ranks"
    for role in (".default.", ".prm."):
        moved = [n for n in rank0["after"] if role in n and not torch.equal(rank0["after"][n], rank0["before"][n])]
        assert moved, f"no {role.strip('.')} adapter weight changed"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["replicated", "fsdp2"])
def test_distributed_prm_update_equals_single_process(tiny_model_dir, tmp_path, mode):
    """5 rows on one process and 3 on the other give the same PRM update as all 8 rows in one process
    (summed, correctly weighted gradients; with FSDP2 also lockstep passes over sharded parameters)."""
    torchrun("prm_update_equivalence.py", tiny_model_dir, str(tmp_path), mode)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world"] == 2 and result["max_abs_update"] > 1e-4
    assert result["max_abs_diff"] < 1e-6
