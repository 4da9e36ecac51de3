"""PRIME's prompts and loaders that turn public math/code data sets into rows for the trainer and for evaluation.

Every loader returns a `datasets.Dataset` with the same string columns, so math and code sets can be mixed with
`datasets.concatenate_datasets` and scored by `prime_trl.rewards.task_reward`:

========== =====================================================================================================
prompt     chat messages: PRIME's system prompt (unless ``system_prompt=False``), then the question + task suffix
task       "math" or "code"
answer     math: the reference answer (LaTeX or plain; what `math_reward` compares with); code: ""
tests      code: a test program, or JSON ``{"inputs": [...], "outputs": [...]}``; math: ""
code_prefix  code the prompt already contains (HumanEval: imports, helpers, signature); else ""
entry_point  the function under test (HumanEval); else ""
source     data set name (e.g. "math500", "gsm8k", or Eurus-2's ``data_source``)
id         the row's id in its source
========== =====================================================================================================

Files are read from ``path`` when given, else from the data directory: ``$PRIME_TRL_DATA_DIR`` or
``../shared/data`` next to the repository (the files described in its README). Only when a file is missing
there is the same data set fetched from the Hugging Face Hub (needs network).
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from datasets import Dataset

logger = logging.getLogger(__name__)

__all__ = [
    "CODE_SUFFIX",
    "COLUMNS",
    "MATH_SUFFIX",
    "PRIME_SYSTEM_PROMPT",
    "DATASET_NAMES",
    "DEMO_DATASET_NAMES",
    "DataFileError",
    "canonical_dataset_name",
    "default_data_dir",
    "humaneval_tests",
    "load_aime24",
    "load_amc23",
    "load_dataset_by_name",
    "load_eurus_rl",
    "load_gsm8k",
    "load_humaneval",
    "load_math500",
    "load_math_train",
    "load_prime_file",
    "make_prompt",
]

# The Eurus-2 "action-centric chain of thought" system prompt, character for character as in PRIME's RL data
# (PRIME-RL/Eurus-2-RL-Data), including the leading newline and the two trailing ones.
PRIME_SYSTEM_PROMPT = (
    "\nWhen tackling complex reasoning tasks, you have access to the following actions. Use them as needed to "
    "progress through your thought process.\n\n[ASSESS]\n\n[ADVANCE]\n\n[VERIFY]\n\n[SIMPLIFY]\n\n[SYNTHESIZE]"
    "\n\n[PIVOT]\n\n[OUTPUT]\n\nYou should strictly follow the format below:\n\n[ACTION NAME]\n\n"
    "# Your action step 1\n\n# Your action step 2\n\n# Your action step 3\n\n...\n\n"
    "Next action: [NEXT ACTION NAME]\n\n"
)
MATH_SUFFIX = "\n\nPresent the answer in LaTex format: \\boxed{Your answer}"
CODE_SUFFIX = "\n\nWrite Python code to solve the problem. Present the code in \n```python\nYour code\n```\nat the end."

COLUMNS = ("prompt", "task", "answer", "tests", "code_prefix", "entry_point", "source", "id")

# (file in the data directory, hub id, hub config, hub split) per data set and split
_FILES: dict[tuple[str, str], tuple[str, str, str | None, str]] = {
    ("gsm8k", "train"): ("gsm8k_train.jsonl", "openai/gsm8k", "main", "train"),
    ("gsm8k", "test"): ("gsm8k_test.jsonl", "openai/gsm8k", "main", "test"),
    ("math500", "test"): ("math500_test.jsonl", "HuggingFaceH4/MATH-500", None, "test"),
    ("math", "train"): ("math_train.jsonl", "DigitalLearningGmbH/MATH-lighteval", None, "train"),
    ("aime24", "test"): ("aime24.jsonl", "HuggingFaceH4/aime_2024", None, "train"),
    ("amc23", "test"): ("amc23.jsonl", "math-ai/amc23", None, "test"),
    ("humaneval", "test"): ("humaneval.jsonl", "openai/openai_humaneval", None, "test"),
}


# Where this project's build machines keep the shared data sets (a checkout may live elsewhere, e.g. in /tmp).
_WORKSPACE_DATA_DIR = Path("/work/shared/data")


def default_data_dir() -> Path | None:
    """``$PRIME_TRL_DATA_DIR`` if set, else the first ``shared/data`` found beside the repository or one of its
    parent directories (``../shared/data`` for the usual layout), else the build machines' copy, if any."""
    env = os.environ.get("PRIME_TRL_DATA_DIR")
    if env:
        return Path(env)
    repository = Path(__file__).resolve().parents[1]
    for candidate in [parent / "shared" / "data" for parent in repository.parents] + [_WORKSPACE_DATA_DIR]:
        if candidate.is_dir():
            return candidate
    return None


def make_prompt(question: str, task: str, system_prompt: bool = True) -> list[dict[str, str]]:
    """Chat messages for one question: PRIME's system prompt (optional) and the question + the task's suffix."""
    if task not in ("math", "code"):
        raise ValueError(f"task must be 'math' or 'code', got {task!r}")
    suffix = MATH_SUFFIX if task == "math" else CODE_SUFFIX
    messages = [{"role": "system", "content": PRIME_SYSTEM_PROMPT}] if system_prompt else []
    return messages + [{"role": "user", "content": question.strip() + suffix}]


def _row(prompt: list, task: str, *, answer: str = "", tests: str = "", source: str, id: Any, **extra: str) -> dict:
    row = {"prompt": prompt, "task": task, "answer": answer, "tests": tests, "code_prefix": "", "entry_point": ""}
    row.update(extra, source=source, id=str(id))
    return row


def _records(name: str, split: str, path: str | os.PathLike | None) -> Iterable[dict]:
    """Raw records of a data set: from `path` (a file, or a directory holding the usual file name), the data
    directory, or - only if the file is missing locally - the Hugging Face Hub."""
    if (name, split) not in _FILES:
        splits = sorted(s for n, s in _FILES if n == name)
        raise ValueError(f"{name} has no split {split!r}; available: {splits}")
    filename, hub_id, hub_config, hub_split = _FILES[(name, split)]
    if path is not None:
        file = Path(path)
        file = file / filename if file.is_dir() else file
        if not file.is_file():
            raise FileNotFoundError(f"{file} not found (expected the {name} {split} file {filename})")
    else:
        directory = default_data_dir()
        file = directory / filename if directory is not None else None
    if file is not None and file.is_file():
        with open(file, encoding="utf-8") as handle:
            return [json.loads(line) for line in handle if line.strip()]
    logger.info("%s not found locally (data dir %s); loading %s from the Hugging Face Hub", filename, file, hub_id)
    from datasets import load_dataset

    return load_dataset(hub_id, hub_config, split=hub_split)


def _finish(rows: list[dict], limit: int | None) -> Dataset:
    if limit is not None:
        rows = rows[:limit]
    return Dataset.from_list(rows)


def _answer_text(value: Any) -> str:
    """An answer column as text: ``None`` is no answer; any other value, falsy ones such as ``0`` included, is."""
    return "" if value is None else _integer_text(value)


def _integer_text(value: Any) -> str:
    """'025' -> '25', 27.0 -> '27'; anything else unchanged (as text)."""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    text = str(value).strip()
    return str(int(text)) if re.fullmatch(r"[+-]?\d+", text) else text


@dataclass(frozen=True)
class _MathSource:
    """How one math data set's raw records become rows: where the question, the reference answer and the id are."""

    question: Callable[[dict], str]
    answer: Callable[[dict], str]
    row_id: Callable[[dict, int], Any]  # (record, position in the file) -> id
    skip_unanswered: bool = False  # drop (and log) records whose answer comes out empty


def _gsm8k_answer(record: dict) -> str:
    """The number after ``####``, thousands separators removed."""
    return record["answer"].split("####")[-1].strip().replace(",", "")


def _boxed_solution_answer(record: dict) -> str:
    """The last ``\\boxed{}`` of the worked solution (MATH train has no separate answer field)."""
    from prime_trl.rewards.math import extract_boxed

    return (extract_boxed(record["solution"]) or "").strip()


# One entry per math data set; `_load_math` does the rest. The row's ``source`` is the table key.
_MATH_SOURCES: dict[str, _MathSource] = {
    "gsm8k": _MathSource(lambda r: r["question"], _gsm8k_answer, lambda r, i: i),
    "math500": _MathSource(lambda r: r["problem"], lambda r: r["answer"], lambda r, i: r["unique_id"]),
    # Two rows of the original MATH release (number_theory 7115 and 7117) end in an empty \boxed{}: no label.
    "math": _MathSource(
        lambda r: r["problem"], _boxed_solution_answer, lambda r, i: r.get("unique_id", i), skip_unanswered=True
    ),
    "aime24": _MathSource(lambda r: r["problem"], lambda r: _integer_text(r["answer"]), lambda r, i: r.get("id", i)),
    "amc23": _MathSource(
        lambda r: r.get("problem") or r["question"], lambda r: _integer_text(r["answer"]), lambda r, i: r.get("id", i)
    ),
}


def _load_math(name: str, split: str, path: str | None, system_prompt: bool, limit: int | None) -> Dataset:
    source = _MATH_SOURCES[name]
    rows = []
    for i, record in enumerate(_records(name, split, path)):
        answer = source.answer(record)
        if source.skip_unanswered and not answer:
            logger.info("%s row %s has no answer; skipped", name, source.row_id(record, i))
            continue
        prompt = make_prompt(source.question(record), "math", system_prompt)
        rows.append(_row(prompt, "math", answer=answer, source=name, id=source.row_id(record, i)))
    return _finish(rows, limit)


def load_gsm8k(
    split: str = "test", path: str | None = None, *, system_prompt: bool = True, limit: int | None = None
) -> Dataset:
    """GSM8K (train 7,473 / test 1,319): answer = the number after ``####``, thousands separators removed."""
    return _load_math("gsm8k", split, path, system_prompt, limit)


def load_math500(path: str | None = None, *, system_prompt: bool = True, limit: int | None = None) -> Dataset:
    """MATH-500 (OpenAI's PRM800K held-out test split, 500 rows); answer = the ``answer`` field."""
    return _load_math("math500", "test", path, system_prompt, limit)


def load_math_train(path: str | None = None, *, system_prompt: bool = True, limit: int | None = None) -> Dataset:
    """MATH train problems (the 12k PRM800K-style split, MATH-500 excluded); answer = last ``\\boxed{}`` of the
    solution. Rows whose box is empty (2 in the shipped file: number_theory 7115 and 7117) are skipped."""
    return _load_math("math", "train", path, system_prompt, limit)


def load_aime24(path: str | None = None, *, system_prompt: bool = True, limit: int | None = None) -> Dataset:
    """AIME 2024 I+II (30 problems); integer answers without leading zeros."""
    return _load_math("aime24", "test", path, system_prompt, limit)


def load_amc23(path: str | None = None, *, system_prompt: bool = True, limit: int | None = None) -> Dataset:
    """AMC 12 2023 (40 problems with numeric answers; the file stores them as floats, e.g. 27.0 -> "27")."""
    return _load_math("amc23", "test", path, system_prompt, limit)


# Appended to each HumanEval test program: HumanEval's asserts compare results with ==, so a returned object with
# an always-true __eq__ (or a subclass of a built-in type) would pass without computing anything. The candidate
# is wrapped so that only plain built-in values count as results.
_HUMANEVAL_GUARD = """

def _prime_plain(value):
    kind = type(value)
    if kind in (list, tuple, set, frozenset):
        return all(_prime_plain(item) for item in value)
    if kind is dict:
        return all(_prime_plain(k) and _prime_plain(v) for k, v in value.items())
    return kind in (type(None), bool, int, float, complex, str, bytes)


def _prime_checked(function):
    def candidate(*args, **kwargs):
        result = function(*args, **kwargs)
        if not _prime_plain(result):
            raise TypeError("the solution returned a " + type(result).__name__ + ", not a plain built-in value")
        return result
    return candidate

"""


def humaneval_tests(test: str, entry_point: str) -> str:
    """The test program for one HumanEval problem: its ``check`` function, the result guard, and the call."""
    return f"{test.rstrip()}\n{_HUMANEVAL_GUARD}\ncheck(_prime_checked({entry_point}))\n"


def load_humaneval(path: str | None = None, *, system_prompt: bool = True, limit: int | None = None) -> Dataset:
    """HumanEval (164 problems) as code rows.

    The user message shows the function stub (signature + docstring) in a code block and asks for the complete
    function. ``tests`` runs HumanEval's ``check`` on the entry point (see `humaneval_tests`). ``code_prefix`` is
    the stub and ``entry_point`` its name, so `code_reward` (via `prime_trl.rewards.assemble_program`) puts the
    stub's imports and helper functions before a completion that defines the function, and treats a completion
    that does not define it as the body that continues the stub (HumanEval's original completion format).
    """
    rows = []
    for record in _records("humaneval", "test", path):
        question = (
            "Complete the following Python function. Give the whole function, signature included.\n\n"
            f"```python\n{record['prompt'].strip()}\n```"
        )
        rows.append(
            _row(
                make_prompt(question, "code", system_prompt),
                "code",
                tests=humaneval_tests(record["test"], record["entry_point"]),
                source="humaneval",
                id=record["task_id"],
                code_prefix=record["prompt"],
                entry_point=record["entry_point"],
            )
        )
    return _finish(rows, limit)


def _eurus_row(record: dict, system_prompt: bool) -> dict:
    """One PRIME-RL/Eurus-2-RL-Data row (data_source, prompt, ability, reward_model, extra_info) -> our columns."""
    task = {"coding": "code"}.get(record.get("ability"), record.get("ability"))
    if task not in ("math", "code"):
        raise ValueError(f"Eurus-2 row has ability {record.get('ability')!r}; expected 'math' or 'code'")
    messages = [dict(m) for m in record["prompt"]]
    messages = [
        {"role": m["role"], "content": m["content"]} for m in messages if system_prompt or m["role"] != "system"
    ]
    if system_prompt and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": PRIME_SYSTEM_PROMPT})
    truth = record["reward_model"]["ground_truth"]
    if task == "code" and not isinstance(truth, str):
        truth = json.dumps(truth)
    extra = record.get("extra_info") or {}
    source = str(record.get("data_source", "eurus"))
    row_id = f"{source}-{extra.get('index', '')}"
    if task == "math":
        return _row(messages, "math", answer=str(truth), source=source, id=row_id)
    return _row(messages, "code", tests=truth, source=source, id=row_id)


def load_eurus_rl(
    split: str = "train", path: str | None = None, *, system_prompt: bool = True, limit: int | None = None
) -> Dataset:
    """PRIME's RL data (PRIME-RL/Eurus-2-RL-Data: 455k math + 27k code prompts, validation 2,048), or a local
    file (.jsonl / .json / .parquet) with its columns. Prompts already carry PRIME's system prompt and suffixes;
    math ground truths become ``answer``, code ground truths (JSON inputs/outputs) become ``tests``."""
    if path is not None:
        records = _read_table(Path(path))
    else:
        from datasets import load_dataset

        records = load_dataset("PRIME-RL/Eurus-2-RL-Data", split=split)
    rows = []
    for record in records:
        rows.append(_eurus_row(record, system_prompt))
        if limit is not None and len(rows) >= limit:
            break
    return Dataset.from_list(rows)


class DataFileError(ValueError):
    """A problem with a data file, in one line: the file, the row (1-based), what was expected and the fix."""


_TABLE_SUFFIXES = (".jsonl", ".json", ".parquet")
_ROW_SHAPES = (
    "expected 'prompt' + 'task' + 'answer'/'tests', 'prompt' + 'answer' (a math row; 'prompt' is a question or "
    "chat messages), 'problem'/'question' + 'answer', or Eurus-2 columns ('prompt', 'ability', 'reward_model')"
)


def _read_table(path: Path) -> list[dict]:
    """The records of a .jsonl / .json / .parquet file; every problem is a `DataFileError` naming file and line."""
    if not path.is_file():
        raise DataFileError(f"{path} not found; check the path (relative paths start at {Path.cwd()})")
    if path.suffix not in _TABLE_SUFFIXES:
        raise DataFileError(
            f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(_TABLE_SUFFIXES)} "
            "(one JSON object per line for .jsonl)"
        )
    if path.suffix == ".parquet":
        records = Dataset.from_parquet(str(path)).to_list()
    else:
        text = path.read_text(encoding="utf-8")
        if path.suffix == ".json" and text.lstrip().startswith("["):
            try:
                records = json.loads(text)
            except json.JSONDecodeError as error:
                raise DataFileError(
                    f"{path}:{error.lineno}: not valid JSON ({error.msg}); expected a JSON list of objects"
                ) from None
        else:
            records = []
            for number, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as error:
                    raise DataFileError(
                        f"{path}:{number}: not valid JSON ({error.msg}); expected one JSON object per line"
                    ) from None
    if not records:
        raise DataFileError(f"{path}: no rows; add one JSON object per line ({_ROW_SHAPES})")
    for number, record in enumerate(records, 1):
        if not isinstance(record, dict):
            raise DataFileError(
                f"{path}: row {number} is a JSON {type(record).__name__}, not an object with named columns; {_ROW_SHAPES} "
                '(e.g. {"prompt": "What is 2 + 2?", "answer": "4"})'
            )
    return records


def _file_row(record: dict, path: Path, number: int, system_prompt: bool) -> dict:
    """One row of a user's file in our columns (see `load_prime_file`); `number` is 1-based, for messages."""
    where = f"{path}: row {number}"
    if "ability" in record and "reward_model" in record:
        try:
            return _eurus_row(record, system_prompt)
        except (KeyError, TypeError, ValueError) as error:
            raise DataFileError(f"{where}: not a valid Eurus-2 row ({error}); {_ROW_SHAPES}") from None
    if "prompt" in record and ("task" in record or "answer" in record):
        task = record.get("task") or "math"
        if task not in ("math", "code"):
            raise DataFileError(f"{where}: task {task!r}; expected 'math' or 'code' (or leave 'task' out for math)")
        prompt = record["prompt"]
        messages = isinstance(prompt, list) and all(
            isinstance(m, dict) and {"role", "content"} <= set(m) for m in prompt
        )
        if "task" not in record and ((isinstance(prompt, str) and prompt.strip()) or (messages and prompt)):
            pass  # a TRL-style math row: the prompt is used exactly as written
        elif isinstance(prompt, str) and prompt.strip():
            prompt = make_prompt(prompt, task, system_prompt)
        elif messages and prompt:
            prompt = [m for m in prompt if system_prompt or m["role"] != "system"]
        else:
            raise DataFileError(
                f"{where}: 'prompt' is an empty or malformed {type(prompt).__name__}; expected a question (text) or chat messages "
                '([{"role": "user", "content": "..."}])'
            )
        answer = record.get("answer")
        tests = record.get("tests") or ""
        if task == "math" and (answer is None or not str(answer).strip()):
            raise DataFileError(f"{where}: empty 'answer'; expected the reference answer of this math row (e.g. \"4\")")
        if task == "code" and not tests:
            raise DataFileError(f"{where}: a code row without 'tests'; expected a test program or inputs/outputs JSON")
        return _row(
            prompt,
            task,
            answer=_answer_text(answer),
            tests=tests if isinstance(tests, str) else json.dumps(tests),
            source=str(record.get("source", path.stem)),
            id=record.get("id", number - 1),
            **{k: str(record.get(k) or "") for k in ("code_prefix", "entry_point")},
        )
    if ("problem" in record or "question" in record) and "answer" in record:
        question = record.get("problem") or record.get("question")
        if not isinstance(question, str) or not question.strip() or not str(record["answer"]).strip():
            raise DataFileError(f"{where}: empty question or answer; expected non-empty text in both")
        return _row(
            make_prompt(question, "math", system_prompt),
            "math",
            answer=_integer_text(record["answer"]),
            source=path.stem,
            id=record.get("id", number - 1),
        )
    raise DataFileError(f"{where}: columns {sorted(record)}; {_ROW_SHAPES}")


def load_prime_file(path: str | os.PathLike, *, system_prompt: bool = True, limit: int | None = None) -> Dataset:
    """Rows from your own .jsonl / .json / .parquet file, in any of these shapes:

    * math: ``prompt`` (a question, or chat messages used as written) and ``answer``;
    * our columns: ``prompt`` and ``task`` ("math" / "code"), plus ``answer`` or ``tests``;
    * Eurus-2-RL-Data columns (``prompt``, ``ability``, ``reward_model``);
    * TRL-style math rows: ``prompt`` and ``answer`` (no ``task``), the prompt used exactly as written (chat
      messages, or a plain string the model sees as is), as ``PRIMETrainer`` trains on such a dataset;
    * plain math: ``problem`` or ``question``, and ``answer``.

    A question given as text with a ``task`` gets the task's suffix (and PRIME's system prompt unless
    ``system_prompt=False``); a ``prompt`` + ``answer`` row without ``task`` is used exactly as written, as
    ``PRIMETrainer`` trains on such a dataset. Answers are kept whatever their value (``0`` is the answer "0").
    Any problem with the file raises a one-line `DataFileError` naming the file, the row and the fix.
    """
    path = Path(path)
    rows = []
    for number, record in enumerate(_read_table(path), 1):
        row = _file_row(record, path, number, system_prompt)
        if rows and isinstance(rows[0]["prompt"], str) != isinstance(row["prompt"], str):
            raise DataFileError(
                f"{path}: row {number}: plain-string and chat-message prompts are mixed; expected every prompt "
                "written one way"
            )
        rows.append(row)
        if limit is not None and len(rows) >= limit:
            break
    return Dataset.from_list(rows)


_LOADERS: dict[str, Callable[..., Dataset]] = {
    "math500": load_math500,
    "gsm8k": load_gsm8k,
    "math": load_math_train,
    "aime24": load_aime24,
    "amc23": load_amc23,
    "humaneval": load_humaneval,
    "eurus": load_eurus_rl,
}
_ALIASES = {
    "math-500": "math500",
    "math_500": "math500",
    "math_train": "math",
    "aime2024": "aime24",
    "aime": "aime24",
    "amc": "amc23",
    "amc2023": "amc23",
    "human_eval": "humaneval",
    "eurus_rl": "eurus",
    "eurus-2-rl-data": "eurus",
}
DATASET_NAMES = tuple(_LOADERS)
# What the CLI calls the embedded demo task (prime_trl.demo), with the spellings users type for it.
DEMO_DATASET_NAMES = ("prime-demo", "prime_demo", "demo")


def canonical_dataset_name(name: str) -> str | None:
    """The `DATASET_NAMES` entry ``name`` stands for (any case, aliases such as "math-500" or "aime"), else None."""
    key = _ALIASES.get(name.lower(), name.lower())
    return key if key in _LOADERS else None


def load_dataset_by_name(
    name: str,
    split: str | None = None,
    *,
    path: str | None = None,
    system_prompt: bool = True,
    limit: int | None = None,
) -> Dataset:
    """Load a data set by name ("math500", "gsm8k", "math", "aime24", "amc23", "humaneval", "eurus") or from a
    file path (.jsonl / .json / .parquet, see `load_prime_file`). `split` applies to gsm8k (default "test") and
    eurus (default "validation"); `path` overrides where the named set's file is read from."""
    if os.path.sep in name or name.endswith(_TABLE_SUFFIXES) or Path(name).is_file():
        return load_prime_file(name, system_prompt=system_prompt, limit=limit)
    key = canonical_dataset_name(name)
    if key is None:
        raise ValueError(f"unknown data set {name!r}; use one of {list(DATASET_NAMES)} or a path to a .jsonl file")
    kwargs: dict[str, Any] = {"path": path, "system_prompt": system_prompt, "limit": limit}
    if key == "gsm8k":
        kwargs["split"] = split or "test"
    elif key == "eurus":
        kwargs["split"] = split or "validation"
    elif split not in (None, "test", "train"):
        raise ValueError(f"{name} has a single split; got split={split!r}")
    return _LOADERS[key](**kwargs)
