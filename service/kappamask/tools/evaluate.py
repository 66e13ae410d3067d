"""`kappamask evaluate`: agreement of predicted masks with reference masks, in the layout
of the paper's Tables 2-5 / Figure 8 (four classes) and Tables 6-9 (clear vs cloud),
with optional comparison columns: Sen2Cor's SCL of an L2A product (Table 1 mapping) and
s2cloudless (L1C, its mask at the reference grid)."""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from rasterio.windows import Window

from kappamask.bands import CLASS_COLORS, CLASS_NAMES, MaskClass
from kappamask.errors import InvalidInputError, ProductError
from kappamask.geometry.grid import Grid
from kappamask.geometry.tiling import CropGrid
from kappamask.reading.gdal import GDAL_ENV
from kappamask.reading.reader import BandReader
from kappamask.sources import open_safe
from kappamask.tools.metrics import (
    CLASSES,
    TWO_CLASS,
    TrustCounts,
    agreement,
    seams,
    without_nan,
)
from kappamask.tools.teachers import S2CLOUDLESS_BANDS

LOGGER = logging.getLogger(__name__)

#: s2cloudless: the threshold its authors recommend (with averaging over 4 px, dilation 2 px).
S2CLOUDLESS_THRESHOLD = 0.4


def _grid_of(path: Path) -> tuple[Grid, np.ndarray]:
    with rasterio.Env(**GDAL_ENV), rasterio.open(path) as src:
        grid = Grid(src.crs.to_string() if src.crs else "", src.transform, src.width, src.height)
        return grid, src.read(1)


def read_pair(pred: Path, ref: Path) -> tuple[np.ndarray, np.ndarray, Grid]:
    """A prediction and its reference, which must share a grid."""
    grid_p, p = _grid_of(pred)
    grid_r, r = _grid_of(ref)
    if (grid_p.width, grid_p.height) != (grid_r.width, grid_r.height) or not np.allclose(
        tuple(grid_p.transform)[:6], tuple(grid_r.transform)[:6]
    ):
        raise InvalidInputError(
            f"{pred.name} ({grid_p.width}x{grid_p.height}) and {ref.name} "
            f"({grid_r.width}x{grid_r.height}) are not on the same grid"
        )
    return p, r, grid_r


def scl_on_grid(product_path: Path, grid: Grid) -> np.ndarray:
    """Sen2Cor's SCL of an L2A product on ``grid``, as mask codes (paper, Table 1)."""
    from kappamask.tools.labels import read_scl_labels

    return read_scl_labels(open_safe(product_path), grid)


def reflectance_on_grid(
    product_path: Path, bands: Sequence[str], grid: Grid
) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Reflectances (offsets applied) of ``bands`` of a product on ``grid``, and validity."""
    product = open_safe(product_path)
    with BandReader(product, bands, [1.0] * len(bands), grid) as reader:
        values, valid = reader.read(Window(0, 0, grid.width, grid.height))
    scale = 65535.0 / product.quantification  # the reader's DN / 65535 back to reflectance
    return {b: values[i] * scale for i, b in enumerate(bands)}, valid


def _teacher_import(module: str) -> None:
    try:
        __import__(module)
    except ImportError as err:
        raise InvalidInputError(
            f"this comparison needs the PyPI package {module.replace('_', '-')}: "
            'pip install -e ".[compare]"'
        ) from err


def s2cloudless_on_grid(product_path: Path, grid: Grid) -> np.ndarray:
    """s2cloudless' cloud mask of an L1C product on ``grid``: CLOUD or CLEAR (its authors'
    threshold 0.4, averaging over 4 px and dilation by 2 px)."""
    _teacher_import("s2cloudless")
    from s2cloudless.cloud_detector import S2PixelCloudDetector

    if open_safe(product_path).level != "L1C":
        raise ProductError("s2cloudless works on L1C products only")
    reflectance, valid = reflectance_on_grid(product_path, S2CLOUDLESS_BANDS, grid)
    stack = np.stack([reflectance[b] for b in S2CLOUDLESS_BANDS], axis=-1)
    detector = S2PixelCloudDetector(
        threshold=S2CLOUDLESS_THRESHOLD, average_over=4, dilation_size=2, all_bands=False
    )
    mask = detector.get_cloud_masks(stack[None])[0]
    out = np.where(mask > 0, MaskClass.CLOUD, MaskClass.CLEAR).astype(np.uint8)
    out[~valid] = MaskClass.MISSING
    return out


def ukis_on_grid(product_path: Path, grid: Grid) -> np.ndarray:
    """ukis-csmask's clear / cloud / shadow of a product on ``grid`` (its model of the
    product's level), as mask codes."""
    _teacher_import("ukis_csmask")
    from kappamask.tools import teachers

    level = open_safe(product_path).level
    reflectance, valid = reflectance_on_grid(product_path, list(teachers.UKIS_BANDS), grid)
    classes = teachers.ukis_classes(reflectance, level, grid.resolution)
    return teachers.ukis_as_mask(classes, valid)


def true_colour(product_path: Path, grid: Grid) -> np.ndarray:
    """An 8-bit true-colour picture [H, W, 3] of a product on ``grid`` (reflectance 0..0.3)."""
    reflectance, valid = reflectance_on_grid(product_path, ("B04", "B03", "B02"), grid)
    rgb = np.stack([reflectance[b] for b in ("B04", "B03", "B02")], axis=-1)
    out: np.ndarray = np.clip(rgb / 0.3 * 255.0, 0, 255).astype(np.uint8)
    out[~valid] = 0
    return out


def side_by_side(
    product_path: Path, mask_path: Path, name: str = "kappamask"
) -> tuple[dict[str, Any], dict[str, np.ndarray], np.ndarray]:
    """One product: this project's mask next to every other tool that applies to it
    (s2cloudless on L1C, ukis-csmask on both levels, Sen2Cor's SCL on L2A), on the
    mask's grid. Returns (report, masks by tool, true colour); the report holds every
    pair of tools, per class (the first of a pair as prediction, the second as reference)."""
    from kappamask.tools.labels import SCL_WATER, read_scl, scl_to_mask

    grid, ours = _grid_of(mask_path)
    product = open_safe(product_path)
    level = product.level
    masks: dict[str, np.ndarray] = {name: ours}
    if level == "L1C":
        masks["s2cloudless"] = s2cloudless_on_grid(product_path, grid)
    masks["ukis-csmask"] = ukis_on_grid(product_path, grid)
    scl = read_scl(product, grid) if level == "L2A" else None
    if scl is not None:
        masks["sen2cor"] = scl_to_mask(scl)
    # Dice is symmetric, so each pair once: ours against every tool, then the tools
    # against each other (how far apart the references themselves are).
    tools = list(masks)
    result: dict[str, Any] = {}
    for i, pred in enumerate(tools):
        for ref in tools[i + 1 :]:
            result[f"{pred} vs {ref}"] = agreement(masks[pred], masks[ref])
    trust = TrustCounts()
    trust.add(ours, {k: v for k, v in masks.items() if k != name})
    result["trust"] = trust.report()
    if scl is not None:
        water = scl == SCL_WATER
        kept = float((ours[water] == MaskClass.CLEAR).mean()) if water.any() else math.nan
        result["trust"]["sen2cor_water"] = {"pixels": int(water.sum()), "stay_clear": kept}
    return result, masks, true_colour(product_path, grid)


def plot_side_by_side(
    masks: Mapping[str, np.ndarray], rgb: np.ndarray, path: Path, max_size: int = 800
) -> Path:
    """The true-colour image, then every tool's mask drawn over it (half-transparent
    class colours; clear left see-through), in one row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    step = max(1, -(-max(rgb.shape[:2]) // max_size))
    base = rgb[::step, ::step].astype(np.float32) / 255.0
    colours = np.zeros((256, 4), np.float32)
    for code, rgba in CLASS_COLORS.items():
        colours[code] = np.asarray(rgba, np.float32) / 255.0
    colours[MaskClass.CLEAR, 3] = 0.0
    colours[[MaskClass.CLOUD_SHADOW, MaskClass.SEMI_TRANSPARENT_CLOUD, MaskClass.CLOUD], 3] = 0.6
    fig, axes = plt.subplots(1, len(masks) + 1, figsize=(4 * (len(masks) + 1), 4.4), squeeze=False)
    axes[0][0].imshow(base)
    axes[0][0].set_title("true colour")
    for ax, (tool, mask) in zip(axes[0][1:], masks.items(), strict=True):
        over = colours[mask[::step, ::step]]
        alpha = over[..., 3:4]
        ax.imshow(base * (1 - alpha) + over[..., :3] * alpha)
        ax.set_title(tool)
    for ax in axes[0]:
        ax.axis("off")
    from matplotlib.patches import Rectangle

    legend = [Rectangle((0, 0), 1, 1, color=colours[c][:3]) for c in CLASSES[1:]]
    fig.legend(legend, [CLASS_NAMES[c] for c in CLASSES[1:]], loc="lower center", ncol=3)
    fig.tight_layout(rect=(0, 0.06, 1, 0.96))
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def predict_kappaset(
    folder: Path, model_path: Path, level: str | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Run an ONNX model (the served format) over every sub-tile of a KappaSet-style
    folder: (predictions, labels), flattened."""
    import onnxruntime as ort

    from kappamask.inference.repository import spec_from_onnx
    from kappamask.tools.datasets import KappaSetSource

    spec = spec_from_onnx(model_path, level)
    source = KappaSetSource(folder, spec.features, spec.max_v, 0.0, 0)
    session = ort.InferenceSession(str(model_path), providers=["CPUExecutionProvider"])
    preds, refs = [], []
    for path in source.train_part:
        features, labels = source.read(path)
        _c, h, w = features.shape
        padded = np.pad(features, ((0, 0), (0, -h % 16), (0, -w % 16)))[None]
        classes = session.run(["classes"], {"input": padded})[0][0, :h, :w]
        preds.append(classes.ravel())
        refs.append(labels.ravel())
    return np.concatenate(preds), np.concatenate(refs)


def report(columns: Mapping[str, tuple[np.ndarray, np.ndarray]]) -> dict[str, Any]:
    """Agreement of every column (name -> (prediction, reference))."""
    return {name: agreement(pred, ref) for name, (pred, ref) in columns.items()}


def _pct(value: float | None) -> str:
    return "   -  " if value is None or math.isnan(value) else f"{100 * value:6.2f}"


def format_table(result: Mapping[str, Any]) -> str:
    """The terminal table: one column per tool, dice / precision / recall per class,
    overall accuracy; the confusion matrices; then the two-class view."""
    names = [n for n in result if isinstance(result[n], dict) and "classes" in result[n]]
    width = max(12, *(len(n) + 2 for n in names))
    lines = ["Four classes (UNDEFINED and MISSING reference pixels excluded), %"]
    header = f"{'class':<26}{'metric':<11}" + "".join(f"{n:>{width}}" for n in names)
    lines.append(header)
    for view, classes in (("classes", [CLASS_NAMES[c] for c in CLASSES]), ("two", TWO_CLASS)):
        if view == "two":
            lines += ["", "Clear (clear + shadow) vs cloud (semi-transparent + cloud), %", header]
        for class_name in classes:
            for metric in ("dice", "precision", "recall"):
                cells = []
                for n in names:
                    block = result[n] if view == "classes" else result[n]["two_class"]
                    cells.append(f"{_pct(block['classes'][class_name][metric]):>{width}}")
                lines.append(f"{class_name:<26}{metric:<11}" + "".join(cells))
        cells = []
        for n in names:
            block = result[n] if view == "classes" else result[n]["two_class"]
            cells.append(f"{_pct(block['overall_accuracy']):>{width}}")
        lines.append(f"{'overall accuracy':<37}" + "".join(cells))
    for n in names:
        lines += ["", f"Confusion matrix, {n} (rows reference, columns predicted; pixels)"]
        cols = ["missing", *(CLASS_NAMES[c] for c in CLASSES)]
        lines.append(f"{'':<24}" + "".join(f"{c:>24}" for c in cols))
        for code, row in zip(CLASSES, result[n]["confusion"], strict=True):
            lines.append(f"{CLASS_NAMES[code]:<24}" + "".join(f"{v:>24}" for v in row))
    if "trust" in result:
        lines += [
            "",
            "What a user sees (metrics.TrustCounts)",
            json.dumps(without_nan(result["trust"]), indent=2),
        ]
    return "\n".join(lines)


def plot_confusion(result: Mapping[str, Any], path: Path) -> Path:
    """Row-normalised confusion matrices (Figure 8 style), one panel per column."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(result)
    fig, axes = plt.subplots(1, len(names), figsize=(4.6 * len(names), 4.2), squeeze=False)
    labels = ["clear", "shadow", "semi-transp.", "cloud"]
    for ax, name in zip(axes[0], names, strict=True):
        m = np.asarray(result[name]["confusion"], np.float64)[:, 1:]
        rows = m.sum(axis=1, keepdims=True)
        norm = np.divide(m, rows, out=np.zeros_like(m), where=rows > 0)
        ax.imshow(norm, vmin=0, vmax=1, cmap="Blues")
        for i in range(4):
            for j in range(4):
                ax.text(
                    j,
                    i,
                    f"{100 * norm[i, j]:.1f}",
                    ha="center",
                    va="center",
                    color="white" if norm[i, j] > 0.5 else "black",
                    fontsize=9,
                )
        ax.set_xticks(range(4), labels, rotation=30)
        ax.set_yticks(range(4), labels)
        ax.set_xlabel("predicted")
        ax.set_ylabel("reference")
        ax.set_title(f"{name} (OA {_pct(result[name]['overall_accuracy']).strip()} %)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def evaluate(
    predictions: Sequence[Path],
    references: Sequence[Path],
    scl_products: Sequence[Path] = (),
    s2cloudless_products: Sequence[Path] = (),
    name: str = "kappamask",
) -> dict[str, Any]:
    """Compare prediction GeoTIFFs with reference GeoTIFFs (pairwise, same grids); the
    optional products (one per pair) add the SCL and s2cloudless columns."""
    if len(predictions) != len(references) or not predictions:
        raise InvalidInputError("give one reference per prediction")
    for extra, what in ((scl_products, "SCL"), (s2cloudless_products, "s2cloudless")):
        if extra and len(extra) != len(references):
            raise InvalidInputError(f"give one {what} product per reference")
    columns: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {name: []}
    for i, (pred_path, ref_path) in enumerate(zip(predictions, references, strict=True)):
        pred, ref, grid = read_pair(Path(pred_path), Path(ref_path))
        columns[name].append((pred, ref))
        if scl_products:
            columns.setdefault("sen2cor", []).append((scl_on_grid(scl_products[i], grid), ref))
        if s2cloudless_products:
            columns.setdefault("s2cloudless", []).append(
                (s2cloudless_on_grid(s2cloudless_products[i], grid), ref)
            )
    return report(
        {
            key: (
                np.concatenate([p.ravel() for p, _r in pairs]),
                np.concatenate([r.ravel() for _p, r in pairs]),
            )
            for key, pairs in columns.items()
        }
    )


def seam_report(mask_path: Path) -> dict[str, Any]:
    """``metrics.seams`` of a mask GeoTIFF at the boundaries of the service's crop grid
    on it: where crops begin and end, and the middles of their overlaps (where a cut mosaic
    switched from one crop to the next)."""
    _grid, classes = _grid_of(mask_path)
    crops = CropGrid(classes.shape[0], classes.shape[1])
    rows, cols = crops.boundaries()
    half = crops.overlap // 2
    rows += [s.start + half for s in crops.rows[1:]]
    cols += [s.start + half for s in crops.cols[1:]]
    return seams(classes, sorted(set(rows)), sorted(set(cols)))


def format_seams(result: Mapping[str, Any]) -> str:
    """The seam report as a terminal table."""
    lines = [f"{'':<10}{'median change':>15}{'worst (at)':>18}{'worst at crops':>16}{'outer':>16}"]
    for axis, r in result.items():
        outer = " / ".join(f"{v:.2f}" for v in r["outer_ratios"])
        lines.append(
            f"{axis:<10}{100 * r['median_change_rate']:>14.3f}%"
            f"{r['worst_ratio']:>10.2f} ({r['worst_boundary']:>5})"
            f"{r['worst_crop_ratio']:>16.2f}{outer:>16}"
        )
    return "\n".join(lines)


def write_json(result: Mapping[str, Any], path: Path) -> Path:
    """The report as JSON."""
    path.write_text(json.dumps(without_nan(dict(result)), indent=2))
    return path
