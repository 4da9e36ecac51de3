"""PRIMEModule on a tiny local model with Lightning on CPU: what trains, equivalence with PRIMETrainer,
checkpoints and exact resume, the rollout's masks, and a 2-process DDP run."""

import logging
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch

lightning = pytest.importorskip("lightning")

from helpers import TINY_LORA, assert_only_adapters_moved, coin_reward, prime_config, snapshot  # noqa: E402
from lightning.pytorch.callbacks import Callback, ModelCheckpoint  # noqa: E402
from lightning.pytorch.loggers import CSVLogger  # noqa: E402
from peft import LoraConfig, PeftModel  # noqa: E402
from transformers import AutoModelForCausalLM  # noqa: E402

from prime_trl import PRIMEConfig, PRIMETrainer  # noqa: E402
from prime_trl.algo.prm import CompletionBatch  # noqa: E402
from prime_trl.lightning import PRIMEDataModule, PRIMEModule, PRIMEModuleConfig  # noqa: E402

LORA = TINY_LORA
DDP_SCRIPT = Path(__file__).parent / "scripts" / "ddp_lightning.py"


def make_config(**overrides):
    settings = dict(
        num_generations=4,
        max_completion_length=12,
        per_device_train_batch_size=4,
        prm_micro_batch_size=4,
        learning_rate=0.05,
        prm_learning_rate=0.05,
        lr_scheduler_type="constant",
        accuracy_filter=False,
        seed=5,
    )
    settings.update(overrides)
    return PRIMEModuleConfig(**settings)


def make_module(model_dir, reward=coin_reward, **overrides):
    lightning.seed_everything(0)  # the policy adapter's random A matrices
    return PRIMEModule(model_dir, reward, make_config(**overrides), peft_config=LoraConfig(**LORA))


def make_data(num_prompts=6, prompts_per_device=2):
    rows = [{"prompt": f"Q{i}=", "answer": str(i % 10)} for i in range(num_prompts)]
    return PRIMEDataModule(rows, prompts_per_device=prompts_per_device, seed=11)


def make_trainer(max_steps, **kwargs):
    settings = dict(
        accelerator="cpu",
        devices=1,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    settings.update(kwargs)
    return lightning.Trainer(**settings)


def test_fit_trains_policy_and_prm_not_base(tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir)
    before = snapshot(module.model)
    trainer = make_trainer(3, logger=CSVLogger(str(tmp_path), name="csv"), log_every_n_steps=1)
    trainer.fit(module, datamodule=make_data())
    policy, prm = assert_only_adapters_moved(before, snapshot(module.model))

    # One PRIME step per batch: 3 policy optimizer steps (Lightning's global_step) and 3 PRM optimizer steps, on
    # disjoint parameter sets.
    assert trainer.global_step == 3
    assert {int(s["step"]) for s in module.prm.optimizer.state.values()} == {3}
    policy_optimizer, prm_optimizer = trainer.optimizers
    named = dict(module.model.named_parameters())
    assert {id(p) for g in policy_optimizer.param_groups for p in g["params"]} == {id(named[n]) for n in policy}
    assert {id(p) for g in prm_optimizer.param_groups for p in g["params"]} == {id(named[n]) for n in prm}

    header = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    for key in ("prm/loss", "prm/accuracy", "filter/pass_rate", "policy/loss", "reward", "completions/mean_length"):
        assert key in header


def test_gradient_checkpointing_changes_nothing(tiny_model_dir):
    """With gradient checkpointing the PRM backward re-runs its forward; it must still see the PRM adapter
    (docs/algorithm.md, easy-to-get-wrong 7) and generation must still work: two steps give the same adapters as without it."""
    runs = []
    for checkpointing in (False, True):
        module = make_module(tiny_model_dir, gradient_checkpointing=checkpointing)
        assert module.model.get_base_model().is_activation_checkpointing == checkpointing
        make_trainer(2).fit(module, datamodule=make_data())
        runs.append({n: p for n, p in snapshot(module.model).items() if "lora_" in n})
    for name, param in runs[0].items():
        torch.testing.assert_close(runs[1][name], param, rtol=1e-6, atol=1e-7)


def test_bf16_mixed_precision_trains_both_adapters(tiny_model_dir):
    module = make_module(tiny_model_dir)
    before = snapshot(module.model)
    make_trainer(2, precision="bf16-mixed").fit(module, datamodule=make_data())
    after = snapshot(module.model)
    for role in (".default.", ".prm."):
        assert all(not torch.equal(before[n], after[n]) for n in before if role in n)


def randomize_lora(model):
    """Identical non-zero LoRA weights in two models with the same adapter layout (PRM != reference)."""
    for name, param in model.named_parameters():
        if "lora_" in name:
            generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
            param.data.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def random_batch(seed, rows=12, prompt_len=5, completion_len=7):
    gen = torch.Generator().manual_seed(seed)
    prompt_mask = (torch.arange(prompt_len) >= torch.randint(0, 3, (rows, 1), generator=gen)).long()  # left padding
    return CompletionBatch(
        prompt_ids=torch.randint(3, 200, (rows, prompt_len), generator=gen) * prompt_mask,
        prompt_mask=prompt_mask,
        completion_ids=torch.randint(3, 200, (rows, completion_len), generator=gen),
        completion_mask=(
            torch.arange(completion_len) < torch.randint(1, completion_len + 1, (rows, 1), generator=gen)
        ).long(),
    )


def trainer_and_module(model_dir, out_dir, **overrides):
    """A `PRIMETrainer` and a `PRIMEModule` configured from the very same `PRIMEConfig`, with identical non-zero LoRA
    weights, ready for their PRIME steps on the same batches."""
    from datasets import Dataset

    args = prime_config(
        out_dir,
        per_device_train_batch_size=12,
        num_generations=4,
        max_completion_length=7,
        prm_learning_rate=0.05,
        prm_micro_batch_size=4,
        gradient_checkpointing=False,
        **overrides,
    )
    rows = [{"prompt": f"Q{i}=", "answer": "1"} for i in range(12)]
    trainer = PRIMETrainer(
        model_dir,
        args=args,
        reward_funcs=coin_reward,
        train_dataset=Dataset.from_list(rows),
        peft_config=LoraConfig(**LORA),
    )
    trainer.create_optimizer_and_scheduler(num_training_steps=10)
    # The mapping under test: the module is configured from the very same PRIMEConfig.
    config = PRIMEModuleConfig.from_prime_config(args, lr_scheduler_type="constant")
    module = PRIMEModule(model_dir, coin_reward, config, peft_config=LoraConfig(**LORA))
    module.configure_optimizers()
    assert module.prm.micro_batch_size == trainer.prm.micro_batch_size == 4
    for model in (trainer.model, module.model):
        randomize_lora(model)
    trainer.model.train()
    return trainer, module


@pytest.mark.parametrize(
    "overrides",
    [dict(), dict(prm_update="double", prm_loss_type="dpo", prm_num_mini_batches=2, advantage_estimator="grpo")],
    ids=["ce-single", "dpo-double-minibatches-grpo"],
)
def test_advantages_and_prm_update_match_trainer(tiny_model_dir, tmp_path, overrides):
    """Same completions and scores in, same advantages and same PRM adapter out, bit for bit, over two updates."""
    trainer, module = trainer_and_module(tiny_model_dir, tmp_path / "trl", **overrides)

    # Group 0 mixed, group 1 all correct (filtered out by the accuracy filter), group 2 mixed.
    rewards = torch.tensor([[1.0], [0], [0], [1], [1], [1], [1], [1], [0], [1], [0], [0]])
    for step in range(2):
        batch = random_batch(seed=step)
        expected = trainer._prime_step(batch, rewards, "train")
        actual = module.prime_step(batch, rewards).advantages
        assert expected.abs().sum() > 0
        assert torch.equal(actual, expected), f"advantages differ at update {step}"

    trainer_prm = {n: p for n, p in trainer.model.named_parameters() if ".prm." in n}
    module_prm = {n: p for n, p in module.model.named_parameters() if ".prm." in n}
    assert trainer_prm.keys() == module_prm.keys() and trainer_prm
    for name, param in module_prm.items():
        torch.testing.assert_close(param, trainer_prm[name], rtol=0, atol=0)
    moved = [n for n in module_prm if not torch.equal(module_prm[n], _initial_lora(n, module_prm[n]))]
    assert len(moved) == len(module_prm), "the PRM update should have changed every PRM tensor"
    # Filtered rows (group 1) get no advantage.
    assert torch.equal(actual[4:8], torch.zeros_like(actual[4:8]))


def test_outcome_labels_match_trainer_inside_and_outside_the_unit_interval(
    tiny_model_dir, tmp_path, monkeypatch, caplog
):
    """Both front ends turn the same verifier scores into the same PRM labels, batch after batch: scores in [0, 1]
    are the labels; the first batch with a score outside [0, 1] settles outcome_label='auto' on group_mean in both,
    for the rest of the run (a later batch inside [0, 1] keeps it), with one warning each."""
    import prime_trl.algo.core as core

    trainer, module = trainer_and_module(tiny_model_dir, tmp_path / "trl", accuracy_filter=False)
    recorded = []
    outcome_labels = core.outcome_labels

    def recording_outcome_labels(*args):
        labels = outcome_labels(*args)
        recorded.append((args[2], labels))  # (rule, labels)
        return labels

    monkeypatch.setattr(core, "outcome_labels", recording_outcome_labels)
    soft = [0.2, 0.9, 0.5, 1.0, 0.0, 0.4, 0.7, 0.1, 1.0, 0.6, 0.3, 0.8]
    outside = [-1.0, 2.5, 0.5, 3.0, 1.0, -2.0, 0.0, 4.0, 0.2, 0.9, -0.5, 1.5]
    expected_rules = ["score", "group_mean", "group_mean"]
    with caplog.at_level(logging.WARNING):
        for step, scores in enumerate([soft, outside, soft]):
            rewards = torch.tensor(scores).unsqueeze(-1)
            batch = random_batch(seed=step)
            expected = trainer._prime_step(batch, rewards, "train")
            actual = module.prime_step(batch, rewards).advantages
            (trainer_rule, trainer_labels), (module_rule, module_labels) = recorded
            recorded.clear()
            assert trainer_rule == module_rule == expected_rules[step], step
            assert torch.equal(module_labels, trainer_labels), step
            assert torch.equal(actual, expected), f"advantages differ at update {step}"
    assert torch.equal(trainer_labels, torch.tensor([0.0, 1, 0, 1, 0, 1, 1, 0, 1, 0, 0, 1]))  # above group mean
    assert trainer.prime_settings.outcome_label == module.settings.outcome_label == "group_mean"
    assert module.config.outcome_label == "auto"  # the user's config is left as given
    for logger_name in ("prime_trl.trainer.prime_trainer", "prime_trl.lightning.module"):
        warnings = [r for r in caplog.records if r.name == logger_name and "outside [0, 1]" in r.getMessage()]
        assert len(warnings) == 1 and "coin_reward" in warnings[0].getMessage(), logger_name


def _initial_lora(name, like):
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(like.shape, generator=generator) * 0.2


class StopAt(Callback):
    """As if the run were interrupted right after step ``step`` (and its checkpoint)."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step >= self.step:
            trainer.should_stop = True


def recording_reward(log):
    def reward(prompts, completions, **kwargs):
        log.append(tuple(prompts))
        return coin_reward(completions)

    return reward


@pytest.mark.parametrize("stop_at", [2, 3], ids=["mid-epoch", "epoch-end"])
def test_resume_matches_uninterrupted_run(tiny_model_dir, tmp_path, stop_at):
    """5 steps straight == ``stop_at`` steps, checkpoint, new module + trainer, resume with ckpt_path, the rest.

    3 steps per epoch, so the runs cross an epoch boundary (a reshuffle) and, for stop_at=2, resume mid-epoch.
    The default linear policy schedule (sized by max_steps) checks the schedulers are restored too."""
    total = 5
    straight_log, first_log, resumed_log = [], [], []
    straight = make_module(tiny_model_dir, recording_reward(straight_log), lr_scheduler_type="linear")
    make_trainer(total).fit(straight, datamodule=make_data())

    first = make_module(tiny_model_dir, recording_reward(first_log), lr_scheduler_type="linear")
    checkpoint_cb = ModelCheckpoint(dirpath=str(tmp_path), every_n_train_steps=stop_at, save_top_k=-1)
    make_trainer(total, enable_checkpointing=True, callbacks=[StopAt(stop_at), checkpoint_cb]).fit(
        first, datamodule=make_data()
    )
    (checkpoint,) = tmp_path.glob(f"*step={stop_at}.ckpt")

    resumed = make_module(tiny_model_dir, recording_reward(resumed_log), lr_scheduler_type="linear")
    trainer = make_trainer(total)
    trainer.fit(resumed, datamodule=make_data(), ckpt_path=str(checkpoint))

    assert trainer.global_step == total
    assert first_log + resumed_log == straight_log, "the resumed run must see the prompts of the uninterrupted one"
    expected, actual = dict(straight.model.named_parameters()), dict(resumed.model.named_parameters())
    adapters = [n for n in expected if "lora_" in n]
    assert any(".prm." in n for n in adapters) and any(".default." in n for n in adapters)
    for name in adapters:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0)
    for opt_straight, opt_resumed in zip(straight.trainer.optimizers, trainer.optimizers, strict=True):
        assert {int(s["step"]) for s in opt_straight.state.values()} == {
            int(s["step"]) for s in opt_resumed.state.values()
        }


def test_checkpoint_holds_adapters_optimizers_and_random_streams(tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir)
    trainer = make_trainer(2, enable_checkpointing=True, callbacks=[ModelCheckpoint(dirpath=str(tmp_path))])
    trainer.fit(module, datamodule=make_data())
    (path,) = tmp_path.glob("*.ckpt")
    checkpoint = torch.load(path, weights_only=True)  # loadable without unpickling code

    keys = set(checkpoint["state_dict"])
    assert keys and all(".default." in k or ".prm." in k for k in keys), "only the adapters, never the frozen base"
    assert keys == {"model." + n for n, _ in module.model.named_parameters() if "lora_" in n}
    assert len(checkpoint["optimizer_states"]) == 2 and len(checkpoint["lr_schedulers"]) == 2
    prm_state = checkpoint["optimizer_states"][1]["state"]
    assert len(prm_state) == sum(1 for n, _ in module.model.named_parameters() if ".prm." in n)
    assert checkpoint["prime"]["rng_states"]["cpu"].shape[0] == 1
    assert checkpoint["PRIMEDataModule"] == {"epoch": 0, "batches_done": 2}

    # A checkpoint missing adapter weights (another LoRA layout) is refused instead of silently half-loaded.
    checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if "q_proj" in k}
    with pytest.raises(RuntimeError, match="lacks .* adapter weights"):
        make_trainer(3).fit(make_module(tiny_model_dir), datamodule=make_data(), ckpt_path=_save(checkpoint, tmp_path))


def test_checkpoint_keeps_the_settled_outcome_label_and_prm_accuracy(tiny_model_dir, tmp_path):
    """A run that settled outcome_label='auto' on group_mean (a score outside [0, 1]) resumes settled, with its running
    PRM accuracy (process_reward_accuracy_gate) and without repeating the warning; an explicit rule still wins."""
    module = make_module(tiny_model_dir, process_reward_accuracy_gate=0.7)
    module.configure_optimizers()
    outside = torch.tensor([[-1.0], [2.5], [0.5], [3.0], [1.0], [-2.0], [0.0], [4.0], [0.2], [0.9], [-0.5], [1.5]])
    module.prime_step(random_batch(seed=0), outside)
    assert module.settings.outcome_label == "group_mean" and module.prime_state.prm_accuracy_ema is not None
    checkpoint = {"state_dict": module.state_dict()}
    module.on_save_checkpoint(checkpoint)
    path = _save(checkpoint, tmp_path)

    resumed = make_module(tiny_model_dir, process_reward_accuracy_gate=0.7)
    resumed.on_load_checkpoint(torch.load(path, weights_only=True))
    assert resumed.settings.outcome_label == "group_mean" and resumed.config.outcome_label == "auto"
    assert resumed.prime_state.prm_accuracy_ema == module.prime_state.prm_accuracy_ema
    assert resumed._warned == {"score_range"}

    explicit = make_module(tiny_model_dir, outcome_label="threshold")
    explicit.on_load_checkpoint(torch.load(path, weights_only=True))
    assert explicit.settings.outcome_label == "threshold"


def _save(checkpoint, tmp_path):
    path = tmp_path / "partial.ckpt"
    torch.save(checkpoint, path)
    return str(path)


def test_save_pretrained_writes_peft_adapters(tiny_model_dir, tmp_path):
    module = make_module(tiny_model_dir)
    make_trainer(1).fit(module, datamodule=make_data())
    out = tmp_path / "export"
    module.save_pretrained(out)
    loaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), str(out))
    loaded.load_adapter(str(out / "prm"), adapter_name="prm")
    trained = dict(module.model.named_parameters())
    names = [n for n, _ in loaded.named_parameters() if "lora_" in n]
    assert any(".prm." in n for n in names)
    for name, param in loaded.named_parameters():
        if "lora_" in name:
            torch.testing.assert_close(param, trained[name], rtol=0, atol=0)


def test_rollout_masks_groups_and_eos(tiny_model_dir):
    module = make_module(tiny_model_dir, max_completion_length=10)
    # Make half the vocabulary end a completion, so that most rows stop early and some run to the limit.
    eos_ids = list(range(0, 256, 2))
    module.eos_token_ids = eos_ids
    module.generation_config.eos_token_id = eos_ids
    rows = [{"prompt": "Q1="}, {"prompt": "Q22="}]
    rollout = module.generate(rows)
    batch = rollout.batch
    assert len(batch) == 8 and rollout.prompts == ["Q1="] * 4 + ["Q22="] * 4  # groups contiguous
    # Left padding: "Q1=" is one token shorter than "Q22=".
    assert batch.prompt_mask[:4].sum(1).tolist() == [3] * 4 and batch.prompt_mask[:4, 0].tolist() == [0] * 4
    assert batch.prompt_mask[4:].sum(1).tolist() == [4] * 4
    stopped = 0
    for ids, mask, kept in zip(batch.completion_ids, batch.completion_mask, rollout.completion_ids, strict=True):
        length = int(mask.sum())
        assert torch.equal(mask[:length], torch.ones(length, dtype=mask.dtype)), "the mask is a prefix"
        assert ids[:length].tolist() == kept
        is_eos = torch.isin(ids[:length], torch.tensor(eos_ids))
        if is_eos.any():  # the first EOS is the last masked token, and what follows is padding
            stopped += 1
            assert is_eos.nonzero()[0].item() == length - 1
            assert (ids[length:] == module.tokenizer.pad_token_id).all()
        else:  # truncated: all ones up to the limit
            assert length == 10
    assert stopped > 0


def test_policy_log_probs_use_sampling_temperature_prm_does_not(tiny_model_dir):
    module = make_module(tiny_model_dir, temperature=0.5)
    batch = random_batch(seed=3, rows=4)
    with torch.no_grad():
        logits = module.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
        logits = logits[:, -batch.completion_ids.shape[1] - 1 : -1]
        expected = torch.log_softmax(logits / 0.5, -1).gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
        actual = module._policy_log_probs(batch)
    mask = batch.completion_mask.bool()
    torch.testing.assert_close(actual[mask], expected[mask], rtol=1e-5, atol=1e-5)
    # The policy's fused head carries T=0.5; the PRM and the reference score at T=1, through a fused head too.
    assert module.prm.fused_log_probs
    with torch.no_grad(), module.model.disable_adapter():
        reference = module.model(input_ids=batch.input_ids, attention_mask=batch.attention_mask).logits
    reference = reference[:, -batch.completion_ids.shape[1] - 1 : -1].log_softmax(-1)
    reference = reference.gather(-1, batch.completion_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(module.prm.score(batch).ref_logps[mask], reference[mask], rtol=1e-5, atol=1e-5)


def test_config_mapping_and_validation():
    args = PRIMEConfig(
        output_dir="unused",
        use_cpu=True,
        bf16=False,
        prime_beta=0.1,
        prm_update="double",
        num_generations=2,
        temperature=0.7,
    )
    config = PRIMEModuleConfig.from_prime_config(args, learning_rate=3e-4)
    assert (config.prime_beta, config.prm_update, config.num_generations, config.temperature) == (0.1, "double", 2, 0.7)
    assert config.learning_rate == 3e-4 and config.lr_scheduler_type == args.lr_scheduler_type
    # PRIMEConfig's own checks, with its messages.
    with pytest.raises(ValueError, match="prm_adapter_name='ref' is reserved"):
        PRIMEModuleConfig(prm_adapter_name="ref")
    with pytest.raises(ValueError, match="needs at least 2 completions"):
        PRIMEModuleConfig(num_generations=1)


def test_bad_inputs_fail_early(tiny_model_dir):
    with pytest.raises(ValueError, match="peft_config"):
        PRIMEModule(tiny_model_dir, coin_reward, make_config())
    with pytest.raises(TypeError, match="Python reward functions"):
        PRIMEModule(tiny_model_dir, "some/reward-model", make_config(), peft_config=LoraConfig(**LORA))
    with pytest.raises(ValueError, match="PRIMEModule needs at least one reward function"):
        PRIMEModule(tiny_model_dir, [], make_config(), peft_config=LoraConfig(**LORA))
    with pytest.raises(ValueError, match="verifier='math'"):
        PRIMEModule(tiny_model_dir, coin_reward, make_config(verifier="math"), peft_config=LoraConfig(**LORA))

    def needs_answer(completions, answer, **kwargs):
        return [0.0] * len(completions)

    module = PRIMEModule(tiny_model_dir, needs_answer, make_config(), peft_config=LoraConfig(**LORA))
    data = PRIMEDataModule([{"prompt": "Q="}] * 4, prompts_per_device=2)
    with pytest.raises(ValueError, match="needs a dataset column 'answer'"):
        make_trainer(1).fit(module, datamodule=data)


@pytest.mark.slow
def test_two_process_ddp_keeps_adapters_identical(tiny_model_dir, tmp_path):
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        str(DDP_SCRIPT), tiny_model_dir, str(tmp_path), "3",
    ]  # fmt: skip
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]

    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    assert rank0["world"] == rank1["world"] == 2
    assert rank0["global_step"] == rank1["global_step"] == 3
    assert rank0["prm_steps"] == rank1["prm_steps"] == {3}
    for name, after in rank0["after"].items():
        assert torch.equal(after, rank1["after"][name]), f"{name} differs between ranks"
    for role in (".default.", ".prm."):
        moved = [n for n in rank0["after"] if role in n and not torch.equal(rank0["after"][n], rank0["before"][n])]
        assert moved, f"no {role.strip('.')} adapter weight changed"
    # Each process trained on its own share of the prompts.
    assert rank0["prompts"] and not set(rank0["prompts"]) & set(rank1["prompts"])
    checkpoint = torch.load(tmp_path / "last-step.ckpt", weights_only=True)
    assert checkpoint["prime"]["rng_states"]["cpu"].shape[0] == 2  # both processes' random streams


def test_example_script_runs(tmp_path, monkeypatch, capsys):
    import importlib.util

    path = Path(__file__).parents[1] / "examples" / "lightning_prime.py"
    spec = importlib.util.spec_from_file_location("lightning_prime_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    monkeypatch.setattr(sys, "argv", ["lightning_prime.py", "--steps", "2", "--out", str(tmp_path)])
    example.main()
    assert (tmp_path / "adapters" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "adapters" / "prm" / "adapter_model.safetensors").is_file()
    assert "metrics:" in capsys.readouterr().out
