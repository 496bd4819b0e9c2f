"""Evaluate a model on an evaluation loader: every utterance once, across all ranks."""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate.utils import gather_object

from emotrain.data.batching import TENSOR_KEYS
from emotrain.data.evaluation import FILLER_ID
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
def evaluate(accelerator, model, loader, *, label_names=None, per_utterance: bool = False,
             utterance_losses: Callable[[torch.Tensor, dict], torch.Tensor] | None = None) -> dict:
    """WA, UA, macro-F1, per-class recall and confusion over every rank's part of an evaluation set.

    `loader` is this rank's `build_eval_dataloader` (not prepared: each utterance is on exactly one
    rank, and every rank runs the same number of batches). Batches are moved to the device here;
    predictions are gathered once, at the end (one collective per evaluation). Utterances that
    failed to decode (`valid == False`) are left out and counted in `n_skipped`; fillers are ignored.
    The global RNG is forked so evaluating never changes the training run's random stream.
    per_utterance: also return `predictions`, `[{"id", "label", "predicted", "probabilities"}]`.
    label_names: the class names (default: the model's own).
    utterance_losses: `(logits [B, C], batch) -> [B]`, the training's loss per utterance; given, the
    result holds `loss`, its mean over the scored utterances (the HF Trainer's `eval_loss`).
    """
    if label_names is None:
        label_names = accelerator.unwrap_model(model).label_names
    was_training = model.training
    model.eval()
    rows = []  # (id, label, predicted, valid, probabilities, loss) of this rank's utterances
    with torch.random.fork_rng(devices=[]):
        for batch in loader:
            logits = model(**model_inputs(batch, accelerator.device)).logits.float()
            probabilities = logits.softmax(dim=-1).cpu().tolist() if per_utterance else [None] * len(batch["ids"])
            predicted = logits.argmax(dim=-1).cpu().tolist()
            valid = batch["valid"].tolist() if "valid" in batch else [True] * len(batch["ids"])
            losses = (utterance_losses(logits, batch).cpu().tolist() if utterance_losses is not None
                      else [None] * len(batch["ids"]))
            for row in zip(batch["ids"], batch["labels"].tolist(), predicted, valid, probabilities, losses):
                if row[0] != FILLER_ID:
                    rows.append(row)
    model.train(was_training)
    rows = sorted(gather_object(rows) if accelerator.num_processes > 1 else rows)
    scored = [row for row in rows if row[3]]
    metrics = compute_metrics([row[2] for row in scored], [row[1] for row in scored], label_names)
    metrics["n_skipped"] = len(rows) - len(scored)
    if utterance_losses is not None:
        metrics["loss"] = sum(row[5] for row in scored) / len(scored) if scored else None
    if per_utterance:
        metrics["predictions"] = [
            {"id": utt, "label": label_names[label], "predicted": label_names[pred],
             "probabilities": dict(zip(label_names, probs))}
            for utt, label, pred, _, probs, _ in scored
        ]
    return metrics
