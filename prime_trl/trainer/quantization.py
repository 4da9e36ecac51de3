"""QLoRA helpers: keep a 4-bit (bitsandbytes) base trainable on CPU.

On a CPU with AVX512-BF16, bitsandbytes repacks a ``Linear4bit`` weight into an inference-only layout the first
time it runs a forward in eval mode on an input that does not require grad. Training
forwards on a repacked layer then fail with "a view of a leaf Variable that requires grad is being used in an
in-place operation". Evaluation, a sanity forward after ``from_pretrained`` (which returns eval mode), or a
no-grad scoring pass can all trigger it. `protect_4bit_base` undoes any repacking already done and switches the
repacking off for the model's lifetime. GPUs never repack, so this is a no-op there.
"""

from __future__ import annotations

import logging

import torch

logger = logging.getLogger(__name__)


def is_quantized(model: torch.nn.Module) -> bool:
    """Whether ``model`` (or the model under a PEFT wrapper) was loaded in 4 or 8 bits."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(inner, "is_loaded_in_4bit", False) or getattr(inner, "is_loaded_in_8bit", False))


def _linear4bit_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    try:
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    return [module for module in model.modules() if isinstance(module, Linear4bit)]


def protect_4bit_base(model: torch.nn.Module) -> int:
    """Undo and disable bitsandbytes' CPU inference repacking on every ``Linear4bit`` of ``model``.

    Returns the number of layers that had already been repacked (and were restored).
    """
    layers = _linear4bit_modules(model)
    if not layers:
        return 0
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    restored = 0
    for layer in layers:
        quant_state = getattr(layer.weight, "quant_state", None)
        if quant_state is not None and getattr(quant_state, "packing_format_for_cpu", False):
            layer.weight.data, quant_state = _convert_weight_packed_for_cpu_inverse(layer.weight.data, quant_state)
            if quant_state.absmax.dim() == 2:
                # Without double quantisation bitsandbytes leaves absmax in the packed [K/block, N] bf16 layout;
                # put it back in the flat per-block order the trainable kernels read (bf16 rounding remains).
                quant_state.absmax = quant_state.absmax.T.reshape(-1).float().contiguous()
            layer.weight.quant_state = quant_state
            restored += 1
        # bitsandbytes reads this flag before repacking; off, eval-mode forwards use the trainable layout.
        layer.support_avx512bf16_for_cpu = False
    if restored:
        logger.warning(
            "%d 4-bit layers had been repacked for CPU inference (an eval-mode forward before training); restored "
            "them to the trainable layout.",
            restored,
        )
    return restored
