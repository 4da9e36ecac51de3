"""The embedded CPU demo: a synthetic arithmetic task with step-level ground truth, a tiny model and its
supervised warm start (cached). See ``task.py`` for the task and ``warmstart.py`` for the warm start."""

from prime_trl.demo.model import DemoModelConfig, build_demo_model, build_demo_tokenizer, count_parameters
from prime_trl.demo.task import (
    ALPHABET,
    ArithmeticProblem,
    Step,
    TaskConfig,
    all_steps_correct,
    answer_reward,
    check_steps,
    first_wrong_step,
    make_dataset,
    make_splits,
    noisy_completion,
    parse_steps,
    problem_from_prompt,
    prompt_text,
    reference_completion,
    sample_problem,
    step_reward_sums,
    step_token_spans,
)
from prime_trl.demo.warmstart import (
    DEFAULT_SFT,
    HARD_SFT,
    SFTConfig,
    default_sft_config,
    evaluate_accuracy,
    generate_completions,
    get_warm_start,
    load_warm_start,
    train_warm_start,
    warm_start_key,
)

# Former names, kept for existing notebooks and scripts. Each name now has one meaning across prime_trl: `Problem`
# is also `prime_trl.apps.scoring.Problem`, `make_prompt` also `prime_trl.data.make_prompt` (chat messages), and
# `ModelConfig` also TRL's.
Problem = ArithmeticProblem  # deprecated
make_prompt = prompt_text  # deprecated
ModelConfig = DemoModelConfig  # deprecated

__all__ = [
    "ALPHABET",
    "DEFAULT_SFT",
    "HARD_SFT",
    "DemoModelConfig",
    "ArithmeticProblem",
    "SFTConfig",
    "Step",
    "TaskConfig",
    "all_steps_correct",
    "answer_reward",
    "build_demo_model",
    "build_demo_tokenizer",
    "check_steps",
    "count_parameters",
    "default_sft_config",
    "evaluate_accuracy",
    "first_wrong_step",
    "generate_completions",
    "get_warm_start",
    "load_warm_start",
    "make_dataset",
    "prompt_text",
    "make_splits",
    "noisy_completion",
    "parse_steps",
    "problem_from_prompt",
    "reference_completion",
    "sample_problem",
    "step_reward_sums",
    "step_token_spans",
    "train_warm_start",
    "warm_start_key",
]
