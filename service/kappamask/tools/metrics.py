"""Agreement between predicted and reference masks, as the paper reports it.

Four classes (clear, cloud shadow, semi-transparent cloud, cloud; Tables 2-5, Figure 8),
with reference pixels that are UNDEFINED or MISSING left out; and the two-class view of
Tables 6-9, where cloud = semi-transparent + opaque cloud and clear = clear + shadow
(tools that mask clouds only are compared on that).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np

from kappamask.bands import CLASS_NAMES, MaskClass

CLASSES = (
    MaskClass.CLEAR,
    MaskClass.CLOUD_SHADOW,
    MaskClass.SEMI_TRANSPARENT_CLOUD,
    MaskClass.CLOUD,
)
TWO_CLASS = {
    "clear": (MaskClass.CLEAR, MaskClass.CLOUD_SHADOW),
    "cloud": (MaskClass.SEMI_TRANSPARENT_CLOUD, MaskClass.CLOUD),
}


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
    result: dict[str, Any] = without_nan(
        {
            **four,
            "confusion": matrix.tolist(),
            "two_class": {**two_class_scores(two), "confusion": two.tolist()},
        }
    )
    return result


def _change_rates(classes: np.ndarray) -> np.ndarray:
    """Per boundary between consecutive rows (``b``: rows ``b - 1`` and ``b``; index 0
    unused): the share of columns, both pixels with data, whose class changes. NaN where
    fewer columns than a quarter of the median boundary's have data on both sides."""
    both = (classes[1:] != MaskClass.MISSING) & (classes[:-1] != MaskClass.MISSING)
    changed = (classes[1:] != classes[:-1]) & both
    counts = both.sum(axis=1)
    # a boundary with few pixels on both sides (along a no-data wedge) says little
    enough = counts >= max(1, np.median(counts[counts > 0]) / 4) if counts.any() else counts > 0
    rates = np.full(classes.shape[0], np.nan)
    rates[1:] = np.where(enough, changed.sum(axis=1) / np.maximum(counts, 1), np.nan)
    return rates


def seams(classes: np.ndarray, crop_rows: list[int], crop_cols: list[int]) -> dict[str, Any]:
    """How much more often the class changes across crop boundaries and the outermost rows
    and columns than across a typical row or column boundary.

    For rows and columns alike: the median change rate over all boundaries, and each
    boundary's rate as a ratio to it: the worst boundary anywhere, the worst at a crop
    boundary (``crop_rows`` / ``crop_cols``: where crops begin, end or were cut), and the
    outermost boundary on each side. A seamless mosaic has every ratio near 1; a cut one
    shows 4-6 at its cuts; edges without context, far more.
    """
    out: dict[str, Any] = {}
    for axis, crop_edges in (("rows", crop_rows), ("columns", crop_cols)):
        rates = _change_rates(classes if axis == "rows" else classes.T)
        median = float(np.nanmedian(rates[1:])) if np.isfinite(rates[1:]).any() else math.nan
        ratio = rates / median if median > 0 else np.full_like(rates, math.nan)
        at_crops = [b for b in crop_edges if 0 < b < len(rates) and np.isfinite(ratio[b])]
        finite = np.flatnonzero(np.isfinite(ratio))
        worst = int(finite[np.argmax(ratio[finite])]) if finite.size else -1
        out[axis] = {
            "median_change_rate": median,
            "worst_ratio": float(ratio[worst]) if worst > 0 else math.nan,
            "worst_boundary": worst,
            "worst_crop_ratio": max((float(ratio[b]) for b in at_crops), default=math.nan),
            # the first and last boundaries with enough data (the raster's outermost)
            "outer_ratios": [float(ratio[finite[0]]), float(ratio[finite[-1]])]
            if finite.size
            else [],
        }
    return out


class TrustCounts:
    """What a user sees at a glance, pooled over scenes: does ground both L1C teachers call
    clear stay clear (and how much of it turns to shadow), how much of the scene is
    shadow, cloud (semi-transparent + cloud) dice against each tool, shadow recall against
    ukis-csmask, and against Sen2Cor's SCL the three-class agreement (clear, shadow,
    cloud) and the share of SCL's cloud found."""

    def __init__(self) -> None:
        self.n: dict[str, int] = {}

    def _add(self, key: str, value: int) -> None:
        self.n[key] = self.n.get(key, 0) + int(value)

    @classmethod
    def pooled(cls, parts: Iterable[TrustCounts]) -> TrustCounts:
        """The counts of ``parts`` together, as if their scenes had been added to one."""
        total = cls()
        for part in parts:
            for key, value in part.n.items():
                total._add(key, value)
        return total

    def add(self, pred: np.ndarray, masks: dict[str, np.ndarray]) -> None:
        data = pred != MaskClass.MISSING
        cloudy = np.isin(pred, (MaskClass.SEMI_TRANSPARENT_CLOUD, MaskClass.CLOUD)) & data
        shadow = (pred == MaskClass.CLOUD_SHADOW) & data
        self._add("pixels", data.sum())
        self._add("shadow", shadow.sum())
        for name, ref in masks.items():
            known = data & ~np.isin(ref, (MaskClass.MISSING, MaskClass.UNDEFINED))
            ref_cloudy = np.isin(ref, (MaskClass.SEMI_TRANSPARENT_CLOUD, MaskClass.CLOUD)) & known
            self._add(f"{name}.tp", (cloudy & ref_cloudy).sum())
            self._add(f"{name}.pred", (cloudy & known).sum())
            self._add(f"{name}.ref", ref_cloudy.sum())
            ref_shadow = (ref == MaskClass.CLOUD_SHADOW) & known
            self._add(f"{name}.shadow_ref", ref_shadow.sum())
            self._add(f"{name}.shadow_found", (shadow & ref_shadow).sum())
            if name == "sen2cor":
                three = np.select([cloudy, shadow], [2, 1], 0)
                ref_three = np.select([ref_cloudy, ref_shadow], [2, 1], 0)
                self._add("sen2cor.known", known.sum())
                self._add("sen2cor.same", ((three == ref_three) & known).sum())
        if "s2cloudless" in masks and "ukis-csmask" in masks:
            both = data & (masks["s2cloudless"] == MaskClass.CLEAR)
            both &= masks["ukis-csmask"] == MaskClass.CLEAR
            self._add("both_clear", both.sum())
            self._add("both_clear.kept", (both & (pred == MaskClass.CLEAR)).sum())
            self._add("both_clear.shadow", (both & shadow).sum())

    def report(self) -> dict[str, Any]:
        n = self.n

        def ratio(a: str, b: str) -> float:
            return n.get(a, 0) / n[b] if n.get(b) else math.nan

        out: dict[str, Any] = {
            "pixels": n.get("pixels", 0),
            "shadow_share": ratio("shadow", "pixels"),
        }
        for name in sorted({k.split(".")[0] for k in n if k.endswith(".tp")}):
            total = n[f"{name}.pred"] + n[f"{name}.ref"]
            out[name] = {
                "cloud_dice": 2 * n[f"{name}.tp"] / total if total else math.nan,
                "shadow_recall": ratio(f"{name}.shadow_found", f"{name}.shadow_ref"),
            }
        if "sen2cor.known" in n:
            out["sen2cor"]["three_class_agreement"] = ratio("sen2cor.same", "sen2cor.known")
            out["sen2cor"]["cloud_found"] = ratio("sen2cor.tp", "sen2cor.ref")
        if "both_clear" in n:
            out["both_teachers_clear"] = {
                "pixels": n["both_clear"],
                "stay_clear": ratio("both_clear.kept", "both_clear"),
                "become_shadow": ratio("both_clear.shadow", "both_clear"),
            }
        return out
