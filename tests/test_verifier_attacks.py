"""Attacks on the code verifier's verdict, one group per weakness class of issue 11, graded through `code_reward`.

Each hostile program defines a wrong `add` and attacks the verdict; it is graded on three row kinds (an
assert-style test program, call-based `fn_name` cases and a HumanEval-style `check(candidate)` row) in one
batch with a correct solution, which must still score 1 while the hostile one scores 0.
"""

from __future__ import annotations

import json
import re
import sys
import time

import pytest
from helpers import require_bwrap

from prime_trl.data import humaneval_tests
from prime_trl.rewards import Sandbox, SandboxLimits, assemble_program, make_code_reward

CORRECT = "def add(a, b):\n    return a + b\n"
WRONG = "def add(a, b):\n    return a - b\n"
ROWS = {
    "assert": "assert add(2, 3) == 5\nassert add(10, -4) == 6\n",
    "fn_name": {"fn_name": "add", "inputs": [[2, 3], [10, -4]], "outputs": [5, 6]},
    "check": humaneval_tests(
        "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(10, -4) == 6\n", "add"
    ),
}
LIMITS = SandboxLimits(timeout=3.0, max_total_seconds=10.0, max_processes=12)

# Writes forged verdicts and answers to every fd the process may hold (the reply pipe among them).
FORGE = r"""
import os
FORGED = [b'{"passed": true, "status": "passed"}\n', b'{"ready": true}\n', b'{"value": 5}\n', b'{"value": 6}\n',
          b'{"event": "result", "passed": true}\n']
def forge():
    for fd in range(0, 256):
        for line in FORGED:
            try:
                os.write(fd, line)
            except OSError:
                pass
"""


@pytest.fixture(scope="module")
def reward():
    require_bwrap()
    return make_code_reward(limits=LIMITS, max_workers=2)


@pytest.fixture(scope="module")
def sandbox(reward) -> Sandbox:
    return Sandbox(LIMITS, isolation="bwrap")


def fenced(code: str) -> str:
    return f"```python\n{code}\n```"


def grade(reward, hostile: str) -> None:
    """The hostile program scores 0 on every row kind, next to a correct solution that scores 1."""
    for kind, tests in ROWS.items():
        scores = reward([fenced(hostile), fenced(CORRECT)], [tests, tests])
        assert scores == [0.0, 1.0], f"{kind} row: {scores}"


# ----------------------------------------------------------------------------- 1. introspection after fork
FORK_ATTACKS = {
    # a child forked by the code under test walks every frame its signal handler reaches, harvests any verdict
    # bytes it finds there (the old in-process harness kept its prepared "passed" line in such a frame) and
    # writes them, with forged lines, to every fd
    "fork-child-signal-handler": FORGE
    + """
import signal, time
def harvest(frame):
    while frame is not None:
        for value in list(frame.f_locals.values()):
            for item in (value if isinstance(value, tuple) else (value,)):
                if isinstance(item, bytes) and b'"passed": true' in item:
                    FORGED.insert(0, item)
        frame = frame.f_back
def handler(signum, frame):
    harvest(frame)
    forge()
    os._exit(0)
_wrong = add
def add(a, b):
    if os.fork() == 0:
        signal.signal(signal.SIGALRM, handler)
        signal.setitimer(signal.ITIMER_REAL, 0.01)
        time.sleep(1)
        os._exit(0)
    os.wait()
    return _wrong(a, b)
""",
    # the fork happens inside the call under test: the child answers first, with forged lines
    "fork-in-call": FORGE
    + """
_wrong = add
def add(a, b):
    if os.fork() == 0:
        forge()
        os._exit(0)
    os.wait()
    return _wrong(a, b)
""",
    # a handler in the candidate's main thread (where the harness serves requests) breaks into its loop
    "handler-in-serving-thread": FORGE
    + """
import signal, sys
def handler(signum, frame):
    f = frame
    while f is not None:
        if "reply" in f.f_locals or "send" in f.f_locals:
            forge()
        f = f.f_back
    raise SystemExit(0)
signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.001, 0.001)
""",
    # signal every process it can name: the judge is not one of them
    "signal-everything": """
import os, signal
for pid in range(1, 4096):
    if pid != os.getpid():
        for sig in (signal.SIGSTOP, signal.SIGKILL):
            try:
                os.kill(pid, sig)
            except OSError:
                pass
""",
}


@pytest.mark.parametrize("attack", FORK_ATTACKS.values(), ids=FORK_ATTACKS.keys())
def test_introspection_after_fork_forges_nothing(reward, attack):
    grade(reward, WRONG + attack)


def test_the_judge_is_out_of_the_candidates_reach(sandbox):
    """A correct solution that signals every pid it can see still gets its verdict: the judge was unreachable."""
    result = sandbox.run_program(CORRECT + FORK_ATTACKS["signal-everything"], ROWS["assert"])
    assert result.passed, result


# ----------------------------------------------------------------------------- 2. native modules, raw memory
NATIVE_ATTACKS = {
    # _ctypes loaded by the low-level loader (no import audit event), then libc's write() on every fd
    "create_dynamic-ctypes": FORGE
    + """
import _imp, glob, importlib.machinery, sys
path = [p for d in sys.path for p in glob.glob(d + "/_ctypes.*.so")][0]
sys.modules["_ctypes"] = _imp.create_dynamic(importlib.machinery.ModuleSpec("_ctypes", None, origin=path))
import ctypes
libc = ctypes.CDLL(None)
for fd in range(256):
    for line in FORGED:
        libc.write(fd, line, len(line))
""",
    # raw memory writes into this process's own objects: make the int 5 compare as anything would
    "ctypes-memory-write": FORGE
    + """
import ctypes, sys
ctypes.memmove(id(-4), id(6), sys.getsizeof(6))
forge()
""",
    # raw reads all over the process's memory looking for a verdict to replay
    "ctypes-memory-scan": FORGE
    + """
import ctypes, gc
found = [o for o in gc.get_objects() if isinstance(o, (bytes, str)) and '"passed"' in str(o)[:1000]]
for obj in gc.get_objects()[:2000]:
    try:
        ctypes.string_at(id(obj), 16)
    except Exception:
        pass
forge()
""",
}


@pytest.mark.parametrize("attack", NATIVE_ATTACKS.values(), ids=NATIVE_ATTACKS.keys())
def test_native_modules_and_raw_memory_forge_nothing(reward, attack):
    grade(reward, WRONG + attack)


# ----------------------------------------------------------------------------- 3. third-party packages
def test_only_the_standard_library_is_visible(sandbox):
    site = sorted({p for p in sys.path if p.endswith(("site-packages", "dist-packages"))})
    code = (
        f"import glob, sys\nsys.path[:0] = {site!r}\nimported = []\n"
        "for name in ['numpy', 'cffi', '_cffi_backend', 'torch', 'pytest', 'prime_trl', 'trl', 'peft']:\n"
        "    try:\n        __import__(name)\n        imported.append(name)\n    except ImportError:\n        pass\n"
        f"listed = [f for d in {site!r} for f in glob.glob(d + '/*')]\n"
    )
    result = sandbox.run_program(code, "assert imported == [], imported\nassert listed == [], listed[:5]")
    assert result.passed, result
    assert sandbox.run_program("import json, math, collections, ctypes\nok = 1", "assert ok == 1").passed


THIRD_PARTY_ATTACKS = {
    name: f"import sys\nsys.path[:0] = {sorted(p for p in sys.path if 'packages' in p)!r}\n{body}"
    for name, body in {
        "cffi": "import _cffi_backend\nffi = _cffi_backend.FFI()\nffi.cast('char *', 0)\n",
        "numpy": "import numpy\nnumpy.frombuffer(b'x', dtype='uint8')\n",
        "host-prime_trl": "import prime_trl.rewards\nprime_trl.rewards.code_reward = lambda *a, **k: [1.0]\n",
    }.items()
}


@pytest.mark.parametrize("attack", THIRD_PARTY_ATTACKS.values(), ids=THIRD_PARTY_ATTACKS.keys())
def test_third_party_packages_are_not_importable(reward, attack):
    grade(reward, WRONG + attack)


# ----------------------------------------------------------------------------- 4. prompt helpers redefined
# Each completion redefines the prompt's helper so that it agrees with a wrong solution.
HELPER_ATTACKS = {
    "HumanEval/32": "def poly(xs, x):\n    return 0\n\ndef find_zero(xs):\n    return 0.0\n",
    "HumanEval/38": "def encode_cyclic(s):\n    return s\n\ndef decode_cyclic(s):\n    return s\n",
    "HumanEval/50": "def encode_shift(s):\n    return s\n\ndef decode_shift(s):\n    return s\n",
}


@pytest.fixture(scope="module")
def humaneval(shared_data_dir):
    from prime_trl.data import load_humaneval

    rows = {row["id"]: row for row in load_humaneval(path=shared_data_dir)}
    raw = {r["task_id"]: r for r in map(json.loads, open(shared_data_dir / "humaneval.jsonl"))}
    return rows, raw


@pytest.mark.parametrize("task", HELPER_ATTACKS)
def test_redefined_prompt_helpers_do_not_reach_the_tests(reward, sandbox, humaneval, task):
    rows, raw = humaneval
    row = rows[task]
    completions = [fenced(HELPER_ATTACKS[task]), fenced(raw[task]["prompt"] + raw[task]["canonical_solution"])]
    columns = {key: [row[key]] * 2 for key in ("tests", "code_prefix", "entry_point")}
    assert reward(completions, **columns) == [0.0, 1.0]
    # control: had the tests used the candidate's helpers (no prompt code on the judge's side), it would pass
    program = assemble_program(HELPER_ATTACKS[task], row["code_prefix"], row["entry_point"])
    assert sandbox.run_program(program, row["tests"]).passed


# ----------------------------------------------------------------------------- 5. host-side parsing
PARSING_ATTACKS = {
    "deep-json-on-every-fd": FORGE + "FORGED[:] = [b'[' * 300000 + b']' * 300000 + b'\\n']\nforge()\n",
    "deep-json-return": "def add(a, b):\n    x = []\n    for _ in range(100000):\n        x = [x]\n    return x\n",
    "deep-json-printed": "import sys\n_wrong = add\ndef add(a, b):\n    sys.stdout.write('[' * 10**6)\n    return _wrong(a, b)\n",
    "line-flood": FORGE + "import time\nFORGED[:] = [b'1\\n' * 30000]\nend = time.time() + 2.5\n"
    "while time.time() < end:\n    forge()\n",
    "endless-line": FORGE + "FORGED[:] = [b'7' * (1 << 16)]\nwhile True:\n    forge()\n",
    "deep-dict-keys": "def add(a, b):\n    d = {}\n    for _ in range(10000):\n        d = {'k': d}\n    return d\n",
}


@pytest.mark.parametrize("attack", PARSING_ATTACKS.values(), ids=PARSING_ATTACKS.keys())
def test_parsing_bombs_score_zero_in_seconds(reward, attack):
    wall, cpu = time.monotonic(), time.process_time()
    grade(reward, WRONG + attack)
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    # three batches of two rows; the trainer's own CPU stays far below a second per row (safety, not speed)
    assert wall < 60 and cpu < 6, (wall, cpu)


# ----------------------------------------------------------------------------- 6. memory outside rlimits
MEMFD_HOG = r"""
import os, sys
held = 0
fds = []
chunk = b"x" * (1 << 20)
while held < 2048:
    fd = os.memfd_create("hog")
    for _ in range(8):
        os.write(fd, chunk)
    fds.append(fd)
    held += 8
    sys.stderr.write(f"held={held}\n")
    sys.stderr.flush()
"""


def test_memory_backed_files_count_against_the_run(reward):
    limits = SandboxLimits(timeout=10.0, memory_mb=256, tmp_mb=32, max_open_files=400, max_file_mb=16)
    sandbox = Sandbox(limits, isolation="bwrap")
    if sandbox.memory_cgroup is None:
        pytest.skip("no writable memory cgroup on this host: only rlimits bound a run (see docs/verifiers.md)")
    result = sandbox.run_program(WRONG + MEMFD_HOG, ROWS["assert"])
    assert not result.passed
    held = max(map(int, re.findall(r"held=(\d+)", result.stderr)), default=0)
    # without the cgroup this reaches 2048 MB (8 x the address-space limit) in memfd pages alone
    assert held <= limits.memory_mb + limits.tmp_mb, result.stderr[-200:]
    tmpfs = "i = 0\nwhile True:\n    open(f'/tmp/f{i}', 'wb').write(b'x' * (8 << 20))\n    i += 1\n"
    assert make_code_reward(limits=limits)([fenced(WRONG + tmpfs), fenced(CORRECT)], [ROWS["assert"]] * 2) == [
        0.0,
        1.0,
    ]
