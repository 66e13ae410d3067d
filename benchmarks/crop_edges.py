"""How far from a crop's edge the served model's classes depend on where the crop was cut.

    python benchmarks/crop_edges.py                 # both served models
    python benchmarks/crop_edges.py --level L1C --json crop_edges.json

Real SEN12MS-CR patches (../shared/data/sen12mscr/cr_pairs, 256 px each) are laid out 3 x 3
into 768 px scenes (L2A: brought near bottom of atmosphere as for distillation). Each scene
is cut twice, at column 0 and at column 128; in their common columns a pixel near one
crop's edge is far from the other's, so the share of equal classes, by distance to the
nearer edge, says how much context the model needs: the overlap that blending needs to
keep every pixel that far inside a crop (kappamask.bands.TILE_OVERLAP).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PATCHES = ROOT.parent / "shared" / "data" / "sen12mscr" / "cr_pairs"
DISTANCES = (0, 1, 2, 4, 8, 12, 16, 24, 32, 48, 63)
SHIFT = 128


def scenes(level: str) -> list[np.ndarray]:
    from kappamask.tools import realdata

    patches = []
    for path in sorted(PATCHES.glob("*.tif")):
        img = realdata.read_multiband(path)
        if level == "L2A":
            img = realdata.pseudo_l2a(img, np.random.default_rng(0))
        patches.append(realdata.features(img, level))
    out = []
    for first in range(0, len(patches) - 8, 9):
        rows = [
            np.concatenate(patches[first + 3 * r : first + 3 * r + 3], axis=2) for r in range(3)
        ]
        out.append(np.concatenate(rows, axis=1)[:, : 512 + SHIFT, : 512 + SHIFT])
    return out


def agreement_by_distance(level: str) -> dict[int, float]:
    import onnxruntime as ort

    from kappamask.bands import MODEL_NAMES
    from kappamask.inference.model_spec import OUTPUT_SCORES, decide

    model = ROOT / "triton_models" / MODEL_NAMES[level] / "1" / "model.onnx"
    session = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])

    def classes(crop: np.ndarray) -> np.ndarray:
        return decide(session.run([OUTPUT_SCORES], {"input": crop[None]})[0][0])[0]

    same = {d: [] for d in DISTANCES}  # type: dict[int, list[float]]
    for scene in scenes(level):
        left, right = classes(scene[:, :512, :512]), classes(scene[:, :512, SHIFT:])
        for d in DISTANCES:
            # d px inside the right crop's left edge, and d px inside the left crop's right edge
            same[d].append(float((left[:, SHIFT + d] == right[:, d]).mean()))
            same[d].append(float((left[:, 511 - d] == right[:, 511 - d - SHIFT]).mean()))
    return {d: float(np.mean(v)) for d, v in same.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--level", action="append", choices=("L1C", "L2A"))
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    results = {level: agreement_by_distance(level) for level in args.level or ("L1C", "L2A")}
    print("| px from the crop's edge | " + " | ".join(results) + " |")
    print("|---|" + "---|" * len(results))
    for d in DISTANCES:
        print(f"| {d} | " + " | ".join(f"{100 * r[d]:.2f} %" for r in results.values()) + " |")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
