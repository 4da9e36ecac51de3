"""Privilege drop and resource limits shared by the two harnesses that run *inside* the sandbox (`_runner.py`,
`_candidate.py`). prime_trl never imports this file: `sandbox.py` prepends its text to theirs, since they run as
``python -c`` on the bare standard library."""


def apply_job_limits(job: dict) -> None:
    """Become the job's throw-away uid (when bwrap ran as root, so that RLIMIT_NPROC binds) and set the job's
    rlimits with soft = hard, so the program cannot raise them again. Called before any untrusted code exists."""
    import os
    import resource

    if job.get("uid") is not None:
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
