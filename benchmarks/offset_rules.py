"""How far km_predict's offset rule moves the classes from the training rule, on real
products with a baseline-04.00 offset, for each served model (kappamask.inference.
model_spec.OFFSET_RULES). Prints a table; ``--json`` writes it.

    .venv/bin/python benchmarks/offset_rules.py [--product SAFE]... [--resolution 60]

The served FP32 ONNX of each level runs in ONNX Runtime on 512 px crops of the whole
product (no overlap: the same crops under both rules, so only the inputs differ).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import onnxruntime as ort
from rasterio.windows import Window

from kappamask.bands import CLASS_NAMES, MODEL_NAMES, MaskClass
from kappamask.geometry.grid import output_grid
from kappamask.inference.model_spec import OFFSET_KM_PREDICT, OFFSET_TRAINING
from kappamask.inference.repository import DEFAULT_REPOSITORY, spec_from_onnx
from kappamask.reading.reader import BandReader
from kappamask.sources import open_safe

ROOT = Path(__file__).resolve().parents[1]
T29UNU = ROOT / "tests/data/s2/S2A_MSIL2A_20221005T115411_N0400_R023_T29UNU_20221005T164454.SAFE"
CROP = 512


def classify(product_path: Path, resolution: int, rule: str) -> tuple[np.ndarray, np.ndarray]:
    """The served model's classes over the whole product under ``rule``, and validity."""
    product = open_safe(product_path)
    model_file = DEFAULT_REPOSITORY / MODEL_NAMES[product.level] / "1" / "model.onnx"
    spec = spec_from_onnx(model_file)
    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    grid = output_grid(product, resolution)
    classes = np.zeros((grid.height, grid.width), np.uint8)
    valid = np.zeros_like(classes, dtype=bool)
    with BandReader(product, spec.features, spec.max_v, grid, offset_rule=rule) as reader:
        for row in range(0, grid.height, CROP):
            height = min(CROP, grid.height - row)
            strip, strip_valid = reader.read(Window(0, row, grid.width, height))
            valid[row : row + height] = strip_valid
            for col in range(0, grid.width, CROP):
                width = min(CROP, grid.width - col)
                crop = np.zeros((1, len(spec.features), CROP, CROP), np.float32)
                crop[0, :, :height, :width] = strip[:, :, col : col + width]
                out = session.run(["classes"], {"input": crop})[0][0]
                classes[row : row + height, col : col + width] = out[:height, :width]
    return classes, valid


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--product", action="append", type=Path, default=None)
    parser.add_argument("--resolution", type=int, default=60)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    rows = []
    for product in args.product or [T29UNU]:
        trained, valid = classify(product, args.resolution, OFFSET_TRAINING)
        km, _ = classify(product, args.resolution, OFFSET_KM_PREDICT)
        same = float((trained == km)[valid].mean())
        shares = {}
        for code in (
            MaskClass.CLEAR,
            MaskClass.CLOUD_SHADOW,
            MaskClass.SEMI_TRANSPARENT_CLOUD,
            MaskClass.CLOUD,
        ):
            shares[CLASS_NAMES[code]] = (
                round(100 * float((trained == code)[valid].mean()), 2),
                round(100 * float((km == code)[valid].mean()), 2),
            )
        rows.append(
            {
                "product": product.name,
                "level": open_safe(product).level,
                "resolution": args.resolution,
                "pixels": int(valid.sum()),
                "same_class": round(same, 4),
                "class_percent_training_vs_km_predict": shares,
            }
        )
    print("| product | level | m | pixels | same class | class % (training / km_predict) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        shares = ", ".join(
            f"{k} {a} / {b}" for k, (a, b) in r["class_percent_training_vs_km_predict"].items()
        )
        print(
            f"| {r['product'][:45]} | {r['level']} | {r['resolution']} | {r['pixels']} | "
            f"{100 * r['same_class']:.2f} % | {shares} |"
        )
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
