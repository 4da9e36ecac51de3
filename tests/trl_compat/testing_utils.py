"""Stand-in for TRL's ``tests/testing_utils.py`` (not shipped in the wheel): the base class and skip markers that
TRL's GRPOTrainer test file imports. Written for prime-trl; `run_trl_tests.py` copies it next to TRL's file."""

import importlib.util

import pytest
import torch


def _available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


class TrlTestCase:
    """Gives each test a fresh ``self.tmp_dir``, as TRL's base class does."""

    @pytest.fixture(autouse=True)
    def _set_tmp_dir(self, tmp_path):
        self.tmp_dir = str(tmp_path)


def _skip_unless(condition: bool, reason: str):
    return pytest.mark.skipif(not condition, reason=reason)


require_peft = _skip_unless(_available("peft"), "test requires peft")
require_vision = _skip_unless(_available("PIL") and _available("torchvision"), "test requires PIL and torchvision")
require_vllm = _skip_unless(_available("vllm"), "test requires vllm")
require_liger_kernel = _skip_unless(_available("liger_kernel"), "test requires liger-kernel")
require_jmespath = _skip_unless(_available("jmespath"), "test requires jmespath")
require_bitsandbytes = _skip_unless(_available("bitsandbytes"), "test requires bitsandbytes")
require_kernels = _skip_unless(_available("kernels"), "test requires kernels")
require_torch_accelerator = _skip_unless(torch.cuda.is_available(), "test requires an accelerator")
require_ampere_or_newer = _skip_unless(
    torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8, "test requires an Ampere GPU"
)
