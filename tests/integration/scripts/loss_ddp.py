"""Run under `accelerate launch` with 2 processes (tests/integration/test_train_distributed.py).

argv: OUT_DIR CONFIG [overrides...]. The recipe's own setup builds the run (2 ranks, the real plan),
and its own `train_step` takes the first optimizer step; the gradient the optimizer is given (DDP's,
all-reduced) is compared on rank 0 with one process scoring the same two ranks' batches as one
batch (the mean over their utterances, with plain `F.cross_entropy`), and with what a mean per
batch would give. Writes OUT_DIR/result.json.
"""

from __future__ import annotations

import copy
import json
import os
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

from emotrain.config import load_config
from emotrain.data.stream import build_train_stream
from emotrain.train.evaluation import model_inputs
from emotrain.train.recipe import setup, train_step


class GradientSpy:
    """The run's optimizer, keeping the gradient it is asked to apply."""

    def __init__(self, optimizer, parameters):
        self._optimizer, self._parameters, self.gradient = optimizer, list(parameters), None

    def __getattr__(self, name):
        return getattr(self._optimizer, name)

    def step(self, *args, **kwargs):
        self.gradient = torch.cat([p.grad.detach().flatten().clone() for p in self._parameters if p.grad is not None])
        return self._optimizer.step(*args, **kwargs)


def main() -> None:
    out_dir = Path(sys.argv[1])
    cfg = load_config(sys.argv[2], sys.argv[3:])
    training = setup(cfg)
    accelerator, stream = training.accelerator, training.state.stream
    assert accelerator.num_processes == 2, f"expected 2 processes, got {accelerator.num_processes}"
    model = training.state.model
    model.eval()  # no dropout or masking: the reference must see the same function
    before = copy.deepcopy(accelerator.unwrap_model(model))
    spy = GradientSpy(training.state.optimizer, model.parameters())
    training.state.optimizer = spy
    stream.set_epoch(0)
    step_utterances = stream.step_utterances()  # what `fit` passes: the plan's utterances per step, all ranks
    train_step(training, iter(stream), int(step_utterances[0]))

    if accelerator.is_main_process:
        # The same first batches, read by one process from both ranks' plans.
        feature_extractor, tokenizer = training.processors
        batches = [next(iter(build_train_stream(cfg, training.split, feature_extractor=feature_extractor,
                                                tokenizer=tokenizer, rank=rank, world_size=2)))
                   for rank in range(2)]
        sizes = [len(batch["ids"]) for batch in batches]

        def gradient(loss_of) -> torch.Tensor:
            reference = copy.deepcopy(before)
            loss_of(reference).backward()
            return torch.cat([p.grad.flatten() for p in reference.parameters() if p.grad is not None])

        def losses(reference, batch):
            return F.cross_entropy(reference(**model_inputs(batch)).logits, batch["labels"], reduction="none")

        one_batch = gradient(lambda m: sum(losses(m, b).sum() for b in batches) / sum(sizes))
        naive = gradient(lambda m: sum(losses(m, b).mean() for b in batches) / 2)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "result.json").write_text(json.dumps({
            "world": accelerator.num_processes,
            "batch_sizes": sizes,
            "step_utterances": int(step_utterances[0]),
            "max_diff_recipe_vs_one_batch": float((spy.gradient - one_batch).abs().max()),
            "max_diff_naive_vs_one_batch": float((naive - one_batch).abs().max()),
        }))
    accelerator.wait_for_everyone()
    training.close()


if __name__ == "__main__":
    main()
    # The result is written. Leave without the interpreter's finalisation: under load, gloo's worker
    # threads can still hold objects the finaliser destroys, and the process then aborts ("terminate
    # called without an active exception", seen once in CI on a busy machine) after the work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)
