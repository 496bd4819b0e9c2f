"""Run under `accelerate launch` with 2 processes (tests/integration/test_train_distributed.py).

argv: OUT_DIR. One optimizer step where rank 0 holds 3 utterances and rank 1 holds 7, with the
recipe's own loss functions; rank 0 compares the DDP gradient with one process accumulating the same
two micro-batches (accumulation 2) and with the mean over the 10 utterances as one batch, and writes
OUT_DIR/result.json.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from torch import nn

from emotrain.train.loss import micro_batch_loss, utterance_losses


def main() -> None:
    out_dir = Path(sys.argv[1])
    accelerator = Accelerator()
    assert accelerator.num_processes == 2, f"expected 2 processes, got {accelerator.num_processes}"
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(10, 6, generator=g), torch.randint(0, 4, (10,), generator=g)
    micro_batches = [(x[:3], y[:3]), (x[3:], y[3:])]
    torch.manual_seed(0)
    reference = nn.Linear(6, 4)
    model = accelerator.prepare(copy.deepcopy(reference))

    # DDP: each rank its own micro-batch, one step, the step's utterance count over both ranks.
    xb, yb = micro_batches[accelerator.process_index]
    accelerator.backward(micro_batch_loss(utterance_losses(model(xb), yb), 10, world_size=2, accumulation=1))
    ddp = torch.cat([p.grad.flatten() for p in model.parameters()])

    if accelerator.is_main_process:
        # One process accumulating the same two micro-batches (what Accelerate's accumulate does:
        # every backward divided by the accumulation count).
        single = copy.deepcopy(reference)
        for xb, yb in micro_batches:
            (micro_batch_loss(utterance_losses(single(xb), yb), 10, world_size=1, accumulation=2) / 2).backward()
        accumulated = torch.cat([p.grad.flatten() for p in single.parameters()])
        whole = copy.deepcopy(reference)
        F.cross_entropy(whole(x), y).backward()
        one_batch = torch.cat([p.grad.flatten() for p in whole.parameters()])
        naive = copy.deepcopy(reference)
        sum(F.cross_entropy(naive(xb), yb) / 2 for xb, yb in micro_batches).backward()
        naive_grad = torch.cat([p.grad.flatten() for p in naive.parameters()])
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "result.json").write_text(json.dumps({
            "world": accelerator.num_processes,
            "max_diff_ddp_vs_accumulation": float((ddp - accumulated).abs().max()),
            "max_diff_ddp_vs_one_batch": float((ddp - one_batch).abs().max()),
            "max_diff_naive_vs_one_batch": float((naive_grad - one_batch).abs().max()),
        }))
    accelerator.wait_for_everyone()
    accelerator.end_training()


if __name__ == "__main__":
    main()
    # The result is written. Leave without the interpreter's finalisation: under load, gloo's worker
    # threads can still hold objects the finaliser destroys, and the process then aborts ("terminate
    # called without an active exception", seen once in CI on a busy machine) after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
