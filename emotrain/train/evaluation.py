"""Evaluate a model on a prepared (map-style) loader: every utterance once, across all ranks."""

from __future__ import annotations

import torch

from emotrain.config import LABEL_NAMES
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
def evaluate(accelerator, model, loader, *, label_names=LABEL_NAMES, per_utterance: bool = False) -> dict:
    """WA, UA, macro-F1, per-class recall and confusion over the whole `loader`.

    `loader` must come from `accelerator.prepare` over a dataset with a length, so that
    `gather_for_metrics` drops the samples Accelerate repeats to even out the last batch.
    Utterances that failed to decode (`valid == False`) are left out and counted in `n_skipped`.
    The global RNG is forked so evaluating never changes the training run's random stream.
    per_utterance: also return `predictions`, `[{"id", "label", "predicted", "probabilities"}]`
    in the loader's order (ids are gathered as objects: a second, small collective per batch).
    """
    was_training = model.training
    model.eval()
    predictions, references, valid, probabilities, ids = [], [], [], [], []
    with torch.random.fork_rng(devices=[]):
        for batch in loader:
            logits = model(**model_inputs(batch)).logits
            batch_valid = batch.get("valid", torch.ones_like(batch["labels"], dtype=torch.bool))
            tensors = (logits.argmax(dim=-1), batch["labels"], batch_valid)
            if per_utterance:
                tensors += (logits.float().softmax(dim=-1),)
            gathered = accelerator.gather_for_metrics(tensors)
            predictions.append(gathered[0].cpu())
            references.append(gathered[1].cpu())
            valid.append(gathered[2].cpu())
            if per_utterance:
                probabilities.append(gathered[3].cpu())
                ids.extend(accelerator.gather_for_metrics(batch["ids"], use_gather_object=True))
    model.train(was_training)
    predictions, references, valid = torch.cat(predictions), torch.cat(references), torch.cat(valid)
    metrics = compute_metrics(predictions[valid].tolist(), references[valid].tolist(), label_names)
    metrics["n_skipped"] = int((~valid).sum())
    if per_utterance:
        probabilities = torch.cat(probabilities)
        metrics["predictions"] = [
            {"id": utt, "label": label_names[int(label)], "predicted": label_names[int(pred)],
             "probabilities": dict(zip(label_names, map(float, probs)))}
            for utt, label, pred, probs, ok in zip(ids, references, predictions, probabilities, valid) if ok
        ]
    return metrics
