"""Trusted harness that runs *inside* the code sandbox, before and around the untrusted program.

prime_trl never imports this file: `sandbox.py` passes its text to `python -I -S -X utf8 -c`, so it runs on
the bare standard library of the sandbox's interpreter. Protocol:

* stdin: one JSON job (program, tests or cases, limits, a random per-run nonce). It is read to EOF with
  `os.read` and fd 0 is then pointed at /dev/null, so the job text is gone before untrusted code runs.
* argv[1]: a pipe fd the host reads. Every message is a JSON line that carries the nonce; the host ignores
  everything else and keeps only the first verdict. The program shares our fd table and can write to that
  pipe, but without the nonce its lines count for nothing.

Modes:

* ``program``: run the solution, then the test program (assert style), in one interpreter. The "passed" line
  is written only after the test code object returned normally; any exception, `sys.exit`, `os._exit`,
  signal or timeout leaves no "passed" line, which the host scores 0. Tests see the solution's globals except
  those that shadow a builtin, and a pristine builtins dict copied before the solution ran. After the solution
  has run, this process writes only byte strings prepared beforehand, with `os.write` captured beforehand:
  no json, no formatting, nothing the program could have patched ever sees the nonce.
* ``io`` / ``call``: per case, a forked child runs the program with the case on stdin (or calls ``fn_name``
  with the case's JSON arguments and prints the JSON result); this process, which never runs untrusted code,
  reports the child's captured stdout. The host compares it with the expected output, so expected outputs
  never enter the sandbox.

Before untrusted code runs, a permanent audit hook (PEP 578) refuses the usual ways to reach this harness's
frames and memory: frame objects (`sys._getframe`, traceback/generator/coroutine frames,
`sys._current_frames`), tracing and profiling hooks, `gc` object walks, `ctypes` and the CPython test modules,
and building code objects from raw bytes (`code.__new__`, `marshal`; modules imported later are compiled from
source). In program mode the solution and tests run in a second thread, and the main thread drops every
reference to the verdict first: a signal handler, which always runs in the main thread and receives its
frame, finds nothing there. That is defence in depth for score integrity, not a security boundary:
bubblewrap and the rlimits protect the machine. See docs/verifiers.md for the threat model and its limits.
"""

import os
import sys


def _run() -> None:
    import builtins
    import json
    import resource

    write, exit_now = os.write, os._exit  # captured before any untrusted code exists
    result_fd = int(sys.argv[1])

    chunks = []
    while chunk := os.read(0, 1 << 20):
        chunks.append(chunk)
    job = json.loads(b"".join(chunks))
    del chunks
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)

    nonce = job.pop("nonce")

    def line(message: dict) -> bytes:
        return (json.dumps({**message, "nonce": nonce}) + "\n").encode()  # noqa: F821 - `del nonce` clears it later

    def write_all(data: bytes) -> None:
        while data:
            data = data[write(result_fd, data) :]

    # --- privileges and limits (soft = hard: the program cannot raise them again) ---
    if job.get("uid") is not None:  # bwrap ran as root: become a throw-away uid so RLIMIT_NPROC binds
        os.setgroups([])
        os.setgid(job["gid"])
        os.setuid(job["uid"])
    limits = job["limits"]
    for name, value in (
        ("RLIMIT_AS", limits["memory_bytes"]),
        ("RLIMIT_NPROC", limits["max_processes"]),
        ("RLIMIT_FSIZE", limits["max_file_bytes"]),
        ("RLIMIT_NOFILE", limits["max_open_files"]),
        ("RLIMIT_CORE", 0),
    ):
        resource.setrlimit(getattr(resource, name), (value, value))
    resource.setrlimit(resource.RLIMIT_CPU, (limits["cpu_seconds"], limits["cpu_seconds"] + 1))
    _set_not_dumpable()  # other processes of this uid cannot ptrace us or read our memory

    mode = job["mode"]
    try:
        # optimize=0 keeps `assert` statements whatever flags the interpreter got
        solution = compile(job["code"], "<solution>", "exec", dont_inherit=True, optimize=0)
        tests = compile(job["tests"], "<tests>", "exec", dont_inherit=True, optimize=0) if mode == "program" else None
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        write_all(line({"event": "error", "error": f"{type(exc).__name__}: {exc}"}))
        exit_now(0)

    # Imported now, from their cached bytecode: later imports compile from source (see below), and some of
    # these touch frames at import time, which the audit hook would refuse.
    import _thread
    import bisect  # noqa: F401
    import collections  # noqa: F401
    import functools  # noqa: F401
    import heapq  # noqa: F401
    import itertools  # noqa: F401
    import math  # noqa: F401
    import select  # noqa: F401
    import signal  # noqa: F401
    import string  # noqa: F401
    import types  # noqa: F401
    import typing  # noqa: F401

    sys.pycache_prefix = "/nonexistent-prime-trl-pycache"  # no .pyc is read from now on: marshal can be refused
    clean_builtins = dict(builtins.__dict__)
    sys.addaudithook(_make_audit_hook())

    if mode != "program":
        _run_cases(solution, job, line, write_all, exit_now, devnull)
    verdicts = (line({"event": "result", "passed": True}), line({"event": "result", "passed": False}))
    info_prefix = line({"event": "info"})[:-2]  # '... "nonce": "<hex>"' without the closing brace
    # The main thread must keep nothing the program could use: a Python signal handler runs in the main thread
    # and receives its frame (and, through f_back, the module's). So the worker thread waits on `go` until this
    # frame has dropped every reference, and ends the process itself with os._exit.
    go = _thread.allocate_lock()
    go.acquire()
    _thread.stack_size(64 << 20)  # deep recursion needs a main-thread-sized stack
    _thread.start_new_thread(
        _run_program, (go, solution, tests, clean_builtins, verdicts, info_prefix, write_all, exit_now)
    )
    wall_seconds = limits["wall_seconds"]
    del job, line, nonce, verdicts, info_prefix, solution, tests, clean_builtins, write_all, limits, chunk
    go.release()
    # Then it only keeps the wall clock (the host kills us a little later anyway, as a backstop).
    import time

    block, deadline = _thread.allocate_lock(), time.monotonic() + wall_seconds
    block.acquire()
    while time.monotonic() < deadline:
        try:
            block.acquire(timeout=max(0.0, deadline - time.monotonic()))
        except BaseException:  # noqa: BLE001 - interrupt_main / signals must not end the wait early
            continue
    exit_now(3)


def _run_program(go, solution, tests, clean_builtins, verdicts, info_prefix, write_all, exit_now) -> None:
    """Solution, then tests (in the worker thread); "passed" only if the test code returns normally."""
    run, base_exception, passed, failed = exec, BaseException, verdicts[0], verdicts[1]
    del verdicts
    go.acquire()  # until the main thread has let go of everything
    namespace = {"__name__": "solution", "__builtins__": __builtins__}
    where = "solution"
    try:
        try:
            run(solution, namespace)
            where = "tests"
            test_namespace = {key: value for key, value in namespace.items() if key not in clean_builtins}
            test_namespace["__name__"] = "__main__"
            test_namespace["__builtins__"] = clean_builtins
            run(tests, test_namespace)
        except base_exception as exc:  # every way out but a normal return is a failure
            write_all(failed)
            # Diagnostics only (the verdict is out), reduced to plain characters without formatting code.
            write_all(info_prefix + b', "error": "' + _describe(exc, where) + b'"}\n')
        else:
            write_all(passed)
    finally:
        exit_now(0)


def _describe(exc: BaseException, where: str) -> bytes:
    try:
        lineno = 0
        tb = exc.__traceback__
        while tb is not None:
            lineno, tb = tb.tb_lineno, tb.tb_next
        text = f"{type(exc).__name__} at {where} line {lineno}"
        return "".join(c for c in text if c.isalnum() or c in " _.").encode("ascii", "ignore")[:200]
    except BaseException:  # noqa: BLE001 - user-defined exception types can raise anything here
        return b"exception"


def _run_cases(solution, job, line, write_all, exit_now, devnull) -> None:
    """io/call mode: one forked child per case; this process never runs untrusted code itself."""
    import signal

    limits, fn_name = job["limits"], job.get("fn_name")
    max_output = limits["max_output_bytes"]
    for index, case in enumerate(job["cases"]):
        stdin_fd, stdout_fd = os.memfd_create("stdin"), os.memfd_create("stdout")
        data = case.encode() if fn_name is None else b""
        while data:
            data = data[os.write(stdin_fd, data) :]
        os.lseek(stdin_fd, 0, os.SEEK_SET)
        pid = os.fork()
        if pid == 0:
            _child(solution, case, fn_name, stdin_fd, stdout_fd, devnull, limits["case_cpu_seconds"])
        status = _wait(pid, limits["case_seconds"])
        # Reap whatever the case left behind so it cannot eat the next case's CPU or process budget.
        try:
            if job.get("pid_namespace"):
                os.kill(-1, signal.SIGKILL)  # everyone in this PID namespace except us and its init
            else:
                os.killpg(pid, signal.SIGKILL)
        except OSError:
            pass
        output = os.pread(stdout_fd, max_output + 1, 0)
        os.close(stdin_fd)
        os.close(stdout_fd)
        # On a loaded machine the CPU limit (SIGXCPU, then SIGKILL) can strike before this wall-clock wait
        # notices the deadline: either way the case ran out of time.
        if status is None or (os.WIFSIGNALED(status) and os.WTERMSIG(status) in (signal.SIGXCPU, signal.SIGKILL)):
            outcome = "timeout"
        elif os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            outcome = "ok"
        else:
            outcome = "error"
        message = {"event": "case", "index": index, "status": outcome, "truncated": len(output) > max_output}
        write_all(line({**message, "stdout": output[:max_output].decode("utf-8", "replace")}))
    write_all(line({"event": "done"}))
    exit_now(0)


def _child(solution, case, fn_name, stdin_fd, stdout_fd, devnull, cpu_seconds) -> None:
    """The forked child: untrusted code from here on. Never returns."""
    import builtins
    import json
    import resource

    exit_now, dumps, stdout = os._exit, json.dumps, sys.stdout
    status = 1
    try:
        os.setpgid(0, 0)
        hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
        resource.setrlimit(resource.RLIMIT_CPU, (min(cpu_seconds, hard), min(cpu_seconds + 1, hard)))
        os.dup2(stdin_fd, 0)
        os.dup2(stdout_fd, 1)
        os.dup2(devnull, 2)
        os.closerange(3, 1 << 16)  # above all the result pipe: the program never holds it
        arguments = json.loads(case) if fn_name is not None else None
        namespace = {"__name__": "__main__" if fn_name is None else "solution", "__builtins__": builtins}
        exec(solution, namespace)
        if fn_name is not None:
            function = namespace.get(fn_name)
            if function is None and isinstance(namespace.get("Solution"), type):  # LeetCode-style class
                function = getattr(namespace["Solution"](), fn_name)
            stdout.write(dumps(function(*arguments)))
        status = 0
    except SystemExit as exc:
        status = 0 if exc.code is None or exc.code == 0 else 1
    except BaseException:  # noqa: BLE001 - a crash is a failed case
        status = 1
    try:
        stdout.flush()
        sys.stdout.flush()
    except BaseException:  # noqa: BLE001
        pass
    exit_now(status)


def _wait(pid: int, seconds: float):
    """Wait up to `seconds` for child `pid`; its wait status, or None after killing it on timeout."""
    import select
    import signal
    import time

    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):  # old kernel / Python: poll instead
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            time.sleep(0.005)
    else:
        ready, _, _ = select.select([pidfd], [], [], seconds)
        os.close(pidfd)
        if ready:
            return os.waitpid(pid, 0)[1]
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return None


def _set_not_dumpable() -> None:
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0)  # PR_SET_DUMPABLE = 4
    except Exception:  # noqa: BLE001 - best effort; in root mode the uid switch already cleared it
        pass
    for name in [m for m in sys.modules if m == "ctypes" or m.startswith(("ctypes.", "_ctypes"))]:
        del sys.modules[name]  # so that `import ctypes` in the program reaches the audit hook (and is refused)


class SandboxRestriction(ValueError, AttributeError):
    """Raised for refused operations. Both bases, so stdlib code that catches either keeps working
    (logging, typing, collections.namedtuple probe frames inside `except (AttributeError, ValueError)`)."""


def _make_audit_hook():
    """The hook uses closure variables only (no global or builtin look-ups), so patching builtins or this
    module cannot switch it off; audit hooks cannot be removed once added."""
    blocked_events = frozenset(
        {
            "sys._getframe",
            "sys._current_frames",
            "sys._current_exceptions",
            "sys.settrace",
            "sys.setprofile",
            "gc.get_objects",
            "gc.get_referrers",
            "gc.get_referents",
            "code.__new__",
            "marshal.loads",
            "marshal.load",
        }
    )
    blocked_prefixes = ("ctypes.", "sys.monitoring", "cpython.")
    blocked_attributes = frozenset({"tb_frame", "gi_frame", "cr_frame", "ag_frame"})
    blocked_modules = frozenset(
        {
            "ctypes",
            "_ctypes",
            "_testcapi",
            "_testinternalcapi",
            "_testbuffer",
            "_testmultiphase",
            "_testsinglephase",
            "_testimportmultiple",
            "_xxsubinterpreters",
            "_xxinterpchannels",
        }
    )
    restriction, text = SandboxRestriction, str

    def hook(event, args):
        if event in blocked_events or event.startswith(blocked_prefixes):
            raise restriction(f"{event} is disabled in the prime_trl code sandbox")
        if event == "object.__getattr__" and args[1] in blocked_attributes:
            raise restriction(f"frame access ({args[1]}) is disabled in the prime_trl code sandbox")
        if event == "import" and text(args[0]).split(".")[0] in blocked_modules:
            raise restriction(f"importing {args[0]} is disabled in the prime_trl code sandbox")

    return hook


if __name__ == "__main__":
    _run()
