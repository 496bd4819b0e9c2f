"""Small collectives beyond Accelerate's (used by the data stream and the training loop).

Each is a collective: call it on every rank at the same point. Single process: no communication.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def _distributed(accelerator) -> bool:
    """`accelerator` may be None (a single process, e.g. in unit tests)."""
    return (
        accelerator is not None
        and accelerator.num_processes > 1
        and dist.is_available()
        and dist.is_initialized()
    )


def all_ranks_true(flag: bool, accelerator) -> bool:
    """True iff `flag` is true on every rank (one MIN all-reduce)."""
    if not _distributed(accelerator):
        return bool(flag)
    value = torch.tensor([1 if flag else 0], dtype=torch.int32, device=accelerator.device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def min_over_ranks(values: list[int], accelerator) -> list[int]:
    """Element-wise minimum of an integer list across ranks."""
    if not _distributed(accelerator):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.int64, device=accelerator.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.MIN)
    return tensor.tolist()


def sum_over_ranks(values: list[float], accelerator) -> list[float]:
    """Element-wise sum of a float list across ranks (float64)."""
    if not _distributed(accelerator):
        return list(values)
    tensor = torch.tensor(values, dtype=torch.float64, device=accelerator.device)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.tolist()
