"""Run TRL's GRPOTrainer test file offline, with GRPOTrainer or with PRIMETrainer in its place.

TRL's test file is TRL's code and is not part of this repository: fetch ``tests/test_grpo_trainer.py`` from
huggingface/trl yourself. This script copies it into a temporary package next to our `testing_utils.py`
stand-in and runs pytest with `plugin.py`:

    python tests/trl_compat/build_fixtures.py /tmp/trl_fixtures
    python tests/trl_compat/run_trl_tests.py /path/to/test_grpo_trainer.py --fixtures /tmp/trl_fixtures \\
        --trainer prime -- -k "test_training_peft" --timeout 600

Extra arguments after ``--`` go to pytest. The exit status is pytest's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("test_file", type=Path, help="TRL's tests/test_grpo_trainer.py")
    parser.add_argument("--fixtures", type=Path, required=True, help="directory built by build_fixtures.py")
    parser.add_argument("--trainer", choices=("grpo", "prime"), default="grpo")
    parser.add_argument("--no-accuracy-filter", action="store_true", help="PRIMEConfig(accuracy_filter=False)")
    parser.add_argument("--tests", type=Path, help="file of test ids (Class::test[param]), one a line: run only these")
    parser.add_argument(
        "--max-steps",
        type=int,
        default=0,
        help="quick mode for triage: stop each training run after this many optimizer steps (TRL's tests train 3 "
        "epochs; tests that count steps then fail). 0 (default): the tests as written.",
    )
    args, pytest_args = parser.parse_known_args()
    pytest_args = [a for a in pytest_args if a != "--"]
    if not (args.fixtures / "hf_home" / "hub").is_dir():
        parser.error(f"{args.fixtures} has no hf_home/hub; build it with tests/trl_compat/build_fixtures.py")

    with tempfile.TemporaryDirectory(prefix="trl_compat_") as tmp:
        package = Path(tmp) / "trl_tests"
        package.mkdir()
        (package / "__init__.py").write_text("")
        shutil.copy(args.test_file, package / "test_grpo_trainer.py")
        shutil.copy(HERE / "testing_utils.py", package / "testing_utils.py")
        repo_root = HERE.parent.parent
        env = dict(
            os.environ,
            HF_HOME=str(args.fixtures / "hf_home"),
            HF_HUB_OFFLINE="1",
            HF_DATASETS_OFFLINE="1",
            TRL_FIXTURES=str(args.fixtures),
            TRL_EXPERIMENTAL_SILENCE="1",
            PRIME_SWAP="1" if args.trainer == "prime" else "0",
            PRIME_ACCURACY_FILTER="0" if args.no_accuracy_filter else "1",
            TRL_COMPAT_MAX_STEPS=str(args.max_steps),
            PYTHONPATH=os.pathsep.join([str(repo_root), str(HERE), tmp, os.environ.get("PYTHONPATH", "")]),
        )
        targets = [str(package)]
        if args.tests:
            ids = [line.strip().split("test_grpo_trainer.py::")[-1] for line in args.tests.read_text().splitlines()]
            targets = [f"{package / 'test_grpo_trainer.py'}::{test_id}" for test_id in ids if test_id]
        command = [sys.executable, "-m", "pytest", "-p", "plugin", "--rootdir", tmp, "-o", "addopts=", *targets]
        return subprocess.call(command + pytest_args, cwd=tmp, env=env)


if __name__ == "__main__":
    sys.exit(main())
