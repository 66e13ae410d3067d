"""The `kappamask` command: run | serve | install-model | train. Thin over the modules."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any, TypeVar

import click
from tqdm import tqdm

from kappamask import __version__
from kappamask.bands import LEVELS, MAX_BUFFER_M, RESOLUTIONS
from kappamask.errors import KappaMaskError
from kappamask.reader import RESAMPLING

LOGGER = logging.getLogger(__name__)
F = TypeVar("F", bound=Callable[..., Any])

_triton_url = click.option(
    "--triton-url", default=None, help="Triton host:port; a local Triton is started when omitted."
)
_repository = click.option(
    "--model-repository",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    envvar="KAPPAMASK_MODEL_REPOSITORY",
    help="Model repository of the local Triton (default: the project's triton_models/).",
)
_protocol = click.option(
    "--protocol",
    type=click.Choice(["http", "grpc"]),
    default="http",
    show_default=True,
    help="Protocol to Triton.",
)


def _out_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--out", "out_dir", type=click.Path(path_type=Path), required=True, help=help_text
    )


def _out_file_option(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--out",
        "out_path",
        type=click.Path(dir_okay=False, path_type=Path),
        required=True,
        help=help_text,
    )


def _resolution_option(default: str) -> Callable[[F], F]:
    return click.option(
        "--resolution",
        type=click.Choice([str(r) for r in RESOLUTIONS]),
        default=default,
        show_default=True,
        help="Output resolution in metres.",
    )


def _buffer_option(flag: str, what: str) -> Callable[[F], F]:
    return click.option(
        flag,
        type=click.FloatRange(0, MAX_BUFFER_M),
        default=0.0,
        show_default=True,
        help=f"Grow {what} by this many metres.",
    )


#: The extra that brings each optional package a command may need.
_EXTRAS = {"h5py": "tools", "onnxruntime": "tools", "torch": "train", "matplotlib": "train",
           "s2cloudless": "compare", "ukis_csmask": "compare", "cv2": "compare"}  # fmt: skip


class _Main(click.Group):
    """Every command's KappaMaskError ends the CLI with its message and the exit code of
    its class (errors.py), the same text an API client gets."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except KappaMaskError as err:
            failure = click.ClickException(str(err))
            failure.exit_code = err.exit_code  # type: ignore[misc]  # click declares a class default
            raise failure from err
        except ModuleNotFoundError as err:
            # the model tools' packages are extras: say which to install, not a traceback
            extra = _EXTRAS.get((err.name or "").partition(".")[0])
            if extra is None:
                raise
            raise click.ClickException(
                f"this command needs {err.name}: pip install 'kappamask[{extra}]'"
            ) from err


@click.group(cls=_Main)
@click.version_option(__version__)
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def main(verbose: bool) -> None:
    """KappaMask: Sentinel-2 cloud masks with the KappaMask U-Nets on Triton."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@main.command("run")
@click.argument("product")
@click.option(
    "--out",
    "output",
    required=True,
    help="Folder or s3://bucket/prefix for the mask COG, confidence COG, preview and STAC item.",
)
@_resolution_option("10")
@click.option(
    "--resampling", type=click.Choice(sorted(RESAMPLING)), default="lanczos", show_default=True
)
@click.option(
    "--level",
    type=click.Choice(LEVELS),
    default=None,
    help="Fail unless the product is of this level (default: read from the metadata).",
)
@click.option(
    "--bbox",
    type=float,
    nargs=4,
    default=None,
    metavar="W S E N",
    help="Mask only this lon/lat box (degrees).",
)
@click.option(
    "--aoi",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="Mask only this GeoJSON (Multi)Polygon (a file; EPSG:4326).",
)
@click.option("--model", default=None, help="Model name[:version_label] (default: by level).")
@_buffer_option("--cloud-buffer", "clouds (opaque and semi-transparent)")
@_buffer_option("--shadow-buffer", "cloud shadows")
@click.option(
    "--overwrite", is_flag=True, help="Compute again even when the output holds this result."
)
@_triton_url
@_protocol
@_repository
def run_command(
    product: str,
    output: str,
    resolution: str,
    resampling: str,
    level: str | None,
    bbox: tuple[float, float, float, float] | None,
    aoi: Path | None,
    model: str | None,
    cloud_buffer: float,
    shadow_buffer: float,
    overwrite: bool,
    triton_url: str | None,
    protocol: str,
    model_repository: Path | None,
) -> None:
    """Mask PRODUCT: a .SAFE folder or .zip, s3://bucket/...SAFE (or .zip), or a STAC item
    (URL, s3:// or local .json), L1C or L2A. S3 settings come from the environment
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ..., KAPPAMASK_S3_REQUESTER_PAYS)."""
    from kappamask.inference.repository import DEFAULT_REPOSITORY
    from kappamask.inference.server import triton_endpoint
    from kappamask.inference.triton import TritonClient
    from kappamask.options import RunOptions
    from kappamask.pipeline import ASSETS, run

    # checked before anything starts: bad options end here, with the process's message
    options = RunOptions(
        resolution=int(resolution),
        resampling=resampling,
        level=level,
        bbox=bbox or None,
        aoi=_read_geojson(aoi) if aoi else None,
        model=model,
        overwrite=overwrite,
        cloud_buffer=cloud_buffer,
        shadow_buffer=shadow_buffer,
    )
    with ExitStack() as stack:
        triton = triton_endpoint(stack, triton_url, protocol,
                                 model_repository or DEFAULT_REPOSITORY)  # fmt: skip
        client = stack.enter_context(TritonClient(triton.url, protocol))
        client.wait_ready()
        bar = stack.enter_context(tqdm(total=100, unit="%", desc="kappamask", file=sys.stderr))

        def progress(percent: int, message: str) -> None:
            bar.update(percent - bar.n)
            bar.set_postfix_str(message[-40:])

        result = run(product, output, client, options, progress=progress)
        bar.update(100 - bar.n)
    summary = result.to_json()  # the job result's figures, with its denominators
    for key in (*ASSETS, "item"):
        click.echo(f"{'STAC item:' if key == 'item' else key + ':':<12} {summary[key]}")
    where = " inside the bbox/aoi" if bbox or aoi else ""
    denominator = "the area's" if where else "all"
    click.echo(f"classes (% of pixels with data{where}): "
               + json.dumps(summary["class_percentages"]))  # fmt: skip
    click.echo(f"cloud cover: {summary['cloud_cover']} % of pixels with data{where}; "
               f"missing: {summary['missing_percentage']} % of "
               f"{denominator} pixels")  # fmt: skip
    if result.reused:
        click.echo("an identical result was already there: not computed again (--overwrite)")
    else:
        click.echo(
            f"{result.crops_inferred}/{result.crops_total} crops inferred in {result.seconds:.1f} s"
        )


def _read_geojson(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise click.BadParameter(f"{path} is not a GeoJSON file: {err}") from err
    if not isinstance(data, dict):
        raise click.BadParameter(f"{path} is not a GeoJSON object")
    return data  # a geometry, Feature or FeatureCollection: RunOptions checks it


@main.command("serve")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=5000, show_default=True, type=int)
@_triton_url
@_protocol
@_repository
@click.option(
    "--output-dir",
    type=click.Path(path_type=Path),
    default=Path("kappamask-results"),
    show_default=True,
    help="Where results are written.",
)
@click.option(
    "--data-root",
    "data_roots",
    type=click.Path(path_type=Path),
    multiple=True,
    help="Folder whose products may be processed (repeatable; default: KAPPAMASK_DATA_ROOTS, "
    "else the current folder).",
)
def serve_command(
    host: str,
    port: int,
    triton_url: str | None,
    protocol: str,
    model_repository: Path | None,
    output_dir: Path,
    data_roots: tuple[Path, ...],
) -> None:
    """Serve the OGC API - Processes endpoint (pygeoapi) with the kappamask process."""
    from kappamask.inference.repository import DEFAULT_REPOSITORY
    from kappamask.serve import serve

    serve(
        host,
        port,
        triton_url,
        protocol,
        output_dir,
        data_roots or None,
        repository=model_repository or DEFAULT_REPOSITORY,
    )


@main.command("wait-triton")
@click.argument("url")
@_protocol
@click.option("--timeout", default=600.0, show_default=True, type=float, help="Seconds to wait.")
def wait_triton_command(url: str, protocol: str, timeout: float) -> None:
    """Wait until the Triton server at URL is ready (for container start-up)."""
    from kappamask.inference.triton import TritonClient

    with TritonClient(url, protocol) as client:
        client.wait_ready(timeout)
    click.echo(f"Triton at {url} is ready")


def _install_repository(help_text: str) -> Callable[[F], F]:
    return click.option(
        "--repository",
        type=click.Path(file_okay=False, path_type=Path),
        default=None,
        help=f"{help_text} (default: the project's triton_models/).",
    )


@main.command("install-model")
@click.argument("onnx_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@_install_repository("Triton model repository")
@click.option(
    "--level", type=click.Choice(LEVELS), default=None, help="Override the level in the file."
)
@click.option(
    "--int8",
    "int8_file",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="The accepted INT8 variant (kappamask quantize) for the CPU config to run.",
)
def install_model_command(
    onnx_file: Path, repository: Path | None, level: str | None, int8_file: Path | None
) -> None:
    """Place an exported ONNX model in the Triton model repository with its configs."""
    from kappamask.inference.repository import DEFAULT_REPOSITORY, install_model

    click.echo(install_model(onnx_file, repository or DEFAULT_REPOSITORY, level, 1, int8_file))


@main.command("fetch-weights")
@click.option(
    "--level",
    type=click.Choice([*LEVELS, "all"]),
    default="all",
    show_default=True,
    help="Which model's weights.",
)
@click.option(
    "--base-url",
    default=None,
    help="Folder URL of l1c_unet.hdf5 / l2a_unet.hdf5 (default: KappaZeta's 2022-09-13 release).",
)
@_install_repository("Triton model repository to install into")
def fetch_weights_command(level: str, base_url: str | None, repository: Path | None) -> None:
    """Download KappaZeta's published KappaMask weights, check and convert them, and serve
    them as the default model of their level (restart the service afterwards)."""
    from kappamask.inference.repository import DEFAULT_REPOSITORY
    from kappamask.model.official import OFFICIAL_BASE_URL, fetch_and_install

    levels = list(LEVELS) if level == "all" else [level]
    installed = fetch_and_install(
        levels, base_url or OFFICIAL_BASE_URL, repository or DEFAULT_REPOSITORY
    )
    for model, model_dir in installed:
        click.echo(f"{model.level}: {model.url}")
        click.echo(f"  sha256 {model.sha256} ({model.base_filters} base filters)")
        click.echo(f"  installed as {model_dir.name} {model.version} in {model_dir.parent}")


@main.command("quantize")
@click.argument("onnx_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "--product",
    "products",
    multiple=True,
    required=True,
    type=click.Path(exists=True, path_type=Path),
    help="Real product (SAFE) of the model's level to calibrate and check on; repeatable.",
)
@_resolution_option("10")
@_out_file_option("Where to write MODEL.int8.onnx (only if accepted).")
@click.option("--max-crops", type=int, default=32, show_default=True, help="Crops read in all.")
@click.option(
    "--composites/--no-composites",
    default=True,
    show_default=True,
    help="Also calibrate and check on the crops under synthetic clouds (a clear product "
    "alone checks only the easy case).",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option("--install", is_flag=True, help="Serve the accepted INT8 variant on CPU.")
@_install_repository("Triton model repository for --install")
def quantize_command(
    onnx_file: Path,
    products: tuple[Path, ...],
    resolution: str,
    out_path: Path,
    max_crops: int,
    composites: bool,
    json_path: Path | None,
    install: bool,
    repository: Path | None,
) -> None:
    """INT8 variant of a model for CPU hosts, accepted only if its classes agree with
    the FP32 model on at least 99.5 % of held-out pixels (real crops, and the same crops
    under synthetic clouds)."""
    from kappamask.inference.repository import DEFAULT_REPOSITORY, install_model, spec_from_onnx
    from kappamask.model.quantize import MIN_AGREEMENT, quantize_and_check

    spec = spec_from_onnx(onnx_file)
    report = quantize_and_check(
        onnx_file, out_path, products, int(resolution), spec.features, spec.max_v,
        max_crops, composites=composites,
    )  # fmt: skip
    result = report.to_json()
    if json_path is not None:
        json_path.write_text(json.dumps(result, indent=2))
    click.echo(
        f"{report.check_crops} held-out crops ({report.pixels} px): agreement "
        f"{report.agreement:.2%}, FP32 {report.fp32_s_per_crop:.3f} s/crop, INT8 "
        f"{report.int8_s_per_crop:.3f} s/crop, FP32 layers {result['fp32_layers']}"
    )
    if not report.accepted:
        raise click.ClickException(
            f"INT8 variant refused: agreement {report.agreement:.2%} < {MIN_AGREEMENT:.1%}"
        )
    click.echo(f"wrote {out_path}")
    if install:
        click.echo(
            "installed into "
            f"{install_model(onnx_file, repository or DEFAULT_REPOSITORY, int8_path=out_path)}"
        )


@main.command("import-keras")
@click.argument("weights", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--level", type=click.Choice(LEVELS), required=True, help="L1C or L2A model.")
@_out_file_option("Where to write MODEL.onnx.")
@click.option(
    "--filters", type=int, default=None, help="Expected base filters (read from the file)."
)
@click.option(
    "--features",
    default=None,
    help="Comma-separated feature list when it is not the level's default (e.g. 14 L2A "
    "features with B07).",
)
@click.option("--max-v", "max_v", default=None, help="Comma-separated max_v, with --features.")
@click.option("--version-label", default=None, help="Version label (default: from the file).")
@click.option("--install", is_flag=True, help="Also place it in the Triton model repository.")
@_install_repository("Triton model repository for --install")
def import_keras_command(
    weights: Path,
    level: str,
    out_path: Path,
    filters: int | None,
    features: str | None,
    max_v: str | None,
    version_label: str | None,
    install: bool,
    repository: Path | None,
) -> None:
    """Convert published KappaMask weights (Keras 2 HDF5, e.g. l2a_unet.hdf5) to ONNX."""
    from kappamask.inference.repository import DEFAULT_REPOSITORY, install_model
    from kappamask.model.keras_import import import_keras

    try:
        max_values = [float(v) for v in max_v.split(",")] if max_v else None
    except ValueError as err:
        raise click.BadParameter("--max-v takes comma-separated numbers") from err
    import_keras(
        weights,
        level,
        out_path,
        base_filters=filters,
        features=features.split(",") if features else None,
        max_v=max_values,
        version=version_label,
    )
    click.echo(f"wrote {out_path}")
    if install:
        click.echo(f"installed into {install_model(out_path, repository or DEFAULT_REPOSITORY)}")


def _many_paths(flag: str, name: str, help_text: str, file_only: bool = True) -> Callable[[F], F]:
    return click.option(
        flag,
        name,
        multiple=True,
        type=click.Path(exists=True, dir_okay=not file_only, path_type=Path),
        help=help_text,
    )


@main.command("evaluate")
@_many_paths("--pred", "predictions", "Predicted mask GeoTIFF (repeatable; pairs with --ref).")
@_many_paths("--ref", "references", "Reference mask GeoTIFF on the same grid (5 = undefined).")
@click.option(
    "--kappaset",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="A KappaSet-style folder of NetCDF sub-tiles, scored with --model.",
)
@click.option(
    "--model",
    "model_path",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    default=None,
    help="ONNX model (the served format) for --kappaset.",
)
@click.option("--level", type=click.Choice(LEVELS), default=None, help="Level of --model.")
@_many_paths(
    "--scl-product",
    "scl_products",
    "L2A product per --ref: adds Sen2Cor's SCL as a column (Table 1 mapping).",
    file_only=False,
)
@_many_paths(
    "--s2cloudless-product",
    "s2cloudless_products",
    "L1C product per --ref: adds s2cloudless (PyPI package) as a column.",
    file_only=False,
)
@click.option(
    "--side-by-side",
    "side_by_side",
    nargs=2,
    type=click.Path(exists=True, path_type=Path),
    default=None,
    metavar="PRODUCT MASK",
    help="One product and this project's mask of it: the mask next to s2cloudless (L1C), "
    "ukis-csmask and SCL (L2A) on the mask's grid; --png draws all of them over the true colour.",
)
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None)
@click.option("--png", "png_path", type=click.Path(path_type=Path), default=None)
def evaluate_command(
    predictions: tuple[Path, ...],
    references: tuple[Path, ...],
    kappaset: Path | None,
    model_path: Path | None,
    level: str | None,
    scl_products: tuple[Path, ...],
    s2cloudless_products: tuple[Path, ...],
    side_by_side: tuple[Path, Path] | None,
    json_path: Path | None,
    png_path: Path | None,
) -> None:
    """Per-class dice, precision, recall, overall accuracy and confusion matrices of
    predicted masks against references (the paper's Tables 2-9 and Figure 8), or of one
    product's mask against the other tools (--side-by-side)."""
    from kappamask import evaluate as ev

    if side_by_side is not None:
        result, masks, rgb = ev.side_by_side(*side_by_side)
        click.echo(ev.format_table(result))
        if json_path:
            click.echo(f"JSON: {ev.write_json(result, json_path)}")
        if png_path:
            click.echo(f"PNG:  {ev.plot_side_by_side(masks, rgb, png_path)}")
        return
    if kappaset is not None:
        if model_path is None:
            raise click.UsageError("--kappaset needs --model")
        result = ev.report({"kappamask": ev.predict_kappaset(kappaset, model_path, level)})
    else:
        result = ev.evaluate(predictions, references, scl_products, s2cloudless_products)
    click.echo(ev.format_table(result))
    if json_path:
        click.echo(f"JSON: {ev.write_json(result, json_path)}")
    if png_path:
        click.echo(f"PNG:  {ev.plot_confusion(result, png_path)}")


@main.command("train")
@click.argument("product", type=click.Path(exists=True, path_type=Path))
@_out_option("Folder for checkpoint, metrics.csv, holdout.json and model.onnx.")
@click.option("--level", type=click.Choice(LEVELS), default="L2A", show_default=True)
@click.option(
    "--labels",
    default="scl",
    show_default=True,
    help="scl (Sen2Cor SCL of an L2A PRODUCT, Table 1), composites (synthetic clouds over "
    "PRODUCT, exact labels), scl+composites, kappaset (PRODUCT is a KappaSet-style folder of "
    "NetCDF sub-tiles), or labels:PATH (a mask-code GeoTIFF on PRODUCT's grid).",
)
@_resolution_option("60")
@click.option("--filters", "base_filters", default=32, show_default=True, type=int)
@click.option("--epochs", "max_epochs", default=40, show_default=True, type=int)
@click.option("--steps-per-epoch", default=50, show_default=True, type=int)
@click.option("--max-minutes", default=30.0, show_default=True, type=float)
@click.option(
    "--loss", type=click.Choice(["gdl", "gdl+bce", "ce+bce"]), default="gdl", show_default=True
)
@click.option(
    "--patience",
    default=6,
    show_default=True,
    type=int,
    help="Epochs without a better validation loss before stopping.",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--version-label", default=None, help="Model version written into the ONNX file.")
def train_command(
    product: Path,
    out_dir: Path,
    level: str,
    labels: str,
    resolution: str,
    base_filters: int,
    max_epochs: int,
    steps_per_epoch: int,
    max_minutes: float,
    loss: str,
    patience: int,
    seed: int,
    version_label: str | None,
) -> None:
    """Train a U-Net (paper §2.3) and export model.onnx (needs the train extra)."""
    from kappamask.model.export import export_onnx
    from kappamask.model.train import FitConfig, TrainConfig, feature_defaults, train

    config = TrainConfig(
        product=str(product),
        level=level,
        labels=labels,
        resolution=int(resolution),
        base_filters=base_filters,
        fit=FitConfig(
            max_epochs=max_epochs,
            steps_per_epoch=steps_per_epoch,
            max_minutes=max_minutes,
            loss=loss,
            patience=patience,
            seed=seed,
        ),
    )
    model, holdout = train(config, out_dir)
    features, max_v = feature_defaults(config.level)
    label = version_label or f"bootstrap-{labels.split(':')[0]}-{Path(product).name[:60]}"
    path = export_onnx(model, config.level, features, max_v, label, out_dir / "model.onnx")
    click.echo(json.dumps(holdout, indent=2))
    click.echo(f"model: {path}")


@main.command("distill")
@_out_option("Folder for the teachers' labels, checkpoint, metrics.csv, holdout.json, model.onnx.")
@click.option("--level", type=click.Choice(LEVELS), required=True)
@_many_paths(
    "--multiband", "multiband", "Folder of 13-band L1C GeoTIFFs (SEN12MS-CR patches).", False
)
@click.option(
    "--band-folder",
    "band_folders",
    nargs=2,
    multiple=True,
    type=(click.Choice(LEVELS), click.Path(exists=True, file_okay=False, path_type=Path)),
    help="LEVEL FOLDER: one file per band (B02.tif, ..., SCL), e.g. a decimated tile.",
)
@click.option(
    "--safe",
    "safes",
    nargs=2,
    multiple=True,
    type=(click.Choice([str(r) for r in RESOLUTIONS]), click.Path(exists=True, path_type=Path)),
    help="RESOLUTION SAFE: a SAFE product read at that resolution (L2A: with SCL).",
)
@_many_paths("--npy", "npy", "eo-learn REFERENCE_SCENES.npy ([N, H, W, 13] reflectance).")
@_many_paths("--mat", "mat", "DSen2 .mat scene (cloud-free, no B10: pseudo-L2A only).")
@click.option("--holdout", multiple=True, help="Scene or group name part to hold out (repeat).")
@click.option(
    "--labels-cache",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder of the teachers' labels (default OUT/scenes); share it across levels.",
)
@click.option("--filters", "base_filters", default=16, show_default=True, type=int)
@click.option("--crop", default=128, show_default=True, type=int)
@click.option("--batch-size", default=8, show_default=True, type=int)
@click.option("--epochs", "max_epochs", default=200, show_default=True, type=int)
@click.option("--steps-per-epoch", default=200, show_default=True, type=int)
@click.option("--max-minutes", default=35.0, show_default=True, type=float)
@click.option("--learning-rate", default=1e-3, show_default=True, type=float)
@click.option("--no-pseudo-l2a", is_flag=True, help="L2A: train on real L2A scenes only.")
@click.option(
    "--bare-ground",
    default=None,
    type=click.FloatRange(0.0, 1.0),
    help="Share of training crops whose clear ground becomes desert [default: DistillConfig's].",
)
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("--version-label", default=None, help="Model version written into the ONNX file.")
def distill_command(
    out_dir: Path,
    level: str,
    multiband: tuple[Path, ...],
    band_folders: tuple[tuple[str, Path], ...],
    safes: tuple[tuple[str, Path], ...],
    npy: tuple[Path, ...],
    mat: tuple[Path, ...],
    holdout: tuple[str, ...],
    labels_cache: Path | None,
    base_filters: int,
    crop: int,
    batch_size: int,
    max_epochs: int,
    steps_per_epoch: int,
    max_minutes: float,
    learning_rate: float,
    no_pseudo_l2a: bool,
    bare_ground: float | None,
    seed: int,
    version_label: str | None,
) -> None:
    """Distil bootstrap weights from s2cloudless, ukis-csmask, SCL and the B10 rule on real
    imagery; hold out whole scenes; export model.onnx (needs the train and compare extras
    and ukis-csmask)."""
    from kappamask.bands import DEFAULT_FEATURES, DEFAULT_MAX_V
    from kappamask.model.distill import DataInputs, DistillConfig, distill
    from kappamask.model.export import export_onnx
    from kappamask.model.metrics import without_nan
    from kappamask.model.train import FitConfig

    inputs = DataInputs(
        multiband=list(multiband), band_folders=list(band_folders),
        safes=[(int(r), p) for r, p in safes], npy=list(npy), mat=list(mat),
    )  # fmt: skip
    config = DistillConfig(
        level=level, holdout=holdout, base_filters=base_filters, pseudo_l2a=not no_pseudo_l2a,
        fit=FitConfig(crop=crop, batch_size=batch_size, steps_per_epoch=steps_per_epoch,
                      max_epochs=max_epochs, max_minutes=max_minutes, loss="ce+bce",
                      learning_rate=learning_rate, patience=8, lr_patience=3, val_batches=6,
                      seed=seed, bf16=True, grad_clip=1.0),
    )  # fmt: skip
    if bare_ground is not None:
        config.bare_ground = bare_ground
    model, report = distill(inputs, config, out_dir, labels_cache)
    label = version_label or f"bootstrap-distilled-{level.lower()}"
    path = export_onnx(model, level, DEFAULT_FEATURES[level], DEFAULT_MAX_V[level], label,
                       out_dir / "model.onnx")  # fmt: skip
    click.echo(json.dumps(without_nan(report), indent=2))
    click.echo(f"model: {path}")


if __name__ == "__main__":
    main()
