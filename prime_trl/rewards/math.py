"""Math verifier: the last ``\\boxed{}`` of a completion, checked against the reference with HF math-verify.

Every check runs in a small pool of worker processes with a hard per-check deadline. math-verify's own
timeouts rely on `signal.alarm`, which only works in the main thread (TRL may call reward functions from
other threads) and cannot interrupt long C-level arithmetic; a worker that misses its deadline is killed and
replaced, and the check scores 0. Identical strings (after removing spacing and ``\\left``/``\\right``) are
accepted in this process without a round trip.
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from prime_trl.rewards._common import check_column, completion_text

logger = logging.getLogger(__name__)

__all__ = [
    "MathGrader",
    "extract_boxed",
    "extract_final_answer",
    "final_answer_reward",
    "grade_answer",
    "make_math_reward",
    "math_reward",
]

_WORKER_SOURCE = Path(__file__).with_name("_math_worker.py").read_text()
_BOX_RE = re.compile(r"\\(?:boxed|fbox)(?![A-Za-z])")


def extract_boxed(text: str) -> str | None:
    """Content of the last complete ``\\boxed{...}`` / ``\\fbox{...}`` in `text` (braces matched), else None.

    ``\\{`` and ``\\}`` are literal braces in LaTeX and do not count for matching. The brace-less form
    ``\\boxed 5`` gives the token after the space. A final box cut off by truncation is skipped in favour of the
    last complete one.
    """
    for match in reversed(list(_BOX_RE.finditer(text))):
        start = match.end()
        while start < len(text) and text[start] == " ":
            start += 1
        if start >= len(text):
            continue
        if text[start] != "{":
            token = re.match(r"[^\s$]+", text[start:]) if start > match.end() else None
            if token:
                return token.group(0)
            continue
        depth, i = 0, start
        while i < len(text):
            char = text[i]
            if char == "\\":
                i += 2  # skip the escaped character (\{, \}, \\ ...)
                continue
            if char == "{":
                depth += 1
            elif char == "}":
                depth -= 1
                if depth == 0:
                    return text[start + 1 : i]
            i += 1
    return None


_SPACING = re.compile(r"\\left|\\right|\\[,;:! ]|\s+|\\displaystyle")


def _same_string(pred: str, gold: str) -> bool:
    """Cheap exact match before any sympy work (the common case for correct answers)."""
    normalize = lambda s: _SPACING.sub("", s).replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")  # noqa: E731
    a, b = normalize(pred), normalize(gold)
    return bool(a) and a == b


_BASE = re.compile(r"_\{?\s*(\d+)\s*\}?\s*$")


def _conflicting_bases(pred: str, gold: str) -> bool:
    """math-verify drops a base subscript (52_8 parses as 52), so 52_9 would pass for 52_8: when both answers
    carry an explicit base, the bases must agree. (A bare 52 is still accepted for 52_8.)"""
    pred_base, gold_base = _BASE.search(pred.strip()), _BASE.search(gold.strip())
    return bool(pred_base and gold_base) and int(pred_base.group(1)) != int(gold_base.group(1))


def _gold_to_text(gold: Any) -> str:
    """Reference answers may be numbers (AMC23 stores 27.0); integral floats become plain integers."""
    if isinstance(gold, float) and gold.is_integer():
        return str(int(gold))
    return str(gold).strip()


class MathGrader:
    """Equivalence checks in worker processes with a hard deadline per check.

    Args:
        timeout: seconds one check may take before its worker is killed and the check scores 0.
        num_workers: worker processes (default: min(4, CPU count)); they start on first use and live until
            `close()` or interpreter exit.
        memory_mb: address-space limit per worker, so a runaway expansion raises MemoryError instead of
            swapping the machine. 0 disables it.

    Thread-safe: concurrent `grade` calls are served one after another.
    """

    def __init__(self, timeout: float = 5.0, num_workers: int | None = None, memory_mb: int = 4096) -> None:
        if timeout <= 0:
            raise ValueError(f"MathGrader timeout must be > 0 seconds, got {timeout}")
        self.timeout = float(timeout)
        self.num_workers = max(1, num_workers if num_workers is not None else min(4, os.cpu_count() or 1))
        self.memory_mb = int(memory_mb)
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._next_id = 0
        self.timeouts = 0  # checks killed at the deadline since creation
        atexit.register(self.close)

    def grade(self, predictions: Sequence[str | None], golds: Sequence[Any]) -> list[bool]:
        """True where `predictions[i]` (an extracted answer, or None) is equivalent to `golds[i]`."""
        if len(predictions) != len(golds):
            raise ValueError(f"got {len(predictions)} predictions but {len(golds)} reference answers")
        results = [False] * len(predictions)
        todo: deque[int] = deque()
        gold_texts = [_gold_to_text(g) for g in golds]
        for i, (pred, gold) in enumerate(zip(predictions, gold_texts)):
            if pred is None or not gold:
                continue
            if _same_string(pred, gold):
                results[i] = True
            elif not _conflicting_bases(pred, gold):
                todo.append(i)
        if todo:
            with self._lock:
                self._run(todo, predictions, gold_texts, results)
        return results

    def _run(self, todo: deque[int], predictions, golds, results: list[bool]) -> None:
        self._ensure_workers()
        busy: dict[int, tuple[_Worker, int, float, int]] = {}  # fd -> (worker, index, deadline, request id)
        idle = list(self._workers)
        while todo or busy:
            while todo and idle:
                worker, index = idle.pop(), todo.popleft()
                request_id = self._next_id
                self._next_id += 1
                payload = {"id": request_id, "pred": predictions[index], "gold": golds[index]}
                if worker.send(payload):
                    busy[worker.fd] = (worker, index, time.monotonic() + self.timeout, request_id)
                else:  # the worker died between checks: replace it and retry this check
                    todo.appendleft(index)
                    idle.append(self._replace(worker))
            if not busy:
                continue
            wait = max(0.0, min(deadline for _, _, deadline, _ in busy.values()) - time.monotonic())
            readable, _, _ = select.select(list(busy), [], [], wait)
            for fd in readable:
                worker, index, _, request_id = busy[fd]
                reply = worker.read_reply()
                if reply is None:  # died mid-check (e.g. killed by the OOM killer): score 0, replace it
                    del busy[fd]
                    idle.append(self._replace(worker))
                elif reply.get("id") == request_id:
                    results[index] = bool(reply.get("ok"))
                    del busy[fd]
                    idle.append(worker)
            now = time.monotonic()
            for fd, (worker, index, deadline, _) in list(busy.items()):
                if now >= deadline:
                    self.timeouts += 1
                    logger.warning(
                        "math check exceeded %.1fs and scored 0 (prediction %.80r)", self.timeout, predictions[index]
                    )
                    del busy[fd]
                    idle.append(self._replace(worker))

    def _ensure_workers(self) -> None:
        alive = [w for w in self._workers if w.alive()]
        for w in self._workers:
            if w not in alive:
                w.kill()
        self._workers = alive
        while len(self._workers) < self.num_workers:  # start them all, then wait: start-ups overlap
            self._workers.append(_Worker(self.timeout, self.memory_mb))
        for worker in self._workers:
            worker.wait_ready()  # returns at once for a worker that is already up

    def _replace(self, worker: _Worker) -> _Worker:
        worker.kill()
        fresh = _Worker(self.timeout, self.memory_mb)
        fresh.wait_ready()
        self._workers[self._workers.index(worker)] = fresh
        return fresh

    def close(self) -> None:
        """Stop the worker processes (they are restarted on the next `grade`)."""
        for worker in self._workers:
            worker.kill()
        self._workers = []


class _Worker:
    """One `_math_worker.py` process speaking JSON lines over its stdin/stdout."""

    def __init__(self, timeout: float, memory_mb: int) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-c", _WORKER_SOURCE, str(timeout), str(memory_mb)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            start_new_session=True,  # Ctrl-C in the terminal stops the trainer, which then closes us cleanly
        )
        self.fd = self.proc.stdout.fileno()
        self._buffer = b""
        self.ready = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def wait_ready(self, startup_timeout: float = 120.0) -> None:
        deadline = time.monotonic() + startup_timeout
        while not self.ready:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self.fd], [], [], remaining)[0]:
                self.kill()
                raise RuntimeError(f"math-verify worker did not start within {startup_timeout:.0f}s")
            reply = self.read_reply()
            if reply is None:
                raise RuntimeError(
                    "math-verify worker exited at start-up; check that `math-verify` is installed "
                    f"(pip install 'math-verify>=0.7') for {sys.executable}"
                )
            self.ready = bool(reply.get("ready"))

    def send(self, payload: dict) -> bool:
        try:
            self.proc.stdin.write((json.dumps(payload) + "\n").encode())
            self.proc.stdin.flush()
            return True
        except (BrokenPipeError, OSError, ValueError):
            return False

    def read_reply(self) -> dict | None:
        """Read (blocking only until a full line is there, the fd was readable) one JSON reply; None on EOF."""
        while True:
            while b"\n" not in self._buffer:
                chunk = os.read(self.fd, 65536)
                if not chunk:
                    return None
                self._buffer += chunk
            line, self._buffer = self._buffer.split(b"\n", 1)
            try:
                reply = json.loads(line)
            except ValueError:
                reply = None
            if isinstance(reply, dict):
                return reply
            # otherwise: stray output of a library inside the worker, not ours; skip it

    def kill(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except OSError:
                self.proc.kill()
        self.proc.wait()
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except OSError:
                pass


_default_grader: MathGrader | None = None
_default_lock = threading.Lock()


def _get_default_grader() -> MathGrader:
    global _default_grader
    with _default_lock:
        if _default_grader is None:
            _default_grader = MathGrader()
        return _default_grader


def grade_answer(prediction: str | None, gold: Any, grader: MathGrader | None = None) -> bool:
    """Whether one extracted answer is equivalent to one reference answer (uses the shared grader)."""
    return (grader or _get_default_grader()).grade([prediction], [gold])[0]


def make_math_reward(
    timeout: float = 5.0, num_workers: int | None = None, memory_mb: int = 4096
) -> Callable[..., list[float]]:
    """A TRL reward function like `math_reward`, with its own grader settings (see `MathGrader`)."""
    grader: MathGrader | None = None

    def math_reward(completions: list, answer: list | None = None, **kwargs: Any) -> list[float]:
        nonlocal grader
        if grader is None:
            grader = MathGrader(timeout=timeout, num_workers=num_workers, memory_mb=memory_mb)
        return _math_reward(completions, answer, grader, kwargs)

    return math_reward


def math_reward(completions: list, answer: list | None = None, **kwargs: Any) -> list[float]:
    """TRL reward function: 1.0 when the last ``\\boxed{}`` of a completion equals the row's `answer`, else 0.0.

    Args:
        completions: plain strings, or conversational completions (lists of ``{"role", "content"}`` messages;
            the assistant messages' text is used).
        answer: the reference answer of each row (a dataset column named ``answer``); LaTeX or plain text,
            e.g. ``"\\frac{1}{2}"``, ``"(3, \\frac{\\pi}{2})"``, ``"2125"``. Numbers are accepted too.
        **kwargs: TRL's other arguments (``prompts``, ``completion_ids``, ``trainer_state``, ``log_metric``, other
            columns); ``log_metric`` (if given) receives the fraction of completions without a boxed answer.

    Equivalence is math-verify's (numbers, fractions, radicals, sets/tuples/intervals, matrices, symbolic
    expressions, percentages, thousands separators, ``x = 3`` vs ``3``); each check has a hard 5 s deadline and
    runs in worker processes, so it is safe from any thread. Use `make_math_reward` for other settings.
    """
    return _math_reward(completions, answer, _get_default_grader(), kwargs)


_NUMBER_RE = re.compile(r"-?\d+(?:\.\d+)?")


def extract_final_answer(text: str) -> str | None:
    """The last ``\\boxed{}`` of `text` if it has one, else its last number (``"9 + 4 = 13."`` -> ``"13"``)."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    numbers = _NUMBER_RE.findall(text.replace(",", ""))
    return numbers[-1] if numbers else None


def final_answer_reward(completions: list, answer: list | None = None, **kwargs: Any) -> list[float]:
    """TRL reward function like `math_reward`, for models that answer in plain text: the answer is the last
    ``\\boxed{}`` when there is one, else the last number of the completion (graded by the same math-verify
    workers). Fits short numeric tasks and small instruct models that rarely box their answers."""
    return _math_reward(
        completions, answer, _get_default_grader(), kwargs, extract_final_answer, "final_answer_reward/no_answer"
    )


def _math_reward(
    completions: list,
    answer: list | None,
    grader: MathGrader,
    kwargs: dict,
    extract: Callable[[str], str | None] = extract_boxed,
    missing_metric: str = "math_reward/no_boxed_answer",
) -> list[float]:
    answers = check_column("answer", answer, len(completions), reward="math_reward", hint="the reference answer")
    predictions = [extract(completion_text(c)) for c in completions]
    scores = [1.0 if ok else 0.0 for ok in grader.grade(predictions, answers)]
    log_metric = kwargs.get("log_metric")
    if callable(log_metric) and predictions:
        log_metric(missing_metric, sum(p is None for p in predictions) / len(predictions))
    return scores
