"""Shared test set-up: offline, one thread, quiet logs, and a tiny local model built once per session."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

import transformers  # noqa: E402

transformers.logging.set_verbosity_error()

from prime_trl.data import default_data_dir  # noqa: E402

SHARED_DATA = default_data_dir()


def pytest_report_header(config):
    found = SHARED_DATA if SHARED_DATA is not None and SHARED_DATA.is_dir() else "NOT FOUND (data tests skip)"
    return f"prime-trl shared data sets: {found}"


@pytest.fixture(scope="session")
def shared_data_dir() -> Path:
    """Directory with the real data sets (GSM8K, MATH, ...); tests that need it skip when it is absent."""
    if SHARED_DATA is None or not SHARED_DATA.is_dir():
        pytest.skip("shared data directory not found (set PRIME_TRL_DATA_DIR)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> str:
    """A tiny random Qwen2 model + byte-level tokenizer saved locally; pass its path wherever a hub id goes."""
    from prime_trl.tiny import save_tiny_model

    return str(save_tiny_model(tmp_path_factory.mktemp("tiny-qwen2"), hidden_size=32, num_layers=2))
