"""torchrun support: process group from the environment, gradient all-reduce, gathering results."""
from __future__ import annotations

import os

import torch
import torch.distributed as dist


def setup(device: torch.device) -> tuple[int, int]:
    """Initialises the process group when launched by torchrun (WORLD_SIZE > 1). Returns (rank, world)."""
    world = world_size()
    if world == 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return dist.get_rank(), dist.get_world_size()


def is_main() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def world_size() -> int:
    """Processes torchrun launched (1 without torchrun), known before the process group exists."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def barrier() -> None:
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def from_main(value, device: torch.device):
    """Rank 0's `value` (a small picklable object of promptkit's own, never a user file) on every rank: for
    decisions read from a shared file system, which every rank must take the same way."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0, device=device if device.type == "cuda" else None)
    return box[0]


def average_gradients(params) -> None:
    """All-reduces prompt gradients to their mean over ranks. A parameter a rank's batch did not reach (CAVPT's
    class-aware classifier when no true class is among the top K) counts as a zero gradient there: every rank
    must send the same tensors."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    average([p.grad for p in params])


def average(tensors) -> None:
    """All-reduces `tensors` in place to their mean over ranks (one flat buffer, one collective)."""
    if not dist.is_initialized() or dist.get_world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    flat /= dist.get_world_size()
    offset = 0
    for t in tensors:
        t.copy_(flat[offset:offset + t.numel()].view_as(t))
        offset += t.numel()


def broadcast(tensors) -> None:
    """Overwrites `tensors` (contiguous, any dtype) on every rank with rank 0's; once per run, so one
    collective per tensor is cheap."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    with torch.no_grad():
        for t in tensors:
            dist.broadcast(t, src=0)


def shard(n: int) -> torch.Tensor:
    """This rank's share of n items in dataset order: every W-th from its rank (all n in one process)."""
    if not dist.is_initialized():
        return torch.arange(n)
    return torch.arange(dist.get_rank(), n, dist.get_world_size())


def dataset_order(index: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The permutation that puts results gathered in rank order (`gather_cat` of each rank's `shard`) back in
    dataset order."""
    return gather_cat(index.to(device)).argsort()


def gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates equally-shaped tensors from all ranks (rank order), differentiable: gradients flow back to
    the rank that computed each part (as open_clip's `gather_with_grad`)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    import torch.distributed.nn.functional as dist_fn

    return torch.cat(dist_fn.all_gather(tensor))


def gather_cat(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenates equally-shaped-except-dim-0 tensors from all ranks (rank order)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return tensor
    sizes = [torch.zeros(1, dtype=torch.long, device=tensor.device) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, torch.tensor([len(tensor)], device=tensor.device))
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, *tensor.shape[1:], dtype=tensor.dtype, device=tensor.device)
    padded[:len(tensor)] = tensor
    parts = [torch.empty_like(padded) for _ in sizes]
    dist.all_gather(parts, padded)
    return torch.cat([p[:int(s.item())] for p, s in zip(parts, sizes)])
