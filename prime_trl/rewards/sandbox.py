"""Run untrusted Python programs in a bubblewrap sandbox with resource limits; judge them outside it.

Two kinds of run:

* a **test program** (`Sandbox.run_program`): the candidate's code runs in the sandbox (`_candidate.py`), the
  tests run in a separate judge process outside it (`_judge.py`), which calls the candidate's functions through
  two pipes that carry plain data only (`_wire.py`) and writes the verdict to a third pipe the candidate never
  holds. Nothing the candidate's code does inside its process can write, or reach, the verdict;
* **stdin/stdout or function-call cases** (`Sandbox.run_cases`): a supervisor in the sandbox (`_runner.py`)
  forks one child per case and reports each child's output; `code.py` compares it with the expected output here.

The sandbox is one `bwrap` process tree per run:

* namespaces: no network (own, empty net namespace), own PID namespace (nothing on the host is visible or
  signalable, the judge included; when the run ends the namespace's init dies and the kernel kills every
  process left in it), own IPC/UTS namespaces, a new session (no terminal), `--die-with-parent`;
* file system: read-only binds of /usr (and /lib*, /bin) and the interpreter's prefix, with every
  site-packages / dist-packages directory hidden under an empty read-only tmpfs (standard library only); a
  private, size-capped tmpfs at /tmp (the working directory); minimal /dev; no /proc, /etc, /home, /root or
  project files; an empty environment (`--clearenv`);
* identity: as a normal user, a user namespace mapping you to uid 65534. As root (containers, CI), bwrap runs
  without a user namespace, drops every capability except setuid/setgid, and the harness switches to a random
  unprivileged uid before anything else happens - needed because root ignores RLIMIT_NPROC;
* limits (set by the harness, soft = hard): CPU seconds, address space, processes+threads, file size, open
  files, no core dumps; a memory cgroup for the whole run when the host allows one (`_cgroup.py`: counts
  memory-backed files and tmpfs pages too); plus a wall-clock deadline here, after which everything is killed.

Everything read from a run is capped (`_pump`) and parsed with bounded depth (`_wire`).

If bwrap is missing or does not work, `Sandbox` refuses with `SandboxUnavailableError` (which says how to
install it) unless you opt out with ``isolation="none"`` or ``PRIME_TRL_ALLOW_UNSANDBOXED=1``: then programs
run as plain subprocesses, still with the rlimits and the deadline, after a loud warning.
"""

from __future__ import annotations

import ast
import functools
import glob
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
from dataclasses import dataclass
from pathlib import Path

from prime_trl.rewards import _cgroup, _wire

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
_HERE = Path(__file__).parent
_WIRE_SOURCE = (_HERE / "_wire.py").read_text()
_LIMITS_SOURCE = (_HERE / "_limits.py").read_text()
# The harnesses run as `python -c <text>` on the bare standard library: the wire format and the in-sandbox limits
# are prepended to them.
_RUNNER_SOURCE = _LIMITS_SOURCE + "\n" + (_HERE / "_runner.py").read_text()
# The candidate harness's functions look builtins up in a private copy, made before the program can patch them.
_CANDIDATE_SOURCE = (
    "__builtins__ = dict(__import__('builtins').__dict__)\n"
    + _WIRE_SOURCE
    + "\n"
    + _LIMITS_SOURCE
    + "\n"
    + (_HERE / "_candidate.py").read_text()
)
_JUDGE_SOURCE = _WIRE_SOURCE + "\n" + (_HERE / "_judge.py").read_text()
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
        memory_mb: address-space limit per process (RLIMIT_AS); with a memory cgroup, the whole run (all its
            processes, memory-backed files and /tmp) is also limited to ``memory_mb + tmp_mb``.
        max_processes: processes + threads the run may have at once (RLIMIT_NPROC).
        max_file_mb: largest file the program may write (RLIMIT_FSIZE).
        max_open_files: RLIMIT_NOFILE.
        tmp_mb: size of the private /tmp.
        max_output_kb: stdout kept per stdin/stdout case (more counts as a wrong answer), and the largest
            message the candidate may send the judge (a larger one fails the row).
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
    """Outcome of a solution + test program. `passed` is True only on the judge's verdict (the judge runs outside
    the sandbox; the candidate has no way to write to its verdict pipe)."""

    passed: bool
    status: str  # "passed", "failed", "error" (did not compile), "timeout", "crashed" (the candidate died)
    detail: str = ""  # the judge's reason, e.g. "AssertionError at tests line 3"
    stderr: str = ""  # last 4 KB of the program's stderr and stdout, for diagnostics
    stdout: str = ""


@dataclass
class CaseResult:
    """Outcome of one stdin/stdout (or function-call) case; the caller compares `stdout` with the expectation."""

    status: str  # "ok", "error", "timeout", "missing" (the run ended before this case)
    stdout: str = ""
    truncated: bool = False


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
        self._cgroups = _cgroup.detect()

    @property
    def isolated(self) -> bool:
        """True when runs go through bubblewrap."""
        return self._bwrap is not None

    @property
    def memory_cgroup(self) -> str | None:
        """ "v2" or "v1" when each run gets its own memory cgroup (see `_cgroup`), else None (rlimits only)."""
        return self._cgroups[0] if self._cgroups else None

    # ------------------------------------------------------------------ public API
    def run_program(
        self, code: str, tests: str, prelude: str | None = None, entry_point: str | None = None
    ) -> ProgramResult:
        """Run the test program `tests` against the program `code`; passed iff the tests run to their end.

        `code` runs in the sandbox (the candidate process); `tests` run in a separate judge process that calls
        the candidate's functions through a plain-data channel (see `_judge.py`). `prelude` is trusted code
        from the prompt (HumanEval: imports, helpers) that the judge runs before the tests, so the tests use the
        prompt's helpers, never the candidate's; `entry_point` is the function under test, taken from `code`.
        """
        limits = self.limits
        request_r, request_w = os.pipe()
        reply_r, reply_w = os.pipe()
        verdict_r, verdict_w = os.pipe()
        candidate_job = {"code": code, "limits": self._limits_payload(limits.timeout + limits.startup_seconds)}
        judge_job = {
            "tests": tests,
            "prelude": prelude or "",
            "stubs": sorted(_stub_functions(prelude)) if prelude else [],
            "entry_point": entry_point or "",
            "timeout": limits.timeout,
            "startup_seconds": limits.startup_seconds,
            "max_message_bytes": limits.max_output_kb << 10,
            "memory_bytes": max(limits.memory_mb, 512) << 20,
        }
        judge = candidate = None
        try:
            judge = self._spawn_judge(judge_job, (request_w, reply_r, verdict_w))
            candidate = self._spawn_sandboxed(
                _CANDIDATE_SOURCE, candidate_job, (request_r, reply_w), [str(request_r), str(reply_w)]
            )
            for fd in (request_r, request_w, reply_r, reply_w, verdict_w):
                os.close(fd)
            request_r = request_w = reply_r = reply_w = verdict_w = -1
            deadline = time.monotonic() + limits.timeout + 2 * limits.startup_seconds + 1
            raw = _pump(
                {judge.stdin: json.dumps(judge_job).encode(), candidate.process.stdin: candidate.payload},
                {
                    verdict_r: ("verdict", 64 << 10),
                    judge.stderr.fileno(): ("judge_stderr", 16 << 10),
                    candidate.process.stdout.fileno(): ("stdout", 64 << 10),
                    candidate.process.stderr.fileno(): ("stderr", 64 << 10),
                },
                primary=verdict_r,
                deadline=deadline,
            )
        finally:
            for fd in (request_r, request_w, reply_r, reply_w, verdict_w, verdict_r):
                if fd >= 0:
                    os.close(fd)
            if judge is not None:
                _kill_group(judge)
            if candidate is not None:
                candidate.close()
        stderr = raw["stderr"][-4000:].decode("utf-8", "replace")
        stdout = raw["stdout"][-4000:].decode("utf-8", "replace")
        try:
            message = _wire.loads(raw["verdict"].split(b"\n", 1)[0])
        except _wire.WireError:
            message = None
        if not isinstance(message, dict) or not isinstance(message.get("status"), str):
            status = "timeout" if raw["timed_out"] else "crashed"
            judge_error = raw["judge_stderr"][-300:].decode("utf-8", "replace").strip()
            detail = "no verdict from the judge" + (f": {judge_error}" if judge_error else " (timeout or kill)")
            return ProgramResult(False, status, detail, stderr, stdout)
        passed = message.get("passed") is True and message["status"] == "passed"
        return ProgramResult(passed, message["status"], str(message.get("detail", ""))[:500], stderr, stdout)

    def run_cases(self, code: str, inputs: list[str], fn_name: str | None = None) -> list[CaseResult]:
        """Run `code` once per input: with the input on stdin (`fn_name` None), or calling `fn_name` with the
        input's JSON-encoded argument list. Returns each case's captured stdout (JSON of the result for calls);
        the caller compares it with the expected output, which never enters the sandbox."""
        limits = self.limits
        per_case = limits.timeout + 0.5  # + fork and reaping
        budget = min(limits.max_total_seconds, per_case * max(1, len(inputs)))
        nonce = os.urandom(16).hex()
        # The supervisor itself only forks and waits; each case's child gets its own CPU limit.
        job = {
            "mode": "io" if fn_name is None else "call",
            "code": code,
            "cases": list(inputs),
            "fn_name": fn_name,
            "nonce": nonce,
            "limits": self._limits_payload(budget),
        }
        result_r, result_w = os.pipe()
        run = None
        try:
            run = self._spawn_sandboxed(_RUNNER_SOURCE, job, (result_w,), [str(result_w)])
            os.close(result_w)
            result_w = -1
            cap = min(256 << 20, (len(inputs) + 1) * ((limits.max_output_kb << 10) * 2 + 1024))
            raw = _pump(
                {run.process.stdin: run.payload},
                {
                    result_r: ("result", cap),
                    run.process.stdout.fileno(): ("stdout", 16 << 10),
                    run.process.stderr.fileno(): ("stderr", 16 << 10),
                },
                primary=result_r,
                deadline=time.monotonic() + budget + limits.startup_seconds,
            )
        finally:
            os.close(result_r)
            if result_w >= 0:
                os.close(result_w)
            if run is not None:
                run.close()
        results = [CaseResult("missing") for _ in inputs]
        seen: set[int] = set()
        # Lines come from the supervisor (the programs never hold this pipe); still, at most one line per case.
        for line in raw["result"].split(b"\n")[: len(inputs) + 1]:
            try:
                message = _wire.loads(line)
            except _wire.WireError:
                continue
            if not isinstance(message, dict) or message.get("nonce") != nonce or message.get("event") != "case":
                continue
            index = message.get("index")
            if isinstance(index, int) and 0 <= index < len(inputs) and index not in seen:
                seen.add(index)
                results[index] = CaseResult(
                    str(message.get("status")), str(message.get("stdout", "")), bool(message.get("truncated"))
                )
        return results

    # ------------------------------------------------------------------ processes
    def _limits_payload(self, cpu_seconds: float) -> dict:
        limits = self.limits
        return {
            "cpu_seconds": max(1, math.ceil(cpu_seconds)),
            "wall_seconds": limits.timeout,
            "case_seconds": limits.timeout,
            "case_cpu_seconds": max(1, math.ceil(limits.timeout)),
            "memory_bytes": limits.memory_mb << 20,
            "max_processes": limits.max_processes,
            "max_file_bytes": limits.max_file_mb << 20,
            "max_open_files": limits.max_open_files,
            "max_output_bytes": limits.max_output_kb << 10,
            "max_message_bytes": limits.max_output_kb << 10,
        }

    def _spawn_sandboxed(self, source: str, job: dict, fds: tuple[int, ...], argv: list[str]) -> _Run:
        """Start `source` on the sandbox's interpreter (in bwrap unless opted out), in its own memory cgroup when
        the host allows one. The caller feeds `_Run.payload` (the job) to its stdin."""
        interpreter = [self.python, "-I", "-S", "-B", "-X", "utf8", "-c", source, *argv]
        cgroup = tmpdir = None
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
        if self._cgroups is not None:
            kind, parent = self._cgroups
            limit = (self.limits.memory_mb + self.limits.tmp_mb) << 20
            cgroup = _cgroup.RunCgroup(kind, parent, limit, self.limits.max_processes)
            # The shell joins the group, then becomes bwrap: nothing of the run starts outside the group.
            command = ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', cgroup.procs, *command]
        run = _Run(None, json.dumps(job).encode(), cgroup, tmpdir)
        try:
            process = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                pass_fds=fds,
                cwd=cwd,
                env=env,
                start_new_session=True,  # its own process group, so one killpg ends everything
            )
        except BaseException:
            run.close()
            raise
        run.process = process
        return run

    def _spawn_judge(self, job: dict, fds: tuple[int, int, int]) -> subprocess.Popen:
        """The trusted judge: the host's interpreter with the standard library only, outside the sandbox (it
        runs the data set's tests, never the candidate's code), as the trainer's user, in an empty environment,
        with its own rlimits and wall-clock alarm (see `_judge.py`)."""
        return subprocess.Popen(
            [self.python, "-I", "-S", "-B", "-X", "utf8", "-c", _JUDGE_SOURCE, *map(str, fds)],
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            pass_fds=fds,
            cwd="/",
            env={"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8"},
            start_new_session=True,
        )

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


@dataclass
class _Run:
    """A started sandboxed process with what must be cleaned up after it."""

    process: subprocess.Popen | None
    payload: bytes  # the job, for its stdin
    cgroup: _cgroup.RunCgroup | None = None
    tmpdir: str | None = None

    def close(self) -> None:
        if self.process is not None:
            _kill_group(self.process)
        if self.cgroup is not None:
            self.cgroup.close()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)


# Bytes drained from one pipe before we stop reading it (the writer then blocks until the run is killed): the
# first `cap` bytes are kept; past the drain limit, a flooding program costs the trainer nothing more.
_DRAIN_LIMIT = 16 << 20


def _pump(writes: dict, reads: dict[int, tuple[str, int]], primary: int, deadline: float) -> dict:
    """Feed each stdin its payload while draining the read fds (each kept up to its cap, read up to
    `_DRAIN_LIMIT`), until `primary` reaches end of file or the deadline passes. The other fds are then drained
    of what is already buffered, without waiting: a stray process holding them has nothing left to tell us."""
    pending = {stream.fileno(): (stream, memoryview(payload)) for stream, payload in writes.items()}
    for fd in pending:
        os.set_blocking(fd, False)
    chunks: dict[int, list[bytes]] = {fd: [] for fd in reads}
    sizes = dict.fromkeys(reads, 0)
    readers = list(reads)
    timed_out = finished = False
    while readers:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            timed_out = True
            break
        readable, writable, _ = select.select(readers, list(pending), [], 0 if finished else min(remaining, 0.5))
        if finished and not readable:
            break
        for fd in writable:
            stream, data = pending[fd]
            try:
                data = data[os.write(fd, data[: 1 << 16]) :]
            except OSError:  # the reader has gone: it does not want the rest
                data = data[:0]
            pending[fd] = (stream, data)
            if not data:
                stream.close()
                del pending[fd]
        for fd in readable:
            data = os.read(fd, 1 << 16)
            if not data:
                readers.remove(fd)
                finished = finished or fd == primary
                continue
            if sizes[fd] < reads[fd][1]:
                chunks[fd].append(data[: reads[fd][1] - sizes[fd]])
            sizes[fd] += len(data)
            if sizes[fd] >= _DRAIN_LIMIT:
                readers.remove(fd)
    for stream, _ in pending.values():
        stream.close()
    out = {reads[fd][0]: b"".join(parts) for fd, parts in chunks.items()}
    out["timed_out"] = timed_out
    return out


@functools.lru_cache(maxsize=1024)  # the same prompt comes back for every sample of a problem
def _stub_functions(source: str) -> frozenset[str]:
    """Names of the module-level functions in trusted prompt code whose body is only a docstring, ``pass`` or
    ``...``: the stubs the completion is asked to fill in, which the judge takes from the candidate."""

    def empty(statement: ast.stmt) -> bool:
        return isinstance(statement, ast.Pass) or (
            isinstance(statement, ast.Expr) and isinstance(statement.value, ast.Constant)
        )

    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return frozenset()  # the judge reports the prompt code's error itself
    return frozenset(
        node.name
        for node in tree.body
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and all(map(empty, node.body))
    )


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
    # Standard library only: hide every package directory under what is bound (empty, read-only tmpfs over it),
    # also those off sys.path, which a program could otherwise add back.
    for root in sorted(roots | {"/usr", "/usr/local"}):
        for pattern in ("lib*/python3*/site-packages", "lib*/python3*/dist-packages", "lib*/python3/dist-packages"):
            for directory in sorted(glob.glob(os.path.join(root, pattern))):
                if os.path.isdir(directory) and not os.path.islink(directory):
                    args += ["--tmpfs", directory, "--remount-ro", directory]
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
    sandbox._cgroups = None
    try:
        result = sandbox.run_program("x = 1", "assert x == 1")
    except OSError as exc:
        return False, f"bwrap could not be started: {exc}"
    if result.passed:
        return True, "ok"
    return False, (
        f"bwrap is installed but a test run failed ({result.status}: {result.detail}): {result.stderr.strip()[-300:]}"
    )


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
