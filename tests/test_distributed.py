"""Two CPU processes (torchrun, gloo): PRIME's extra state stays correct across processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPTS = Path(__file__).parent / "scripts"


def torchrun(script: str, *args: str) -> None:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, str(SCRIPTS / script), *args], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-4000:]


def needs_deepspeed(engine: str) -> None:
    if engine.startswith("zero"):
        pytest.importorskip("deepspeed", reason="DeepSpeed tests need the 'deepspeed' extra (part of 'dev')")


@pytest.mark.slow
@pytest.mark.parametrize(
    "loss_type, update, engine",
    [
        ("ce", "single", "ddp"),
        ("dpo", "double", "ddp"),
        ("ce", "single", "fsdp2"),
        ("ce", "single", "zero2"),
        ("dpo", "double", "zero3"),
    ],
)
def test_two_process_training_keeps_adapters_identical(tiny_model_dir, tmp_path, loss_type, update, engine):
    needs_deepspeed(engine)
    torchrun("ddp_train.py", tiny_model_dir, str(tmp_path), loss_type, update, engine)
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["world"] == rank1["world"] == 2
    for name, after in rank0["after"].items():
        assert torch.equal(after, rank1["after"][name]), f"{name} differs between ranks"
    if engine == "ddp":  # share_prompt_prefix is on by default; DDP runs it (the sharded engines fall back)
        assert True in rank0["shared_passes"] and True in rank1["shared_passes"]
    for role in (".default.", ".prm."):
        moved = [n for n in rank0["after"] if role in n and not torch.equal(rank0["after"][n], rank0["before"][n])]
        assert moved, f"no {role.strip('.')} adapter weight changed"
    # save_model wrote both trained adapters whole (gathered from the shards under FSDP2 / ZeRO-3).
    for adapter, directory in (("default", tmp_path / "saved"), ("prm", tmp_path / "saved" / "prm")):
        saved = load_file(directory / "adapter_model.safetensors")
        live = {n.replace(f".{adapter}.", "."): t for n, t in rank0["after"].items() if f".{adapter}." in n}
        assert saved.keys() == live.keys()
        for name, tensor in live.items():
            assert torch.equal(saved[name], tensor), f"saved {adapter} adapter differs at {name}"


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["replicated", "fsdp2", "zero3", "zero3-checkpointing"])
def test_distributed_prm_update_equals_single_process(tiny_model_dir, tmp_path, mode):
    """5 rows on one process and 3 on the other give the same PRM update as all 8 rows in one process
    (summed, correctly weighted gradients; with FSDP2 / ZeRO-3 also lockstep passes over sharded parameters and,
    for ZeRO-3, the step on the gathered adapter written back into its partitions, with and without gradient
    checkpointing re-gathering parameters in the backward)."""
    needs_deepspeed(mode)
    torchrun("prm_update_equivalence.py", tiny_model_dir, str(tmp_path), mode)
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world"] == 2 and result["max_abs_update"] > 1e-4
    assert result["max_abs_diff"] < 1e-6


@pytest.mark.slow
def test_zero3_resume_is_exact(tiny_model_dir, tmp_path):
    """Under ZeRO-3 (adapters partitioned), 2 steps + resume from checkpoint-2 + 2 steps == 4 straight steps: the
    PRM adapter is gathered for saving and written back into its partitions on loading."""
    needs_deepspeed("zero3")
    torchrun("resume_train.py", tiny_model_dir, str(tmp_path), "zero3")
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["prm_moved"] > 1e-3 and result["policy_moved"] > 1e-3
    assert result["max_abs_diff"] < 1e-6
