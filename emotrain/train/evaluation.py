"""Evaluate a model on a prepared (map-style) loader: every utterance once, across all ranks."""

from __future__ import annotations

import torch

from emotrain.data.batching import TENSOR_KEYS
from emotrain.metrics import compute_metrics

MODEL_INPUTS = tuple(key for key in TENSOR_KEYS if key != "labels")
"""The batch tensors the model's forward takes (labels are passed separately, when wanted)."""


def model_inputs(batch: dict, device=None) -> dict:
    """The tensors the model takes (bookkeeping such as ids and audio seconds stays behind)."""
    inputs = {key: batch[key] for key in MODEL_INPUTS if key in batch}
    if device is not None:
        inputs = {key: value.to(device, non_blocking=True) for key, value in inputs.items()}
    return inputs


@torch.no_grad()
def evaluate(accelerator, model, loader) -> dict:
    """WA, UA, macro-F1, per-class recall and confusion over the whole `loader`.

    `loader` must come from `accelerator.prepare` over a dataset with a length, so that
    `gather_for_metrics` drops the samples Accelerate repeats to even out the last batch.
    Utterances that failed to decode (`valid == False`) are left out and counted in `n_skipped`.
    The global RNG is forked so evaluating never changes the training run's random stream.
    """
    was_training = model.training
    model.eval()
    predictions, references, valid = [], [], []
    with torch.random.fork_rng(devices=[]):
        for batch in loader:
            logits = model(**model_inputs(batch)).logits
            batch_valid = batch.get("valid", torch.ones_like(batch["labels"], dtype=torch.bool))
            gathered = accelerator.gather_for_metrics((logits.argmax(dim=-1), batch["labels"], batch_valid))
            predictions.append(gathered[0].cpu())
            references.append(gathered[1].cpu())
            valid.append(gathered[2].cpu())
    model.train(was_training)
    predictions, references, valid = torch.cat(predictions), torch.cat(references), torch.cat(valid)
    metrics = compute_metrics(predictions[valid].tolist(), references[valid].tolist())
    metrics["n_skipped"] = int((~valid).sum())
    return metrics
