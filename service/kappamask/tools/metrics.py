"""Agreement between predicted and reference masks, as the paper reports it.

Four classes (clear, cloud shadow, semi-transparent cloud, cloud; Tables 2-5, Figure 8),
with reference pixels that are UNDEFINED or MISSING left out; and the two-class view of
Tables 6-9, where cloud = semi-transparent + opaque cloud and clear = clear + shadow
(tools that mask clouds only are compared on that).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from kappamask.bands import CLASS_NAMES, MaskClass

CLASSES = (
    MaskClass.CLEAR,
    MaskClass.CLOUD_SHADOW,
    MaskClass.SEMI_TRANSPARENT_CLOUD,
    MaskClass.CLOUD,
)
TWO_CLASS = {"clear": (MaskClass.CLEAR, MaskClass.CLOUD_SHADOW),
             "cloud": (MaskClass.SEMI_TRANSPARENT_CLOUD, MaskClass.CLOUD)}  # fmt: skip


def confusion_matrix(pred: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Rows: reference class; columns: predicted MISSING, then the four classes.

    Reference pixels that are UNDEFINED or MISSING are left out; a prediction outside
    the four classes counts as MISSING (column 0).
    """
    ref, pred = np.asarray(ref).ravel(), np.asarray(pred).ravel()
    if ref.shape != pred.shape:
        raise ValueError(f"prediction has {pred.size} pixels, reference {ref.size}")
    col = np.zeros(256, np.int64)
    row = np.full(256, -1, np.int64)
    for i, cls in enumerate(CLASSES):
        col[cls] = i + 1
        row[cls] = i
    r, c = row[ref], col[pred]
    keep = r >= 0
    matrix = np.zeros((len(CLASSES), len(CLASSES) + 1), np.int64)
    np.add.at(matrix, (r[keep], c[keep]), 1)
    return matrix


def scores(matrix: np.ndarray) -> dict[str, Any]:
    """Overall accuracy and per-class dice, precision and recall of a confusion matrix."""
    matrix = np.asarray(matrix, np.float64)
    total = matrix.sum()
    per_class: dict[str, dict[str, float]] = {}
    for i, cls in enumerate(CLASSES):
        tp = matrix[i, i + 1]
        predicted = matrix[:, i + 1].sum()
        actual = matrix[i].sum()
        per_class[CLASS_NAMES[cls]] = {
            "dice": 2 * tp / (predicted + actual) if predicted + actual else float("nan"),
            "precision": tp / predicted if predicted else float("nan"),
            "recall": tp / actual if actual else float("nan"),
            "support": float(actual),
        }
    diagonal = sum(matrix[i, i + 1] for i in range(len(CLASSES)))
    return {
        "pixels": float(total),
        "overall_accuracy": float(diagonal / total) if total else float("nan"),
        "classes": per_class,
    }


def two_class_matrix(matrix: np.ndarray) -> np.ndarray:
    """Collapse a four-class matrix to clear vs cloud (rows reference, cols predicted;
    predicted MISSING counts as not cloud)."""
    m = np.asarray(matrix)
    clear_rows, cloud_rows = m[[0, 1]].sum(axis=0), m[[2, 3]].sum(axis=0)

    def cols(row: np.ndarray) -> list[int]:
        return [int(row[0] + row[1] + row[2]), int(row[3] + row[4])]

    return np.array([cols(clear_rows), cols(cloud_rows)], np.int64)


def two_class_scores(matrix: np.ndarray) -> dict[str, Any]:
    """Overall accuracy and dice/precision/recall of cloud and clear (Tables 6-9)."""
    m = np.asarray(matrix, np.float64)
    total = m.sum()
    out: dict[str, Any] = {
        "pixels": float(total),
        "overall_accuracy": float((m[0, 0] + m[1, 1]) / total) if total else float("nan"),
        "classes": {},
    }
    for i, name in enumerate(TWO_CLASS):
        tp, predicted, actual = m[i, i], m[:, i].sum(), m[i].sum()
        out["classes"][name] = {
            "dice": 2 * tp / (predicted + actual) if predicted + actual else float("nan"),
            "precision": tp / predicted if predicted else float("nan"),
            "recall": tp / actual if actual else float("nan"),
            "support": float(actual),
        }
    return out


def without_nan(value: Any) -> Any:
    """``value`` with every NaN (an undefined score) replaced by None, as JSON has it."""
    if isinstance(value, float) and math.isnan(value):
        return None
    if isinstance(value, dict):
        return {k: without_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [without_nan(v) for v in value]
    return value


def agreement(pred: np.ndarray, ref: np.ndarray) -> dict[str, Any]:
    """Both views of ``pred`` against ``ref`` with the confusion matrices; undefined
    scores (a class absent from both) are None."""
    matrix = confusion_matrix(pred, ref)
    four = scores(matrix)
    two = two_class_matrix(matrix)
    result: dict[str, Any] = without_nan({
        **four,
        "confusion": matrix.tolist(),
        "two_class": {**two_class_scores(two), "confusion": two.tolist()},
    })  # fmt: skip
    return result
