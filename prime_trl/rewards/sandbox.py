"""Run untrusted Python programs in a bubblewrap sandbox with resource limits.

Each run is one `bwrap` process tree (the harness `_runner.py` inside it does the per-run work):

* namespaces: no network (own, empty net namespace), own PID namespace (nothing on the host is visible or
  signalable; when the run ends the namespace's init dies and the kernel kills every process left in it),
  own IPC/UTS namespaces, a new session (no terminal), `--die-with-parent`;
* file system: read-only binds of /usr (and /lib*, /bin) and the interpreter's prefix only; a private,
  size-capped tmpfs at /tmp (the working directory); minimal /dev; no /proc, /etc, /home, /root or project
  files; an empty environment (`--clearenv`);
* identity: as a normal user, a user namespace mapping you to uid 65534. As root (containers, CI), bwrap runs
  without a user namespace, drops every capability except setuid/setgid, and the harness switches to a random
  unprivileged uid before anything else happens - needed because root ignores RLIMIT_NPROC;
* limits (set by the harness, soft = hard): CPU seconds, address space, processes+threads, file size, open
  files, no core dumps; plus a wall-clock deadline here, after which the whole process group is SIGKILLed.

If bwrap is missing or does not work, `Sandbox` refuses with `SandboxUnavailableError` (which says how to
install it) unless you opt out with ``isolation="none"`` or ``PRIME_TRL_ALLOW_UNSANDBOXED=1``: then programs
run as plain subprocesses, still with the rlimits and the deadline, after a loud warning.
"""

from __future__ import annotations

import json
import logging
import math
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = [
    "CaseResult",
    "ProgramResult",
    "Sandbox",
    "SandboxLimits",
    "SandboxUnavailableError",
    "UNSANDBOXED_ENV",
    "bwrap_status",
]

UNSANDBOXED_ENV = "PRIME_TRL_ALLOW_UNSANDBOXED"
_RUNNER_SOURCE = Path(__file__).with_name("_runner.py").read_text()
_INSTALL_HELP = (
    "Install bubblewrap: `sudo apt-get install bubblewrap` (Debian/Ubuntu), `sudo dnf install bubblewrap` "
    "(Fedora/RHEL), `sudo pacman -S bubblewrap` (Arch), or `make sandbox` in the prime-trl repository (as root). "
    "If bwrap is installed but fails, unprivileged user namespaces are probably disabled: enable them "
    "(`sysctl kernel.unprivileged_userns_clone=1`; on Ubuntu 24.04+ also "
    "`sysctl kernel.apparmor_restrict_unprivileged_userns=0`), or in Docker run the container as root or with "
    "`--security-opt seccomp=unconfined`. To run model-written code WITHOUT isolation anyway (only on a "
    f"throw-away machine), pass isolation='none' or set {UNSANDBOXED_ENV}=1."
)


class SandboxUnavailableError(RuntimeError):
    """No working sandbox, and running untrusted code without one was not explicitly allowed."""


@dataclass(frozen=True)
class SandboxLimits:
    """Resource limits for one run (one completion).

    Attributes:
        timeout: wall-clock seconds for a test program, or for each stdin/stdout case; also the CPU-time limit.
        memory_mb: address-space limit per process (RLIMIT_AS).
        max_processes: processes + threads the run may have at once (RLIMIT_NPROC).
        max_file_mb: largest file the program may write (RLIMIT_FSIZE).
        max_open_files: RLIMIT_NOFILE.
        tmp_mb: size of the private /tmp.
        max_output_kb: stdout kept per stdin/stdout case (more counts as a wrong answer).
        max_total_seconds: wall-clock cap for a whole run, however many cases it has.
        startup_seconds: allowance for starting bwrap and the interpreter on a loaded machine.
    """

    timeout: float = 10.0
    memory_mb: int = 1024
    max_processes: int = 16
    max_file_mb: int = 16
    max_open_files: int = 64
    tmp_mb: int = 64
    max_output_kb: int = 1024
    max_total_seconds: float = 120.0
    startup_seconds: float = 5.0


@dataclass
class ProgramResult:
    """Outcome of a solution + test program. `passed` is True only on the harness's nonce-signed verdict."""

    passed: bool
    status: str  # "passed", "failed", "error" (did not compile), "timeout", "crashed" (no verdict)
    detail: str = ""
    stderr: str = ""  # last 4 KB of the program's stderr and stdout, for diagnostics
    stdout: str = ""


@dataclass
class CaseResult:
    """Outcome of one stdin/stdout (or function-call) case; the caller compares `stdout` with the expectation."""

    status: str  # "ok", "error", "timeout", "missing" (the run ended before this case)
    stdout: str = ""
    truncated: bool = False


@dataclass
class _RunOutput:
    messages: list[dict] = field(default_factory=list)
    stdout: bytes = b""
    stderr: bytes = b""
    timed_out: bool = False


class Sandbox:
    """Runs programs in bubblewrap (or, if explicitly allowed, without it). Thread-safe; each call is one run.

    Args:
        limits: resource limits (see `SandboxLimits`).
        isolation: "auto" (bwrap; if it is unavailable, refuse unless PRIME_TRL_ALLOW_UNSANDBOXED=1),
            "bwrap" (bwrap or refuse) or "none" (no isolation: rlimits and deadlines only; warns loudly).
        python: interpreter to run programs with (default: the current interpreter's real executable). It runs
            with -I -S: standard library only, no site-packages.
    """

    def __init__(self, limits: SandboxLimits | None = None, isolation: str = "auto", python: str | None = None):
        if isolation not in ("auto", "bwrap", "none"):
            raise ValueError(f"isolation must be 'auto', 'bwrap' or 'none', got {isolation!r}")
        self.limits = limits or SandboxLimits()
        self.python = os.path.realpath(python or sys.executable)
        self.python_prefix = _interpreter_prefix(self.python)
        self._bwrap: str | None = None
        if isolation in ("auto", "bwrap"):
            ok, reason = bwrap_status(self.python)
            if ok:
                self._bwrap = shutil.which("bwrap")
            elif isolation == "bwrap" or os.environ.get(UNSANDBOXED_ENV, "") not in ("1", "true", "yes"):
                raise SandboxUnavailableError(
                    f"Refusing to run model-generated code: no working sandbox ({reason}). {_INSTALL_HELP}"
                )
        if self._bwrap is None:
            _warn_unsandboxed()

    @property
    def isolated(self) -> bool:
        """True when runs go through bubblewrap."""
        return self._bwrap is not None

    # ------------------------------------------------------------------ public API
    def run_program(self, code: str, tests: str) -> ProgramResult:
        """Run `code`, then the test program `tests` in the same module; passed iff the tests run to the end."""
        limits = self.limits
        job = {"mode": "program", "code": code, "tests": tests}
        out = self._execute(job, limits.timeout + limits.startup_seconds, cpu_seconds=limits.timeout)
        stderr = out.stderr[-4000:].decode("utf-8", "replace")
        stdout = out.stdout[-4000:].decode("utf-8", "replace")
        for message in out.messages:
            event = message.get("event")
            if event == "result":  # the first verdict is final: nothing after it can change it
                passed = message.get("passed") is True
                detail = next((m.get("error", "") for m in out.messages if m.get("event") == "info"), "")
                return ProgramResult(passed, "passed" if passed else "failed", detail, stderr, stdout)
            if event == "error":
                return ProgramResult(False, "error", str(message.get("error", "")), stderr, stdout)
        status = "timeout" if out.timed_out else "crashed"
        return ProgramResult(False, status, "no verdict from the harness (exit, kill or timeout)", stderr, stdout)

    def run_cases(self, code: str, inputs: list[str], fn_name: str | None = None) -> list[CaseResult]:
        """Run `code` once per input: with the input on stdin (`fn_name` None), or calling `fn_name` with the
        input's JSON-encoded argument list. Returns each case's captured stdout (JSON of the result for calls)."""
        limits = self.limits
        job = {"mode": "io" if fn_name is None else "call", "code": code, "cases": list(inputs), "fn_name": fn_name}
        per_case = limits.timeout + 0.5  # + fork and reaping
        budget = min(limits.max_total_seconds, per_case * max(1, len(inputs)))
        # The harness itself only supervises here; each case's child gets its own CPU limit.
        out = self._execute(job, budget + limits.startup_seconds, cpu_seconds=budget)
        results = [CaseResult("missing") for _ in inputs]
        seen: set[int] = set()
        for message in out.messages:
            index = message.get("index")
            if message.get("event") == "case" and isinstance(index, int) and 0 <= index < len(inputs):
                if index not in seen:
                    seen.add(index)
                    results[index] = CaseResult(
                        str(message.get("status")), str(message.get("stdout", "")), bool(message.get("truncated"))
                    )
        return results

    # ------------------------------------------------------------------ one run
    def _execute(self, job: dict, deadline_seconds: float, cpu_seconds: float) -> _RunOutput:
        limits = self.limits
        nonce = os.urandom(16).hex()
        job = dict(job, nonce=nonce)
        job["limits"] = {
            "cpu_seconds": max(1, math.ceil(cpu_seconds)),
            "wall_seconds": limits.timeout,
            "case_seconds": limits.timeout,
            "case_cpu_seconds": max(1, math.ceil(limits.timeout)),
            "memory_bytes": limits.memory_mb << 20,
            "max_processes": limits.max_processes,
            "max_file_bytes": limits.max_file_mb << 20,
            "max_open_files": limits.max_open_files,
            "max_output_bytes": limits.max_output_kb << 10,
        }
        result_r, result_w = os.pipe()
        tmpdir = None
        try:
            interpreter = [self.python, "-I", "-S", "-B", "-X", "utf8", "-c", _RUNNER_SOURCE, str(result_w)]
            if self._bwrap is not None:
                job["pid_namespace"] = True
                if os.geteuid() == 0:  # see module docstring: root ignores RLIMIT_NPROC, so drop to a fresh uid
                    job["uid"] = job["gid"] = random.SystemRandom().randrange(1_000_000_000, 2_000_000_000)
                command = self._bwrap_command() + interpreter
                cwd, env = "/", {"PATH": "/usr/bin:/bin"}
            else:
                tmpdir = tempfile.mkdtemp(prefix="prime-trl-run-")
                os.chmod(tmpdir, 0o700)
                command = interpreter
                cwd, env = tmpdir, {"PATH": "/usr/bin:/bin", "HOME": tmpdir, "TMPDIR": tmpdir, "LANG": "C.UTF-8"}
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=(result_w,),
                cwd=cwd,
                env=env,
                start_new_session=True,  # its own process group, so one killpg ends everything
            )
            os.close(result_w)
            result_w = -1
            try:
                raw = _communicate(proc, json.dumps(job).encode(), result_r, time.monotonic() + deadline_seconds)
            finally:
                _kill_group(proc)
        finally:
            os.close(result_r)
            if result_w >= 0:
                os.close(result_w)
            if tmpdir is not None:
                shutil.rmtree(tmpdir, ignore_errors=True)
        messages = []
        for line in raw["result"].splitlines():
            try:
                message = json.loads(line)
            except ValueError:
                continue
            if isinstance(message, dict) and message.get("nonce") == nonce:  # forged lines lack the nonce
                messages.append(message)
        return _RunOutput(messages, raw["stdout"], raw["stderr"], raw["timed_out"])

    def _bwrap_command(self) -> list[str]:
        limits = self.limits
        command = [
            self._bwrap,
            "--die-with-parent",
            "--new-session",
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--hostname",
            "sandbox",
            "--clearenv",
            "--setenv",
            "PATH",
            "/usr/bin:/bin",
            "--setenv",
            "HOME",
            "/tmp",
            "--setenv",
            "LANG",
            "C.UTF-8",
        ]
        if os.geteuid() == 0:
            command += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            command += ["--unshare-user", "--uid", "65534", "--gid", "65534"]
        command += _filesystem_args(self.python, self.python_prefix)
        command += ["--dev", "/dev", "--perms", "1777", "--size", str(limits.tmp_mb << 20), "--tmpfs", "/tmp"]
        command += ["--chdir", "/tmp"]
        return command


def _communicate(proc: subprocess.Popen, payload: bytes, result_fd: int, deadline: float) -> dict:
    """Feed the job to stdin while draining the result pipe, stdout and stderr (each capped), until all
    close or the deadline passes."""
    caps = {result_fd: 64 << 20, proc.stdout.fileno(): 64 << 10, proc.stderr.fileno(): 64 << 10}
    names = {result_fd: "result", proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
    chunks: dict[int, list[bytes]] = {fd: [] for fd in caps}
    sizes = dict.fromkeys(caps, 0)
    stdin_fd = proc.stdin.fileno()
    os.set_blocking(stdin_fd, False)
    pending, writers, readers = memoryview(payload), [stdin_fd], list(caps)
    timed_out = False
    exited = False
    while readers:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        # Once the top process has exited, drain what is buffered and stop: a stray background process
        # may hold the pipes open (without a PID namespace), but it has nothing left to tell us.
        readable, writable, _ = select.select(readers, writers, [], 0 if exited else min(remaining, 0.25))
        if exited and not readable:
            break
        exited = exited or _has_exited(proc)
        if writable:
            try:
                pending = pending[os.write(stdin_fd, pending[: 1 << 16]) :]
            except (BrokenPipeError, OSError):
                pending = pending[:0]
            if not pending:
                proc.stdin.close()
                writers = []
        for fd in readable:
            data = os.read(fd, 1 << 16)
            if not data:
                readers.remove(fd)
            elif sizes[fd] < caps[fd]:  # past the cap we keep reading (so the writer never blocks) but drop it
                chunks[fd].append(data)
                sizes[fd] += len(data)
    if writers:
        proc.stdin.close()
    out = {names[fd]: b"".join(parts) for fd, parts in chunks.items()}
    out["result"] = out["result"].decode("utf-8", "replace")
    out["timed_out"] = timed_out
    return out


def _has_exited(proc: subprocess.Popen) -> bool:
    """Whether `proc` has exited, without reaping it (its pid, hence its process group id, stays reserved)."""
    try:
        return os.waitid(os.P_PID, proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the run's whole process group, then reap. (The group leader is not reaped before the kill,
    so its group id cannot have been reused.)"""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None and not stream.closed:
            stream.close()


def _interpreter_prefix(python: str) -> str:
    """Installation prefix (holding the standard library) of `python`."""
    if os.path.realpath(sys.executable) == python:
        return os.path.realpath(sys.base_prefix)
    out = subprocess.run(
        [python, "-I", "-S", "-c", "import sys; print(sys.base_prefix)"], capture_output=True, text=True, check=True
    )
    return os.path.realpath(out.stdout.strip())


def _filesystem_args(python: str, prefix: str) -> list[str]:
    """Read-only binds of the system directories and the interpreter; nothing else of the host."""
    args = ["--ro-bind", "/usr", "/usr"]
    for path in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(path):  # merged-/usr systems: /lib -> usr/lib
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    roots = {prefix}
    if not python.startswith(prefix + os.sep):  # e.g. a venv made with --copies: bind the venv (pyvenv.cfg)
        roots.add(os.path.dirname(os.path.dirname(python)))
    for root in sorted(roots):
        if root == "/usr" or root.startswith("/usr/"):
            continue
        # Parents created by bwrap default to mode 0700, unreadable for the sandbox's uid: create them 0755.
        parents = []
        parent = os.path.dirname(root)
        while parent not in ("/", ""):
            parents.append(parent)
            parent = os.path.dirname(parent)
        for directory in reversed(parents):
            args += ["--perms", "0755", "--dir", directory]
        args += ["--ro-bind", root, root]
    return args


_status_cache: dict[str, tuple[bool, str]] = {}
_status_lock = threading.Lock()


def bwrap_status(python: str | None = None) -> tuple[bool, str]:
    """(works, reason): whether bubblewrap is installed and can run a sandboxed `python` here (cached)."""
    python = os.path.realpath(python or sys.executable)
    with _status_lock:
        if python in _status_cache:
            return _status_cache[python]
        if shutil.which("bwrap") is None:
            status = (False, "bwrap (bubblewrap) is not installed")
        else:
            status = _probe(python)
        _status_cache[python] = status
        return status


def _probe(python: str) -> tuple[bool, str]:
    """Run one trivial program through bwrap."""
    sandbox = Sandbox.__new__(Sandbox)  # skips __init__, whose availability check is what we are computing
    sandbox.limits = SandboxLimits(timeout=20.0)
    sandbox.python = python
    sandbox.python_prefix = _interpreter_prefix(python)
    sandbox._bwrap = shutil.which("bwrap")
    try:
        result = sandbox.run_program("x = 1", "assert x == 1")
    except OSError as exc:
        return False, f"bwrap could not be started: {exc}"
    if result.passed:
        return True, "ok"
    return False, f"bwrap is installed but a test run failed ({result.status}): {result.stderr.strip()[-300:]}"


_warned = False


def _warn_unsandboxed() -> None:
    global _warned
    if _warned:
        return
    _warned = True
    message = (
        "\n" + "!" * 100 + "\n"
        "prime_trl: running model-generated code WITHOUT A SANDBOX (isolation='none' or "
        f"{UNSANDBOXED_ENV}=1).\nIt runs as your user with CPU/memory/process/file-size limits and a timeout, "
        "but it CAN read and write your files, use the network and see your environment.\n"
        + ("You are root: the process-count limit does not apply to root.\n" if os.geteuid() == 0 else "")
        + "Install bubblewrap to isolate it. "
        + "!" * 100
    )
    logger.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
