"""Attack suite for the code sandbox: programs that try to fake a pass, escape, or harm the host.

Every test asserts the score (0), and the `host` fixture asserts afterwards that no sandbox (or judge) process
is left running, that no file appeared outside the sandbox, and that this process can still start processes.
Attacks on the verdict itself, one per weakness class, graded through `code_reward`, are in
tests/test_verifier_attacks.py.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from pathlib import Path

import pytest
from helpers import require_bwrap

from prime_trl.rewards import Sandbox, SandboxLimits, code_reward

# The interpreter flags of every harness (candidate, judge, case supervisor), in each such process's argv
RUNNER_MARKER = b"\x00-I\x00-S\x00-B\x00-X\x00utf8\x00-c\x00"


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    require_bwrap()
    return Sandbox(SandboxLimits(timeout=3.0, max_total_seconds=15.0, max_processes=12), isolation="bwrap")


def _sandbox_pids() -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if RUNNER_MARKER in (entry / "cmdline").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                pass
    return pids


@pytest.fixture
def host(tmp_path):
    """Canary directory the attacks aim at; afterwards: no leftovers, no new files, host still works."""
    canary = tmp_path / "canary"
    canary.mkdir()
    before_tmp = set(os.listdir("/tmp"))
    yield canary
    deadline = time.monotonic() + 5
    while _sandbox_pids() and time.monotonic() < deadline:  # the kernel tears the PID namespace down async
        time.sleep(0.05)
    assert _sandbox_pids() == [], "sandbox processes survived the run"
    assert list(canary.iterdir()) == [], "a file appeared in the host canary directory"
    new_tmp = {name for name in set(os.listdir("/tmp")) - before_tmp if "pwned" in name}
    assert not new_tmp, f"files appeared in the host /tmp: {new_tmp}"
    assert subprocess.run(["true"]).returncode == 0  # this process can still fork and exec


def _fails(sandbox: Sandbox, code: str, tests: str = "assert False, 'tests must fail'"):
    result = sandbox.run_program(code, tests)
    assert not result.passed, f"attack scored a pass: {result}"
    return result


# ----------------------------------------------------------------------------- exiting early / hiding failure
@pytest.mark.parametrize(
    "code",
    [
        "import sys\nsys.exit(0)",
        "raise SystemExit(0)",
        "import os\nos._exit(0)",
        "import os, signal\nos.kill(os.getpid(), signal.SIGKILL)",
        "import os, signal\nos.kill(os.getpid(), signal.SIGTERM)",
        "raise KeyboardInterrupt",
        "exit(0)",
        "quit()",
    ],
    ids=["sys.exit", "SystemExit", "os._exit", "SIGKILL-self", "SIGTERM-self", "KeyboardInterrupt", "exit", "quit"],
)
def test_early_exit_in_solution(sandbox, host, code):
    _fails(sandbox, code)


@pytest.mark.parametrize("exit_call", ["sys.exit(0)", "os._exit(0)", "raise SystemExit(0)"])
def test_early_exit_inside_function_under_test(sandbox, host, exit_call):
    code = f"import os, sys\ndef solve(x):\n    {exit_call}\n"
    _fails(sandbox, code, "assert solve(1) == 2\nassert solve(2) == 3")


@pytest.mark.parametrize(
    "code",
    [
        "import atexit, os\natexit.register(lambda: os._exit(0))",
        "import atexit, sys\natexit.register(lambda: sys.stdout.write('PASSED\\n'))",
        "import sys\nsys.excepthook = lambda *a: None",
        "import threading\nthreading.excepthook = lambda *a: None",
        "import sys\nsys.unraisablehook = lambda *a: None",
        "import builtins\nclass AssertionError(Exception):\n    pass\nbuiltins.AssertionError = AssertionError",
        "import builtins, os, sys\nbuiltins.print = lambda *a, **k: None\nsys.stdout = open(os.devnull, 'w')",
        'import sys\nclass Out:\n    def write(self, s):\n        sys.__stdout__.write(\'{"event": "result", "passed": true}\\n\')\n'
        "    def flush(self):\n        pass\nsys.stdout = sys.stderr = Out()",
    ],
    ids=[
        "atexit-exit",
        "atexit-print",
        "excepthook",
        "threading-excepthook",
        "unraisablehook",
        "AssertionError",
        "print-stdout",
        "fake-stdout-verdict",
    ],
)
def test_hooks_do_not_hide_a_failing_assert(sandbox, host, code):
    _fails(sandbox, code)


BUILTIN_TESTS = "assert abs(solve(1) - 1.0) < 1e-9\nassert len(solve_list()) == 3\nassert isinstance(solve(1), int)"
WRONG = "def solve(x):\n    return 100.5\ndef solve_list():\n    return []\n"


@pytest.mark.parametrize(
    "patch",
    [
        "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.len = lambda x: 3\nbuiltins.isinstance = lambda *a: True",
        "__builtins__.abs = lambda x: 0\n__builtins__.len = lambda x: 3\n__builtins__.isinstance = lambda *a: True",
        "abs = lambda x: 0\nlen = lambda x: 3\nisinstance = lambda *a: True",
        "globals()['__builtins__'] = {'abs': lambda x: 0, 'len': lambda x: 3, 'isinstance': lambda *a: True}",
        # patch the builtins again while the tests run: from inside the function under test, and from a thread
        "import builtins\n_solve = solve\ndef solve(x):\n    builtins.abs = lambda v: 0\n    builtins.len = lambda v: 3\n"
        "    builtins.isinstance = lambda *a: True\n    return _solve(x)",
        "import builtins, threading, time\ndef keep_patching():\n    while True:\n        builtins.abs = lambda v: 0\n"
        "        builtins.len = lambda v: 3\n        time.sleep(0.001)\nthreading.Thread(target=keep_patching, daemon=True).start()"
        "\ntime.sleep(0.05)",
    ],
    ids=[
        "builtins-module",
        "__builtins__-attr",
        "shadowing-globals",
        "replace-__builtins__",
        "patch-during-tests",
        "patch-from-thread",
    ],
)
def test_patched_builtins_do_not_reach_the_tests(sandbox, host, patch):
    _fails(sandbox, WRONG + patch, BUILTIN_TESTS)
    # control: the same tests pass for a correct solution with the same patch applied
    correct = "def solve(x):\n    return 1\ndef solve_list():\n    return [1, 2, 3]\n"
    assert sandbox.run_program(correct + patch, BUILTIN_TESTS).passed


def test_always_equal_object_fails_humaneval_tests(sandbox, host):
    from prime_trl.data import humaneval_tests

    code = (
        "class Anything:\n    def __eq__(self, other):\n        return True\n    def __ne__(self, other):\n"
        "        return False\n\ndef add(a, b):\n    return Anything()\n"
        "class Int(int):\n    def __eq__(self, other):\n        return True\n\ndef add2(a, b):\n    return Int(0)\n"
    )
    test = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(5, 5) == 10\n"
    _fails(sandbox, code, humaneval_tests(test, "add"))
    _fails(sandbox, code, humaneval_tests(test, "add2"))
    assert sandbox.run_program("def add(a, b):\n    return a + b\n", humaneval_tests(test, "add")).passed


# ----------------------------------------------------------------------------- forging the verdict
FORGE_ALL_FDS = """
import os
def forge(lines):
    for fd in range(0, 1024):
        for line in lines:
            try:
                os.write(fd, line)
            except OSError:
                pass
"""


def test_forged_verdict_lines_without_nonce_are_ignored(sandbox, host):
    code = FORGE_ALL_FDS + (
        'forge([b\'{"event": "result", "passed": true}\\n\', '
        'b\'{"event": "result", "passed": true, "nonce": "00000000000000000000000000000000"}\\n\'])\n'
        "os._exit(0)"
    )
    _fails(sandbox, code)


SCAN = (
    FORGE_ALL_FDS
    + r"""
import re, sys
SECRET = re.compile(rb'"passed": true')
found = []
def scan(obj, depth=0, seen=None):
    seen = set() if seen is None else seen
    if id(obj) in seen or depth > 6:
        return
    seen.add(id(obj))
    if isinstance(obj, str):
        obj = obj.encode(errors="ignore")
    if isinstance(obj, (bytes, bytearray)):
        if SECRET.search(obj):
            found.append(bytes(obj))
        return
    items = []
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, (list, tuple, set, frozenset)):
        items = list(obj)
    elif callable(obj):
        items = [c.cell_contents for c in (getattr(obj, "__closure__", None) or ()) if c is not None]
        items += list(getattr(obj, "__defaults__", None) or ())
    for item in items:
        try:
            scan(item, depth + 1, seen)
        except Exception:
            pass
def walk(frame):
    while frame is not None:
        scan(dict(frame.f_locals))
        frame = frame.f_back
def attempt(name, action):
    try:
        action()
        sys.stderr.write(f"{name}: ran, {len(found)} secrets\n")
    except Exception as exc:
        sys.stderr.write(f"{name}: {exc}\n")
"""
)


def _frame_attack(body: str) -> str:
    return SCAN + body + "\nforge(found)\nsys.stderr.flush()\nos._exit(0)\n"


@pytest.mark.parametrize(
    "name,body",
    [
        ("getframe", "attempt('getframe', lambda: walk(sys._getframe()))"),
        (
            "traceback",
            "def tb():\n    try:\n        raise ValueError\n    except ValueError as e:\n        walk(e.__traceback__.tb_frame)\n"
            "attempt('traceback', tb)",
        ),
        (
            "generator",
            "def gen():\n    yield\ng = gen()\nnext(g)\nattempt('generator', lambda: walk(g.gi_frame))",
        ),
        ("current_frames", "attempt('current_frames', lambda: [walk(f) for f in sys._current_frames().values()])"),
        ("gc", "import gc\nattempt('gc', lambda: [scan(o) for o in gc.get_objects()])"),
        (
            "gc-fresh-module",
            "import _imp, importlib.machinery\n"
            "spec = importlib.machinery.ModuleSpec('gc', importlib.machinery.BuiltinImporter)\n"
            "attempt('gc-fresh-module', lambda: [scan(o) for o in _imp.create_builtin(spec).get_objects()])",
        ),
        ("settrace", "attempt('settrace', lambda: sys.settrace(lambda f, e, a: walk(f)))"),
        ("setprofile", "attempt('setprofile', lambda: sys.setprofile(lambda f, e, a: walk(f)))"),
        (
            "inspect",
            "import inspect\nattempt('inspect', lambda: [walk(fi.frame) for fi in inspect.stack()])",
        ),
        ("ctypes", "attempt('ctypes', lambda: __import__('ctypes').string_at(id(found), 64))"),
        (
            "proc-mem",
            "def mem():\n    with open('/proc/self/mem', 'rb') as f:\n        f.read(1)\nattempt('proc-mem', mem)",
        ),
        (
            "code-replace",
            "attempt('code-replace', lambda: (lambda: 0).__code__.replace(co_consts=(1,)))",
        ),
        (
            "marshal",
            "import marshal\nattempt('marshal', lambda: marshal.loads(marshal.dumps(compile('1', 'x', 'eval'))))",
        ),
    ],
)
def test_introspecting_the_candidate_process_forges_nothing(sandbox, host, name, body):
    """The candidate may inspect its own process freely: the verdict is not in it (it is written by the judge,
    in another process, to a pipe the candidate never holds), so whatever it finds and forges counts for nothing."""
    result = _fails(sandbox, _frame_attack(body))
    if name == "proc-mem":  # /proc is simply not mounted
        assert "No such file" in result.stderr, result.stderr
    else:
        assert f"{name}: ran" in result.stderr, result.stderr


@pytest.mark.parametrize("fresh_module", [False, True], ids=["signal", "fresh-_signal-via-_imp"])
def test_signal_handler_frames_hold_nothing(sandbox, host, fresh_module):
    """A Python signal handler runs in the main thread and gets its frame: in the candidate's process it may
    walk every frame there is, and none of them holds or writes the verdict."""
    get_signal = (
        "import _imp, importlib.machinery\n"
        "sig = _imp.create_builtin(importlib.machinery.ModuleSpec('_signal', importlib.machinery.BuiltinImporter))\n"
        "_imp.exec_builtin(sig)\n"
        if fresh_module
        else "import signal as sig\n"
    )
    body = get_signal + (
        "import time\nhits = []\n"
        "def handler(signum, frame):\n    walk(frame)\n    hits.append(1)\n"
        "def install():\n    sig.signal(sig.SIGALRM, handler)\n    sig.setitimer(sig.ITIMER_REAL, 0.05)\n"
        "    deadline = time.time() + 1\n    while not hits and time.time() < deadline:\n        pass\n"
        "    sys.stderr.write(f'handler ran: {bool(hits)}, ')\n"
        "attempt('signal', install)\n"
    )
    result = _fails(sandbox, _frame_attack(body))
    assert "handler ran: True" in result.stderr, result.stderr


# ----------------------------------------------------------------------------- runaway resources
@pytest.mark.parametrize(
    "code",
    [
        "while True:\n    pass",
        "import time\ntime.sleep(10**6)",
        "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass",
        "import threading, time\nwhile True:\n    threading.Thread(target=time.sleep, args=(100,)).start()",
        "chunks = []\nwhile True:\n    chunks.append(bytearray(50 * 1024 * 1024))",
        "import os\nfor i in range(10**6):\n    os.fork() if i < 4 else None\n    chunks = [bytearray(10**8) for _ in range(100)]",
        "import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
        "with open('/tmp/big', 'wb') as f:\n    while True:\n        f.write(b'x' * (1 << 20))",
        "i = 0\nwhile True:\n    with open(f'/tmp/f{i}', 'wb') as f:\n        f.write(b'x' * (1 << 20))\n    i += 1",
        "files = []\nwhile True:\n    files.append(open('/dev/null'))",
        "import sys\nsys.setrecursionlimit(10**9)\ndef f(n):\n    return f(n + 1)\nf(0)",
    ],
    ids=[
        "cpu-loop",
        "sleep",
        "fork-bomb",
        "thread-bomb",
        "memory",
        "fork-and-allocate",
        "stdout-flood",
        "big-file",
        "many-files",
        "fd-exhaustion",
        "stack-overflow",
    ],
)
def test_runaway_programs_are_stopped(sandbox, host, code):
    result = _fails(sandbox, code, "pass")  # these tests would pass: only a normal end of the program counts
    assert result.status in ("failed", "crashed", "timeout")


def test_fork_bomb_stays_within_the_process_limit(sandbox, host):
    code = (
        "import os, sys, time\nchildren = 0\n"
        "for _ in range(200):\n    try:\n        if os.fork() == 0:\n            time.sleep(30)\n            os._exit(0)\n"
        "        children += 1\n    except OSError:\n        break\n"
        "sys.stderr.write(f'children={children}\\n')\nsys.stderr.flush()\n"
    )
    result = _fails(sandbox, code, "assert False")
    children = int(result.stderr.split("children=")[1].split()[0])
    assert children < sandbox.limits.max_processes


def test_stdin_stdout_runaway_cases_are_stopped(sandbox, host):
    fork_bomb = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    results = sandbox.run_cases(fork_bomb, ["1\n", "2\n"])
    assert [r.status for r in results] == ["timeout", "timeout"]
    assert [r.status for r in sandbox.run_cases("while True:\n    pass", ["1\n"])] == ["timeout"]


# ----------------------------------------------------------------------------- escapes
def test_writes_outside_the_temp_dir_fail(sandbox, host):
    targets = [
        str(host / "pwned.txt"),
        "/tmp/../pwned_root.txt",
        "/pwned.txt",
        "/usr/pwned.txt",
        "/etc/pwned.txt",
        "/root/pwned.txt",
        str(Path(__file__).resolve().parent / "pwned.txt"),
        os.path.expanduser("~/pwned.txt"),
    ]
    code = "import sys\nwrote = []\n" + "".join(
        f"try:\n    open({t!r}, 'w').write('x')\n    wrote.append({t!r})\nexcept OSError as e:\n"
        f"    sys.stderr.write(str(e) + '\\n')\n"
        for t in targets
    )
    _fails(sandbox, code, "assert wrote, 'nothing written'")
    for target in targets:
        assert not Path(target).exists(), target
    # the private /tmp works, and is private: what the program writes there never reaches the host's /tmp
    assert sandbox.run_program(
        "open('/tmp/pwned_private', 'w').write('x')\ndef read():\n    return open('/tmp/pwned_private').read()",
        "assert read() == 'x'",
    ).passed
    assert not Path("/tmp/pwned_private").exists()


def test_reading_host_files_fails(sandbox, host):
    secret = host.parent / "secret.txt"
    secret.write_text("top secret")
    paths = [
        str(secret),
        str(Path(__file__).resolve()),
        "/etc/passwd",
        "/etc/shadow",
        "/root/.bashrc",
        "/proc/1/environ",
    ]
    code = "data = []\n" + "".join(
        f"try:\n    data.append(open({p!r}).read())\nexcept OSError:\n    pass\n" for p in paths
    )
    _fails(sandbox, code, "assert data, 'nothing read'")


@pytest.fixture
def listener():
    """TCP and UDP servers on the host loopback that record anything reaching them."""
    hits = []
    tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    tcp.bind(("127.0.0.1", 0))
    tcp.listen(16)
    tcp.settimeout(0.2)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.2)
    stop = threading.Event()

    def serve():
        while not stop.is_set():
            for sock in (tcp, udp):
                try:
                    hits.append(sock.accept() if sock is tcp else sock.recvfrom(100))
                except (TimeoutError, OSError):
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield tcp.getsockname()[1], udp.getsockname()[1], hits
    stop.set()
    thread.join()
    tcp.close()
    udp.close()


def test_network_is_unreachable(sandbox, host, listener):
    tcp_port, udp_port, hits = listener
    try:
        external = socket.gethostbyname(socket.gethostname())
    except OSError:
        external = "127.0.0.1"
    code = (
        "import socket, sys\nconnected = []\n"
        f"for address in [('127.0.0.1', {tcp_port}), ('{external}', {tcp_port}), ('1.1.1.1', 53), ('::1', {tcp_port})]:\n"
        "    family = socket.AF_INET6 if ':' in address[0] else socket.AF_INET\n"
        "    try:\n        s = socket.socket(family, socket.SOCK_STREAM)\n        s.settimeout(1)\n"
        "        s.connect(address)\n        connected.append(address)\n"
        "    except OSError as e:\n        sys.stderr.write(f'{address}: {e}\\n')\n"
        "try:\n"
        f"    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'pwned', ('127.0.0.1', {udp_port}))\n"
        "except OSError:\n    pass\n"
    )
    _fails(sandbox, code, "assert connected, 'no connection'")
    time.sleep(0.5)  # let the listener thread see anything that might have arrived
    assert hits == [], f"the sandbox reached a host listener: {hits}"


def test_environment_of_the_trainer_is_invisible(sandbox, host, monkeypatch):
    secret = "prime-trl-secret-" + os.urandom(8).hex()
    monkeypatch.setenv("PRIME_TRL_TEST_SECRET", secret)
    code = (
        "import os\nfound = [v for v in os.environ.values()]\n"
        "for path in ['/proc/self/environ', '/proc/1/environ', f'/proc/{os.getppid()}/environ']:\n"
        "    try:\n        found.append(open(path).read())\n    except OSError:\n        pass\n"
        "print(' '.join(found))\n"
    )
    results = sandbox.run_cases(code, [""])
    assert results[0].status == "ok"
    assert secret not in results[0].stdout
    assert "PRIME_TRL_TEST_SECRET" not in results[0].stdout
    # and through the reward function, with the secret as the expected output: score 0
    completion = f"```python\n{code}```"
    assert code_reward([completion], [{"inputs": [""], "outputs": [secret]}]) == [0.0]


@pytest.mark.parametrize(
    "code",
    [
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)",
        "import os, signal\nos.kill(1, signal.SIGKILL)",
        "import os, signal\nos.kill(-1, signal.SIGKILL)",
        "import os, signal\nos.killpg(0, signal.SIGKILL)",
        "import os, signal\nfor pid in range(1, 4096):\n    try:\n        os.kill(pid, signal.SIGTERM)\n    except OSError:\n        pass",
    ],
    ids=["parent", "pid1", "everyone", "own-group", "scan-pids"],
)
def test_signals_cannot_reach_the_host(sandbox, host, code):
    _fails(sandbox, code)
    # we are alive (this line runs), and the sandbox still works afterwards
    assert sandbox.run_program("x = 1", "assert x == 1").passed
