"""The few collectives PRIME needs, on plain `torch.distributed` so that the TRL trainer (accelerate) and the
Lightning module (Lightning strategies) share them. Every function is a no-op in a single process."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed.tensor import DTensor


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over processes, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_max(tensor: torch.Tensor) -> torch.Tensor:
    """Element-wise max of ``tensor`` over processes, in place; returns it."""
    if is_distributed():
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return tensor


def gather_rows(tensor: torch.Tensor, pad_value: float = 0) -> torch.Tensor:
    """Concatenate ``tensor`` ``[N_p, *rest]`` of every process ``p`` along dim 0, in rank order.

    Processes may hold different ``N_p`` and, for 2-D tensors, different widths ``T_p``: rows are padded to the
    largest width with ``pad_value`` on the right, and the padding rows added for the exchange are dropped again.
    """
    if not is_distributed():
        return tensor
    sizes = torch.tensor(list(tensor.shape[:2]) + [0] * (2 - tensor.dim()), device=tensor.device)
    all_sizes = [torch.zeros_like(sizes) for _ in range(world_size())]
    dist.all_gather(all_sizes, sizes)
    max_rows = max(int(s[0]) for s in all_sizes)
    padded = tensor
    if tensor.dim() == 2:
        max_width = max(int(s[1]) for s in all_sizes)
        padded = F.pad(padded, (0, max_width - tensor.shape[1]), value=pad_value)
    padded = torch.cat([padded, padded.new_full((max_rows - tensor.shape[0], *padded.shape[1:]), pad_value)])
    pieces = [torch.empty_like(padded) for _ in range(world_size())]
    dist.all_gather(pieces, padded.contiguous())
    return torch.cat([piece[: int(size[0])] for piece, size in zip(pieces, all_sizes, strict=True)])


def is_sharded(param: torch.Tensor) -> bool:
    """Whether ``param`` is a shard of a parameter split over processes (FSDP2 DTensor or DeepSpeed ZeRO-3)."""
    return isinstance(param, DTensor) or hasattr(param, "ds_id")


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of an FSDP2 shard (a collective), or ``tensor`` itself."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor


def full_parameters(parameters: list[torch.nn.Parameter], modify: bool = False) -> AbstractContextManager:
    """Inside this context, DeepSpeed ZeRO-3 parameters hold their full values on every process (a collective:
    all processes must enter it). With ``modify=True`` changes made inside (an optimizer step, loaded weights) are
    kept: rank 0's values are scattered back into the partitions on exit. A no-op for other parameters."""
    if not any(hasattr(param, "ds_id") for param in parameters):
        return nullcontext()
    import deepspeed

    # ZeRO-3 releases a submodule's parameters in a post-backward hook that only fires when the submodule's input
    # requires grad; the first LoRA layers of a frozen base never get it, and their parameters stay marked active
    # until the engine's own backward drains them. The PRM backward runs outside the engine, so it is finished here:
    # clear the marks (as DeepSpeed's release_and_reset_all does) so the partitions can be rewritten on exit.
    for param in parameters:
        param.ds_active_sub_modules.clear()
    return deepspeed.zero.GatheredParameters(parameters, modifier_rank=0 if modify else None)


def all_reduce_gradients(parameters: list[torch.nn.Parameter]) -> None:
    """Sum the gradients of ``parameters`` over processes (missing gradients count as zeros).

    Used for the PRM adapter. With replicated parameters (DDP) the data-parallel wrapper does not know about it
    (it was frozen when the wrapper was built), so its gradients are summed here. The same holds under DeepSpeed
    ZeRO-3, whose engine leaves the adapter's full-size local gradients alone (call this inside
    `full_parameters`). With FSDP2-sharded parameters FSDP has already reduce-scattered them as a mean over
    processes; scaling by the world size turns that mean into the sum the PRM loss weights expect.
    """
    if not is_distributed():
        return
    if any(isinstance(param, DTensor) for param in parameters):
        for param in parameters:
            if param.grad is not None:
                param.grad.mul_(world_size())
        return
    for param in parameters:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    flat = torch.cat([param.grad.reshape(-1) for param in parameters])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for param in parameters:
        numel = param.grad.numel()
        param.grad.copy_(flat[offset : offset + numel].view_as(param.grad))
        offset += numel
