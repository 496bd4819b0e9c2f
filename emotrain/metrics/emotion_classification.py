"""Emotion classification metrics as an `evaluate` module, shipped inside emotrain (loaded by path).

WA (weighted accuracy) = overall accuracy: correct / all utterances.
UA (unweighted accuracy) = mean of the per-class recalls over the classes present in the references
(balanced accuracy); some public code swaps the two names, these are the definitions used here.
macro-F1 = mean F1 over the classes present in references or predictions.
confusion[i][j] = utterances of true class i predicted as class j.
"""

import datasets
import evaluate
import numpy as np

_DESCRIPTION = __doc__
_CITATION = ""
_KWARGS_DESCRIPTION = """
Args:
    predictions: predicted class indices.
    references: true class indices.
    num_labels: number of classes (default 4: neutral, happy, sad, angry).
Returns:
    wa, ua, macro_f1 (floats), per_class_recall (list, None for a class absent from the references),
    confusion (list of lists, rows = true class), n (number of utterances).
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class EmotionClassification(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, num_labels=4):
        predictions = np.asarray(predictions, dtype=np.int64)
        references = np.asarray(references, dtype=np.int64)
        if predictions.size == 0:
            raise ValueError("no predictions to score")
        if predictions.min() < 0 or max(predictions.max(), references.max()) >= num_labels:
            raise ValueError(f"class indices must lie in [0, {num_labels})")
        confusion = np.zeros((num_labels, num_labels), dtype=np.int64)
        np.add.at(confusion, (references, predictions), 1)

        true_counts = confusion.sum(axis=1)
        predicted_counts = confusion.sum(axis=0)
        correct = np.diag(confusion)
        present = true_counts > 0
        recall = np.where(present, correct / np.maximum(true_counts, 1), np.nan)
        precision = correct / np.maximum(predicted_counts, 1)
        f1 = np.where(precision + recall > 0, 2 * precision * recall / np.maximum(precision + recall, 1e-12), 0.0)
        scored = present | (predicted_counts > 0)
        return {
            "wa": float(correct.sum() / confusion.sum()),
            "ua": float(recall[present].mean()),
            "macro_f1": float(np.nan_to_num(f1[scored]).mean()),
            "per_class_recall": [None if np.isnan(r) else float(r) for r in recall],
            "confusion": confusion.tolist(),
            "n": int(confusion.sum()),
        }
