"""CVAT's "Segmentation mask 1.1" dataset (Pascal VOC segmentation, as CVAT and datumaro
read and write it), out and back, for teams that label in CVAT.

Out: ``JPEGImages/`` holds the sub-tiles' true-colour PNGs (a CVAT task is made of
these), ``SegmentationClass/`` one RGB PNG per sub-tile in the classes' colours (its label
raster where one exists, else the model's mask: the pre-annotation),
``ImageSets/Segmentation/default.txt`` the names and ``labelmap.txt`` the colour of each
class, black being ``background``: not labelled. Back: the class PNGs of an export from
CVAT (a zip or its folder; RGB or palette PNGs) become label rasters.
"""

from __future__ import annotations

import shutil
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import rasterio
from rasterio.errors import NotGeoreferencedWarning

from kappamask.bands import CLASS_NAMES, OUTPUT_CLASSES, MaskClass
from kappamask.errors import InvalidInputError
from kappamask.tools.labelling.subtiles import LABEL_COLOURS, ReviewFolder, read_labels
from kappamask.writers.preview import write_png

LABELMAP = "labelmap.txt"
CLASS_DIR = "SegmentationClass"
IMAGE_DIR = "JPEGImages"  # VOC's name; the images are PNGs
SUBSET = Path("ImageSets") / "Segmentation" / "default.txt"
BACKGROUND = "background"
BACKGROUND_COLOUR = (0, 0, 0)


def _palette() -> dict[str, tuple[int, int, int]]:
    return {
        BACKGROUND: BACKGROUND_COLOUR,
        **{CLASS_NAMES[c]: LABEL_COLOURS[int(c)] for c in OUTPUT_CLASSES},
    }


def labelmap() -> str:
    """``labelmap.txt``: one ``name:r,g,b::`` line per label, background first."""
    lines = ["# label:color_rgb:parts:actions"]
    lines += [f"{name}:{r},{g},{b}::" for name, (r, g, b) in _palette().items()]
    return "\n".join(lines) + "\n"


def colour_image(labels: np.ndarray) -> np.ndarray:
    """Mask codes [h, w] as an RGB uint8 [3, h, w] image in the label colours."""
    rgb = np.zeros((3, *labels.shape), np.uint8)
    for code, colour in LABEL_COLOURS.items():
        rgb[:, labels == code] = np.array(colour, np.uint8)[:, None]
    return rgb


def export_dataset(folder: ReviewFolder, out: Path, top: int | None = None) -> Path:
    """The review's ``top`` sub-tiles as a Segmentation mask 1.1 dataset in ``out`` (a
    folder, or a zip where ``out`` ends in .zip)."""
    tiles = folder.tiles[:top]
    if not tiles:
        raise InvalidInputError(f"the review {folder.root} holds no sub-tiles")
    with tempfile.TemporaryDirectory(dir=out.parent if out.parent.exists() else None) as tmp:
        root = Path(tmp) / "dataset"
        for sub in (CLASS_DIR, IMAGE_DIR, str(SUBSET.parent)):
            (root / sub).mkdir(parents=True)
        (root / LABELMAP).write_text(labelmap())
        (root / SUBSET).write_text("".join(f"{t.name}\n" for t in tiles))
        for tile in tiles:
            shutil.copyfile(tile.rgb, root / IMAGE_DIR / f"{tile.name}.png")
            labelled = folder.label_path(tile.name)
            labels = read_labels(labelled)[0] if labelled.exists() else tile.read_mask()
            write_png(colour_image(labels), root / CLASS_DIR / f"{tile.name}.png")
        if out.suffix == ".zip":
            partial = out.with_name(out.name + ".partial")
            with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED) as archive:
                for path in sorted(root.rglob("*")):
                    archive.write(path, path.relative_to(root).as_posix())
            partial.replace(out)
        else:
            if out.exists():
                raise InvalidInputError(f"{out} exists: give a new folder or a .zip")
            shutil.move(str(root), out)
    return out


def read_labelmap(text: str) -> dict[tuple[int, int, int], int]:
    """Colour -> mask code of a ``labelmap.txt`` (background: UNDEFINED)."""
    codes = {name: int(c) for c, name in CLASS_NAMES.items()}
    codes[BACKGROUND] = int(MaskClass.UNDEFINED)
    found = {}
    for line in text.splitlines():
        if not line.strip() or line.startswith("#"):
            continue
        name, colour, *_ = line.split(":")
        if name not in codes:
            raise InvalidInputError(
                f"{LABELMAP}: label {name!r} is not a KappaMask class ({', '.join(codes)})"
            )
        try:
            r, g, b = (int(v) for v in colour.split(","))
        except ValueError:
            raise InvalidInputError(f"{LABELMAP}: {line!r} has no r,g,b colour") from None
        found[(r, g, b)] = codes[name]
    return found


def _read_rgb(path: Path) -> np.ndarray:
    """An RGB, RGBA or palette PNG as RGB [h, w, 3]."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", NotGeoreferencedWarning)
        with rasterio.open(path) as src:
            data = src.read()
            if src.count == 1:
                try:
                    table = src.colormap(1)
                except ValueError:
                    raise InvalidInputError(
                        f"{path.name}: a single-band mask without a "
                        "palette cannot be read as colours"
                    ) from None
                lut = np.zeros((256, 3), np.uint8)
                for index, rgba in table.items():
                    lut[index] = rgba[:3]
                rgb: np.ndarray = lut[data[0]]
                return rgb
    return np.moveaxis(data[:3], 0, -1)


def _decode(path: Path, colours: dict[tuple[int, int, int], int]) -> np.ndarray:
    rgb = _read_rgb(path).astype(np.int32)
    key = (rgb[..., 0] << 16) | (rgb[..., 1] << 8) | rgb[..., 2]
    labels = np.full(key.shape, 255, np.uint8)
    for (r, g, b), code in colours.items():
        labels[key == (r << 16 | g << 8 | b)] = code
    if (labels == 255).any():
        odd = [
            (int(k) >> 16, (int(k) >> 8) & 255, int(k) & 255)
            for k in np.unique(key[labels == 255])[:5]
        ]
        raise InvalidInputError(f"{path.name}: colours {odd} are in no label of {LABELMAP}")
    return labels


@contextmanager
def _opened(source: Path) -> Iterator[Path]:
    """A dataset folder, or a zip unpacked into a temporary one (the folder that holds
    labelmap.txt)."""
    if source.is_dir():
        yield source
        return
    if not zipfile.is_zipfile(source):
        raise InvalidInputError(f"{source} is neither a dataset folder nor a zip")
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(source) as archive:
        for member in archive.namelist():
            target = (Path(tmp) / member).resolve()
            if not target.is_relative_to(Path(tmp).resolve()):
                raise InvalidInputError(f"{source}: member {member!r} lies outside the archive")
        archive.extractall(tmp)
        maps = sorted(Path(tmp).rglob(LABELMAP))
        yield maps[0].parent if maps else Path(tmp)


def import_dataset(folder: ReviewFolder, source: Path) -> list[Path]:
    """Every class PNG of a Segmentation mask 1.1 export as its sub-tile's label raster
    (a PNG whose name is no sub-tile of the review is refused); the rasters written."""
    with _opened(source) as root:
        if not (root / LABELMAP).exists():
            raise InvalidInputError(
                f"{source} holds no {LABELMAP}: export it as Segmentation mask 1.1"
            )
        colours = read_labelmap((root / LABELMAP).read_text())
        pngs = sorted((root / CLASS_DIR).glob("*.png"))
        if not pngs:
            raise InvalidInputError(f"{source} holds no {CLASS_DIR}/*.png")
        decoded = {p.stem: _decode(p, colours) for p in pngs}
        for name in decoded:
            folder.tile(name)  # every name checked before anything is written
        tags = {"source": "cvat-segmentation-mask-1.1", "dataset": source.name}
        return [folder.write_labels(name, labels, tags) for name, labels in decoded.items()]
