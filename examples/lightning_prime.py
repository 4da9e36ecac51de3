"""PRIME with PyTorch Lightning on CPU, offline, in well under a minute.

A tiny random Qwen2 model (built locally, character-level tokenizer over a small alphabet) is trained with PRIME on
a toy format task: the verifier passes a completion (1.0) iff it starts with a two-digit number, else 0.0. A random
model passes about 30% of the time, so prompt groups are mixed and both the PRM and the policy get a signal.
Everything Lightning gives you works as usual: the CSV logger, ``ModelCheckpoint`` (both adapters + both optimizers;
resume with ``--resume``) and the DDP strategy.

    python examples/lightning_prime.py                                  # 40 steps, one process
    python examples/lightning_prime.py --resume out/lightning/checkpoints/last.ckpt --steps 60
    torchrun --nproc_per_node 2 examples/lightning_prime.py --devices 2  # DDP, 2 CPU processes

For a real run, pass ``--model Qwen/Qwen2.5-0.5B-Instruct`` and swap in your data and verifier, e.g. rows with
``prompt`` + ``answer`` columns and ``prime_trl.rewards.math_reward`` (any data set `PRIMETrainer` takes works).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")  # tiny models: threads only contend
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import lightning  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.callbacks import ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from peft import LoraConfig  # noqa: E402

from prime_trl.lightning import PRIMEDataModule, PRIMEModule, PRIMEModuleConfig  # noqa: E402
from prime_trl.tiny import build_model, build_tokenizer  # noqa: E402

ALPHABET = "0123456789+-*=?QA: "


def starts_with_number(completions: list[str], **kwargs) -> list[float]:
    """The toy verifier (TRL reward-function form): 1.0 iff the completion starts with two digits."""
    return [float(text[:2].isdigit()) for text in completions]


def toy_prompts(n: int = 64) -> list[dict[str, str]]:
    return [{"prompt": f"Q:{i % 9 + 1}+{i % 7 + 2}=?A:"} for i in range(n)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="hub id or local path (default: a tiny random model built in memory)")
    parser.add_argument("--out", default="out/lightning", help="logs, checkpoints and the exported adapters")
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--devices", type=int, default=1, help="processes (>1: DDP; launch with torchrun)")
    parser.add_argument("--resume", help="a Lightning checkpoint to continue from")
    args = parser.parse_args()

    torch.set_num_threads(1)
    lightning.seed_everything(0)
    out = Path(args.out)
    model, tokenizer = args.model, None
    if model is None:  # every process builds the same model from the same seed: no download, no shared files
        tokenizer = build_tokenizer(ALPHABET)
        model = build_model(tokenizer, hidden_size=64, num_layers=2, seed=0)

    config = PRIMEModuleConfig(
        num_generations=4,
        max_completion_length=16,
        per_device_train_batch_size=16,  # all 16 rows of a step in one policy forward
        learning_rate=1e-2,
        prm_learning_rate=1e-2,
        lr_scheduler_type="constant",
    )
    lora = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    module = PRIMEModule(model, starts_with_number, config, peft_config=lora, tokenizer=tokenizer)
    data = PRIMEDataModule(toy_prompts(), prompts_per_device=4)

    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy="ddp" if args.devices > 1 else "auto",
        max_steps=args.steps,
        logger=CSVLogger(str(out), name="logs"),
        log_every_n_steps=1,
        callbacks=[ModelCheckpoint(dirpath=str(out / "checkpoints"), every_n_train_steps=20, save_last=True)],
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data, ckpt_path=args.resume)

    if trainer.is_global_zero:
        module.save_pretrained(out / "adapters")  # policy adapter + prm/ (PEFT format)
        metrics = trainer.logger.log_dir + "/metrics.csv"
        print(f"metrics: {metrics}\nadapters: {out / 'adapters'}")
        print_reward_trend(metrics)


def print_reward_trend(path: str) -> None:
    """Mean outcome reward and PRM accuracy over the first and the second half of the logged steps (a tiny random
    model learns slowly and noisily; on this toy the pass rate typically creeps up by a few points in 40 steps)."""
    import csv

    with open(path) as handle:
        rows = [row for row in csv.DictReader(handle) if row.get("reward")]
    half = len(rows) // 2
    for name in ("reward", "prm/accuracy"):
        values = [[float(r[name]) for r in part if r.get(name)] for part in (rows[:half], rows[half:])]
        if all(values):
            first, second = (sum(v) / len(v) for v in values)
            print(f"{name:>14}: first half {first:.3f} -> second half {second:.3f}")


if __name__ == "__main__":
    main()
