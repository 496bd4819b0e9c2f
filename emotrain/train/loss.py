"""The training loss: per utterance, summed, and divided by the optimizer step's utterance count.

Why not `F.cross_entropy(logits, labels)` (a mean over the batch) as most recipes do: with duration
buckets the batch size varies (2 long utterances in one batch, 32 short ones in another), and DDP
and gradient accumulation average *batches* equally, so one utterance in a batch of 2 would weigh
16x one in a batch of 32. Here a micro-batch contributes the SUM of its utterances' losses, scaled
so that the optimizer step's gradient is

    sum over every utterance of the step (all ranks, all micro-batches) of loss_i  /  N_step

whatever the batch sizes, the accumulation and the number of ranks. N_step comes from the epoch
plan (`TrainStream.step_utterances()`), a pure function of metadata, so no collective is needed.
Accelerate divides every backward by the accumulation count and DDP / DeepSpeed average gradients
over ranks; `micro_batch_loss` multiplies both back.

Options SER users reach for (off by default): class weights (`train.class_weights=balanced`: an
utterance's loss is multiplied by its class's weight N / (C * n_c) over the training split, since UA,
the mean per-class recall, is the metric and IEMOCAP is imbalanced; the denominator stays the
utterance count, so an utterance's weight never depends on which others share its step) and label
smoothing (`train.label_smoothing`).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def balanced_class_weights(labels: np.ndarray, num_classes: int) -> torch.Tensor:
    """[C] float32: N / (C * n_c) for the training labels (scikit-learn's "balanced"); a class
    without training utterances gets 0 (it never appears as a target anyway)."""
    counts = np.bincount(np.asarray(labels, dtype=np.int64), minlength=num_classes).astype(np.float64)
    weights = np.divide(len(labels), num_classes * counts, out=np.zeros(num_classes), where=counts > 0)
    return torch.tensor(weights, dtype=torch.float32)


def utterance_losses(
    logits: torch.Tensor,
    labels: torch.Tensor,
    *,
    valid: torch.Tensor | None = None,
    class_weights: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """[B] float32 cross-entropy per utterance (logits [B, C], labels [B]).

    `valid` [B] bool: False for stand-ins of utterances that could not be decoded; they weigh 0.
    `class_weights` [C]: multiplies each utterance's loss by its true class's weight.
    """
    labels = labels.to(logits.device)
    losses = F.cross_entropy(logits.float(), labels, reduction="none", label_smoothing=label_smoothing)
    if class_weights is not None:
        losses = losses * class_weights.to(losses.device)[labels]
    if valid is not None:
        # where, not multiply: a stand-in's loss may be anything, and NaN * 0 is NaN.
        losses = torch.where(valid.to(losses.device), losses, torch.zeros_like(losses))
    return losses


def micro_batch_loss(losses: torch.Tensor, step_utterances: int, *, world_size: int, accumulation: int) -> torch.Tensor:
    """The scalar to pass to `accelerator.backward` for one micro-batch, so that the optimizer step's
    gradient is the mean over the step's `step_utterances` (all ranks and micro-batches)."""
    if step_utterances < 1:
        raise ValueError(f"an optimizer step needs at least one utterance, got {step_utterances}")
    return losses.sum() * (world_size * accumulation / step_utterances)


class StepLoss:
    """A run's loss for one micro-batch: `(scalar to backward, [B] per-utterance losses) =
    loss(logits, batch, step_utterances)`, with the run's class weights and label smoothing."""

    def __init__(self, *, world_size: int, accumulation: int, class_weights: torch.Tensor | None = None,
                 label_smoothing: float = 0.0):
        self.world_size, self.accumulation = world_size, accumulation
        self.class_weights, self.label_smoothing = class_weights, label_smoothing

    def __call__(self, logits: torch.Tensor, batch: dict, step_utterances: int) -> tuple[torch.Tensor, torch.Tensor]:
        losses = self.per_utterance(logits, batch)  # [B]
        scaled = micro_batch_loss(losses, step_utterances, world_size=self.world_size, accumulation=self.accumulation)
        return scaled, losses

    def per_utterance(self, logits: torch.Tensor, batch: dict) -> torch.Tensor:
        """[B] this run's loss of each utterance (validation reports their mean, as training does)."""
        return utterance_losses(logits, batch["labels"], valid=batch.get("valid"), class_weights=self.class_weights,
                                label_smoothing=self.label_smoothing)
