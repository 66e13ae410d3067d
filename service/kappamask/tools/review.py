"""What to label next (the paper's active learning, §2 and Figure 1): the served model runs
over products, and their 512 px sub-tiles are ranked by how unsure it is, so that people
label where the model is weakest.

Unsure is measured over the pixels with data of each sub-tile, from the four class scores
the served graph returns (``scores``, each class's output x 255):

- the **top-2 margin**: the best class's score minus the runner-up's. A small margin is a
  pixel the model nearly decided otherwise; the ranking score is ``1 - mean margin``;
- the share of **low-confidence** pixels (best score under ``LOW_CONFIDENCE``).

The sub-tiles are the output grid's 512 px crops without overlap (the paper's sub-tiles;
at the edges, what lies inside the raster). Each ranked sub-tile gets the band stack the
model saw (a float32 GeoTIFF, one band per feature, named), the model's classes (a
GeoTIFF in mask codes: the pre-annotation a labeller corrects), a true-colour PNG and the
mask over it (the paper's half-transparent overlay); ``index.json`` ranks them and
``index.html`` is a contact sheet to scroll.
"""

from __future__ import annotations

import html
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import rasterio
from rasterio.windows import Window
from rasterio.windows import transform as window_transform

from kappamask.access import AccessPolicy
from kappamask.bands import CLASS_NAMES, DN_SCALE, TILE_SIZE, MaskClass
from kappamask.errors import InvalidInputError
from kappamask.inference.model_spec import SCORE_CLASSES, ModelSpec
from kappamask.inference.triton import TritonClient
from kappamask.options import RunOptions
from kappamask.pipeline import Plan, plan
from kappamask.sources import ProductRef

if TYPE_CHECKING:  # the scene review's modules need the tools extra (h5py, ONNX Runtime)
    from kappamask.tools.importance import OnnxClassifier
    from kappamask.tools.realdata import Imagery
from kappamask.writers.preview import TRUE_COLOUR_GAIN, render, write_png

LOGGER = logging.getLogger(__name__)
#: A pixel whose best class scores under this (of 1) is a low-confidence pixel.
LOW_CONFIDENCE = 0.6
#: Sub-tiles with less data than this share are not worth a labeller's time.
MIN_DATA_SHARE = 0.05
#: Progress: (percent, message), as the pipeline reports it.
ProgressFn = Callable[[int, str], None]


@dataclass(frozen=True)
class SubTile:
    """One ranked sub-tile: where it is, how unsure the model is, and its files."""

    product_id: str
    row: int
    col: int
    #: The sub-tile in the output grid: (col_off, row_off, width, height).
    window: tuple[int, int, int, int]
    crs: str
    resolution: float
    unsure: float  # 1 - mean top-2 margin over the pixels with data
    margin: float
    low_confidence: float
    data_share: float
    classes: dict[str, float]  # share of the pixels with data per class
    files: dict[str, str]
    #: Share of the pixels the teachers label whose class the model answers otherwise
    #: (scene reviews where the teachers are installed; None elsewhere).
    disagreement: float | None = None

    @property
    def name(self) -> str:
        return f"{self.product_id}_r{self.row:02d}_c{self.col:02d}"


def uncertainty(scores: np.ndarray, valid: np.ndarray) -> tuple[float, float, float]:
    """(1 - mean top-2 margin, mean margin, low-confidence share) of class scores
    [4, h, w] (0-255) over the ``valid`` pixels."""
    if not valid.any():
        return 0.0, 1.0, 0.0
    top = np.sort(scores[:, valid].astype(np.float32) / 255.0, axis=0)
    margin = top[-1] - top[-2]
    return (
        float(1.0 - margin.mean()),
        float(margin.mean()),
        float((top[-1] < LOW_CONFIDENCE).mean()),
    )


def true_colour(features: np.ndarray, names: Sequence[str], max_v: Sequence[float]) -> np.ndarray:
    """RGB uint8 [3, h, w] of a sub-tile's features (B04, B03, B02 as the model saw them)."""
    planes = []
    for band in ("B04", "B03", "B02"):
        i = list(names).index(band)
        reflectance = features[i].astype(np.float32) * max_v[i] * DN_SCALE / 10000.0
        planes.append(np.clip(reflectance * TRUE_COLOUR_GAIN * 255, 0, 255))
    rgb: np.ndarray = np.stack(planes).astype(np.uint8)
    return rgb


def band_tags(model: ModelSpec) -> dict[str, str]:
    """What a sub-tile's band stack says of the model that saw it."""
    return {
        "level": model.level,
        "max_v": ",".join(repr(float(v)) for v in model.max_v),
        "model": f"{model.name} {model.version_label}",
        "onnx_sha256": model.sha256,
    }


def _padded(features: np.ndarray) -> np.ndarray:
    """A sub-tile cut by the raster's edge, mirrored out to the model's 512 px."""
    _c, h, w = features.shape
    if (h, w) == (TILE_SIZE, TILE_SIZE):
        return features
    padded: np.ndarray = np.pad(
        features, ((0, 0), (0, TILE_SIZE - h), (0, TILE_SIZE - w)), mode="symmetric"
    )
    return padded


def _write_tile(
    folder: Path,
    name: str,
    features: np.ndarray,
    classes: np.ndarray,
    rgb: np.ndarray,
    profile: dict[str, Any],
    model: ModelSpec,
) -> dict[str, str]:
    """The sub-tile's files in ``folder``; their names relative to the review folder. The
    band stack names its features and carries the model's level, max_v and digest as
    tags: fine-tuning checks that its parent reads the same inputs."""
    folder.mkdir(parents=True, exist_ok=True)
    files = {
        "bands": f"{name}_bands.tif",
        "mask": f"{name}_mask.tif",
        "rgb": f"{name}_rgb.png",
        "overlay": f"{name}_overlay.png",
    }
    with rasterio.open(
        folder / files["bands"],
        "w",
        **profile,
        count=len(model.features),
        dtype="float32",
        compress="deflate",
    ) as dst:
        dst.write(features.astype(np.float32))
        dst.descriptions = tuple(model.features)
        dst.update_tags(**band_tags(model))
    with rasterio.open(
        folder / files["mask"],
        "w",
        **profile,
        count=1,
        dtype="uint8",
        compress="deflate",
        nodata=int(MaskClass.MISSING),
    ) as dst:
        dst.write(classes[None])
    write_png(
        np.concatenate([rgb, np.full((1, *rgb.shape[1:]), 255, np.uint8)]), folder / files["rgb"]
    )
    write_png(render(classes, rgb), folder / files["overlay"])
    return {k: f"{folder.name}/{v}" for k, v in files.items()}


@dataclass(frozen=True)
class _Read:
    """One sub-tile as read and answered."""

    row: int
    col: int
    window: Window
    features: np.ndarray
    valid: np.ndarray
    classes: np.ndarray
    scores: np.ndarray


def _read_sub_tiles(
    planned: Plan,
    client: TritonClient,
    options: RunOptions,
    wanted: set[tuple[int, int]] | None = None,
    progress: ProgressFn | None = None,
) -> Iterator[_Read]:
    """The product's sub-tiles with data (or the ``wanted`` (row, col) ones), read as the
    model sees them and answered by it."""
    model, grid = planned.model, planned.grid
    crops = [c for c in planned.crops if wanted is None or (c.row, c.col) in wanted]
    with planned.reader(options.resampling) as reader:
        for number, crop in enumerate(crops, 1):
            if progress:
                progress(100 * number // len(crops), f"sub-tile {number}/{len(crops)}")
            top, bottom = crop.y.clip(grid.height)
            left, right = crop.x.clip(grid.width)
            if bottom <= top or right <= left:
                continue
            window = Window(left, top, right - left, bottom - top)
            features, valid = reader.read(window)
            if valid.mean() < MIN_DATA_SHARE:
                continue
            outputs = client.submit(model.name, _padded(features)).result()
            h, w = bottom - top, right - left
            classes = outputs.classes[:h, :w].copy()
            classes[~valid] = MaskClass.MISSING
            yield _Read(
                crop.row, crop.col, window, features, valid, classes, outputs.scores[:, :h, :w]
            )


def score_product(
    planned: Plan, client: TritonClient, options: RunOptions, progress: ProgressFn | None = None
) -> list[SubTile]:
    """Every sub-tile of one product with data, scored (no files yet)."""
    grid, product_id = planned.grid, planned.product.product_id
    return [
        _scored(product_id, read, str(grid.crs), grid.resolution)
        for read in _read_sub_tiles(planned, client, options, progress=progress)
    ]


def _scored(
    product_id: str,
    read: _Read,
    crs: str,
    resolution: float,
    teachers: np.ndarray | None = None,
) -> SubTile:
    """A read sub-tile's scores; ``teachers``: their labels of it, for the disagreement."""
    unsure, margin, low = uncertainty(read.scores, read.valid)
    data = read.classes[read.valid]
    shares = {CLASS_NAMES[c]: float((data == c).mean()) for c in SCORE_CLASSES}
    disagreement = None
    if teachers is not None:
        known = read.valid & ~np.isin(teachers, (MaskClass.UNDEFINED, MaskClass.MISSING))
        disagreement = float((read.classes != teachers)[known].mean()) if known.any() else 0.0
    w = read.window
    return SubTile(
        product_id,
        read.row,
        read.col,
        (int(w.col_off), int(w.row_off), int(w.width), int(w.height)),
        crs,
        resolution,
        unsure,
        margin,
        low,
        float(read.valid.mean()),
        shares,
        {},
        disagreement,
    )


def write_sub_tiles(
    planned: Plan,
    tiles: Sequence[SubTile],
    out: Path,
    client: TritonClient,
    options: RunOptions,
) -> list[SubTile]:
    """``tiles`` (of this product) with their files written under ``out/tiles``."""
    by_place = {(t.row, t.col): t for t in tiles}
    reads = _read_sub_tiles(planned, client, options, set(by_place))
    return [
        _written(
            by_place[(r.row, r.col)],
            r,
            out,
            planned.model,
            planned.grid.crs,
            planned.grid.transform,
        )
        for r in reads
    ]


def _written(
    tile: SubTile, read: _Read, out: Path, model: ModelSpec, crs: Any, transform: Any
) -> SubTile:
    """``tile`` with its files written under ``out/tiles`` (``crs`` and ``transform``: of
    the raster the sub-tile was cut from)."""
    profile = {
        "driver": "GTiff",
        "width": int(read.window.width),
        "height": int(read.window.height),
        "crs": crs,
        "transform": window_transform(read.window, transform),
    }
    rgb = true_colour(read.features, model.features, model.max_v)
    rgb[:, ~read.valid] = 0
    files = _write_tile(out / "tiles", tile.name, read.features, read.classes, rgb, profile, model)
    return replace(tile, files=files)


#: What a review may rank by: the model's own uncertainty, or its disagreement with the
#: teachers (scene reviews).
RANK_BY = ("unsure", "disagreement")


def rank(tiles: Sequence[SubTile], by: str = "unsure") -> list[SubTile]:
    """Most unsure (or most at odds with the teachers) first; then more low-confidence
    pixels, then more data."""
    if by == "disagreement":
        if any(t.disagreement is None for t in tiles):
            raise InvalidInputError("ranking by disagreement needs the teachers' labels")
        return sorted(tiles, key=lambda t: (-(t.disagreement or 0.0), -t.unsure, t.name))
    return sorted(tiles, key=lambda t: (-t.unsure, -t.low_confidence, -t.data_share, t.name))


def write_index(ranked: Sequence[SubTile], out: Path, model: str) -> tuple[Path, Path]:
    """``index.json`` (the ranking, with every score and file) and ``index.html`` (the
    contact sheet: true colour and mask side by side, most unsure first)."""
    entries = [{"rank": i, "name": t.name, **asdict(t)} for i, t in enumerate(ranked, 1)]
    index = out / "index.json"
    index.write_text(
        json.dumps(
            {"model": model, "low_confidence_below": LOW_CONFIDENCE, "sub_tiles": entries}, indent=2
        )
    )
    cards = []
    for e in entries:
        shares = ", ".join(f"{k} {100 * v:.0f} %" for k, v in e["classes"].items() if v > 0)
        cards.append(
            f'<figure><a href="{e["files"]["overlay"]}"><img src="{e["files"]["rgb"]}" '
            f'alt="true colour"><img src="{e["files"]["overlay"]}" alt="mask"></a>'
            f"<figcaption>#{e['rank']} {html.escape(e['name'])}<br>unsure {e['unsure']:.3f}, "
            f"low confidence {100 * e['low_confidence']:.0f} %, data "
            f"{100 * e['data_share']:.0f} %"
            + (
                ""
                if e["disagreement"] is None
                else f", teachers disagree {100 * e['disagreement']:.0f} %"
            )
            + f"<br>{html.escape(shares)}</figcaption></figure>"
        )
    sheet = out / "index.html"
    sheet.write_text(
        "<!doctype html><meta charset=utf-8><title>Sub-tiles to label</title><style>"
        "body{font-family:sans-serif}figure{display:inline-block;margin:6px;"
        "vertical-align:top;width:520px}img{width:256px;margin-right:4px}"
        "figcaption{word-break:break-all}</style>"
        f"<h1>Sub-tiles to label, most unsure first ({html.escape(model)})</h1>" + "".join(cards)
    )
    return index, sheet


def review(
    products: Sequence[ProductRef],
    out: Path,
    client: TritonClient,
    options: RunOptions,
    top: int | None = None,
    progress: ProgressFn | None = None,
    policy: AccessPolicy | None = None,
) -> list[SubTile]:
    """Score every sub-tile of ``products``, keep the ``top`` most unsure, write their
    files (only theirs: a whole tile at 10 m has 484 sub-tiles) and the index. The
    ranking, most unsure first."""
    policy = policy or AccessPolicy.unrestricted()
    plans = [plan(p, client, options, policy, 0) for p in products]  # non-overlapping crops
    tiles: list[SubTile] = []
    for index, planned in enumerate(plans):

        def overall(percent: int, message: str, index: int = index) -> None:
            if progress:
                progress((100 * index + percent) // len(plans), f"scoring: {message}")

        tiles.extend(score_product(planned, client, options, overall))
    ranked = rank(tiles)[:top]
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, SubTile] = {}
    for planned in plans:
        mine = [t for t in ranked if t.product_id == planned.product.product_id]
        if mine:
            written.update(
                (t.name, t) for t in write_sub_tiles(planned, mine, out, client, options)
            )
    kept = [written[t.name] for t in ranked if t.name in written]
    models = sorted({f"{p.model.name} {p.model.version_label}" for p in plans})
    write_index(kept, out, ", ".join(models))
    return kept


def _scene_sub_tiles(
    img: Imagery, classify: OnnxClassifier, wanted: set[tuple[int, int]] | None = None
) -> Iterator[_Read]:
    """A scene's 512 px sub-tiles with data (or the ``wanted`` ones), as the model reads
    them (``realdata.features``) and answers them."""
    from kappamask.tools import realdata

    spec = classify.spec
    features = realdata.features(img, spec.level, spec.features, spec.max_v)
    height, width = img.shape
    for row, top in enumerate(range(0, height, TILE_SIZE)):
        for col, left in enumerate(range(0, width, TILE_SIZE)):
            if wanted is not None and (row, col) not in wanted:
                continue
            h, w = min(TILE_SIZE, height - top), min(TILE_SIZE, width - left)
            valid = img.valid[top : top + h, left : left + w]
            if valid.mean() < MIN_DATA_SHARE:
                continue
            part = features[:, top : top + h, left : left + w]
            classes, scores = classify.crop_outputs(_padded(part))
            classes = classes[:h, :w].copy()
            classes[~valid] = MaskClass.MISSING
            yield _Read(row, col, Window(left, top, w, h), part, valid, classes, scores[:, :h, :w])


def _teacher_labels(img: Imagery, level: str) -> np.ndarray | None:
    """The teachers' fused labels of a scene (``realdata.teacher_labels``); None where
    they are not installed (the ``compare`` extra) or cannot label it."""
    from kappamask.tools import realdata

    try:
        return realdata.teacher_labels(img, level)[0]
    except ImportError as err:
        LOGGER.warning("%s: no teachers' disagreement (%s)", img.name, err)
    except InvalidInputError as err:
        LOGGER.warning("%s: no teachers' disagreement: %s", img.name, err)
    return None


def review_scenes(
    scenes: Callable[[], Iterator[Imagery]],
    classify: OnnxClassifier,
    out: Path,
    top: int | None = None,
    by: str = "unsure",
    progress: ProgressFn | None = None,
) -> list[SubTile]:
    """``review`` for real scenes that are not products (SEN12MS-CR patches, a band
    folder), with the model's ONNX file instead of Triton, and the teachers'
    disagreement where they can label the scene. ``scenes`` is called twice (score, then
    write the kept ones): the scenes are read again rather than all held in memory."""
    spec = classify.spec
    tiles: list[SubTile] = []
    for number, img in enumerate(scenes(), 1):
        if img.crs is None:
            raise InvalidInputError(f"{img.name} is not georeferenced: its labels could not be")
        if progress:
            progress(min(99, number), f"scoring {img.name}")
        teachers = _teacher_labels(img, spec.level)
        for read in _scene_sub_tiles(img, classify):
            part = (
                None
                if teachers is None
                else teachers[
                    int(read.window.row_off) : int(read.window.row_off + read.window.height),
                    int(read.window.col_off) : int(read.window.col_off + read.window.width),
                ]
            )
            tiles.append(_scored(img.name, read, str(img.crs), img.resolution, part))
    ranked = rank(tiles, by)[:top]
    out.mkdir(parents=True, exist_ok=True)
    keep = {(t.product_id, t.row, t.col): t for t in ranked}
    written: dict[str, SubTile] = {}
    for img in scenes():
        wanted = {(r, c) for p, r, c in keep if p == img.name}
        for read in _scene_sub_tiles(img, classify, wanted) if wanted else ():
            tile = _written(
                keep[(img.name, read.row, read.col)], read, out, spec, img.crs, img.transform
            )
            written[tile.name] = tile
    kept = [written[t.name] for t in ranked if t.name in written]
    write_index(kept, out, f"{spec.name} {spec.version_label}")
    return kept
