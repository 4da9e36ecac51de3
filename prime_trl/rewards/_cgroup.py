"""A memory cgroup per sandbox run, when the host lets prime_trl create one.

The kernel charges a cgroup for every page its processes use, including pages of memory-backed files (memfd,
shared memory) and of tmpfs files they write, so one limit bounds the whole run, however many processes and
files it makes. RLIMIT_AS alone bounds each process's address space but not those pages.

Where run groups are created, first that works:

1. ``$PRIME_TRL_CGROUP``: a cgroup v2 or v1 directory you delegate to prime_trl (v2: with ``memory`` in its
   ``cgroup.subtree_control``);
2. cgroup v2: the cgroup this process runs in, if ``memory`` is enabled in its ``cgroup.subtree_control``;
3. cgroup v1 (hybrid hosts): this process's cgroup in the ``memory`` hierarchy, if it can create children.

Otherwise runs have no cgroup and only the per-process rlimits and the tmpfs size apply (see docs/verifiers.md).
A run's processes join its group before bubblewrap starts (a shell writes its own pid, then execs bwrap), so
nothing the program does escapes it. Groups are removed after the run; ones still busy are retried later.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from pathlib import Path

logger = logging.getLogger(__name__)

CGROUP_ENV = "PRIME_TRL_CGROUP"
_lock = threading.Lock()
_counter = 0
_pending: list[Path] = []  # groups whose processes had not all exited yet
_detected: dict[str, tuple[str, Path] | None] = {}


def _write(path: Path, value: str) -> None:
    with open(path, "w") as handle:
        handle.write(value)


def _own_cgroups() -> dict[str, str]:
    """{"v2": path} and/or {"memory": path} from /proc/self/cgroup."""
    found = {}
    for line in Path("/proc/self/cgroup").read_text().splitlines():
        number, controllers, path = line.split(":", 2)
        if number == "0" and controllers == "":
            found["v2"] = path
        elif "memory" in controllers.split(","):
            found["memory"] = path
    return found


def _mounts() -> dict[str, str]:
    """Mount points of the cgroup2 hierarchy ("v2") and of the v1 memory hierarchy ("memory")."""
    found = {}
    for line in Path("/proc/self/mountinfo").read_text().splitlines():
        left, _, right = line.partition(" - ")
        fields, tail = left.split(), right.split()
        if len(fields) < 5 or len(tail) < 3:
            continue
        if tail[0] == "cgroup2":
            found.setdefault("v2", fields[4])
        elif tail[0] == "cgroup" and "memory" in tail[2].split(","):
            found.setdefault("memory", fields[4])
    return found


def _kind_of(directory: Path) -> str | None:
    if (directory / "cgroup.subtree_control").exists():
        controls = (directory / "cgroup.subtree_control").read_text().split()
        return "v2" if "memory" in controls else None
    if (directory / "memory.limit_in_bytes").exists():
        return "v1"
    return None


def _candidates() -> list[Path]:
    configured = os.environ.get(CGROUP_ENV)
    if configured:
        return [Path(configured)]
    try:
        own, mounts = _own_cgroups(), _mounts()
    except (OSError, ValueError):
        return []
    found = []
    for key in ("v2", "memory"):
        if key in own and key in mounts:
            found.append(Path(mounts[key]) / own[key].lstrip("/"))
    return found


def detect() -> tuple[str, Path] | None:
    """("v2" or "v1", directory to create run groups in), or None; probed once (a test group is made and removed)."""
    key = os.environ.get(CGROUP_ENV, "")
    with _lock:
        if key in _detected:
            return _detected[key]
        result = None
        for directory in _candidates():
            kind = _kind_of(directory) if directory.is_dir() else None
            if kind is None:
                continue
            probe = directory / f"prime-trl-probe-{os.getpid()}"
            try:
                probe.mkdir()
                try:
                    _write(probe / ("memory.max" if kind == "v2" else "memory.limit_in_bytes"), str(64 << 20))
                finally:
                    probe.rmdir()
            except OSError as exc:
                logger.debug("no memory cgroup under %s: %s", directory, exc)
                continue
            result = (kind, directory)
            break
        if result is None:
            logger.info(
                "code sandbox: no writable memory cgroup here; each run is bounded by per-process rlimits and the "
                "tmpfs size only (set %s to a delegated cgroup for a hard per-run memory limit)",
                CGROUP_ENV,
            )
        else:
            logger.info("code sandbox: each run gets a cgroup %s memory limit under %s", *result)
        _detected[key] = result
        return result


class RunCgroup:
    """One run's memory cgroup. `procs` is the file a process writes its pid to, to join."""

    def __init__(self, kind: str, parent: Path, limit_bytes: int, max_processes: int):
        global _counter
        with _lock:
            _counter += 1
            name = f"prime-trl-{os.getpid()}-{_counter}"
            retry, _pending[:] = list(_pending), []
        for stale in retry:
            _remove(stale, attempts=1)
        self.kind, self.path = kind, parent / name
        self.path.mkdir()
        try:
            if kind == "v2":
                _write(self.path / "memory.max", str(limit_bytes))
                for optional, value in (("memory.swap.max", "0"), ("pids.max", str(max_processes + 8))):
                    if (self.path / optional).exists():
                        _write(self.path / optional, value)
            else:
                _write(self.path / "memory.limit_in_bytes", str(limit_bytes))
                if (self.path / "memory.memsw.limit_in_bytes").exists():  # no escape into swap
                    _write(self.path / "memory.memsw.limit_in_bytes", str(limit_bytes))
        except OSError:
            self.path.rmdir()
            raise
        self.procs = str(self.path / "cgroup.procs")

    def peak_bytes(self) -> int | None:
        """Most memory the run's processes (and their files) held at once, where the kernel reports it."""
        for name in ("memory.peak", "memory.max_usage_in_bytes"):
            try:
                return int((self.path / name).read_text().split()[0])
            except (OSError, ValueError, IndexError):
                continue
        return None

    def close(self) -> None:
        """Kill whatever is left in the group and remove it (later, if its processes are still exiting)."""
        if self.kind == "v2" and (self.path / "cgroup.kill").exists():
            try:
                _write(self.path / "cgroup.kill", "1")
            except OSError:
                pass
        else:
            try:
                for pid in (self.path / "cgroup.procs").read_text().split():
                    try:
                        os.kill(int(pid), 9)
                    except (OSError, ValueError):
                        pass
            except OSError:
                pass
        _remove(self.path)


def _remove(path: Path, attempts: int = 10) -> None:
    """rmdir, retried for up to ~50 ms while the killed processes finish exiting; else left for later."""
    for attempt in range(attempts):
        try:
            path.rmdir()
            return
        except FileNotFoundError:
            return
        except OSError:
            if attempt + 1 < attempts:
                time.sleep(0.005)
    with _lock:
        _pending.append(path)


@atexit.register
def _remove_pending() -> None:
    for path in list(_pending):
        _remove(path)
