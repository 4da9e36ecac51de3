"""Run every benchmark, then the report (what ``make bench`` runs).

    python benchmarks/run_all.py            # everything (the learning benchmark alone takes ~1-1.5 h on 2 cores)
    python benchmarks/run_all.py --skip learning grading

In order: ``grading_throughput.py``, ``overhead.py --size demo --rounds 3``, ``overhead.py --size large --rounds 3
--qlora``, ``prefix_cost.py`` (demo and SmolLM2 at PRIME-prompt lengths, and the SmolLM2 step-time split with
256-token completions), ``learning.py`` (resumable: finished runs are kept in ``benchmarks/results/learning_runs/``), and
``report.py`` (``BENCHMARKS.md``, ``benchmarks/results.json``). A benchmark that fails is reported and the
others still run; the report uses whatever results exist. The exit code is 1 if anything failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

BENCHMARKS = Path(__file__).resolve().parent

STEPS: dict[str, list[str]] = {
    "grading": ["grading_throughput.py", "--repeats", "3"],
    "overhead-demo": ["overhead.py", "--size", "demo", "--rounds", "3"],
    "overhead-large": ["overhead.py", "--size", "large", "--rounds", "3", "--qlora"],
    "prefix-demo": ["prefix_cost.py", "--model", "demo", "--prompt", "long", "--k", "4", "--rounds", "1"],
    "prefix-smollm2": ["prefix_cost.py", "--model", "smollm2", "--prompt", "long", "--k", "4", "--rounds", "1"],
    "split-smollm2": [
        "prefix_cost.py",
        "--model",
        "smollm2",
        "--prompt",
        "long",
        "--k",
        "4",
        "--completion",
        "256",
        "--variants",
        "grpo",
        "prime",
        "prime_shared",
        "prime_qlora",
        "--rounds",
        "1",
        "--steps",
        "1",
        "--warmup",
        "0",
        "--name",
        "split_smollm2_long_k4_c256",
    ],
    "learning": ["learning.py"],
    "report": ["report.py"],
}
GROUPS = {
    "grading": ["grading"],
    "overhead": ["overhead-demo", "overhead-large"],
    "prefix": ["prefix-demo", "prefix-smollm2", "split-smollm2"],
    "learning": ["learning"],
}

logger = logging.getLogger("run_all")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=sorted(set(STEPS) | set(GROUPS)), help="benchmarks to leave out"
    )
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    skipped = {name for key in options.skip for name in GROUPS.get(key, [key])}
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HUB_DISABLE_TELEMETRY="1")
    failed = []
    for name, command in STEPS.items():
        if name in skipped:
            logger.info("skipping %s", name)
            continue
        logger.info("running %s: python benchmarks/%s", name, " ".join(command))
        start = time.perf_counter()
        # Each benchmark in its own process, one after the other: they time things, so they must not overlap.
        code = subprocess.run([sys.executable, str(BENCHMARKS / command[0]), *command[1:]], env=env).returncode
        logger.info("%s finished in %.1f min (exit code %d)", name, (time.perf_counter() - start) / 60, code)
        if code != 0:
            failed.append(name)
    if failed:
        logger.error("failed: %s", ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
