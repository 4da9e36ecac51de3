"""Getting the policy (and only the policy) into vLLM.

TRL pushes weights to vLLM by merging the *active* LoRA adapter into the base, streaming the merged base tensors
and unmerging (``VLLMGeneration.sync_weights``). Two things matter for PRIME:

1. The PRM adapter must never reach vLLM. `guard_merge_sync` makes every sync run with exactly the policy adapter
   ``default`` active, whatever adapter happens to be active when generation starts; adapter tensors themselves
   are never streamed (TRL skips names containing ``lora_``).
2. On a 4-bit (QLoRA) base, merging a LoRA delta into nf4 weights re-quantises them and loses the update (the
   problem reported in TRL issues #3466, #4973, #5975). `LoRAAdapterSync` instead exports the policy adapter
   as a PEFT adapter directory and has vLLM apply it as a LoRA adapter (``LoRARequest``) on its own copy of the
   base, which is never modified. This needs vLLM's colocate mode and an engine built with ``enable_lora``
   (`engine_with_lora`).

vLLM is CUDA-only, so none of this runs on the project's CPU machines; the logic is unit-tested with recording
stand-ins for the engine (tests/test_vllm_sync.py).
"""

from __future__ import annotations

import functools
import logging
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peft import PeftModel
from trl.trainer.utils import use_adapter

from prime_trl.algo.prm import save_adapter

logger = logging.getLogger(__name__)

POLICY_ADAPTER = "default"
SYNC_MODES = ("auto", "merge", "lora")


def resolve_sync_mode(mode: str, quantized: bool, vllm_mode: str) -> str:
    """``auto`` -> ``lora`` on a quantized base, else ``merge``; checks the combination is supported."""
    if mode not in SYNC_MODES:
        raise ValueError(f"vllm_sync_mode={mode!r} is not supported; choose one of {SYNC_MODES}.")
    resolved = ("lora" if quantized else "merge") if mode == "auto" else mode
    if resolved == "lora" and vllm_mode != "colocate":
        raise ValueError(
            "vllm_sync_mode='lora' needs vllm_mode='colocate': TRL's vLLM server (`trl vllm-serve`) only accepts "
            "full weights. Use vllm_mode='colocate', or vllm_sync_mode='merge' with a non-quantized base."
        )
    return resolved


def guard_merge_sync(vllm_generation: Any, model: PeftModel) -> None:
    """Make TRL's merge-and-push sync always merge the policy adapter alone (never the PRM)."""
    original_sync = vllm_generation.sync_weights

    @functools.wraps(original_sync)
    def sync_policy_only() -> None:
        with use_adapter(model, POLICY_ADAPTER):
            original_sync()

    vllm_generation.sync_weights = sync_policy_only


class LoRAAdapterSync:
    """Push the policy as a vLLM LoRA adapter instead of merging it into the base.

    Each `sync` writes the ``default`` adapter to ``export_dir/v<version>`` and points generation at it with a
    fresh ``lora_int_id`` (vLLM caches adapters by id, so a new id forces the new weights to load). Only the
    last ``keep`` exports are kept on disk.

    With several processes (each with its own colocated engine) every process calls `sync` together: gathering
    a sharded adapter is a collective, then only ``is_main_process`` writes and deletes folders, and every
    process waits (``wait_for_everyone``) until the new export is complete before pointing its engine at it.
    """

    def __init__(
        self,
        model: PeftModel,
        export_dir: str | Path,
        keep: int = 2,
        is_main_process: bool = True,
        wait_for_everyone: Callable[[], None] = lambda: None,
    ):
        self.model = model
        self.export_dir = Path(export_dir)
        self.keep = keep
        self.is_main_process = is_main_process
        self.wait_for_everyone = wait_for_everyone
        self.version = 0
        self.request: Any = None

    def sync(self) -> None:
        self.version += 1
        path = self.export_dir / f"v{self.version}"
        save_adapter(self.model, POLICY_ADAPTER, path, is_main_process=self.is_main_process)
        self.wait_for_everyone()  # no engine loads the export before it is fully written
        self.request = make_lora_request("prime-policy", self.version, path)
        stale = self.export_dir / f"v{self.version - self.keep}"
        if self.is_main_process and stale.is_dir():
            shutil.rmtree(stale)

    def install(self, vllm_generation: Any) -> None:
        """Replace TRL's weight sync and make every ``llm.generate`` call apply the current adapter."""
        vllm_generation.sync_weights = self.sync
        original_generate = vllm_generation.llm.generate

        @functools.wraps(original_generate)
        def generate_with_policy_adapter(*args, **kwargs):
            if self.request is None:  # TRL syncs before the first generation; never generate with the bare base
                self.sync()
            return original_generate(*args, lora_request=self.request, **kwargs)

        vllm_generation.llm.generate = generate_with_policy_adapter


def make_lora_request(name: str, int_id: int, path: Path) -> Any:
    """vLLM's ``LoRARequest`` for an adapter directory."""
    from vllm.lora.request import LoRARequest

    return LoRARequest(lora_name=name, lora_int_id=int_id, lora_path=str(path))


@contextmanager
def engine_with_lora(max_lora_rank: int) -> Iterator[None]:
    """While TRL builds its colocated ``vllm.LLM``, add ``enable_lora=True`` and the adapter's rank."""
    import trl.generation.vllm_generation as vllm_generation_module

    original = getattr(vllm_generation_module, "LLM", None)
    if original is None:  # vLLM not installed: TRL raises its own clear error when it needs it
        yield
        return
    # vLLM accepts a fixed set of ranks (8, 16, 32, ...); round the adapter's rank up to the next one.
    supported_rank = max(8, 1 << (max_lora_rank - 1).bit_length())
    vllm_generation_module.LLM = functools.partial(
        original, enable_lora=True, max_lora_rank=supported_rank, max_loras=1
    )
    try:
        yield
    finally:
        vllm_generation_module.LLM = original
