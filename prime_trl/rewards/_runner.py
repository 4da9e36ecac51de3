"""Supervisor for stdin/stdout and function-call cases; runs *inside* the code sandbox.

prime_trl never imports this file: `sandbox.py` passes its text to `python -I -S -X utf8 -c`, so it runs on
the bare standard library of the sandbox's interpreter. (Test programs use `_candidate.py` and `_judge.py`.)

* stdin: one JSON job (program, cases, limits, a random per-run nonce). It is read to EOF with `os.read` and
  fd 0 is then pointed at /dev/null.
* argv[1]: a pipe fd the host reads: one JSON line per case, with the nonce.

Per case, a forked child runs the program with the case on stdin (or calls ``fn_name`` with the case's JSON
arguments and prints the JSON result); this process, which never runs untrusted code itself, reports the
child's captured stdout. The child closes every inherited fd above 2 (the result pipe above all) before the
program starts, and this process is non-dumpable, so the child cannot write the report or read this process's
memory. The host compares the output with the expected one, so expected outputs never enter the sandbox.
"""

# ruff: noqa: F821 - apply_job_limits comes from _limits.py, whose text sandbox.py prepends to this file

import os
import sys


def _run() -> None:
    import json

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
        return (json.dumps({**message, "nonce": nonce}) + "\n").encode()

    def write_all(data: bytes) -> None:
        while data:
            data = data[write(result_fd, data) :]

    apply_job_limits(job)  # _limits.py: throw-away uid, rlimits with soft = hard
    _set_not_dumpable()  # other processes of this uid cannot ptrace us or read our memory

    try:
        solution = compile(job["code"], "<solution>", "exec", dont_inherit=True, optimize=0)
    except (SyntaxError, ValueError, MemoryError, RecursionError) as exc:
        write_all(line({"event": "error", "error": f"{type(exc).__name__}: {exc}"}))
        exit_now(0)
    _run_cases(solution, job, line, write_all, exit_now, devnull)


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
        del sys.modules[name]  # the children start from a clean module table


if __name__ == "__main__":
    _run()
