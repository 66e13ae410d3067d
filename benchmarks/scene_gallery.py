"""Look at a served model on real scenes: true colour, the teachers' fused labels and the
model's mask side by side, and a table of what it calls each scene.

    python benchmarks/scene_gallery.py triton_models/kappamask_l1c/1/model.onnx \
        runs/labels --level L1C --png gallery_l1c.png [--only HOLDOUT_PATTERN ...] \
        [--json holdout.json]

``--json`` writes ``kappamask distill``'s holdout report of the model on the chosen scenes
(all of them, not only the ``--max-scenes`` drawn): the same numbers for any served file,
so models made before and after a change are compared on the same labels. It prints what
a user sees pooled over the chosen scenes and by acquisition kind (cloudy, or published as
cloud-free: ``distill.ACQUISITION_KINDS``).

The scenes are the ``kappamask distill`` label cache (``--labels-cache``): features exactly
as the service feeds them, so what is drawn is what Triton would answer. The model runs
through ONNX Runtime on the served ONNX file (classes output).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib
import numpy as np
import onnxruntime as ort

from kappamask.bands import CLASS_COLORS, CLASS_NAMES, DEFAULT_FEATURES, DEFAULT_MAX_V, MaskClass
from kappamask.tools.distill import held_out, holdout_report, load_scene, scene_identity
from kappamask.tools.metrics import CLASSES, without_nan

matplotlib.use("Agg")
import matplotlib.pyplot as plt


def predict(session: ort.InferenceSession, features: np.ndarray) -> np.ndarray:
    """Classes of the served graph for a [C, H, W] array (padded to a multiple of 16)."""
    _c, h, w = features.shape
    padded = np.pad(features, ((0, 0), (0, -h % 16), (0, -w % 16)))[None]
    classes: np.ndarray = session.run(["classes"], {"input": padded})[0][0, :h, :w]
    return classes


def true_colour(features: np.ndarray, level: str) -> np.ndarray:
    names, max_v = DEFAULT_FEATURES[level], DEFAULT_MAX_V[level]
    rgb = [
        features[names.index(b)] * max_v[names.index(b)] * 65535 / 10000
        for b in ("B04", "B03", "B02")
    ]
    return np.clip(np.stack(rgb, axis=-1) / 0.3, 0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("labels", type=Path, help="kappamask distill --labels-cache folder")
    parser.add_argument("--level", choices=("L1C", "L2A"), required=True)
    parser.add_argument(
        "--only",
        nargs="*",
        default=[],
        help="keep the scenes these distill --holdout patterns hold out",
    )
    parser.add_argument("--png", type=Path, required=True)
    parser.add_argument("--max-scenes", type=int, default=40)
    parser.add_argument("--json", type=Path, help="write the holdout report here")
    args = parser.parse_args()
    session = ort.InferenceSession(str(args.model), providers=["CPUExecutionProvider"])
    files = sorted(args.labels.glob(f"{args.level}_*.npz"))
    if args.only:
        # the distill's own rule: the same --holdout patterns give the same scenes
        files = [f for f in files if held_out(*scene_identity(f), args.only)]
    chosen = [load_scene(f) for f in files] if args.json else []
    if args.json:
        report = holdout_report(chosen, lambda f: predict(session, f))
        args.json.write_text(json.dumps(without_nan(report), indent=2))
        trust = {"all": report["trust"], **report["trust_by_acquisition"]}
        print(json.dumps(without_nan(trust), indent=2))
    files = files[: args.max_scenes]
    lut = np.zeros((256, 3), np.float32)
    for code, rgba in CLASS_COLORS.items():
        lut[code] = np.asarray(rgba[:3]) / 255
    lut[MaskClass.UNDEFINED] = (1.0, 0.0, 0.0)  # teachers disagree
    fig, axes = plt.subplots(len(files), 3, figsize=(7.5, 2.5 * len(files)), squeeze=False)
    header = f"{'scene':<70}" + "".join(f"{CLASS_NAMES[c]:>24}" for c in CLASSES)
    print(header)
    for i, (row, path) in enumerate(zip(axes, files, strict=True)):
        scene = chosen[i] if chosen else load_scene(path)  # read once
        pred = predict(session, scene.features)
        valid = pred != MaskClass.MISSING
        share = [100 * float((pred[valid] == c).mean()) if valid.any() else 0.0 for c in CLASSES]
        print(f"{scene.name[:70]:<70}" + "".join(f"{s:>23.1f}%" for s in share))
        for ax, img, title in zip(
            row,
            (true_colour(scene.features, args.level), lut[scene.labels], lut[pred]),
            (scene.name[-34:], "teachers (red: disagree)", "model"),
            strict=True,
        ):
            ax.imshow(img, interpolation="nearest")
            ax.set_title(title, fontsize=7)
            ax.axis("off")
    fig.tight_layout()
    fig.savefig(args.png, dpi=60)
    print(f"PNG: {args.png}")


if __name__ == "__main__":
    main()
