"""The `kappamask` command: run | serve | wait-triton | install-model, and the tools'
commands (kappamask.tools.cli). Declarations and calls: options are checked by
RunOptions, errors mapped to exit codes by their class."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from kappamask import __version__
from kappamask.bands import LEVELS
from kappamask.cli_options import (
    REVIEW_OUT_HELP,
    F,
    existing_file_option,
    install_repository_option,
    out_option,
    protocol_option,
    repository_option,
    run_option_flags,
    runtime_settings,
    triton_url_option,
)
from kappamask.errors import KappaMaskError
from kappamask.options import RunOptions
from kappamask.settings import Settings
from kappamask.writers.stac_collection import DEFAULT_COLLECTION_ID

if TYPE_CHECKING:  # the pipeline's imports (rasterio, tritonclient) wait for a command
    from kappamask.pipeline import ProgressFn

LOGGER = logging.getLogger(__name__)

#: The extra that brings each optional package a command may need.
_EXTRAS = {
    "h5py": "tools",
    "onnxruntime": "tools",
    "torch": "train",
    "matplotlib": "train",
    "s2cloudless": "compare",
    "ukis_csmask": "compare",
    "cv2": "compare",
    "openvino": "triton",
}


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


def product_options(command: F) -> F:
    """The per-product options of `run`, `batch` and `review`: RunOptions' flags
    (``run_option_flags``) and where Triton is."""
    decorators = [*run_option_flags(), triton_url_option, protocol_option, repository_option]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


@contextmanager
def _triton_and_progress(flags: dict[str, Any], desc: str) -> Iterator[tuple[Any, ProgressFn]]:
    """A ready Triton client (a local Triton started when none is configured) and a
    progress bar on stderr."""
    from kappamask.inference.server import triton_endpoint
    from kappamask.inference.triton import TritonClient

    with ExitStack() as stack:
        config = runtime_settings(flags)
        triton = triton_endpoint(stack, config)
        client = stack.enter_context(TritonClient(triton.url, config.triton_protocol))
        client.wait_ready()
        bar = stack.enter_context(tqdm(total=100, unit="%", desc=desc, file=sys.stderr))
        # log lines are written above the bar instead of through it
        stack.enter_context(logging_redirect_tqdm())

        def progress(percent: int, message: str) -> None:
            bar.update(percent - bar.n)
            bar.set_postfix_str(message[-40:])

        yield client, progress
        bar.update(100 - bar.n)


@main.command("run")
@click.argument("product")
@click.option(
    "--out",
    "output",
    required=True,
    help="Folder or s3://bucket/prefix for the mask COG, confidence COG, preview and STAC item.",
)
@product_options
def run_command(product: str, output: str, **flags: Any) -> None:
    """Mask PRODUCT: a .SAFE folder or .zip, s3://bucket/...SAFE (or .zip), or a STAC item
    (URL, s3:// or local .json), L1C or L2A. S3 settings come from the environment
    (AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ..., KAPPAMASK_S3_REQUESTER_PAYS)."""
    from kappamask.pipeline import run
    from kappamask.sources import open_product

    options = RunOptions.from_flags(flags)
    # a product that cannot be read is said before Triton starts (seconds, not a start-up)
    opened = open_product(product)
    with _triton_and_progress(flags, "kappamask") as (client, progress):
        result = run(opened, output, client, options, progress=progress)
    summary = result.to_json()  # the job result's figures, with its denominators
    for key, href in result.files.items():
        click.echo(f"{'STAC item:' if key == 'item' else key + ':':<12} {href}")
    where = " inside the bbox/aoi" if options.area is not None else ""
    denominator = "the area's" if where else "all"
    click.echo(
        f"classes (% of pixels with data{where}): " + json.dumps(summary["class_percentages"])
    )
    click.echo(
        f"cloud cover: {summary['cloud_cover']} % of pixels with data{where}; "
        f"missing: {summary['missing_percentage']} % of "
        f"{denominator} pixels"
    )
    if result.reused:
        click.echo("an identical result was already there: not computed again (--overwrite)")
    else:
        click.echo(
            f"{result.crops_inferred}/{result.crops_total} crops inferred in {result.seconds:.1f} s"
        )


@main.command("batch")
@click.argument("products", nargs=-1)
@click.option(
    "--products-file",
    type=click.File("r"),
    default=None,
    help="More products, one per line ('-': standard input; # starts a comment).",
)
@click.option(
    "--out",
    "output",
    required=True,
    help="Folder or s3://bucket/prefix for every product's result and collection.json.",
)
@click.option(
    "--collection-id",
    default=DEFAULT_COLLECTION_ID,
    show_default=True,
    help="Id of the STAC Collection over the results.",
)
@click.option(
    "--search",
    "search_json",
    default=None,
    help="Instead of PRODUCTS: a STAC API search as JSON (or @FILE): url, collections, bbox "
    "or intersects, datetime, query, filter, max_items.",
)
@click.option(
    "--stac-api",
    default=None,
    help="Root URL of a STAC API with Transactions: the collection and items go there too.",
)
@product_options
def batch_command(
    products: tuple[str, ...],
    products_file: Any,
    output: str,
    collection_id: str,
    search_json: str | None,
    stac_api: str | None,
    **flags: Any,
) -> None:
    """Mask every PRODUCT (anything `run` takes), or every item a STAC API search finds,
    into one output with a STAC Collection (collection.json) over the results. A product
    that fails is reported and the batch goes on; the exit code is 1 when any failed."""
    from kappamask.access import AccessPolicy
    from kappamask.jobs.batch import check_batch, resolve_search, run_batch
    from kappamask.writers.stac_api import check_api

    listed: list[Any] = list(products)
    if products_file is not None:
        lines = (line.split("#", 1)[0].strip() for line in products_file)
        listed += [line for line in lines if line]
    policy = AccessPolicy.unrestricted()
    if search_json is not None:
        listed = resolve_search(listed, _read_json_option(search_json, "--search"), policy)
    check_batch(listed, collection_id)
    stac_api = check_api(stac_api, policy) if stac_api else None
    options = RunOptions.from_flags(flags)
    with _triton_and_progress(flags, "kappamask batch") as (client, progress):
        result = run_batch(
            listed,
            output,
            client,
            options,
            collection_id=collection_id,
            progress=progress,
            stac_api_url=stac_api,
        )
    for outcome in result.products:
        if outcome.status == "successful":
            again = " (already there)" if outcome.reused else ""
            click.echo(
                f"ok      {outcome.product}: {outcome.item}, cloud cover "
                f"{outcome.cloud_cover} %{again}"
            )
        else:
            click.echo(f"FAILED  {outcome.product}: {outcome.message}")
    click.echo(f"collection: {result.collection} ({result.succeeded}/{len(listed)} products)")
    if result.stac_api is not None:
        click.echo(
            f"STAC API: {result.stac_api['collection']} "
            f"({result.stac_api['published']} items published)"
        )
        for name, why in result.stac_api["errors"].items():
            click.echo(f"NOT PUBLISHED  {name}: {why}")
    if result.succeeded < len(listed):
        sys.exit(1)


@main.command("review")
@click.argument("products", nargs=-1, required=True)
@out_option(REVIEW_OUT_HELP)
@click.option(
    "--top",
    type=click.IntRange(min=1),
    default=None,
    help="Keep the N most unsure sub-tiles (default: all).",
)
@product_options
def review_command(products: tuple[str, ...], out_dir: Path, top: int | None, **flags: Any) -> None:
    """Rank the 512 px sub-tiles of PRODUCTS by how unsure the served model is (small
    top-2 margins, low confidence) and write, for each, the band stack it saw, its mask,
    a true-colour PNG and the mask over it; index.json and index.html rank them. What to
    label first (the paper's active learning)."""
    from kappamask.sources import open_product
    from kappamask.tools.review import review

    options = RunOptions.from_flags(flags)
    opened = [open_product(p) for p in products]  # unreadable ones end here, before Triton
    with _triton_and_progress(flags, "review") as (client, progress):
        kept = review(opened, out_dir, client, options, top, progress)
    click.echo(f"{len(kept)} sub-tiles ranked, most unsure first: {out_dir / 'index.html'}")
    for tile in kept[:10]:
        click.echo(
            f"  {tile.unsure:.3f}  {tile.name}  low confidence {100 * tile.low_confidence:.0f} %"
        )


def _read_json_option(value: str, option: str) -> Any:
    """A JSON option's value: the JSON itself or @FILE."""
    try:
        text = Path(value[1:]).read_text() if value.startswith("@") else value
        return json.loads(text)
    except (OSError, ValueError) as err:
        raise click.BadParameter(f"not JSON (nor @FILE of JSON): {err}", param_hint=option) from err


def service_options(command: F) -> F:
    """What the API (`serve`) and the queue's workers (`worker`) share: Triton, the output
    folder, the data roots, the job queue. Each flag overrides its setting
    (kappamask.settings; `kappamask settings` lists them)."""
    decorators = [
        triton_url_option,
        protocol_option,
        repository_option,
        click.option(
            "--output-dir",
            type=click.Path(path_type=Path),
            default=None,
            help="Where results are written (KAPPAMASK_OUTPUT_DIR; default: kappamask-results).",
        ),
        click.option(
            "--data-root",
            "data_roots",
            type=click.Path(path_type=Path),
            multiple=True,
            help="Folder whose products may be processed (repeatable; "
            "KAPPAMASK_DATA_ROOTS; default: the current folder).",
        ),
    ]
    for decorator in reversed(decorators):
        command = decorator(command)
    return command


def _service_settings(flags: dict[str, Any]) -> Settings:
    flags = {**flags, "data_roots": tuple(flags["data_roots"]) or None}
    return runtime_settings(flags)


@main.command("serve")
@click.option("--host", default=None, help="Address to bind (KAPPAMASK_HOST; default: 127.0.0.1).")
@click.option("--port", default=None, type=int, help="Port (KAPPAMASK_PORT; default: 5000).")
@click.option(
    "--broker-url",
    default=None,
    help="Redis URL of the job queue (KAPPAMASK_BROKER_URL): jobs then run on `kappamask "
    "worker` processes (default: in this process's threads).",
)
@service_options
def serve_command(**flags: Any) -> None:
    """Serve the OGC API - Processes endpoint (pygeoapi) with the kappamask processes."""
    from kappamask.api.serve import serve

    serve(_service_settings(flags))


@main.command("worker")
@click.option(
    "--broker-url",
    default=None,
    help="Redis URL of the job queue, the API's (KAPPAMASK_BROKER_URL; required).",
)
@click.option(
    "--public-url",
    default=None,
    help="The API's URL: results name their files under it, it serves the output folder "
    "(KAPPAMASK_PUBLIC_URL; default: http://localhost:5000).",
)
@service_options
def worker_command(**flags: Any) -> None:
    """Take jobs from the queue and run them, one at a time (start as many as the Triton
    behind them can feed; see deploy/README.md)."""
    from kappamask.jobs.worker import work

    work(_service_settings(flags))


@main.command("settings")
@click.option("--markdown", is_flag=True, help="The README's table of variables instead.")
def settings_command(markdown: bool) -> None:
    """The service's settings (environment variables) with this environment's values."""
    from kappamask import settings

    click.echo(settings.markdown_table() if markdown else settings.describe(settings.current()))


@main.command("wait-triton")
@click.argument("url", required=False)
@protocol_option
@click.option(
    "--timeout", default=None, type=float, help="Seconds to wait (KAPPAMASK_TRITON_WAIT_S)."
)
def wait_triton_command(url: str | None, protocol: str | None, timeout: float | None) -> None:
    """Wait until the Triton server at URL (KAPPAMASK_TRITON_URL) is ready (for container
    start-up)."""
    from kappamask.inference.triton import TritonClient

    config = runtime_settings({"triton_url": url, "protocol": protocol, "triton_wait_s": timeout})
    if config.triton_url is None:
        raise click.UsageError("give URL or set KAPPAMASK_TRITON_URL")
    url = config.triton_url
    with TritonClient(url, config.triton_protocol) as client:
        client.wait_ready(config.triton_wait_s)
    click.echo(f"Triton at {url} is ready")


@main.command("openapi")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--output-file", type=click.Path(dir_okay=False, path_type=Path), required=True)
def openapi_command(config: Path, output_file: Path) -> None:
    """Write the service's OpenAPI document of a pygeoapi CONFIG (filled in with the
    settings, as the service does), self-contained: the OGC schemas it refers to are
    components of it (no schema server needed)."""
    import tempfile

    from kappamask import settings
    from kappamask.api.ogc import openapi_document
    from kappamask.api.serve import write_config

    with tempfile.TemporaryDirectory() as scratch:
        resolved = write_config(Path(scratch), settings.current(), config)
        output_file.write_text(openapi_document(resolved))


@main.command("install-model")
@click.argument("onnx_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@install_repository_option("Triton model repository")
@click.option(
    "--level", type=click.Choice(LEVELS), default=None, help="Override the level in the file."
)
@existing_file_option(
    "--int8",
    "int8_file",
    "The accepted INT8 variant (kappamask quantize) for the CPU config to run.",
)
def install_model_command(
    onnx_file: Path, repository: Path | None, level: str | None, int8_file: Path | None
) -> None:
    """Place an exported ONNX model in the Triton model repository with its configs."""
    from kappamask.inference.repository import DEFAULT_REPOSITORY, install_model

    click.echo(install_model(onnx_file, repository or DEFAULT_REPOSITORY, level, 1, int8_file))


# the tools' commands, as `kappamask train` etc.
from kappamask.tools.cli import tools as _tools  # noqa: E402

for _command in _tools.commands.values():
    main.add_command(_command)


if __name__ == "__main__":
    main()
