"""Permutation feature importance as the paper measured it (§3.3, Figure 11): every input
feature of a served model is zeroed in turn at inference, and the per-class error
(1 - dice) over labelled scenes says how much the model leans on that feature.

Any served ONNX file works (U-Net or DeepLabv3+, either level): the scenes' features are
brought to the model's own feature list and max_v (``adapt``), and the model runs
through ONNX Runtime on 512 px crops, as the service feeds it. The labels say where they
come from: people's (KappaSet-style NetCDF, or what `kappamask review` pulled back from a
labelling tool) or, where none exist, the teachers' fused labels of `kappamask distill`.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from kappamask.bands import CLASS_NAMES, DEFAULT_FEATURES, DEFAULT_MAX_V, TILE_SIZE
from kappamask.errors import InvalidInputError
from kappamask.inference.model_spec import INPUT, OUTPUT_CLASSES, OUTPUT_SCORES
from kappamask.model.onnx_graph import add_missing_outputs
from kappamask.tools.metrics import CLASSES, confusion_matrix, scores

#: Where the labels of a report come from.
HUMAN_LABELS = "human labels"
TEACHER_LABELS = "teachers' fused labels (no human labels: s2cloudless, ukis-csmask, B10, SCL)"


@dataclass(frozen=True)
class LabelledTile:
    """A scene's model features [C, H, W] (in ``names`` order, normalised by ``max_v``) and
    its labels [H, W] in mask codes."""

    name: str
    features: np.ndarray
    labels: np.ndarray
    names: tuple[str, ...]
    max_v: tuple[float, ...]


def adapt(tile: LabelledTile, names: Sequence[str], max_v: Sequence[float]) -> np.ndarray:
    """``tile``'s features as a model of ``names`` and ``max_v`` takes them."""
    missing = [n for n in names if n not in tile.names]
    if missing:
        raise InvalidInputError(f"{tile.name} has no {', '.join(missing)} for this model")
    index = {n: i for i, n in enumerate(tile.names)}
    planes = [
        tile.features[index[n]] * (tile.max_v[index[n]] / mv)
        for n, mv in zip(names, max_v, strict=True)
    ]
    stacked: np.ndarray = np.stack(planes).astype(np.float32)
    return stacked


def cached_tiles(folder: Path, level: str, only: Sequence[str] = ()) -> Iterator[LabelledTile]:
    """The scenes of a `kappamask distill` label cache for ``level`` (teachers' labels),
    those whose name or acquisition group holds one of ``only`` when given (as
    ``--holdout`` picks them)."""
    from kappamask.tools.distill import held_out, load_scene

    paths = sorted(folder.glob(f"{level}_*.npz"))
    if not paths:
        raise InvalidInputError(f"{folder} holds no {level} scenes of a distill label cache")
    for path in paths:
        scene = load_scene(path)
        if only and not held_out(scene.name, scene.group, only):
            continue
        yield LabelledTile(
            scene.name,
            scene.features,
            scene.labels,
            tuple(DEFAULT_FEATURES[level]),
            tuple(DEFAULT_MAX_V[level]),
        )


def kappaset_tiles(folder: Path, spec: Any) -> Iterator[LabelledTile]:
    """The sub-tiles of a KappaSet-style folder (human labels), in ``spec``'s features."""
    from kappamask.tools.datasets import KappaSetSource

    source = KappaSetSource(folder, spec.features, spec.max_v, 0.0, 0)
    for path in source.train_part:
        features, labels = source.read(path)
        yield LabelledTile(
            Path(path).stem, features, labels, tuple(spec.features), tuple(spec.max_v)
        )


class OnnxClassifier:
    """A served ONNX model's classes of a scene, crop by crop (512 px, zero-padded)."""

    def __init__(self, model_path: Path, level: str | None = None) -> None:
        import onnxruntime as ort

        from kappamask.inference.repository import spec_from_onnx

        self.spec = spec_from_onnx(model_path, level)
        # a file exported before the scores output existed gains it here, as on install
        model = onnx.load(str(model_path))
        add_missing_outputs(model)
        self.session = ort.InferenceSession(
            model.SerializeToString(), providers=["CPUExecutionProvider"]
        )

    def crop_outputs(self, crop: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(classes [512, 512], class scores [4, 512, 512]) of one 512 px crop."""
        classes, scores = self.session.run([OUTPUT_CLASSES, OUTPUT_SCORES], {INPUT: crop[None]})
        return classes[0], scores[0]

    def __call__(self, features: np.ndarray) -> np.ndarray:
        _c, h, w = features.shape
        classes = np.zeros((h, w), np.uint8)
        for row in range(0, h, TILE_SIZE):
            for col in range(0, w, TILE_SIZE):
                part = features[:, row : row + TILE_SIZE, col : col + TILE_SIZE]
                ph, pw = part.shape[1:]
                crop = np.pad(part, ((0, 0), (0, TILE_SIZE - ph), (0, TILE_SIZE - pw)))
                classes[row : row + ph, col : col + pw] = self.crop_outputs(crop)[0][:ph, :pw]
        return classes


def _errors(matrix: np.ndarray) -> dict[str, float]:
    """1 - dice per class (NaN where the class is absent from labels and prediction)."""
    per_class = scores(matrix)["classes"]
    out = {CLASS_NAMES[c]: 1.0 - float(per_class[CLASS_NAMES[c]]["dice"]) for c in CLASSES}
    return out


def _total(errors: dict[str, float]) -> float:
    return float(np.nansum(list(errors.values())))


def feature_importance(
    tiles: Iterable[LabelledTile], classify: OnnxClassifier, label_source: str
) -> dict[str, Any]:
    """Per-class 1 - dice with every feature, and with each feature zeroed in turn."""
    names, max_v = classify.spec.features, classify.spec.max_v
    base = np.zeros((len(CLASSES), len(CLASSES) + 1), np.int64)
    zeroed = {n: np.zeros_like(base) for n in names}
    count = 0
    for tile in tiles:
        features = adapt(tile, names, max_v)
        base += confusion_matrix(classify(features), tile.labels)
        for i, name in enumerate(names):
            without = features.copy()
            without[i] = 0.0
            zeroed[name] += confusion_matrix(classify(without), tile.labels)
        count += 1
    if count == 0:
        raise InvalidInputError("no labelled scene to measure the features on")
    baseline = _errors(base)
    base_sum = _total(baseline)
    rows: list[dict[str, Any]] = []
    for name in names:
        errors = _errors(zeroed[name])
        rows.append(
            {
                "feature": name,
                "errors": errors,
                "sum": _total(errors),
                "increase": _total(errors) - base_sum,
            }
        )
    rows.sort(key=lambda r: -float(r["sum"]))
    return {
        "model": classify.spec.name,
        "version": classify.spec.version_label,
        "level": classify.spec.level,
        "labels": label_source,
        "scenes": count,
        "pixels": int(base.sum()),
        "baseline": {"errors": baseline, "sum": base_sum},
        "features": rows,
    }


def format_importance(result: dict[str, Any]) -> str:
    """The terminal table, most important feature first."""
    classes = [CLASS_NAMES[c] for c in CLASSES]
    lines = [
        f"Permutation feature importance of {result['model']} {result['version']} "
        f"({result['level']}), each feature zeroed in turn; 1 - dice per class over "
        f"{result['pixels']} labelled pixels of {result['scenes']} scenes",
        f"labels: {result['labels']}",
        f"{'feature':<10}"
        + "".join(f"{c[:14]:>16}" for c in classes)
        + f"{'sum':>10}{'increase':>10}",
    ]

    def row(name: str, errors: dict[str, float], total: float, increase: str) -> str:
        cells = "".join(f"{errors[c]:16.3f}" for c in classes)
        return f"{name:<10}{cells}{total:10.3f}{increase:>10}"

    base = result["baseline"]
    lines.append(row("(none)", base["errors"], base["sum"], ""))
    for r in result["features"]:
        lines.append(row(r["feature"], r["errors"], r["sum"], f"{r['increase']:+.3f}"))
    return "\n".join(lines)


def plot_importance(result: dict[str, Any], path: Path) -> Path:
    """Figure 11's kind of chart: per feature, the four classes' 1 - dice stacked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from kappamask.bands import CLASS_COLORS

    rows = result["features"]
    fig, ax = plt.subplots(figsize=(8, 0.4 * len(rows) + 1.5))
    left = np.zeros(len(rows))
    for cls in CLASSES:
        name = CLASS_NAMES[cls]
        values = np.nan_to_num([r["errors"][name] for r in rows])
        colour = np.array(CLASS_COLORS[cls][:3]) / 255
        ax.barh(
            [r["feature"] for r in rows],
            values,
            left=left,
            label=name,
            color=colour,
            edgecolor="black",
            linewidth=0.5,
        )
        left += values
    ax.axvline(
        result["baseline"]["sum"],
        color="black",
        linestyle="--",
        linewidth=1,
        label="no feature zeroed",
    )
    ax.invert_yaxis()
    ax.set_xlabel("sum of 1 - dice over the four classes (each feature zeroed)")
    ax.set_title(f"{result['model']} {result['version']}: feature importance")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_importance(result: dict[str, Any], path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2, default=float))
    return path
