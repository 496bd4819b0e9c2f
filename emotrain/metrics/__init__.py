"""Evaluation metrics: WA, UA, macro-F1, per-class recall, confusion matrix.

They are computed by an `evaluate` module shipped in this package and loaded by path, so they work
offline (`evaluate.load("accuracy")` would need the hub).
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Sequence

from emotrain.config import LABEL_NAMES

MODULE_PATH = Path(__file__).with_name("emotion_classification.py")


@functools.cache
def _metric():
    import evaluate  # costs seconds: imported only when metrics are first needed

    return evaluate.load(str(MODULE_PATH))


def compute_metrics(
    predictions: Sequence[int], references: Sequence[int], label_names: Sequence[str] = LABEL_NAMES
) -> dict:
    """`{"wa", "ua", "macro_f1", "per_class_recall": {name: recall}, "confusion", "n"}`."""
    result = _metric().compute(
        predictions=list(map(int, predictions)),
        references=list(map(int, references)),
        num_labels=len(label_names),
    )
    result["per_class_recall"] = dict(zip(label_names, result["per_class_recall"]))
    return result
