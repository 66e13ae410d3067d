"""The tools' commands (`kappamask fetch-weights`, `quantize`, `check-precision`,
`import-keras`, `evaluate`, `train`, `distill`, `label`): their own click group, which kappamask.cli
adds to `kappamask` so users call them as before. Each imports its module (PyTorch, ONNX
Runtime, h5py: the ``train`` and ``tools`` extras) only when it runs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from kappamask.bands import LEVELS, MODEL_NAMES, RESOLUTIONS
from kappamask.cli_options import (
    REVIEW_OUT_HELP,
    existing_file_option,
    install_repository_option,
    out_file_option,
    out_option,
    paths_option,
    resolution_option,
)

offset_rule_option = click.option(
    "--offset-rule",
    type=click.Choice(["training", "km_predict"]),
    default="training",
    show_default=True,
    help="How the baseline-04.00 radiometric offset enters the inputs: added to the DN, on the "
    "scale of the training products (training), or as km_predict v2.4 does it (km_predict: the "
    "L1C offset also shifts the divisor, L2A gets none).",
)


#: The real scenes that are not products, as distill and review-scenes read them.
multiband_option = paths_option(
    "--multiband", "multiband", "Folder of 13-band L1C GeoTIFFs (SEN12MS-CR patches).", False
)
band_folder_option = click.option(
    "--band-folder",
    "band_folders",
    nargs=2,
    multiple=True,
    type=(click.Choice(LEVELS), click.Path(exists=True, file_okay=False, path_type=Path)),
    help="LEVEL FOLDER: one file per band (B02.tif, ..., SCL), e.g. a decimated tile.",
)


@click.group("tools")
def tools() -> None:
    """Train, distil, quantise, import and evaluate KappaMask models."""


@tools.command("fetch-weights")
@click.option(
    "--level",
    type=click.Choice([*LEVELS, "all"]),
    default="all",
    show_default=True,
    help="Which model's weights.",
)
@click.option(
    "--architecture",
    type=click.Choice(["deeplabv3plus", "unet"]),
    default="deeplabv3plus",
    show_default=True,
    help="km_predict's default DeepLabv3+, or the paper's U-Net.",
)
@click.option(
    "--base-url",
    default=None,
    help="Folder URL of <level>_<architecture>.hdf5 (default: KappaZeta's 2022-09-13 release).",
)
@offset_rule_option
@install_repository_option("Triton model repository to install into")
def fetch_weights_command(
    level: str,
    architecture: str,
    base_url: str | None,
    offset_rule: str,
    repository: Path | None,
) -> None:
    """Download KappaZeta's published KappaMask weights (the files km_predict downloads),
    check and convert them, and serve them as the default model of their level (restart
    the service afterwards)."""
    from kappamask.inference.repository import DEFAULT_REPOSITORY
    from kappamask.tools.official import OFFICIAL_BASE_URL, Release, fetch_and_install

    levels = list(LEVELS) if level == "all" else [level]
    release = Release(base_url or OFFICIAL_BASE_URL, architecture, offset_rule)
    installed = fetch_and_install(levels, release, repository or DEFAULT_REPOSITORY)
    for model, model_dir in installed:
        click.echo(f"{model.level}: {model.url}")
        click.echo(f"  sha256 {model.sha256} ({model.detail})")
        click.echo(f"  installed as {model_dir.name} {model.version} in {model_dir.parent}")


@tools.command("quantize")
@click.argument("onnx_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@paths_option(
    "--product",
    "products",
    "Real product (SAFE) of the model's level to calibrate and check on; repeatable.",
    file_only=False,
    required=True,
)
@resolution_option("10")
@out_file_option("Where to write MODEL.int8.onnx (only if accepted).")
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
@install_repository_option("Triton model repository for --install")
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
    from kappamask.tools.quantize import MIN_AGREEMENT, quantize_and_check

    spec = spec_from_onnx(onnx_file)
    report = quantize_and_check(
        onnx_file,
        out_path,
        products,
        int(resolution),
        spec.features,
        spec.max_v,
        max_crops,
        composites=composites,
    )
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


@tools.command("check-precision")
@click.argument("level", type=click.Choice(LEVELS))
@paths_option(
    "--data",
    "paths",
    "Real scenes of the model's level: a SAFE product, a folder of band files, a 13-band "
    "GeoTIFF patch or a folder of them; repeatable.",
    file_only=False,
    required=True,
)
@resolution_option("60")
@click.option(
    "--pseudo-l2a",
    is_flag=True,
    help="For the L2A model, take L1C scenes too, brought near bottom-of-atmosphere by "
    "dark-object subtraction as distillation trains on them.",
)
@click.option("--json", "json_path", type=click.Path(dir_okay=False, path_type=Path), default=None)
@click.option(
    "--record/--no-record",
    default=True,
    show_default=True,
    help="Write the agreements into the model's configs (what precision auto reads).",
)
@install_repository_option("Triton model repository of the model")
def check_precision_command(
    level: str,
    paths: tuple[Path, ...],
    resolution: str,
    pseudo_l2a: bool,
    json_path: Path | None,
    record: bool,
    repository: Path | None,
) -> None:
    """Measure how closely the served LEVEL model's classes keep to FP32 in bfloat16 and
    in its INT8 variant on real scenes, and record it: CPU hosts then run the fastest
    precision that keeps at least 99.9 % (bfloat16) or 99.5 % (INT8) of the pixels.
    Restart the service afterwards."""
    from kappamask.bands import MODEL_NAMES
    from kappamask.inference.model_spec import auto_precision
    from kappamask.inference.repository import DEFAULT_REPOSITORY
    from kappamask.tools import precision

    model_dir = (repository or DEFAULT_REPOSITORY) / MODEL_NAMES[level]
    report = precision.measure(
        model_dir,
        paths,
        int(resolution),
        progress=lambda n: click.echo(f"{n} crops", err=True) if n % 25 == 0 else None,
        pseudo_l2a=pseudo_l2a,
    )
    if json_path is not None:
        json_path.write_text(json.dumps(report.to_json(), indent=2))

    def pct(value: float | None) -> str:
        return "not measured" if value is None else f"{value:.3%}"

    click.echo(
        f"{report.model}: {report.crops} crops, {report.pixels} px with data; agreement "
        f"with FP32: bf16 {pct(report.bf16_agreement)}, INT8 "
        f"{pct(report.int8_agreement)}"
    )
    speeds = ", ".join(f"{p} {s:.3f}" for p, s in report.seconds_per_crop.items())
    click.echo(f"seconds per crop, one request at a time: {speeds}")
    if record:
        spec = precision.record(model_dir, report)
        has_int8 = "int8" in report.seconds_per_crop
        chosen = {
            cpu: auto_precision(cpu == "bf16", has_int8, spec.bf16_agreement, spec.int8_agreement)
            for cpu in ("bf16", "f32")
        }
        click.echo(
            f"recorded in {model_dir}: precision auto runs {chosen['bf16']} on CPUs "
            f"with bfloat16, {chosen['f32']} elsewhere"
        )


@tools.command("import-keras")
@click.argument("weights", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--level", type=click.Choice(LEVELS), required=True, help="L1C or L2A model.")
@out_file_option("Where to write MODEL.onnx.")
@click.option(
    "--filters",
    type=int,
    default=None,
    help="A U-Net's expected base filters (read from the file).",
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
@offset_rule_option
@install_repository_option("Triton model repository for --install")
def import_keras_command(
    weights: Path,
    level: str,
    out_path: Path,
    filters: int | None,
    features: str | None,
    max_v: str | None,
    version_label: str | None,
    install: bool,
    offset_rule: str,
    repository: Path | None,
) -> None:
    """Convert KappaMask weights (Keras 2 HDF5: l2a_unet.hdf5, or km_predict's
    l2a_deeplabv3plus.hdf5, recognised from its layers) to ONNX."""
    from kappamask.inference.repository import DEFAULT_REPOSITORY, install_model
    from kappamask.tools.keras_import import import_keras

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
        offset_rule=offset_rule,
    )
    click.echo(f"wrote {out_path}")
    if install:
        click.echo(f"installed into {install_model(out_path, repository or DEFAULT_REPOSITORY)}")


@tools.command("evaluate")
@paths_option("--pred", "predictions", "Predicted mask GeoTIFF (repeatable; pairs with --ref).")
@paths_option("--ref", "references", "Reference mask GeoTIFF on the same grid (5 = undefined).")
@click.option(
    "--kappaset",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="A KappaSet-style folder of NetCDF sub-tiles, scored with --model.",
)
@existing_file_option("--model", "model_path", "ONNX model (the served format) for --kappaset.")
@click.option("--level", type=click.Choice(LEVELS), default=None, help="Level of --model.")
@paths_option(
    "--scl-product",
    "scl_products",
    "L2A product per --ref: adds Sen2Cor's SCL as a column (Table 1 mapping).",
    file_only=False,
)
@paths_option(
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
@existing_file_option(
    "--seams",
    "seams_mask",
    "A mask GeoTIFF: how much more often its class changes across crop boundaries and its "
    "outermost rows/columns than across the median boundary (1 = seamless).",
    metavar="MASK",
)
@click.option(
    "--feature-importance",
    is_flag=True,
    help="Zero each input feature of --model in turn and report per-class 1 - dice (the "
    "paper's Figure 11) on --kappaset (human labels) or --labels-cache (teachers' labels).",
)
@click.option(
    "--labels-cache",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="A `kappamask distill` label cache, for --feature-importance.",
)
@click.option("--only", multiple=True, help="With --labels-cache: scene name parts to keep.")
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
    seams_mask: Path | None,
    feature_importance: bool,
    labels_cache: Path | None,
    only: tuple[str, ...],
    json_path: Path | None,
    png_path: Path | None,
) -> None:
    """Per-class dice, precision, recall, overall accuracy and confusion matrices of
    predicted masks against references (the paper's Tables 2-9 and Figure 8), of one
    product's mask against the other tools (--side-by-side), or a model's permutation
    feature importance (--feature-importance)."""
    from kappamask.tools import evaluate as ev

    if feature_importance:
        _feature_importance(model_path, level, kappaset, labels_cache, only, json_path, png_path)
        return
    if seams_mask is not None:
        result = ev.seam_report(seams_mask)
        click.echo(ev.format_seams(result))
        if json_path:
            click.echo(f"JSON: {ev.write_json(result, json_path)}")
        return
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


def _feature_importance(
    model_path: Path | None,
    level: str | None,
    kappaset: Path | None,
    labels_cache: Path | None,
    only: tuple[str, ...],
    json_path: Path | None,
    png_path: Path | None,
) -> None:
    from kappamask.tools import importance as fi

    if model_path is None or (kappaset is None) == (labels_cache is None):
        raise click.UsageError(
            "--feature-importance needs --model and one of --kappaset "
            "(human labels) or --labels-cache (teachers' labels)"
        )
    classify = fi.OnnxClassifier(model_path, level)
    if kappaset is not None:
        tiles, source = fi.kappaset_tiles(kappaset, classify.spec), fi.HUMAN_LABELS
    else:
        assert labels_cache is not None
        tiles = fi.cached_tiles(labels_cache, classify.spec.level, only)
        source = fi.TEACHER_LABELS
    result = fi.feature_importance(tiles, classify, source)
    click.echo(fi.format_importance(result))
    if json_path:
        click.echo(f"JSON: {fi.write_importance(result, json_path)}")
    if png_path:
        click.echo(f"PNG:  {fi.plot_importance(result, png_path)}")


@tools.command("train")
@click.argument("product", type=click.Path(exists=True, path_type=Path), required=False)
@out_option("Folder for checkpoint, metrics.csv, holdout.json and model.onnx.")
@click.option("--level", type=click.Choice(LEVELS), default="L2A", show_default=True)
@click.option(
    "--labels",
    default="scl",
    show_default=True,
    help="scl (Sen2Cor SCL of an L2A PRODUCT, Table 1), composites (synthetic clouds over "
    "PRODUCT, exact labels), scl+composites, kappaset (PRODUCT is a KappaSet-style folder of "
    "NetCDF sub-tiles), labels:PATH (a mask-code GeoTIFF on PRODUCT's grid), or "
    "labelled:REVIEW_DIR (fine-tune --parent on the sub-tiles people labelled; no PRODUCT).",
)
@existing_file_option(
    "--parent",
    "parent",
    "With labelled:DIR: the ONNX model to fine-tune [default: the repository's model of the "
    "review's level].",
)
@click.option(
    "--holdout",
    multiple=True,
    help="With labelled:DIR: sub-tile name part to keep out of training (repeat) [default: "
    "every fifth labelled sub-tile by rank, from the second].",
)
@resolution_option("60")
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
    parent: Path | None,
    holdout: tuple[str, ...],
) -> None:
    """Train a U-Net (paper §2.3), or fine-tune one on people's labels, and export
    model.onnx (needs the train extra)."""
    from kappamask.tools.export import export_onnx
    from kappamask.tools.train import FitConfig, TrainConfig, feature_defaults, train

    if labels.startswith("labelled:"):
        # a fine-tuning run has its own defaults (FINE_TUNE_FIT); flags given override them
        given = {
            name: value
            for name, value in (
                ("max_epochs", max_epochs),
                ("steps_per_epoch", steps_per_epoch),
                ("max_minutes", max_minutes),
                ("patience", patience),
                ("seed", seed),
            )
            if click.get_current_context().get_parameter_source(name)
            != click.core.ParameterSource.DEFAULT
        }
        _fine_tune(
            Path(labels.removeprefix("labelled:")), parent, out_dir, holdout, given, version_label
        )
        return
    if product is None:
        raise click.UsageError("PRODUCT is needed unless --labels is labelled:DIR")
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
    model, report = train(config, out_dir)
    features, max_v = feature_defaults(config.level)
    label = version_label or f"bootstrap-{labels.split(':')[0]}-{Path(product).name[:60]}"
    path = export_onnx(model, config.level, features, max_v, label, out_dir / "model.onnx")
    click.echo(json.dumps(report, indent=2))
    click.echo(f"model: {path}")


def _fine_tune(
    review: Path,
    parent: Path | None,
    out_dir: Path,
    holdout: tuple[str, ...],
    given: dict[str, Any],
    version_label: str | None,
) -> None:

    from kappamask.inference.model_spec import ORIGIN_FINE_TUNED
    from kappamask.inference.repository import DEFAULT_REPOSITORY, FP32_FILE
    from kappamask.tools.export import export_onnx
    from kappamask.tools.labelling.finetune import FINE_TUNE_FIT, fine_tune
    from kappamask.tools.labelling.subtiles import ReviewFolder

    folder = ReviewFolder(review)
    if parent is None:
        level = folder.level()
        parent = DEFAULT_REPOSITORY / MODEL_NAMES[level] / "1" / FP32_FILE
        click.echo(f"parent: the served {level} model, {parent}")
    fit_config = dataclasses.replace(FINE_TUNE_FIT, **given)
    model, spec, report = fine_tune(folder, parent, out_dir, fit_config, holdout)
    digest = report["parent"]["sha256"]
    label = version_label or f"{spec.version_label}+ft-{digest[:8]}"
    path = export_onnx(
        model,
        spec.level,
        spec.features,
        spec.max_v,
        label,
        out_dir / "model.onnx",
        ORIGIN_FINE_TUNED,
        {"kappamask.parent_sha256": digest},
    )
    for part in ("held_out", "train"):
        before, after = report["before"][part], report["after"][part]
        click.echo(
            f"{part}: {before['pixels']:.0f} labelled px, agreement "
            f"{before['overall_accuracy']:.4f} -> {after['overall_accuracy']:.4f}"
        )
    if report["unlabelled_changed"] is not None:
        click.echo(
            f"unlabelled sub-tiles: {100 * report['unlabelled_changed']:.2f} % of their "
            "pixels change class"
        )
    click.echo(f"report: {out_dir / 'holdout.json'}")
    click.echo(f"model: {path} (install it: kappamask install-model {path})")


@tools.command("review-scenes")
@multiband_option
@band_folder_option
@click.option("--only", multiple=True, help="Scene name parts to keep (repeat).")
@existing_file_option(
    "--model", "model_path", "ONNX model [default: the repository's model of --level]."
)
@click.option("--level", type=click.Choice(LEVELS), required=True, help="Level of the model.")
@out_option(REVIEW_OUT_HELP)
@click.option("--top", type=click.IntRange(min=1), default=None, help="Keep the N first.")
@click.option(
    "--rank-by",
    type=click.Choice(["unsure", "disagreement"]),
    default="unsure",
    show_default=True,
    help="The model's own uncertainty, or its disagreement with the teachers "
    "(s2cloudless, ukis-csmask, SCL: the compare extra).",
)
def review_scenes_command(
    multiband: tuple[Path, ...],
    band_folders: tuple[tuple[str, Path], ...],
    only: tuple[str, ...],
    model_path: Path | None,
    level: str,
    out_dir: Path,
    top: int | None,
    rank_by: str,
) -> None:
    """`kappamask review` for real scenes that are not products (SEN12MS-CR patches, a
    band folder), with the model's ONNX file (the tools extra): the same review folder,
    for `label` and `train --labels labelled:DIR`."""
    from collections.abc import Iterator

    from tqdm import tqdm

    from kappamask.inference.repository import DEFAULT_REPOSITORY, FP32_FILE
    from kappamask.tools.distill import DataInputs
    from kappamask.tools.importance import OnnxClassifier
    from kappamask.tools.realdata import Imagery, matches
    from kappamask.tools.review import review_scenes

    if not multiband and not band_folders:
        raise click.UsageError("give --multiband or --band-folder")
    inputs = DataInputs(multiband=list(multiband), band_folders=list(band_folders))

    def scenes() -> Iterator[Imagery]:
        return (i for i in inputs.imagery() if not only or matches(i.name, only))

    model = model_path or DEFAULT_REPOSITORY / MODEL_NAMES[level] / "1" / FP32_FILE
    classify = OnnxClassifier(model, level)
    with tqdm(desc="scoring", unit="scene") as bar:

        def progress(_percent: int, message: str) -> None:
            bar.update(1)
            bar.set_postfix_str(message[-40:])

        kept = review_scenes(scenes, classify, out_dir, top, rank_by, progress)
    click.echo(f"{len(kept)} sub-tiles ranked by {rank_by}: {out_dir / 'index.html'}")
    for tile in kept[:10]:
        teachers = (
            "" if tile.disagreement is None else f", teachers {100 * tile.disagreement:.0f} %"
        )
        click.echo(f"  {tile.unsure:.3f}  {tile.name}{teachers}")


@tools.group("label")
def label() -> None:
    """People correct the sub-tiles `kappamask review` ranked: in Label Studio (push, pull)
    or CVAT (export-cvat, import-cvat); the labels land in REVIEW_DIR/labels."""


label_studio_url = click.option(
    "--url",
    default=None,
    help="Label Studio's address, e.g. http://localhost:8080 [pull: the one push recorded].",
)
label_studio_token = click.option(
    "--token",
    envvar="LABEL_STUDIO_API_KEY",
    default="",
    show_envvar=True,
    help="Personal access token (or legacy token) of a Label Studio user.",
)
review_dir = click.argument("review", type=click.Path(exists=True, file_okay=False, path_type=Path))


@label.command("push")
@review_dir
@label_studio_url
@label_studio_token
@click.option("--title", default=None, help="Project title [default: from REVIEW].")
@click.option("--top", type=click.IntRange(min=1), default=None, help="Push the N most unsure.")
def label_push_command(
    review: Path, url: str | None, token: str, title: str | None, top: int | None
) -> None:
    """A Label Studio project with REVIEW's sub-tiles as tasks, the model's mask as their
    pre-annotation."""
    from tqdm import tqdm

    from kappamask.tools.labelling.labelstudio import LabelStudio, push
    from kappamask.tools.labelling.subtiles import ReviewFolder

    if url is None:
        raise click.UsageError("--url is needed: the Label Studio server to create the project on")
    with tqdm(total=100, desc="push", unit="%") as bar:

        def progress(percent: int, message: str) -> None:
            bar.update(percent - bar.n)
            bar.set_postfix_str(message[-40:])

        pushed = push(ReviewFolder(review), LabelStudio(url, token), title, top, progress)
    click.echo(f"{len(pushed.tasks)} tasks in project {pushed.project}: {pushed.project_url}")


@label.command("pull")
@review_dir
@label_studio_url
@label_studio_token
@click.option("--project", type=int, default=None, help="Project id [default: push's].")
def label_pull_command(review: Path, url: str | None, token: str, project: int | None) -> None:
    """The finished annotations of REVIEW's Label Studio project as label rasters."""
    from kappamask.tools.labelling.labelstudio import LabelStudio, pull, recorded_project
    from kappamask.tools.labelling.subtiles import ReviewFolder

    folder = ReviewFolder(review)
    if url is None or project is None:
        recorded_url, recorded = recorded_project(folder)
        url, project = url or recorded_url, project or recorded
    written = pull(folder, LabelStudio(url, token), project)
    for path in written:
        click.echo(path)
    click.echo(f"{len(written)} labelled sub-tile(s) in {folder.root / 'labels'}")


@label.command("export-cvat")
@review_dir
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--top", type=click.IntRange(min=1), default=None, help="Export the N most unsure.")
def label_export_cvat_command(review: Path, out: Path, top: int | None) -> None:
    """REVIEW's sub-tiles as a CVAT "Segmentation mask 1.1" dataset (a folder, or OUT.zip):
    images for a CVAT task, and masks (labels where made, else the model's) to import."""
    from kappamask.tools.labelling.cvat import export_dataset
    from kappamask.tools.labelling.subtiles import ReviewFolder

    click.echo(export_dataset(ReviewFolder(review), out, top))


@label.command("import-cvat")
@review_dir
@click.argument("source", type=click.Path(exists=True, path_type=Path))
def label_import_cvat_command(review: Path, source: Path) -> None:
    """The masks of a CVAT "Segmentation mask 1.1" export (zip or folder) as label rasters."""
    from kappamask.tools.labelling.cvat import import_dataset
    from kappamask.tools.labelling.subtiles import ReviewFolder

    written = import_dataset(ReviewFolder(review), source)
    click.echo(f"{len(written)} labelled sub-tile(s) in {review / 'labels'}")


@tools.command("distill")
@out_option("Folder for the teachers' labels, checkpoint, metrics.csv, holdout.json, model.onnx.")
@click.option("--level", type=click.Choice(LEVELS), required=True)
@multiband_option
@band_folder_option
@click.option(
    "--safe",
    "safes",
    nargs=2,
    multiple=True,
    type=(click.Choice([str(r) for r in RESOLUTIONS]), click.Path(exists=True, path_type=Path)),
    help="RESOLUTION SAFE: a SAFE product read at that resolution (L2A: with SCL).",
)
@paths_option("--npy", "npy", "eo-learn REFERENCE_SCENES.npy ([N, H, W, 13] reflectance).")
@paths_option("--mat", "mat", "DSen2 .mat scene (cloud-free, no B10: pseudo-L2A only).")
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
@click.option(
    "--open-water",
    default=None,
    type=click.FloatRange(0.0, 1.0),
    help="Share of training crops whose clear ground becomes open water [default: "
    "DistillConfig's].",
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
    open_water: float | None,
    seed: int,
    version_label: str | None,
) -> None:
    """Distil bootstrap weights from s2cloudless, ukis-csmask, SCL and the B10 rule on real
    imagery; hold out whole scenes; export model.onnx (needs the train and compare extras
    and ukis-csmask)."""
    from kappamask.bands import DEFAULT_FEATURES, DEFAULT_MAX_V
    from kappamask.tools.distill import DataInputs, DistillConfig, distill
    from kappamask.tools.export import export_onnx
    from kappamask.tools.metrics import without_nan

    inputs = DataInputs(
        multiband=list(multiband),
        band_folders=list(band_folders),
        safes=[(int(r), p) for r, p in safes],
        npy=list(npy),
        mat=list(mat),
    )
    config = DistillConfig(
        level=level, holdout=holdout, base_filters=base_filters, pseudo_l2a=not no_pseudo_l2a
    )
    # the flags tune the distillation recipe; the rest of it (loss, patience, clipping,
    # bfloat16) is DistillConfig's
    config.fit = dataclasses.replace(
        config.fit,
        crop=crop,
        batch_size=batch_size,
        steps_per_epoch=steps_per_epoch,
        max_epochs=max_epochs,
        max_minutes=max_minutes,
        learning_rate=learning_rate,
        seed=seed,
    )
    if bare_ground is not None:
        config.bare_ground = bare_ground
    if open_water is not None:
        config.open_water = open_water
    model, report = distill(inputs, config, out_dir, labels_cache)
    label = version_label or f"bootstrap-distilled-{level.lower()}"
    path = export_onnx(
        model, level, DEFAULT_FEATURES[level], DEFAULT_MAX_V[level], label, out_dir / "model.onnx"
    )
    click.echo(json.dumps(without_nan(report), indent=2))
    click.echo(f"model: {path}")
