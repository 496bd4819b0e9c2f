"""Evaluation metrics: WA, UA, macro-F1, per-class recall, confusion matrix; `format_results`
prints them as a small table (the training log, `emotrain evaluate`).

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


def format_results(results: dict) -> str:
    """A small table: WA, UA, macro-F1 and recall per class for validation and test
    (`results`: `{"validation": metrics, "test": metrics}`, either may be missing)."""
    labels = next((list(results[s]["per_class_recall"]) for s in ("validation", "test") if results.get(s)), [])
    width = max(9, *(len(name) + 1 for name in labels)) if labels else 9
    header = f"{'split':<11}{'n':>6}{'WA':>8}{'UA':>8}{'F1':>8}" + "".join(f"{name:>{width}}" for name in labels)
    lines = [header]
    for split in ("validation", "test"):
        m = results.get(split)
        if not m:
            continue
        recalls = "".join(
            f"{m['per_class_recall'][name]:>{width}.3f}" if m["per_class_recall"][name] is not None else f"{'-':>{width}}"
            for name in labels
        )
        lines.append(f"{split:<11}{m['n']:>6}{m['wa']:>8.3f}{m['ua']:>8.3f}{m['macro_f1']:>8.3f}{recalls}")
    return "\n".join(lines) + "\n(recall per class on the right)"
