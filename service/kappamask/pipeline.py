"""source -> reader -> tiler -> Triton -> mosaic -> buffers -> COGs + STAC -> sink, with
progress.

The raster is processed in strips of one crop row, each read in chunks of a few crops:
while Triton works on submitted crops, the next chunk is read and resampled (at most
MAX_IN_FLIGHT crops wait for Triton, so the reader cannot run ahead and pile up strips),
and finished rows of the mosaic are written out and freed. Memory does not grow with
the product's height, and little with its width. Buffers, the usable-pixel mask and the
class counts come from a second pass over the mosaic (kappamask.assembly.postprocess).

Three stages, each a function: ``plan`` (product, model, grid, names: nothing read yet),
``infer`` (strips through Triton into scratch rasters, then the second pass) and
``publish`` (COGs, preview, STAC item, committed to the sink); ``run`` chains them and
returns an identical published result instead when there is one.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from rasterio.windows import Window

from kappamask.access import AccessPolicy
from kappamask.assembly.postprocess import LayerCounts, finish_layers
from kappamask.bands import (
    CLASS_NAMES,
    OUTPUT_CLASSES,
    TILE_OVERLAP,
    VALID_NODATA,
)
from kappamask.errors import CancelledError, ProductError
from kappamask.geometry.grid import Grid, area_mask, clip_grid, output_grid
from kappamask.geometry.tiling import (
    Blender,
    CropGrid,
    block_of,
    cut,
    has_data,
    with_context,
)
from kappamask.inference.model_spec import PROBABILITY_NODATA, ModelSpec
from kappamask.inference.triton import CropOutputs, TritonClient
from kappamask.options import RunOptions
from kappamask.reading.reader import BandReader
from kappamask.sources import ProductRef, open_product
from kappamask.sources.product import Product
from kappamask.storage.sinks import RESULT_FILES, OutputTarget, Sink, output_names
from kappamask.writers.cog import OverviewResampling, StripWriter, scratch_files, to_cog
from kappamask.writers.preview import write_preview
from kappamask.writers.stac_item import class_statistics, create_item, describe_file, read_item

LOGGER = logging.getLogger(__name__)

ProgressFn = Callable[[int, str], None]
CancelledFn = Callable[[], bool]

PROGRESS_START, PROGRESS_INFERENCE_END, PROGRESS_END = 5, 88, 95

#: Crops of a row read together: one read per chunk, not one per strip, bounds memory.
CHUNK_CROPS = 6
#: COGs written at once at the end of a run (four rasters; two cores on a small VM).
COG_THREADS = 2
#: Crops submitted and not yet answered before the reader waits: enough that the requests
#: on the wire always have crops queued behind them while the reader decodes and
#: resamples the next chunk, few enough that the crops held (each keeps part of its chunk
#: alive) stay under about 1 GB. Past about 16, more in flight bought no speed on a full
#: product (benchmarks/full_product.py).
MAX_IN_FLIGHT = 24


@dataclass
class RunResult:
    """Where the result went and what it says."""

    product_id: str
    level: str
    model: str
    model_version: str
    #: Paths (local output), http(s) URLs (an output folder the service serves) or s3://
    #: URLs of the published files.
    mask: str
    confidence: str
    probability: str
    valid: str
    preview: str
    item: str
    statistics: dict[str, float]
    crops_total: int
    crops_inferred: int
    seconds: float
    timings: dict[str, float] = field(default_factory=dict)
    #: True when an existing result with the same parameters was returned.
    reused: bool = False
    #: Which weights made the mask (ModelSpec.provenance: origin, version, ONNX SHA-256).
    model_provenance: dict[str, str] = field(default_factory=dict)

    @property
    def files(self) -> dict[str, str]:
        """The published files' hrefs by key: ASSETS, then the STAC item."""
        return {key: getattr(self, key) for key in RESULT_FILES}

    def to_json(self) -> dict[str, object]:
        return {
            "product_id": self.product_id,
            "level": self.level,
            "model": self.model,
            "model_version": self.model_version,
            "model_provenance": self.model_provenance,
            **self.files,
            # one denominator per figure (README "Outputs"): the four classes and the cloud
            # cover are shares of the pixels with data (inside the bbox/aoi when there is
            # one), missing of every pixel of the mask (of the area's pixels)
            "class_percentages": {
                k: v for k, v in self.statistics.items() if k not in ("missing", "cloud_cover")
            },
            "cloud_cover": self.statistics.get("cloud_cover", 0.0),
            "missing_percentage": self.statistics.get("missing", 0.0),
            "crops_total": self.crops_total,
            "crops_inferred": self.crops_inferred,
            "seconds": round(self.seconds, 2),
            "reused": self.reused,
        }


#: Asset keys of a result, in publishing order (the STAC item comes last, after them).
ASSETS = RESULT_FILES[:-1]  # every file but the STAC item


#: How each raster's overviews are made (kappamask.writers.cog, as the strips come): the
#: class map keeps a class per overview pixel, the probability and the confidence (a
#: score, whose most frequent value in a cell is as good as any one pixel's) are averaged.
OVERVIEWS: dict[str, OverviewResampling] = {
    "mask": "mode",
    "confidence": "average",
    "probability": "average",
    "valid": "nearest",
}


def _in_commit_order(by_key: Mapping[str, str]) -> dict[str, Any]:
    """The entries of RESULT_FILES, in its order (the item last): the file names to
    commit, or RunResult's href fields."""
    return {key: by_key[key] for key in RESULT_FILES}


def _noop_progress(_percent: int, _message: str) -> None:
    pass


def _never_cancelled() -> bool:
    return False


@dataclass(frozen=True)
class RunHooks:
    """What a run tells its caller and asks of it, passed together through the stages:
    progress, whether the job was cancelled, and the seconds of each stage (filled in)."""

    progress: ProgressFn = _noop_progress
    cancelled: CancelledFn = _never_cancelled
    timings: dict[str, float] = field(default_factory=dict)

    def stop_if_cancelled(self) -> None:
        if self.cancelled():
            raise CancelledError("job cancelled")

    def add(self, stage: str, seconds: float) -> None:
        self.timings[stage] = self.timings.get(stage, 0.0) + seconds


class _Mosaic:
    """Blends a strip's crop scores with what the previous strip left (kappamask.geometry.tiling),
    decides the finished rows and writes the model's classes, confidence and cloud
    probability."""

    def __init__(
        self,
        grid: Grid,
        crops: CropGrid,
        classes: StripWriter,
        confidence: StripWriter,
        probability: StripWriter,
        hooks: RunHooks,
    ):
        self.grid, self.crops = grid, crops
        self.blender = Blender(crops)
        self.writers = (classes, confidence, probability)
        self.hooks = hooks

    def finish_row(
        self, row: int, valid: np.ndarray, futures: Sequence[tuple[int, Future[CropOutputs]]]
    ) -> None:
        """``valid``: the strip's raster rows (those of row ``row``'s crops)."""
        row_crops = self.crops.row_crops(row)
        for col, future in futures:
            t0 = time.monotonic()
            outputs = future.result()
            t1 = time.monotonic()
            self.blender.add(row_crops[col], outputs.scores)
            self.hooks.add("inference_wait", t1 - t0)
            self.hooks.add("mosaic", time.monotonic() - t1)
        t0 = time.monotonic()
        done = self.blender.finish(row, valid, row_crops[0].y.clip(self.grid.height)[0])
        planes = (done.classes, done.confidence, done.probability)
        for writer, plane in zip(self.writers, planes, strict=True):
            writer.write(done.top, plane)
        self.hooks.add("mosaic", time.monotonic() - t0)


def _infer_all(
    planned: Plan,
    options: RunOptions,
    client: TritonClient,
    mosaic: _Mosaic,
    hooks: RunHooks,
) -> tuple[int, dict[str, str]]:
    model, grid, local_area = planned.model, planned.grid, planned.local_area
    crops = mosaic.crops
    total = len(crops)
    inferred = done = 0
    pending: tuple[int, np.ndarray, list[tuple[int, Future[CropOutputs]]]] | None = None
    in_flight: list[Future[CropOutputs]] = []
    with planned.reader(options.resampling, np.float16) as reader:
        substitutions = {f: layer for f, layer in reader.layers.items() if f != layer}
        for row, y in enumerate(crops.rows):
            top, bottom = y.clip(grid.height)
            valid = np.zeros((bottom - top, grid.width), dtype=bool)
            futures = []
            row_crops = crops.row_crops(row)
            for first in range(0, len(row_crops), CHUNK_CROPS):
                hooks.stop_if_cancelled()
                chunk = row_crops[first : first + CHUNK_CROPS]
                t0 = time.monotonic()
                in_flight = _throttle(in_flight, MAX_IN_FLIGHT)
                t1 = time.monotonic()
                hooks.add("inference_wait", t1 - t0)
                block = block_of(crops, chunk)
                window = Window(
                    block.left, block.top, block.right - block.left, block.bottom - block.top
                )
                in_area = None if local_area is None else area_mask(grid, local_area, window)
                if in_area is not None and not in_area.any():
                    continue  # outside the AOI: not read, not sent, MISSING in the mask
                features, chunk_valid = reader.read(window)
                if in_area is not None:
                    chunk_valid &= in_area
                valid[:, block.left : block.right] = chunk_valid
                extended = with_context(features, block, chunk)
                hooks.add("read", time.monotonic() - t1)  # split below
                for crop in chunk:
                    if has_data(chunk_valid, block, crop):
                        future = client.submit(model.name, cut(extended, crop, chunk))
                        futures.append((crop.col, future))
                        in_flight.append(future)
                del features, extended
            inferred += len(futures)
            if pending is not None:
                mosaic.finish_row(*pending)
                done += len(crops.cols)
                hooks.progress(
                    PROGRESS_START + (PROGRESS_INFERENCE_END - PROGRESS_START) * done // total,
                    f"{done}/{total} crops",
                )
            pending = (row, valid, futures)
        if pending is not None:
            mosaic.finish_row(*pending)
        # Reading is decoding the band files, then resampling and normalising.
        read = hooks.timings.pop("read", 0.0)
        hooks.timings["decode"] = reader.decode_seconds
        hooks.timings["resample"] = max(0.0, read - reader.decode_seconds)
    hooks.progress(PROGRESS_INFERENCE_END, f"{total}/{total} crops")
    return inferred, substitutions


def _throttle(futures: list[Future[CropOutputs]], limit: int) -> list[Future[CropOutputs]]:
    """Wait until at most ``limit`` of ``futures`` are unanswered; return those."""
    open_ = [f for f in futures if not f.done()]
    while len(open_) > limit:
        wait(open_, return_when=FIRST_COMPLETED)
        open_ = [f for f in open_ if not f.done()]
    return open_


def _reuse(
    sink: Sink, names: dict[str, str], parameters: dict[str, Any], started: float
) -> RunResult | None:
    """The published result with the same parameters, if the output holds a complete one."""
    raw = sink.read_existing(names["item"])
    if raw is None:
        return None
    recorded = read_item(raw)
    if recorded is None or recorded.parameters != parameters:
        return None
    if not all(sink.exists(names[key]) for key in ASSETS):
        return None
    LOGGER.info("%s already holds this result: not computed again", sink.location)
    return RunResult(
        product_id=recorded.product_id,
        level=recorded.level,
        model=parameters["model"],
        model_version=parameters["model_version"],
        **_in_commit_order({key: sink.final_href(name) for key, name in names.items()}),
        statistics=recorded.statistics,
        crops_total=recorded.crops_total,
        crops_inferred=0,
        seconds=time.monotonic() - started,
        reused=True,
        model_provenance=recorded.model_provenance,
    )


@dataclass(frozen=True)
class Plan:
    """What a run will do, decided before anything is read: the product, the model, the
    output grid (clipped to the user's area) and its crops, the result's file names and the
    parameters that make two results the same."""

    product: Product
    model: ModelSpec
    grid: Grid
    #: The bbox/aoi in the grid's CRS (GeoJSON), or None for the whole tile.
    local_area: dict[str, Any] | None
    crops: CropGrid
    names: dict[str, str]
    parameters: dict[str, Any]

    def reader(self, resampling: str, dtype: type[np.floating] = np.float32) -> BandReader:
        """The reader of the product's bands as the model takes them, on the grid."""
        model = self.model
        return BandReader(
            self.product,
            model.features,
            model.max_v,
            self.grid,
            resampling,
            dtype=dtype,
            offset_rule=model.offset_rule,
        )


@dataclass(frozen=True)
class Inferred:
    """The model's answer, in the sink's scratch rasters, with what it counted."""

    counts: LayerCounts
    crops_inferred: int
    #: Bands the product lacked, and what stood in for them.
    substitutions: dict[str, str]


#: Scratch rasters between the stages (in the sink's staging area): the model's classes,
#: confidence and probability as the strips finish; the buffered mask and usable-pixel mask.
_SCRATCH = ("model_classes", "confidence", "probability", "mask", "valid")


def _scratch(sink: Sink) -> dict[str, Path]:
    return {key: sink.path(f"{key}.scratch.tif") for key in _SCRATCH}


def plan(
    product_ref: ProductRef,
    client: TritonClient,
    options: RunOptions,
    policy: AccessPolicy,
    overlap: int = TILE_OVERLAP,
) -> Plan:
    """Stage 1: open the product, choose the model and lay out the output grid and its
    crops (``overlap``: pixels shared by neighbouring crops, kappamask.geometry.tiling)."""
    product = open_product(product_ref, policy)
    if options.level and options.level != product.level:
        raise ProductError(
            f"{product.product_id} is {product.level}, not {options.level} as requested"
        )
    model = client.model(product.level, options.model)
    grid = output_grid(product, options.resolution)
    local_area = None
    if options.area is not None:
        grid, local_area = clip_grid(grid, options.area)
    crops = CropGrid(grid.height, grid.width, overlap=overlap)
    return Plan(
        product,
        model,
        grid,
        local_area,
        crops,
        output_names(product.product_id),
        options.parameters(model),
    )


def infer(
    planned: Plan,
    options: RunOptions,
    client: TritonClient,
    sink: Sink,
    hooks: RunHooks,
) -> Inferred:
    """Stage 2: strips through Triton into scratch rasters, then the buffers, the
    usable-pixel mask and the class counts (kappamask.assembly.postprocess)."""
    grid, scratch = planned.grid, _scratch(sink)
    with (
        StripWriter(scratch["model_classes"], grid) as classes_out,
        StripWriter(scratch["confidence"], grid, overviews=OVERVIEWS["confidence"]) as conf_out,
        StripWriter(
            scratch["probability"],
            grid,
            nodata=PROBABILITY_NODATA,
            overviews=OVERVIEWS["probability"],
        ) as prob_out,
    ):
        mosaic = _Mosaic(grid, planned.crops, classes_out, conf_out, prob_out, hooks)
        inferred, substitutions = _infer_all(planned, options, client, mosaic, hooks)
    t0 = time.monotonic()
    hooks.progress(PROGRESS_INFERENCE_END, "buffers and the usable-pixel mask")
    with (
        StripWriter(scratch["mask"], grid, colormap=True, overviews=OVERVIEWS["mask"]) as mask_out,
        StripWriter(
            scratch["valid"], grid, nodata=VALID_NODATA, overviews=OVERVIEWS["valid"]
        ) as valid_out,
    ):
        counts = finish_layers(
            scratch["model_classes"],
            grid,
            options.cloud_buffer / grid.resolution,
            options.shadow_buffer / grid.resolution,
            mask_out,
            valid_out,
            planned.local_area,
            options.shadow_check,
            planned.product.sun,
        )
    hooks.timings["postprocess"] = time.monotonic() - t0
    return Inferred(counts, inferred, substitutions)


def publish(
    planned: Plan,
    options: RunOptions,
    inferred: Inferred,
    sink: Sink,
    hooks: RunHooks,
) -> tuple[dict[str, str], dict[str, float]]:
    """Stage 3: COGs, preview and STAC item, committed to the sink (the item last); the
    published hrefs (ASSETS, then the item) and the class statistics."""
    names, model, scratch = planned.names, planned.model, _scratch(sink)
    t0 = time.monotonic()
    tags = {
        "KAPPAMASK_MODEL": f"{model.name} {model.version_label}",
        "KAPPAMASK_CLASSES": ",".join(f"{int(c)}={CLASS_NAMES[c]}" for c in OUTPUT_CLASSES),
        "KAPPAMASK_CLOUD_BUFFER_M": f"{options.cloud_buffer:g}",
        "KAPPAMASK_SHADOW_BUFFER_M": f"{options.shadow_buffer:g}",
        "KAPPAMASK_SHADOW_CHECK": str(options.shadow_check).lower(),
    }

    def write(key: str) -> None:
        to_cog(scratch[key], sink.path(names[key]), tags=tags, overviews=OVERVIEWS[key])
        if key == "mask":  # the preview reads the mask's COG: drawn while the others are made
            write_preview(sink.path(names["mask"]), sink.path(names["preview"]), planned.product)

    # the model is done: the cores are free, and GDAL builds COGs without the GIL
    with ThreadPoolExecutor(COG_THREADS) as pool:
        for future in [pool.submit(write, key) for key in OVERVIEWS]:  # the mask first
            future.result()
    for path in scratch.values():
        for file in scratch_files(path):
            file.unlink()
    hooks.timings["cog"] = time.monotonic() - t0
    hooks.stop_if_cancelled()
    t0 = time.monotonic()
    hooks.progress(PROGRESS_END - 2, "writing the STAC item")
    files = {key: describe_file(sink.path(names[key]), sink.href(names[key])) for key in ASSETS}
    statistics = class_statistics(inferred.counts.classes, inferred.counts.area_pixels)
    item = create_item(
        planned.product,
        planned.grid,
        statistics,
        files,
        model,
        inferred.substitutions,
        extra_properties={
            "kappamask:product_id": planned.product.product_id,
            "kappamask:parameters": planned.parameters,
            "kappamask:crops": {"total": len(planned.crops), "inferred": inferred.crops_inferred},
        },
        local_paths=not sink.absolute_hrefs,
    )
    include_self = sink.absolute_hrefs
    if include_self:
        item.set_self_href(sink.href(names["item"]))
    sink.path(names["item"]).write_text(
        json.dumps(item.to_dict(include_self_link=include_self), indent=2)
    )
    hooks.timings["stac"] = time.monotonic() - t0
    t0 = time.monotonic()
    final = sink.commit(_in_commit_order(names))
    hooks.timings["publish"] = time.monotonic() - t0
    return final, statistics


def run(
    product_ref: ProductRef,
    output: OutputTarget | str | Path,
    client: TritonClient,
    options: RunOptions | None = None,
    progress: ProgressFn | None = None,
    cancelled: CancelledFn | None = None,
    overlap: int = TILE_OVERLAP,
) -> RunResult:
    """Mask one product and publish its mask, confidence, cloud probability and usable-pixel
    COGs, the preview PNG and the STAC item: plan -> (an identical result? return it) ->
    infer -> publish.

    ``output``: where the results go (an ``OutputTarget``; a plain folder or
    ``s3://bucket/prefix`` is the command line's, unrestricted); its access policy also
    says what may be read.
    """
    options = options or RunOptions()
    hooks = RunHooks(progress or _noop_progress, cancelled or _never_cancelled)
    progress = hooks.progress
    target = OutputTarget.of(output)
    started = time.monotonic()
    planned = plan(product_ref, client, options, target.policy, overlap)
    product, model, grid = planned.product, planned.model, planned.grid
    with target.open() as sink:
        if not options.overwrite:
            reused = _reuse(sink, planned.names, planned.parameters, started)
            if reused is not None:
                progress(PROGRESS_END, "an identical result exists: returned as is")
                return reused
        progress(
            PROGRESS_START,
            f"{product.product_id}: {grid.width}x{grid.height} px, {len(planned.crops)} crops",
        )
        LOGGER.info(
            "%s (%s) -> %s, %d crops at %d m -> %s",
            product.product_id,
            product.level,
            model.name,
            len(planned.crops),
            options.resolution,
            sink.location,
        )
        inferred = infer(planned, options, client, sink, hooks)
        final, statistics = publish(planned, options, inferred, sink, hooks)
    progress(PROGRESS_END, "done")
    return RunResult(
        product_id=product.product_id,
        level=product.level,
        model=model.name,
        model_version=model.version_label,
        **_in_commit_order(final),
        statistics=statistics,
        crops_total=len(planned.crops),
        crops_inferred=inferred.crops_inferred,
        seconds=time.monotonic() - started,
        timings=hooks.timings,
        model_provenance=model.provenance(),
    )
