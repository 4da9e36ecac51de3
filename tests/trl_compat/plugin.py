"""pytest plugin for running TRL's GRPOTrainer test file offline, with GRPOTrainer or with PRIMETrainer.

- ``TRL_FIXTURES`` (a directory built by `build_fixtures.py`): ``datasets.load_dataset("trl-internal-testing/...")``
  reads its parquet stand-ins; models come from ``HF_HOME=$TRL_FIXTURES/hf_home`` (set by `run_trl_tests.py`).
- ``PRIME_SWAP=1``: every test module's ``GRPOTrainer`` / ``GRPOConfig`` are replaced by ``PRIMETrainer`` /
  ``PRIMEConfig`` (same keyword arguments; ``prm`` at its default), which is what a user switching does.
- ``PRIME_ACCURACY_FILTER=0``: PRIMEConfig's ``accuracy_filter`` defaults to False (to see failures other than
  the outcome-label rule for non-binary rewards).
"""

import os
from pathlib import Path

import datasets

_original_load_dataset = datasets.load_dataset
FIXTURES = Path(os.environ.get("TRL_FIXTURES", "/tmp/trl_fixtures"))


def load_dataset(path, name=None, split=None, **kwargs):
    """``datasets.load_dataset`` with ``trl-internal-testing/<name>`` served from the local parquet stand-ins."""
    if not str(path).startswith("trl-internal-testing/"):
        return _original_load_dataset(path, name, split=split, **kwargs)
    root = FIXTURES / "datasets" / str(path).split("/", 1)[1] / (name or "default")
    if not root.is_dir():
        raise FileNotFoundError(f"No offline stand-in for {path}/{name} in {root} (see build_fixtures.py).")
    files = {p.stem: str(p) for p in sorted(root.glob("*.parquet"))}
    return _original_load_dataset("parquet", data_files=files, split=split)


datasets.load_dataset = load_dataset  # before the test module runs `from datasets import load_dataset`


def _bf16_only_where_supported() -> None:
    """TRL's configs default to bf16=True, which transformers refuses on a machine without a bf16 GPU; on such a
    machine (this CPU stand-in) default to bf16=False instead, for GRPOConfig and PRIMEConfig alike."""
    from transformers.utils import is_torch_bf16_gpu_available
    from trl.trainer.base_config import _BaseConfig

    if is_torch_bf16_gpu_available():
        return
    original = _BaseConfig.__post_init__

    def __post_init__(self):
        if self.bf16 is None:
            self.bf16 = False
        original(self)

    _BaseConfig.__post_init__ = __post_init__


_bf16_only_where_supported()


def _prime_classes():
    from prime_trl import PRIMEConfig, PRIMETrainer

    if os.environ.get("PRIME_ACCURACY_FILTER", "1") == "0":

        class NoFilterConfig(PRIMEConfig):
            def __init__(self, *args, accuracy_filter=False, **kwargs):
                super().__init__(*args, accuracy_filter=accuracy_filter, **kwargs)

        return PRIMETrainer, NoFilterConfig
    return PRIMETrainer, PRIMEConfig


def pytest_runtest_setup(item):
    module = getattr(item, "module", None)
    if os.environ.get("PRIME_SWAP") == "1" and module is not None and hasattr(module, "GRPOTrainer"):
        module.GRPOTrainer, module.GRPOConfig = _prime_classes()


def pytest_report_header(config):
    mode = "PRIMETrainer/PRIMEConfig in place of GRPOTrainer/GRPOConfig" if os.environ.get("PRIME_SWAP") == "1" else ""
    return f"trl_compat: fixtures {FIXTURES} {mode}"
