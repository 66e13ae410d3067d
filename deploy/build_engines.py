#!/usr/bin/env python3
"""Build FP16 TensorRT plans from the ONNX models of a Triton model repository.

Runs on the target GPU host at deploy time (an engine is tied to the GPU model and the
TensorRT version), inside the TensorRT container that matches the Triton release:

    python3 build_engines.py --repository /models [--models kappamask_l2a] [--dry-run]

Each ``<model>/<version>/model.onnx`` becomes ``model.plan`` next to it, with a stamp file
recording what it was built from; a plan whose stamp matches (same ONNX bytes, same
TensorRT, same GPU, same options) is skipped. Needs only the standard library and onnx.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

INPUT = "input"
TILE = 512


@dataclass(frozen=True)
class BuildOptions:
    """Dynamic batch profile and builder settings of the plans."""

    min_batch: int = 1
    opt_batch: int = 8
    max_batch: int = 16
    workspace_mib: int = 4096


def check_onnx(path: Path) -> int:
    """onnx.checker passes, the batch axis is dynamic, the crop is 512 x 512; returns C."""
    import onnx

    model = onnx.load(str(path))
    onnx.checker.check_model(model)
    inputs = {i.name: i for i in model.graph.input}
    if INPUT not in inputs:
        raise SystemExit(f"{path}: no input named {INPUT!r}")
    dims = inputs[INPUT].type.tensor_type.shape.dim
    if len(dims) != 4 or dims[0].dim_value or not dims[0].dim_param:
        raise SystemExit(f"{path}: input must be [batch, C, H, W] with a dynamic batch axis")
    channels = dims[1].dim_value
    if channels <= 0:
        raise SystemExit(f"{path}: the channel axis must be fixed")
    return channels


def trtexec_command(
    trtexec: str, onnx_path: Path, plan_path: Path, channels: int, options: BuildOptions
) -> list[str]:
    """The trtexec call that builds one plan: FP16, FP16 input binding, dynamic batch."""

    def shape(batch: int) -> str:
        return f"{INPUT}:{batch}x{channels}x{TILE}x{TILE}"

    return [
        trtexec,
        f"--onnx={onnx_path}",
        f"--saveEngine={plan_path}",
        "--fp16",
        "--inputIOFormats=fp16:chw",
        f"--minShapes={shape(options.min_batch)}",
        f"--optShapes={shape(options.opt_batch)}",
        f"--maxShapes={shape(options.max_batch)}",
        f"--memPoolSize=workspace:{options.workspace_mib}",
        "--skipInference",
    ]


def environment_id(trtexec: str) -> str:
    """TensorRT version and GPU name: a plan built elsewhere is not reused."""
    parts = [os.environ.get("TRT_VERSION", os.environ.get("TENSORRT_VERSION", "unknown-trt"))]
    if shutil.which("nvidia-smi"):
        gpu = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
        parts.append(gpu or "unknown-gpu")
    parts.append(Path(trtexec).name)
    return " | ".join(parts)


def stamp_for(onnx_path: Path, env_id: str, options: BuildOptions) -> str:
    digest = hashlib.sha256(onnx_path.read_bytes()).hexdigest()
    return json.dumps(
        {"onnx_sha256": digest, "environment": env_id, "options": asdict(options)}, sort_keys=True
    )


def build(
    repository: Path, models: list[str] | None, trtexec: str, options: BuildOptions, dry_run: bool
) -> int:
    """Build every missing or stale plan; returns how many were built."""
    built = 0
    env_id = environment_id(trtexec)
    for onnx_path in sorted(repository.glob("*/[0-9]*/model.onnx")):
        model = onnx_path.parent.parent.name
        if models and model not in models:
            continue
        channels = check_onnx(onnx_path)
        plan = onnx_path.with_name("model.plan")
        stamp_path = onnx_path.with_name("model.plan.stamp")
        stamp = stamp_for(onnx_path, env_id, options)
        if plan.exists() and stamp_path.exists() and stamp_path.read_text() == stamp:
            print(f"{model}: plan is current, skipped", flush=True)
            continue
        command = trtexec_command(
            trtexec, onnx_path, plan.with_suffix(".plan.tmp"), channels, options
        )
        print(" ".join(command), flush=True)
        if dry_run:
            continue
        subprocess.run(command, check=True)
        plan.with_suffix(".plan.tmp").replace(plan)  # Triton never sees a half-written plan
        stamp_path.write_text(stamp)
        built += 1
    return built


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repository", type=Path, required=True)
    parser.add_argument(
        "--models", nargs="*", default=None, help="model names (default: all with an ONNX)"
    )
    parser.add_argument("--trtexec", default="/usr/src/tensorrt/bin/trtexec")
    parser.add_argument("--min-batch", type=int, default=BuildOptions.min_batch)
    parser.add_argument("--opt-batch", type=int, default=BuildOptions.opt_batch)
    parser.add_argument("--max-batch", type=int, default=BuildOptions.max_batch)
    parser.add_argument("--workspace-mib", type=int, default=BuildOptions.workspace_mib)
    parser.add_argument("--dry-run", action="store_true", help="check and print, build nothing")
    args = parser.parse_args(argv)
    options = BuildOptions(args.min_batch, args.opt_batch, args.max_batch, args.workspace_mib)
    if not args.min_batch <= args.opt_batch <= args.max_batch:
        parser.error("need min-batch <= opt-batch <= max-batch")
    built = build(args.repository, args.models, args.trtexec, options, args.dry_run)
    print(f"{built} plan(s) built", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
