"""PRIME with a calculator tool, on the embedded arithmetic task: offline, CPU, a few minutes.

The demo policy (``prime-trl demo``'s noisy-teacher warm start) writes chains like ``5*3=15;7+15=22;22-4=18;
\\boxed{18}``. Here it calls a calculator instead of computing: whenever it writes ``=``, the rollout stops, the
calculator appends the result of the step just written, and the policy goes on. This is TRL's ``rollout_func``
with an ``env_mask`` (0 on the calculator's tokens): they stay in the context, TRL leaves them out of the policy
loss, and `PRIMETrainer` leaves them out of the PRM loss, the implicit token rewards and the advantages, so the
dense process reward credits only what the policy wrote (which pair to reduce, which operands to copy, the
final answer).

It prints held-out accuracy (sampled at T=1, answer exact match) of the warm start without the tool, and of the
tool-using policy before and after PRIME training, plus the share of completion tokens that came from the tool:

    python examples/calculator_tool_prime.py --steps 40

The warm start is built and cached on first use (``prime_trl.demo.warmstart``, several minutes on CPU).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import time

import torch
from peft import LoraConfig
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from prime_trl import PRIMEConfig, PRIMETrainer
from prime_trl.demo.run import DEMO_SETTINGS
from prime_trl.demo.task import TaskConfig, answer_reward, apply_op, make_splits, problem_from_prompt
from prime_trl.demo.warmstart import evaluate_accuracy, get_warm_start

logger = logging.getLogger(__name__)

# The step being written when the policy stops at "=": the text after the last ";" (or the whole completion).
STEP = re.compile(r"(\d+)([+\-*])(\d+)=$")


def calculate(completion_so_far: str) -> int | None:
    """The calculator tool: the result of the step ``a op b=`` that ends the text, or None if it is malformed
    (then the policy must write the result itself)."""
    match = STEP.search(completion_so_far.rsplit(";", 1)[-1])
    if match is None:
        return None
    return apply_op(int(match.group(1)), match.group(2), int(match.group(3)))


@torch.no_grad()
def rollout_with_calculator(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: list[str],
    max_completion_length: int,
    temperature: float = 1.0,
) -> dict[str, list]:
    """Sample one completion per prompt, the calculator filling in every step's result.

    Returns TRL's ``rollout_func`` output: ``prompt_ids``, ``completion_ids``, ``logprobs`` (None: TRL recomputes
    them) and ``env_mask`` (1 on the policy's tokens, 0 on the calculator's).
    """
    eos, equals = tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("=")
    prompt_ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    completions: list[list[int]] = [[] for _ in prompts]
    env_mask: list[list[int]] = [[] for _ in prompts]
    open_rows = list(range(len(prompts)))
    was_training = model.training
    model.eval()
    try:
        while open_rows:
            batch = tokenizer.pad(
                {"input_ids": [prompt_ids[i] + completions[i] for i in open_rows]},
                padding_side="left",
                return_tensors="pt",
            ).to(next(model.parameters()).device)
            budget = max_completion_length - min(len(completions[i]) for i in open_rows)
            generated = model.generate(
                **batch,
                max_new_tokens=budget,
                do_sample=True,
                temperature=temperature,
                top_k=0,
                top_p=1.0,
                eos_token_id=[eos, equals],  # a row pauses at "=" for the calculator
                pad_token_id=tokenizer.pad_token_id,
            )[:, batch["input_ids"].shape[1] :].tolist()
            still_open = []
            for row, new_ids in zip(open_rows, generated, strict=True):
                stop = next((k + 1 for k, t in enumerate(new_ids) if t in (eos, equals)), len(new_ids))
                new_ids = new_ids[:stop][: max_completion_length - len(completions[row])]
                completions[row] += new_ids
                env_mask[row] += [1] * len(new_ids)
                if not new_ids or new_ids[-1] != equals or len(completions[row]) >= max_completion_length:
                    continue  # EOS, or out of room: this row is finished
                result = calculate(tokenizer.decode(completions[row]))
                if result is not None:
                    tool_ids = tokenizer(str(result), add_special_tokens=False)["input_ids"]
                    tool_ids = tool_ids[: max_completion_length - len(completions[row])]
                    completions[row] += tool_ids
                    env_mask[row] += [0] * len(tool_ids)
                if len(completions[row]) < max_completion_length:
                    still_open.append(row)
            open_rows = still_open
    finally:
        model.train(was_training)
    return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": None, "env_mask": env_mask}


def tool_accuracy(model, tokenizer, prompts: list[str], samples: int, max_len: int, seed: int = 0) -> dict:
    """Held-out accuracy of the tool-using policy (T=1, ``samples`` per prompt) and the tool's share of tokens."""
    torch.manual_seed(seed)
    repeated = [p for p in prompts for _ in range(samples)]
    out = rollout_with_calculator(model, tokenizer, repeated, max_len)
    texts = tokenizer.batch_decode(out["completion_ids"], skip_special_tokens=True)
    answers = [str(problem_from_prompt(p).answer) for p in repeated]
    rewards = answer_reward(texts, answers)
    tool_tokens = sum(len(m) - sum(m) for m in out["env_mask"])
    return {
        "accuracy": sum(rewards) / len(rewards),
        "tool_token_share": tool_tokens / max(1, sum(len(m) for m in out["env_mask"])),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--eval-prompts", type=int, default=100)
    parser.add_argument("--eval-samples", type=int, default=4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="calculator_prime_out")
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    task = TaskConfig()
    model_path = get_warm_start(task, progress=False)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    splits = make_splits(0, task, n_train=2000, n_validation=10, n_test=max(10, args.eval_prompts))
    eval_prompts = list(splits["test"]["prompt"][: args.eval_prompts])
    max_len = task.max_completion_tokens
    settings = DEMO_SETTINGS["default"]

    config = PRIMEConfig(
        output_dir=args.output_dir,
        per_device_train_batch_size=settings.prompts_per_step * settings.num_generations,
        num_generations=settings.num_generations,
        max_completion_length=max_len,
        learning_rate=settings.learning_rate,
        prm_learning_rate=settings.prm_learning_rate,
        prime_beta=settings.prime_beta,
        lr_scheduler_type="constant",
        max_steps=args.steps,
        use_cpu=True,
        bf16=False,
        gradient_checkpointing=False,
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        disable_tqdm=True,
        seed=args.seed,
        data_seed=args.seed,
    )
    trainer = PRIMETrainer(
        str(model_path),
        args=config,
        reward_funcs=answer_reward,
        train_dataset=splits["train"],
        processing_class=tokenizer,
        peft_config=LoraConfig(r=settings.lora_r, lora_alpha=settings.lora_alpha, target_modules="all-linear"),
        rollout_func=lambda prompts, trainer: rollout_with_calculator(
            trainer.model, trainer.processing_class, prompts, max_len, trainer.temperature
        ),
    )

    no_tool = evaluate_accuracy(
        trainer.model, tokenizer, eval_prompts, 1.0, args.eval_samples, greedy=False, seed=args.seed
    )
    before = tool_accuracy(trainer.model, tokenizer, eval_prompts, args.eval_samples, max_len, args.seed)
    start = time.perf_counter()
    trainer.train()
    train_seconds = time.perf_counter() - start
    after = tool_accuracy(trainer.model, tokenizer, eval_prompts, args.eval_samples, max_len, args.seed)
    logs = [entry for entry in trainer.state.log_history if "prm/accuracy" in entry]
    result = {
        "steps": args.steps,
        "eval_prompts": len(eval_prompts),
        "eval_samples": args.eval_samples,
        "warm_start_accuracy_without_tool": no_tool["sampled_accuracy"],
        "accuracy_with_tool_before": before["accuracy"],
        "accuracy_with_tool_after": after["accuracy"],
        "tool_token_share_after": after["tool_token_share"],
        "prm_accuracy_last_10_steps": sum(e["prm/accuracy"] for e in logs[-10:]) / max(1, len(logs[-10:])),
        "train_seconds": round(train_seconds, 1),
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
