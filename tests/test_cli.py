"""The `prime-trl` command line: help, config parsing and its errors, launching, and end-to-end runs on CPU."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import require_bwrap

from prime_trl.apps import cli
from prime_trl.apps.cli import main, parse_train_args

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))


# ----- help and usage errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["score"], ["demo"]])
def test_help_works_for_every_subcommand(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: prime-trl")
    expected = {
        (): ["train", "eval", "score", "demo"],
        ("train",): [
            "--prime_beta",
            "--prm_learning_rate",
            "--use_peft",
            "--lora_r",
            "--load_in_4bit",
            "--datasets",
            "--reward_funcs",
            "--num_generations",
        ],
        ("eval",): ["--adapter", "--num_samples", "--backend"],
        ("score",): ["--prm", "--step_split", "--aggregate"],
        ("demo",): ["--steps", "--seed", "--output_dir", "--quick"],
    }[tuple(command)]
    for flag in expected:
        assert flag in out


def test_console_script_is_installed():
    """pyproject's [project.scripts] entry point runs `prime_trl.apps.cli:main`."""
    script = Path(sys.executable).with_name("prime-trl")
    assert script.exists()
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "score" in result.stdout


def test_unknown_command_is_named_with_a_suggestion(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["trian"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "'trian'" in err and "Did you mean 'train'?" in err


# ----- configs ------------------------------------------------------------------------------------------------


def test_configs_exist():
    names = {path.name for path in CONFIGS}
    assert {
        "demo_cpu.yaml",
        "qwen2.5-0.5b-gsm8k-qlora.yaml",
        "qwen2.5-1.5b-math-lora.yaml",
        "eurus-2-7b-prime.yaml",
        "smollm2-135m-cpu.yaml",
    } <= names
    assert (REPO / "configs" / "accelerate" / "multi_gpu_8.yaml").is_file()


@pytest.mark.parametrize("config", CONFIGS, ids=lambda path: path.name)
def test_every_config_parses_into_the_dataclasses(config):
    # GPU configs ask for bf16, which TrainingArguments checks against the hardware: parse them as on a CPU box.
    script_args, training_args, model_args, dataset_args, launch_args, _ = parse_train_args(
        ["--config", str(config), "--use_cpu", "true"]
    )
    assert launch_args == []
    assert model_args.model_name_or_path and script_args.dataset_name and script_args.reward_funcs
    assert model_args.use_peft and model_args.lora_target_modules == "all-linear"
    assert training_args.num_generations == 4 and training_args.prime_beta == 0.05
    header = config.read_text().split("\n\n")[0]
    for word in ("Hardware", "Memory", "Data", "Launch", "prime-trl train --config configs/" + config.name):
        assert word in header, f"{config.name}: header lacks {word!r}"
    if "cpu" not in config.name:  # the GPU recipes
        assert training_args.bf16 and training_args.gradient_checkpointing
    if "qlora" in config.name:
        assert model_args.load_in_4bit
    if config.name == "eurus-2-7b-prime.yaml":
        assert training_args.fsdp and training_args.fsdp_config["version"] == 2
        assert "not run here" in header.lower()


def test_cli_flags_override_config_values():
    _, training_args, model_args, _, _, _ = parse_train_args(
        ["--config", str(REPO / "configs/demo_cpu.yaml"), "--max_steps", "3", "--lora_r", "4"]
    )
    assert training_args.max_steps == 3 and model_args.lora_r == 4


def run_main(argv, capsys):
    code = main(argv)
    return code, capsys.readouterr().err


def test_misspelled_yaml_key_fails_naming_it(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text((REPO / "configs/demo_cpu.yaml").read_text() + "\nprm_learnig_rate: 0.1\n")
    code, err = run_main(["train", "--config", str(config)], capsys)
    assert code == 2
    assert "unknown key 'prm_learnig_rate'" in err and str(config) in err
    assert "Did you mean 'prm_learning_rate'?" in err

    config = tmp_path / "eval.yaml"  # every subcommand takes --config, with the same check
    config.write_text("model: m\ndata: math500\nnum_sampels: 4\n")
    code, err = run_main(["eval", "--config", str(config)], capsys)
    assert code == 2 and "unknown key 'num_sampels'" in err and "Did you mean 'num_samples'?" in err


def test_misspelled_flag_fails_naming_it(capsys):
    code, err = run_main(["train", "--config", str(REPO / "configs/demo_cpu.yaml"), "--lerning_rate", "1"], capsys)
    assert code == 2 and "unknown argument --lerning_rate" in err and "--learning_rate" in err
    code, err = run_main(["eval", "--model", "m", "--data", "math500", "--num_sample", "4x"], capsys)
    assert code == 2 and "--num_sample" in err


def test_invalid_value_fails_with_the_fields_own_message(capsys):
    code, err = run_main(
        ["train", "--config", str(REPO / "configs/demo_cpu.yaml"), "--prm_update", "sometimes"], capsys
    )
    assert code == 2 and "prm_update='sometimes'" in err


def test_missing_config_file(capsys):
    code, err = run_main(["train", "--config", "configs/nope.yaml"], capsys)
    assert code == 2 and "nope.yaml" in err


# ----- launching through accelerate ---------------------------------------------------------------------------


def test_launch_options_are_split_off_and_values_kept(monkeypatch):
    argv = ["--config", str(REPO / "configs/demo_cpu.yaml"), "--num_processes", "2", "--max_steps", "2"]
    *_, launch_args, script_argv = parse_train_args(argv)
    assert launch_args == ["--num_processes", "2"]
    # A plain set difference would also drop the "2" of --max_steps.
    assert script_argv == ["--config", str(REPO / "configs/demo_cpu.yaml"), "--max_steps", "2"]

    captured = {}
    monkeypatch.setattr("accelerate.commands.launch.launch_command", lambda args: captured.setdefault("args", args))
    monkeypatch.setenv(cli._LAUNCHED_ENV, "0")  # launch() sets it to 1; monkeypatch restores the original
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    assert main(["train", *argv]) == 0
    args = captured["args"]
    assert args.multi_gpu and args.num_processes == 2  # torchrun launcher: N processes also on CPU
    assert args.module and args.training_script == "prime_trl.apps.cli"
    assert args.training_script_args == ["train", *script_argv]


def test_accelerate_config_file_is_passed_through(monkeypatch):
    captured = {}
    monkeypatch.setattr("accelerate.commands.launch.launch_command", lambda args: captured.setdefault("args", args))
    monkeypatch.setenv(cli._LAUNCHED_ENV, "0")
    cli.launch(["--accelerate_config", str(REPO / "configs/accelerate/multi_gpu_8.yaml")], ["--config", "x.yaml"])
    args = captured["args"]
    assert args.config_file.endswith("multi_gpu_8.yaml") and not args.multi_gpu  # the file decides the mode
    assert args.training_script_args == ["train", "--config", "x.yaml"]


@pytest.mark.parametrize("path", sorted((REPO / "configs" / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_accelerate_config_files_parse(path):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(path))
    assert config.num_processes == 8
    if "zero" in path.name:  # zero2_8gpu.yaml / zero3_8gpu.yaml select the ZeRO stage their name says
        assert config.distributed_type == "DEEPSPEED"
        assert config.deepspeed_config["zero_stage"] == int(path.name[4])


def test_reward_function_resolution(tmp_path, monkeypatch):
    from prime_trl.rewards import code_reward, math_reward, task_reward

    assert cli.resolve_reward_funcs(["math", "code"], [], None) == [math_reward, code_reward]
    assert cli.resolve_reward_funcs(None, ["prompt", "task", "answer"], "gsm8k") == [task_reward]
    assert cli.resolve_reward_funcs(["verifier"], [], None) == [task_reward]  # the deprecated name
    assert cli.resolve_reward_funcs(None, ["prompt", "answer"], "data.jsonl") == [math_reward]
    (tmp_path / "my_rewards.py").write_text("def short(completions, **kw):\n    return [0.0] * len(completions)\n")
    monkeypatch.chdir(tmp_path)
    assert cli.resolve_reward_funcs(["my_rewards.short"], [], None)[0].__name__ == "short"
    with pytest.raises(cli.CLIError, match="unknown reward function 'mth'"):
        cli.resolve_reward_funcs(["mth"], [], None)
    with pytest.raises(cli.CLIError, match="my_rewards.nope"):
        cli.resolve_reward_funcs(["my_rewards.nope"], [], None)
    with pytest.raises(cli.CLIError, match="reward_funcs"):
        cli.resolve_reward_funcs(None, ["prompt"], "x.jsonl")


def test_prime_demo_model_resolves_to_the_cached_warm_start(monkeypatch, tmp_path):
    import prime_trl.demo.warmstart as warmstart

    monkeypatch.setattr(warmstart, "get_warm_start", lambda seed=0, **kwargs: tmp_path / f"warm-{seed}")
    training_args = parse_train_args(["--config", str(REPO / "configs/demo_cpu.yaml"), "--seed", "3"])[1]
    assert cli.resolve_model("prime-demo", training_args) == str(tmp_path / "warm-3")
    assert cli.resolve_model("org/model", training_args) == "org/model"
    # `prime-trl demo` writes adapters to ./prime-demo: that directory is not a model and must not shadow the name.
    monkeypatch.chdir(tmp_path)
    (tmp_path / "prime-demo").mkdir()
    (tmp_path / "prime-demo" / "adapter_config.json").write_text("{}")
    assert cli.resolve_model("prime-demo", training_args) == str(tmp_path / "warm-3")


@pytest.mark.parametrize(
    "text, expected",
    [
        (
            '{"prompt": "1+1?", "answer": 2}\n{"prompt": "2+2?"}\n',
            "row 2: columns ['prompt']; expected 'prompt' + 'task'",
        ),
        ('{"prompt": "1+1?", "answer": 2}\nnot json\n', "rows.jsonl:2: not valid JSON"),
    ],
)
def test_train_data_file_problem_is_a_one_line_usage_error(tmp_path, capsys, text, expected):
    """Checked before the model is built: exit 2, one line naming the file and the row, no traceback."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text(text)
    argv = ["train", "--config", str(REPO / "configs/demo_cpu.yaml"), "--dataset_name", str(rows)]
    code = main([*argv, "--model_name_or_path", "tiny", "--output_dir", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2
    lines = [line for line in err.splitlines() if line.startswith("prime-trl train: error:")]
    assert len(lines) == 1 and str(rows) in lines[0] and expected in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "base_model").exists()  # no work done before the data was checked


def test_train_on_prompt_answer_rows(tmp_path, capsys):
    """`prompt` + `answer` rows (the README's Python example's columns) train as math rows."""
    rows = tmp_path / "rows.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"What is {i} + 1?", "answer": i + 1}) + "\n" for i in range(8)))
    out = tmp_path / "run"
    argv = ["train", "--config", str(REPO / "configs/demo_cpu.yaml"), "--dataset_name", str(rows)]
    argv += ["--model_name_or_path", "tiny", "--output_dir", str(out), "--max_steps", "1"]
    argv += ["--per_device_train_batch_size", "8", "--max_completion_length", "8", "--reward_funcs", "math"]
    assert main(argv) == 0
    assert (out / "prm" / "adapter_model.safetensors").is_file()


# ----- end to end on CPU ---------------------------------------------------------------------------------------


def test_train_demo_config_end_to_end(tmp_path, capsys):
    """The CPU config with the random tiny model: trains, saves the policy adapter at the root and the PRM in prm/."""
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            str(REPO / "configs/demo_cpu.yaml"),
            "--model_name_or_path",
            "tiny",
            "--output_dir",
            str(out),
            "--max_steps",
            "2",
            "--dataset_limit",
            "64",
            "--logging_steps",
            "1",
            "--per_device_train_batch_size",
            "16",
            "--max_completion_length",
            "24",
        ]
    )
    assert code == 0
    for path in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "prm/adapter_config.json",
        "prm/adapter_model.safetensors",
        "base_model/config.json",
        "tokenizer_config.json",
    ):
        assert (out / path).is_file(), path
    assert json.loads((out / "prm/adapter_config.json").read_text())["base_model_name_or_path"] == str(
        out / "base_model"
    )
    assert "Training done" in capsys.readouterr().out


@pytest.mark.parametrize("data, expect_maj", [("math500", True), ("humaneval", False)])
def test_eval_end_to_end_on_benchmark_slices(
    data, expect_maj, tiny_model_dir, shared_data_dir, tmp_path, capsys, monkeypatch
):
    if data == "humaneval":
        require_bwrap()
    monkeypatch.setenv("PRIME_TRL_DATA_DIR", str(shared_data_dir))
    out = tmp_path / data
    code = main(
        [
            "eval",
            "--model",
            tiny_model_dir,
            "--data",
            data,
            "--limit",
            "2",
            "--no_system_prompt",
            "--max_new_tokens",
            "12",
            "--num_samples",
            "2",
            "--output_dir",
            str(out),
            "--backend",
            "hf",
        ]
    )
    assert code == 0
    records = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert len(records) == 2 * (1 + 2)  # greedy + 2 samples per problem
    assert {r["mode"] for r in records} == {"greedy", "sample"}
    for record in records:
        assert record["task"] == ("math" if data == "math500" else "code")
        assert 0.0 <= record["score"] <= 1.0 and record["correct"] == (record["score"] == 1.0)
        assert 1 <= record["num_tokens"] <= 12
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_problems"] == 2
    assert {"pass@1 (greedy)", "pass@1", "pass@2"} <= set(summary["metrics"])
    assert ("maj@2" in summary["metrics"]) == expect_maj
    printed = capsys.readouterr().out
    assert "| pass@1 (greedy) |" in printed
    # The effective decoding settings are printed and saved, every one explicit.
    assert "decoding (greedy): argmax, repetition_penalty=1.0, no_repeat_ngram_size=0, num_beams=1" in printed
    assert "decoding (sampled): temperature=1.0, top_p=1.0, top_k=0, min_p=0.0" in printed
    assert summary["decoding"]["sampled"]["temperature"] == 1.0 and summary["decoding"]["sampled"]["num_beams"] == 1


def test_demo_subcommand_calls_the_runner(monkeypatch):
    """`prime-trl demo` forwards its options to prime_trl.demo.run.run_demo (imported on use)."""
    import types

    calls = []
    module = types.ModuleType("prime_trl.demo.run")
    module.run_demo = lambda **kwargs: calls.append(kwargs)
    monkeypatch.setitem(sys.modules, "prime_trl.demo.run", module)
    assert main(["demo", "--steps", "7", "--seed", "2", "--output_dir", "d", "--quick"]) == 0
    assert main(["demo", "--hard"]) == 0  # unset options are left to the runner's defaults
    assert main(["demo", "--task", "sparse"]) == 0
    assert calls == [
        {"steps": 7, "seed": 2, "output_dir": "d", "quick": True},
        {"seed": 0, "quick": False, "hard": True},
        {"seed": 0, "quick": False, "task": "sparse"},
    ]


def test_demo_task_choices_are_the_runners_tasks():
    """The CLI lists the task names without importing the runner (torch, TRL); they must match DEMO_TASKS."""
    from prime_trl.apps.cli import DemoArguments
    from prime_trl.demo.run import DEMO_TASKS

    choices = DemoArguments.__dataclass_fields__["task"].metadata["choices"]
    assert choices == list(DEMO_TASKS)


@pytest.mark.slow
def test_train_two_processes_on_cpu(tmp_path):
    """`--num_processes 2` really starts two processes (torchrun + gloo) on a machine without GPUs."""
    # A reward function from the working directory (dotted path) that records which rank called it.
    (tmp_path / "rank_probe.py").write_text(
        "import os, pathlib\n"
        "def record(completions, **kwargs):\n"
        "    pathlib.Path(f\"rank-{os.environ.get('RANK', 'none')}\").touch()\n"
        "    return [0.0] * len(completions)\n"
    )
    out = tmp_path / "ddp"
    command = [
        str(Path(sys.executable).with_name("prime-trl")),
        "train",
        "--config",
        str(REPO / "configs/demo_cpu.yaml"),
    ]
    command += ["--model_name_or_path", "tiny", "--output_dir", str(out), "--max_steps", "1", "--dataset_limit", "32"]
    command += ["--per_device_train_batch_size", "8", "--max_completion_length", "16"]
    command += ["--num_processes", "2", "--main_process_port", "0", "--reward_funcs", "demo", "rank_probe.record"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        stdout, stderr = process.communicate(timeout=300)  # a healthy run takes ~20 s
    except subprocess.TimeoutExpired:
        # SIGTERM, not SIGKILL: torchrun's agent then stops its workers (they run in their own sessions, so
        # killing the launcher alone would leave them behind).
        process.terminate()
        process.communicate(timeout=120)
        pytest.fail("2-process training did not finish within 300 s")
    assert process.returncode == 0, stderr[-3000:]
    assert (out / "prm/adapter_model.safetensors").is_file()
    assert (tmp_path / "rank-0").exists() and (tmp_path / "rank-1").exists()


def test_train_routes_dataset_aliases_like_eval(tmp_path):
    # `eval --data math-500` and `train --dataset_name math-500` must both reach prime_trl.data, not the Hub.
    for alias in ("math-500", "MATH500", "aime", "human_eval", "eurus-2-rl-data"):
        assert cli._is_prime_dataset(alias), alias
    assert not cli._is_prime_dataset("openai/gsm8k-like-hub-id")
    for alias in ("prime-demo", "prime_demo", "Demo"):
        assert cli._is_demo_dataset(alias), alias
    assert not cli._is_demo_dataset(None) and not cli._is_demo_dataset("gsm8k")


# ----- eval / score: argument and input checks ----------------------------------------------------------------


@pytest.mark.parametrize(
    "extra, expected",
    [
        (["--data", "math500", "--num_samples", "4", "--temperature", "0"], "temperature=0.0 with --num_samples 4"),
        (["--data", "math500", "--split", "train"], "math500 has only the split(s) ['test']"),
        (["--data", "prime-demo", "--split", "dev"], "prime-demo has the splits"),
        (["--data", "prime-demo", "--reward", "final_anwser"], "unknown reward function 'final_anwser'"),
        (["--data", "prime-demo", "--reward", "no_such_module.grade"], "cannot import reward function"),
    ],
)
def test_eval_rejects_bad_arguments_before_loading_a_model(extra, expected, capsys):
    code, err = run_main(["eval", "--model", "no/such-model", *extra], capsys)
    assert code == 2 and expected in err and "Traceback" not in err


def test_eval_math_grader_on_code_rows_is_a_usage_error(tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    rows = [{"prompt": "Q1", "task": "math", "answer": "1"}, {"prompt": "Q2", "task": "code", "tests": "assert True"}]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    code, err = run_main(["eval", "--model", "no/such-model", "--data", str(data), "--reward", "final_answer"], capsys)
    assert code == 2 and "--reward final_answer grades math rows" in err and "['code']" in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "content, expected",
    [
        ('{"prompt": "Q", "answer": "1"}\n{"prompt": "Q", "answer": 2\n', "rows.jsonl:2: not valid JSON"),
        ('["Q", "1"]\n', "row 1 is a JSON list"),
        ('{"text": "hello"}\n', "expected 'prompt' + 'task'"),
        ('{"prompt": "Q", "answer": 1}\n{"prompt": [{"role": "user", "content": "Q"}], "answer": 1}\n', "are mixed"),
        (None, "not found"),
    ],
)
def test_eval_bad_data_file_is_one_line_error(content, expected, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    if content is not None:
        data.write_text(content)
    code, err = run_main(["eval", "--model", "no/such-model", "--data", str(data)], capsys)
    assert code == 2 and expected in err and str(data) in err and len(err.strip().splitlines()) == 1


def test_eval_seed_does_not_change_the_prime_demo_problems():
    from prime_trl.apps.evaluation import EvalArguments, load_eval_dataset

    def problems(**kwargs):
        return load_eval_dataset(EvalArguments(model="m", data="prime-demo", limit=20, **kwargs))["prompt"]

    assert problems(seed=0) == problems(seed=7)
    assert problems(data_seed=1) != problems()


def test_eval_reads_prompt_answer_rows_and_keeps_answer_zero(tmp_path):
    """TRL-style rows (prompt + answer, no task) are math rows; the answer 0 is the gold "0", not a missing one."""
    from prime_trl.apps.evaluation import EvalArguments, Generation, evaluate, load_eval_dataset

    data = tmp_path / "rows.jsonl"
    rows = [
        {"prompt": [{"role": "user", "content": "What is 3-3?"}], "answer": 0},
        {"prompt": [{"role": "user", "content": "What is 2+3?"}], "answer": "5"},
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = EvalArguments(model="m", data=str(data), output_dir=str(tmp_path / "out"))
    dataset = load_eval_dataset(args)
    assert dataset["task"] == ["math", "math"] and dataset["answer"] == ["0", "5"]
    assert dataset["prompt"][0] == rows[0]["prompt"]  # used as written, as training would

    class Echo:
        def encode(self, prompt):
            return prompt

        def generate(self, prompts, num_samples, greedy, seeds=None):
            return [[Generation("\\boxed{0}", True, 3)] for _ in prompts]

    summary = evaluate(args, generator=Echo(), dataset=dataset)
    assert summary["metrics"]["pass@1 (greedy)"] == 0.5  # right on 3-3=0, wrong on 2+3
    assert "decoding (greedy)" not in summary  # the settings live under "decoding"
    assert summary["decoding"]["greedy"]["repetition_penalty"] == 1.0


def test_eval_and_score_name_a_model_or_adapter_that_cannot_be_loaded(tiny_model_dir, tmp_path, capsys):
    data = tmp_path / "r.jsonl"
    data.write_text(json.dumps({"prompt": "Q", "responses": ["a", "b"]}) + "\n")
    code, err = run_main(["score", "--prm", str(tmp_path / "nothing"), "--data", str(data)], capsys)
    assert code == 2 and "cannot load the PRM" in err and "No PRM adapter at" in err
    rows = tmp_path / "rows.jsonl"
    rows.write_text(json.dumps({"prompt": "Q", "answer": 1}) + "\n")
    code, err = run_main(
        ["eval", "--model", tiny_model_dir, "--adapter", str(tmp_path), "--data", str(rows), "--backend", "hf"], capsys
    )
    assert code == 2 and "no adapter_config.json" in err and len(err.strip().splitlines()) == 1


# ----- documented commands ------------------------------------------------------------------------------------


def documented_commands(command: str) -> list[tuple[str, list[str]]]:
    """Every full ``prime-trl <command> ...`` line of README.md, docs/*.md and the config headers (continuation
    lines joined, trailing ``# comments`` dropped, ``<placeholders>`` one word), as ``(file, argv)``; prose mentions with ``...`` are skipped."""
    start = re.compile(rf"^(?:#\s*(?:\w+\s*:)?)?\s*prime-trl {command}\s")
    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md")), *CONFIGS]:
        lines = path.read_text().splitlines()
        for index, line in enumerate(lines):
            if not start.match(line):
                continue
            text = line
            while text.rstrip().endswith("\\") and index + 1 < len(lines):
                index += 1
                text = text.rstrip()[:-1] + " " + lines[index].lstrip("# ")
            text = re.sub(r"\s+#\s.*$", "", text[text.index("prime-trl") :])
            text = re.sub(r"<[^>]*>", "PLACEHOLDER", text)  # <printed model path>, <responses.jsonl>
            if "..." not in text and "`" not in text:
                found.append((path.name, shlex.split(text)[2:]))
    return found


@pytest.mark.parametrize("command", ["eval", "score"])
def test_documented_commands_parse(command):
    """The eval / score lines a newcomer copies from the docs use only flags and values the CLI accepts."""
    from prime_trl.apps.evaluation import EvalArguments
    from prime_trl.apps.scoring import ScoreArguments

    commands = documented_commands(command)
    assert len(commands) >= 3, commands
    parser = cli.make_eval_parser() if command == "eval" else cli.make_score_parser()
    for source, argv in commands:
        (args,), _, _ = cli._parse(parser, argv, command)
        assert isinstance(args, EvalArguments if command == "eval" else ScoreArguments), (source, argv)
    if command == "eval":  # the SmolLM2 recipe trains on final_answer: its eval lines grade the same way
        smollm2 = [argv for _, argv in commands if "smollm2-135m" in argv]
        assert smollm2 and all(
            "--reward" in argv and argv[argv.index("--reward") + 1] == "final_answer" for argv in smollm2
        )
