"""PRIME prompts and data loaders (offline: they read the shared data files, never the Hub)."""

from __future__ import annotations

import json

import pytest
from datasets import Dataset, concatenate_datasets
from helpers import require_bwrap

from prime_trl import data
from prime_trl.data import (
    CODE_SUFFIX,
    COLUMNS,
    MATH_SUFFIX,
    PRIME_SYSTEM_PROMPT,
    load_aime24,
    load_amc23,
    load_dataset_by_name,
    load_eurus_rl,
    load_gsm8k,
    load_humaneval,
    load_math500,
    load_math_train,
    load_prime_file,
    make_prompt,
)


@pytest.fixture(autouse=True)
def no_hub(monkeypatch):
    """Any attempt to download fails the test."""
    import datasets

    def refuse(*args, **kwargs):
        raise AssertionError(f"tried to load from the Hub: {args}")

    monkeypatch.setattr(datasets, "load_dataset", refuse)


def test_prime_prompts_match_the_spec():
    body = PRIME_SYSTEM_PROMPT.strip("\n")
    assert body.startswith("When tackling complex reasoning tasks, you have access to the following actions.")
    for action in ("[ASSESS]", "[ADVANCE]", "[VERIFY]", "[SIMPLIFY]", "[SYNTHESIZE]", "[PIVOT]", "[OUTPUT]"):
        assert f"\n\n{action}\n\n" in PRIME_SYSTEM_PROMPT
    assert body.endswith("# Your action step 3\n\n...\n\nNext action: [NEXT ACTION NAME]")
    assert PRIME_SYSTEM_PROMPT.startswith("\n") and PRIME_SYSTEM_PROMPT.endswith("]\n\n")  # as in Eurus-2-RL-Data
    assert MATH_SUFFIX == "\n\nPresent the answer in LaTex format: \\boxed{Your answer}"
    assert (
        CODE_SUFFIX
        == "\n\nWrite Python code to solve the problem. Present the code in \n```python\nYour code\n```\nat the end."
    )


def test_make_prompt():
    assert make_prompt(" 1+1? ", "math") == [
        {"role": "system", "content": PRIME_SYSTEM_PROMPT},
        {"role": "user", "content": "1+1?" + MATH_SUFFIX},
    ]
    assert make_prompt("Sort a list.", "code", system_prompt=False) == [
        {"role": "user", "content": "Sort a list." + CODE_SUFFIX}
    ]
    with pytest.raises(ValueError, match="task must be"):
        make_prompt("x", "physics")


def _check_rows(dataset: Dataset, task: str, n: int):
    assert isinstance(dataset, Dataset)
    assert len(dataset) == n
    assert tuple(dataset.column_names) == COLUMNS
    row = dataset[0]
    assert row["task"] == task
    assert [m["role"] for m in row["prompt"]] == ["system", "user"]
    assert row["prompt"][0]["content"] == PRIME_SYSTEM_PROMPT
    assert row["prompt"][1]["content"].endswith(MATH_SUFFIX if task == "math" else CODE_SUFFIX)
    if task == "math":
        assert all(dataset["answer"]) and not any(dataset["tests"])
    else:
        assert all(dataset["tests"]) and not any(dataset["answer"])


def test_gsm8k(shared_data_dir):
    test = load_gsm8k("test", path=shared_data_dir)
    _check_rows(test, "math", 1319)
    assert all("," not in a and a.lstrip("-").isdigit() for a in test["answer"])  # "2,125" -> "2125"
    assert test[0]["answer"] == "18"
    _check_rows(load_gsm8k("train", path=shared_data_dir), "math", 7473)
    with pytest.raises(ValueError, match="no split 'validation'"):
        load_gsm8k("validation", path=shared_data_dir)


def test_math_sets(shared_data_dir):
    math500 = load_math500(path=shared_data_dir)
    _check_rows(math500, "math", 500)
    assert math500[0]["answer"] == "\\left( 3, \\frac{\\pi}{2} \\right)"
    assert math500[0]["id"] == "test/precalculus/807.json"
    train = load_math_train(path=shared_data_dir)
    _check_rows(train, "math", 11998)  # 2 solutions end in an empty boxed{} (a flaw of the original MATH data)
    assert train[0]["id"] == "train/algebra/0.json"
    assert not set(train["id"]) & set(math500["id"])
    aime = load_aime24(path=shared_data_dir)
    _check_rows(aime, "math", 30)
    assert all(not a.startswith("0") for a in aime["answer"])  # "025" -> "25"
    amc = load_amc23(path=shared_data_dir)
    _check_rows(amc, "math", 40)
    assert amc[0]["answer"] == "27" and "-1" in amc["answer"]  # floats 27.0 -> "27"


def test_humaneval(shared_data_dir):
    dataset = load_humaneval(path=shared_data_dir)
    _check_rows(dataset, "code", 164)
    row = dataset[0]
    assert row["id"] == "HumanEval/0" and row["entry_point"] == "has_close_elements"
    assert row["code_prefix"].lstrip().startswith("from typing import List")
    assert "def has_close_elements" in row["prompt"][1]["content"]
    assert row["tests"].rstrip().endswith("check(_prime_checked(has_close_elements))")
    compile(row["tests"], "tests", "exec")


def test_system_prompt_can_be_left_out(shared_data_dir):
    for dataset in (
        load_math500(path=shared_data_dir, system_prompt=False, limit=3),
        load_humaneval(path=shared_data_dir, system_prompt=False, limit=3),
    ):
        assert len(dataset) == 3
        assert all([m["role"] for m in p] == ["user"] for p in dataset["prompt"])


def test_load_dataset_by_name(shared_data_dir, monkeypatch):
    monkeypatch.setenv("PRIME_TRL_DATA_DIR", str(shared_data_dir))
    assert data.default_data_dir() == shared_data_dir
    sizes = {"math500": 500, "MATH-500": 500, "gsm8k": 1319, "aime24": 30, "amc23": 40, "humaneval": 164, "math": 11998}
    for name, n in sizes.items():
        assert len(load_dataset_by_name(name)) == n, name
    assert len(load_dataset_by_name("gsm8k", split="train", limit=5)) == 5
    with pytest.raises(ValueError, match="unknown data set 'mbpp'"):
        load_dataset_by_name("mbpp")
    with pytest.raises(ValueError, match="single split"):
        load_dataset_by_name("math500", split="validation")


def test_missing_file_is_an_error_not_a_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="math500_test.jsonl"):
        load_math500(path=tmp_path)


EURUS_ROWS = [
    {
        "data_source": "numina_olympiads",
        "prompt": [
            {"role": "system", "content": PRIME_SYSTEM_PROMPT},
            {"role": "user", "content": "What is 2+3?" + MATH_SUFFIX},
        ],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "5"},
        "extra_info": {"split": "train", "index": 0},
    },
    {
        "data_source": "taco",
        "prompt": [
            {"role": "system", "content": PRIME_SYSTEM_PROMPT},
            {"role": "user", "content": "Read n and print n squared." + CODE_SUFFIX},
        ],
        "ability": "code",
        "reward_model": {
            "style": "rule",
            "ground_truth": json.dumps({"inputs": ["3\n", "4\n"], "outputs": ["9\n", "16\n"]}),
        },
        "extra_info": {"split": "train", "index": 7},
    },
]


def test_eurus_rows_and_own_files(tmp_path):
    path = tmp_path / "eurus.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in EURUS_ROWS))
    dataset = load_eurus_rl(path=str(path))
    assert tuple(dataset.column_names) == COLUMNS
    assert dataset["task"] == ["math", "code"]
    assert dataset["answer"] == ["5", ""]
    assert json.loads(dataset["tests"][1])["outputs"] == ["9\n", "16\n"]
    assert dataset["id"] == ["numina_olympiads-0", "taco-7"]
    assert [m["role"] for m in load_eurus_rl(path=str(path), system_prompt=False)["prompt"][0]] == ["user"]
    assert load_dataset_by_name(str(path))["task"] == ["math", "code"]

    own = tmp_path / "own.jsonl"
    own.write_text(
        json.dumps({"problem": "1+1?", "answer": 2})
        + "\n"
        + json.dumps({"prompt": "Print hi.", "task": "code", "tests": {"inputs": [""], "outputs": ["hi"]}})
        + "\n"
    )
    rows = load_prime_file(own)
    assert rows["task"] == ["math", "code"] and rows["answer"][0] == "2"
    assert rows["prompt"][1][1]["content"] == "Print hi." + CODE_SUFFIX
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"text": "hello"}))
    with pytest.raises(ValueError, match="expected 'prompt' \\+ 'task'"):
        load_prime_file(bad)


def test_prompt_and_answer_rows_are_math_rows(tmp_path):
    """The README's own Python example uses `prompt` + `answer` columns; such file rows are math rows whose prompt
    is used as written (as PRIMETrainer trains on such a dataset)."""
    path = tmp_path / "rows.jsonl"
    messages = [{"role": "user", "content": "What is 2 + 3? Put it in \\boxed{}."}]
    path.write_text(
        json.dumps({"prompt": messages, "answer": 5}) + "\n" + json.dumps({"prompt": messages, "answer": 0})
    )
    rows = load_prime_file(path)
    assert rows["task"] == ["math", "math"] and rows["answer"] == ["5", "0"]
    assert rows["prompt"][0] == messages
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_text(json.dumps({"prompt": messages, "answer": 5}) + "\n" + json.dumps({"prompt": "1+1?", "answer": 2}))
    with pytest.raises(data.DataFileError, match="mixed.jsonl: row 2: plain-string and chat-message prompts are mixed"):
        load_prime_file(mixed)


@pytest.mark.parametrize(
    "name, text, expected",
    [
        (
            "bad.jsonl",
            '{"prompt": "1+1?", "answer": 2}\n{"prompt": "2+2?", "answer": 4\n',
            r"bad.jsonl:2: not valid JSON",
        ),
        (
            "cols.jsonl",
            '{"prompt": "1+1?", "answer": 2}\n{"question": "2+2?"}\n',
            r"cols.jsonl: row 2: columns \['question'\]",
        ),
        ("empty.jsonl", "\n\n", r"empty.jsonl: no rows"),
        ("list.jsonl", "[1, 2]\n", r"list.jsonl: row 1 is a JSON list, not an object"),
        ("task.jsonl", '{"prompt": "x", "task": "physics", "answer": "1"}\n', r"task.jsonl: row 1: task 'physics'"),
        ("blank.jsonl", '{"prompt": "x", "answer": ""}\n', r"blank.jsonl: row 1: empty 'answer'"),
        ("rows.csv", "prompt,answer\n", r"rows.csv: unsupported file type '.csv'"),
    ],
)
def test_data_file_problems_name_the_file_row_and_fix(tmp_path, name, text, expected):
    path = tmp_path / name
    path.write_text(text)
    with pytest.raises(data.DataFileError, match=expected) as error:
        load_dataset_by_name(str(path))
    message = str(error.value)
    assert "\n" not in message and ("expected" in message or "no rows" in message or "use" in message)


def test_mixed_dataset_end_to_end(shared_data_dir, tmp_path):
    """Math and code rows in one data set, scored by the combined verifier as the trainer would call it."""
    from prime_trl.rewards import task_reward

    require_bwrap()
    path = tmp_path / "eurus.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in EURUS_ROWS))
    mixed = concatenate_datasets(
        [
            load_math500(path=shared_data_dir, limit=2),
            load_humaneval(path=shared_data_dir, limit=1),
            load_eurus_rl(path=str(path)),
        ]
    )
    raw = json.loads(open(shared_data_dir / "humaneval.jsonl").readline())
    completions = [
        "\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}",
        "\\boxed{0}",
        f"```python\n{raw['prompt']}{raw['canonical_solution']}```",
        "\\boxed{5}",
        "```python\nn = int(input())\nprint(n * n)\n```",
    ]
    columns = {k: list(mixed[k]) for k in mixed.column_names if k != "prompt"}
    assert task_reward(completions, prompts=list(mixed["prompt"]), **columns) == [1.0, 0.0, 1.0, 1.0, 1.0]
