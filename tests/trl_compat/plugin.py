"""pytest plugin for running TRL's GRPOTrainer test file offline, with GRPOTrainer or with PRIMETrainer.

- ``TRL_FIXTURES`` (a directory built by `build_fixtures.py`): ``datasets.load_dataset("trl-internal-testing/...")``
  reads its parquet stand-ins; models come from ``HF_HOME=$TRL_FIXTURES/hf_home`` (set by `run_trl_tests.py`).
- ``PRIME_SWAP=1``: every test module's ``GRPOTrainer`` / ``GRPOConfig`` are replaced by ``PRIMETrainer`` /
  ``PRIMEConfig`` (same keyword arguments; ``prm`` at its default), which is what a user switching does.
- ``PRIME_ACCURACY_FILTER=0``: PRIMEConfig's ``accuracy_filter`` defaults to False (to see failures other than
  the outcome-label rule for non-binary rewards).
- ``TRL_COMPAT_MAX_STEPS=N`` (quick mode, for triage on a slow machine): a config that sets no ``max_steps`` stops
  after N optimizer steps instead of TRL's 3 epochs, for both trainers. Tests that count steps
  (``test_prepare_input_called_with_correct_data``) fail in this mode; the reference run leaves it unset.
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


def _config_defaults_for_this_machine() -> None:
    """For GRPOConfig and PRIMEConfig alike: TRL's configs default to bf16=True, which transformers refuses on a
    machine without a bf16 GPU, so on such a machine (this CPU stand-in) bf16 defaults to False; and in quick mode
    (``TRL_COMPAT_MAX_STEPS``) a run without its own ``max_steps`` stops after that many steps."""
    from transformers.utils import is_torch_bf16_gpu_available
    from trl.trainer.base_config import _BaseConfig

    bf16_default = None if is_torch_bf16_gpu_available() else False
    max_steps = int(os.environ.get("TRL_COMPAT_MAX_STEPS") or 0)
    original = _BaseConfig.__post_init__

    def __post_init__(self):
        if self.bf16 is None and bf16_default is not None:
            self.bf16 = bf16_default
        if max_steps > 0 and self.max_steps <= 0:
            self.max_steps = max_steps
        original(self)

    _BaseConfig.__post_init__ = __post_init__


_config_defaults_for_this_machine()


def _helpers_newer_than_installed_trl() -> None:
    """TRL main's test file imports helpers that the installed TRL release may not have yet; one missing name would
    fail the whole file at collection. Give each a stand-in with TRL's behaviour, used only by tests that are skipped
    on a CPU machine (4-bit loading needs bitsandbytes and an accelerator)."""
    import trl.trainer.utils

    if not hasattr(trl.trainer.utils, "get_kbit_device_map"):

        def get_kbit_device_map() -> dict[str, int | str] | None:
            """Device map for k-bit loading: the current accelerator device, or None without one."""
            import torch

            return {"": torch.cuda.current_device()} if torch.cuda.is_available() else None

        trl.trainer.utils.get_kbit_device_map = get_kbit_device_map


_helpers_newer_than_installed_trl()


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
