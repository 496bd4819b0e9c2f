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


def _all_reduce(values: list, dtype: torch.dtype, op, accelerator) -> list:
    if not _distributed(accelerator):
        return list(values)
    tensor = torch.tensor(values, dtype=dtype, device=accelerator.device)
    dist.all_reduce(tensor, op=op)
    return tensor.tolist()


def all_ranks_true(flag: bool, accelerator) -> bool:
    """True iff `flag` is true on every rank (one MIN all-reduce)."""
    return bool(min_over_ranks([int(bool(flag))], accelerator)[0])


def min_over_ranks(values: list[int], accelerator) -> list[int]:
    """Element-wise minimum of an integer list across ranks."""
    return _all_reduce(values, torch.int64, dist.ReduceOp.MIN, accelerator)


def sum_over_ranks(values: list[float], accelerator) -> list[float]:
    """Element-wise sum of a float list across ranks (float64)."""
    return _all_reduce(values, torch.float64, dist.ReduceOp.SUM, accelerator)
